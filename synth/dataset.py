"""The PASTA-Gen-30K layout on disk: writing cases atomically, the manifest, and a reader.

    OUT/<Organ>/<Type>/<id>/{img.nii.gz, label.nii.gz, total.nii.gz, type.json}
    OUT/manifest.jsonl      one case a line
    OUT/synth.json          the settings the dataset was generated with

A case is written into a hidden `.<id>.partial-<pid>` folder and renamed into place, so
a case folder that exists is complete; a rerun removes partial folders and redoes them.
The reader also reads the released PASTA-Gen-30K (e.g. `Liver/Tumor/1020/`), which has
no manifest and names its folders differently.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from synth.atomic import write_atomic
from synth.errors import SynthInputError
from synth.vocabulary import LESION_TYPE_BY_NAME, LESION_TYPES, ORGAN_FOLDERS

CASE_FILES = ("img.nii.gz", "label.nii.gz", "total.nii.gz", "type.json")
MANIFEST = "manifest.jsonl"
RUN_FILE = "synth.json"
PARTIAL = ".partial-"

MANIFEST_KEYS = ("id", "index", "organ", "lesion_type", "malignant", "phase", "t_stage",
                 "survival_months", "survival_event", "shape", "spacing_mm", "source")


def case_dir(root: Path, lesion_type: str, case_id: str) -> Path:
    organ = LESION_TYPE_BY_NAME[lesion_type].organ
    return Path(root) / ORGAN_FOLDERS[organ] / lesion_type / case_id


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def manifest_row(report: dict, rel: str) -> dict:
    row = {k: report.get(k) for k in MANIFEST_KEYS}
    row["path"] = rel
    row["n_lesions"] = len(report.get("lesions", []))
    return row


def write_case(root: Path, case) -> dict:
    """Write one case (a `synth.generate.Case`) atomically; return its manifest row."""
    root = Path(root)
    final = case_dir(root, case.report["lesion_type"], case.report["id"])
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}{PARTIAL}{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_nifti(tmp / "img.nii.gz", case.image, case.affine)
    save_nifti(tmp / "label.nii.gz", case.label, case.affine)
    save_nifti(tmp / "total.nii.gz", case.total, case.affine)
    (tmp / "type.json").write_text(json.dumps(case.report, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return manifest_row(case.report, final.relative_to(root).as_posix())


def is_complete(path: Path) -> bool:
    if not all((path / f).is_file() for f in CASE_FILES):
        return False
    try:
        json.loads((path / "type.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def remove_partials(root: Path) -> int:
    """Delete half-written case folders left by an interrupted run; return how many."""
    n = 0
    root = Path(root)
    for organ in ORGAN_FOLDERS.values():
        for type_dir in (root / organ).glob("*"):
            for p in type_dir.glob(f".*{PARTIAL}*"):
                shutil.rmtree(p, ignore_errors=True)
                n += 1
    return n


def write_manifest(root: Path, rows: list[dict]) -> Path:
    root = Path(root)
    rows = sorted(rows, key=lambda r: (r.get("index") is None, r.get("index") or 0, r["path"]))
    write_atomic(root / MANIFEST, "".join(json.dumps(r) + "\n" for r in rows))
    return root / MANIFEST


def check_run_settings(root: Path, settings: dict) -> None:
    """Refuse to add cases to a folder generated with other settings; record them if new."""
    path = Path(root) / RUN_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if old != settings:
            diff = sorted(k for k in set(settings) | set(old or {}) if (old or {}).get(k) != settings.get(k))
            raise SynthInputError(
                f"--out {root}: holds a dataset generated with other settings ({', '.join(diff)}); "
                "use another folder or the same settings"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def generate_dataset(out, n: int, config=None, **kwargs) -> list[dict]:
    """Generate a dataset in this layout: `synth.run.generate_dataset`, here beside its reader."""
    from synth.run import generate_dataset as _generate

    return _generate(out, n, config, **kwargs)


# ---- reading --------------------------------------------------------------------------

_ORGAN_ALIASES = {
    "lung": "lung", "liver": "liver", "gall": "gallbladder", "gallbladder": "gallbladder",
    "pancreas": "pancreas", "esophagus": "esophagus", "oesophagus": "esophagus",
    "stomach": "stomach", "gastric": "stomach", "colon": "colon", "colorectal": "colon",
    "kidney": "kidney", "bladder": "urinary_bladder", "urinary_bladder": "urinary_bladder",
    "bone": "bone",
}
_KIND_ALIASES = {"tumor": "malignant", "tumour": "malignant", "cancer": "malignant",
                 "carcinoma": "malignant", "metastasis": "malignant", "metastases": "malignant",
                 "mets": "malignant", "cyst": "cyst", "stone": "stone", "calculus": "stone"}


def resolve_lesion_type(organ_folder: str, type_folder: str, report: dict | None = None) -> str | None:
    """Our lesion type for a case folder, ours (`Liver/liver_cancer`) or released
    (`Liver/Tumor`, `Gall/Stone`, ...); None when it cannot be told."""
    if type_folder in LESION_TYPE_BY_NAME:
        return type_folder
    if report and report.get("lesion_type") in LESION_TYPE_BY_NAME:
        return report["lesion_type"]
    organ = _ORGAN_ALIASES.get(organ_folder.lower())
    kind = _KIND_ALIASES.get(type_folder.lower())
    if organ is None or kind is None:
        return None
    for lt in LESION_TYPES:
        if lt.organ != organ:
            continue
        if kind == "malignant" and lt.malignant:
            return lt.name
        if kind == "cyst" and lt.name.endswith("cyst"):
            return lt.name
        if kind == "stone" and (lt.name.endswith("stone")):
            return lt.name
    return None


@dataclass
class CaseRecord:
    path: Path
    case_id: str
    organ: str | None
    lesion_type: str | None
    row: dict

    @property
    def img(self) -> Path:
        return self.path / "img.nii.gz"

    @property
    def label(self) -> Path:
        return self.path / "label.nii.gz"

    @property
    def total(self) -> Path:
        return self.path / "total.nii.gz"

    def report(self) -> dict:
        try:
            return json.loads((self.path / "type.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """(image HU float32, label uint8, total or None, affine)."""
        img = nib.load(str(self.img))
        image = np.asarray(img.dataobj, dtype=np.float32)
        label = np.asarray(nib.load(str(self.label)).dataobj).astype(np.uint8)
        total = np.asarray(nib.load(str(self.total)).dataobj) if self.total.exists() else None
        return image, label, total, img.affine


def read_dataset(root: str | Path) -> list[CaseRecord]:
    """Every case under `root`: from manifest.jsonl when there is one, else by walking
    `<Organ>/<Type>/<id>/` folders that hold an img.nii.gz (the released layout)."""
    root = Path(root)
    if not root.is_dir():
        raise SynthInputError(f"{root}: not a folder")
    out = []
    man = root / MANIFEST
    if man.exists():
        for line in man.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            p = root / row["path"]
            out.append(CaseRecord(p, str(row.get("id") or p.name), row.get("organ"), row.get("lesion_type"), row))
        return out
    for organ_dir in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for type_dir in sorted(d for d in organ_dir.iterdir() if d.is_dir() and not d.name.startswith(".")):
            for cdir in sorted((d for d in type_dir.iterdir() if d.is_dir() and not d.name.startswith(".")),
                               key=lambda d: (len(d.name), d.name)):
                if not (cdir / "img.nii.gz").exists():
                    continue
                # released ids repeat across folders (Liver/Tumor/12, Liver/Cyst/12): qualify them
                rec = CaseRecord(cdir, f"{organ_dir.name}-{type_dir.name}-{cdir.name}", None, None, {})
                rep = rec.report()
                lt = resolve_lesion_type(organ_dir.name, type_dir.name, rep)
                rec.lesion_type = lt
                rec.organ = LESION_TYPE_BY_NAME[lt].organ if lt else _ORGAN_ALIASES.get(organ_dir.name.lower())
                rec.row = {"id": rec.case_id, "path": cdir.relative_to(root).as_posix(),
                           "organ": rec.organ, "lesion_type": lt}
                out.append(rec)
    return out
