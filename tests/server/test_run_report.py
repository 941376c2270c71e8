"""The coordinator's report.md says why a curve is missing, and maps node ids to hospitals."""
from __future__ import annotations

import numpy as np

from server.report import write_report
from server.run_state import RunDirectory

REFUSED = {"site": "hospital-b", "reason": "too few cases at the site for this task"}


def _run(tmp_path, rounds: list[dict]) -> RunDirectory:
    run = RunDirectory(tmp_path / "run")
    run.start({"task": "report"})
    for rnd, record in enumerate(rounds, start=1):
        run.save_round(rnd, {"heads.report.w": np.zeros(2, np.float32)}, record)
    return run


def _round(global_metrics: dict, site_a_evaluates: bool) -> dict:
    a = {"node_id": 11, "train": {"epsilon": 1.0}, **({"evaluate": {"accuracy": 0.6}} if site_a_evaluates else {})}
    b = {"node_id": 22, "train": {"epsilon": 1.0}}
    failed = [REFUSED] + ([] if site_a_evaluates else [{**REFUSED, "site": "hospital-a"}])
    return {"sites": {"hospital-a": a, "hospital-b": b}, "failed": [], "evaluate_failed": failed,
            "num_sites": 2, "global": global_metrics}


def test_when_every_site_refuses_evaluation_and_there_is_no_eval_data_the_report_says_so(tmp_path):
    run = _run(tmp_path, [_round({}, site_a_evaluates=False)] * 2)
    text = write_report(run).read_text(encoding="utf-8")
    assert "## Sites without evaluation metrics" in text
    assert "no `eval-data`, so no figure of model quality was measured at all" in text
    assert "- **hospital-a** sent no evaluation metrics in any round: too few cases" in text
    assert "- **hospital-b** sent no evaluation metrics in any round: too few cases" in text


def test_a_site_that_refuses_is_named_beside_the_coordinators_own_score(tmp_path):
    run = _run(tmp_path, [_round({"accuracy": 0.5}, site_a_evaluates=True)])
    text = write_report(run).read_text(encoding="utf-8")
    assert "the coordinator's own validation set (`eval-data`) still scored every round" in text
    assert "**hospital-b** sent no evaluation metrics" in text and "**hospital-a** sent no" not in text
    assert (run.root / "plots" / "metric-accuracy.png").exists()


def test_node_ids_map_to_the_hospitals_that_replied(tmp_path):
    run = _run(tmp_path, [_round({}, site_a_evaluates=True)] * 2)
    assert run.sites_by_node() == {11: {"site": "hospital-a", "rounds": [1, 2]},
                                   22: {"site": "hospital-b", "rounds": [1, 2]}}
