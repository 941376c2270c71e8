"""Evaluation metrics returning plain floats (NaN where undefined, never an exception).

Segmentation and AUC come from MONAI; accuracy, macro-F1 and Harrell's C-index are
small pure functions (numpy) so they can be checked against brute force.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_roc_auc


def _as_mask(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)).bool()
    return t[None, None].float()                                   # [1, 1, *S]


def dice(pred, target) -> float:
    """Dice of two binary masks; 1.0 when both are empty, 0.0 when only one is."""
    p, t = _as_mask(pred), _as_mask(target)
    if t.sum() == 0:
        return 1.0 if p.sum() == 0 else 0.0
    return float(compute_dice(p, t, include_background=True, ignore_empty=False).item())


def organ_dice(pred_labels, total_labels, groups: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Dice per organ of an integer map `pred_labels` (0 background, k the k-th organ of `groups`)
    against `total_labels`, where an organ is any of its `groups[organ]` values (for TotalSegmentator
    ids: `synth.totalseg.TOTALSEG_HOSTS`). Organs absent from the truth are left out (Dice undefined)."""
    n = len(groups) + 1
    pred = torch.as_tensor(np.asarray(pred_labels)).long()
    if pred.numel() and (pred.min() < 0 or pred.max() >= n):
        raise ValueError(f"organ labels must lie in 0..{n - 1}, got {int(pred.min())}..{int(pred.max())}")
    total = np.asarray(total_labels)
    truth = np.zeros(total.shape, dtype=np.int64)
    for k, ids in enumerate(groups.values(), start=1):
        truth[np.isin(total, list(ids))] = k

    def one_hot(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(x, n).movedim(-1, 0)[None].float()   # [1, n, *S]

    d = compute_dice(one_hot(pred), one_hot(torch.from_numpy(truth)), include_background=False, ignore_empty=True)[0]
    return {name: float(v) for name, v in zip(groups, d) if not torch.isnan(v)}


def hd95(pred, target, spacing: Sequence[float] | float | None = None) -> float:
    """95th-percentile Hausdorff distance (mm when `spacing` is given); NaN if either mask is empty."""
    p, t = _as_mask(pred), _as_mask(target)
    if p.sum() == 0 or t.sum() == 0:
        return float("nan")
    if spacing is None:
        sp = None
    elif np.isscalar(spacing):
        sp = [float(spacing)] * (p.ndim - 2)
    else:
        sp = [float(s) for s in spacing]
    return float(compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=sp).item())


def auc(scores, labels) -> float:
    """ROC AUC (MONAI); NaN when only one class is present."""
    y = np.asarray(labels).astype(np.float32).reshape(-1)
    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    if len(y) == 0 or y.min() == y.max():
        return float("nan")
    return float(compute_roc_auc(torch.from_numpy(s), torch.from_numpy(y)))


def accuracy(pred, target) -> float:
    p, t = np.asarray(pred).reshape(-1), np.asarray(target).reshape(-1)
    return float((p == t).mean()) if len(t) else float("nan")


def macro_f1(pred, target, num_classes: int | None = None) -> float:
    """Unweighted mean of per-class F1 over the classes present in target or prediction."""
    p, t = np.asarray(pred).reshape(-1), np.asarray(target).reshape(-1)
    if len(t) == 0:
        return float("nan")
    classes = np.union1d(np.unique(t), np.unique(p)) if num_classes is None else np.arange(num_classes)
    f1s = []
    for c in classes:
        tp = np.sum((p == c) & (t == c))
        fp = np.sum((p == c) & (t != c))
        fn = np.sum((p != c) & (t == c))
        if tp + fp + fn == 0:
            continue                                              # class absent everywhere
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else float("nan")


def majority_baseline(target, train_target=None) -> float:
    """Accuracy of always predicting the most frequent class (of `train_target` if given)."""
    t = np.asarray(target).reshape(-1)
    ref = t if train_target is None else np.asarray(train_target).reshape(-1)
    if len(t) == 0 or len(ref) == 0:
        return float("nan")
    vals, counts = np.unique(ref, return_counts=True)
    return float((t == vals[np.argmax(counts)]).mean())


def c_index(risk, time, event) -> float:
    """Harrell's C: among pairs with t_i < t_j and event_i, the share where risk_i > risk_j (ties 0.5)."""
    r = np.asarray(risk, dtype=np.float64).reshape(-1)
    t = np.asarray(time, dtype=np.float64).reshape(-1)
    e = np.asarray(event).astype(bool).reshape(-1)
    comparable = (t[:, None] < t[None, :]) & e[:, None]
    n = comparable.sum()
    if n == 0:
        return float("nan")
    conc = (r[:, None] > r[None, :]) & comparable
    ties = (r[:, None] == r[None, :]) & comparable
    return float((conc.sum() + 0.5 * ties.sum()) / n)


def nan_mean(values) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")
