"""One local epoch of head fine-tuning with DP-SGD against the same without DP, and with the
feature cache against recomputing backbone features, side by side in one run.

Synthetic features shaped like the `tiny` preset's (N patients: pooled [N, C_deep] for the
classification heads, decoder features [N, C0, 48, 48, 48] for the segment head), same
data, same device, same number of steps. Times are medians over --repeats after a
warm-up. dp_over_nondp is the epoch loop of both heads together (time-weighted);
per-head ratios and the ratio with the per-round set-up (make_private) are reported too.
Last line: JSON with dp_over_nondp (target <= 1.5) and cache_speedup.

    python bench/dp_overhead.py [--n 64] [--batch 16] [--device auto] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.privacy.dp_trainer import train_head_dp, train_head_plain
from pasta_model.device import select_device
from pasta_model.heads import build_head
from pasta_model.presets import get_preset


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs after a warm-up (repeats=0: one run, no warm-up)."""
    if repeats == 0:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0
    fn()  # warm-up (allocations, cudnn/opacus first-call costs)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_epochs(task, preset, inputs, targets, loss_fn, args, device) -> dict[str, float]:
    """Median seconds of one local epoch on a fresh head, non-DP and DP-SGD, interleaved so that a
    change in machine load hits both alike: epoch loop alone and whole call (with set-up)."""
    def run(trainer):
        return trainer(build_head(task, preset), inputs, targets, loss_fn, epochs=1, batch_size=args.batch,
                       lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, device=device, seed=0,
                       grad_sample_mode=args.grad_sample_mode)
    run(train_head_plain), run(train_head_dp)  # warm-up
    plain, dp = [], []
    for _ in range(args.repeats):
        plain.append(run(train_head_plain))
        dp.append(run(train_head_dp))
    med = statistics.median
    return {"non_dp_s": med(r.train_seconds for r in plain), "dp_s": med(r.train_seconds for r in dp),
            "non_dp_call_s": med(r.seconds for r in plain), "dp_call_s": med(r.seconds for r in dp)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="patients")
    ap.add_argument("--batch", type=int, default=16, help="(expected) batch size")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--grad-sample-mode", default="hooks", help="Opacus per-sample gradient mode")
    ap.add_argument("--skip-cache", action="store_true", help="skip the feature-cache comparison")
    args = ap.parse_args(argv)

    device = select_device(args.device)
    preset = get_preset("tiny")
    g = torch.Generator().manual_seed(0)
    n, s = args.n, preset.crop_size
    pooled = torch.randn(n, preset.deep_features, generator=g)
    decoder = torch.randn(n, preset.base_features, s, s, s, generator=g)
    stage_y = torch.randint(0, 4, (n,), generator=g)
    seg_y = (torch.rand(n, s, s, s, generator=g) > 0.9).long()
    print(f"device {device}, torch threads {torch.get_num_threads()}, N={n}, batch {args.batch}, "
          f"pooled {list(pooled.shape)}, decoder {list(decoder.shape)}")

    rows = {}
    for task, x, y in (("stage", pooled, stage_y), ("segment", decoder, seg_y)):
        rows[task] = r = timed_epochs(task, preset, x, y, F.cross_entropy, args, device)
        plain, dp, plain_all, dp_all = r["non_dp_s"], r["dp_s"], r["non_dp_call_s"], r["dp_call_s"]
        print(f"{task:8s} one epoch: non-DP {plain:8.3f} s   DP-SGD {dp:8.3f} s   DP/non-DP {dp / plain:6.2f}"
              f"   (whole call with set-up: {plain_all:.3f} s vs {dp_all:.3f} s, {dp_all / plain_all:.2f})")
    total = {k: sum(r[k] for r in rows.values()) for k in ("non_dp_s", "dp_s", "non_dp_call_s", "dp_call_s")}
    result = {"dp_over_nondp": round(total["dp_s"] / total["non_dp_s"], 3),
              "dp_over_nondp_by_head": {k: round(v["dp_s"] / v["non_dp_s"], 3) for k, v in rows.items()},
              "dp_over_nondp_with_setup": round(total["dp_call_s"] / total["non_dp_call_s"], 3),
              "epoch_s": {k: {"non_dp": round(v["non_dp_s"], 4), "dp": round(v["dp_s"], 4)} for k, v in rows.items()},
              "device": str(device), "n": n, "batch": args.batch}

    if args.skip_cache:
        result["cache_speedup"] = None
    else:
        result.update(cache_comparison(preset, n, seg_y, args, device))
    print(json.dumps(result))
    return 0


def cache_comparison(preset, n, seg_y, args, device) -> dict:
    """Segment head, one DP epoch: features from the on-disk cache vs re-encoded by the tiny backbone."""
    from safetensors.torch import load_file, save_file

    from pasta_model.network import build_model

    model = build_model(preset, tasks=("segment",)).to(device)
    model.freeze_backbone()
    g = torch.Generator().manual_seed(1)
    crops = torch.randn(n, 1, preset.crop_size, preset.crop_size, preset.crop_size, generator=g)
    enc_batch = 8

    @torch.no_grad()
    def encode_all() -> torch.Tensor:
        model.eval()
        parts = [model.encode(crops[i:i + enc_batch].to(device), decode=True).decoder.cpu()
                 for i in range(0, n, enc_batch)]
        return torch.cat(parts)

    with tempfile.TemporaryDirectory() as tmp:
        # what the agent's cache (client.features) writes once per case: float16 decoder features
        paths = [Path(tmp) / f"case{i:04d}.safetensors" for i in range(n)]
        for path, feats in zip(paths, encode_all()):
            save_file({"decoder": feats.to(torch.float16).contiguous()}, str(path))

        def load_all() -> torch.Tensor:
            return torch.stack([load_file(str(path))["decoder"].float() for path in paths])

        def epoch(get_features):
            def run():
                x = get_features()
                train_head_dp(build_head("segment", preset), x, seg_y, F.cross_entropy, epochs=1,
                              batch_size=args.batch, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0,
                              device=device, seed=0, grad_sample_mode=args.grad_sample_mode)
            return run

        cached_run, uncached_run = epoch(load_all), epoch(encode_all)
        cached_run(), uncached_run()  # warm-up
        cached, uncached = [], []
        for _ in range(args.repeats):  # interleaved: load changes hit both alike
            cached.append(timed(cached_run, device, 0))
            uncached.append(timed(uncached_run, device, 0))
        t_cached, t_uncached = statistics.median(cached), statistics.median(uncached)
        t_load = timed(load_all, device, args.repeats)
        t_encode = timed(encode_all, device, args.repeats)
    print(f"segment epoch with feature cache {t_cached:8.3f} s (load {t_load:.3f} s)   "
          f"re-encoding every epoch {t_uncached:8.3f} s (encode {t_encode:.3f} s)   "
          f"speedup {t_uncached / t_cached:5.2f}")
    return {"cache_speedup": round(t_uncached / t_cached, 3), "cached_epoch_s": round(t_cached, 3),
            "uncached_epoch_s": round(t_uncached, 3), "encode_s": round(t_encode, 3), "load_s": round(t_load, 3)}


if __name__ == "__main__":
    sys.exit(main())
