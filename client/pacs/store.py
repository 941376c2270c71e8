"""predict's SEG and SR sent back to the site's PACS: STOW-RS over DICOMweb, C-STORE over DIMSE.

Both go with the site's own settings: its credentials (DICOMweb) and its pacs.tls.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .types import PacsError


def store_results(config, paths: Sequence[str | Path]) -> int:
    """Store the files to the PACS the site YAML names; returns how many instances it accepted.

    Raises PacsError (DIMSE) or pasta_model.dicom_results.DicomStoreError (DICOMweb), each naming the PACS.
    """
    pacs = config.pacs
    if pacs is None:
        raise PacsError(f"{config.source}: no pacs section")
    tls = pacs.tls
    if pacs.dicomweb is not None:
        from pasta_model.dicom_results import store_dicomweb

        return store_dicomweb(pacs.dicomweb, paths, pacs.credentials, ca=tls and tls.ca,
                              client_cert=tls and tls.client_cert)
    from .dimse import DimsePacs

    d = pacs.dimse
    return DimsePacs(d.host, d.port, d.called_ae, d.calling_ae, ca=tls and tls.ca,
                     client_cert=tls and tls.client_cert).store(paths)
