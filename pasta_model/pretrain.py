"""Multi-task pretraining of PASTA (backbone + all heads) on a PASTA-Gen-layout dataset.

`pretrain(PretrainConfig) -> Path` is the plain function (the simulation calls it);
`pasta-fed pretrain` is a thin shell over it. A run folder holds metrics.csv, tb/
(TensorBoard), checkpoints/epoch-NNN.safetensors, last.safetensors, last_state.pt
(optimizer state, plain tensors, loaded with weights_only=True) and cache/.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import time
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import AfterValidator, Field, model_validator
from pydantic.dataclasses import dataclass
from torch.utils.data import DataLoader

from synth.atomic import atomic_path, write_atomic
from synth.typed_config import FILE, one_of, parse

from .checkpoint import load_checkpoint, save_checkpoint
from .data import CropDataset, build_datasets, prepare_cases, region_plan, split_cases
from .device import PRECISIONS, autocast, channels_last, resolve_precision, select_device
from .heads import TASKS, split_report_logits
from .losses import classification_loss, cox_loss, detection_loss, report_loss, segmentation_loss
from .network import PastaNet, build_model
from .presets import Preset, get_preset, preset_names

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from synth.dataset import CaseRecord

    from .segmentation import SegmentationStepper

log = logging.getLogger(__name__)

# Bump when the default recipe (PretrainConfig defaults, pooling, crops) changes: the
# simulation caches pretrained checkpoints under a key that includes it.
RECIPE_VERSION = 2
# report x3: in a shared tiny encoder the segmentation gradient otherwise drowns the
# attributes (250-step A/B: lesion-type train accuracy 0.93 with x3 and no negatives).
DEFAULT_LOSS_WEIGHTS = {"segment": 1.0, "report": 3.0, "detect": 0.5, "stage": 0.5, "survival": 0.2}


Minutes = Annotated[float, Field(gt=0)]


def _known_tasks(weights: dict[str, float]) -> dict[str, float]:
    unknown = set(weights) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; valid: {list(TASKS)}")
    return {**DEFAULT_LOSS_WEIGHTS, **weights}


@dataclass(config=FILE)
class PretrainConfig:
    data: Path
    out: Path
    preset: Annotated[str, one_of(preset_names())] = "tiny"
    epochs: Annotated[int, Field(ge=1)] = 20
    max_minutes: Minutes | None = None       # wall-clock budget for the whole run (preparation included)
    max_cpu_minutes: Minutes | None = None   # process CPU-time budget (all threads): repeatable on a shared machine
    device: Annotated[str, one_of(("auto", "cpu", "cuda"))] = "auto"
    precision: Annotated[str, one_of(PRECISIONS)] = "auto"   # auto: bf16 where the device computes it natively
    resume: bool = False
    seed: int = 0
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.2
    batch_size: Annotated[int, Field(ge=1)] = 4
    lr: Annotated[float, Field(gt=0)] = 1e-3   # 3e-3 overfits 16 crops 2x slower (noisy Dice); see docs/model.md
    weight_decay: Annotated[float, Field(ge=0)] = 1e-5
    jitter: Annotated[int, Field(ge=0)] = 0    # random crop shift (voxels) around the lesion
    augment: bool = False                      # flips, intensity scale/shift
    negatives: Annotated[int, Field(ge=0)] = 1  # lesion-free crops per case (detect negatives)
    loss_weights: Annotated[dict[str, float], AfterValidator(_known_tasks)] = field(
        default_factory=lambda: dict(DEFAULT_LOSS_WEIGHTS))
    workers: Annotated[int, Field(ge=1)] = 2   # threads preparing cases
    progress: bool = True
    max_cases: Annotated[int, Field(ge=1)] | None = None
    # A first stage of this many wall minutes: the backbone, lesion head and an organ head learn
    # whole-volume segmentation (`pasta_model.segmentation`); the heads' stage after it keeps
    # interleaving those steps, and the lesion head never trains on lesion-centred crops.
    segment_minutes: Minutes | None = None

    @model_validator(mode="after")
    def _segment_stage_fits(self) -> PretrainConfig:
        if self.segment_minutes and self.max_minutes and self.segment_minutes >= self.max_minutes:
            raise ValueError(f"segment_minutes ({self.segment_minutes:g}) must be below max_minutes "
                             f"({self.max_minutes:g}), which includes it")
        return self

    @classmethod
    def from_dict(cls, raw: dict) -> PretrainConfig:
        return parse(cls, raw, "pretrain config")

    @classmethod
    def from_yaml(cls, path: Path, **overrides) -> PretrainConfig:
        import yaml
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        raw = raw.get("pretrain", raw)
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(raw)


def to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, dict):
            out[k] = to_device(v, device)
        else:
            out[k] = v
    return out


def compute_losses(outputs: dict, batch: dict, weights: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the task losses present in `outputs`; missing labels are masked."""
    parts: dict[str, torch.Tensor] = {}
    if "segment" in outputs:
        parts["segment"] = segmentation_loss(outputs["segment"], batch["seg"])
    if "report" in outputs:
        parts["report"] = report_loss(split_report_logits(outputs["report"].float()), batch["report"])
    if "detect" in outputs:
        parts["detect"] = detection_loss(outputs["detect"], batch["detect"])
    if "stage" in outputs:
        parts["stage"] = classification_loss(outputs["stage"], batch["stage"])
    if "survival" in outputs:
        parts["survival"] = cox_loss(outputs["survival"], batch["time"], batch["event"], batch["has_survival"])
    total = sum(weights.get(k, 1.0) * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def train_step(model: PastaNet, batch: dict, optimizer: torch.optim.Optimizer, weights: dict,
               device: torch.device, precision: str = "fp32", tasks=None) -> dict[str, float]:
    """One optimisation step over one batch (all of the model's tasks, or `tasks`); returns the loss parts."""
    batch = to_device(batch, device)
    with autocast(device, precision):
        outputs = model(channels_last(batch["image"]), tasks=tasks)
    total, parts = compute_losses(outputs, batch, weights)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    parts["loss"] = float(total.detach())
    return parts


def _write_metrics(path: Path, rows: list[dict]) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    write_atomic(path, buf.getvalue())


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _save_state(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def make_loaders(datasets, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[DataLoader]:
    loaders = []
    for k, ds in enumerate(datasets):
        if hasattr(ds.transform, "set_random_state"):
            ds.transform.set_random_state(seed=(seed * 100003 + epoch * 101 + k) % 2**31)
        g = torch.Generator().manual_seed(seed * 7919 + epoch * 31 + k)
        loaders.append(DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=0,
                                  drop_last=shuffle and len(ds) > batch_size))
    return loaders


def zip_longest_cycle(loaders):
    """Batches from all streams per step; the shorter streams cycle until the longest ends."""
    if len(loaders) == 1:
        for b in loaders[0]:
            yield [b]
        return
    n = max(len(loader) for loader in loaders)
    iters = [iter(loader) for loader in loaders]
    for _ in range(n):
        step = []
        for k, loader in enumerate(loaders):
            try:
                step.append(next(iters[k]))
            except StopIteration:
                iters[k] = iter(loader)
                step.append(next(iters[k]))
        yield step


def segmentation_stage(cfg: PretrainConfig, model: PastaNet, records, train_ids, val_ids, device):
    """Stage 1 of a `segment_minutes` run: whole-volume lesion + organ segmentation for that budget,
    scored on up to 16 validation volumes (RUN/segment-stage.json); returns the stepper the heads'
    stage goes on interleaving. With `resume` and a finished stage, its checkpoint is loaded instead."""
    from .segmentation import SegmentationRecipe, SegmentationStepper, evaluate_volumes, load_volumes, train_for
    recipe = SegmentationRecipe.named("pasta", model.preset)
    by_id = {r.case_id: r for r in records}
    train = load_volumes([by_id[c] for c in train_ids], recipe, progress=cfg.progress, workers=cfg.workers)
    stage_ckpt, stage_json = cfg.out / "segment-stage.safetensors", cfg.out / "segment-stage.json"
    if cfg.resume and stage_ckpt.exists():
        model.load_state_dict(load_checkpoint(stage_ckpt)[0].state_dict())
        log.info("resumed: segmentation stage loaded from %s", stage_ckpt)
    else:
        _, steps = train_for(recipe, train, cfg.segment_minutes, seed=cfg.seed, model=model, device=str(device.type))
        val = load_volumes([by_id[c] for c in val_ids[:16]], recipe, workers=cfg.workers)
        scores = evaluate_volumes(model, recipe, val) if val else {}
        summary = {"steps": steps, "minutes": cfg.segment_minutes, "train_volumes": len(train),
                   **{k: v for k, v in scores.items() if k != "cases"}}
        write_atomic(stage_json, json.dumps(summary, indent=1))
        save_checkpoint(stage_ckpt, model, extra={"stage": "segmentation", **summary})
        lesion, organs = summary.get("lesion_dice") or {}, summary.get("organ_dice") or {}
        log.info("segmentation stage: %d steps, validation lesion Dice %.3f (visible %.3f), organ Dice %.3f",
                 steps, lesion.get("dice", math.nan), (lesion.get("visible") or {}).get("dice", math.nan),
                 organs.get("dice", math.nan))
    return SegmentationStepper(recipe, train, seed=cfg.seed + 1)


def pretrain(config: PretrainConfig) -> Path:
    """Train backbone + all heads; returns the path of the last checkpoint.

    The steps, in the order of nnU-Net's trainer hooks: prepare the data, build the model (and
    run the optional segmentation stage), restore a resumed run, then train epoch by epoch under
    the wall/CPU budget, validating and writing metrics and checkpoints after each epoch.
    """
    cfg = config
    budget = _Budget.start(cfg)                  # first: the budget includes the preparation
    preset = get_preset(cfg.preset)
    device = select_device(cfg.device)
    (cfg.out / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)                  # before the model is built: its initial weights
    data = _prepare_data(cfg, preset)
    precision = resolve_precision(cfg.precision, device)
    log.info("%d train / %d val cases, %s train crops, device %s (%s), prepared in %.1fs",
             data.n_train, data.n_val, [len(d) for d in data.train_ds], device, precision,
             time.monotonic() - budget.t0)
    trainer = _build_trainer(cfg, preset, device, precision, data)
    resumed = _restore(trainer, preset)
    return _train_epochs(trainer, data, resumed, budget)


@dataclasses.dataclass
class _Data:
    """The prepared run: case records and split ids (the segmentation stage reloads whole volumes
    by id) and the crop datasets the epochs draw from."""
    records: list[CaseRecord]
    train_ids: list[str]
    val_ids: list[str]
    train_ds: list[CropDataset]
    val_ds: list[CropDataset]
    n_train: int                                  # usable cases (a case that fails to prepare is skipped)
    n_val: int


@dataclasses.dataclass
class _Trainer:
    """What every training step needs; `heads_tasks` and `segmenter` are set by a segmentation stage,
    whose whole-volume steps then replace the crops' segmentation loss."""
    cfg: PretrainConfig
    model: PastaNet
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: str
    heads_tasks: list[str] | None = None
    segmenter: SegmentationStepper | None = None

    def step(self, batch: dict) -> dict[str, float]:
        """One crop batch, then (with a segmentation stage) one whole-volume step; the loss parts."""
        parts = train_step(self.model, batch, self.optimizer, self.cfg.loss_weights, self.device,
                           self.precision, tasks=self.heads_tasks)
        if self.segmenter is not None:
            parts["segment_volume"] = self.segmenter.step(self.model, self.optimizer, self.device)
        return parts


@dataclasses.dataclass
class _Resumed:
    """Where a run picks up: a fresh run starts at epoch 1 with no metrics rows."""
    start_epoch: int = 1
    elapsed_before: float = 0.0                   # wall seconds of earlier invocations (last_state.pt)
    rows: list[dict] = field(default_factory=list)


@dataclasses.dataclass
class _Budget:
    """Wall-clock and process-CPU budgets in seconds (None: unlimited), counted from the start of this
    `pretrain` call, preparation included. A step starts only if the running step cost plus the last
    validation plus a 5 s margin still fit, so the epoch it ends is validated and saved in time;
    the CPU budget gives the same step count on a busy shared machine, where wall time would not."""
    wall: float | None
    cpu: float | None
    t0: float
    cpu0: float
    step_time: float | None = None                # moving average (0.9) of a step's wall seconds
    step_cpu: float | None = None                 # ... and of its CPU seconds
    val_time: float = 0.0                         # the last validation's wall seconds
    val_cpu: float = 0.0                          # ... and its CPU seconds

    @classmethod
    def start(cls, cfg: PretrainConfig) -> _Budget:
        """Read the clocks now: the budgets count from this moment."""
        return cls(wall=None if cfg.max_minutes is None else cfg.max_minutes * 60.0,
                   cpu=None if cfg.max_cpu_minutes is None else cfg.max_cpu_minutes * 60.0,
                   t0=time.monotonic(), cpu0=time.process_time())

    def used(self) -> tuple[float, float]:
        """Wall and CPU seconds spent since `start`."""
        return time.monotonic() - self.t0, time.process_time() - self.cpu0

    def next_step_fits(self, elapsed: float, cpu_used: float) -> bool:
        """False once another step plus validation would overrun a budget (never before a first step)."""
        wall_over = self.wall is not None and self.step_time is not None \
            and elapsed + self.step_time + self.val_time + 5 > self.wall
        cpu_over = self.cpu is not None and self.step_cpu is not None \
            and cpu_used + self.step_cpu + self.val_cpu + 5 > self.cpu
        return not (wall_over or cpu_over)

    def progress(self, fraction: float, elapsed: float, cpu_used: float) -> float:
        """The share of the run done: of its steps, or of a budget where that is further along."""
        if self.wall is not None:
            fraction = max(fraction, elapsed / self.wall)
        if self.cpu is not None:
            fraction = max(fraction, cpu_used / self.cpu)
        return fraction

    def record_step(self, seconds: float, cpu_seconds: float) -> None:
        """Fold one step's cost into the moving averages `next_step_fits` reserves."""
        self.step_time = seconds if self.step_time is None else 0.9 * self.step_time + 0.1 * seconds
        self.step_cpu = cpu_seconds if self.step_cpu is None else 0.9 * self.step_cpu + 0.1 * cpu_seconds


@dataclasses.dataclass
class _Schedule:
    """Poly learning-rate decay (as nnU-Net) over the steps this invocation will run, or over a
    budget where that is further along, so a budget-cut run still ends near zero."""
    base_lr: float
    steps_per_epoch: int
    total_steps: int
    global_step: int = 0                          # steps taken in this invocation, all epochs

    def apply(self, optimizer: torch.optim.Optimizer, budget: _Budget, elapsed: float, cpu_used: float) -> None:
        """Set the learning rate for the next step."""
        progress = budget.progress(self.global_step / self.total_steps, elapsed, cpu_used)
        for g in optimizer.param_groups:
            g["lr"] = self.base_lr * max(0.0, 1 - min(progress, 1.0)) ** 0.9


def _prepare_data(cfg: PretrainConfig, preset: Preset) -> _Data:
    """Split by case id (written to split.json, so a resume or a reader sees the same split), prepare
    every case's regions once (cached under cache/, so a resume skips the volumes), then build the
    crop datasets: training with jitter and augmentation, validation centred and plain."""
    from synth.dataset import read_dataset

    records = read_dataset(cfg.data)
    if cfg.max_cases:
        records = records[: cfg.max_cases]
    if not records:
        raise ValueError(f"{cfg.data}: no cases found")
    train_ids, val_ids = split_cases([r.case_id for r in records], cfg.val_fraction, cfg.seed)
    write_atomic(cfg.out / "split.json", json.dumps({"train": train_ids, "val": val_ids}, indent=1))
    plan = region_plan(preset, cfg.jitter, cfg.negatives, cfg.seed)
    cases = prepare_cases(records, preset, plan, cache_dir=cfg.out / "cache", workers=cfg.workers,
                          progress=cfg.progress)
    val_set = set(val_ids)
    train_cases = [c for c in cases if c["case_id"] not in val_set]
    val_cases = [c for c in cases if c["case_id"] in val_set]
    if not train_cases:
        raise ValueError(f"{cfg.data}: no usable training cases")
    train_ds = build_datasets(train_cases, preset, augment=cfg.augment, seed=cfg.seed, jitter=cfg.jitter > 0)
    val_ds = build_datasets(val_cases, preset, augment=False) if val_cases else []
    return _Data(records, train_ids, val_ids, train_ds, val_ds, len(train_cases), len(val_cases))


def _build_trainer(cfg: PretrainConfig, preset: Preset, device: torch.device, precision: str,
                   data: _Data) -> _Trainer:
    """The model in channels-last layout (3D convolutions run faster on it), the optional
    segmentation stage, then Adam: created after the stage, so the heads' stage starts with fresh
    moments; with a stage, crop batches train the heads only and the stage's stepper segments."""
    model = build_model(preset, organs=bool(cfg.segment_minutes)).to(device).to(memory_format=torch.channels_last_3d)
    segmenter = None
    if cfg.segment_minutes:
        segmenter = segmentation_stage(cfg, model, data.records, data.train_ids, data.val_ids, device)
    heads_tasks = [t for t in model.tasks if t != "segment"] if segmenter else None
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return _Trainer(cfg, model, optimizer, device, precision, heads_tasks, segmenter)


def _restore(tr: _Trainer, preset: Preset) -> _Resumed:
    """With `resume` and both last.safetensors and last_state.pt: the weights (the preset must match),
    the optimizer state, the next epoch, the wall time spent so far and the metrics rows of the
    saved epochs (a row past the checkpoint is dropped). Otherwise a fresh start, warned about
    if a resume was asked for."""
    cfg = tr.cfg
    last, state_path = cfg.out / "last.safetensors", cfg.out / "last_state.pt"
    if cfg.resume and last.exists() and state_path.exists():
        loaded, meta = load_checkpoint(last, device="cpu")
        if meta.preset != preset.name:
            raise ValueError(f"{last}: preset {meta.preset!r} differs from --preset {preset.name!r}")
        tr.model.load_state_dict(loaded.state_dict())
        state = torch.load(state_path, map_location=tr.device, weights_only=True)
        tr.optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        rows = [r for r in _read_metrics(cfg.out / "metrics.csv") if int(r["epoch"]) < start_epoch]
        log.info("resumed from %s at epoch %d", last, start_epoch)
        return _Resumed(start_epoch, float(state.get("elapsed", 0.0)), rows)
    if cfg.resume:
        log.warning("--resume: no %s yet; starting fresh", last)
    return _Resumed()


def _train_epochs(tr: _Trainer, data: _Data, resumed: _Resumed, budget: _Budget) -> Path:
    """The epoch loop: train, validate, write metrics and checkpoints, until the last epoch, an
    epoch with no step (budget spent) or a budget stop; returns last.safetensors, written even if
    no epoch ran, so a caller always gets a checkpoint."""
    from torch.utils.tensorboard import SummaryWriter

    cfg = tr.cfg
    writer = SummaryWriter(str(cfg.out / "tb"))
    steps_per_epoch = max(len(loader) for loader in make_loaders(data.train_ds, cfg.batch_size, cfg.seed, 0))
    schedule = _Schedule(cfg.lr, steps_per_epoch,
                         total_steps=max(1, steps_per_epoch * (cfg.epochs - resumed.start_epoch + 1)))
    rows = resumed.rows
    last = cfg.out / "last.safetensors"
    for epoch in range(resumed.start_epoch, cfg.epochs + 1):
        t_epoch = time.monotonic()
        sums, n, stop = _train_epoch(tr, data.train_ds, epoch, schedule, budget)
        if n == 0:
            break
        row = {"epoch": epoch, "seconds": round(time.monotonic() - t_epoch, 2),
               "run_cpu_seconds": round(time.process_time() - budget.cpu0, 1),
               "run_wall_seconds": round(time.monotonic() - budget.t0, 1),
               "lr": tr.optimizer.param_groups[0]["lr"], "steps": n}
        row.update({f"train_{k}": round(v / n, 5) for k, v in sums.items()})
        if data.val_ds:
            row.update(_validate(tr, data.val_ds, budget))
        rows.append(row)
        _write_epoch(tr, writer, rows, resumed.elapsed_before, budget)
        if stop:
            log.info("time budget (%s wall min, %s CPU min) reached after epoch %d",
                     cfg.max_minutes, cfg.max_cpu_minutes, epoch)
            break
    writer.close()
    if not last.exists():
        save_checkpoint(last, tr.model, extra={"epoch": resumed.start_epoch - 1})
    return last


def _train_epoch(tr: _Trainer, train_ds: list[CropDataset], epoch: int, schedule: _Schedule,
                 budget: _Budget) -> tuple[dict[str, float], int, bool]:
    """One pass over the training crops (each step takes a batch of every stream; the shorter
    streams cycle), seeded by (seed, epoch) so a resumed epoch draws the same crops. Stops before a
    step the budget cannot fit. Returns the summed loss parts, the batches trained and whether the
    budget stopped it."""
    from tqdm import tqdm

    cfg = tr.cfg
    tr.model.train()
    sums: dict[str, float] = {}
    n, stop = 0, False
    loaders = make_loaders(train_ds, cfg.batch_size, cfg.seed, epoch)
    bar = tqdm(zip_longest_cycle(loaders), total=schedule.steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}",
               disable=not cfg.progress, leave=False)
    for batches in bar:
        elapsed, cpu_used = budget.used()
        if not budget.next_step_fits(elapsed, cpu_used):
            stop = True
            break
        schedule.apply(tr.optimizer, budget, elapsed, cpu_used)
        ts, tc = time.monotonic(), time.process_time()
        for b in batches:
            parts = tr.step(b)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        budget.record_step(time.monotonic() - ts, time.process_time() - tc)
        schedule.global_step += 1
        bar.set_postfix(loss=f"{parts['loss']:.3f}")
    bar.close()
    return sums, n, stop


def _validate(tr: _Trainer, val_ds: list[CropDataset], budget: _Budget) -> dict:
    """Crop-level validation metrics as val_* columns (rounded; NaN kept). Its wall and CPU time go
    to the budget, which reserves that much before each step so the epoch's validation fits."""
    from .evaluate import crop_metrics

    tv, tvc = time.monotonic(), time.process_time()
    vm = crop_metrics(tr.model, val_ds, tr.device, batch_size=tr.cfg.batch_size, weights=tr.cfg.loss_weights)
    budget.val_time, budget.val_cpu = time.monotonic() - tv, time.process_time() - tvc
    return {f"val_{k}": (round(v, 5) if isinstance(v, float) and not math.isnan(v) else v) for k, v in vm.items()}


def _write_epoch(tr: _Trainer, writer: SummaryWriter, rows: list[dict], elapsed_before: float,
                 budget: _Budget) -> None:
    """After every epoch, everything a reader or a resume needs: TensorBoard scalars, metrics.csv
    (all rows, rewritten atomically), checkpoints/epoch-NNN and last.safetensors, and last_state.pt
    (optimizer state and the wall seconds of the whole run so far, earlier invocations included)."""
    cfg, row = tr.cfg, rows[-1]
    epoch = row["epoch"]
    for k, v in row.items():
        if k != "epoch" and isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            writer.add_scalar(k.replace("_", "/", 1), v, epoch)
    writer.flush()
    _write_metrics(cfg.out / "metrics.csv", rows)
    extra = {"epoch": epoch, "seed": cfg.seed, "data": str(cfg.data),
             "metrics": {k: v for k, v in row.items() if isinstance(v, (int, float))}}
    save_checkpoint(cfg.out / "checkpoints" / f"epoch-{epoch:03d}.safetensors", tr.model, extra=extra)
    save_checkpoint(cfg.out / "last.safetensors", tr.model, extra=extra)
    _save_state(cfg.out / "last_state.pt", {"epoch": epoch, "optimizer": tr.optimizer.state_dict(),
                                            "elapsed": elapsed_before + time.monotonic() - budget.t0})
    headline = {k: row[k] for k in row if k.startswith(("train_loss", "val_dice", "val_loss"))}
    log.info("epoch %d: %s", epoch, headline)
