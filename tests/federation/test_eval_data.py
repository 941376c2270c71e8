"""`eval-data`: the coordinator scores each round's aggregate on its own synthetic validation set.

Three runs share one Flower simulation (federation_harness): one with eval-data, one without,
and one whose eval-data names no folder.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
from federation_harness import round_records, run_federations
from flwr.app import Array, ArrayRecord
from hospital_factory import write_hospital, write_pretrained
from safetensors.numpy import load_file

from pasta_model.checkpoint import load_checkpoint
from pasta_model.presets import get_preset
from pasta_model.protocol import heads_to_array_record
from server.evaluation import build_global_evaluator
from server.run_state import RunDirectory
from server.settings import RunSettings
from synth.run import generate_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coordinator-scores")
    pre = write_pretrained(tmp / "pretrained.ckpt")
    validation = tmp / "coordinator" / "validation"
    generate_dataset(validation, 6, size=48, spacing=get_preset("tiny").spacing_mm, seed=7, progress=False)
    names = ["e0", "e1", "n0", "n1"]
    sites = [write_hospital(tmp / "sites", n, 8, 80 + k) for k, n in enumerate(names)]

    def settings(label: str, **kw) -> RunSettings:
        return RunSettings(**{**dict(num_server_rounds=1, task="report", pretrained=str(pre),
                                     run_dir=str(tmp / label), min_sites=2, local_epochs=1, round_timeout=300.0),
                              **kw})

    runs = {
        "with": (settings("with", eval_data=str(validation)), ["e0", "e1"]),
        "without": (settings("without"), ["n0", "n1"]),
        # no site of its own: it must stop before it would wait for any
        "bad": (settings("bad", eval_data=str(tmp / "coordinator" / "no-such-folder"), round_timeout=5.0), []),
    }
    return {"outcome": run_federations(runs, sites), "runs": runs, "pretrained": pre}


def test_a_run_with_eval_data_records_and_reports_the_aggregate_s_score_on_it(eval_runs):
    outcome = eval_runs["outcome"]["with"]
    run = outcome.result
    assert isinstance(run, Path), str(outcome)
    [record] = round_records(run)
    figures = record["global"]
    assert figures and all(isinstance(v, float) and math.isfinite(v) for v in figures.values())
    assert 0.0 <= figures["accuracy"] <= 1.0

    # the figures are those of the heads checkpointed for round 1, not of the heads the round started from
    settings, _ = eval_runs["runs"]["with"]
    model, _ = load_checkpoint(eval_runs["pretrained"])
    start = heads_to_array_record(model, "report")
    evaluate = build_global_evaluator(settings, model)
    heads = load_file(str(run / "checkpoints" / "round-001.safetensors"))
    aggregate = ArrayRecord({k: Array(v) for k, v in heads.items()})
    assert figures == pytest.approx(evaluate(1, aggregate), rel=1e-5)
    assert figures["eval-loss"] != pytest.approx(evaluate(0, start)["eval-loss"], rel=1e-6)

    report = (run / "report.md").read_text()
    for key, value in figures.items():
        assert f"| coordinator validation set | {key} | {value:.4f} |" in report
    info = outcome.messages("server.evaluation", logging.INFO)
    assert any("global evaluation on 6 synthetic cases" in m for m in info)


def test_a_run_without_eval_data_has_no_coordinator_figures(eval_runs):
    outcome = eval_runs["outcome"]["without"]
    run = outcome.result
    assert isinstance(run, Path), str(outcome)
    [record] = round_records(run)
    assert record["num_sites"] == 2 and record["global"] == {}
    assert "coordinator validation set" not in (run / "report.md").read_text()
    assert not outcome.messages("server.evaluation", logging.INFO)


def test_eval_data_that_names_no_folder_stops_the_run_before_any_round(eval_runs):
    settings, _ = eval_runs["runs"]["bad"]
    exc = eval_runs["outcome"]["bad"].result
    assert isinstance(exc, Exception)
    assert settings.eval_data in str(exc)
    run = RunDirectory(settings.run_dir)
    assert run.completed_rounds() == [] and not (run.root / "final.ckpt").exists()
    assert not run.exists()          # no stored settings that a resume would reuse with the bad path


def test_eval_data_that_names_no_folder_fails_with_a_message_naming_the_key(eval_runs):
    settings, _ = eval_runs["runs"]["bad"]
    exc = eval_runs["outcome"]["bad"].result
    assert isinstance(exc, Exception) and "eval-data" in str(exc).replace(settings.eval_data, "<path>")
