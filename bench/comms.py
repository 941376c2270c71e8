"""Bytes a site sends per round (one task's head) against the bytes of the full model.

Head-only federation is what makes DP-SGD and hospital uplinks affordable; this
measures it side by side for the `tiny` and `paper` presets. Head bytes are those of
the Flower ArrayRecord actually built for the reply (`heads_to_array_record`), the
full model is its raw float32 tensor bytes. The last line is JSON.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from pasta_model.heads import TASKS
from pasta_model.network import build_model
from pasta_model.protocol import heads_to_array_record

TARGET_PAPER_RATIO = 0.02


def measure(preset: str) -> dict:
    start = time.perf_counter()
    model = build_model(preset)
    build_s = time.perf_counter() - start
    sd = model.state_dict()
    full = sum(t.numel() * t.element_size() for t in sd.values())
    backbone = sum(t.numel() * t.element_size() for k, t in sd.items() if not k.startswith("heads."))
    tasks = {}
    for task in TASKS:
        record = heads_to_array_record(model, task)
        sent = record.count_bytes()
        tasks[task] = {"bytes": sent, "ratio_to_full": sent / full,
                       "params": sum(p.numel() for p in model.heads[task].parameters())}
    return {"full_bytes": full, "backbone_bytes": backbone, "build_s": round(build_s, 2), "tasks": tasks}


def main() -> int:
    results = {preset: measure(preset) for preset in ("tiny", "paper")}
    print(f"{'preset':<7} {'task':<9} {'head bytes/round':>17} {'full model bytes':>17} {'ratio':>9}")
    for preset, r in results.items():
        for task, t in r["tasks"].items():
            print(f"{preset:<7} {task:<9} {t['bytes']:>17,} {r['full_bytes']:>17,} {t['ratio_to_full']:>9.4%}")
    worst = max(t["ratio_to_full"] for t in results["paper"]["tasks"].values())
    ok = worst < TARGET_PAPER_RATIO
    print(f"paper: largest head is {worst:.4%} of the full model "
          f"(target < {TARGET_PAPER_RATIO:.0%}): {'OK' if ok else 'MISSED'}")
    summary = {
        "bench": "comms",
        "full_bytes": {p: r["full_bytes"] for p, r in results.items()},
        "head_bytes": {p: {t: v["bytes"] for t, v in r["tasks"].items()} for p, r in results.items()},
        "ratio": {p: {t: round(v["ratio_to_full"], 6) for t, v in r["tasks"].items()} for p, r in results.items()},
        "paper_max_ratio": round(worst, 6),
        "target_met": ok,
    }
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
