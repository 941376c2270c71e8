"""`pasta-fed model import|info|ship`: thin argparse shells over released.py, checkpoint.py and shipped/."""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from synth.cli_errors import fail

from .checkpoint import CheckpointError, read_meta, save_checkpoint, tensor_shapes
from .heads import TASKS
from .network import HEADS_PREFIX
from .presets import preset_names


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown task(s) {bad}; valid: {', '.join(TASKS)}")
    return tasks


def cmd_import(args: argparse.Namespace) -> int:
    from .released import ReleasedImportError, import_released
    src = Path(args.source)
    try:
        model, summary = import_released(src, preset=args.preset, tasks=args.tasks)
    except (ReleasedImportError, ValueError) as exc:
        return fail("model import", exc)
    print(summary.render())
    meta = save_checkpoint(args.out, model, extra={
        "imported_from": src.name,
        "source_sha256": _file_sha256(src),
        "variant": summary.variant,
        "container": summary.container,
        "random_decoder": summary.encoder_only,
    })
    print(f"wrote {args.out} (preset {meta.preset}, tasks {','.join(meta.tasks)}, "
          f"backbone sha256 {meta.backbone_sha256})")
    return 0


def parameter_counts(path: str | Path) -> dict:
    """Parameter counts from the checkpoint header alone (no tensors loaded)."""
    meta = read_meta(path)
    shapes = tensor_shapes(path)

    def numel(shape: tuple[int, ...]) -> int:
        n = 1
        for s in shape:
            n *= s
        return n

    heads = {task: sum(numel(s) for k, s in shapes.items() if k.startswith(f"{HEADS_PREFIX}{task}."))
             for task in meta.tasks}
    backbone = sum(numel(s) for k, s in shapes.items() if not k.startswith(HEADS_PREFIX))
    return {"total": backbone + sum(heads.values()), "backbone": backbone, "heads": heads}


def _shipped_info(path: Path) -> dict:
    """Path, SHA-256, size and card summary of the shipped checkpoint (the card checked against the file)."""
    from .shipped import card_summary, shipped_card
    sha = _file_sha256(path)
    card = shipped_card()
    info = {"path": str(path), "sha256": sha, "bytes": path.stat().st_size,
            "status": None if card is None else card.get("status"),
            "card": [] if card is None else card_summary(card)}
    if card is None:
        info["warning"] = f"no model card beside {path}"
    elif (card.get("file") or {}).get("sha256") != sha:
        info["warning"] = (f"the model card describes another file (SHA-256 {(card.get('file') or {}).get('sha256')}); "
                           "re-run `pasta-fed model ship`")
    return info


def cmd_info(args: argparse.Namespace) -> int:
    shipped = None
    try:
        if args.checkpoint is None:
            from .shipped import shipped_checkpoint
            args.checkpoint = shipped_checkpoint()
            shipped = _shipped_info(args.checkpoint)
        meta = read_meta(args.checkpoint)
        params = parameter_counts(args.checkpoint)
    except (CheckpointError, FileNotFoundError) as exc:
        return fail("model info", exc)
    if args.json:
        out = {"preset": meta.preset, "tasks": meta.tasks, "parameters": params}
        if shipped is not None:
            out["shipped"] = shipped
        print(json.dumps(out))
        return 0
    if shipped is not None:
        print(f"shipped model:   {shipped['path']}")
        print(f"file sha256:     {shipped['sha256']}")
        print(f"size:            {shipped['bytes'] / 1e6:.2f} MB")
        for line in shipped["card"]:
            print(f"card {line}")
        if "warning" in shipped:
            print(f"warning:         {shipped['warning']}")
    print(f"checkpoint:      {args.checkpoint}")
    print(f"preset:          {meta.preset}")
    print(f"tasks:           {', '.join(meta.tasks)}")
    print(f"package version: {meta.package_version}")
    print(f"backbone sha256: {meta.backbone_sha256}")
    print(f"parameters:      {params['total']:,} total, {params['backbone']:,} backbone")
    for task, n in params["heads"].items():
        print(f"  heads.{task:<9} {n:,}")
    if meta.extra:
        print(f"extra:           {json.dumps(meta.extra, sort_keys=True)}")
    return 0


def cmd_ship(args: argparse.Namespace) -> int:
    from .shipped import ShipError, ship_checkpoint
    try:
        card = json.loads(Path(args.card).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return fail("model ship", f"{args.card}: cannot read the card ({exc})")
    try:
        card = ship_checkpoint(args.checkpoint, card, args.out, evaluate_data=args.evaluate,
                               evaluate_cases=args.evaluate_cases, device=args.device, card_source=str(args.card))
    except (CheckpointError, ShipError, FileNotFoundError) as exc:
        return fail("model ship", exc)
    from .shipped import SHIPPED_FILE, card_summary, shipped_dir
    out = Path(args.out) if args.out is not None else shipped_dir()
    print(f"wrote {out / SHIPPED_FILE} ({card['file']['bytes'] / 1e6:.2f} MB float16, "
          f"sha256 {card['file']['sha256']}; round trip max |diff| {card['round_trip']['max_abs_diff']:.3g}, "
          f"allowed {card['round_trip']['allowed']:.3g})")
    for line in card_summary(card):
        print(f"card {line}")
    return 0


def register_model(subparsers) -> None:
    """Add `model import`, `model info` and `model ship` to the root command's subparsers."""
    model = subparsers.add_parser("model", help="import released PASTA weights, inspect checkpoints")
    sub = model.add_subparsers(dest="model_command", required=True)

    imp = sub.add_parser("import", help="convert PASTA_final.pth into a pasta-fed checkpoint")
    imp.add_argument("source", help="released PASTA weights (.pth); loaded with weights_only=True")
    imp.add_argument("--out", required=True, help="checkpoint to write (.safetensors)")
    imp.add_argument("--preset", choices=preset_names(), default=None,
                     help="network preset (default: inferred from the tensor shapes)")
    imp.add_argument("--tasks", type=_tasks, default=list(TASKS),
                     help=f"comma-separated heads to create (default: {','.join(TASKS)})")
    imp.set_defaults(func=cmd_import)

    info = sub.add_parser("info", help="preset, tasks and parameter counts of a checkpoint (default: the shipped one)")
    info.add_argument("checkpoint", nargs="?", type=Path, default=None,
                      help="a pasta-fed checkpoint (default: the shipped model, with its card)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)

    ship = sub.add_parser("ship", help="write a checkpoint as the shipped model (fp16) with its model card")
    ship.add_argument("--checkpoint", type=Path, required=True, help="the pasta-fed checkpoint to ship")
    ship.add_argument("--card", type=Path, required=True,
                      help="JSON: status, data {seed, count, ...}, command, device, minutes, heldout {data, figures}")
    ship.add_argument("--out", type=Path, default=None, help="folder (default: the package's pasta_model/shipped/)")
    ship.add_argument("--evaluate", type=Path, default=None, metavar="DATA",
                      help="held-out dataset: the card's held-out figures become those of the fp16 file on it")
    ship.add_argument("--evaluate-cases", type=int, default=None)
    ship.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="for --evaluate")
    ship.set_defaults(func=cmd_ship)
