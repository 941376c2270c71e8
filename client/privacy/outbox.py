"""The last gate before anything leaves a site: an allow-list, then the audit log.

A reply may carry only (1) floating-point, finite tensors whose keys are head keys of
the current task (`heads.<task>.`), and (2) allow-listed scalar metrics, none of
which was computed over fewer than `min_cases` cases. Anything else raises
`OutboxRefused` naming the offending key or metric; the refusal itself is written to
the audit log, and nothing is sent.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pasta_model.protocol import TASKS

from .audit import AuditLog, AuditRecord, _as_numpy

# Metrics a site may report. Data-derived ones are aggregates over `num-examples` (or
# the count given for them); DP bookkeeping metrics describe the mechanism, not patients.
DATA_METRICS = frozenset({
    "num-examples", "loss", "val-loss", "dice", "auc", "accuracy", "balanced-accuracy", "f1", "macro-f1",
    "c-index", "sensitivity", "specificity", "precision", "recall", "brier",
})
DP_METRICS = frozenset({"epsilon", "delta", "noise-multiplier", "steps", "sample-rate", "max-grad-norm",
                        "local-epochs", "round", "attempt"})
DEFAULT_ALLOWED_METRICS = DATA_METRICS | DP_METRICS


class OutboxRefused(RuntimeError):
    """Something in a reply is not allowed to leave the site."""

    audited: bool = False     # set by `release` once the refusal is in the audit log


@dataclass(frozen=True)
class OutboxPolicy:
    task: str
    min_cases: int = 5
    allowed_metrics: frozenset[str] = field(default=DEFAULT_ALLOWED_METRICS)
    # Metrics about the DP mechanism, not about patients: exempt from min_cases.
    uncounted_metrics: frozenset[str] = field(default=DP_METRICS)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} unknown; valid: {', '.join(TASKS)}")
        if self.min_cases < 1:
            raise ValueError(f"min_cases must be >= 1, got {self.min_cases}")

    @property
    def prefix(self) -> str:
        return f"heads.{self.task}."


def check_outgoing(arrays: Mapping[str, Any], metrics: Mapping[str, Any], policy: OutboxPolicy, *,
                   metric_cases: Mapping[str, int] | None = None,
                   expected_shapes: Mapping[str, Sequence[int]] | None = None) -> None:
    """Raise OutboxRefused unless every tensor and metric may leave.

    `metric_cases` gives the exact number of cases behind each metric (a DP evaluation
    sends a noisy `num-examples`, so its exact counts come here); data metrics without an
    entry count `num-examples` cases (and are refused when that is missing too).
    `expected_shapes` (the head as the coordinator sent it) refuses missing, extra or
    reshaped tensors.
    """
    for key, value in arrays.items():
        if not isinstance(key, str) or not key.startswith(policy.prefix) or len(key) == len(policy.prefix):
            raise OutboxRefused(f"tensor {key!r} is not a head key of task {policy.task!r} "
                                f"(allowed prefix {policy.prefix!r}); refusing to reply")
        arr = _as_numpy(value)
        if not np.issubdtype(arr.dtype, np.floating):
            raise OutboxRefused(f"tensor {key!r} has dtype {arr.dtype}; only floating-point weights may leave")
        if not np.isfinite(arr).all():
            raise OutboxRefused(f"tensor {key!r} contains NaN or Inf; refusing to reply")
        if expected_shapes is not None:
            if key not in expected_shapes:
                raise OutboxRefused(f"tensor {key!r} was not in the head the coordinator sent")
            if tuple(arr.shape) != tuple(expected_shapes[key]):
                raise OutboxRefused(f"tensor {key!r} has shape {list(arr.shape)}, the head has "
                                    f"{list(expected_shapes[key])}")
    if expected_shapes is not None:
        missing = sorted(set(expected_shapes) - set(arrays))
        if missing:
            raise OutboxRefused(f"reply lacks head tensor(s) {missing[:3]}")

    counts = dict(metric_cases or {})
    n_examples = metrics.get("num-examples")
    for name, value in metrics.items():
        if name not in policy.allowed_metrics:
            raise OutboxRefused(f"metric {name!r} is not on the allow-list; refusing to reply")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise OutboxRefused(f"metric {name!r} must be one number, got {type(value).__name__}")
        if not math.isfinite(float(value)):
            raise OutboxRefused(f"metric {name!r} is not finite ({value})")
        if name in policy.uncounted_metrics:
            continue
        cases = counts.get(name, value if name == "num-examples" else n_examples)
        if cases is None:
            raise OutboxRefused(f"metric {name!r}: number of cases unknown (no metric_cases entry and no "
                                f"num-examples); refusing to reply")
        if cases < policy.min_cases:
            raise OutboxRefused(f"metric {name!r} computed over {int(cases)} case(s), fewer than "
                                f"min_cases={policy.min_cases}; refusing to reply")


def record_refusal(audit: AuditLog, *, run_id: str, round: int, message_type: str, reason: str,
                   site: str | None = None, attempted_keys=(), metrics: Mapping[str, Any] | None = None) -> AuditRecord:
    """Log a refusal: its reason leaves the site as the error text, so it is audited word for word.

    `attempted_keys`: what would have been sent; nothing was.
    """
    record = AuditRecord.describe(run_id=run_id, round=round, message_type=message_type, arrays={},
                                  metrics=metrics, status="refused", reason=reason, site=site)
    record.keys = sorted(str(k) for k in attempted_keys)
    return audit.append(record)


def release(audit: AuditLog, *, run_id: str, round: int, message_type: str, arrays: Mapping[str, Any],
            metrics: Mapping[str, Any], policy: OutboxPolicy, metric_cases: Mapping[str, int] | None = None,
            expected_shapes: Mapping[str, Sequence[int]] | None = None, site: str | None = None,
            withheld: Mapping[str, str] | None = None) -> AuditRecord:
    """Check a reply against the allow-list and append it to the audit log; call just before sending.

    A refused reply is logged (status "refused", with the reason) and re-raised.
    `withheld`: metrics left out of the reply and why; the audit record keeps the reasons.
    """
    try:
        check_outgoing(arrays, metrics, policy, metric_cases=metric_cases, expected_shapes=expected_shapes)
    except OutboxRefused as exc:
        record_refusal(audit, run_id=run_id, round=round, message_type=message_type, reason=str(exc), site=site,
                       attempted_keys=arrays,
                       metrics={k: v for k, v in metrics.items() if k in policy.allowed_metrics})
        exc.audited = True
        raise
    reason = "; ".join(f"{k} withheld: {v}" for k, v in sorted((withheld or {}).items())) or None
    return audit.append(AuditRecord.describe(run_id=run_id, round=round, message_type=message_type,
                                             arrays=arrays, metrics=metrics, site=site, reason=reason))
