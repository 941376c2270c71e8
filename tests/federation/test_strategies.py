"""Every strategy besides FedAvg through the coordinator's real round: one round, three sites each.

The four runs share one Flower simulation (federation_harness), each on its own three sites
(fresh budgets). The strategy's aggregate_train is wrapped to keep the replies it received, so
that each aggregate can be checked against the property that defines the strategy.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from federation_harness import SiteBehaviour, round_records, run_federations
from hospital_factory import write_hospital, write_pretrained
from safetensors.numpy import load_file

import server.app as server_app
from pasta_model.checkpoint import load_checkpoint
from pasta_model.protocol import heads_to_arrays
from server.settings import RunSettings
from server.strategies import build_strategy
from simulation.federation import SitesByPartition

pytestmark = pytest.mark.slow

STRATEGIES = ("fedadam", "fedprox", "fedtrimmedavg", "krum")
PROXIMAL_MU = 0.3          # set for every run: only FedProx may send it
TRIMMED_BETA = 0.34        # of three replies, trims one at each end: the trimmed mean is the median


def _sites_of(strategy: str) -> list[str]:
    return [f"{strategy}{i}" for i in range(3)]


@pytest.fixture(scope="module")
def strategy_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("strategies")
    pre = write_pretrained(tmp / "pretrained.ckpt")
    names = [s for strategy in STRATEGIES for s in _sites_of(strategy)]
    sites = [write_hospital(tmp / "sites", n, 8, 60 + k) for k, n in enumerate(names)]
    marks = tmp / "marks"
    marks.mkdir()
    runs = {strategy: (RunSettings(num_server_rounds=1, task="report", pretrained=str(pre),
                                   run_dir=str(tmp / strategy), strategy=strategy, min_sites=3, local_epochs=1,
                                   round_retries=0, round_timeout=300.0, proximal_mu=PROXIMAL_MU,
                                   trimmed_beta=TRIMMED_BETA, krum_malicious=0),
                       _sites_of(strategy))
            for strategy in STRATEGIES}

    replies: dict[str, list[tuple[dict[str, np.ndarray], float]]] = {}

    def recording_strategy(settings: RunSettings):
        strategy = build_strategy(settings)
        aggregate = strategy.aggregate_train

        def aggregate_train(server_round, messages):
            messages = list(messages)
            replies[settings.strategy] = [
                ({k: v.numpy() for k, v in m.content["arrays"].items()}, float(m.content["metrics"]["num-examples"]))
                for m in messages if not m.has_error()]
            return aggregate(server_round, messages)

        strategy.aggregate_train = aggregate_train
        return strategy

    behaviour = SiteBehaviour(SitesByPartition(sites), marks, record=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(server_app, "build_strategy", recording_strategy)
        outcome = run_federations(runs, sites, behaviour.client_app())
    model, _ = load_checkpoint(pre)
    return {"outcome": outcome, "replies": replies, "marks": marks, "start": heads_to_arrays(model, "report")}


def _weighted_mean(replies, key):
    total = sum(n for _, n in replies)
    return sum(arrays[key] * n for arrays, n in replies) / total


def _check_fedprox(heads, replies, start):
    # FedProx changes the sites' objective, not the aggregation: the num-examples-weighted mean
    for key, value in heads.items():
        np.testing.assert_allclose(value, _weighted_mean(replies, key), rtol=1e-5, atol=1e-6)


def _check_fedtrimmedavg(heads, replies, start):
    for key, value in heads.items():
        np.testing.assert_allclose(value, np.median(np.stack([a[key] for a, _ in replies]), axis=0),
                                   rtol=1e-6, atol=1e-7)


def _check_krum(heads, replies, start):
    # Krum keeps the one reply closest to its neighbours, unchanged
    chosen = [i for i, (arrays, _) in enumerate(replies)
              if all(np.allclose(heads[k], arrays[k], rtol=1e-6, atol=1e-7) for k in heads)]
    assert len(chosen) == 1, f"the aggregate equals replies {chosen}"


def _check_fedadam(heads, replies, start):
    # the server-side Adam step moves every weight the way the mean update points, by its own step
    # size (not the mean's): the heads are not the plain weighted mean
    moved_like_mean, counted = 0, 0
    for key, value in heads.items():
        delta = _weighted_mean(replies, key) - start[key]
        clear = np.abs(delta) > 1e-3
        counted += int(clear.sum())
        moved_like_mean += int((np.sign(value - start[key])[clear] == np.sign(delta)[clear]).sum())
    assert counted > 0 and moved_like_mean == counted
    assert not all(np.allclose(heads[k], _weighted_mean(replies, k), rtol=1e-3, atol=1e-4) for k in heads)


CHECKS = {"fedprox": _check_fedprox, "fedtrimmedavg": _check_fedtrimmedavg, "krum": _check_krum,
          "fedadam": _check_fedadam}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_aggregates_a_real_round_by_its_own_rule(strategy_runs, strategy):
    outcome = strategy_runs["outcome"][strategy]
    run = outcome.result
    assert isinstance(run, Path), str(outcome)
    [record] = round_records(run)
    assert record["num_sites"] == 3 and sorted(record["sites"]) == _sites_of(strategy)
    assert record["failed"] == []

    start = strategy_runs["start"]
    heads = load_file(str(run / "checkpoints" / "round-001.safetensors"))
    assert heads.keys() == start.keys()
    # the dtypes the sites accept in the next round (FedAdam's step computes in float64)
    assert {k: v.dtype for k, v in heads.items()} == {k: v.dtype for k, v in start.items()}
    assert (run / "final.ckpt").exists()
    assert any(not np.allclose(heads[k], start[k]) for k in heads), "the round left the heads as they were"
    assert all(np.isfinite(v).all() for v in heads.values())
    replies = strategy_runs["replies"][strategy]
    assert len(replies) == 3
    CHECKS[strategy](heads, replies, start)

    # only FedProx asks the sites for a proximal term; every site got the run's proximal-mu then
    for site in _sites_of(strategy):
        lines = (strategy_runs["marks"] / f"{site}.configs.jsonl").read_text().splitlines()
        sent = [json.loads(line)["proximal-mu"] for line in lines]
        assert sent == [PROXIMAL_MU if strategy == "fedprox" else 0.0]
