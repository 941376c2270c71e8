"""The coordinator and hospital guides: every command in them is one the deployment tests run."""
from __future__ import annotations

import re
import shutil
import subprocess

import deploy_guides as guide
import pytest


@pytest.mark.parametrize("doc", [guide.COORDINATOR, guide.HOSPITAL], ids=lambda p: p.name)
def test_every_guide_command_is_exercised(doc):
    cmds = guide.commands(doc)
    assert cmds, f"{doc} has no ```bash commands"
    for cmd in cmds:
        assert any(tuple(cmd[:len(p)]) == p for p in guide.EXERCISED), (
            f"{doc.name}: `{' '.join(cmd)}` is run by no deployment test; add it to "
            f"deploy_guides.EXERCISED and to a test")


def test_every_exercised_prefix_is_in_a_guide():
    everything = guide.all_commands()
    for prefix in guide.EXERCISED:
        assert any(tuple(c[:len(prefix)]) == prefix for c in everything), prefix


def test_guide_commands_are_the_deployment_essentials():
    link = guide.command("flower-superlink")
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--database", "--disable-runtime-dependency-installation"):
        assert flag in link, flag
    assert "--insecure" not in link
    node = guide.command("flower-supernode")
    assert {"--root-certificates", "--auth-supernode-private-key", "--node-config",
            "--trusted-entities"} <= set(node)                  # app pinning
    assert "--insecure" not in node
    # the coordinator runs the published release by its app id, the one pyproject.toml names
    import tomllib
    app = tomllib.loads((guide.DOCS.parent / "pyproject.toml").read_text(encoding="utf-8"))
    app_id = f"@{app['tool']['flwr']['app']['publisher']}/{app['project']['name']}"
    assert guide.command("flwr", "run")[:4] == ["flwr", "run", app_id, "pasta-fed"]
    assert all(c[2].startswith("@") for c in guide.all_commands() if c[:2] == ["flwr", "run"])
    # the release the coordinator publishes is the one the release manager signs
    sign = guide.command("pasta-fed", "app", "sign", docs=(guide.PROVISIONING,))
    publish = guide.command("pasta-fed", "app", "publish")
    assert publish[3] == sign[sign.index("--out") + 1]
    assert publish[publish.index("--database") + 1] == link[link.index("--database") + 1]
    run_config = guide.command("flwr", "run")[guide.command("flwr", "run").index("--run-config") + 1]
    from flwr.common.config import parse_config_args

    from server.settings import RunSettings
    parsed = parse_config_args([run_config])
    RunSettings.from_run_config(parsed)          # every key is a real, valid setting
    assert parsed["pretrained"].startswith("/") and parsed["run-dir"].startswith("/")


def test_hospital_guide_supernode_command_matches_handout(tmp_path):
    """The guide's SuperNode command is the one `pasta-fed certs handout` prints."""
    from server.certs import generate_release_key, init_consortium, make_handout
    init_consortium(tmp_path / "c", ["superlink.example.org", "127.0.0.1"], ["alpha"])
    release = generate_release_key(tmp_path / "release")
    handout = make_handout(tmp_path / "c", "alpha", "superlink.example.org:8000",
                           release_keys=[release.public_key])
    assert guide.command("flower-supernode") == handout.supernode_command
    assert handout.trusted_entities.name == "trusted-entities.yaml"


def test_install_target_exists():
    """`make venv` (install step of both guides) is a real Makefile target (dry run only)."""
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    res = subprocess.run(["make", "-n", "venv"], cwd=guide.DOCS.parent, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert re.search(r"^venv:", (guide.DOCS.parent / "Makefile").read_text(encoding="utf-8"), re.M)


def test_guides_link_each_other_and_provisioning():
    coordinator = guide.COORDINATOR.read_text(encoding="utf-8")
    hospital = guide.HOSPITAL.read_text(encoding="utf-8")
    assert "(provisioning.md)" in coordinator and "(hospital-guide.md)" in coordinator
    assert "(coordinator-guide.md)" in hospital and "(hospital-data.md)" in hospital
    for doc in (guide.COORDINATOR, guide.HOSPITAL):
        for target in re.findall(r"\]\(([\w.-]+\.md)\)", doc.read_text(encoding="utf-8")):
            assert (guide.DOCS / target).exists(), f"{doc.name} links to missing {target}"


@pytest.mark.parametrize("override, named", [
    ("lerning-rate=0.1", "lerning-rate: unknown key"),          # Flower says only "Invalid run configuration"
    ("learning-rate=2.0", "learning-rate: must be <= 1"),       # Flower starts the run; round 1 fails
    ("task='segment'", "task: 'segment' is not in the checkpoint's tasks"),
    ("run-dir='runs/report-01'", "run-dir: must be an absolute path"),
])
def test_run_config_check_names_the_key(tmp_path, override, named):
    """The guide's check before `flwr run`: exit 2 and the key, for what Flower would let through."""
    from pasta_model.checkpoint import save_checkpoint
    from pasta_model.network import build_model
    pretrained = tmp_path / "pasta.ckpt"
    save_checkpoint(pretrained, build_model("tiny", ["report"]))
    paths = {"/srv/pasta-fed/models/pasta.ckpt": str(pretrained),
             "/srv/pasta-fed/runs/report-01": str(tmp_path / "r")}
    cmd = guide.fill(guide.command("pasta-fed", "app", "check-config"), paths)
    ok = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "run config OK: task report, 2 round(s)" in ok.stdout, ok.stderr
    bad = subprocess.run(cmd + ["--run-config", override], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and f"pasta-fed app check-config: error: run config: {named}" in bad.stderr, bad.stderr
