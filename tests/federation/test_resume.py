"""A federation killed with SIGKILL mid-run resumes from its last complete round."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hospital_factory import write_hospital, write_pretrained
from privacy_checks import dp_accounting_epsilon
from safetensors.numpy import load_file

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("federation_script.py")
ROUNDS = 3


def _sites(root: Path) -> list[Path]:
    return [write_hospital(root, f"h{i}", n, 20 + i) for i, n in enumerate([14, 10, 10])]


def _ledger(site: Path) -> dict:
    return json.loads((site.parent / "state" / "privacy" / "ledger-site.json").read_text())


def _cmd(pre: Path, run: Path, sites: list[Path]) -> list[str]:
    return [sys.executable, str(SCRIPT), str(pre), str(run), str(ROUNDS), *map(str, sites)]


def _run(cmd, log: Path, timeout: float = 400) -> None:
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout,
                              cwd=Path(__file__).parents[2], start_new_session=True)
    assert proc.returncode == 0, log.read_text()[-3000:]


def test_sigkill_mid_run_then_resume_runs_each_round_once_and_charges_every_attempt(tmp_path: Path):
    pre = write_pretrained(tmp_path / "pretrained.ckpt")
    # the uninterrupted reference run, on its own copy of the hospitals (own ledgers)
    ref_run = tmp_path / "ref-run"
    _run(_cmd(pre, ref_run, _sites(tmp_path / "ref-sites")), tmp_path / "ref.log")

    sites = _sites(tmp_path / "sites")
    run = tmp_path / "run"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_cmd(pre, run, sites), stdout=log, stderr=subprocess.STDOUT,
                            cwd=Path(__file__).parents[2], start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "round-001.json").exists():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "round 1 never completed"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)      # the whole process group: driver and Ray workers
        proc.wait()
        log.close()
    done_before = sorted(int(p.stem.split("-")[1]) for p in (run / "checkpoints").glob("round-*.json"))
    assert done_before and done_before[-1] < ROUNDS, "the run finished before it could be killed"

    first_round = (run / "checkpoints" / "round-001.json").stat().st_mtime_ns
    _run(_cmd(pre, run, sites), tmp_path / "resume.log")
    # completed rounds are never run again
    assert (run / "checkpoints" / "round-001.json").stat().st_mtime_ns == first_round

    rounds = [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(1, ROUNDS + 1))
    # Not promised: that the resumed run equals the uninterrupted one. Every training attempt
    # draws fresh noise (a replay with the noise of its first attempt would give the noise away),
    # so two runs differ from round 1 on; a round-1 checkpoint is kept, not recomputed.

    # privacy spent is never forgotten: each completed round is in every ledger; a round that was
    # cut short after the sites trained it is re-run and appears as a second attempt
    ref_sites = sorted((tmp_path / "ref-sites").glob("*/hospital.yaml"))
    for site, ref_site in zip(sites, ref_sites):
        ledger = _ledger(site)
        # a resume never un-spends: the interrupted site has paid at least what the uninterrupted one did
        assert ledger["history"] and sum(h[2] for h in ledger["history"]) >= \
            sum(h[2] for h in _ledger(ref_site)["history"])
        committed = sorted({e["round"] for e in ledger["entries"] if e["status"] == "committed"})
        assert committed == list(range(1, ROUNDS + 1))
        for r in range(1, ROUNDS + 1):
            attempts = [e for e in ledger["entries"] if e["round"] == r]
            assert [e["attempt"] for e in attempts] == list(range(1, len(attempts) + 1))
        # every attempt, a re-run round's first one included, is in the site's epsilon:
        # Google's dp-accounting over all entries gives the ledger's own final figure
        charges = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in ledger["entries"]]
        assert ledger["entries"][-1]["epsilon_after"] == pytest.approx(
            dp_accounting_epsilon(charges, ledger["entries"][-1]["delta"]), rel=0.02)

    # Both runs must finish every round with sane heads (not equal ones: see above).
    final = load_file(str(run / "checkpoints" / f"round-{ROUNDS:03d}.safetensors"))
    ref = load_file(str(ref_run / "checkpoints" / f"round-{ROUNDS:03d}.safetensors"))
    assert final.keys() == ref.keys()
    assert all(np.isfinite(v).all() for v in final.values())
