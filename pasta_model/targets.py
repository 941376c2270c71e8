"""One label encoding: a row of labels -> the class indices and vectors the heads learn.

A row is what a hospital's labels CSV says of a case (`client.ingest.labels`), or a
synthetic case's type.json read as such a row (`labels_from_report`). Class indices are
positions in `synth.vocabulary`'s tuples; a missing or unknown label is IGNORE_INDEX, which
every loss and metric skips. Pretraining (`pasta_model.data`) and fine-tuning
(`pasta_model.finetune`) both encode through these functions.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from synth.vocabulary import ATTRIBUTES, HOST_ORGANS, LESION_TYPE_NAMES, T_STAGES

from .heads import DETECT_OUTPUTS
from .losses import IGNORE_INDEX


def labels_from_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """A synthetic case's type.json as a labels-CSV row (what a hospital would know)."""
    lesion = (report.get("lesions") or [{}])[0]
    return {
        "tumor_present": bool(report.get("lesions")),
        "organ": report.get("organ"),
        "t_stage": report.get("t_stage"),
        "survival_months": report.get("survival_months"),
        "survival_event": report.get("survival_event"),
        **{name: lesion.get(name) for name in ATTRIBUTES},
        "lesion_type": report.get("lesion_type"),
    }


def class_index(value: Any, vocab: Sequence[str]) -> int:
    return vocab.index(value) if value in vocab else IGNORE_INDEX


def report_indices(row: Mapping[str, Any]) -> dict[str, int]:
    """Each report attribute and the lesion type as a class index."""
    out = {name: class_index(row.get(name), classes) for name, classes in ATTRIBUTES.items()}
    out["lesion_type"] = class_index(row.get("lesion_type"), LESION_TYPE_NAMES)
    return out


def stage_index(row: Mapping[str, Any]) -> int:
    return class_index(row.get("t_stage"), T_STAGES)


def detect_vector(tumor_present: bool, organ: str | None) -> tuple[list[float], list[float]]:
    """Multi-hot target [any, *HOST_ORGANS] and its weights.

    A tumour in an organ outside HOST_ORGANS (or an unknown one) teaches only "any": the
    organ outputs get weight 0 rather than a false "not here".
    """
    target, weight = [0.0] * len(DETECT_OUTPUTS), [1.0] * len(DETECT_OUTPUTS)
    if tumor_present:
        target[0] = 1.0
        if organ in HOST_ORGANS:
            target[1 + HOST_ORGANS.index(organ)] = 1.0
        else:
            weight[1:] = [0.0] * (len(DETECT_OUTPUTS) - 1)
    return target, weight
