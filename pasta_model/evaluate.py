"""Evaluation of a checkpoint on a PASTA-Gen-layout dataset, with plain-float metrics.

Two levels: `crop_metrics` scores centred crops (fast; pretraining validates with it
every epoch) and `evaluate` scores whole volumes the way `predict` sees them:
sliding-window segmentation at the preset spacing (Dice, HD95), then the classification
heads on a crop centred on the lesion, plus detection on lesion and lesion-free crops.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch.utils.data import DataLoader

from synth.vocabulary import ATTRIBUTES, T_STAGES

from . import metrics as M
from .heads import REPORT_OUTPUTS, split_report_logits
from .losses import IGNORE_INDEX
from .network import PastaNet

log = logging.getLogger(__name__)


@torch.no_grad()
def crop_outputs(model: PastaNet, datasets, device, batch_size: int = 8, weights: dict | None = None) -> dict:
    """Run every crop of `datasets` through the model; collect predictions and targets as numpy."""
    from .pretrain import autocast, compute_losses, to_device

    model.eval()
    acc: dict[str, list] = {}
    losses: list[float] = []

    def add(k, v):
        acc.setdefault(k, []).append(v)

    for ds in datasets:
        for batch in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0):
            batch = to_device(batch, device)
            with autocast(device):
                out = model(batch["image"])
            out = {k: v.float() for k, v in out.items()}
            if weights is not None:
                losses.append(float(compute_losses(out, batch, weights)[0]))
            lesion = np.array([k == "lesion" for k in batch["kind"]])
            add("lesion", lesion)
            seg_pred = out["segment"].argmax(1).cpu().numpy().astype(bool)
            seg_true = batch["seg"][:, 0].cpu().numpy() > 0.5
            add("dice", np.array([M.dice(p, t) for p, t in zip(seg_pred, seg_true)]))
            add("detect_prob", torch.sigmoid(out["detect"]).cpu().numpy())
            add("detect_true", batch["detect"].cpu().numpy())
            for name, lg in split_report_logits(out["report"]).items():
                add(f"pred_{name}", lg.argmax(1).cpu().numpy())
                add(f"true_{name}", batch["report"][name].cpu().numpy())
            add("pred_stage", out["stage"].argmax(1).cpu().numpy())
            add("true_stage", batch["stage"].cpu().numpy())
            add("risk", out["survival"].reshape(-1).cpu().numpy())
            add("time", batch["time"].cpu().numpy())
            add("event", batch["event"].cpu().numpy())
            add("has_survival", batch["has_survival"].cpu().numpy())
    res = {k: np.concatenate(v) for k, v in acc.items()}
    res["loss"] = float(np.mean(losses)) if losses else float("nan")
    return res


def classification_metrics(res: dict, train_targets: dict | None = None) -> dict[str, float]:
    """Accuracy, macro-F1 and majority baseline per report attribute; stage; C-index; detect AUC."""
    out: dict[str, float] = {}
    for name in REPORT_OUTPUTS:
        t, p = res[f"true_{name}"], res[f"pred_{name}"]
        keep = t != IGNORE_INDEX
        out[f"acc_{name}"] = M.accuracy(p[keep], t[keep])
        out[f"f1_{name}"] = M.macro_f1(p[keep], t[keep])
        ref = None if train_targets is None else train_targets.get(name)
        out[f"majority_{name}"] = M.majority_baseline(t[keep], ref)
    t, p = res["true_stage"], res["pred_stage"]
    keep = t != IGNORE_INDEX
    out["stage_acc"] = M.accuracy(p[keep], t[keep])
    out["stage_f1"] = M.macro_f1(p[keep], t[keep], num_classes=len(T_STAGES))
    s = res["has_survival"] > 0
    out["c_index"] = M.c_index(res["risk"][s], res["time"][s], res["event"][s])
    out["detect_auc"] = M.auc(res["detect_prob"][:, 0], res["detect_true"][:, 0])
    return out


def crop_metrics(model: PastaNet, datasets, device, batch_size: int = 8, weights: dict | None = None) -> dict:
    """Crop-level metrics (validation during pretraining): loss, lesion-crop Dice, classification."""
    res = crop_outputs(model, datasets, device, batch_size, weights)
    out = {"loss": res["loss"], "dice": float(res["dice"][res["lesion"]].mean()) if res["lesion"].any() else math.nan}
    out.update(classification_metrics(res))
    return out


@torch.no_grad()
def segment_volume(model: PastaNet, image: torch.Tensor, device, overlap: float = 0.25,
                   sw_batch_size: int = 4) -> torch.Tensor:
    """Lesion probability [*S] of a preprocessed volume [1, *S] by sliding-window inference."""
    model.eval()
    roi = (model.preset.crop_size,) * 3
    x = image.as_tensor() if hasattr(image, "as_tensor") else image
    x = x[None].float().to(device)

    def seg(patch):
        return torch.softmax(model(patch, tasks=("segment",))["segment"].float(), dim=1)

    probs = sliding_window_inference(x, roi, sw_batch_size, seg, overlap=overlap, mode="gaussian",
                                     padding_mode="constant", cval=0.0)
    return probs[0, 1].cpu()


def evaluate(checkpoint: str | Path, data_dir: str | Path, *, device: str = "auto", case_ids=None,
             max_cases: int | None = None, progress: bool = False) -> dict:
    """Whole-volume Dice/HD95 (sliding window) plus classification/detection metrics on crops."""
    from synth.dataset import read_dataset

    from .checkpoint import load_checkpoint
    from .data import build_datasets, case_items, prepare_cases, region_plan
    from .pretrain import select_device
    from .transforms import LESION_LABEL, build_preprocess

    dev = select_device(device)
    model, meta = load_checkpoint(checkpoint, device=dev)
    preset = model.preset
    records = read_dataset(Path(data_dir))
    if case_ids is not None:
        wanted = set(case_ids)
        records = [r for r in records if r.case_id in wanted]
    if max_cases:
        records = records[:max_cases]
    if not records:
        raise ValueError(f"{data_dir}: no cases to evaluate")

    # whole-volume segmentation
    pre = build_preprocess(preset)
    dices, hds, per_case = [], [], []
    items = case_items(records)
    it = items
    if progress:
        from tqdm import tqdm
        it = tqdm(items, desc="evaluate", unit="case")
    for item in it:
        try:
            d = pre({"image": item["img"], "label": item["label"]})
        except Exception as exc:
            log.error("%s: cannot read (%s); case skipped", item["img"], str(exc).splitlines()[0][:300])
            continue
        prob = segment_volume(model, d["image"], dev)
        pred = (prob > 0.5).numpy()
        truth = (d["label"][0] == LESION_LABEL).numpy()
        dices.append(M.dice(pred, truth))
        hds.append(M.hd95(pred, truth, spacing=preset.spacing_mm))
        lesion = (item["report"].get("lesions") or [{}])[0]
        per_case.append({"case_id": item["case_id"], "lesion_type": item["report"].get("lesion_type"),
                         "density": lesion.get("density"), "lesion_voxels": int(truth.sum()),
                         "predicted_voxels": int(pred.sum()), "dice": dices[-1], "hd95_mm": hds[-1]})

    # classification heads on centred crops (no jitter), detection with lesion-free crops
    cases = prepare_cases(records, preset, region_plan(preset, 0, 1, 0), cache_dir=None, workers=2)
    res = crop_outputs(model, build_datasets(cases, preset, augment=False), dev)
    out = {
        "checkpoint": str(checkpoint), "data": str(data_dir), "preset": meta.preset,
        "cases": len(dices),
        "dice": M.nan_mean(dices), "dice_median": float(np.median(dices)) if dices else math.nan,
        "hd95_mm": M.nan_mean(hds),
        "crop_dice": float(res["dice"][res["lesion"]].mean()) if res["lesion"].any() else math.nan,
    }
    out.update(classification_metrics(res))
    out["attributes_beating_majority"] = [n for n in REPORT_OUTPUTS if out[f"acc_{n}"] > out[f"majority_{n}"]]
    out["per_case"] = per_case
    return out


def format_table(result: dict) -> str:
    """Human-readable summary of `evaluate`'s dict."""
    lines = [f"cases {result['cases']}  preset {result['preset']}",
             f"lesion Dice {result['dice']:.3f} (median {result['dice_median']:.3f})  HD95 {result['hd95_mm']:.1f} mm"
             f"  crop Dice {result['crop_dice']:.3f}",
             f"detect AUC {result['detect_auc']:.3f}  stage acc {result['stage_acc']:.3f}  C-index {result['c_index']:.3f}",
             f"{'attribute':<14}{'acc':>7}{'F1':>7}{'majority':>10}"]
    for name in REPORT_OUTPUTS:
        lines.append(f"{name:<14}{result[f'acc_{name}']:>7.3f}{result[f'f1_{name}']:>7.3f}"
                     f"{result[f'majority_{name}']:>10.3f}")
    return "\n".join(lines)


__all__ = ["evaluate", "crop_metrics", "segment_volume", "format_table", "ATTRIBUTES"]
