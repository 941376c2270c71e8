"""Real multi-site deployments on 127.0.0.1: flower-superlink (TLS, node authentication,
--database), flower-supernode per hospital, the app submitted with `flwr run .`.

Each command is the coordinator's or hospital's guide command (deploy_guides). Every
process is stopped at the end of its test, pass or fail (cluster_factory).
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import deploy_guides as guide
import pytest
from conftest import hospitals
from deploy_cluster import Cluster
from flwr.common.constant import ErrorCode
from foreign_app import write_foreign_app

from client.privacy.audit import AuditLog
from server.certs import app_signing
from server.certs.app_publish import store_signed_app

pytestmark = pytest.mark.slow

ROUND_TIMEOUT = 240.0        # generous: 3 SuperNodes train at once on a 2-core machine
RUN_TIMEOUT = 480            # seconds for a whole 2-round run


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def _ledger(cluster: Cluster, config: Path, as_json: bool = True) -> dict | str:
    cmd = guide.command("pasta-fed", "client", "ledger", contains="--json" if as_json else None,
                        index=0 if as_json else 0)
    if not as_json:
        cmd = [c for c in cmd if c != "--json"]
    res = cluster.run(guide.fill(cmd, {"hospital.yaml": str(config)}))
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout) if as_json else res.stdout


def _state_dir(config: Path) -> Path:
    return config.parent / "state"      # as written by hospital_factory


def _wait_for(predicate, timeout: float, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}\n" + cluster.logs())


def _start_federation(cluster: Cluster, configs: dict[str, Path]) -> None:
    cluster.start_superlink()
    for name in configs:
        cluster.register(name)
    for name, config in configs.items():
        cluster.start_supernode(name, config)
    cluster.wait_online(len(configs))


def test_two_round_dp_run_over_tls(cluster_factory, pretrained, tmp_path):
    names = ["alpha", "beta", "gamma"]
    cluster = cluster_factory(names)
    configs = hospitals(cluster.root, names)          # no backbone: the coordinator sends it
    # the hospital checks its data first (hospital guide, step 3)
    res = cluster.run(guide.command("pasta-fed", "client", "check"), cwd=configs["alpha"].parent)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "report" in res.stdout
    # the hospital checks the release key it was handed (hospital guide, step 2)
    res = cluster.run(guide.command("pasta-fed", "app", "fingerprint"),
                      cwd=cluster.hospital_folder("alpha", configs["alpha"]))
    assert res.returncode == 0, res.stdout + res.stderr
    release_key = app_signing.load_public_key(cluster.release_pub)
    assert res.stdout.split() == [app_signing.key_id(release_key), app_signing.fingerprint(release_key)]

    _start_federation(cluster, configs)
    _foreign_apps_are_refused(cluster, configs, tmp_path)
    # and the hospital can check the release itself
    verify = guide.fill(guide.command("pasta-fed", "app", "verify"),
                        {"pasta-fed-0.1.0.fab": str(cluster.release_fab)})
    res = cluster.run(verify, cwd=configs["alpha"].parent)
    assert res.returncode == 0 and app_signing.key_id(release_key) in res.stdout, res.stdout + res.stderr

    run_dir = tmp_path / "RUN"
    run_id = cluster.run_app(pretrained, run_dir, **{"min-sites": 3, "local-epochs": 1,
                                                     "round-timeout": ROUND_TIMEOUT})
    status = cluster.wait_finished(run_id, RUN_TIMEOUT)
    assert status == "finished:completed", status + "\n" + cluster.logs()

    assert (run_dir / "final.ckpt").is_file()
    # a hospital's operator sees its agent's work in the SuperNode's output, not a silent minute
    node_log = next(p for p in cluster.procs if p.name == "supernode-alpha").text()
    assert "frozen-backbone features of" in node_log and "round 2 trained on" in node_log, node_log[-3000:]
    # the guide's node id -> hospital mapping agrees with the SuperLink's node list
    sites = cluster.run(guide.fill(guide.command("pasta-fed", "app", "sites"),
                                   {"/srv/pasta-fed/runs/report-01": str(run_dir)}) + ["--json"])
    assert sites.returncode == 0, sites.stdout + sites.stderr
    by_node = json.loads(sites.stdout)
    assert sorted(seen["site"] for seen in by_node.values()) == names
    assert set(by_node) == {n["node-id"] for n in cluster.nodes() if n["status"] == "online"}
    assert all(seen["rounds"] == [1, 2] for seen in by_node.values())
    rounds = _rounds(run_dir)
    assert [r["round"] for r in rounds] == [1, 2]
    for rec in rounds:
        assert sorted(rec["sites"]) == names and rec["num_sites"] == 3 and rec["failed"] == []
        for site in rec["sites"].values():
            assert 0 < site["train"]["epsilon"] <= 50.0

    for name, config in configs.items():
        state = _state_dir(config)
        lines = AuditLog(state).read()
        assert AuditLog(state).verify_chain()
        sent_train = [line for line in lines if line["message_type"] == "train" and line["status"] == "sent"]
        assert [line["round"] for line in sent_train] == [1, 2], name
        for line in lines:   # only the report head's weights ever left the site
            assert all(k.startswith("heads.report.") for k in line["keys"]), (name, line["keys"])
        assert all(line["keys"] for line in sent_train)
        # the guide's `tail` shows the last lines of the same log
        tail = cluster.run(guide.fill(guide.command("tail"), {"/var/lib/pasta-fed/hospital-a": str(state)}))
        assert tail.returncode == 0
        assert [json.loads(x) for x in tail.stdout.splitlines()] == lines[-2:]
        ledger = _ledger(cluster, config)
        assert [(e["round"], e["attempt"], e["status"]) for e in ledger["history"]] == [
            (1, 1, "committed"), (2, 1, "committed")]
        assert ledger["epsilon"] == pytest.approx(rounds[-1]["sites"][name]["train"]["epsilon"])
    assert "epsilon spent" in _ledger(cluster, configs["alpha"], as_json=False)
    # the hospital checks ledger against audit log, then again against the head it noted
    audit = guide.fill(guide.command("pasta-fed", "client", "audit"), {"hospital.yaml": str(configs["alpha"])})
    res = cluster.run(audit)
    assert res.returncode == 0, res.stdout + res.stderr
    (head,) = [line.split()[2] for line in res.stdout.splitlines() if line.startswith("audit head ")]
    expect = guide.fill(guide.command("pasta-fed", "client", "audit", contains="--expect"),
                        {"hospital.yaml": str(configs["alpha"])})
    expect = expect[:expect.index("--expect") + 1] + [head]     # the guide's placeholder is several words
    res = cluster.run(expect)
    assert res.returncode == 0, res.stdout + res.stderr

    # following the run: flwr ls / flwr log, TensorBoard, then the model is used
    run_log = cluster.run_log(run_id)   # the ServerApp's own INFO lines reach `flwr log`
    assert "round 2: 3 site(s) aggregated" in run_log and "final checkpoint:" in run_log, run_log
    tb = cluster.run(guide.fill(guide.command("tensorboard"), {"/srv/pasta-fed/runs/report-01": str(run_dir)}))
    assert tb.returncode == 0, tb.stdout + tb.stderr
    assert "sites_per_round" in tb.stdout + tb.stderr
    image = sorted((configs["alpha"].parent / "data" / "images").glob("*.nii.gz"))[0]
    predict = guide.fill(guide.command("pasta-fed", "predict"),
                         {"/srv/pasta-fed/runs/report-01": str(run_dir), "ct.nii.gz": str(image),
                          "prediction": str(tmp_path / "prediction")})
    res = cluster.run(predict, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert any((tmp_path / "prediction").iterdir())


def _refused(cluster: Cluster, configs: dict[str, Path], run_id: int, loot: Path, log_line: str) -> None:
    """The foreign run got one error reply per site and nothing of any labels.csv."""
    assert cluster.wait_finished(run_id, 240).startswith("finished"), cluster.logs()
    got = json.loads(loot.read_text(encoding="utf-8"))     # what the coordinator's ServerApp received
    assert got["asked"] == len(configs) and len(got["replies"]) == len(configs), got
    for reply in got["replies"]:
        assert reply["error"] and reply["code"] == ErrorCode.INVALID_FAB, reply
        assert "content" not in reply and "could not be verified" in reply["reason"], reply
    coordinator_side = loot.read_bytes() + (cluster.root / "superlink.db").read_bytes()
    for name, config in configs.items():
        rows = (config.parent / "data" / "labels.csv").read_text(encoding="utf-8").splitlines()[1:]
        assert rows and not any(row.encode() in coordinator_side for row in rows), name
        log = next(p for p in cluster.procs if p.name == f"supernode-{name}").text()
        assert log_line in log, log          # the refusal is in the hospital's own log
        assert "Start `flwr-clientapp` process" not in log, log    # no foreign code ran


def _foreign_apps_are_refused(cluster: Cluster, configs: dict[str, Path], tmp_path: Path) -> None:
    """The attack the pinning closes: a coordinator's own ClientApp asking for labels.csv."""
    # 1. submitted with `flwr run DIR` (uploaded, so stored without signatures)
    loot = tmp_path / "loot-upload.json"
    app = write_foreign_app(tmp_path / "mallory")
    run_id = cluster.start_run(["flwr", "run", str(app), "pasta-fed", "--run-config", f"out='{loot}'"])
    _refused(cluster, configs, run_id, loot, "App verification is not supported by the connected SuperLink")
    # 2. stored under the release's own app id with the release's signatures copied over
    #    (a malicious SuperLink can write anything into its state)
    cluster.publish_release()
    record = app_signing.read_record(app_signing.signature_path(cluster.release_fab))
    hijack = app_signing.build_fab(write_foreign_app(tmp_path / "mallory2", name="pasta-fed", publisher="pasta-fed"))
    store_signed_app(cluster.root / "superlink.db", hijack, app_signing.flower_verifications(record))
    loot = tmp_path / "loot-hijack.json"
    run_id = cluster.start_run(["flwr", "run", "@pasta-fed/pasta-fed", "pasta-fed", "--run-config", f"out='{loot}'"])
    _refused(cluster, configs, run_id, loot, "FAB verification failed")
    cluster.publish_release()     # the genuine release again


def test_only_registered_tls_supernodes_get_in(cluster_factory):
    cluster = cluster_factory(["alpha", "beta", "gamma"])
    cluster.start_superlink()
    cluster.register("alpha")
    cluster.register("gamma")         # registered, so its failures below are TLS failures
    good = cluster.start_supernode("alpha", None)
    unregistered = cluster.start_supernode("beta", None, name="unregistered-key", max_retries=2)
    no_ca = cluster.start_supernode("gamma", None, name="without-ca", ca=False, max_retries=2)
    insecure_key = cluster.start_supernode("gamma", None, name="insecure-with-key", ca=False,
                                           insecure=True, max_retries=2)
    insecure = cluster.start_supernode("gamma", None, name="insecure-no-key", ca=False, key=False,
                                       insecure=True, max_retries=2)
    refused = [unregistered, no_ca, insecure_key, insecure]
    _wait_for(lambda: all(p.popen.poll() is not None for p in refused), 90, "refused SuperNodes to exit",
              cluster)
    for proc in refused:
        assert proc.popen.returncode != 0, proc.tail()
    # what docs/provisioning.md tells the operator to expect
    assert unregistered.popen.returncode == 1 and "Failed to activate SuperNode" in unregistered.text()
    assert "CERTIFICATE_VERIFY_FAILED" in no_ca.text()
    assert "Exit Code: 303" in insecure_key.text() and "requires a secure TLS connection" in insecure_key.text()
    assert "Exit Code: 305" in insecure.text()

    nodes = cluster.wait_online(1)
    assert good.popen.poll() is None, good.tail()
    online = [n for n in nodes if n["status"] == "online"]
    assert len(online) == 1 and len(nodes) == 2, nodes       # alpha online; gamma registered, never online
    # unregistering a hospital removes it from the federation
    res = cluster.unregister(online[0]["node-id"])
    assert res.returncode == 0, res.stdout + res.stderr
    _wait_for(lambda: all(n["status"] != "online" for n in cluster.nodes()), 60,
              "the unregistered node to go offline", cluster)


def test_killed_supernode_is_named_and_run_finishes(cluster_factory, pretrained, tmp_path):
    names = ["alpha", "beta", "gamma"]
    cluster = cluster_factory(names)
    configs = hospitals(cluster.root, names, backbone=pretrained)
    _start_federation(cluster, configs)
    run_dir = tmp_path / "RUN"
    run_id = cluster.run_app(pretrained, run_dir, **{"min-sites": 2, "local-epochs": 1,
                                                     "round-timeout": ROUND_TIMEOUT, "round-retries": 0})
    _wait_for(lambda: (run_dir / "checkpoints" / "round-001.json").exists(), RUN_TIMEOUT, "round 1", cluster)
    gamma = next(p for p in cluster.procs if p.name == "supernode-gamma")
    cluster.stop(gamma, signal.SIGKILL)           # the hospital's machine dies

    status = cluster.wait_finished(run_id, RUN_TIMEOUT)
    assert status == "finished:completed", status + "\n" + cluster.logs()
    assert (run_dir / "final.ckpt").is_file()
    first, second = _rounds(run_dir)
    assert first["num_sites"] == 3
    assert second["num_sites"] == 2 and sorted(second["sites"]) == ["alpha", "beta"]
    # the SuperLink answers for the dead node with an error reply from its own node id:
    # replies are mapped by reply_to_message_id, so that is gamma's failure, not a stray node's
    assert sorted(f["site"] for f in second["failed"]) == ["gamma"], second["failed"]
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "## Sites that failed or timed out" in report
    assert "round 2: **gamma**" in report


def test_coordinator_crash_resumes_from_last_round(cluster_factory, pretrained, tmp_path):
    names = ["alpha", "beta"]
    cluster = cluster_factory(names)
    configs = hospitals(cluster.root, names, backbone=pretrained)
    _start_federation(cluster, configs)
    run_dir = tmp_path / "RUN"
    settings = {"min-sites": 2, "local-epochs": 1, "round-timeout": ROUND_TIMEOUT}
    first_run = cluster.run_app(pretrained, run_dir, **settings)
    round1 = run_dir / "checkpoints" / "round-001.json"
    _wait_for(round1.exists, RUN_TIMEOUT, "round 1", cluster)
    before = round1.read_bytes()

    def round2_started() -> bool:   # some hospital has charged round 2 in its ledger
        for config in configs.values():
            for path in (_state_dir(config) / "privacy").glob("ledger-*.json"):
                if any(e["round"] == 2 for e in json.loads(path.read_text(encoding="utf-8"))["entries"]):
                    return True
        return False

    _wait_for(round2_started, RUN_TIMEOUT, "round 2 to start at a hospital", cluster)
    superlink = next(p for p in cluster.procs if p.name == "superlink")
    cluster.stop(superlink, signal.SIGKILL)      # SuperLink, its SuperExec and the ServerApp, at once
    assert not (run_dir / "checkpoints" / "round-002.json").exists()

    cluster.start_superlink(name="superlink-restarted")   # same command, same --database
    cluster.wait_online(2)                                 # the SuperNodes came back by themselves
    second_run = cluster.run_app(pretrained, run_dir, **settings)
    status = cluster.wait_finished(second_run, RUN_TIMEOUT)
    assert status == "finished:completed", status + "\n" + cluster.logs()
    assert cluster.run_status(first_run).startswith("finished:"), cluster.run_status(first_run)

    assert [r["round"] for r in _rounds(run_dir)] == [1, 2]
    assert round1.read_bytes() == before                  # round 1 was not run again
    assert (run_dir / "final.ckpt").is_file()
    run_id = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["run_id"]
    replays = 0
    for name, config in configs.items():
        ledger = _ledger(cluster, config)
        entries = [e for e in ledger["history"] if e["run_id"] == run_id]
        by_round: dict[int, list[dict]] = {}
        for e in entries:
            by_round.setdefault(e["round"], []).append(e)
        assert sorted(by_round) == [1, 2], (name, entries)
        assert [(e["attempt"], e["status"]) for e in by_round[1]] == [(1, "committed")], name
        attempts = [e["attempt"] for e in by_round[2]]
        # a round charged more than once is numbered as honest further attempts, never a silent repeat
        assert attempts == list(range(1, len(attempts) + 1)), (name, attempts)
        assert by_round[2][-1]["status"] == "committed", name
        replays += len(attempts) - 1
        # every attempt's cost is in the budget: epsilon grows with each entry
        eps = [e["epsilon_after"] for e in entries]
        assert eps == sorted(eps) and ledger["epsilon"] == pytest.approx(eps[-1])
    assert replays >= 1, "the crash happened after a hospital charged round 2, so round 2 was replayed"
