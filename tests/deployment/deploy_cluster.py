"""A real Flower deployment on 127.0.0.1 for tests: one TLS SuperLink with node
authentication, hospitals' SuperNodes pinned to the signed release (--trusted-entities),
and the `flwr` CLI, all as separate processes.

Every process is started in its own session (process group) so that it and the
SuperExec/app processes it spawns are stopped together (`killpg`), whatever happens
in the test. Logs go to files under the cluster root; `tail()` shows them on failure.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import deploy_guides as guide

from server.certs import Layout
from simulation.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
CONNECTION = "pasta-fed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """Stop a process started with start_new_session and everything in its group."""
    for s, wait in ((sig, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, s)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # children of a killed leader may linger in the group: make sure they are gone
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Cluster:
    """One coordinator folder (consortium/, superlink.db, FLWR_HOME) and the processes of a test."""
    root: Path
    hospitals: list[str]
    port: int = field(default_factory=free_port)
    procs: list[Proc] = field(default_factory=list)
    published: bool = False    # the signed release is in this SuperLink's database

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.pki = Layout(self.root / "consortium")
        init = guide.command("pasta-fed", "certs", "init")          # the guide's own names
        init = guide.set_flag(guide.set_flag(init, "--out", str(self.pki.root)),
                              "--hospitals", ",".join(self.hospitals))
        assert cli_main(init[1:]) == 0, init
        self._make_release_key()
        self.flwr_home = self.root / "flwr-home"
        self.flwr_home.mkdir(exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink.{CONNECTION}]\naddress = "{self.address}"\n'
            f'root-certificates = "{self.pki.ca_cert}"\n')
        self.env = dict(os.environ, FLWR_HOME=str(self.flwr_home), FLWR_DISABLE_UPDATE_CHECK="1",
                        FLWR_TELEMETRY_ENABLED="0",
                        # never reach Flower Hub (the SuperLink refreshes "Hub" apps, see provisioning.md)
                        FLWR_SUPERGRID_API_URL="http://127.0.0.1:9/v1",
                        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                        PYTHONUNBUFFERED="1")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- app pinning ----------------------------------------------------------------
    @property
    def release_dir(self) -> Path:
        return self.root / "release"

    @property
    def release_fab(self) -> Path:
        return self.release_dir / "pasta-fed-0.1.0.fab"

    def _make_release_key(self) -> None:
        """The release manager's key (provisioning guide), and each hospital's handout trusting it."""
        keygen = guide.command("pasta-fed", "app", "keygen", docs=(guide.PROVISIONING,))
        assert cli_main(guide.set_flag(keygen, "--out", str(self.release_dir))[1:]) == 0
        self.release_pub = self.release_dir / "release.pub"
        for hospital in self.hospitals:
            handout = guide.fill(guide.command("pasta-fed", "certs", "handout"),
                                 {"alpha": hospital, "superlink.example.org:8000": self.address})
            handout = guide.set_flag(guide.set_flag(handout, "--out", str(self.pki.root)),
                                     "--release-key", str(self.release_pub))
            assert cli_main(handout[1:]) == 0, handout
            assert self.pki.hospital_trusted_entities(hospital).is_file()

    def sign_release(self) -> Path:
        """The release manager signs this checkout (provisioning guide's `app sign`), once."""
        if not self.release_fab.is_file():
            sign = guide.command("pasta-fed", "app", "sign", docs=(guide.PROVISIONING,))
            for flag, value in (("--key", self.release_dir / "release.key"), ("--app", REPO),
                                ("--out", self.release_fab)):
                sign = guide.set_flag(sign, flag, str(value))
            assert cli_main(sign[1:]) == 0, sign
        return self.release_fab

    def publish_release(self) -> None:
        """The coordinator guide's `pasta-fed app publish` into this SuperLink's database."""
        publish = guide.fill(guide.command("pasta-fed", "app", "publish"),
                             {"pasta-fed-0.1.0.fab": str(self.sign_release())})
        publish = guide.set_flag(publish, "--database", str(self.root / "superlink.db"))
        assert cli_main(publish[1:]) == 0, publish
        self.published = True

    # -- processes ------------------------------------------------------------------
    def spawn(self, name: str, cmd: list[str], cwd: Path | None = None) -> Proc:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "ab") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n".encode())
            popen = subprocess.Popen(cmd, cwd=cwd or self.root, env=self.env, stdout=fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def superlink_command(self) -> list[str]:
        """The coordinator guide's command, run in this coordinator folder, bound to 127.0.0.1:<port>."""
        cmd = guide.command("flower-superlink")
        cmd = guide.set_flag(cmd, "--host", "127.0.0.1")
        return guide.set_flag(cmd, "--port", str(self.port))

    def start_superlink(self, name: str = "superlink") -> Proc:
        proc = self.spawn(name, self.superlink_command())
        self.wait_listening(proc)
        return proc

    def wait_listening(self, proc: Proc, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"{proc.name}: nothing listening on {self.port} after {timeout}s")

    def hospital_folder(self, hospital: str, config: Path | None) -> Path:
        """What the hospital holds: ca.crt and its key next to hospital.yaml (as the handout says)."""
        folder = config.parent if config is not None else self.root / "hospital-files" / hospital
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.pki.ca_cert, folder / "ca.crt")
        key = folder / f"{hospital}.key"
        shutil.copy(self.pki.hospital_key(hospital), key)
        key.chmod(0o600)
        shutil.copy(self.pki.hospital_trusted_entities(hospital), folder / "trusted-entities.yaml")
        return folder

    def supernode_command(self, hospital: str, config: Path | None, *, key: bool = True, ca: bool = True,
                          insecure: bool = False, max_retries: int | None = None) -> list[str]:
        """The hospital guide's command for `hospital`, with a local --port of its own."""
        cmd = guide.fill(guide.command("flower-supernode"),
                         {"superlink.example.org:8000": self.address, "alpha.key": f"{hospital}.key"})
        if config is not None:
            cmd = guide.set_flag(cmd, "--node-config", f'hospital-config="{config.name}"')
        else:
            cmd = guide.set_flag(cmd, "--node-config", None)
        if not key:
            cmd = guide.set_flag(cmd, "--auth-supernode-private-key", None)
        if not ca:
            cmd = guide.set_flag(cmd, "--root-certificates", None)
        if insecure:
            cmd.append("--insecure")
        cmd = guide.set_flag(cmd, "--port", str(free_port()))
        if max_retries is not None:
            cmd = guide.set_flag(cmd, "--max-retries", str(max_retries))
        return cmd

    def start_supernode(self, hospital: str, config: Path | None, name: str | None = None, **kw) -> Proc:
        folder = self.hospital_folder(hospital, config)
        return self.spawn(name or f"supernode-{hospital}", self.supernode_command(hospital, config, **kw),
                          cwd=folder)

    def stop(self, proc: Proc, sig: int = signal.SIGTERM) -> None:
        stop_group(proc.popen, sig)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            stop_group(proc.popen)

    # -- the flwr CLI -------------------------------------------------------------------
    def run(self, cmd: list[str], timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=cwd or self.root, env=self.env, capture_output=True,
                              text=True, encoding="utf-8", timeout=timeout, check=False)

    def flwr(self, *args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return self.run(["flwr", *args], timeout=timeout, cwd=cwd)

    def register(self, hospital: str) -> None:
        cmd = guide.fill(guide.command("flwr", "supernode", "register"), {"alpha": hospital})
        res = self.run(cmd)
        assert res.returncode == 0, res.stdout + res.stderr

    def nodes(self) -> list[dict]:
        res = self.run(guide.command("flwr", "supernode", "list") + ["--format", "json"])
        assert res.returncode == 0, res.stdout + res.stderr
        return json.loads(res.stdout)["nodes"]

    def unregister(self, node_id: int) -> subprocess.CompletedProcess:
        return self.run(guide.fill(guide.command("flwr", "supernode", "unregister"), {"<NODE_ID>": str(node_id)}))

    def wait_online(self, count: int, timeout: float = 90) -> list[dict]:
        deadline = time.monotonic() + timeout
        nodes: list[dict] = []
        while time.monotonic() < deadline:
            nodes = self.nodes()
            if sum(n["status"] == "online" for n in nodes) >= count:
                return nodes
            time.sleep(0.5)
        raise AssertionError(f"{count} SuperNode(s) not online after {timeout}s: {nodes}\n" + self.logs())

    def run_app(self, pretrained: Path, run_dir: Path, **overrides: object) -> int:
        """The guide's `flwr run @pasta-fed/pasta-fed pasta-fed --run-config ...` (the signed
        release, published first if it is not yet); returns the run id."""
        if not self.published:
            self.publish_release()
        paths = {"/srv/pasta-fed/models/pasta.ckpt": str(pretrained), "/srv/pasta-fed/runs/report-01": str(run_dir)}
        extra = ["--run-config", " ".join(f"{k}={_toml(v)}" for k, v in overrides.items())] if overrides else []
        check = self.run(guide.fill(guide.command("pasta-fed", "app", "check-config"), paths) + extra)
        assert check.returncode == 0 and "run config OK" in check.stdout, check.stdout + check.stderr
        # a second --run-config: later values win
        return self.start_run(guide.fill(guide.command("flwr", "run"), paths) + extra)

    def start_run(self, cmd: list[str]) -> int:
        """Any `flwr run ...` (--format json); returns the run id."""
        res = self.run(cmd + ["--format", "json"])
        assert res.returncode == 0, res.stdout + res.stderr
        return int(json.loads(res.stdout)["run-id"])

    def runs(self) -> list[dict]:
        res = self.run(guide.command("flwr", "ls") + ["--format", "json"])
        assert res.returncode == 0, res.stdout + res.stderr
        return json.loads(res.stdout)["runs"]

    def run_status(self, run_id: int) -> str:
        (run,) = [r for r in self.runs() if int(r["run-id"]) == run_id]
        return run["status"]

    def run_log(self, run_id: int) -> str:
        res = self.run(guide.fill(guide.command("flwr", "log"), {"<RUN_ID>": str(run_id)}), timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout + res.stderr

    def wait_finished(self, run_id: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            status = self.run_status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(2)
        raise AssertionError(f"run {run_id} not finished after {timeout}s (status {status!r})\n" + self.logs())

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} (rc={p.popen.poll()})\n{p.tail()}" for p in self.procs)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))   # a TOML basic string
