"""`pasta-fed simulate` end to end: killed with SIGKILL after round 1, resumed, honest ledgers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from privacy_checks import dp_accounting_epsilon

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]
PASTA_FED = [sys.executable, "-m", "simulation.cli"]

SMALL = {"simulation": {
    "hospitals": 3, "rounds": 3, "preset": "tiny", "task": "report", "epsilon": 8.0, "volume_size": 48,
    "cases_min": 8, "cases_max": 16, "heldout_cases": 6, "pretrain_cases": 16, "pretrain_minutes": 0.4,
    "comparisons": ["local", "pooled_scratch"]}}


def _env(tmp: Path) -> dict:
    return {**os.environ, "PASTA_FED_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}


def test_simulate_killed_after_round_one_resumes_to_an_honest_end(tmp_path: Path):
    config = tmp_path / "sim.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    run = tmp_path / "run"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([*PASTA_FED, "simulate", "--config", str(config), "--out", str(run)], cwd=ROOT,
                            env=_env(tmp_path), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (run / "checkpoints").exists() or not any((run / "checkpoints").glob("round-001*")):
            assert proc.poll() is None, (tmp_path / "first.log").read_text(encoding="utf-8")[-4000:]
            assert time.monotonic() < deadline, "round 1 never completed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert not (run / "final.ckpt").exists(), "the run ended before it was killed"

    # a second start without --resume must not overwrite the run
    again = subprocess.run([*PASTA_FED, "simulate", "--config", str(config), "--out", str(run)], cwd=ROOT,
                           env=_env(tmp_path), capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert again.returncode == 2 and "--resume" in again.stderr

    done = subprocess.run([*PASTA_FED, "simulate", "--resume", str(run)], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, encoding="utf-8", timeout=900,
                          start_new_session=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == f"report: {run / 'report.md'}"
    # the default output is what a user needs: its steps and one line per round, no library noise
    # as a terminal shows it: a progress bar redraws its line with \r, so it is one line
    printed = [line.rsplit("\r", 1)[-1] for line in (done.stdout + done.stderr).strip().split("\n")]
    assert len(printed) <= 20, "\n".join(printed)
    assert [line for line in printed if "server.rounds: round " in line and "aggregated" in line], printed
    for noise in ("DEBUG", "alembic", "DEPRECATED", "nvImageCodec", "ClientAppActor", "warnings.warn"):
        assert not [line for line in printed if noise in line], (noise, printed)

    rounds = [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]
    assert (run / "final.ckpt").exists()
    report = (run / "report.md").read_text()
    assert "## Comparisons" in report and "federated (DP)" in report and "local alone (DP)" in report
    assert (run / "plots" / "comparisons.png").exists() and (run / "plots" / "epsilon.png").exists()

    for site in sorted((run / "sites").iterdir()):
        ledger_file = next((site / "state" / "privacy").glob("ledger-*.json"))
        ledger = json.loads(ledger_file.read_text())
        committed = sorted({e["round"] for e in ledger["entries"] if e["status"] == "committed"})
        assert committed == [1, 2, 3], site.name
        history = [e for e in ledger["entries"]]
        ours = history[-1]["epsilon_after"]
        theirs = dp_accounting_epsilon([(h["noise_multiplier"], h["sample_rate"], h["steps"]) for h in history],
                                       1e-5)
        assert ours == pytest.approx(theirs, rel=0.02), site.name
        assert ours <= 8.0 + 1e-6
