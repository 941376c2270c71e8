"""`pasta-fed pretrain | predict | evaluate` (and the `model` group from cli_model)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from synth.cli_errors import fail

log = logging.getLogger(__name__)


def _pretrain(args) -> int:
    from .pretrain import PretrainConfig, pretrain

    overrides = {"data": args.data, "out": args.out, "preset": args.preset, "epochs": args.epochs,
                 "max_minutes": args.max_minutes, "max_cpu_minutes": args.max_cpu_minutes, "device": args.device,
                 "precision": args.precision, "seed": args.seed,
                 "val_fraction": args.val_fraction, "batch_size": args.batch_size, "lr": args.lr,
                 "max_cases": args.max_cases, "segment_minutes": args.segment_minutes}
    try:
        if args.config:
            cfg = PretrainConfig.from_yaml(args.config, **overrides)
        else:
            cfg = PretrainConfig.from_dict({k: v for k, v in overrides.items() if v is not None})
        cfg.resume = args.resume
        cfg.progress = not args.no_progress
        path = pretrain(cfg)
    except (ValueError, FileNotFoundError) as exc:
        return fail("pretrain", exc)
    print(f"checkpoint: {path}")
    return 0


def _checkpoint(args) -> Path:
    """--checkpoint, or the model shipped with the package (ShippedModelMissing, a FileNotFoundError, names it)."""
    if args.checkpoint is not None:
        return args.checkpoint
    from .shipped import shipped_checkpoint
    path = shipped_checkpoint()
    log.info("no --checkpoint: using the shipped model %s", path)
    return path


def _predict_batch(args) -> int:
    from .predict import predict_batch

    try:
        outcome = predict_batch(_checkpoint(args), args.batch, args.out, device=args.device)
    except (ValueError, FileNotFoundError) as exc:
        return fail("predict", exc)
    failed = {name: why for name, why in outcome.items() if why != "ok"}
    print(f"predicted {len(outcome) - len(failed)} of {len(outcome)} CT(s) into {args.out} (batch.json)")
    for name, why in failed.items():
        print(f"  {name}: {why}")
    return fail("predict", f"{len(failed)} CT(s) could not be read (see above)") if failed else 0


def _predict(args) -> int:
    from .dicom_results import checked_store_url, store_dicomweb
    from .predict import predict

    if args.batch is not None:
        if args.store is not None:
            return fail("predict", "--store takes one series (--image), not --batch")
        return _predict_batch(args)
    try:
        if args.store is not None:
            checked_store_url(args.store)
            if not args.image.is_dir():
                raise ValueError(f"--store sends seg.dcm and sr.dcm, made only for a DICOM series folder, "
                                 f"not {args.image}")
        report = predict(_checkpoint(args), args.image, args.out, device=args.device)
    except (ValueError, FileNotFoundError) as exc:
        return fail("predict", exc)
    print((Path(args.out) / "report.txt").read_text(encoding="utf-8"), end="")
    print(f"mask: {report['mask']}")
    for kind, path in report.get("dicom", {}).items():
        print(f"{kind}: {path}")
    if args.store is not None:
        if "skipped" in report["dicom"]:
            return fail("predict", ValueError(f"--store: nothing to send ({report['dicom']['skipped']})"))
        try:
            n = store_dicomweb(args.store, list(report["dicom"].values()), args.store_credentials)
        except (RuntimeError, ValueError) as exc:   # DicomStoreError; CredentialsError from the login file
            return fail("predict", exc)
        print(f"stored: {n} instance(s) to {args.store}")
    return 0


def _evaluate(args) -> int:
    from .evaluate import evaluate, format_table

    try:
        result = evaluate(_checkpoint(args), args.data, device=args.device, max_cases=args.max_cases,
                          progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as exc:
        return fail("evaluate", exc)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"json: {args.json}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="multi-task pretraining of PASTA on synthetic CT")
    p.add_argument("--data", type=Path, required=True, help="dataset root (PASTA-Gen layout)")
    p.add_argument("--preset", default=None, help="tiny | small | base | paper (default tiny)")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget (preparation included)")
    p.add_argument("--max-cpu-minutes", type=float, default=None,
                   help="process CPU-time budget (all threads; 2 cores x 10 min = 20): repeatable on a shared machine")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None,
                   help="auto: bfloat16 on CUDA and on CPUs with native bf16, else fp32")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--val-fraction", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max-cases", type=int, default=None)
    p.add_argument("--segment-minutes", type=float, default=None,
                   help="a first stage of whole-volume lesion + organ segmentation for this many of the minutes")
    p.add_argument("--config", type=Path, default=None, help="YAML (e.g. configs/pretrain.yaml); flags override it")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_pretrain)

    p = subparsers.add_parser("predict", help="lesion mask and structured report for one CT (or a batch)")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped model (pasta-fed model info)")
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--image", type=Path, help="NIfTI file or DICOM series folder")
    inputs.add_argument("--batch", type=Path, metavar="DIR",
                        help="every NIfTI file and series sub-folder of DIR, the model loaded once, into OUT/<name>/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--store", default=None, metavar="DICOMWEB_URL",
                   help="send seg.dcm and sr.dcm to this PACS by STOW-RS (DICOM series input only)")
    p.add_argument("--store-credentials", type=Path, default=None, metavar="FILE",
                   help='JSON {"username", "password"} or {"token"} for --store, as in hospital.yaml')
    p.set_defaults(func=_predict)

    p = subparsers.add_parser("evaluate", help="metrics of a checkpoint on a dataset")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped model (pasta-fed model info)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--max-cases", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_evaluate)

    try:
        from .cli_model import register_model
    except ImportError as exc:  # the model command group lives in its own module
        log.debug("model commands unavailable: %s", exc)
    else:
        register_model(subparsers)
