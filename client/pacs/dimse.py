"""A PACS over DIMSE (pynetdicom): C-FIND lists CT series and instances, C-GET retrieves them,
C-STORE sends predict's SEG and SR back.

C-GET returns the instances on the association the agent opened, so the hospital needs
no inbound port for the agent (C-MOVE would). With the site's pacs.tls every association
is DICOM TLS: the PACS' certificate verified with its CA, the agent's presented for mutual TLS.
"""
from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pydicom import dcmread, uid
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    CTImageStorage,
    SegmentationStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from pasta_model.dicomweb_login import tls_failure

from .types import PacsError, SeriesRef, Store, StudyRef, checked_uid

log = logging.getLogger(__name__)

_PENDING = (0xFF00, 0xFF01)
# CT as archives keep it: uncompressed, lossless JPEG 2000 / JPEG / RLE, deflated (and lossy
# JPEG 2000 or JPEG where a site chose it). Offering only uncompressed made Orthanc fail the
# C-GET of a JPEG 2000 series (status 0xC000): it does not transcode for us.
_STORED_SYNTAXES = (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.JPEG2000Lossless,
                    uid.JPEGLosslessSV1, uid.JPEGLossless, uid.RLELossless, uid.DeflatedExplicitVRLittleEndian,
                    uid.JPEG2000, uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit)
_GET_DONE = (0x0000, 0xB000)   # success, or warning: some sub-operations failed (checked below)
# what `client predict --store` sends: its Segmentation and its TID 1500 SR
_RESULT_CLASSES = {SegmentationStorage: "Segmentation", Comprehensive3DSRStorage: "Comprehensive 3D SR"}
_RESULT_SYNTAXES = (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian)
_STORED_WITH_WARNING = (0xB000, 0xB006, 0xB007)   # stored; coerced, elements discarded, or not quite the class


class _WithoutTraceback(logging.Filter):
    """pynetdicom logs a failed TLS handshake, or a connection the PACS reset, with a traceback;
    the PacsError says it in one line (`-v`, which logs pynetdicom at DEBUG, keeps the traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            record.exc_info, record.exc_text = None, None
        return True


for _module in ("transport", "dul", "acse", "association"):
    logging.getLogger(f"pynetdicom.{_module}").addFilter(_WithoutTraceback())


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _query(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for key, value in keys.items():
        setattr(ds, key, value)
    return ds


def tls_context(where: str, ca: Path, client_cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    """A client TLS context: the PACS' certificate must chain to `ca` and name its host."""
    try:
        context = ssl.create_default_context(cafile=str(ca))
        if client_cert is not None:
            context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
    except (ssl.SSLError, OSError) as err:
        raise PacsError(f"{where}: TLS: cannot load pacs.tls files ({type(err).__name__}: "
                        f"{getattr(err, 'reason', None) or err.strerror or err})") from None
    return context


class DimsePacs:
    def __init__(self, host: str, port: int, called_ae: str, calling_ae: str, *, ca: Path | None = None,
                 client_cert: tuple[Path, Path] | None = None) -> None:
        """`ca`, `client_cert`: the site's pacs.tls (CA file; certificate and key for mutual TLS)."""
        self.host, self.port, self.called_ae = host, port, called_ae
        self.ae = AE(ae_title=calling_ae)
        self.ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        self.ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for syntax in _STORED_SYNTAXES:   # one context each: the PACS sends an instance as it stores it
            self.ae.add_requested_context(CTImageStorage, [syntax])
        self.where = f"DIMSE {called_ae}@{host}:{port}"
        self.ca = ca
        self.tls_args = None if ca is None else (tls_context(self.where, ca, client_cert), host)

    @contextmanager
    def _association(self, handlers: list | None = None,
                     contexts: list[PresentationContext] | None = None) -> Iterator[Association]:
        """An association for C-FIND/C-GET (the AE's contexts), or for C-STORE of `contexts`."""
        ext_neg: list | None = None if contexts else [build_role(CTImageStorage, scp_role=True)]
        assoc = self.ae.associate(self.host, self.port, contexts=contexts, ae_title=self.called_ae,
                                  ext_neg=ext_neg, evt_handlers=handlers, tls_args=self.tls_args)
        if not assoc.is_established:
            problem = self._tls_problem() if self.tls_args else None
            raise PacsError(problem or f"{self.where}: association refused or PACS unreachable"
                                       f"{' (over TLS)' if self.tls_args else ''}")
        try:
            yield assoc
        finally:
            assoc.release()

    def _tls_problem(self) -> str | None:
        """Why TLS to the PACS fails (pynetdicom only logs it), or None when a handshake goes through."""
        assert self.tls_args is not None
        context, hostname = self.tls_args
        try:
            with socket.create_connection((self.host, self.port), timeout=10) as raw, \
                    context.wrap_socket(raw, server_hostname=hostname) as tls:
                tls.settimeout(2)
                try:
                    tls.recv(1)     # a PACS refusing the agent's certificate says so after the handshake (TLS 1.3)
                except TimeoutError:
                    pass
        except ssl.SSLError as err:
            return tls_failure(self.where, err, self.ca)
        except OSError:
            return None
        return None

    def store(self, paths: Sequence[str | Path]) -> int:
        """C-STORE the SEG and SR files on one association; returns how many the PACS stored."""
        datasets = [dcmread(p) for p in paths]
        for path, ds in zip(paths, datasets, strict=True):
            if ds.get("SOPClassUID") not in _RESULT_CLASSES:
                raise PacsError(f"{path}: SOP class {ds.get('SOPClassUID')} is not one C-STORE sends here "
                                f"({', '.join(_RESULT_CLASSES.values())})")
        contexts = [build_context(sop_class, list(_RESULT_SYNTAXES)) for sop_class in _RESULT_CLASSES]
        with self._association(contexts=contexts) as assoc:
            for path, ds in zip(paths, datasets, strict=True):
                what = f"{_RESULT_CLASSES[ds.SOPClassUID]} {Path(path).name}"
                try:
                    status = assoc.send_c_store(ds)
                except ValueError as err:      # no accepted presentation context for it
                    raise PacsError(f"{self.where}: C-STORE of {what} refused: {err}") from None
                code = getattr(status, "Status", None)
                if code in _STORED_WITH_WARNING:
                    log.warning("%s: C-STORE of %s stored with warning status %s", self.where, what, hex(code))
                elif code != 0x0000:
                    raise PacsError(f"{self.where}: C-STORE of {what} failed "
                                    f"(status {'none: no answer' if code is None else hex(code)})")
        log.info("stored %d instance(s) to %s by C-STORE", len(datasets), self.where)
        return len(datasets)

    def _find(self, assoc: Association, query: Dataset) -> list[Dataset]:
        found = []
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if not status or status.Status not in (*_PENDING, 0x0000):
                raise PacsError(f"{self.where}: C-FIND failed (status {getattr(status, 'Status', 'none')})")
            if status.Status in _PENDING and identifier is not None:
                found.append(identifier)
        return found

    def find_studies(self, modality: str, *, study_dates: str | None = None,
                     accession_number: str | None = None) -> list[StudyRef]:
        """C-FIND studies holding the modality, in the date range and/or with the accession number."""
        query = _query("STUDY", StudyInstanceUID="", ModalitiesInStudy=modality, StudyDate=study_dates or "",
                       AccessionNumber=accession_number or "")
        with self._association() as assoc:
            found = self._find(assoc, query)
        return [StudyRef(checked_uid(f.get("StudyInstanceUID"), "StudyInstanceUID"), _text(f, "StudyDate"),
                         _text(f, "AccessionNumber")) for f in found]

    def find_series(self, study_uid: str, modality: str) -> list[SeriesRef]:
        """C-FIND series of the modality in one study, with their BodyPartExamined."""
        query = _query("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="", Modality=modality,
                       BodyPartExamined="")
        with self._association() as assoc:
            found = self._find(assoc, query)
        return [SeriesRef(study_uid, checked_uid(f.get("SeriesInstanceUID"), "SeriesInstanceUID"),
                          _text(f, "BodyPartExamined")) for f in found if _text(f, "Modality") in ("", modality)]

    def find_instances(self, series: SeriesRef) -> list[str]:
        query = _query("IMAGE", StudyInstanceUID=series.study_uid, SeriesInstanceUID=series.series_uid,
                       SOPInstanceUID="")
        with self._association() as assoc:
            found = self._find(assoc, query)
        return [checked_uid(f.get("SOPInstanceUID"), "SOPInstanceUID") for f in found]

    def fetch(self, series: SeriesRef, sop_uids: Sequence[str], store: Store, whole_series: bool) -> None:
        """C-GET the whole series when nothing of it is cached, else the missing instances one by one."""
        failure: list[BaseException] = []

        def on_store(event) -> int:
            if failure:
                return 0xA700          # out of resources: stop taking instances after a failure
            try:
                dataset = event.dataset
                dataset.file_meta = event.file_meta
                store(dataset)
            except BaseException as err:   # re-raised once the association is released
                failure.append(err)
                return 0xA700
            return 0x0000

        base = {"StudyInstanceUID": series.study_uid, "SeriesInstanceUID": series.series_uid}
        queries = ([_query("SERIES", **base)] if whole_series
                   else [_query("IMAGE", **base, SOPInstanceUID=uid) for uid in sop_uids])
        with self._association([(evt.EVT_C_STORE, on_store)]) as assoc:
            for query in queries:
                self._get(assoc, query)
                if failure:
                    break
        if failure:
            raise failure[0]

    def _get(self, assoc: Association, query: Dataset) -> None:
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            code = getattr(status, "Status", None)
            if code is None or code not in (*_PENDING, *_GET_DONE):
                raise PacsError(f"{self.where}: C-GET failed (status {code if code is None else hex(code)})")
