"""Training samples/s of `pasta-fed pretrain`'s loop vs a minimal plain PyTorch loop.

Both loops run the same model (same initial weights), the same batches and the same
device in one process, alternately, so machine load hits both alike. The pretrain
loop includes everything pretraining does per step (random crops and flips from the
cached regions, collation, losses of all five tasks, lr schedule); the plain loop
iterates over the very same batches pre-built in memory. Last line: one JSON object
with overhead_vs_plain_loop = plain samples/s / pretrain samples/s (target <= 1.15).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pasta_model.data import build_datasets, prepare_cases, region_plan
from pasta_model.network import build_model
from pasta_model.presets import get_preset
from pasta_model.pretrain import (
    DEFAULT_LOSS_WEIGHTS,
    PretrainConfig,
    autocast,
    channels_last,
    compute_losses,
    make_loaders,
    resolve_precision,
    select_device,
    to_device,
    train_step,
    zip_longest_cycle,
)


def make_data(root: Path, n: int, size: int, seed: int) -> Path:
    from simulation.cli import main as cli_main
    if not (root / "manifest.jsonl").exists():
        rc = cli_main(["synth", "generate", "--out", str(root), "--n", str(n), "--size", str(size),
                       "--spacing", "3", "--seed", str(seed), "--workers", "2"])
        if rc:
            raise SystemExit(f"synth generate failed ({rc})")
    return root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="dataset (default: generate --n cases)")
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="measured steps per loop and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    preset = get_preset(args.preset)
    device = select_device(args.device)
    precision = resolve_precision(args.precision, device)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_data(Path(tmp) / "data", args.n, args.size, seed=3)
        from synth.dataset import read_dataset
        recipe = PretrainConfig(data=data, out=tmp)          # pretrain's default crops and augmentation
        cases = prepare_cases(read_dataset(data), preset,
                              region_plan(preset, recipe.jitter, recipe.negatives, 0), cache_dir=None)
    datasets = build_datasets(cases, preset, augment=recipe.augment, seed=0, jitter=recipe.jitter > 0)

    model = build_model(preset).to(device).to(memory_format=torch.channels_last_3d)   # as pretrain
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    w = DEFAULT_LOSS_WEIGHTS

    def pretrain_loop(epoch: int) -> tuple[int, float, list]:
        """Exactly pretrain's per-step path: loaders -> cycle -> train_step; records batches."""
        seen, kept = 0, []
        t = time.perf_counter()
        for step, batches in enumerate(zip_longest_cycle(make_loaders(datasets, args.batch_size, 0, epoch))):
            if step >= args.steps:
                break
            for g in opt.param_groups:
                g["lr"] = 1e-4 * (1 - step / (10 * args.steps)) ** 0.9
            for b in batches:
                train_step(model, b, opt, w, device, precision)
                seen += b["image"].shape[0]
                kept.append(b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return seen, time.perf_counter() - t, kept

    def plain_loop(batches: list) -> tuple[int, float]:
        """A minimal loop: tensors already in memory, forward, loss, backward, step."""
        seen = 0
        t = time.perf_counter()
        for b in batches:
            b = to_device(b, device)
            with autocast(device, precision):
                out = model(channels_last(b["image"]))
            loss, _ = compute_losses(out, b, w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += b["image"].shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return seen, time.perf_counter() - t

    pretrain_loop(99)                        # warm-up (kernel selection, allocator) for both
    pre_s = plain_s = 0.0
    pre_n = plain_n = 0
    for r in range(args.rounds):
        n, s, kept = pretrain_loop(r)
        pre_n, pre_s = pre_n + n, pre_s + s
        n, s = plain_loop(kept)
        plain_n, plain_s = plain_n + n, plain_s + s
    pre_rate, plain_rate = pre_n / pre_s, plain_n / plain_s
    result = {"preset": preset.name, "device": str(device), "precision": precision, "batch_size": args.batch_size,
              "crop": preset.crop_size, "samples": pre_n,
              "pretrain_samples_per_s": round(pre_rate, 3), "plain_samples_per_s": round(plain_rate, 3),
              "overhead_vs_plain_loop": round(plain_rate / pre_rate, 3), "target": 1.15}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
