"""The empirical privacy audit on one simulated hospital: lower bound vs claim, and its wall time.

One synthetic site (the simulation's generator, the tiny preset's report head), audited with
`client.privacy.empirical_audit.run_audit` at max_epsilon 1, 4 and 8 with DP on, then with
the noise switched off at a claim of 1 and with one noise vector reused over two replays
(the test switches; never reachable from a site's YAML). The first audit pays for the
site's feature cache (cold); the others find it made (warm).
Last line: JSON with, per case, the lower bound and the claimed epsilon, and the wall times
(target: under 2 minutes for the tiny report head with 1,000 canaries).

    python bench/privacy_audit.py [--canaries 1000] [--cases 40] [--size 48] [--seed 0]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._federation import make_pretrained
from client.privacy.empirical_audit import run_audit
from client.site_config import load_site_config
from simulation.hospitals import build_site, make_profiles


def _case(result, wall: float) -> dict:
    return {"epsilon_lower_bound": round(result.epsilon_lower_bound, 3),
            "claimed_epsilon": round(result.claimed_epsilon, 3), "correct": result.correct,
            "guesses": result.guesses, "verdict": result.verdict, "wall_s": round(wall, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--cases", type=int, default=40, help="patients of the simulated site")
    parser.add_argument("--size", type=int, default=48, help="voxels per side of each synthetic CT")
    parser.add_argument("--seed", type=int, default=0, help="canary membership draw (the noise stays fresh)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out: dict = {"canaries": args.canaries, "patients": args.cases, "task": "report", "preset": "tiny"}
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        root = Path(tmp)
        pre = make_pretrained(root / "pretrained.ckpt")
        profile = make_profiles(2, args.seed, args.cases, args.cases, heldout=5)[0]
        site = build_site(root, profile, args.size, 1.0, 1e-5, 1.0, backbone=pre, progress=False)
        config = load_site_config(site.config)
        runs = [(f"dp_epsilon_{e:g}", e, {}) for e in (1.0, 4.0, 8.0)]
        runs += [("dp_off_claim_1", 1.0, {"_noise_scale": 0.0}),
                 ("noise_reuse_claim_1", 1.0, {"releases": 2, "_noise_seed": 1234})]
        for name, epsilon, switches in runs:
            cfg = dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, max_epsilon=epsilon))
            t0 = time.perf_counter()
            result = run_audit(cfg, canaries=args.canaries, seed=args.seed, **switches)
            out[name] = _case(result, time.perf_counter() - t0)
            print(f"{name:<22} lower bound {result.epsilon_lower_bound:6.3f}  claimed {result.claimed_epsilon:6.3f}  "
                  f"correct {result.correct:4d}/{result.guesses:<4d}  {out[name]['wall_s']:6.1f} s  {result.verdict}")
    out["audit_wall_s_cold_cache"] = out["dp_epsilon_1"]["wall_s"]
    out["audit_wall_s_warm"] = max(out[k]["wall_s"] for k in ("dp_epsilon_4", "dp_epsilon_8", "dp_off_claim_1"))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
