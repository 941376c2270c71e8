"""Task heads on frozen-backbone features: regions, targets, losses and metrics.

Shared by the hospital agent (DP fine-tuning, federated evaluation), the coordinator
(global evaluation) and the simulation's baselines, so that every party trains and
scores a head in exactly the same way. Labels arrive as plain dicts with the column
names of a site's labels CSV (docs/hospital-data.md): tumor_present, organ, t_stage,
survival_months, survival_event, the five report attributes and lesion_type.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import Tensor, nn

from synth.vocabulary import ATTRIBUTES, T_STAGES

from . import metrics as M
from .heads import DETECT_OUTPUTS, REPORT_OUTPUTS, split_report_logits
from .losses import IGNORE_INDEX
from .network import PastaNet
from .targets import detect_vector, report_indices, stage_index
from .transforms import AIR_VALUE, build_preprocess, centred_crop, largest_component_center

PREPROCESS_VERSION = "pasta-fed-features-3"   # bump when regions or preprocessing change (cache key)
LABEL_KEYS = ("tumor_present", "organ", "t_stage", "survival_months", "survival_event",
              *ATTRIBUTES, "lesion_type")
# The metric each task is judged by (the demo and reports lead with it).
# Every metric name `evaluate_outputs` may produce (a site's outbox allow-lists exactly these).
METRIC_NAMES = frozenset({"eval-loss", "dice", "auc", "accuracy", "macro-f1", "c-index",
                          *(f"accuracy-{name}" for name in REPORT_OUTPUTS)})
PRIMARY_METRIC = {"segment": "dice", "detect": "auc", "report": "accuracy", "stage": "accuracy",
                  "survival": "c-index"}


# ------------------------------------------------------------------ regions -> features
def preprocess_region(preset, image, lesion_mask=None, center: Sequence[int] | None = None
                      ) -> tuple[Tensor, Tensor | None]:
    """HU MetaTensor [1, X, Y, Z] (+ lesion mask) -> the crop the heads see.

    The crop is centred on the lesion when a mask is given, else on `center`, else on
    the volume centre: a site without masks still gets a region for its labels.
    """
    keys = ["image"] + (["label"] if lesion_mask is not None else [])
    d = build_preprocess(preset, mask_keys=keys[1:], load=False)(
        {"image": image, **({"label": lesion_mask} if lesion_mask is not None else {})})
    img = d["image"].as_tensor()
    mask = (d["label"].as_tensor() > 0).to(torch.uint8) if lesion_mask is not None else None
    # the primary (largest) lesion component, as in pretraining and prediction
    c = (largest_component_center(mask[0]) if mask is not None else None) or center or [s // 2 for s in img.shape[1:]]
    crop = centred_crop(img, c, preset.crop_size, AIR_VALUE).as_tensor()
    mcrop = centred_crop(mask, c, preset.crop_size, 0).as_tensor()[0] if mask is not None else None
    return crop, mcrop


@torch.no_grad()
@torch.no_grad()
def encode_region(model: PastaNet, crop: Tensor, decode: bool) -> tuple[Tensor, Tensor | None]:
    """Pooled [C_deep] and float16 decoder [C0, S, S, S] features of one crop (eval mode, no graph)."""
    model.eval()
    dev = next(model.parameters()).device
    feats = model.encode(crop[None].to(dev), decode=decode)
    return feats.pooled[0].cpu(), (feats.decoder[0].to(torch.float16).cpu() if decode else None)


# ------------------------------------------------------------------ labels -> targets
def usable_for(task: str, labels: Mapping[str, Any], has_mask: bool) -> bool:
    if task == "segment":
        return has_mask
    if task == "detect":
        return labels.get("tumor_present") is not None
    if task == "report":
        return any(labels.get(k) is not None for k in (*ATTRIBUTES, "lesion_type"))
    if task == "stage":
        return labels.get("t_stage") in T_STAGES
    if task == "survival":
        return labels.get("survival_months") is not None and labels.get("survival_event") is not None
    raise ValueError(f"unknown task {task!r}")


def encode_targets(task: str, labels: Sequence[Mapping[str, Any]], masks: Sequence[Tensor] | None = None
                   ) -> dict[str, Tensor]:
    """Rows of labels -> the target tensors `head_loss(task)` and `evaluate_head` read."""
    if task == "segment":
        if masks is None:
            raise ValueError("segment targets need lesion masks")
        return {"mask": torch.stack([m.long() for m in masks])}
    if task == "detect":
        pairs = [detect_vector(bool(lab.get("tumor_present")), lab.get("organ")) for lab in labels]
        return {"detect": torch.tensor([t for t, _ in pairs]).reshape(len(labels), len(DETECT_OUTPUTS)),
                "weight": torch.tensor([w for _, w in pairs]).reshape(len(labels), len(DETECT_OUTPUTS))}
    if task == "report":
        rows = [report_indices(lab) for lab in labels]
        return {name: torch.tensor([row[name] for row in rows], dtype=torch.long) for name in REPORT_OUTPUTS}
    if task == "stage":
        return {"stage": torch.tensor([stage_index(lab) for lab in labels], dtype=torch.long)}
    if task == "survival":
        return {"time": torch.tensor([float(lab.get("survival_months") or 0.0) for lab in labels]),
                "event": torch.tensor([float(bool(lab.get("survival_event"))) for lab in labels])}
    raise ValueError(f"unknown task {task!r}")


# ------------------------------------------------------------------ losses (per-sample decomposable)
_dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)


def _masked_ce(logits: Tensor, target: Tensor) -> Tensor:
    # mean over the batch of per-sample terms (ignored rows contribute 0), so that
    # per-sample clipping bounds each patient's influence
    per = F.cross_entropy(logits, target.clamp_min(0), reduction="none") * (target != IGNORE_INDEX)
    return per.mean() if per.numel() else logits.sum() * 0.0


def head_loss(task: str) -> Callable[[Tensor, Mapping[str, Tensor]], Tensor]:
    """The fine-tuning loss: a mean of per-sample terms, as DP-SGD's clipping requires.

    Survival uses the exponential proportional-hazards likelihood (per patient:
    exp(r) * t - event * r) instead of Cox's partial likelihood, whose terms couple the
    patients of a batch and so would break per-sample clipping.
    """
    if task == "segment":
        return lambda out, y: _dice_ce(out, y["mask"][:, None])
    if task == "detect":
        return lambda out, y: (F.binary_cross_entropy_with_logits(out, y["detect"], reduction="none")
                               * y["weight"]).sum(1).mean()

    if task == "report":
        def report(out: Tensor, y: Mapping[str, Tensor]) -> Tensor:
            parts = split_report_logits(out)
            return sum(_masked_ce(parts[name], y[name]) for name in REPORT_OUTPUTS)
        return report
    if task == "stage":
        return lambda out, y: _masked_ce(out, y["stage"])
    if task == "survival":
        def survival(out: Tensor, y: Mapping[str, Tensor]) -> Tensor:
            r = out[:, 0].clamp(-10, 10)
            scale = 60.0   # months: keeps exp(r) * t in a friendly range
            return (torch.exp(r) * y["time"] / scale - y["event"] * r).mean()
        return survival
    raise ValueError(f"unknown task {task!r}")


# ------------------------------------------------------------------ what DP fine-tuning updates
def output_layer_only(head: nn.Module) -> nn.Module:
    """Freeze all but the head's output layer (in place) and return the head.

    DP-SGD's noise grows with the square root of the number of trained parameters while
    each patient's signal is clipped to a fixed norm; training only the output layer
    of the (pretrained) head, as PASTA's fine-tuning re-learns its output layers, cuts
    the noise about 3x for `tiny` and 10x for `paper` at the same privacy cost.
    """
    layers = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv3d))]
    for p in head.parameters():
        p.requires_grad_(False)
    for p in layers[-1].parameters():
        p.requires_grad_(True)
    return head


# ------------------------------------------------------------------ metrics
@torch.no_grad()
def predict_head(head: nn.Module, inputs: Tensor, batch_size: int = 16) -> Tensor:
    head.eval()
    dev = next(head.parameters()).device
    outs = [head(inputs[i:i + batch_size].to(dev).float()).cpu() for i in range(0, len(inputs), batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0)


def evaluate_outputs(task: str, out: Tensor, y: Mapping[str, Tensor]) -> dict[str, float]:
    """Aggregate metrics of one set (plain floats; NaN-free keys only)."""
    res: dict[str, float] = {"eval-loss": float(head_loss(task)(out, y))}
    if task == "segment":
        pred = out.argmax(1)
        res["dice"] = M.nan_mean([M.dice(p, t) for p, t in zip(pred, y["mask"])])
    elif task == "detect":
        res["auc"] = M.auc(torch.sigmoid(out[:, 0]), y["detect"][:, 0])
        res["accuracy"] = M.accuracy((out[:, 0] > 0).long(), y["detect"][:, 0].long())
    elif task == "report":
        parts = split_report_logits(out)
        accs = []
        for name in REPORT_OUTPUTS:
            keep = y[name] != IGNORE_INDEX
            if keep.any():
                acc = M.accuracy(parts[name][keep].argmax(1), y[name][keep])
                res[f"accuracy-{name}"] = acc
                if name != "lesion_type":
                    accs.append(acc)
        res["accuracy"] = float(np.mean(accs)) if accs else float("nan")
    elif task == "stage":
        keep = y["stage"] != IGNORE_INDEX
        res["accuracy"] = M.accuracy(out[keep].argmax(1), y["stage"][keep])
        res["macro-f1"] = M.macro_f1(out[keep].argmax(1), y["stage"][keep], num_classes=len(T_STAGES))
    elif task == "survival":
        res["c-index"] = M.c_index(out[:, 0], y["time"], y["event"])
    return {k: float(v) for k, v in res.items() if v is not None and math.isfinite(float(v))}


def evaluate_head(task: str, head: nn.Module, inputs: Tensor, targets: Mapping[str, Tensor]) -> dict[str, float]:
    return evaluate_outputs(task, predict_head(head, inputs), targets)
