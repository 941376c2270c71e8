"""A hospital's site configuration: one YAML file, validated on load.

Everything the agent may read or write at a site comes from this file (never from the
coordinator), so it is checked strictly: unknown keys, wrong types and out-of-range
values are errors that name the file and the key path. So are settings that would void
the privacy guarantee or fail a round after its privacy was charged: a CUDA device this
host lacks, an absurd delta, labels that cannot tell two scans of one patient apart.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["SiteConfig", "DataConfig", "PrivacyConfig", "BackbonePolicy", "SiteConfigError", "load_site_config"]

_SITE_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
MAX_DELTA = 1e-2   # above this no site is protected (and 1/patients is still reachable below it)


class SiteConfigError(ValueError):
    """A site YAML that cannot be used; the message names the file and the key path."""


@dataclass(frozen=True)
class DataConfig:
    images: Path                 # folder of DICOM series (any depth) and/or NIfTI files
    labels: Path | None = None   # CSV of patient-level labels (docs/hospital-data.md)
    masks: Path | None = None    # folder of lesion masks, <case_id>.nii[.gz]
    one_scan_per_patient: bool = False   # no patient id needed: every scan is a different patient


@dataclass(frozen=True)
class PrivacyConfig:
    max_epsilon: float           # the site's one budget: everything released from its patients
    delta: float
    max_grad_norm: float
    evaluation_share: float = 0.1   # share of max_epsilon for DP evaluation replies (0: none)


BACKBONE_POLICIES = ("any", "listed", "none")


@dataclass(frozen=True)
class BackbonePolicy:
    """Which backbones the coordinator may install here (all share the site's one budget)."""
    accept_from_coordinator: str = "any"        # any | listed | none
    allowed_sha256: tuple[str, ...] = ()        # with "listed"

    def allows(self, sha256: str) -> bool:
        if self.accept_from_coordinator == "any":
            return True
        return self.accept_from_coordinator == "listed" and sha256 in self.allowed_sha256


@dataclass(frozen=True)
class SiteConfig:
    site: str
    data: DataConfig
    privacy: PrivacyConfig
    state_dir: Path              # ledger, audit log, caches: the only place the agent writes
    backbone: Path | None = None
    backbones: BackbonePolicy = BackbonePolicy()
    device: str = "auto"
    min_cases_for_metrics: int = 5
    source: Path | None = None   # the YAML this came from (for messages)

    @property
    def data_folders(self) -> tuple[Path, ...]:
        """Folders holding the hospital's data; the agent never writes inside them."""
        return tuple(p for p in (self.data.images, self.data.masks) if p is not None)

    def is_inside_data(self, path: Path) -> bool:
        """True when `path` is a data folder, is inside one, or is the labels file."""
        target = Path(path).resolve()
        if self.data.labels is not None and target == self.data.labels.resolve():
            return True
        return any(_is_within(target, folder.resolve()) for folder in self.data_folders)


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


# --- value checkers: each returns the parsed value or raises _Bad(problem) ---------------

class _Bad(Exception):
    pass


def _mapping(value: Any) -> dict:
    if not isinstance(value, dict):
        raise _Bad(f"must be a mapping, got {type(value).__name__}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"must be a non-empty string, got {value!r}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise _Bad(f"must be finite, got {value!r}")
    return float(value)


def _positive(value: Any) -> float:
    number = _number(value)
    if number <= 0:
        raise _Bad(f"must be > 0, got {value!r}")
    return number


def _probability(value: Any) -> float:
    number = _number(value)
    if not 0 < number < 1:
        raise _Bad(f"must be between 0 and 1 (exclusive), got {value!r}")
    return number


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"must be true or false, got {value!r}")
    return value


def _delta(value: Any) -> float:
    number = _probability(value)
    if number > MAX_DELTA:
        raise _Bad(f"must be at most {MAX_DELTA:g}, got {value!r}: a delta this large lets a patient's data "
                   f"leak outright with that probability (use at most 1 / number of patients, e.g. 1e-5)")
    return number


def _site_name(value: Any) -> str:
    name = _string(value)
    if not _SITE_RE.match(name):
        raise _Bad(f"must use only letters, digits, '_', '.', '-', got {value!r}")
    return name


def _device(value: Any) -> str:
    name = _string(value)
    if not _DEVICE_RE.match(name):
        raise _Bad(f"must be auto, cpu, cuda or cuda:N, got {value!r}")
    if name.startswith("cuda"):
        _check_cuda(name)
    return name


def _check_cuda(name: str) -> None:
    """A CUDA device this host lacks would fail the round after its privacy is charged."""
    import torch

    if not torch.cuda.is_available():
        raise _Bad(f"{name} requested, but this host has no usable CUDA device "
                   f"(torch.cuda.is_available() is False); use cpu or auto")
    count = torch.cuda.device_count()
    index = int(name.partition(":")[2] or 0)
    if index >= count:
        raise _Bad(f"{name} requested, but this host has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")


def _share(value: Any) -> float:
    number = _number(value)
    if not 0 <= number < 1:
        raise _Bad(f"must be at least 0 and below 1, got {value!r}")
    return number


def _policy(value: Any) -> str:
    if value not in BACKBONE_POLICIES:
        raise _Bad(f"must be one of {', '.join(BACKBONE_POLICIES)}, got {value!r}")
    return value


def _sha_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)
                                              for v in value):
        raise _Bad("must be a list of SHA-256 hashes (64 lowercase hex digits)")
    return tuple(value)


def _min_cases(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Bad(f"must be an integer >= 1, got {value!r}")
    return value


class _Reader:
    """Walks the YAML mapping, recording which keys were used, naming key paths in errors."""

    def __init__(self, file: Path):
        self.file = file
        self.base = file.parent

    def fail(self, key: str, problem: str) -> SiteConfigError:
        return SiteConfigError(f"{self.file}: {key}: {problem}")

    def take(self, raw: dict, prefix: str, key: str, check, required: bool = True, default=None):
        path = f"{prefix}{key}"
        if key not in raw or raw[key] is None:
            if required:
                raise self.fail(path, "is required")
            return default
        try:
            return check(raw[key])
        except _Bad as bad:
            raise self.fail(path, str(bad)) from None

    def path(self, raw: dict, prefix: str, key: str, required: bool = True) -> Path | None:
        text = self.take(raw, prefix, key, _string, required)
        if text is None:
            return None
        path = Path(text).expanduser()
        return (path if path.is_absolute() else self.base / path).resolve()

    def no_unknown(self, raw: dict, prefix: str, known: set[str]) -> None:
        for key in raw:
            if key not in known:
                allowed = ", ".join(sorted(known))
                raise self.fail(f"{prefix}{key}", f"unknown key (allowed: {allowed})")


def _backbone_policy(r: _Reader, raw: dict) -> BackbonePolicy:
    policy_raw = r.take(raw, "", "backbones", _mapping, required=False, default={})
    r.no_unknown(policy_raw, "backbones.", {"accept_from_coordinator", "allowed_sha256"})
    policy = BackbonePolicy(
        accept_from_coordinator=r.take(policy_raw, "backbones.", "accept_from_coordinator", _policy,
                                       required=False, default="any"),
        allowed_sha256=r.take(policy_raw, "backbones.", "allowed_sha256", _sha_list, required=False, default=()))
    if policy.accept_from_coordinator == "listed" and not policy.allowed_sha256:
        raise r.fail("backbones.allowed_sha256", "is required (and non-empty) with accept_from_coordinator: listed")
    return policy


def _check_patient_ids(r: _Reader, data: DataConfig) -> None:
    """DP counts patients: labels without patient_id would count each scan as a patient."""
    if data.labels is None or data.one_scan_per_patient:
        return
    from client.ingest.labels import label_columns
    from client.ingest.types import IngestError

    try:
        columns = label_columns(data.labels)
    except IngestError as err:
        raise r.fail("data.labels", str(err)) from None
    if "patient_id" not in columns:
        raise r.fail("data.labels", f"{data.labels} has no patient_id column, so two scans of one patient "
                                    f"would count as two patients and the privacy guarantee would not hold "
                                    f"for that patient; add a patient_id column, or set "
                                    f"data.one_scan_per_patient: true if every scan is a different patient")


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate a site YAML. Relative paths resolve against the YAML's folder."""
    file = Path(path).expanduser().resolve()
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as err:
        raise SiteConfigError(f"{file}: cannot read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise SiteConfigError(f"{file}: not valid YAML: {err}") from None
    r = _Reader(file)
    if not isinstance(raw, dict):
        raise SiteConfigError(f"{file}: top level must be a mapping, got {type(raw).__name__}")
    r.no_unknown(raw, "", {"site", "data", "privacy", "backbone", "backbones", "state_dir", "device",
                           "min_cases_for_metrics"})

    data_raw = r.take(raw, "", "data", _mapping)
    r.no_unknown(data_raw, "data.", {"images", "labels", "masks", "one_scan_per_patient"})
    data = DataConfig(
        images=r.path(data_raw, "data.", "images"),
        labels=r.path(data_raw, "data.", "labels", required=False),
        masks=r.path(data_raw, "data.", "masks", required=False),
        one_scan_per_patient=r.take(data_raw, "data.", "one_scan_per_patient", _boolean,
                                    required=False, default=False),
    )
    if not data.images.is_dir():
        raise r.fail("data.images", f"folder not found: {data.images}")
    if data.labels is not None and not data.labels.is_file():
        raise r.fail("data.labels", f"file not found: {data.labels}")
    if data.masks is not None and not data.masks.is_dir():
        raise r.fail("data.masks", f"folder not found: {data.masks}")
    _check_patient_ids(r, data)

    privacy_raw = r.take(raw, "", "privacy", _mapping)
    r.no_unknown(privacy_raw, "privacy.", {"max_epsilon", "delta", "max_grad_norm", "evaluation_share"})
    privacy = PrivacyConfig(
        max_epsilon=r.take(privacy_raw, "privacy.", "max_epsilon", _positive),
        delta=r.take(privacy_raw, "privacy.", "delta", _delta),
        max_grad_norm=r.take(privacy_raw, "privacy.", "max_grad_norm", _positive),
        evaluation_share=r.take(privacy_raw, "privacy.", "evaluation_share", _share, required=False, default=0.1),
    )
    backbones = _backbone_policy(r, raw)

    config = SiteConfig(
        site=r.take(raw, "", "site", _site_name),
        data=data,
        privacy=privacy,
        state_dir=r.path(raw, "", "state_dir"),
        backbone=r.path(raw, "", "backbone", required=False),
        backbones=backbones,
        device=r.take(raw, "", "device", _device, required=False, default="auto"),
        min_cases_for_metrics=r.take(raw, "", "min_cases_for_metrics", _min_cases,
                                     required=False, default=5),
        source=file,
    )
    if config.is_inside_data(config.state_dir):
        raise r.fail("state_dir", f"{config.state_dir} is inside the hospital's data "
                                  "(the agent never writes there); choose a folder outside "
                                  "data.images and data.masks")
    return config
