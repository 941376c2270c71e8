"""A round below the minimum of sites is retried `round-retries` times, then the run stops (RoundFailed).

Three runs of one round each share one Flower simulation (federation_harness), each with its
own three sites: one whose round recovers on its retry, one whose round never reaches the
minimum, and one where a site misses the round timeout.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from federation_harness import (
    RELEASE,
    ReleaseOnTimeout,
    SiteBehaviour,
    ledger_entries,
    round_records,
    run_federations,
    run_id,
)
from hospital_factory import write_hospital, write_pretrained

from server.rounds import RoundFailed
from server.run_state import RunDirectory
from server.settings import RunSettings
from simulation.federation import SitesByPartition

pytestmark = pytest.mark.slow

# round-timeout of the run with a silent site: the coordinator waits this long for it; its two other
# sites (backbone already installed) train in a few seconds, ~20 s with both cores busy elsewhere
TIMEOUT = 45.0


@pytest.fixture(scope="module")
def retried(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retries")
    pre = write_pretrained(tmp / "pretrained.ckpt")
    names = [f"{group}{i}" for group in "abc" for i in range(3)]
    sites = {n: write_hospital(tmp / "sites", n, 8, 40 + k, backbone=pre if n.startswith("c") else None)
             for k, n in enumerate(names)}
    marks = tmp / "marks"
    marks.mkdir()
    behaviour = SiteBehaviour(SitesByPartition(list(sites.values())), marks, record=True,
                              fail={"a1": 1, "a2": 1, "b1": 1000, "b2": 1000}, hold=("c2",))

    def settings(label: str, **kw) -> RunSettings:
        base = dict(num_server_rounds=1, task="report", pretrained=str(pre), run_dir=str(tmp / label),
                    local_epochs=1, min_sites=2, round_timeout=300.0)
        return RunSettings(**{**base, **kw})

    runs = {
        "recovers": (settings("recovers", round_retries=1), ["a0", "a1", "a2"]),
        "exhausted": (settings("exhausted", round_retries=2), ["b0", "b1", "b2"]),
        "timeout": (settings("timeout", round_retries=1, min_sites=3, round_timeout=TIMEOUT), ["c0", "c1", "c2"]),
    }
    release = ReleaseOnTimeout(marks)
    logging.getLogger("server.rounds").addHandler(release)
    try:
        outcome = run_federations(runs, list(sites.values()), behaviour.client_app())
    finally:
        logging.getLogger("server.rounds").removeHandler(release)
        (marks / RELEASE).touch()       # a held site never outlives the fixture
    return {"outcome": outcome, "runs": runs, "sites": sites, "marks": marks}


def _trained(r, run: Path) -> dict[str, list[tuple[int, str]]]:
    """site -> (attempt, status) of each round-1 training its own ledger holds for this run."""
    rid = run_id(run)
    return {site: [(e["attempt"], e["status"]) for e in ledger_entries(path)
                   if e["run_id"] == rid and e["round"] == 1 and e["kind"] == "train"]
            for site, path in r["sites"].items()}


def _train_messages(r, site: str) -> int:
    """How many train messages reached the site (its wrapper records each one's config)."""
    path = r["marks"] / f"{site}.configs.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _below_minimum(outcome, minimum: int) -> list[str]:
    """The round loop's warnings that an attempt had too few sites, in order."""
    return [m for m in outcome.messages("server.rounds") if m.startswith("round 1 attempt")
            and f"minimum is {minimum}" in m]


def test_a_round_below_the_minimum_is_retried_and_the_retry_is_aggregated(retried):
    outcome = retried["outcome"]["recovers"]
    run = outcome.result
    assert isinstance(run, Path), str(outcome)
    [record] = round_records(run)
    # attempt 1: only a0 replied (a1 and a2 raised), below min-sites 2; attempt 2: all three
    assert record["num_sites"] == 3 and sorted(record["sites"]) == ["a0", "a1", "a2"]
    assert sorted((f["site"], f["attempt"]) for f in record["failed"]) == [("a1", 1), ("a2", 1)]
    assert all("storage offline" in f["reason"] for f in record["failed"])
    assert [_train_messages(retried, s) for s in ("a0", "a1", "a2")] == [2, 2, 2]
    # the site that replied to the discarded attempt trained (and paid) twice; the others once
    trained = _trained(retried, run)
    assert trained["a0"] == [(1, "committed"), (2, "committed")]
    assert trained["a1"] == trained["a2"] == [(1, "committed")]
    [warning] = _below_minimum(outcome, 2)
    assert warning.startswith("round 1 attempt 1: 1 site(s) replied") and warning.endswith("retrying")
    report = (run / "report.md").read_text()
    assert "**a1**" in report and "**a2**" in report and "storage offline" in report
    assert (run / "final.ckpt").exists()


def test_a_round_still_below_the_minimum_after_its_retries_stops_the_run_with_round_failed(retried):
    settings, _ = retried["runs"]["exhausted"]
    outcome = retried["outcome"]["exhausted"]
    exc = outcome.result
    assert isinstance(exc, RoundFailed), str(outcome)
    attempts = settings.round_retries + 1
    text = str(exc)
    assert text.startswith("round 1:") and f"after {attempts} attempt(s)" in text
    # every attempt's failures are named ("site: reason", joined by "; "): b1 and b2 once per attempt
    named = re.findall(r"(?:failures: |; )([abc]\d): ", text)
    assert sorted(named) == ["b1"] * attempts + ["b2"] * attempts
    assert text.count("storage offline at b1") >= attempts
    # the coordinator asked every site once per attempt, and b0 trained (and paid) each time
    assert [_train_messages(retried, s) for s in ("b0", "b1", "b2")] == [attempts] * 3
    run = Path(settings.run_dir)
    assert _trained(retried, run)["b0"] == [(a, "committed") for a in range(1, attempts + 1)]
    # one warning per attempt; all but the last announce a retry
    warnings = _below_minimum(outcome, 2)
    assert [w.split(":")[0] for w in warnings] == [f"round 1 attempt {a}" for a in range(1, attempts + 1)]
    assert [w.endswith("retrying") for w in warnings] == [True] * settings.round_retries + [False]
    # nothing of the failed round is kept as complete, and the operator is told where to resume
    assert RunDirectory(run).completed_rounds() == []
    assert not (run / "final.ckpt").exists()
    [error] = outcome.messages("server.app", logging.ERROR)
    assert error.startswith(text) and "resumed from round 1" in error


def test_a_site_silent_past_the_round_timeout_is_named_and_the_round_retried(retried):
    outcome = retried["outcome"]["timeout"]
    run = outcome.result
    assert isinstance(run, Path), str(outcome)
    [record] = round_records(run)
    assert record["failed"] == [{"site": "c2", "reason": f"no reply within {TIMEOUT:.0f}s", "attempt": 1}]
    assert record["num_sites"] == 3 and sorted(record["sites"]) == ["c0", "c1", "c2"]
    assert [_train_messages(retried, s) for s in ("c0", "c1", "c2")] == [2, 2, 2]
    trained = _trained(retried, run)
    # c2 never trained the message it held past the timeout; it trained the retry
    assert trained["c2"] == [(1, "committed")]
    assert trained["c0"] == trained["c1"] == [(1, "committed"), (2, "committed")]
    [warning] = _below_minimum(outcome, 3)
    assert warning.startswith("round 1 attempt 1: 2 site(s) replied") and warning.endswith("retrying")
    assert any("site c2 did not reply within" in m for m in outcome.messages("server.rounds"))
