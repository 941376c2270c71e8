"""Read one discovered case: HU volume with its patient geometry, plus its mask if any."""
from __future__ import annotations

import hashlib

from . import dicom, nifti
from .types import CaseSource, IngestError, LoadedCase


def read_case(source: CaseSource) -> LoadedCase:
    """Read pixels of one case; raises IngestError naming the file and the problem."""
    if source.kind == "dicom":
        image = dicom.read_series(source.files)
        if image.GetSize()[2] != len(source.files):
            raise IngestError(f"{source.source}: read {image.GetSize()[2]} slices from "
                              f"{len(source.files)} files")
    else:
        image = nifti.read_nifti(source.files[0])
    mask = nifti.read_mask(source.mask, image) if source.mask is not None else None
    return LoadedCase(source=source, image=image, mask=mask)


def source_digest(source: CaseSource) -> str:
    """SHA-256 over the case's file contents (slices in order, then the mask): a cache key."""
    digest = hashlib.sha256()
    for path in (*source.files, *( [source.mask] if source.mask else [])):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
