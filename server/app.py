"""The coordinator's Flower ServerApp (Message API).

A thin layer: read the run settings, load the pretrained PASTA, make sure every site
holds the backbone, then run checkpointed rounds over the task heads only.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from pasta_model.app_logging import show_package_info
from pasta_model.checkpoint import load_checkpoint, save_checkpoint
from pasta_model.protocol import RoundConfig, arrays_to_heads, heads_to_array_record
from server.backbone_delivery import ensure_backbone
from server.report import write_report
from server.rounds import RoundFailed, SiteBook, run_round
from server.run_check import check_inputs
from server.run_state import RunDirectory
from server.settings import RunSettings, SettingsError
from server.strategies import build_strategy

log = logging.getLogger(__name__)

# (round, heads ArrayRecord) -> metrics of the coordinator's own validation set
GlobalEvaluator = Callable[[int, ArrayRecord], "dict[str, float] | None"]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    show_package_info("server")
    settings = RunSettings.from_run_config(dict(context.run_config))
    run_federation(grid, settings)


def _wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def _global_evaluator(settings: RunSettings, model) -> GlobalEvaluator | None:
    if not settings.eval_data:
        return None
    from server.evaluation import build_global_evaluator  # heavy imports only when used
    return build_global_evaluator(settings, model)


def run_federation(grid: Grid, settings: RunSettings, evaluator: GlobalEvaluator | None = None) -> Path:
    """Run (or resume) a federation; returns the run directory."""
    if not settings.run_dir:
        raise SettingsError("run config: run-dir: must name the run directory (an absolute path)")
    run = RunDirectory(settings.run_dir)
    resuming = run.exists()
    if resuming and not settings.resume:
        raise SettingsError(f"run directory {run.root} already holds a run; set resume=true to continue it "
                            f"or choose another run-dir")
    if not resuming:       # a bad input must not become the stored settings a resume would reuse
        check_inputs(settings)
    info = run.start(settings.to_dict())
    if resuming:   # the stored settings win: a resumed run continues the same plan
        stored = RunSettings.from_run_config(info["settings"])
        if stored != settings:
            log.info("resuming %s with its stored settings (ignoring the new ones)", run.root)
        settings = stored
    if not settings.pretrained:
        raise SettingsError("run config: pretrained: must name the pretrained PASTA checkpoint (an absolute path)")
    model, meta = load_checkpoint(settings.pretrained)
    if settings.task not in meta.tasks:
        raise SettingsError(f"run config: task: {settings.task!r} is not in the checkpoint's tasks {meta.tasks}")
    model.eval()

    book = SiteBook()
    last = run.last_complete()
    start = 1
    if last is not None:
        arrays_to_heads(model, last.heads, settings.task)
        start = last.round + 1
        book.names.update({node: seen["site"] for node, seen in run.sites_by_node().items()})
        log.info("resuming run %s after round %d of %d", info["run_id"], last.round, settings.num_server_rounds)
    arrays = heads_to_array_record(model, settings.task)
    evaluator = evaluator or _global_evaluator(settings, model)
    strategy = build_strategy(settings)
    writer = _tensorboard(run.root / "tb")
    delivered: set[int] = set()

    for rnd in range(start, settings.num_server_rounds + 1):
        nodes = _wait_for_nodes(grid, settings.min_sites, settings.round_timeout)
        fresh = [n for n in nodes if n not in delivered]
        problems = ensure_backbone(grid, fresh, model, meta.backbone_sha256, send=settings.send_backbone,
                                   timeout=settings.round_timeout, on_reply=book.learn)
        for node, why in problems.items():
            log.warning("site %s has no usable backbone: %s", book.name(node), why)
        delivered |= set(fresh) - set(problems)
        config = RoundConfig(
            server_round=rnd, task=settings.task, local_epochs=settings.local_epochs,
            learning_rate=settings.learning_rate, batch_size=settings.batch_size,
            backbone_sha256=meta.backbone_sha256, dp_delta=settings.dp_delta,
            planned_rounds=settings.num_server_rounds, run_id=info["run_id"],
            proximal_mu=settings.proximal_mu if settings.strategy == "fedprox" else 0.0, seed=settings.seed,
        ).to_config_dict()
        try:
            outcome = run_round(
                grid=grid, strategy=strategy, rnd=rnd, arrays=arrays, train_config=config,
                evaluate_config=config, min_sites=settings.min_sites, timeout=settings.round_timeout,
                retries=settings.round_retries, book=book, evaluator=evaluator,
            )
        except RoundFailed as exc:
            log.error("%s; the run stops here and can be resumed from round %d", exc, rnd)
            raise
        heads = {k: v.numpy() for k, v in outcome.arrays.items()}
        run.save_round(rnd, heads, outcome.record)
        _log_round(writer, rnd, outcome.record)
        arrays = outcome.arrays

    final_heads = {k: v.numpy() for k, v in arrays.items()}
    arrays_to_heads(model, final_heads, settings.task)
    save_checkpoint(run.root / "final.ckpt", model,
                    extra={"run_id": info["run_id"], "task": settings.task, "rounds": settings.num_server_rounds})
    report = write_report(run)
    log.info("final checkpoint: %s", run.root / "final.ckpt")
    log.info("report: %s", report)
    if writer is not None:
        writer.close()
    return run.root


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:   # tensorboard is a dependency, but a missing one must not stop a run
        return None
    return SummaryWriter(str(path))


def _log_round(writer, rnd: int, record: dict) -> None:
    if writer is None:
        return
    for phase in ("train", "evaluate"):
        for key, value in record["aggregated"].get(phase, {}).items():
            if isinstance(value, (int, float)):
                writer.add_scalar(f"aggregated/{phase}/{key}", value, rnd)
    for key, value in record.get("global", {}).items():
        writer.add_scalar(f"global/{key}", value, rnd)
    for site, entry in record["sites"].items():
        for phase in ("train", "evaluate"):
            for key, value in entry.get(phase, {}).items():
                if isinstance(value, (int, float)):
                    writer.add_scalar(f"sites/{site}/{phase}/{key}", value, rnd)
    writer.add_scalar("sites_per_round", record["num_sites"], rnd)
    writer.flush()
