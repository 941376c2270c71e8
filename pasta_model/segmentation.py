"""Whole-volume segmentation training and scoring: lesions anywhere in the window, organs as a dense target.

Why a recipe of its own: lesion-centred crops teach a network only "the lesion is in the
middle of the window" (docs/model.md). Here crops come from whole volumes through MONAI's
`RandCropByPosNegLabeld` (nnU-Net's foreground oversampling: 2 of 3 crops hold lesion voxels,
at a random place in the window). Every voxel also carries its organ from total.nii.gz, which
PastaNet's organ head learns as a probe of the backbone (see `PastaNet.segment_and_organs`).
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    DivisiblePadd,
    EnsureTyped,
    Lambdad,
    RandCropByPosNegLabeld,
    ScaleIntensityRanged,
    Spacingd,
)
from torch import Tensor, nn

from synth.conspicuity import measure
from synth.dataset import read_dataset
from synth.totalseg import TOTALSEG_HOSTS
from synth.vocabulary import HOST_ORGANS

from .device import autocast, channels_last, select_device
from .network import PastaNet
from .presets import Preset
from .transforms import LESION_LABEL, PastaHUMapd, load_keys

log = logging.getLogger(__name__)
ORGAN_NAMES: tuple[str, ...] = HOST_ORGANS   # PastaNet's organ head: 0 = background, k = ORGAN_NAMES[k - 1]


def organ_lut() -> np.ndarray:
    """TotalSegmentator id -> 1 + index of its host organ (0: background or an organ we do not host)."""
    lut = np.zeros(256, dtype=np.uint8)
    for k, organ in enumerate(ORGAN_NAMES):
        lut[list(TOTALSEG_HOSTS[organ])] = k + 1
    return lut


@dataclass(frozen=True)
class SegmentationRecipe:
    name: str
    preset: Preset
    intensity: str           # "pasta" (PASTA's HU map) or "window" (-200..300 HU -> 0..1)
    target: str              # "lesion+organs" or "label3" (background / host organ / lesion)
    lr: float = 1e-3
    crops_per_volume: int = 4

    @classmethod
    def named(cls, name: str, preset: Preset) -> SegmentationRecipe:
        if name == "monai":
            return cls("monai", preset, "window", "label3")
        if name == "pasta":
            return cls("pasta", preset, "pasta", "lesion+organs")
        raise ValueError(f"unknown segmentation recipe {name!r}; known: monai, pasta")

    def build_model(self) -> nn.Module:
        if self.name == "monai":
            from monai.networks.nets import UNet
            return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(16, 32, 64, 128),
                        strides=(2, 2, 2), num_res_units=2)
        return PastaNet(self.preset, tasks=("segment",), organs=True)


def forward(model: nn.Module, recipe: SegmentationRecipe, x: Tensor):
    """label3 nets: their logits. PastaNet: lesion logits and organ logits."""
    return model(x) if recipe.target == "label3" else model.segment_and_organs(x)


def _preprocess(recipe: SegmentationRecipe) -> Compose:
    keys = ["image", "label", "total"]
    s = float(recipe.preset.spacing_mm)
    intensity = PastaHUMapd(keys=["image"]) if recipe.intensity == "pasta" else \
        ScaleIntensityRanged(keys="image", a_min=-200, a_max=300, b_min=0.0, b_max=1.0, clip=True)
    lut = torch.as_tensor(organ_lut())
    return Compose(load_keys(keys) + [
        Spacingd(keys=keys, pixdim=(s,) * 3, mode=["bilinear", "nearest", "nearest"]),
        intensity,
        Lambdad(keys="total", func=lambda t: lut[t.long().clamp(0, 255)]),
        DivisiblePadd(keys=keys, k=recipe.preset.divisor),
        EnsureTyped(keys=keys, dtype=[torch.float16, torch.uint8, torch.uint8], track_meta=False),
    ])


def _load_one(rec, pre: Compose) -> dict | None:
    try:
        d = pre({"image": str(rec.img), "label": str(rec.label), "total": str(rec.total)})
        img, label, _, _ = rec.load()
        lesion_type = rec.report().get("lesion_type")
    except Exception as exc:  # one bad case never stops the rest
        log.error("%s: cannot load case (%s); skipped", rec.path, str(exc).splitlines()[0][:200])
        return None
    c = measure(img, label)
    return {**d, "case_id": rec.case_id, "lesion_type": lesion_type,
            "conspicuity": None if c is None else c.conspicuity}


def load_volumes(root_or_records, recipe: SegmentationRecipe, progress: bool = False,
                 workers: int = 2) -> list[dict]:
    """Every case of a generated dataset (a folder, or its `CaseRecord`s), preprocessed, in memory
    (float16 image, uint8 masks), with its lesion type and conspicuity."""
    pre = _preprocess(recipe)
    records = read_dataset(root_or_records) if isinstance(root_or_records, (str, Path)) else list(root_or_records)
    from tqdm import tqdm
    with ThreadPoolExecutor(max(1, workers)) as pool:
        loaded = list(tqdm(pool.map(lambda r: _load_one(r, pre), records), total=len(records),
                           desc="load volumes", unit="case", disable=not progress))
    return [v for v in loaded if v is not None]


def _targets(recipe: SegmentationRecipe, crop: dict) -> dict:
    lesion = (crop["label"] == LESION_LABEL).long()
    if recipe.target == "label3":
        return {"label3": crop["label"].long().clamp(0, 2)}
    return {"lesion": lesion, "organs": crop["total"].long()}


def _loss(recipe: SegmentationRecipe, out, targets: dict, dice_ce: DiceCELoss, lesion_dice_ce: DiceCELoss) -> Tensor:
    if recipe.target == "label3":
        return dice_ce(out.float(), targets["label3"])
    lesion_logits, organ_logits = out
    return lesion_dice_ce(lesion_logits.float(), targets["lesion"]) + dice_ce(organ_logits.float(), targets["organs"])


class SegmentationStepper:
    """One optimisation step at a time over whole volumes: 4 crops of one random volume per step,
    2 of 3 holding lesion voxels anywhere in the window. The pretraining loop interleaves its steps
    with the classification heads' so the lesion head never sees a lesion-centred crop."""

    def __init__(self, recipe: SegmentationRecipe, volumes: list[dict], seed: int = 0):
        if not volumes:
            raise ValueError("no volumes to train segmentation on")
        self.recipe, self.volumes = recipe, volumes
        size = recipe.preset.crop_size
        self.sampler = RandCropByPosNegLabeld(keys=["image", "label", "total"], label_key="lesion",
                                              spatial_size=(size,) * 3, pos=2, neg=1,
                                              num_samples=recipe.crops_per_volume)
        self.sampler.set_random_state(seed=seed)
        self.rng = np.random.default_rng(seed)
        # batch Dice: a lesion-free crop would otherwise score Dice 0 whatever it predicts and push p(lesion)
        # to zero everywhere (the per-sample default)
        self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
        # the lesion's Dice without the background channel: with it, the Dice half of the loss is
        # ~0.5 whatever the lesion channel does and its gradient is diluted by ~1000 background voxels
        self.lesion_dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, include_background=False)

    def batch(self) -> dict:
        vol = self.volumes[int(self.rng.integers(len(self.volumes)))]
        # the sampler counts any label > 0 as foreground: give it the lesion alone
        crops = self.sampler({"image": vol["image"], "label": vol["label"], "total": vol["total"],
                              "lesion": (vol["label"] == LESION_LABEL).to(torch.uint8)})
        return {k: torch.stack([torch.as_tensor(c[k]) for c in crops]) for k in ("image", "label", "total")}

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> float:
        batch = {k: v.to(device) for k, v in self.batch().items()}
        with autocast(device):
            out = forward(model, self.recipe, channels_last(batch["image"].float()))
        loss = _loss(self.recipe, out, _targets(self.recipe, batch), self.dice_ce, self.lesion_dice_ce)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())


def train_for(recipe: SegmentationRecipe, volumes: list[dict], minutes: float, seed: int = 0,
              model: nn.Module | None = None, log_every: int = 200, device: str = "auto",
              max_steps: int | None = None) -> tuple[nn.Module, int]:
    """Train for a wall-clock budget (or `max_steps`), poly lr decay over it; returns the model and its steps."""
    device = select_device(device)
    model = (model if model is not None else recipe.build_model()).to(device)
    model = model.to(memory_format=torch.channels_last_3d)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-4)
    stepper = SegmentationStepper(recipe, volumes, seed)
    budget, t0, steps, running = minutes * 60.0, time.monotonic(), 0, []
    while (elapsed := time.monotonic() - t0) < budget and (max_steps is None or steps < max_steps):
        progress = max(elapsed / budget, steps / max_steps if max_steps else 0.0)
        for g in opt.param_groups:
            g["lr"] = recipe.lr * (1 - progress) ** 0.9
        running.append(stepper.step(model, opt, device))
        steps += 1
        if steps % log_every == 0:
            log.info("%s: step %d, %.1f min, loss %.3f", recipe.name, steps, elapsed / 60,
                     np.mean(running[-log_every:]))
    return model, steps


def lesion_probability(model: nn.Module, recipe: SegmentationRecipe, image: Tensor) -> tuple[Tensor, Tensor | None]:
    """Sliding-window lesion probability [D,H,W] and organ labels [D,H,W] (None for label3 nets)."""
    size = recipe.preset.crop_size
    device = next(model.parameters()).device

    def predict(x):
        with autocast(device):
            out = forward(model, recipe, channels_last(x.to(device)))
        if recipe.target == "label3":
            return torch.softmax(out.float(), 1)
        lesion, organs = out
        return torch.cat([torch.softmax(lesion.float(), 1)[:, 1:], torch.softmax(organs.float(), 1)], 1)

    with torch.no_grad():
        probs = sliding_window_inference(image[None].float(), (size,) * 3, 4, predict, overlap=0.25)[0]
    probs = probs.cpu()
    if recipe.target == "label3":
        return probs[2], None
    return probs[0], probs[1:].argmax(0)


def evaluate_volumes(model: nn.Module, recipe: SegmentationRecipe, volumes: list[dict]) -> dict:
    """Whole-volume lesion Dice (at the preset spacing) overall, by lesion type and conspicuity band, and
    organ Dice: `pasta_model.evaluate`'s summaries over this recipe's predictions."""
    from . import metrics as M
    from .evaluate import lesion_dice_summary, organ_dice_summary
    groups = {name: (k + 1,) for k, name in enumerate(ORGAN_NAMES)}   # volumes hold organ indices already
    model.eval()
    rows = []
    for vol in volumes:
        prob, organs = lesion_probability(model, recipe, vol["image"])
        truth = (vol["label"][0] == LESION_LABEL).numpy()
        row = {"case_id": vol["case_id"], "lesion_type": vol["lesion_type"], "conspicuity": vol["conspicuity"],
               "dice": M.dice((prob > 0.5).numpy(), truth)}
        if organs is not None:
            row["organ_dice"] = M.organ_dice(organs.numpy(), vol["total"][0].numpy(), groups)
        rows.append(row)
    model.train()
    return {"lesion_dice": lesion_dice_summary(rows), "organ_dice": organ_dice_summary(rows), "cases": rows}
