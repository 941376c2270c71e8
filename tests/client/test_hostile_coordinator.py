"""The coordinator plays the attacks of issue 12 against the real ClientApp handlers.

Each test sends what a malicious (or merely careless) coordinator could send and checks
what leaves the site, what the ledger charges, and what the audit log records.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from flower_messages import node_context, query_message, resolve_from_node_config, round_config, round_message
from hospital_factory import write_hospital, write_pretrained
from privacy_checks import dp_accounting_epsilon

from client.app import handle_evaluate, handle_query, handle_train
from client.features import validation_patients
from client.pacs.retrieve import retrieve
from client.privacy.ledger import PrivacyLedger
from client.site_config import load_site_config
from client.task import REFUSED_BACKBONE, SiteAgent
from pasta_model.checkpoint import backbone_sha256, load_checkpoint
from pasta_model.network import backbone_keys
from pasta_model.protocol import RoundConfig, heads_to_arrays

DELTA = 1e-5


def _edit_yaml(path: Path, **privacy) -> Path:
    cfg = yaml.safe_load(path.read_text())
    cfg["privacy"].update(privacy)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(yaml_path, heads, config):
    return handle_train(round_message("train", heads, config), node_context(yaml_path), resolve_from_node_config)


def _evaluate(yaml_path, heads, config):
    return handle_evaluate(round_message("evaluate", heads, config), node_context(yaml_path),
                           resolve_from_node_config)


def _audit(yaml_path) -> list[dict]:
    path = yaml_path.parent / "state" / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _flat(reply) -> np.ndarray:
    arrays = reply.content["arrays"]
    return np.concatenate([arrays[k].numpy().ravel() for k in sorted(arrays.keys())])


def _epsilon_from_audit_alone(yaml_path, delta=DELTA) -> float:
    """Google's dp-accounting over every charge in the audit log (Opacus' orders)."""
    charges = [(r["metrics"]["noise-multiplier"], r["metrics"]["sample-rate"], r["metrics"]["steps"])
               for r in _audit(yaml_path) if r["status"] == "charged"]
    return dp_accounting_epsilon(charges, delta)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    path = write_pretrained(root / "pretrained.ckpt")
    model, meta = load_checkpoint(path)
    return root, path, model, meta


def test_three_attempts_of_one_round_draw_independent_noise(pretrained, tmp_path):
    """Re-sent round: the old code reused one noise vector under a re-planned sigma, so the
    third reply lay on the line through the first two and their difference gave the noise."""
    root, pre, model, meta = pretrained
    yaml_path = write_hospital(tmp_path, "replayed", 16, seed=3, epsilon=8.0, backbone=pre)
    heads = heads_to_arrays(model, "report")
    config = round_config(meta.backbone_sha256, 1, rounds=3)
    replies = [_train(yaml_path, heads, config) for _ in range(3)]
    assert not any(r.has_error() for r in replies)
    sigmas = [r.content["metrics"]["noise-multiplier"] for r in replies]
    assert sigmas[0] < sigmas[1] < sigmas[2]          # each attempt is charged, so re-planned
    w1, w2, w3 = (_flat(r) for r in replies)
    cos = float(np.dot(w2 - w1, w3 - w1) / (np.linalg.norm(w2 - w1) * np.linalg.norm(w3 - w1)))
    assert cos < 0.9, f"third attempt on the line of the first two (cos {cos:.4f}): noise reused"
    attempts = [e.attempt for e in PrivacyLedger.open_site(tmp_path / "replayed" / "state").entries]
    assert attempts == [1, 2, 3]

    # the same measurement has power: a fixed noise seed (the old behaviour) is caught
    agent = SiteAgent(load_site_config(yaml_path), noise_seed=1234)
    rc = RoundConfig.from_config_record({**config, "run-id": "run-fixed"})
    fixed = [np.concatenate([v.ravel() for _, v in sorted(agent.train(rc, heads).arrays.items())])
             for _ in range(3)]
    d2, d3 = fixed[1] - fixed[0], fixed[2] - fixed[0]
    assert float(np.dot(d2, d3) / (np.linalg.norm(d2) * np.linalg.norm(d3))) > 0.999


def _sites_differing_in_one_t_stage(tmp_path, pre) -> tuple[Path, Path]:
    a = write_hospital(tmp_path / "a", "twin", 16, seed=9, epsilon=0.1 * 100, backbone=pre)
    b = write_hospital(tmp_path / "b", "twin", 16, seed=9, epsilon=0.1 * 100, backbone=pre)
    labels = b.parent / "data" / "labels.csv"
    rows = list(csv.DictReader(labels.open()))
    staged = next(r for r in rows if r["t_stage"])
    staged["t_stage"] = "T1" if staged["t_stage"] == "T2" else "T2"
    with labels.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return a, b


def test_train_reply_carries_no_unnoised_loss(pretrained, tmp_path):
    """A constant-logit head and a full batch made `train-loss` an exact label count: two sites
    differing in one patient's T stage were told apart with certainty."""
    root, pre, model, meta = pretrained
    a, b = _sites_differing_in_one_t_stage(tmp_path, pre)
    heads = {k: np.zeros_like(v) for k, v in heads_to_arrays(model, "stage").items()}   # constant logits
    config = round_config(meta.backbone_sha256, 1, rounds=1, task="stage", batch_size=64)
    ra, rb = _train(a, heads, config), _train(b, heads, config)
    assert not ra.has_error() and not rb.has_error()
    ma, mb = dict(ra.content["metrics"]), dict(rb.content["metrics"])
    assert set(ma) == {"num-examples", "epsilon", "delta", "noise-multiplier", "steps", "sample-rate"}
    assert ma == mb                 # nothing in the metrics depends on the changed label
    logged = [r for r in _audit(a) if r["message_type"] == "train" and r["status"] == "sent"]
    assert "train-loss" not in logged[-1]["metrics"]


def _site_with_one_invasion_label(tmp_path, pre) -> Path:
    yaml_path = write_hospital(tmp_path, "evalsite", 40, seed=21, epsilon=20.0, backbone=pre)
    labels = yaml_path.parent / "data" / "labels.csv"
    rows = list(csv.DictReader(labels.open()))
    val = validation_patients([r["patient_id"] for r in rows])
    kept = False
    for r in rows:
        if r["patient_id"] in val:
            if kept:
                r["invasion"] = ""
            kept = True
    with labels.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return yaml_path


def test_evaluation_is_noised_charged_and_counts_each_metric_on_its_own_patients(pretrained, tmp_path):
    """`accuracy-invasion` over the one validation patient with that label used to pass
    min_cases because the check counted num-examples; every evaluation was a free query."""
    root, pre, model, meta = pretrained
    yaml_path = _site_with_one_invasion_label(tmp_path, pre)
    heads = heads_to_arrays(model, "report")
    config = round_config(meta.backbone_sha256, 1, rounds=2)
    replies = [_evaluate(yaml_path, heads, config) for _ in range(2)]
    assert not any(r.has_error() for r in replies), [r.error.reason for r in replies if r.has_error()]
    metrics = [dict(r.content["metrics"]) for r in replies]
    assert "accuracy-invasion" not in metrics[0] and "accuracy-density" in metrics[0]
    sent = [r for r in _audit(yaml_path) if r["message_type"] == "evaluate" and r["status"] == "sent"]
    assert "accuracy-invasion withheld: computed over 1 patient(s)" in sent[-1]["reason"]
    # the same heads on the same patients: exact metrics would repeat; noisy ones do not
    assert metrics[0]["num-examples"] != metrics[1]["num-examples"]
    # each accuracy is clipped to [0, 1], so one may repeat (both 0.0 happened in a local run); all of them
    # repeating is the exact answer (a noisy one coincides about 1 time in 400)
    accuracies = [tuple(v for k, v in sorted(m.items()) if k.startswith("accuracy")) for m in metrics]
    assert len(accuracies[0]) >= 5 and accuracies[0] != accuracies[1]
    ledger = PrivacyLedger.open_site(yaml_path.parent / "state")
    evaluations = [e for e in ledger.entries if e.kind == "evaluate"]
    assert [(e.sample_rate, e.steps, e.attempt) for e in evaluations] == [(1.0, 1, 1), (1.0, 1, 2)]
    assert metrics[1]["epsilon"] == pytest.approx(ledger.epsilon(DELTA)) and ledger.epsilon(DELTA) > 0


def _tweaked_backbone(model) -> tuple[str, dict]:
    """The same backbone with one weight moved by 1e-6: a "new" model over the same patients."""
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if k in set(backbone_keys(model))}
    first = sorted(state)[0]
    state[first].flat[0] += 1e-6
    import copy

    import torch
    other = copy.deepcopy(model)
    other.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
    return backbone_sha256(other), state


def test_a_second_backbone_opens_no_second_budget(pretrained, tmp_path):
    """A backbone with one weight changed by 1e-6, installed through `query`, used to get a
    fresh ledger: a second full budget over the same patients (1.38 against a limit of 1.0)."""
    root, pre, model, meta = pretrained
    yaml_path = _edit_yaml(write_hospital(tmp_path, "onebudget", 16, seed=4, epsilon=1.0, backbone=pre),
                           evaluation_share=0)
    sha_b, state_b = _tweaked_backbone(model)
    install = handle_query(query_message({"action": "install-backbone", "backbone-sha256": sha_b, "preset": "tiny"},
                                         backbone=state_b), node_context(yaml_path), resolve_from_node_config)
    assert not install.has_error(), install.error.reason if install.has_error() else ""
    heads = heads_to_arrays(model, "report")
    first = _train(yaml_path, heads, round_config(meta.backbone_sha256, 1, rounds=1, run_id="run-a"))
    second = _train(yaml_path, heads, round_config(sha_b, 1, rounds=1, run_id="run-b"))
    assert not first.has_error() and not second.has_error()
    m1, m2 = first.content["metrics"], second.content["metrics"]
    # a second budget would have planned the same noise as the first; the 1 % left of the
    # one budget buys only a noise-dominated round, and the epsilon reported grows past the first's
    assert m2["noise-multiplier"] > 5 * m1["noise-multiplier"]
    assert m1["epsilon"] < m2["epsilon"] <= 1.0
    assert _epsilon_from_audit_alone(yaml_path) <= 1.0
    assert PrivacyLedger.open_site(yaml_path.parent / "state").epsilon(DELTA) <= 1.0


def test_a_site_that_accepts_no_backbone_from_the_coordinator_refuses_the_install(pretrained, tmp_path):
    root, pre, model, meta = pretrained
    yaml_path = write_hospital(tmp_path, "pinned", 16, seed=4, epsilon=1.0, backbone=pre)
    cfg = yaml.safe_load(yaml_path.read_text())
    cfg["backbones"] = {"accept_from_coordinator": "listed", "allowed_sha256": [meta.backbone_sha256]}
    yaml_path.write_text(yaml.safe_dump(cfg))
    sha_b, state_b = _tweaked_backbone(model)
    reply = handle_query(query_message({"action": "install-backbone", "backbone-sha256": sha_b, "preset": "tiny"},
                                       backbone=state_b), node_context(yaml_path), resolve_from_node_config)
    assert reply.has_error() and reply.error.code == REFUSED_BACKBONE
    assert not (yaml_path.parent / "state" / "backbones" / f"{sha_b}.safetensors").exists()
    last = _audit(yaml_path)[-1]
    assert (last["status"], last["code"], last["message_type"]) == ("error", REFUSED_BACKBONE, "query:install-backbone")


def test_ledger_epsilon_of_a_mixed_run_is_what_the_audit_log_alone_gives(pretrained, tmp_path):
    """Training and evaluation, two tasks, two backbones: one epsilon, recomputable from the audit log."""
    root, pre, model, meta = pretrained
    yaml_path = write_hospital(tmp_path, "mixed", 40, seed=8, epsilon=30.0, backbone=pre)
    cfg = yaml.safe_load(yaml_path.read_text())
    cfg["min_cases_for_metrics"] = 3          # half the patients are staged: 4 validation patients
    yaml_path.write_text(yaml.safe_dump(cfg))
    sha_b, state_b = _tweaked_backbone(model)
    handle_query(query_message({"action": "install-backbone", "backbone-sha256": sha_b, "preset": "tiny"},
                               backbone=state_b), node_context(yaml_path), resolve_from_node_config)
    for sha, task, run in ((meta.backbone_sha256, "report", "r1"), (sha_b, "stage", "r2")):
        heads = heads_to_arrays(model, task)
        for rnd in (1, 2):          # half of each run's plan: the first run leaves budget for the second
            config = round_config(sha, rnd, rounds=4, task=task, run_id=run)
            assert not _train(yaml_path, heads, config).has_error()
            assert not _evaluate(yaml_path, heads, config).has_error()
    ledger = PrivacyLedger.open_site(yaml_path.parent / "state")
    assert {(e.kind, e.task, e.backbone) for e in ledger.entries} == {
        (kind, task, sha) for kind in ("train", "evaluate")
        for task, sha in (("report", meta.backbone_sha256), ("stage", sha_b))}
    ours = ledger.epsilon(DELTA)
    # dp-accounting drops some fractional orders that Opacus keeps: at most 1 % looser, never tighter
    theirs = _epsilon_from_audit_alone(yaml_path)
    assert ours <= theirs * (1 + 1e-9) and theirs == pytest.approx(ours, rel=1e-2)
    assert ours <= 30.0


def test_no_coordinator_message_makes_the_agent_reach_the_pacs(pretrained, tmp_path):
    """A site naming a PACS: train, evaluate and query messages (a coordinator's every way in) read
    only what `client fetch` put in the cache; none opens a connection to the PACS, so the
    coordinator cannot make the hospital's PACS serve it, nor learn its address or answers."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    asked: list[str] = []

    class CountingPacs(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), CountingPacs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        root, pre, model, meta = pretrained
        yaml_path = write_hospital(tmp_path, "withpacs", 40, seed=21, epsilon=20.0, backbone=pre)
        cfg = yaml.safe_load(yaml_path.read_text())
        cfg["pacs"] = {"dicomweb": f"http://127.0.0.1:{server.server_port}/dicom-web"}
        yaml_path.write_text(yaml.safe_dump(cfg))
        heads = heads_to_arrays(model, "report")
        config = round_config(meta.backbone_sha256, 1, rounds=2)
        replies = [_train(yaml_path, heads, config), _evaluate(yaml_path, heads, config),
                   handle_query(query_message({"action": "has-backbone", "backbone-sha256": meta.backbone_sha256,
                                               "preset": "tiny"}), node_context(yaml_path),
                                resolve_from_node_config)]
        assert [r.has_error() for r in replies] == [False, False, False], \
            [r.error.reason for r in replies if r.has_error()]
        assert asked == []
        assert not (yaml_path.parent / "state" / "pacs-cache").exists()
        retrieve(load_site_config(yaml_path))          # the same PACS does answer the hospital's own fetch
        assert asked and asked[0].startswith("/dicom-web/studies")
    finally:
        server.shutdown()
        server.server_close()
