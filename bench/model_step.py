"""Seconds per `tiny` training step (all heads, backward, SGD) at 64^3, batch 1, on this machine.

Target (issue 3): well under a second on 2 CPU cores. Last line: JSON.
"""
import json
import time

import torch

from pasta_model.network import build_model


def main() -> None:
    torch.manual_seed(0)
    net = build_model("tiny")
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    x = torch.randn(1, 1, 64, 64, 64)
    times = []
    for _ in range(8):
        t0 = time.perf_counter()
        out = net(x)
        sum(o.float().mean() for o in out.values()).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    steady = sorted(times[2:])
    print(json.dumps({"preset": "tiny", "input": [64, 64, 64], "threads": torch.get_num_threads(),
                      "step_seconds_median": round(steady[len(steady) // 2], 4),
                      "step_seconds_best": round(steady[0], 4)}))


if __name__ == "__main__":
    main()
