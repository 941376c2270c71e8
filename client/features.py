"""A site's cases as frozen-backbone features, computed once and cached under state_dir.

The cache key is the case's file contents (SHA-256), the preprocessing version, the
preset and the backbone hash: a federation of many rounds reads and encodes each case
once, and a new backbone or preprocessing never reuses stale features. Cases that fail
to read are logged with the reason and left out; the others go on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from client.ingest.discover import scan_site
from client.ingest.read import read_case, source_digest
from client.ingest.types import CaseSource, IngestError
from client.site_config import SiteConfig
from pasta_model.finetune import PREPROCESS_VERSION, encode_region, encode_targets, preprocess_region, usable_for
from pasta_model.imageio import metatensor_from_sitk
from pasta_model.network import PastaNet
from synth.atomic import atomic_path

log = logging.getLogger(__name__)

VALIDATION_SHARE = 5        # one patient in five is held out for evaluation (those with the lowest id hash)


@dataclass
class TaskSplit:
    inputs: torch.Tensor
    targets: dict[str, torch.Tensor]
    patient_ids: list[str]
    case_ids: list[str]

    def __len__(self) -> int:
        return len(self.case_ids)


@dataclass
class SiteTaskData:
    task: str
    train: TaskSplit
    val: TaskSplit
    skipped: dict[str, str]          # case_id -> why it is not used for this task


def validation_patients(patient_ids: list[str]) -> set[str]:
    """Exactly len // VALIDATION_SHARE patients, chosen by a hash of their id: stable across
    rounds and runs, and never more than a fifth, however small the site."""
    ranked = sorted(set(patient_ids), key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    return set(ranked[: len(ranked) // VALIDATION_SHARE])


def _region_kind(task: str) -> str:
    # detection must not see where the lesion is: its crop is the volume centre
    return "centre" if task == "detect" else "lesion"


class FeatureCache:
    def __init__(self, config: SiteConfig, model: PastaNet, backbone_sha256: str):
        self.config, self.model, self.sha = config, model, backbone_sha256
        self.root = (Path(config.state_dir) / "cache" / "features" / backbone_sha256[:16]
                     / PREPROCESS_VERSION / model.preset.name)

    def _path(self, digest: str, kind: str, decode: bool) -> Path:
        return self.root / kind / f"{digest}{'-dec' if decode else ''}.safetensors"

    def case_features(self, source: CaseSource, digest: str, kind: str, decode: bool) -> dict[str, torch.Tensor]:
        path = self._path(digest, kind, decode)
        if path.exists():
            try:
                return load_file(str(path))
            except Exception as exc:   # a damaged cache entry is recomputed, never trusted
                log.warning("%s: unreadable cache entry (%s); recomputing", path, exc)
        case = read_case(source)
        image = metatensor_from_sitk(case.image)
        mask = metatensor_from_sitk(case.mask, torch.uint8) if (case.mask is not None and kind == "lesion") else None
        crop, mcrop = preprocess_region(self.model.preset, image, mask)
        pooled, decoder = encode_region(self.model, crop, decode)
        out = {"pooled": pooled.contiguous()}
        if decoder is not None:
            out["decoder"] = decoder.contiguous()
        if mcrop is not None:
            out["mask"] = mcrop.contiguous()
        with atomic_path(path) as tmp:
            save_file(out, str(tmp))
        return out

    def task_data(self, task: str) -> SiteTaskData:
        scan = scan_site(self.config)
        kind, decode = _region_kind(task), task == "segment"
        usable: list = []
        skipped: dict[str, str] = {r.case_id: r.reason for r in scan.rejected}
        seen_patients: set[str] = set()
        log.info("site %s: frozen-backbone features of %d case(s) for task %s (cached under state_dir after "
                 "the first round)", self.config.site, len(scan.cases), task)
        started = time.monotonic()
        for source in scan.cases:
            labels = scan.labels.get(source.case_id)
            label_dict = dataclasses.asdict(labels) if labels is not None else {}
            if not usable_for(task, label_dict, source.mask is not None):
                skipped[source.case_id] = f"no labels for task {task}"
                continue
            patient = source.patient_id or source.case_id
            if patient in seen_patients:      # one DP sample is one patient: keep the first scan
                skipped[source.case_id] = f"patient {patient} already has a case (one scan per patient)"
                continue
            try:
                feats = self.case_features(source, source_digest(source), kind, decode)
            except (IngestError, OSError, RuntimeError, ValueError) as exc:
                skipped[source.case_id] = f"unreadable: {exc}"
                log.error("case %s: %s", source.case_id, exc)
                continue
            seen_patients.add(patient)
            usable.append((source.case_id, patient, label_dict, feats))
        log.info("site %s: %d usable case(s), %d not used, in %.0f s", self.config.site, len(usable), len(skipped),
                 time.monotonic() - started)
        val = validation_patients([r[1] for r in usable])
        train_rows = [r for r in usable if r[1] not in val]
        val_rows = [r for r in usable if r[1] in val]
        return SiteTaskData(task, self._split(task, train_rows), self._split(task, val_rows), skipped)

    def _split(self, task: str, rows: list) -> TaskSplit:
        if not rows:
            return TaskSplit(torch.zeros(0), {}, [], [])
        key = "decoder" if task == "segment" else "pooled"
        inputs = torch.stack([r[3][key].float() for r in rows])
        masks = [r[3]["mask"] for r in rows] if task == "segment" else None
        targets = encode_targets(task, [r[2] for r in rows], masks)
        return TaskSplit(inputs, targets, [r[1] for r in rows], [r[0] for r in rows])
