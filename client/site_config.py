"""A hospital's site configuration: one YAML file, validated on load.

Everything the agent may read or write at a site comes from this file (never from the
coordinator), so it is checked strictly: unknown keys, wrong types and out-of-range
values are errors that name the file and the key path. So are settings that would void
the privacy guarantee or fail a round after its privacy was charged: a CUDA device this
host lacks, an absurd delta, labels that cannot tell two scans of one patient apart.
"""
from __future__ import annotations

from datetime import date, datetime
from pathlib import Path
from typing import Annotated, TypeVar

import yaml
from pydantic import AfterValidator, Field, model_validator
from pydantic.dataclasses import dataclass

from pasta_model.protocol import Delta, Sha256
from synth.typed_config import STRICT, matching, one_of, parse

__all__ = ["SiteConfig", "DataConfig", "PrivacyConfig", "BackbonePolicy", "PacsConfig", "PacsTls", "DimseConfig",
           "StudyQuery", "SiteConfigError", "load_site_config"]

_SITE_RE = r"[A-Za-z0-9_.-]+"
_DEVICE_RE = r"auto|cpu|cuda|cuda:\d+"
T = TypeVar("T")
MAX_DELTA = 1e-2   # above this no site is protected (and 1/patients is still reachable below it)


class SiteConfigError(ValueError):
    """A site YAML that cannot be used; the message names the file and the key path."""


def _no_cuda_this_host_lacks(name: str) -> str:
    """A CUDA device this host lacks would fail the round after its privacy is charged."""
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"{name} requested, but this host has no usable CUDA device "
                             f"(torch.cuda.is_available() is False); use cpu or auto")
        count = torch.cuda.device_count()
        if int(name.partition(":")[2] or 0) >= count:
            raise ValueError(f"{name} requested, but this host has {count} CUDA device(s) "
                             f"(cuda:0..cuda:{count - 1})")
    return name


def _protective_delta(delta: float) -> float:
    if delta > MAX_DELTA:
        raise ValueError(f"must be at most {MAX_DELTA:g}: a delta this large lets a patient's data leak outright "
                         f"with that probability (use at most 1 / number of patients, e.g. 1e-5)")
    return delta


Positive = Annotated[float, Field(gt=0)]
SiteName = Annotated[str, matching(_SITE_RE, "made of letters, digits, '_', '.', '-' only")]
Device = Annotated[str, matching(_DEVICE_RE, "auto, cpu, cuda or cuda:N"),
                   AfterValidator(_no_cuda_this_host_lacks)]


@dataclass(frozen=True, config=STRICT)
class DataConfig:
    images: Path | None = None   # folder of DICOM series (any depth) and/or NIfTI files; optional with a pacs
    labels: Path | None = None   # CSV of patient-level labels (docs/hospital-data.md)
    masks: Path | None = None    # folder of lesion masks, <case_id>.nii[.gz]
    one_scan_per_patient: bool = False   # no patient id needed: every scan is a different patient


@dataclass(frozen=True, config=STRICT)
class PrivacyConfig:
    max_epsilon: Positive        # the site's one budget: everything released from its patients
    delta: Annotated[Delta, AfterValidator(_protective_delta)]
    max_grad_norm: Positive
    evaluation_share: Annotated[float, Field(ge=0, lt=1)] = 0.1   # share of max_epsilon for DP evaluation (0: none)


AeTitle = Annotated[str, matching(r"[ -~]{1,16}", "a DICOM AE title (1 to 16 printable ASCII characters)")]
BodyPart = Annotated[str, matching(r"[A-Za-z0-9_ ]{1,16}", "a DICOM BodyPartExamined value (1 to 16 letters, "
                                                           "digits, '_' or spaces; e.g. CHEST, ABDOMEN)")]


@dataclass(frozen=True, config=STRICT)
class DimseConfig:
    """A PACS reached by DIMSE: C-FIND to list, C-GET to retrieve (no inbound port needed)."""
    host: Annotated[str, Field(min_length=1)]
    port: Annotated[int, Field(ge=1, le=65535)]
    called_ae: AeTitle
    calling_ae: AeTitle = "PASTAFED"


@dataclass(frozen=True, config=STRICT)
class StudyQuery:
    """Which series to retrieve: the PACS is queried for this modality only.

    With `from_labels: true`, only the studies the labels CSV names (its study_instance_uid
    and/or accession_number columns) are retrieved, so a PACS holding far more than the
    cohort is never copied whole; checked against data.labels when retrieval starts.
    Otherwise `study_date_from`/`study_date_to` (inclusive) select studies by date. Either
    way `body_parts` keeps only series whose BodyPartExamined is one of them (any case). The PACS is
    asked with these keys and every answer is checked again here, since PACS match loosely.
    """
    modality: Annotated[str, one_of(("CT",))] = "CT"
    from_labels: bool = False
    study_date_from: Annotated[date, Field(strict=False)] | None = None
    study_date_to: Annotated[date, Field(strict=False)] | None = None
    body_parts: Annotated[tuple[BodyPart, ...], Field(strict=False)] = ()

    @model_validator(mode="after")
    def _one_selection(self) -> StudyQuery:
        if self.from_labels and (self.study_date_from or self.study_date_to):
            raise ValueError("from_labels selects studies by the labels CSV, study_date_from/study_date_to "
                             "by date: use one of the two")
        if self.study_date_from and self.study_date_to and self.study_date_from > self.study_date_to:
            raise ValueError(f"study_date_from {self.study_date_from} is after study_date_to {self.study_date_to}")
        return self

    @property
    def study_dates(self) -> str | None:
        """The date range as a DICOM range matching key (YYYYMMDD-YYYYMMDD, open at either end), or None."""
        if self.study_date_from is None and self.study_date_to is None:
            return None
        return "-".join(d.strftime("%Y%m%d") if d else "" for d in (self.study_date_from, self.study_date_to))

    def admits_date(self, study_date: str) -> bool:
        """A study's StudyDate (YYYYMMDD) lies in the range; one without a date does not when a range is set."""
        if self.study_dates is None:
            return True
        try:
            day = datetime.strptime(study_date.strip(), "%Y%m%d").date()
        except ValueError:
            return False
        return (self.study_date_from or day) <= day <= (self.study_date_to or day)

    def admits_body_part(self, body_part: str) -> bool:
        """A series' BodyPartExamined is one of body_parts (any, when none are named)."""
        return not self.body_parts or body_part.strip().upper() in {part.upper() for part in self.body_parts}


@dataclass(frozen=True, config=STRICT)
class PacsTls:
    """TLS to the PACS (DICOMweb https or DIMSE TLS): the CA that signs its certificate and,
    for mutual TLS, the certificate and key the agent presents (PEM files, both or neither)."""
    ca: Path                          # PEM: the CA certificate(s) the PACS' certificate must chain to
    certificate: Path | None = None   # PEM: the agent's client certificate (mutual TLS)
    key: Path | None = None           # PEM: its private key (unencrypted; protect it by file mode)

    @model_validator(mode="after")
    def _certificate_with_key(self) -> PacsTls:
        if (self.certificate is None) != (self.key is None):
            given, missing = ("certificate", "key") if self.key is None else ("key", "certificate")
            raise ValueError(f"{given} is given without {missing}: mutual TLS needs both (or neither)")
        return self

    @property
    def client_cert(self) -> tuple[Path, Path] | None:
        """(certificate, key) for mutual TLS, or None."""
        return (self.certificate, self.key) if self.certificate and self.key else None

    def files(self) -> dict[str, Path]:
        """{key: path} of the files named, for the existence check."""
        return {k: v for k, v in (("ca", self.ca), ("certificate", self.certificate), ("key", self.key)) if v}


@dataclass(frozen=True, config=STRICT)
class PacsConfig:
    """Where CT is retrieved from, into state_dir/pacs-cache/ (never into the data folders)."""
    dicomweb: Annotated[str, matching(r"https?://[^@\s/]+(/\S*)?", "an http:// or https:// URL, without "
                                       "user or password (those go in pacs.credentials)")] | None = None
    dimse: DimseConfig | None = None
    credentials: Path | None = None   # JSON file ({"username", "password"} or {"token"}); never logged
    studies: StudyQuery = StudyQuery()
    tls: PacsTls | None = None        # without it, https is verified with the system's CAs, DIMSE is plain

    @property
    def address(self) -> str:
        """The PACS as a person would name it (no credentials: they are never in the YAML)."""
        if self.dimse is not None:
            return f"DIMSE {self.dimse.called_ae}@{self.dimse.host}:{self.dimse.port}"
        return f"DICOMweb {self.dicomweb}"

    @model_validator(mode="after")
    def _one_protocol(self) -> PacsConfig:
        if (self.dicomweb is None) == (self.dimse is None):
            raise ValueError("name exactly one of dicomweb or dimse")
        if self.credentials is not None and self.dimse is not None:
            raise ValueError("credentials apply to dicomweb only (DIMSE authenticates by AE title)")
        if self.tls is not None and self.dicomweb is not None and not self.dicomweb.startswith("https://"):
            raise ValueError(f"tls needs an https:// dicomweb URL, got {self.dicomweb}")
        return self


BACKBONE_POLICIES = ("any", "listed", "none")


@dataclass(frozen=True, config=STRICT)
class BackbonePolicy:
    """Which backbones the coordinator may install here (all share the site's one budget)."""
    accept_from_coordinator: Annotated[str, one_of(BACKBONE_POLICIES)] = "any"
    allowed_sha256: Annotated[tuple[Sha256, ...], Field(strict=False)] = ()     # with "listed"

    @model_validator(mode="after")
    def _listed_needs_a_list(self) -> BackbonePolicy:
        if self.accept_from_coordinator == "listed" and not self.allowed_sha256:
            raise ValueError("allowed_sha256 is required (and non-empty) with accept_from_coordinator: listed")
        return self

    def allows(self, sha256: str) -> bool:
        if self.accept_from_coordinator == "any":
            return True
        return self.accept_from_coordinator == "listed" and sha256 in self.allowed_sha256


@dataclass(frozen=True, config=STRICT)
class SiteConfig:
    site: SiteName
    data: DataConfig
    privacy: PrivacyConfig
    state_dir: Path              # ledger, audit log, caches: the only place the agent writes
    backbone: Path | None = None
    backbones: BackbonePolicy = BackbonePolicy()
    device: Device = "auto"
    min_cases_for_metrics: Annotated[int, Field(ge=1)] = 5
    pacs: PacsConfig | None = None   # CT retrieved from a PACS, beside or instead of data.images
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


_PATHS = {"": ("state_dir", "backbone"), "data": ("images", "labels", "masks"), "pacs": ("credentials",)}


def _with_resolved_paths(section: dict, keys: tuple[str, ...], base: Path) -> dict:
    """Path strings resolved against the YAML's folder; anything else is left for the check."""
    resolved = dict(section)
    for key in keys:
        if isinstance(section.get(key), str) and section[key].strip():
            path = Path(section[key]).expanduser()
            resolved[key] = (path if path.is_absolute() else base / path).resolve()
    return resolved


def _section(raw: dict, file: Path, key: str, cls: type[T], required: bool = True) -> T | None:
    if raw.get(key) is None:
        if required:
            raise SiteConfigError(f"{file}: {key}: is required")
        return None
    if not isinstance(raw[key], dict):
        raise SiteConfigError(f"{file}: {key}: must be a mapping, got {type(raw[key]).__name__}")
    section = _with_resolved_paths(raw[key], _PATHS.get(key, ()), file.parent)
    return parse(cls, section, str(file), SiteConfigError, prefix=f"{key}.")


def _check_patient_ids(file: Path, data: DataConfig) -> None:
    """DP counts patients: labels without patient_id would count each scan as a patient."""
    if data.labels is None or data.one_scan_per_patient:
        return
    from client.ingest.labels import label_columns
    from client.ingest.types import IngestError

    try:
        columns = label_columns(data.labels)
    except IngestError as err:
        raise SiteConfigError(f"{file}: data.labels: {err}") from None
    if "patient_id" not in columns:
        raise SiteConfigError(f"{file}: data.labels: {data.labels} has no patient_id column, so two scans of one "
                              f"patient would count as two patients and the privacy guarantee would not hold "
                              f"for that patient; add a patient_id column, or set "
                              f"data.one_scan_per_patient: true if every scan is a different patient")


def _pacs_section(raw: dict, file: Path) -> PacsConfig | None:
    """`pacs:`, its nested dimse and studies mappings parsed one by one (STRICT takes no dicts)."""
    if raw.get("pacs") is None:
        return None
    if not isinstance(raw["pacs"], dict):
        raise SiteConfigError(f"{file}: pacs: must be a mapping, got {type(raw['pacs']).__name__}")
    section = _with_resolved_paths(raw["pacs"], _PATHS["pacs"], file.parent)
    if isinstance(section.get("tls"), dict):
        section["tls"] = _with_resolved_paths(section["tls"], ("ca", "certificate", "key"), file.parent)
    for key, cls in (("dimse", DimseConfig), ("studies", StudyQuery), ("tls", PacsTls)):
        if section.get(key) is not None and not isinstance(section[key], dict):
            raise SiteConfigError(f"{file}: pacs.{key}: must be a mapping, got {type(section[key]).__name__}")
        if isinstance(section.get(key), dict):
            section[key] = parse(cls, section[key], str(file), SiteConfigError, prefix=f"pacs.{key}.")
    return parse(PacsConfig, section, str(file), SiteConfigError, prefix="pacs.")


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate a site YAML. Relative paths resolve against the YAML's folder."""
    file = Path(path).expanduser().resolve()
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as err:
        raise SiteConfigError(f"{file}: cannot read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise SiteConfigError(f"{file}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SiteConfigError(f"{file}: top level must be a mapping, got {type(raw).__name__}")
    top = {k: v for k, v in _with_resolved_paths(raw, _PATHS[""], file.parent).items() if v is not None}
    pacs = _pacs_section(raw, file)
    data = _section(raw, file, "data", DataConfig, required=pacs is None) or DataConfig()
    top.update(data=data, privacy=_section(raw, file, "privacy", PrivacyConfig))
    if pacs is not None:
        top["pacs"] = pacs
    backbones = _section(raw, file, "backbones", BackbonePolicy, required=False)
    if backbones is not None:
        top["backbones"] = backbones
    config = parse(SiteConfig, top, str(file), SiteConfigError, source=file)
    _check_folders(config, file)
    return config


def _check_folders(config: SiteConfig, file: Path) -> None:
    """The data exists, its labels can count patients, and the agent's state is outside it."""
    data = config.data
    if data.images is None and config.pacs is None:
        raise SiteConfigError(f"{file}: data.images: is required (or name a pacs)")
    if config.pacs is not None and config.pacs.credentials is not None and not config.pacs.credentials.is_file():
        raise SiteConfigError(f"{file}: pacs.credentials: file not found: {config.pacs.credentials}")
    for key, path in (config.pacs.tls.files().items() if config.pacs and config.pacs.tls else ()):
        if not path.is_file():
            raise SiteConfigError(f"{file}: pacs.tls.{key}: file not found: {path}")
    if data.images is not None and not data.images.is_dir():
        raise SiteConfigError(f"{file}: data.images: folder not found: {data.images}")
    if data.labels is not None and not data.labels.is_file():
        raise SiteConfigError(f"{file}: data.labels: file not found: {data.labels}")
    if data.masks is not None and not data.masks.is_dir():
        raise SiteConfigError(f"{file}: data.masks: folder not found: {data.masks}")
    _check_patient_ids(file, data)
    if config.is_inside_data(config.state_dir):
        raise SiteConfigError(f"{file}: state_dir: {config.state_dir} is inside the hospital's data "
                              "(the agent never writes there); choose a folder outside "
                              "data.images and data.masks")
