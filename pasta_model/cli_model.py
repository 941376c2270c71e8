"""`pasta-fed model import|info`: thin argparse shells over released.py and checkpoint.py."""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

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
        print(f"error: {exc}", file=sys.stderr)
        return 2
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


def cmd_info(args: argparse.Namespace) -> int:
    try:
        meta = read_meta(args.checkpoint)
        params = parameter_counts(args.checkpoint)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"preset": meta.preset, "tasks": meta.tasks, "parameters": params}))
        return 0
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


def register_model(subparsers) -> None:
    """Add `model import` and `model info` to the root command's subparsers."""
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

    info = sub.add_parser("info", help="preset, tasks and parameter counts of a checkpoint")
    info.add_argument("checkpoint")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)
