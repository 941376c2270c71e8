"""A PACS over DICOMweb: QIDO-RS lists studies, CT series and instances, WADO-RS retrieves each instance."""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient

from pasta_model.dicomweb_login import CredentialsError, session_with_credentials

from .types import PacsError, SeriesRef, Store, checked_uid

log = logging.getLogger(__name__)

_STUDY, _SERIES, _SOP, _ACCESSION = "0020000D", "0020000E", "00080018", "00080050"
# the instance as stored (no transcoding by the PACS, which could be lossy)
_AS_STORED = (("application/dicom", "*"),)


def _value(entry: dict, tag: str, what: str) -> str:
    values = entry.get(tag, {}).get("Value") or [""]
    return checked_uid(values[0], what)


class DicomWebPacs:
    def __init__(self, url: str, credentials: Path | None = None) -> None:
        self.url = url.rstrip("/")
        try:
            session = session_with_credentials(credentials)
        except CredentialsError as err:
            raise PacsError(str(err)) from None
        self.client = DICOMwebClient(self.url, session=session, timeout=60)

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """HTTP and connection failures as PacsError naming the URL (credentials are never in it)."""
        try:
            yield
        except requests.HTTPError as err:
            status = err.response.status_code if err.response is not None else "?"
            raise PacsError(f"DICOMweb {self.url}: {doing} failed: HTTP {status}") from None
        except requests.RequestException as err:
            raise PacsError(f"DICOMweb {self.url}: {doing} failed: {type(err).__name__}") from None

    def find_series(self, modality: str, study_uid: str | None = None) -> list[SeriesRef]:
        """The modality's series of every study, or of `study_uid` only."""
        with self._errors("QIDO-RS series search"):
            found = self.client.search_for_series(study_uid, search_filters={"Modality": modality},
                                                  get_remaining=True)
        refs = [SeriesRef(_value(e, _STUDY, "StudyInstanceUID") if _STUDY in e else study_uid,
                          _value(e, _SERIES, "SeriesInstanceUID")) for e in found]
        return [ref for ref in refs if study_uid is None or ref.study_uid == study_uid]

    def find_studies(self, accession_number: str) -> list[str]:
        """StudyInstanceUIDs whose AccessionNumber is exactly this one (the PACS may match loosely)."""
        with self._errors("QIDO-RS study search by accession number"):
            found = self.client.search_for_studies(search_filters={"AccessionNumber": accession_number},
                                                   get_remaining=True)
        return [_value(e, _STUDY, "StudyInstanceUID") for e in found
                if (e.get(_ACCESSION, {}).get("Value") or [""])[0] == accession_number]

    def find_instances(self, series: SeriesRef) -> list[str]:
        with self._errors(f"QIDO-RS instance search of series {series.series_uid}"):
            found = self.client.search_for_instances(series.study_uid, series.series_uid, get_remaining=True)
        return [_value(e, _SOP, "SOPInstanceUID") for e in found]

    def fetch(self, series: SeriesRef, sop_uids: Sequence[str], store: Store, whole_series: bool) -> None:
        """WADO-RS, one instance per request, so an interruption loses at most one instance."""
        for uid in sop_uids:
            with self._errors(f"WADO-RS retrieval of instance {uid}"):
                dataset = self.client.retrieve_instance(series.study_uid, series.series_uid, uid,
                                                        media_types=_AS_STORED)
            store(dataset)
