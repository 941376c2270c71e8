"""Evaluation of a checkpoint on a PASTA-Gen-layout dataset, with plain-float metrics.

Two levels: `crop_metrics` scores centred crops (fast; pretraining validates with it
every epoch) and `evaluate` scores whole volumes the way `predict` sees them:
sliding-window segmentation at the preset spacing (Dice, HD95), then the classification
heads on a crop centred on the lesion, plus detection on lesion and lesion-free crops.
`evaluate` explains its figures: lesion Dice by lesion type and by conspicuity band (a model
cannot find what the image does not show), detection AUC per host organ, each attribute beside
its majority baseline, and organ Dice when the model has an organ output.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch.utils.data import DataLoader

from synth.conspicuity import BANDS, band
from synth.totalseg import TOTALSEG_HOSTS
from synth.vocabulary import ATTRIBUTES, T_STAGES

from . import metrics as M
from .heads import DETECT_OUTPUTS, REPORT_OUTPUTS, split_report_logits
from .losses import IGNORE_INDEX
from .network import PastaNet

log = logging.getLogger(__name__)
VISIBLE = BANDS[-1][0]      # conspicuity from which a lesion is plainly visible (2)
NO_ORGAN_OUTPUT = "the model has no organ output"


@torch.no_grad()
def crop_outputs(model: PastaNet, datasets, device, batch_size: int = 8, weights: dict | None = None) -> dict:
    """Run every crop of `datasets` through the model; collect predictions and targets as numpy."""
    from .device import autocast
    from .pretrain import compute_losses, to_device

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


def _sliding_softmax(model: PastaNet, image: torch.Tensor, device, logits, overlap: float,
                     sw_batch_size: int) -> torch.Tensor:
    """Softmax [C, *S] of `logits(patch)` over a preprocessed volume [1, *S], by sliding window."""
    model.eval()
    roi = (model.preset.crop_size,) * 3
    x = image.as_tensor() if hasattr(image, "as_tensor") else image
    x = x[None].float().to(device)
    probs = sliding_window_inference(x, roi, sw_batch_size, lambda p: torch.softmax(logits(p).float(), dim=1),
                                     overlap=overlap, mode="gaussian", padding_mode="constant", cval=0.0)
    return probs[0].cpu()


@torch.no_grad()
def segment_volume(model: PastaNet, image: torch.Tensor, device, overlap: float = 0.25,
                   sw_batch_size: int = 4) -> torch.Tensor:
    """Lesion probability [*S] of a preprocessed volume [1, *S] by sliding-window inference."""
    def seg(patch):
        return model(patch, tasks=("segment",))["segment"]
    return _sliding_softmax(model, image, device, seg, overlap, sw_batch_size)[1]


@torch.no_grad()
def organ_volume(model, image: torch.Tensor, device, overlap: float = 0.25, sw_batch_size: int = 4) -> torch.Tensor:
    """Organ labels [*S] (0 background, k = `model.organ_names[k - 1]`) from `model.organ_logits`."""
    return _sliding_softmax(model, image, device, model.organ_logits, overlap, sw_batch_size).argmax(0)


def has_organ_output(model) -> bool:
    return hasattr(model, "organ_logits") and len(getattr(model, "organ_names", ()) or ()) > 0


def organ_groups(names) -> dict[str, tuple[int, ...]]:
    """TotalSegmentator ids of each organ the model segments, in its output order."""
    return {name: TOTALSEG_HOSTS.get(name, ()) for name in names}


def case_conspicuity(item: dict) -> float | None:
    """Conspicuity of the case's lesion on its original img / label arrays (None without a lesion)."""
    import nibabel as nib

    from synth.conspicuity import measure

    image = np.asarray(nib.load(item["img"]).dataobj, dtype=np.float32)
    label = np.asarray(nib.load(item["label"]).dataobj).astype(np.uint8)
    c = measure(image, label)
    return None if c is None else float(c.conspicuity)


def load_case(item: dict, preset, organs: bool) -> dict | None:
    """The case through `build_preprocess` (total.nii.gz too, nearest neighbour, when `organs`); None if unreadable."""
    from .transforms import build_preprocess

    keys = ("label", "total") if organs else ("label",)
    data = {"image": item["img"], "label": item["label"]}
    if organs:
        data["total"] = str(Path(item["img"]).with_name("total.nii.gz"))
    try:
        d = build_preprocess(preset, mask_keys=keys)(data)
        d["conspicuity"] = case_conspicuity(item)
    except Exception as exc:
        log.error("%s: cannot read (%s); case skipped", item["img"], str(exc).splitlines()[0][:300])
        return None
    return d


def score_case(model, item: dict, device) -> dict | None:
    """One case's whole-volume row: lesion Dice / HD95 at the preset spacing, conspicuity and its band,
    and per-organ Dice when the model has an organ output and the case a total.nii.gz."""
    from .transforms import LESION_LABEL

    organs = has_organ_output(model) and Path(item["img"]).with_name("total.nii.gz").exists()
    d = load_case(item, model.preset, organs)
    if d is None:
        return None
    pred = (segment_volume(model, d["image"], device) > 0.5).numpy()
    truth = (d["label"][0] == LESION_LABEL).numpy()
    lesion = (item["report"].get("lesions") or [{}])[0]
    c = d["conspicuity"]
    row = {"case_id": item["case_id"], "lesion_type": item["report"].get("lesion_type"),
           "density": lesion.get("density"), "lesion_voxels": int(truth.sum()),
           "predicted_voxels": int(pred.sum()), "dice": M.dice(pred, truth),
           "hd95_mm": M.hd95(pred, truth, spacing=model.preset.spacing_mm),
           "conspicuity": c, "band": None if c is None else band(c)}
    if organs:
        labels = organ_volume(model, d["image"], device).numpy()
        row["organ_dice"] = M.organ_dice(labels, d["total"][0].numpy(), organ_groups(model.organ_names))
    return row


def _dice_stats(rows: list[dict]) -> dict:
    return {"dice": M.nan_mean([r["dice"] for r in rows]), "cases": len(rows)}


def _by(rows: list[dict], key, order=None) -> dict[str, dict]:
    groups = sorted({key(r) for r in rows}, key=lambda g: (order.index(g) if order and g in order else 0, str(g)))
    return {str(g): _dice_stats([r for r in rows if key(r) == g]) for g in groups}


def lesion_dice_summary(per_case: list[dict]) -> dict:
    """Whole-volume lesion Dice over the cases with a lesion: overall, by lesion type, by conspicuity
    band, and all of it again on the visible lesions (conspicuity >= 2) only."""
    rows = [r for r in per_case if r.get("conspicuity") is not None]
    visible = [r for r in rows if r["conspicuity"] >= VISIBLE]
    return {**_dice_stats(rows),
            "by_type": _by(rows, lambda r: r["lesion_type"]),
            "by_band": _by(rows, lambda r: band(r["conspicuity"]), order=[b[2] for b in BANDS]),
            "visible": {**_dice_stats(visible), "by_type": _by(visible, lambda r: r["lesion_type"])}}


def organ_dice_summary(per_case: list[dict]) -> dict | None:
    """Mean Dice per organ over the cases that hold it, and their mean; None when no case was scored."""
    scored = [r["organ_dice"] for r in per_case if r.get("organ_dice") is not None]
    if not scored:
        return None
    organs = list(dict.fromkeys(k for d in scored for k in d))
    by_organ = {o: {"dice": M.nan_mean([d[o] for d in scored if o in d]), "cases": sum(o in d for d in scored)}
                for o in organs}
    return {"dice": M.nan_mean([v["dice"] for v in by_organ.values()]), "cases": len(scored), "by_organ": by_organ}


def detect_auc_by_organ(res: dict) -> dict[str, float]:
    """Detection AUC of each host-organ output, over the organs with both positive and negative crops."""
    out = {}
    for k, organ in enumerate(DETECT_OUTPUTS[1:], start=1):
        y = res["detect_true"][:, k]
        if 0 < y.sum() < len(y):
            out[organ] = M.auc(res["detect_prob"][:, k], y)
    return out


def attribute_table(metrics: dict) -> dict[str, dict]:
    """Each report attribute's accuracy and F1 beside its majority-class baseline."""
    return {n: {"acc": metrics[f"acc_{n}"], "f1": metrics[f"f1_{n}"], "majority": metrics[f"majority_{n}"],
                "beats_majority": bool(metrics[f"acc_{n}"] > metrics[f"majority_{n}"])} for n in REPORT_OUTPUTS}


def _records(data_dir, case_ids, max_cases):
    from synth.dataset import read_dataset

    records = read_dataset(Path(data_dir))
    if case_ids is not None:
        wanted = set(case_ids)
        records = [r for r in records if r.case_id in wanted]
    if max_cases:
        records = records[:max_cases]
    if not records:
        raise ValueError(f"{data_dir}: no cases to evaluate")
    return records


def evaluate(checkpoint: str | Path, data_dir: str | Path, *, device: str = "auto", case_ids=None,
             max_cases: int | None = None, progress: bool = False) -> dict:
    """Whole-volume Dice/HD95 (sliding window) plus classification/detection metrics on crops."""
    from .checkpoint import load_checkpoint
    from .data import build_datasets, case_items, prepare_cases, region_plan
    from .device import select_device

    dev = select_device(device)
    model, meta = load_checkpoint(checkpoint, device=dev)
    records = _records(data_dir, case_ids, max_cases)
    items = case_items(records)
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc="evaluate", unit="case")
    per_case = [row for row in (score_case(model, item, dev) for item in items) if row is not None]
    dices = [r["dice"] for r in per_case]

    # classification heads on centred crops (no jitter), detection with lesion-free crops
    cases = prepare_cases(records, model.preset, region_plan(model.preset, 0, 1, 0), cache_dir=None, workers=2)
    res = crop_outputs(model, build_datasets(cases, model.preset, augment=False), dev)
    out = {
        "checkpoint": str(checkpoint), "data": str(data_dir), "preset": meta.preset,
        "cases": len(dices),
        "dice": M.nan_mean(dices), "dice_median": float(np.median(dices)) if dices else math.nan,
        "hd95_mm": M.nan_mean([r["hd95_mm"] for r in per_case]),
        "crop_dice": float(res["dice"][res["lesion"]].mean()) if res["lesion"].any() else math.nan,
        "lesion_dice": lesion_dice_summary(per_case),
    }
    out.update(classification_metrics(res))
    out["detect_auc_by_organ"] = detect_auc_by_organ(res)
    out["attributes"] = attribute_table(out)
    out["attributes_beating_majority"] = [n for n, a in out["attributes"].items() if a["beats_majority"]]
    out["organ_dice"] = organ_dice_summary(per_case)
    if out["organ_dice"] is None:
        out["organ_dice_note"] = NO_ORGAN_OUTPUT if not has_organ_output(model) else "no case has a total.nii.gz"
        log.info("organ Dice absent: %s", out["organ_dice_note"])
    out["per_case"] = per_case
    return out


def _fmt_groups(title: str, groups: dict[str, dict]) -> list[str]:
    lines = [f"{title:<30}{'Dice':>7}{'cases':>7}"]
    lines += [f"  {name:<28}{g['dice']:>7.3f}{g['cases']:>7d}" for name, g in groups.items()]
    return lines


def _fmt_lesion_dice(ld: dict | None) -> list[str]:
    if not ld:
        return []
    vis = ld["visible"]
    return (_fmt_groups("lesion Dice by type", ld["by_type"])
            + _fmt_groups("lesion Dice by conspicuity", ld["by_band"])
            + [f"lesion Dice {ld['dice']:.3f} on {ld['cases']} cases with a lesion, "
               f"{vis['dice']:.3f} on the {vis['cases']} of conspicuity >= {VISIBLE:g}"])


def _fmt_detect(by_organ: dict | None) -> list[str]:
    if by_organ is None:
        return []
    if not by_organ:
        return ["detect AUC by organ: no organ with both lesion and lesion-free crops"]
    return ["detect AUC by organ  " + "  ".join(f"{o} {a:.3f}" for o, a in by_organ.items())]


def _fmt_organs(result: dict) -> list[str]:
    if "organ_dice" not in result:       # a result from before organ Dice
        return []
    od = result["organ_dice"]
    if od is None:
        return [f"organ Dice: absent ({result.get('organ_dice_note', NO_ORGAN_OUTPUT)})"]
    return _fmt_groups(f"organ Dice (mean {od['dice']:.3f})", od["by_organ"])


def _fmt_attributes(result: dict) -> list[str]:
    lines = [f"{'attribute':<14}{'acc':>7}{'F1':>7}{'majority':>10}{'beats':>7}"]
    for name in REPORT_OUTPUTS:
        acc, maj = result[f"acc_{name}"], result[f"majority_{name}"]
        lines.append(f"{name:<14}{acc:>7.3f}{result[f'f1_{name}']:>7.3f}{maj:>10.3f}"
                     f"{'yes' if acc > maj else 'no':>7}")
    return lines


def format_table(result: dict) -> str:
    """Human-readable summary of `evaluate`'s dict."""
    lines = [f"cases {result['cases']}  preset {result['preset']}",
             f"lesion Dice {result['dice']:.3f} (median {result['dice_median']:.3f})  HD95 {result['hd95_mm']:.1f} mm"
             f"  crop Dice {result['crop_dice']:.3f}",
             f"detect AUC {result['detect_auc']:.3f}  stage acc {result['stage_acc']:.3f}"
             f"  C-index {result['c_index']:.3f}"]
    lines += _fmt_lesion_dice(result.get("lesion_dice")) + _fmt_detect(result.get("detect_auc_by_organ"))
    lines += _fmt_organs(result) + _fmt_attributes(result)
    return "\n".join(lines)


__all__ = ["evaluate", "crop_metrics", "segment_volume", "organ_volume", "score_case", "lesion_dice_summary",
           "organ_dice_summary", "detect_auc_by_organ", "attribute_table", "format_table", "ATTRIBUTES"]
