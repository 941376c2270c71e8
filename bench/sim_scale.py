"""Seconds per round and peak memory of a simulated federation with 3, 10 and 20 hospitals (tiny).

Each hospital has 8 cases at 48^3; 2 rounds; the time per round is round 2's (round 1
also builds each site's feature cache). Peak memory covers this process and every Ray
worker. Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _federation import PeakMemory, make_pretrained, make_sites


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", default="3,10,20")
    ap.add_argument("--cases", type=int, default=8)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from server.run_state import RunDirectory
    from server.settings import RunSettings
    from simulation.federation import run_federated

    rows = []
    for n in [int(x) for x in args.sites.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            pre = make_pretrained(root / "pretrained.ckpt")
            sites = make_sites(root, n, args.cases)
            settings = RunSettings(num_server_rounds=2, task="report", pretrained=str(pre), run_dir=str(root / "run"),
                                   min_sites=2, local_epochs=1, round_timeout=1800.0)
            t0 = time.perf_counter()
            with PeakMemory() as mem:
                run_federated(settings, [s.config for s in sites])
            total = time.perf_counter() - t0
            recs = RunDirectory(root / "run").records()
            rows.append({"sites": n, "round1_s": recs[0]["seconds"], "round2_s": recs[1]["seconds"],
                         "whole_run_s": round(total, 1), "peak_memory_gb": round(mem.peak / 2**30, 2)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"scale": rows}))


if __name__ == "__main__":
    main()
