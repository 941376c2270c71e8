"""Several federated runs in one Flower simulation, and sites that misbehave on purpose.

Starting Flower's simulation runtime (Ray, one actor per core, each importing torch, MONAI
and Opacus) costs more than a one-round run on the tiny preset. So a test module starts it
once: the ServerApp calls the coordinator's own `run_federation` once per run, each on a
view of the grid that holds only that run's sites (the sites a node serves are learnt from
their replies to the backbone query, as the coordinator learns them). Every site belongs to
one run only, so each run's sites start with a fresh privacy budget.

`SiteBehaviour` wraps the real ClientApp handlers: a site can fail its first train messages
(an exception, as a broken disk would raise), keep a train message until the coordinator has
given up on it, and record the round config each train message brought. Its state lives in
files, because the Ray actors that run the sites are other processes.
"""
from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from client.app import handle_evaluate, handle_query, handle_train
from pasta_model.checkpoint import load_checkpoint
from server.app import run_federation
from server.backbone_delivery import ensure_backbone
from server.rounds import SiteBook
from server.settings import RunSettings
from simulation.federation import SitesByPartition, backend_config

RELEASE = "release"          # the file that ends a held train message (see SiteBehaviour.hold)


class NodeSubset:
    """The grid as one run sees it: only its own nodes are available; messages go through the real grid."""

    def __init__(self, grid: Grid, nodes: list[int]):
        self._grid = grid
        self._nodes = sorted(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


@dataclass
class RunOutcome:
    result: Path | BaseException                 # the run directory, or what run_federation raised
    log: list[tuple[str, int, str]]              # (logger, level, message) of the server.* records of this run

    def __str__(self) -> str:
        if isinstance(self.result, BaseException):
            return "".join(traceback.format_exception(self.result))
        return str(self.result)

    def messages(self, logger: str, level: int = logging.WARNING) -> list[str]:
        return [m for name, lvl, m in self.log if name == logger and lvl == level]


class _Collect(logging.Handler):
    def __init__(self, into: list[tuple[str, int, str]]):
        super().__init__(logging.INFO)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append((record.name, record.levelno, record.getMessage()))


def run_federations(runs: dict[str, tuple[RunSettings, list[str]]], site_configs: list[Path],
                    client_app: ClientApp | None = None, learn_timeout: float = 300.0) -> dict[str, RunOutcome]:
    """Run each `label: (settings, site names)` in turn in one simulation, on those sites only."""
    outcome: dict[str, RunOutcome] = {}
    harness_error: list[BaseException] = []
    server_app = ServerApp()
    server_log = logging.getLogger("server")

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            deadline = time.monotonic() + learn_timeout
            while len(nodes := sorted(grid.get_node_ids())) < len(site_configs) and time.monotonic() < deadline:
                time.sleep(0.5)     # the simulated SuperNodes come up after the ServerApp starts
            first = next(iter(runs.values()))[0]
            model, meta = load_checkpoint(first.pretrained)
            book = SiteBook()
            ensure_backbone(grid, nodes, model, meta.backbone_sha256, send=False, timeout=learn_timeout,
                            on_reply=book.learn)
            node_of = {book.name(n): n for n in nodes}
            for label, (settings, names) in runs.items():
                missing = sorted(set(names) - set(node_of))
                if missing:
                    raise RuntimeError(f"run {label}: no node answered for site(s) {missing}; nodes: {node_of}")
                log: list[tuple[str, int, str]] = []
                collect = _Collect(log)
                server_log.addHandler(collect)
                level = server_log.level
                server_log.setLevel(logging.INFO)
                try:
                    result: Path | BaseException = run_federation(
                        NodeSubset(grid, [node_of[s] for s in names]), settings)
                except Exception as exc:   # the test decides what a run may raise
                    result = exc
                finally:
                    server_log.removeHandler(collect)
                    server_log.setLevel(level)
                outcome[label] = RunOutcome(result, log)
        except BaseException as exc:
            harness_error.append(exc)

    app = client_app or plain_client_app(site_configs)
    run_simulation(server_app=server_app, client_app=app, num_supernodes=len(site_configs),
                   backend_config=backend_config(len(site_configs)))
    if harness_error:
        raise RuntimeError("the federation harness failed") from harness_error[0]
    return outcome


def plain_client_app(site_configs: list[Path]) -> ClientApp:
    return SiteBehaviour(SitesByPartition(site_configs)).client_app()


@dataclass
class SiteBehaviour:
    """The real site handlers, with some sites misbehaving in their train handler.

    fail:   site -> how many of its train messages raise before it trains normally
    hold:   sites whose first train message is held, unanswered, until `marks/release`
            exists, and then answered with an error (the coordinator has given up on it)
    record: every train message's round config is appended to marks/<site>.configs.jsonl
    """

    resolve: SitesByPartition
    marks: Path | None = None
    fail: dict[str, int] = field(default_factory=dict)
    hold: tuple[str, ...] = ()
    record: bool = False

    def _site(self, context: Context) -> str:
        return self.resolve(context).parent.name

    def _count(self, site: str, what: str) -> int:
        """How many train messages `site` had seen before this one (and count this one)."""
        assert self.marks is not None
        path = self.marks / f"{site}.{what}"
        seen = int(path.read_text()) if path.exists() else 0
        path.write_text(str(seen + 1))
        return seen

    def train(self, msg: Message, context: Context) -> Message:
        site = self._site(context)
        if self.record:
            assert self.marks is not None
            with open(self.marks / f"{site}.configs.jsonl", "a") as fh:
                fh.write(json.dumps(dict(msg.content["config"])) + "\n")
        if site in self.fail and self._count(site, "failures") < self.fail[site]:
            raise RuntimeError(f"storage offline at {site}")
        if site in self.hold and self._count(site, "held") == 0:
            assert self.marks is not None
            deadline = time.monotonic() + 300
            while not (self.marks / RELEASE).exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            raise RuntimeError(f"{site} answered after the coordinator gave up")
        return handle_train(msg, context, self.resolve)

    def evaluate(self, msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, self.resolve)

    def query(self, msg: Message, context: Context) -> Message:
        return handle_query(msg, context, self.resolve)

    def client_app(self) -> ClientApp:
        app = ClientApp()
        app.train()(self.train)
        app.evaluate()(self.evaluate)
        app.query()(self.query)
        return app


class ReleaseOnTimeout(logging.Handler):
    """Writes marks/release when the coordinator logs that a site did not reply in time,
    so a held site lets go of its message exactly when the coordinator has stopped waiting."""

    def __init__(self, marks: Path):
        super().__init__(logging.WARNING)
        self.release_file = marks / RELEASE

    def emit(self, record: logging.LogRecord) -> None:
        if "did not reply within" in record.getMessage():
            self.release_file.touch()


def round_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def ledger_entries(site_yaml: Path) -> list[dict]:
    """The entries of the site's own privacy ledger (every run and attempt); none before it first trains."""
    path = site_yaml.parent / "state" / "privacy" / "ledger-site.json"
    return json.loads(path.read_text())["entries"] if path.exists() else []


def run_id(run: Path) -> str:
    return json.loads((run / "run.json").read_text())["run_id"]
