"""Multi-task pretraining of PASTA (backbone + all heads) on a PASTA-Gen-layout dataset.

`pretrain(PretrainConfig) -> Path` is the plain function (the simulation calls it);
`pasta-fed pretrain` is a thin shell over it. A run folder holds metrics.csv, tb/
(TensorBoard), checkpoints/epoch-NNN.safetensors, last.safetensors, last_state.pt
(optimizer state, plain tensors, loaded with weights_only=True) and cache/.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from synth.atomic import atomic_path, write_atomic
from synth.typed_config import typed_fields

from .checkpoint import load_checkpoint, save_checkpoint
from .data import build_datasets, prepare_cases, region_plan, split_cases
from .device import PRECISIONS, autocast, channels_last, resolve_precision, select_device
from .heads import TASKS, split_report_logits
from .losses import classification_loss, cox_loss, detection_loss, report_loss, segmentation_loss
from .network import PastaNet, build_model
from .presets import get_preset

log = logging.getLogger(__name__)

# Bump when the default recipe (PretrainConfig defaults, pooling, crops) changes: the
# simulation caches pretrained checkpoints under a key that includes it.
RECIPE_VERSION = 2
# report x3: in a shared tiny encoder the segmentation gradient otherwise drowns the
# attributes (250-step A/B: lesion-type train accuracy 0.93 with x3 and no negatives).
DEFAULT_LOSS_WEIGHTS = {"segment": 1.0, "report": 3.0, "detect": 0.5, "stage": 0.5, "survival": 0.2}


@dataclass
class PretrainConfig:
    data: Path
    out: Path
    preset: str = "tiny"
    epochs: int = 20
    max_minutes: float | None = None       # wall-clock budget for the whole run (preparation included)
    max_cpu_minutes: float | None = None   # process CPU-time budget (all threads): repeatable on a shared machine
    device: str = "auto"                   # auto | cpu | cuda
    precision: str = "auto"                # auto (bf16 where the device computes it natively) | bf16 | fp32
    resume: bool = False
    seed: int = 0
    val_fraction: float = 0.2
    batch_size: int = 4
    lr: float = 1e-3                       # 3e-3 overfits 16 crops 2x slower (noisy Dice); see docs/model.md
    weight_decay: float = 1e-5
    jitter: int = 0                        # random crop shift (voxels) around the lesion
    augment: bool = False                  # flips, intensity scale/shift
    negatives: int = 1                     # lesion-free crops per case (detect negatives)
    loss_weights: dict = field(default_factory=lambda: dict(DEFAULT_LOSS_WEIGHTS))
    workers: int = 2                       # threads preparing cases
    progress: bool = True
    max_cases: int | None = None
    # A first stage of this many wall minutes: the backbone, lesion head and an organ head learn
    # whole-volume segmentation (`pasta_model.segmentation`); the heads' stage after it keeps
    # interleaving those steps, and the lesion head never trains on lesion-centred crops.
    segment_minutes: float | None = None

    def __post_init__(self):
        self.data, self.out = Path(self.data), Path(self.out)
        get_preset(self.preset)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: {self.device!r} is not one of auto, cpu, cuda")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction: {self.val_fraction} must be in [0, 1)")
        unknown = set(self.loss_weights) - set(TASKS)
        if unknown:
            raise ValueError(f"loss_weights: unknown task(s) {sorted(unknown)}; valid: {list(TASKS)}")
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **self.loss_weights}
        if self.segment_minutes is not None and self.segment_minutes <= 0:
            raise ValueError(f"segment_minutes: {self.segment_minutes} must be > 0 (or unset)")
        if self.segment_minutes and self.max_minutes and self.segment_minutes >= self.max_minutes:
            raise ValueError(f"segment_minutes: {self.segment_minutes} must be below max_minutes "
                             f"({self.max_minutes}), which includes it")

    @classmethod
    def from_dict(cls, raw: dict) -> PretrainConfig:
        return cls(**typed_fields(cls, raw, "pretrain config"))

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
    """Train backbone + all heads; returns the path of the last checkpoint."""
    from synth.dataset import read_dataset

    from .evaluate import crop_metrics

    t0, cpu0 = time.monotonic(), time.process_time()
    cfg = config
    preset = get_preset(cfg.preset)
    device = select_device(cfg.device)
    out = cfg.out
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    records = read_dataset(cfg.data)
    if cfg.max_cases:
        records = records[: cfg.max_cases]
    if not records:
        raise ValueError(f"{cfg.data}: no cases found")
    train_ids, val_ids = split_cases([r.case_id for r in records], cfg.val_fraction, cfg.seed)
    write_atomic(out / "split.json", json.dumps({"train": train_ids, "val": val_ids}, indent=1))
    plan = region_plan(preset, cfg.jitter, cfg.negatives, cfg.seed)
    cases = prepare_cases(records, preset, plan, cache_dir=out / "cache", workers=cfg.workers, progress=cfg.progress)
    val_set = set(val_ids)
    train_cases = [c for c in cases if c["case_id"] not in val_set]
    val_cases = [c for c in cases if c["case_id"] in val_set]
    if not train_cases:
        raise ValueError(f"{cfg.data}: no usable training cases")
    train_ds = build_datasets(train_cases, preset, augment=cfg.augment, seed=cfg.seed, jitter=cfg.jitter > 0)
    val_ds = build_datasets(val_cases, preset, augment=False) if val_cases else []
    precision = resolve_precision(cfg.precision, device)
    log.info("%d train / %d val cases, %s train crops, device %s (%s), prepared in %.1fs",
             len(train_cases), len(val_cases), [len(d) for d in train_ds], device, precision,
             time.monotonic() - t0)

    model = build_model(preset, organs=bool(cfg.segment_minutes)).to(device).to(memory_format=torch.channels_last_3d)
    segmenter = None
    if cfg.segment_minutes:
        segmenter = segmentation_stage(cfg, model, records, train_ids, val_ids, device)
    heads_tasks = [t for t in model.tasks if t != "segment"] if segmenter else None
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_epoch, elapsed_before, rows = 1, 0.0, []
    last = out / "last.safetensors"
    state_path = out / "last_state.pt"
    if cfg.resume and last.exists() and state_path.exists():
        loaded, meta = load_checkpoint(last, device="cpu")
        if meta.preset != preset.name:
            raise ValueError(f"{last}: preset {meta.preset!r} differs from --preset {preset.name!r}")
        model.load_state_dict(loaded.state_dict())
        state = torch.load(state_path, map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        elapsed_before = float(state.get("elapsed", 0.0))
        rows = _read_metrics(out / "metrics.csv")
        rows = [r for r in rows if int(r["epoch"]) < start_epoch]
        log.info("resumed from %s at epoch %d", last, start_epoch)
    elif cfg.resume:
        log.warning("--resume: no %s yet; starting fresh", last)

    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm
    writer = SummaryWriter(str(out / "tb"))
    budget = None if cfg.max_minutes is None else cfg.max_minutes * 60.0
    cpu_budget = None if cfg.max_cpu_minutes is None else cfg.max_cpu_minutes * 60.0
    step_cpu, val_cpu = None, 0.0
    steps_per_epoch = max(len(loader) for loader in make_loaders(train_ds, cfg.batch_size, cfg.seed, 0))
    total_steps = max(1, steps_per_epoch * (cfg.epochs - start_epoch + 1))
    step_time, val_time, global_step, stop = None, 0.0, 0, False
    last_path = last
    for epoch in range(start_epoch, cfg.epochs + 1):
        model.train()
        t_epoch = time.monotonic()
        sums: dict[str, float] = {}
        n = 0
        loaders = make_loaders(train_ds, cfg.batch_size, cfg.seed, epoch)
        bar = tqdm(zip_longest_cycle(loaders), total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}",
                   disable=not cfg.progress, leave=False)
        for batches in bar:
            elapsed = time.monotonic() - t0
            cpu_used = time.process_time() - cpu0
            if budget is not None and step_time is not None and elapsed + step_time + val_time + 5 > budget:
                stop = True
                break
            if cpu_budget is not None and step_cpu is not None and cpu_used + step_cpu + val_cpu + 5 > cpu_budget:
                stop = True
                break
            progress = global_step / total_steps
            if budget is not None:
                progress = max(progress, elapsed / budget)
            if cpu_budget is not None:
                progress = max(progress, cpu_used / cpu_budget)
            for g in optimizer.param_groups:            # poly decay, as nnU-Net
                g["lr"] = cfg.lr * max(0.0, 1 - min(progress, 1.0)) ** 0.9
            ts, tc = time.monotonic(), time.process_time()
            for b in batches:
                parts = train_step(model, b, optimizer, cfg.loss_weights, device, precision, tasks=heads_tasks)
                if segmenter is not None:
                    parts["segment_volume"] = segmenter.step(model, optimizer, device)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
            dt = time.monotonic() - ts
            step_time = dt if step_time is None else 0.9 * step_time + 0.1 * dt
            dc = time.process_time() - tc
            step_cpu = dc if step_cpu is None else 0.9 * step_cpu + 0.1 * dc
            global_step += 1
            bar.set_postfix(loss=f"{parts['loss']:.3f}")
        bar.close()
        if n == 0:
            break
        row = {"epoch": epoch, "seconds": round(time.monotonic() - t_epoch, 2),
               "run_cpu_seconds": round(time.process_time() - cpu0, 1),
               "run_wall_seconds": round(time.monotonic() - t0, 1),
               "lr": optimizer.param_groups[0]["lr"], "steps": n}
        row.update({f"train_{k}": round(v / n, 5) for k, v in sums.items()})
        if val_ds:
            tv, tvc = time.monotonic(), time.process_time()
            vm = crop_metrics(model, val_ds, device, batch_size=cfg.batch_size, weights=cfg.loss_weights)
            val_time, val_cpu = time.monotonic() - tv, time.process_time() - tvc
            row.update({f"val_{k}": (round(v, 5) if isinstance(v, float) and not math.isnan(v) else v)
                        for k, v in vm.items()})
        rows.append(row)
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                writer.add_scalar(k.replace("_", "/", 1), v, epoch)
        writer.flush()
        _write_metrics(out / "metrics.csv", rows)
        extra = {"epoch": epoch, "seed": cfg.seed, "data": str(cfg.data),
                 "metrics": {k: v for k, v in row.items() if isinstance(v, (int, float))}}
        ckpt = out / "checkpoints" / f"epoch-{epoch:03d}.safetensors"
        save_checkpoint(ckpt, model, extra=extra)
        save_checkpoint(last, model, extra=extra)
        _save_state(state_path, {"epoch": epoch, "optimizer": optimizer.state_dict(),
                                 "elapsed": elapsed_before + time.monotonic() - t0})
        headline = {k: row[k] for k in row if k.startswith(("train_loss", "val_dice", "val_loss"))}
        log.info("epoch %d: %s", epoch, headline)
        last_path = last
        if stop:
            log.info("time budget (%s wall min, %s CPU min) reached after epoch %d",
                     cfg.max_minutes, cfg.max_cpu_minutes, epoch)
            break
    writer.close()
    if not last_path.exists():
        save_checkpoint(last, model, extra={"epoch": start_epoch - 1})
    return last_path
