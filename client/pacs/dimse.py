"""A PACS over DIMSE (pynetdicom): C-FIND lists CT series and instances, C-GET retrieves them.

C-GET returns the instances on the association the agent opened, so the hospital needs
no inbound port for the agent (C-MOVE would).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from pydicom import uid
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from .types import PacsError, SeriesRef, Store, checked_uid

log = logging.getLogger(__name__)

_PENDING = (0xFF00, 0xFF01)
# CT as archives keep it: uncompressed, lossless JPEG 2000 / JPEG / RLE, deflated (and lossy
# JPEG 2000 or JPEG where a site chose it). Offering only uncompressed made Orthanc fail the
# C-GET of a JPEG 2000 series (status 0xC000): it does not transcode for us.
_STORED_SYNTAXES = (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.JPEG2000Lossless,
                    uid.JPEGLosslessSV1, uid.JPEGLossless, uid.RLELossless, uid.DeflatedExplicitVRLittleEndian,
                    uid.JPEG2000, uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit)
_GET_DONE = (0x0000, 0xB000)   # success, or warning: some sub-operations failed (checked below)


def _query(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for key, value in keys.items():
        setattr(ds, key, value)
    return ds


class DimsePacs:
    def __init__(self, host: str, port: int, called_ae: str, calling_ae: str) -> None:
        self.host, self.port, self.called_ae = host, port, called_ae
        self.ae = AE(ae_title=calling_ae)
        self.ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        self.ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for syntax in _STORED_SYNTAXES:   # one context each: the PACS sends an instance as it stores it
            self.ae.add_requested_context(CTImageStorage, [syntax])
        self.where = f"DIMSE {called_ae}@{host}:{port}"

    @contextmanager
    def _association(self, handlers: list | None = None) -> Iterator[Association]:
        assoc = self.ae.associate(self.host, self.port, ae_title=self.called_ae,
                                  ext_neg=[build_role(CTImageStorage, scp_role=True)], evt_handlers=handlers)
        if not assoc.is_established:
            raise PacsError(f"{self.where}: association refused or PACS unreachable")
        try:
            yield assoc
        finally:
            assoc.release()

    def _find(self, assoc: Association, query: Dataset) -> list[Dataset]:
        found = []
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if not status or status.Status not in (*_PENDING, 0x0000):
                raise PacsError(f"{self.where}: C-FIND failed (status {getattr(status, 'Status', 'none')})")
            if status.Status in _PENDING and identifier is not None:
                found.append(identifier)
        return found

    def find_series(self, modality: str, study_uid: str | None = None) -> list[SeriesRef]:
        """Studies holding the modality (or `study_uid` only), then their series of it (one association)."""
        series = []
        with self._association() as assoc:
            studies = ([study_uid] if study_uid is not None else
                       [checked_uid(study.get("StudyInstanceUID"), "StudyInstanceUID") for study in
                        self._find(assoc, _query("STUDY", StudyInstanceUID="", ModalitiesInStudy=modality))])
            for uid in studies:
                query = _query("SERIES", StudyInstanceUID=uid, SeriesInstanceUID="", Modality=modality)
                series += [SeriesRef(uid, checked_uid(found.get("SeriesInstanceUID"), "SeriesInstanceUID"))
                           for found in self._find(assoc, query)]
        return series

    def find_studies(self, accession_number: str) -> list[str]:
        """StudyInstanceUIDs whose AccessionNumber is exactly this one (the PACS may match loosely)."""
        query = _query("STUDY", StudyInstanceUID="", AccessionNumber=accession_number)
        with self._association() as assoc:
            found = self._find(assoc, query)
        return [checked_uid(f.get("StudyInstanceUID"), "StudyInstanceUID") for f in found
                if str(f.get("AccessionNumber", "")) == accession_number]

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
