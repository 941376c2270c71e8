"""`pasta-fed simulate`: pretrained model -> simulated hospitals -> federation -> comparisons -> report."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from pasta_model.finetune import PRIMARY_METRIC
from server.run_state import atomic_write_json
from server.settings import RunSettings
from simulation.config import PRETRAIN, SHIPPED, SimulationConfig, SimulationConfigError
from simulation.hospitals import SiteFiles, build_site, make_profiles, profile_table
from synth.atomic import atomic_path

log = logging.getLogger(__name__)

CACHE_ENV = "PASTA_FED_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, "runs/.cache"))


def shipped_pretrained(cfg: SimulationConfig) -> Path:
    """The model shipped with the package, if it is of the simulation's preset."""
    from pasta_model.checkpoint import CheckpointError, read_meta
    from pasta_model.shipped import shipped_checkpoint
    try:
        path = shipped_checkpoint()
        preset = read_meta(path).preset
    except (FileNotFoundError, CheckpointError) as exc:
        raise SimulationConfigError(f"pretrained: {SHIPPED}: {exc}") from None
    if preset != cfg.preset:
        raise SimulationConfigError(f"pretrained: the shipped model {path.name} is preset {preset!r}, the "
                                    f"simulation's preset is {cfg.preset!r}; set pretrained: null to pretrain "
                                    "one here, or name a checkpoint of that preset")
    log.info("using the shipped pretrained model %s", path)
    return path


def demo_pretraining(cfg: SimulationConfig, out: Path, heldout_cases: int = 8) -> dict:
    """The coordinator's pretraining step, short (`pretrain_minutes` on `pretrain_cases`), so a demo shows
    it, then its figures on held-out cases of another seed (RUN/demo-pretraining.json). The federation
    itself starts from the shipped model, pretrained once for much longer (its card says how)."""
    from pasta_model.evaluate import evaluate
    from synth.dataset import generate_dataset
    ckpt = ensure_pretrained(dataclasses.replace(cfg, pretrained=PRETRAIN))
    heldout = out / "demo-pretraining" / "heldout"
    generate_dataset(heldout, heldout_cases, size=cfg.volume_size, spacing=cfg.spacing_mm, seed=cfg.seed + 999)
    result = evaluate(ckpt, heldout)
    figures = {"checkpoint": str(ckpt), "heldout_cases": heldout_cases, "lesion_dice": result.get("dice"),
               "detect_auc": result.get("detect_auc"),
               "attributes_beating_majority": result.get("attributes_beating_majority")}
    atomic_write_json(out / "demo-pretraining.json", figures)
    log.info("the short pretraining gave, on %d held-out cases: lesion Dice %.3f, detection AUC %.3f, report "
             "attributes above their majority class: %s. The federation starts from the shipped model instead.",
             heldout_cases, figures["lesion_dice"], figures["detect_auc"],
             ", ".join(figures["attributes_beating_majority"]) or "none")
    return figures


def ensure_pretrained(cfg: SimulationConfig) -> Path:
    """The shipped model (pretrained: shipped, the default), the configured checkpoint, or (null or
    "pretrain") one pretrained here on synthetic data (made once, then reused)."""
    if cfg.pretrained == SHIPPED:
        return shipped_pretrained(cfg)
    if cfg.pretrained and cfg.pretrained != PRETRAIN:
        path = Path(cfg.pretrained)
        if not path.exists():
            raise SimulationConfigError(f"pretrained: {path} does not exist")
        return path
    from pasta_model.pretrain import RECIPE_VERSION, PretrainConfig, pretrain
    from synth.dataset import generate_dataset
    from synth.generate import GENERATOR_VERSION
    # the generator's version too: a half-made cache of an older generator is refused by it
    key = (f"{cfg.preset}-n{cfg.pretrain_cases}-v{cfg.volume_size}-m{cfg.pretrain_minutes:g}-s{cfg.seed}"
           f"-r{RECIPE_VERSION}-g{GENERATOR_VERSION.rsplit('/', 1)[-1]}")
    home = cache_root() / f"pretrained-{key}"
    final = home / "pretrained.ckpt"
    if final.exists():
        log.info("reusing the pretrained checkpoint %s", final)
        return final
    log.info("pretraining %s on %d synthetic cases (at most %.1f min) into %s",
             cfg.preset, cfg.pretrain_cases, cfg.pretrain_minutes, home)
    generate_dataset(home / "data", cfg.pretrain_cases, size=cfg.volume_size, spacing=cfg.spacing_mm,
                     seed=cfg.seed + 104729,
                     workers=max(1, min(2, os.cpu_count() or 1)))
    ckpt = pretrain(PretrainConfig(data=home / "data", out=home / "run", preset=cfg.preset,
                                   max_minutes=cfg.pretrain_minutes, seed=cfg.seed, epochs=1000))
    with atomic_path(final) as tmp:
        shutil.copyfile(ckpt, tmp)
    return final


def simulate(cfg: SimulationConfig, out: Path, resume: bool = False) -> Path:
    """Run (or resume) a simulated federation; returns the report path."""
    out = Path(out).resolve()     # site YAMLs resolve their paths against their own folder
    stored = out / "simulation.json"
    if resume:
        if not stored.exists():
            raise SimulationConfigError(f"--resume {out}: no simulation.json there (not a simulation run)")
        cfg = SimulationConfig.from_mapping(json.loads(stored.read_text(encoding="utf-8"))["config"], str(stored))
        log.info("resuming the simulation in %s with its stored settings", out)
    elif stored.exists():
        raise SimulationConfigError(f"{out} already holds a simulation; use --resume {out} or another --out")
    if cfg.pacs:   # before anything is generated: a missing Orthanc should cost the user nothing
        from simulation.pacs_site import require_orthanc
        require_orthanc()
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    pretrained = ensure_pretrained(cfg)
    timings["pretrained checkpoint (made or reused)"] = time.monotonic() - t0
    from pasta_model.checkpoint import read_meta
    backbone = read_meta(pretrained).backbone_sha256
    if resume:   # the shipped model (or a named file) may have been replaced since the run began
        began = json.loads(stored.read_text(encoding="utf-8")).get("pretrained_backbone_sha256", backbone)
        if began != backbone:
            raise SimulationConfigError(f"--resume {out}: the pretrained checkpoint {pretrained} now has backbone "
                                        f"{backbone[:12]}..., the run began on {began[:12]}...; start a new run")
    atomic_write_json(stored, {"config": cfg.to_dict(), "pretrained": str(pretrained),
                               "pretrained_backbone_sha256": backbone})

    t0 = time.monotonic()
    profiles = make_profiles(cfg.hospitals, cfg.seed, cfg.cases_min, cfg.cases_max, cfg.heldout_cases)
    sites = [build_site(out, p, cfg.volume_size, cfg.epsilon, cfg.delta, cfg.max_grad_norm, backbone=None,
                        spacing=cfg.spacing_mm)
             for p in profiles]
    from synth.dataset import generate_dataset
    eval_dir = out / "coordinator" / "validation"      # the coordinator's own synthetic validation set
    generate_dataset(eval_dir, cfg.heldout_cases, size=cfg.volume_size, spacing=cfg.spacing_mm,
                     seed=cfg.seed + 31337)
    timings["generating hospital data"] = time.monotonic() - t0
    with contextlib.ExitStack() as stack:
        if cfg.pacs:
            t0 = time.monotonic()
            stack.enter_context(pacs_hospital(sites[0], out / "pacs"))
            timings["PACS: DICOM export, upload, retrieval"] = time.monotonic() - t0
        return federate_and_report(cfg, out, sites, pretrained, eval_dir, timings)


@contextlib.contextmanager
def pacs_hospital(site: SiteFiles, home: Path) -> Iterator[None]:
    """The site's CT in the run's own Orthanc, retrieved into its state_dir; Orthanc runs until the block ends."""
    from simulation.orthanc import running_orthanc
    from simulation.pacs_site import make_pacs_site
    log.info("%s keeps its CT in a PACS: writing DICOM series, storing them in Orthanc, retrieving them",
             site.profile.name)
    with running_orthanc(home) as server:
        make_pacs_site(site.config, server, home)
        yield


def federate_and_report(cfg: SimulationConfig, out: Path, sites: list[SiteFiles], pretrained: Path,
                        eval_dir: Path, timings: dict[str, float]) -> Path:
    """The federation, the comparisons and the audit on the generated sites; returns the report path."""
    from simulation.federation import run_federated  # Flower/Ray imports only when needed
    settings = RunSettings(
        num_server_rounds=cfg.rounds, task=cfg.task, local_epochs=cfg.local_epochs,
        learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, strategy=cfg.strategy,
        min_sites=2, dp_delta=cfg.delta, pretrained=str(Path(pretrained).resolve()),
        run_dir=str(Path(out).resolve()), resume=True, seed=cfg.seed, round_timeout=1800.0,
        eval_data=str(Path(eval_dir).resolve()))
    t0 = time.monotonic()
    run_federated(settings, [s.config for s in sites])
    timings["federation (all rounds)"] = time.monotonic() - t0

    from simulation.comparisons import run_comparisons
    from simulation.report import write_simulation_report
    t0 = time.monotonic()
    table = run_comparisons(cfg, sites, pretrained, out / "final.ckpt")
    timings["comparisons"] = time.monotonic() - t0
    audit = None
    if cfg.audit:
        log.info("empirical privacy audit of %s (%d canaries)", sites[0].profile.name, cfg.audit_canaries)
        t0 = time.monotonic()
        audit = audit_one_site(cfg, sites[0], pretrained, out)
        timings["privacy audit (one site)"] = time.monotonic() - t0
    return write_simulation_report(out, config=cfg.to_dict(), sites=profile_table(sites), table=table,
                                   metric=PRIMARY_METRIC[cfg.task], timings=timings, audit=audit)


def audit_one_site(cfg: SimulationConfig, site: SiteFiles, pretrained: Path, out: Path) -> dict:
    """The empirical privacy audit of one simulated site: its own training path on a temporary
    ledger (its real one untouched); {'skipped': why} when the task or site cannot be audited."""
    from client.privacy.empirical_audit import AUDIT_TASKS, AuditError, plot_scores, run_audit, write_json
    from client.site_config import load_site_config
    from pasta_model.checkpoint import read_meta
    if cfg.task not in AUDIT_TASKS:
        return {"site": site.profile.name,
                "skipped": f"task {cfg.task} cannot be audited (auditable: {', '.join(AUDIT_TASKS)})"}
    try:
        result = run_audit(load_site_config(site.config), task=cfg.task, canaries=cfg.audit_canaries,
                           backbone=read_meta(pretrained).backbone_sha256, seed=cfg.seed)
    except AuditError as exc:
        log.error("privacy audit of %s not run: %s", site.profile.name, exc)
        return {"site": site.profile.name, "skipped": str(exc)}
    write_json(result, out / "privacy-audit.json")
    plot_scores(result, out / "plots" / "privacy-audit.png")
    return result.summary()
