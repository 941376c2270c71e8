"""The run directory: what a coordinator can trust after a crash.

Layout (RUN/):
  run.json                       settings and the run id, written once at the start
  checkpoints/round-NNN.safetensors  global heads after round NNN
  checkpoints/round-NNN.json     that round's metrics (per site and aggregated); written
                                 LAST, so its presence marks the round complete
  metrics.jsonl                  one line per complete round, rebuilt from the round
                                 files, so a round appears exactly once even after a resume
  final.ckpt, report.md, plots/  at the end

Every file is written to a temporary name and renamed into place.
"""
from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from synth.atomic import atomic_path, write_atomic

log = logging.getLogger(__name__)

_ROUND_JSON = re.compile(r"round-(\d{3,})\.json$")


def atomic_write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@dataclass
class CompletedRound:
    round: int
    heads: dict[str, np.ndarray]
    record: dict[str, Any]


class RunDirectory:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"

    # -- run identity ---------------------------------------------------------
    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    def exists(self) -> bool:
        return self.run_json.exists()

    def start(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Create the run (new run id), or return the stored run when resuming."""
        if self.exists():
            return json.loads(self.run_json.read_text(encoding="utf-8"))
        info = {"run_id": uuid.uuid4().hex[:12], "settings": settings}
        atomic_write_json(self.run_json, info)
        return info

    # -- rounds ---------------------------------------------------------------
    def round_paths(self, rnd: int) -> tuple[Path, Path]:
        stem = self.checkpoints / f"round-{rnd:03d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def save_round(self, rnd: int, heads: dict[str, np.ndarray], record: dict[str, Any]) -> None:
        weights, meta = self.round_paths(rnd)
        with atomic_path(weights) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in heads.items()}, str(tmp))
        atomic_write_json(meta, {"round": rnd, **record})   # completeness marker
        self.rebuild_metrics()

    def completed_rounds(self) -> list[int]:
        if not self.checkpoints.exists():
            return []
        done = []
        for p in self.checkpoints.iterdir():
            m = _ROUND_JSON.match(p.name)
            if m and self.round_paths(int(m.group(1)))[0].exists():
                done.append(int(m.group(1)))
        return sorted(done)

    def load_round(self, rnd: int) -> CompletedRound:
        weights, meta = self.round_paths(rnd)
        return CompletedRound(rnd, load_file(str(weights)), json.loads(meta.read_text(encoding="utf-8")))

    def last_complete(self) -> CompletedRound | None:
        rounds = self.completed_rounds()
        return self.load_round(rounds[-1]) if rounds else None

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(self.round_paths(r)[1].read_text(encoding="utf-8")) for r in self.completed_rounds()]

    def sites_by_node(self) -> dict[int, dict[str, Any]]:
        """node id (as `flwr supernode list` shows it) -> {"site": its name, "rounds": [...]},
        from the completed rounds' records; the name is the one each site's replies carry."""
        nodes: dict[int, dict[str, Any]] = {}
        for rec in self.records():
            for site, entry in rec.get("sites", {}).items():
                if "node_id" in entry:
                    seen = nodes.setdefault(int(entry["node_id"]), {"site": site, "rounds": []})
                    seen["rounds"].append(rec["round"])
        return nodes

    def rebuild_metrics(self) -> Path:
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records())
        path = self.root / "metrics.jsonl"
        write_atomic(path, lines)
        return path
