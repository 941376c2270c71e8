"""A PACS over DICOMweb: QIDO-RS lists studies, CT series and instances, WADO-RS retrieves each instance."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient

from pasta_model.dicomweb_login import CredentialsError, session_with_credentials, tls_failure, tls_problem

from .types import PacsError, SeriesRef, Store, StudyRef, checked_uid

log = logging.getLogger(__name__)

_STUDY, _SERIES, _SOP, _ACCESSION = "0020000D", "0020000E", "00080018", "00080050"
_DATE, _BODY_PART, _MODALITY = "00080020", "00180015", "00080060"
# the instance as stored (no transcoding by the PACS, which could be lossy)
_AS_STORED = (("application/dicom", "*"),)


def _text(entry: dict, tag: str) -> str:
    """A DICOM JSON attribute's first value as text ("" when absent)."""
    values = entry.get(tag, {}).get("Value") or [""]
    return str(values[0]).strip()


def _value(entry: dict, tag: str, what: str) -> str:
    return checked_uid(_text(entry, tag), what)


def _every_page(search: Callable[..., list[dict]], key: str, *args, **kwargs) -> list[dict]:
    """All results of a QIDO-RS search, page by page (a PACS may cap a page), by `key` once each.

    dicomweb-client's get_remaining asks until a page comes back empty; Orthanc 1.10 ignores
    the offset of a study search by ModalitiesInStudy and answers the same page forever, so
    paging also stops at a page that brings nothing new.
    """
    results: dict[str, dict] = {}
    while True:
        page = search(*args, offset=len(results), **kwargs)
        new = {_text(e, key): e for e in page if _text(e, key) not in results}
        if not new:
            return list(results.values())
        results.update(new)


class DicomWebPacs:
    def __init__(self, url: str, credentials: Path | None = None, *, ca: Path | None = None,
                 client_cert: tuple[Path, Path] | None = None) -> None:
        """`ca`, `client_cert`: the site's pacs.tls (CA file; certificate and key for mutual TLS)."""
        self.url = url.rstrip("/")
        self.ca = ca
        try:
            session = session_with_credentials(credentials, ca=ca, client_cert=client_cert)
        except CredentialsError as err:
            raise PacsError(str(err)) from None
        if problem := tls_problem(session, self.url, ca):
            raise PacsError(f"DICOMweb {problem}")
        self.client = DICOMwebClient(self.url, session=session, timeout=60)

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """HTTP and connection failures as PacsError naming the URL (credentials are never in it)."""
        try:
            yield
        except requests.exceptions.SSLError as err:
            raise PacsError(f"DICOMweb {tls_failure(self.url, err, self.ca)}") from None
        except requests.HTTPError as err:
            status = err.response.status_code if err.response is not None else "?"
            raise PacsError(f"DICOMweb {self.url}: {doing} failed: HTTP {status}") from None
        except requests.RequestException as err:
            raise PacsError(f"DICOMweb {self.url}: {doing} failed: {type(err).__name__}") from None

    def find_studies(self, modality: str, *, study_dates: str | None = None,
                     accession_number: str | None = None) -> list[StudyRef]:
        """QIDO-RS studies holding the modality, in the date range and/or with the accession number."""
        filters = {"ModalitiesInStudy": modality, "StudyDate": study_dates, "AccessionNumber": accession_number}
        with self._errors("QIDO-RS study search"):
            found = _every_page(self.client.search_for_studies, _STUDY,
                                search_filters={k: v for k, v in filters.items() if v},
                                fields=["StudyDate", "AccessionNumber"])
        return [StudyRef(_value(e, _STUDY, "StudyInstanceUID"), _text(e, _DATE), _text(e, _ACCESSION))
                for e in found]

    def find_series(self, study_uid: str, modality: str) -> list[SeriesRef]:
        """QIDO-RS series of the modality in one study, with their BodyPartExamined."""
        with self._errors(f"QIDO-RS series search of study {study_uid}"):
            found = _every_page(self.client.search_for_series, _SERIES, study_uid,
                                search_filters={"Modality": modality}, fields=["BodyPartExamined"])
        return [SeriesRef(study_uid, _value(e, _SERIES, "SeriesInstanceUID"), _text(e, _BODY_PART))
                for e in found if _text(e, _MODALITY) in ("", modality)]

    def find_instances(self, series: SeriesRef) -> list[str]:
        with self._errors(f"QIDO-RS instance search of series {series.series_uid}"):
            found = _every_page(self.client.search_for_instances, _SOP, series.study_uid, series.series_uid)
        return [_value(e, _SOP, "SOPInstanceUID") for e in found]

    def fetch(self, series: SeriesRef, sop_uids: Sequence[str], store: Store, whole_series: bool) -> None:
        """WADO-RS, one instance per request, so an interruption loses at most one instance."""
        for uid in sop_uids:
            with self._errors(f"WADO-RS retrieval of instance {uid}"):
                dataset = self.client.retrieve_instance(series.study_uid, series.series_uid, uid,
                                                        media_types=_AS_STORED)
            store(dataset)
