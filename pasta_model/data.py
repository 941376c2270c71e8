"""Training samples from a PASTA-Gen-layout dataset: cached regions, random crops after the cache.

Each case is read, reoriented, resampled and HU-mapped once (`prepare_case`); only
small regions around the lesion and a few lesion-free spots are kept, on disk under a
cache folder (MONAI PersistentDataset) and in memory. Epochs then draw random crops
(jitter), flips and intensity changes from those regions, so no epoch after the first
re-reads or re-resamples a volume.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import PersistentDataset
from monai.data.utils import json_hashing
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    Transform,
)
from torch.utils.data import Dataset

from .heads import REPORT_OUTPUTS
from .losses import IGNORE_INDEX
from .presets import Preset
from .targets import detect_vector, labels_from_report, report_indices, stage_index
from .transforms import (
    LESION_LABEL,
    build_preprocess,
    centred_crop,
    largest_component_center,
    mask_center,
    negative_centers,
    plain,
)

log = logging.getLogger(__name__)

REPORT_NAMES: tuple[str, ...] = tuple(REPORT_OUTPUTS)   # shape, density, ..., lesion_type


# ---------------------------------------------------------------- targets (pure)
def case_targets(report: dict) -> dict:
    """type.json -> class indices and survival fields; unknown or missing labels -> IGNORE_INDEX."""
    row = labels_from_report(report)
    months, event = row["survival_months"], row["survival_event"]
    has_surv = months is not None and event is not None
    return {
        "report": report_indices(row),
        "stage": stage_index(row),
        "time": float(months) if has_surv else 0.0,
        "event": float(bool(event)) if has_surv else 0.0,
        "has_survival": float(has_surv),
        "detect": detect_target(row["organ"], positive=True),
    }


def detect_target(organ: str | None, positive: bool) -> list[float]:
    """Multi-hot [any] + HOST_ORGANS for a crop (all zero for a lesion-free crop)."""
    return detect_vector(positive, organ)[0]


def negative_targets() -> dict:
    return {"report": {n: IGNORE_INDEX for n in REPORT_NAMES}, "stage": IGNORE_INDEX, "time": 0.0,
            "event": 0.0, "has_survival": 0.0, "detect": detect_target(None, positive=False)}


# ---------------------------------------------------------------- cached regions
@dataclass(frozen=True)
class RegionPlan:
    """What `prepare_case` keeps of a volume: sizes include the jitter margin."""
    lesion_size: int
    detect_size: int
    detect_crop: int          # the detect crop itself (negatives are kept at this size)
    negatives: int
    seed: int

    def key(self) -> str:
        return f"L{self.lesion_size}-D{self.detect_size}-C{self.detect_crop}-N{self.negatives}-S{self.seed}"


class PrepareCase(Transform):
    """Deterministic: one case item -> regions (float16 image, uint8 lesion mask) and targets.

    A MONAI `Transform` (not Randomizable), so PersistentDataset caches its output.
    """

    def __init__(self, preset: Preset, plan: RegionPlan):
        self.preset, self.plan = preset, plan
        self.preprocess = build_preprocess(preset)

    def __call__(self, item: dict) -> dict:
        d = self.preprocess({"image": item["img"], "label": item["label"]})
        image, label = d["image"].as_tensor(), d["label"].as_tensor()
        lesion = (label == LESION_LABEL).to(torch.uint8)
        center = largest_component_center(lesion[0]) or mask_center(label[0] > 0) or [s // 2 for s in label.shape[1:]]
        out = {"case_id": item["case_id"], "spacing_mm": float(self.preset.spacing_mm),
               "targets": case_targets(item["report"])}

        def crop(c, size):
            return (centred_crop(image, c, size, 0.0).as_tensor().to(torch.float16),
                    centred_crop(lesion, c, size, 0).as_tensor().to(torch.uint8))

        out["lesion_image"], out["lesion_mask"] = crop(center, self.plan.lesion_size)
        if self.plan.detect_size != self.plan.lesion_size:
            out["pos_image"], out["pos_mask"] = crop(center, self.plan.detect_size)
        rng = np.random.default_rng([self.plan.seed, int(hashlib.sha1(item["case_id"].encode()).hexdigest()[:8], 16)])
        # negatives are stored at the exact detect size (no jitter margin): a shifted crop
        # could reach the lesion; they are augmented by flips and intensity only
        negs = negative_centers(label[0].numpy(), self.plan.detect_crop, self.plan.negatives, rng)
        crops = [crop(c, self.plan.detect_crop) for c in negs]
        out["neg_image"] = torch.stack([c[0] for c in crops]) if crops else torch.zeros(0, dtype=torch.float16)
        out["neg_mask"] = torch.stack([c[1] for c in crops]) if crops else torch.zeros(0, dtype=torch.uint8)
        return out


def case_items(records) -> list[dict]:
    """CaseRecords -> the plain dicts PrepareCase reads (json-able, so the cache hash is stable)."""
    items = []
    for r in records:
        try:
            report = r.report()
        except Exception as exc:  # one bad case never stops the rest
            log.error("%s: unreadable report (%s); case skipped", r.report_path, exc)
            continue
        items.append({"case_id": r.case_id, "img": str(r.img), "label": str(r.label), "report": report})
    return items


def prepare_cases(records, preset: Preset, plan: RegionPlan, cache_dir: Path | None = None,
                  workers: int = 2, progress: bool = False) -> list[dict]:
    """Prepare every case once, in memory; with `cache_dir` also on disk (PersistentDataset).

    Bad cases are logged with their file and skipped.
    """
    items = case_items(records)
    transform = PrepareCase(preset, plan)
    if cache_dir is not None:
        folder = Path(cache_dir) / f"{preset.name}-{preset.spacing_mm:g}mm-{plan.key()}"
        folder.mkdir(parents=True, exist_ok=True)
        # key: SHA-256 of the item's sorted JSON (MONAI's json_hashing); the folder name holds the plan
        ds = PersistentDataset(items, transform=transform, cache_dir=folder, hash_func=json_hashing)
        get = ds.__getitem__
    else:
        get = lambda i: transform(items[i])  # noqa: E731

    def one(i):
        try:
            return get(i)
        except Exception as exc:
            log.error("%s: cannot prepare case (%s); skipped", items[i]["img"], str(exc).splitlines()[0][:300])
            return None

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(items), desc="prepare", unit="case")
    out = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for res in pool.map(one, range(len(items))):
            if res is not None:
                out.append(res)
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    return out


# ---------------------------------------------------------------- samples for training
def split_cases(case_ids: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic split by case id (independent of order and of other cases' presence)."""
    def u(cid: str) -> float:
        return int(hashlib.sha256(f"{seed}:{cid}".encode()).hexdigest()[:12], 16) / 16**12
    val = sorted(c for c in case_ids if u(c) < val_fraction)
    if val_fraction > 0 and not val and len(case_ids) > 1:
        val = [min(case_ids, key=u)]
    train = sorted(c for c in case_ids if c not in set(val))
    return train, val


def augmentations(size: int, seed: int, augment: bool, jitter: bool = False) -> Compose:
    """After the cache: a random crop within the region's jitter margin (`jitter`, else the
    centre crop), then flips and intensity changes (`augment`)."""
    keys = ["image", "seg"]
    crop = RandSpatialCropd(keys=keys, roi_size=size, random_size=False) if jitter \
        else CenterSpatialCropd(keys=keys, roi_size=size)
    if not augment:
        t = Compose([crop])
        t.set_random_state(seed=seed)
        return t
    t = Compose([
        crop,
        RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
    ])
    t.set_random_state(seed=seed)
    return t


class CropDataset(Dataset):
    """Crops of one size: lesion-centred (all tasks) and/or lesion-free (detect negatives).

    `entries` are (case index, kind, j): kind "lesion", "pos" (lesion-centred detect
    crop) or "neg" (the j-th negative region).
    """

    def __init__(self, cases: list[dict], entries: list[tuple[int, str, int]], size: int,
                 augment: bool, seed: int = 0, jitter: bool = False):
        self.cases, self.entries, self.size = cases, entries, size
        self.transform = augmentations(size, seed, augment, jitter)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        ci, kind, j = self.entries[i]
        case = self.cases[ci]
        if kind == "neg":
            image, mask, targets = case["neg_image"][j], case["neg_mask"][j], negative_targets()
        else:
            src = "lesion" if kind == "lesion" else "pos"
            image, mask, targets = case[f"{src}_image"], case[f"{src}_mask"], case["targets"]
        d = self.transform({"image": image.float(), "seg": mask.float()})
        if d["image"].shape[1:] != (self.size,) * 3:          # exact-size region (negatives): no shift
            d = {k: centred_crop(v, [s // 2 for s in v.shape[1:]], self.size, 0.0) for k, v in d.items()}
        return {"image": plain(d["image"]).float(), "seg": plain(d["seg"]).float(),
                "case_id": case["case_id"], "kind": kind, **targets,
                "detect": torch.tensor(targets["detect"], dtype=torch.float32)}


def build_datasets(cases: list[dict], preset: Preset, augment: bool, seed: int = 0,
                   jitter: bool = False) -> list[CropDataset]:
    """One dataset when lesion and detect crops share a size, else [lesion crops, detect crops].

    `jitter`: random crops within the regions' jitter margin (training); else centred."""
    lesion = [(i, "lesion", 0) for i in range(len(cases))]
    negs = [(i, "neg", j) for i, c in enumerate(cases) for j in range(len(c["neg_image"]))]
    if preset.crop_size == preset.detect_crop_size:
        return [CropDataset(cases, lesion + negs, preset.crop_size, augment, seed, jitter)]
    pos = [(i, "pos", 0) for i in range(len(cases))]
    return [CropDataset(cases, lesion, preset.crop_size, augment, seed, jitter),
            CropDataset(cases, pos + negs, preset.detect_crop_size, augment, seed + 1, jitter)]


def region_plan(preset: Preset, jitter: int, negatives: int, seed: int) -> RegionPlan:
    return RegionPlan(preset.crop_size + 2 * jitter, preset.detect_crop_size + 2 * jitter,
                      preset.detect_crop_size, negatives, seed)
