"""The coordinator's rounds in Flower's simulation runtime: 3 sites, 2 rounds, tiny preset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from hospital_factory import write_hospital, write_pretrained
from safetensors.numpy import load_file

import server.app as server_app
from client.app import handle_evaluate, handle_query, handle_train
from server.settings import RunSettings
from simulation.federation import SitesByPartition, run_federated

pytestmark = pytest.mark.slow


@pytest.fixture()
def federation(tmp_path: Path):
    pre = write_pretrained(tmp_path / "pretrained.ckpt")
    sites = [write_hospital(tmp_path / "sites", f"h{i}", n, 10 + i) for i, n in enumerate([14, 10, 10])]
    return tmp_path, pre, sites


def _settings(tmp: Path, pre: Path, **kw) -> RunSettings:
    base = dict(num_server_rounds=2, task="report", pretrained=str(pre), run_dir=str(tmp / "run"), min_sites=2,
                local_epochs=1, round_timeout=300.0)
    base.update(kw)
    return RunSettings(**base)


class RecordingFedAvg(FedAvg):
    """FedAvg that keeps every round's train replies, to check the aggregate by hand."""
    replies: dict[int, list] = {}

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        RecordingFedAvg.replies[server_round] = [
            ({k: v.numpy() for k, v in m.content["arrays"].items()}, float(m.content["metrics"]["num-examples"]))
            for m in replies if not m.has_error()]
        return super().aggregate_train(server_round, replies)


def test_only_heads_travel_and_round_is_weighted_mean(federation, monkeypatch):
    tmp, pre, sites = federation
    monkeypatch.setattr(server_app, "build_strategy",
                        lambda s: RecordingFedAvg(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2))
    run = run_federated(_settings(tmp, pre), sites)

    # what the coordinator stored and what each site sent: heads of the task only
    heads = load_file(str(run / "checkpoints" / "round-001.safetensors"))
    assert heads and all(k.startswith("heads.report.") for k in heads)
    for site in ("h0", "h1", "h2"):
        audit_log = tmp / "sites" / site / "state" / "audit" / "audit.jsonl"
        entries = [json.loads(line) for line in audit_log.read_text().splitlines()]
        sent = [e for e in entries if e["message_type"] == "train" and e["status"] == "sent"]
        assert len(sent) == 2
        assert all(k.startswith("heads.report.") for e in sent for k in e["keys"])

    # round 1 aggregate == num-examples-weighted mean of the replies
    replies = RecordingFedAvg.replies[1]
    assert len(replies) == 3
    total = sum(n for _, n in replies)
    for key, value in heads.items():
        expected = sum(arrs[key] * n for arrs, n in replies) / total
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    assert set(metrics[0]["sites"]) == {"h0", "h1", "h2"}
    assert (run / "final.ckpt").exists() and (run / "report.md").exists()
    assert (run / "plots" / "epsilon.png").exists()


class FailingSite:
    """Site h2 raises in round 2 (its disk fails, say); the others work normally."""

    def __init__(self, resolve: SitesByPartition):
        self.resolve = resolve

    def train(self, msg: Message, context: Context) -> Message:
        if self.resolve(context).parent.name == "h2" and int(msg.content["config"]["server-round"]) == 2:
            raise RuntimeError("disk failure at h2")
        return handle_train(msg, context, self.resolve)


def _failing_app(sites) -> ClientApp:
    resolve = SitesByPartition(sites)
    failing = FailingSite(resolve)
    app = ClientApp()
    app.train()(failing.train)
    app.evaluate()(lambda msg, ctx: handle_evaluate(msg, ctx, resolve))
    app.query()(lambda msg, ctx: handle_query(msg, ctx, resolve))
    return app


def test_site_failing_in_round_two_is_named_and_round_completes(federation, monkeypatch):
    tmp, pre, sites = federation
    import simulation.federation as fed
    monkeypatch.setattr(fed, "make_client_app", lambda resolve: _failing_app(sites))
    run = run_federated(_settings(tmp, pre, strategy="fedmedian"), sites)   # FedMedian end to end too
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds[0]["num_sites"] == 3
    assert rounds[1]["num_sites"] == 2
    failed = {f["site"]: f["reason"] for f in rounds[1]["failed"]}
    assert "h2" in failed and "disk failure" in failed["h2"]
    assert "h2" in (run / "report.md").read_text()
    assert (run / "final.ckpt").exists()


def test_a_site_with_a_spent_budget_is_named_to_the_coordinator(tmp_path, caplog):
    """Its update is noise (it plans the noise that fits the little budget left), yet it
    replies and the run succeeds: the coordinator must be told, in the log and the report."""
    pre = write_pretrained(tmp_path / "pretrained.ckpt")
    sites = [write_hospital(tmp_path / "sites", "h0", 12, 10),
             write_hospital(tmp_path / "sites", "h1", 12, 11, epsilon=0.2)]
    with caplog.at_level("WARNING", logger="server.rounds"):
        run = run_federated(_settings(tmp_path, pre, num_server_rounds=1), sites)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert record["sites"]["h1"]["train"]["noise-multiplier"] >= 10
    assert record["sites"]["h0"]["train"]["noise-multiplier"] < 10
    assert record["noise_dominated"] == ["h1"]
    assert any("site h1" in r.getMessage() and "mostly noise" in r.getMessage() for r in caplog.records)
    report = (run / "report.md").read_text()
    assert "privacy budget is spent" in report and "**h1**" in report
