"""Wall time of a simulated federated round against the same local training without Flower.

3 simulated sites (tiny preset), DP on. The federated round time is the mean of rounds
2..R: round 1 pays once for Ray start-up, the backbone handshake and the per-site
feature cache, which every later round reuses (they are amortised over the run, and
reported separately). The plain loop runs the same site task (`client.task.SiteAgent`:
same features, same DP training, same evaluation) for the 3 sites one after another
in this process, with warm caches. Last line: JSON with round_over_local_training
(target <= 1.2).
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
from _federation import make_pretrained, make_sites


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--cases", type=int, default=16)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from client.site_config import load_site_config
    from client.task import SiteAgent
    from pasta_model.checkpoint import load_checkpoint, read_meta
    from pasta_model.protocol import RoundConfig, heads_to_arrays
    from server.run_state import RunDirectory
    from server.settings import RunSettings
    from simulation.federation import run_federated

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pre = make_pretrained(root / "pretrained.ckpt")
        sites = make_sites(root / "fed", 3, args.cases)
        settings = RunSettings(num_server_rounds=args.rounds, task="report", pretrained=str(pre),
                               run_dir=str(root / "run"), min_sites=2, local_epochs=1, round_timeout=600.0)
        t0 = time.perf_counter()
        run_federated(settings, [s.config for s in sites])
        total = time.perf_counter() - t0
        records = RunDirectory(root / "run").records()
        later = [r["seconds"] for r in records[1:]]
        fed_round = sum(later) / len(later)

        # the same work in a plain loop: same site task, warm feature caches, no Flower
        plain_sites = make_sites(root / "plain", 3, args.cases)
        meta = read_meta(pre)
        model, _ = load_checkpoint(pre)
        heads = heads_to_arrays(model, "report")
        agents = []
        for s in plain_sites:
            cfg = load_site_config(s.config)
            agent = SiteAgent(cfg.__class__(**{**cfg.__dict__, "backbone": pre}))
            agent.task_data(meta.backbone_sha256, "report")      # warm the cache, as round 1 does
            agents.append(agent)
        times = []
        for rnd in range(1, args.rounds):
            config = RoundConfig(server_round=rnd, task="report", local_epochs=1, learning_rate=0.5, batch_size=16,
                                 backbone_sha256=meta.backbone_sha256, dp_delta=1e-5, planned_rounds=args.rounds,
                                 run_id="plain")
            t0 = time.perf_counter()
            for agent in agents:
                reply = agent.train(config, heads)
                try:
                    agent.evaluate(config, reply.arrays)
                except Exception:   # too few held-out patients: metrics withheld, as at the sites
                    pass
            times.append(time.perf_counter() - t0)
        local = sum(times) / len(times)
    result = {"sites": 3, "rounds": args.rounds, "federated_round_s": round(fed_round, 3),
              "first_round_s": round(records[0]["seconds"], 3), "whole_run_s": round(total, 2),
              "local_training_round_s": round(local, 3), "round_over_local_training": round(fed_round / local, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
