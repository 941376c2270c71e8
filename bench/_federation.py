"""Shared set-up for the federation benchmarks: simulated sites and process-tree memory."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch

from pasta_model.checkpoint import save_checkpoint
from pasta_model.network import build_model
from simulation.hospitals import build_site, make_profiles


def make_sites(root: Path, n: int, cases: int, size: int = 48, seed: int = 0):
    profiles = make_profiles(n, seed, cases, cases, heldout=5)
    return [build_site(root, p, size, 50.0, 1e-5, 1.0, backbone=None, progress=False) for p in profiles]


def make_pretrained(path: Path) -> Path:
    torch.manual_seed(0)
    save_checkpoint(path, build_model("tiny"))
    return path


def _tree_rss_bytes(root_pid: int) -> int:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
        stack.extend(children.get(pid, []))
    return total


class PeakMemory:
    """Peak resident memory of this process and all its descendants (Ray workers too)."""

    def __init__(self, every: float = 0.5):
        self.every, self.peak = every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_bytes(os.getpid()))
            time.sleep(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
