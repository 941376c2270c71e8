"""Differentially private evaluation: Gaussian noise on the counts behind each metric.

An evaluation reply is a counting query over the site's validation patients (a crafted
head turns accuracy into a class count), so it is released like any other patient
statistic: each metric is computed from a small table of counts to which one patient
adds at most 1 in one cell (`count_tables`), Gaussian noise of standard deviation
`noise_multiplier * sensitivity` is added to every cell, where `sensitivity` is the L2
norm of one patient's contribution to all tables together, and the metrics are computed
from the noisy tables (post-processing, free). One evaluation is therefore one Gaussian
mechanism with that noise multiplier, which the ledger charges as one step at sample
rate 1 (Opacus' RDP of the Gaussian mechanism).

Which counts: accuracy <- (correct, wrong); stage <- its confusion matrix (accuracy and
macro-F1); detection <- a histogram of scores by true class (AUC and accuracy); dice <-
(sum of per-patient Dice in [0, 1], patients). `num-examples` is the largest noisy
total. Pairwise statistics (c-index) and the unbounded eval loss have no such table:
they are not released.
"""
from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from torch import Tensor

SCORE_BINS = 10


def released_metric_names() -> frozenset[str]:
    """Every data metric a DP evaluation can release (the ClientApp's allow-list has no others)."""
    from pasta_model.finetune import REPORT_OUTPUTS
    return frozenset({"num-examples", "accuracy", "macro-f1", "auc", "dice",
                      *(f"accuracy-{name}" for name in REPORT_OUTPUTS)})


@dataclass(frozen=True)
class CountTable:
    """Exact counts behind one or more metrics; one patient adds at most `bound` (L2) to it."""
    counts: np.ndarray
    patients: int        # patients counted in this table (min_cases is checked on this)
    bound: float = 1.0


def _correct_wrong(pred: Tensor, target: Tensor) -> CountTable:
    correct = int((pred == target).sum())
    return CountTable(np.array([correct, len(target) - correct], dtype=float), len(target))


def count_tables(task: str, out: Tensor, y: Mapping[str, Tensor]) -> dict[str, CountTable]:
    """The exact count tables of a task's evaluation, keyed by the metric they serve."""
    from pasta_model import metrics as M
    from pasta_model.finetune import REPORT_OUTPUTS, T_STAGES, split_report_logits
    from pasta_model.losses import IGNORE_INDEX

    if task == "report":
        parts = split_report_logits(out)
        tables = {}
        for name in REPORT_OUTPUTS:
            keep = y[name] != IGNORE_INDEX
            tables[f"accuracy-{name}"] = _correct_wrong(parts[name][keep].argmax(1), y[name][keep])
        return tables
    if task == "stage":
        keep = y["stage"] != IGNORE_INDEX
        k = len(T_STAGES)
        conf = np.zeros((k, k))
        np.add.at(conf, (y["stage"][keep].numpy(), out[keep].argmax(1).numpy()), 1.0)
        return {"stage": CountTable(conf, int(keep.sum()))}
    if task == "detect":
        score = 1.0 / (1.0 + np.exp(-out[:, 0].double().numpy()))
        bins = np.minimum((score * SCORE_BINS).astype(int), SCORE_BINS - 1)
        hist = np.zeros((2, SCORE_BINS))
        np.add.at(hist, (y["detect"][:, 0].long().numpy(), bins), 1.0)
        return {"detect": CountTable(hist, len(bins))}
    if task == "segment":
        pred = out.argmax(1)
        dice = [min(1.0, max(0.0, M.dice(p, t))) for p, t in zip(pred, y["mask"])]
        return {"dice": CountTable(np.array([sum(dice), len(dice)]), len(dice), bound=math.sqrt(2.0))}
    if task == "survival":
        return {"patients": CountTable(np.array([float(len(out))]), len(out))}
    raise ValueError(f"unknown task {task!r}")


def sensitivity(tables: Mapping[str, CountTable]) -> float:
    """L2 norm of one patient's largest contribution to all tables at once."""
    return math.sqrt(sum(t.bound ** 2 for t in tables.values()))


def add_noise(tables: Mapping[str, CountTable], noise_multiplier: float,
              rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Every cell plus N(0, (noise_multiplier * sensitivity)^2), from a fresh OS-seeded generator."""
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    std = float(noise_multiplier) * sensitivity(tables)
    return {name: t.counts + rng.normal(0.0, std, t.counts.shape) for name, t in tables.items()}


def _ratio(num: float, den: float) -> float:
    return float(min(1.0, max(0.0, num / den))) if den > 0 else 0.0


def _accuracy(cells: np.ndarray) -> float:
    correct, wrong = np.maximum(cells, 0.0)
    return _ratio(correct, correct + wrong)


def _macro_f1(conf: np.ndarray) -> float:
    conf = np.maximum(conf, 0.0)
    f1 = []
    for c in range(conf.shape[0]):
        tp, fp, fn = conf[c, c], conf[:, c].sum() - conf[c, c], conf[c, :].sum() - conf[c, c]
        f1.append(_ratio(2 * tp, 2 * tp + fp + fn))
    return float(np.mean(f1))


def _auc(hist: np.ndarray) -> float:
    """ROC AUC of binned scores (ties within a bin count one half)."""
    neg, pos = np.maximum(hist, 0.0)
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return _ratio(float((pos * (below + 0.5 * neg)).sum()), float(pos.sum() * neg.sum()))


def metrics_from_tables(task: str, noisy: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The released metrics, computed from noisy tables only."""
    out: dict[str, float] = {}
    if task == "report":
        for name, cells in noisy.items():
            out[name] = _accuracy(cells)
        attributes = [v for k, v in out.items() if k != "accuracy-lesion_type"]
        if attributes:
            out["accuracy"] = float(np.mean(attributes))
    elif task == "stage":
        conf = noisy["stage"]
        out["accuracy"] = _ratio(float(np.maximum(np.diag(conf), 0).sum()), float(np.maximum(conf, 0).sum()))
        out["macro-f1"] = _macro_f1(conf)
    elif task == "detect":
        hist = noisy["detect"]
        half = SCORE_BINS // 2
        hits = np.maximum(hist[0, :half], 0).sum() + np.maximum(hist[1, half:], 0).sum()
        out["auc"] = _auc(hist)
        out["accuracy"] = _ratio(float(hits), float(np.maximum(hist, 0).sum()))
    elif task == "segment":
        total, count = noisy["dice"]
        out["dice"] = _ratio(float(total), float(count))
    return out


def noisy_patients(tables: Mapping[str, CountTable], noisy: Mapping[str, np.ndarray]) -> float:
    """`num-examples`: the largest noisy table total (at least 1, so weights stay positive)."""
    totals = [float(noisy[name].sum()) if name != "dice" else float(noisy[name][1]) for name in tables]
    return max(1.0, max(totals))


@dataclass
class DPEvaluation:
    metrics: dict[str, float]          # what may leave (noisy), num-examples included
    cases: dict[str, int]              # exact patients behind each metric (stays at the site)
    withheld: dict[str, str]           # metric -> why it was not released (audited, not sent)


def _cases(task: str, metric: str, usable: Mapping[str, CountTable]) -> int:
    """Exact patients behind a released metric: its own table's (report's mean: its smallest)."""
    if task == "report" and metric == "accuracy":
        return min(t.patients for n, t in usable.items() if n != "accuracy-lesion_type")
    table = {"stage": "stage", "detect": "detect", "segment": "dice"}.get(task, metric)
    return usable[table].patients


def dp_evaluation(task: str, tables: Mapping[str, CountTable], noise_multiplier: float, min_cases: int,
                  rng: np.random.Generator | None = None) -> DPEvaluation:
    """Noise the tables and keep the metrics whose own table counts at least `min_cases` patients."""
    noisy = add_noise(tables, noise_multiplier, rng)
    usable = {name: t for name, t in tables.items() if t.patients >= min_cases}
    withheld = {name: f"computed over {t.patients} patient(s), fewer than min_cases={min_cases}"
                for name, t in tables.items() if t.patients < min_cases}
    metrics = metrics_from_tables(task, {name: noisy[name] for name in usable})
    cases = {m: _cases(task, m, usable) for m in metrics}
    metrics["num-examples"] = noisy_patients(tables, noisy)
    cases["num-examples"] = max(t.patients for t in tables.values())
    return DPEvaluation(metrics=metrics, cases=cases, withheld=withheld)
