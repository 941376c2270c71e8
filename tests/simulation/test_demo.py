"""`pasta-fed demo` end to end, on a small config: the short pretraining, its figures, the federation, the report."""
from __future__ import annotations

import json

import pytest
import yaml

from simulation import commands
from simulation.cli import main

pytestmark = pytest.mark.slow

SMALL_DEMO = {"simulation": {
    "hospitals": 2, "rounds": 1, "preset": "tiny", "task": "report", "epsilon": 8.0, "volume_size": 48,
    "cases_min": 8, "cases_max": 10, "heldout_cases": 5, "pretrain_cases": 8, "pretrain_minutes": 0.2,
    "comparisons": ["local"], "audit": False}}


def test_demo_pretrains_shows_its_figures_then_federates_and_reports(tmp_path, monkeypatch, capsys):
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(SMALL_DEMO))
    monkeypatch.setattr(commands, "DEMO_CONFIG", config)
    monkeypatch.setenv("PASTA_FED_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"report: {out / 'report.md'}"
    figures = json.loads((out / "demo-pretraining.json").read_text(encoding="utf-8"))
    assert figures["heldout_cases"] == 8 and 0.0 <= figures["detect_auc"] <= 1.0
    assert (tmp_path / "cache").is_dir() and figures["checkpoint"].startswith(str(tmp_path / "cache"))
    rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1]
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "federated (DP)" in report and "local alone (DP)" in report
