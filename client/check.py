"""`client check`: read every case as the agent would and say which ones are usable for what."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import SimpleITK as sitk

from pasta_model.protocol import TASKS
from synth.vocabulary import ATTRIBUTES

from .features import validation_patients
from .ingest import CaseLabels, IngestError, read_case, scan_site
from .site_config import SiteConfig

log = logging.getLogger(__name__)



@dataclass
class CaseCheck:
    case_id: str
    status: str                          # ok | skipped | error
    reason: str
    source: str
    shape: list[int] | None = None       # (x, y, z) voxels
    spacing: list[float] | None = None   # (x, y, z) mm
    hu_min: float | None = None
    hu_max: float | None = None
    tasks: list[str] = field(default_factory=list)


@dataclass
class CheckReport:
    site: str
    cases: list[CaseCheck]
    summary: dict

    @property
    def usable(self) -> int:
        return sum(c.status == "ok" for c in self.cases)

    def to_json(self) -> dict:
        keys = ("case_id", "status", "reason", "shape", "spacing", "hu_min", "hu_max", "source",
                "tasks")
        return {"cases": [{k: asdict(c)[k] for k in keys} for c in self.cases],
                "summary": self.summary}


def tasks_for(labels: CaseLabels | None, has_mask: bool) -> list[str]:
    """The tasks one usable case can train or evaluate."""
    tasks = ["segment"] if has_mask else []
    if labels is None:
        return tasks
    if labels.tumor_present is not None:
        tasks.append("detect")
    if labels.attributes or labels.lesion_type:
        tasks.append("report")
    if labels.t_stage:
        tasks.append("stage")
    if labels.survival_months is not None and labels.survival_event is not None:
        tasks.append("survival")
    return tasks


def _check_one(source, labels: dict[str, CaseLabels]) -> CaseCheck:
    try:
        case = read_case(source)
    except IngestError as err:
        return CaseCheck(source.case_id, "error", str(err), source.source)
    hu = sitk.GetArrayViewFromImage(case.image)
    reason = ""
    if case.mask is not None and not sitk.GetArrayViewFromImage(case.mask).any():
        reason = "mask is empty (no lesion voxels)"
    return CaseCheck(
        case_id=source.case_id, status="ok", reason=reason, source=source.source,
        shape=list(case.shape), spacing=[round(v, 4) for v in case.spacing],
        hu_min=float(hu.min()), hu_max=float(hu.max()),
        tasks=tasks_for(labels.get(source.case_id), case.mask is not None))


def _range(values: list[float]) -> list[float] | None:
    return [float(min(values)), float(max(values))] if values else None


def summarize(config: SiteConfig, checks: list[CaseCheck], scan) -> dict:
    ok = [c for c in checks if c.status == "ok"]
    ok_labels = [scan.labels[c.case_id] for c in ok if c.case_id in scan.labels]
    per_task = {t: sum(t in c.tasks for c in ok) for t in TASKS}
    spacings = np.array([c.spacing for c in ok]) if ok else np.zeros((0, 3))

    def counts(attr: str) -> dict[str, int]:
        values = [getattr(label, attr) for label in ok_labels if getattr(label, attr) is not None]
        return {str(k).lower(): v for k, v in sorted(Counter(values).items(), key=str)}

    balance = {
        "tumor_present": counts("tumor_present"),
        "t_stage": counts("t_stage"),
        "survival_event": counts("survival_event"),
        "lesion_type": counts("lesion_type"),
        "organ": counts("organ"),
        **{a: counts(a) for a in ATTRIBUTES},
    }
    case_ids = {c.case_id for c in checks}
    patient_of = {source.case_id: source.patient_id for source in scan.cases}
    # the agent holds out these patients per task (features.validation_patients); with
    # fewer than min_cases_for_metrics of them it never releases evaluation metrics
    val_per_task = {t: len(validation_patients([patient_of.get(c.case_id) or c.case_id for c in ok if t in c.tasks]))
                    for t in TASKS}
    return {
        "site": config.site,
        "images": str(config.data.images) if config.data.images else None,
        "pacs": config.pacs.address if config.pacs else None,
        "cases": len(checks),
        "status": dict(Counter(c.status for c in checks)),
        "usable": len(ok),
        "usable_per_task": per_task,
        "tasks_below_min_cases": [t for t, n in per_task.items()
                                  if 0 < n < config.min_cases_for_metrics],
        "min_cases_for_metrics": config.min_cases_for_metrics,
        "validation_patients_per_task": val_per_task,
        "tasks_without_evaluation_metrics": [t for t, n in per_task.items()
                                             if n and val_per_task[t] < config.min_cases_for_metrics],
        "spacing_mm": {axis: _range(list(spacings[:, i])) for i, axis in enumerate("xyz")},
        "hu_range": [min(c.hu_min for c in ok), max(c.hu_max for c in ok)] if ok else None,
        "patients": len({patient_of.get(c.case_id, c.case_id) for c in ok}),
        "label_balance": balance,
        "label_errors": scan.label_errors,
        "labels_without_case": sorted(set(scan.labels) - case_ids),
        "masks_without_case": scan.masks_without_case,
    }


def check_site(config: SiteConfig) -> CheckReport:
    """Scan headers, read every candidate case, and summarise usability per task."""
    scan = scan_site(config)
    checks = [CaseCheck(r.case_id, r.status, r.reason, r.source) for r in scan.rejected]
    for source in scan.cases:
        checks.append(_check_one(source, scan.labels))
    order = {"ok": 0, "error": 1, "skipped": 2}
    checks.sort(key=lambda c: (order.get(c.status, 3), c.case_id))
    return CheckReport(site=config.site, cases=checks, summary=summarize(config, checks, scan))


def format_report(report: CheckReport) -> str:
    """A readable table of cases, then the summary."""
    rows = [("CASE", "STATUS", "SHAPE (x,y,z)", "SPACING mm", "HU range", "TASKS", "SOURCE / REASON")]
    for c in report.cases:
        shape = "x".join(map(str, c.shape)) if c.shape else "-"
        spacing = "x".join(f"{v:.3g}" for v in c.spacing) if c.spacing else "-"
        hu = f"{c.hu_min:.0f}..{c.hu_max:.0f}" if c.hu_min is not None else "-"
        tail = c.source + (f" -- {c.reason}" if c.reason else "")
        rows.append((c.case_id, c.status, shape, spacing, hu, ",".join(c.tasks) or "-", tail))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    s = report.summary
    if not s["cases"]:
        lines += ["", f"site {s['site']}: no case found (nothing readable under data.images, and nothing in "
                      f"the PACS cache: with a pacs, run `pasta-fed client fetch` first)"]
    else:
        lines += ["", f"site {s['site']}: {s['usable']} usable of {s['cases']} "
                      f"({', '.join(f'{k} {v}' for k, v in sorted(s['status'].items()))}), "
                      f"{s['patients']} patients"]
    lines.append("usable per task: " + ", ".join(f"{t} {n}" for t, n in s["usable_per_task"].items()))
    if s["tasks_below_min_cases"]:
        lines.append(f"below {s['min_cases_for_metrics']} cases (no metrics will be sent): "
                     + ", ".join(s["tasks_below_min_cases"]))
    if s["tasks_without_evaluation_metrics"]:
        vals = s["validation_patients_per_task"]
        lines.append(f"fewer than {s['min_cases_for_metrics']} validation patients (evaluation metrics are "
                     "never released; training still runs): "
                     + ", ".join(f"{t} ({vals[t]})" for t in s["tasks_without_evaluation_metrics"]))
    if s["hu_range"]:
        sp = s["spacing_mm"]
        lines.append("spacing mm: " + ", ".join(f"{a} {sp[a][0]:.3g}-{sp[a][1]:.3g}" for a in "xyz")
                     + f"; HU {s['hu_range'][0]:.0f} to {s['hu_range'][1]:.0f}")
    for name, values in s["label_balance"].items():
        if values:
            lines.append(f"labels {name}: " + ", ".join(f"{k} {v}" for k, v in values.items()))
    for error in s["label_errors"]:
        lines.append(f"LABELS ERROR: {error}")
    if s["labels_without_case"]:
        lines.append("labels without a case: " + ", ".join(s["labels_without_case"]))
    if s["masks_without_case"]:
        lines.append("masks without a case: " + ", ".join(s["masks_without_case"]))
    return "\n".join(lines)
