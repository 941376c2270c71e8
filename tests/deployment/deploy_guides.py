"""The command lines of docs/coordinator-guide.md and docs/hospital-guide.md (and the
release manager's, from docs/provisioning.md).

The deployment tests do not keep their own copies of the commands a coordinator or a
hospital types: they take each one from the guide (`command(...)`), substitute only
addresses, ports and file locations (`fill`), and run it. `EXERCISED` lists the
command prefixes the tests look up; test_guides.py checks that every command in the
guides starts with one of them, so a command added to a guide without a test fails.
"""
from __future__ import annotations

import shlex
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"
COORDINATOR = DOCS / "coordinator-guide.md"
HOSPITAL = DOCS / "hospital-guide.md"
PROVISIONING = DOCS / "provisioning.md"   # the release manager's `pasta-fed app keygen/sign`

# prefix -> the test that runs that guide command
EXERCISED: dict[tuple[str, ...], str] = {
    ("pasta-fed", "certs", "init"): "cluster.Cluster (every deployment test)",
    ("pasta-fed", "certs", "handout"): "cluster.Cluster (every hospital's trusted-entities.yaml)",
    ("pasta-fed", "app", "publish"): "cluster.Cluster.publish_release (every run)",
    ("pasta-fed", "app", "fingerprint"): "test_deployment.test_two_round_dp_run_over_tls",
    ("pasta-fed", "app", "verify"): "test_deployment.test_two_round_dp_run_over_tls",
    ("flower-superlink",): "cluster.Cluster.start_superlink (every deployment test)",
    ("flwr", "supernode", "register"): "cluster.Cluster.register (every deployment test)",
    ("flwr", "supernode", "list"): "cluster.Cluster.nodes",
    ("flwr", "supernode", "unregister"): "test_deployment.test_only_registered_tls_supernodes_get_in",
    ("flwr", "run"): "cluster.Cluster.run_app",
    ("pasta-fed", "app", "check-config"): "cluster.Cluster.run_app; test_guides.test_run_config_check_names_the_key",
    ("flwr", "ls"): "cluster.Cluster.run_status",
    ("pasta-fed", "app", "sites"): "test_deployment.test_two_round_dp_run_over_tls",
    ("flwr", "log"): "test_deployment.test_two_round_dp_run_over_tls",
    ("tensorboard",): "test_deployment.test_two_round_dp_run_over_tls",
    ("pasta-fed", "predict"): "test_deployment.test_two_round_dp_run_over_tls; "
                              "test_dicom_results.test_predict_store_leaves_seg_and_sr_in_a_real_orthanc",
    ("pasta-fed", "client", "fetch"): "test_pacs.test_pacs_series_read_like_the_folder_and_are_fetched_once",
    ("pasta-fed", "client", "predict"): "test_pacs.test_predict_a_pacs_series_and_store_its_seg_and_sr_back; "
                                        "test_pacs.test_whole_studies_are_predicted_and_stored_as_one_batch",
    ("make", "venv"): "test_guides.test_install_target_exists (dry run)",
    ("pasta-fed", "client", "check"): "test_deployment.test_two_round_dp_run_over_tls",
    ("flower-supernode",): "cluster.Cluster.start_supernode (every deployment test)",
    ("pasta-fed", "client", "ledger"): "test_deployment (ledger checks)",
    ("pasta-fed", "client", "audit"): "test_deployment.test_two_round_dp_run_over_tls",
    ("tail",): "test_deployment.test_two_round_dp_run_over_tls",
}


def commands(doc: Path) -> list[list[str]]:
    """Every command line in the document's ```bash blocks (comments and blank lines skipped)."""
    out, in_bash = [], False
    for line in doc.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            in_bash = stripped == "```bash"
            continue
        if in_bash and stripped and not stripped.startswith("#"):
            out.append(shlex.split(stripped))
    return out


def all_commands() -> list[list[str]]:
    return commands(COORDINATOR) + commands(HOSPITAL)


def command(*prefix: str, index: int = 0, contains: str | None = None,
            docs: tuple[Path, ...] | None = None) -> list[str]:
    """The guide command starting with `prefix` (the `index`-th one, or the one holding `contains`)."""
    pool = all_commands() if docs is None else [c for d in docs for c in commands(d)]
    found = [c for c in pool if tuple(c[:len(prefix)]) == prefix
             and (contains is None or contains in c)]
    if len(found) <= index:
        raise AssertionError(f"no command {' '.join(prefix)!r} (#{index}, containing {contains!r}) in the guides")
    return list(found[index])


def fill(cmd: list[str], subst: dict[str, str]) -> list[str]:
    """Replace example values (host names, paths, <RUN_ID>) inside each token."""
    out = []
    for token in cmd:
        for old, new in subst.items():
            token = token.replace(old, new)
        out.append(token)
    return out


def set_flag(cmd: list[str], flag: str, value: str | None) -> list[str]:
    """Set `flag`'s value (appending the flag if absent); value None removes flag and value."""
    cmd = list(cmd)
    if flag in cmd:
        i = cmd.index(flag)
        if value is None:
            del cmd[i:i + 2]
        else:
            cmd[i + 1] = value
    elif value is not None:
        cmd += [flag, value]
    return cmd
