"""PACS ingestion throughput: DICOMweb and DIMSE retrieval against reading the same files from a folder.

Starts a real Orthanc (tests/orthanc_pacs.py's helpers: the same config the tests use),
stores N pydicom-written CT series in it (not timed), then times in this run, on this
machine, three ways of ingesting the very same series:
  dicomweb  `retrieve` into an empty cache over QIDO-RS/WADO-RS, then `scan_site`
  dimse     `retrieve` into an empty cache over C-FIND/C-GET, then `scan_site`
  folder    `scan_site` of the exported files (no retrieval: the floor a PACS adds to)
Each must find all N series usable, or the bench fails. The folder's files are in the page
cache (just written), as the PACS cache's are after retrieval, so the ratios compare
protocols, not disks.

The last line printed is one JSON object:
  series, instances               what was ingested each way
  *_series_per_min                series ingested per minute, per way
  dicomweb_vs_folder, dimse_vs_folder   folder wall time / that way's wall time (<= 1)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

CALLING_AE = "PASTAFED"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.ingest import scan_site  # noqa: E402
from client.pacs.retrieve import retrieve  # noqa: E402
from client.site_config import load_site_config  # noqa: E402
from simulation.orthanc import INSTALL, ORTHANC_AE, USER, installed, start_orthanc, stop_orthanc  # noqa: E402


def _slice(series: dict, k: int, pixels: np.ndarray) -> Dataset:
    """One CT slice, the header fields ingestion checks (geometry, rescale) and nothing more."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = CTImageStorage, ExplicitVRLittleEndian
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = series["study"], series["series"]
    ds.FrameOfReferenceUID = series["frame"]
    ds.Modality, ds.PatientID, ds.PatientName = "CT", series["patient"], "Bench^Patient"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = k + 1
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing, ds.SliceThickness = ["0.8", "0.8"], "2.5"
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.ImagePositionPatient = ["-100", "-100", f"{2.5 * k:g}"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "1", "-1024", "HU"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds


def write_series(folder: Path, n_series: int, slices: int, size: int) -> list[Path]:
    """N CT series of `slices` slices of size x size, one file per slice, each series its own study."""
    rng = np.random.default_rng(0)
    files = []
    for s in range(n_series):
        series = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid(), "patient": f"B{s:03d}"}
        (folder / f"s{s}").mkdir(parents=True)
        for k in range(slices):
            path = folder / f"s{s}" / f"{k:04d}.dcm"
            _slice(series, k, rng.integers(0, 2000, (size, size), dtype=np.int16)).save_as(
                path, enforce_file_format=True)
            files.append(path)
    return files


def _site(root: Path, **sections) -> object:
    """A site YAML of its own under `root` (own state_dir, so every PACS way starts with an empty cache)."""
    root.mkdir(parents=True)
    config = {"site": "bench-pacs", "privacy": {"max_epsilon": 8.0, "delta": 1.0e-5, "max_grad_norm": 1.0},
              "state_dir": str(root / "state"), "device": "cpu", **sections}
    (root / "site.yaml").write_text(yaml.safe_dump(config))
    return load_site_config(root / "site.yaml")


def _timed(config, n_series: int, fetch: bool) -> float:
    """Wall seconds to (retrieve and) scan a site; fails unless all series come out usable."""
    t0 = time.perf_counter()
    if fetch:
        retrieve(config)
    cases = scan_site(config).cases
    seconds = time.perf_counter() - t0
    if len(cases) != n_series:
        raise SystemExit(f"{config.source}: {len(cases)} usable series, expected {n_series}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=6)
    ap.add_argument("--slices", type=int, default=40)
    ap.add_argument("--size", type=int, default=256, help="rows = columns of each slice")
    args = ap.parse_args(argv)
    if not installed():
        print(f"Orthanc with its DICOMweb plugin is not installed; {INSTALL}")
        return 2
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = write_series(work / "export", args.series, args.slices, args.size)
        mb = sum(f.stat().st_size for f in files) / 1e6
        server = start_orthanc(work / "orthanc", peer_ae=CALLING_AE)
        try:
            server.upload(files)
            (work / "pacs.json").write_text(json.dumps({"username": USER, "password": server.password}))
            dimse = {"host": "127.0.0.1", "port": server.dicom_port, "called_ae": ORTHANC_AE,
                     "calling_ae": CALLING_AE}
            ways: dict[str, Callable[[], float]] = {
                "dicomweb": lambda: _timed(_site(work / "web", pacs={"dicomweb": server.dicomweb, "credentials":
                                                                     str(work / "pacs.json")}), args.series, True),
                "dimse": lambda: _timed(_site(work / "dimse", pacs={"dimse": dimse}), args.series, True),
                "folder": lambda: _timed(_site(work / "folder", data={"images": str(work / "export"),
                                                                      "one_scan_per_patient": True}),
                                         args.series, False),
            }
            seconds = {name: way() for name, way in ways.items()}
        finally:
            stop_orthanc(server, grace_s=0)
    per_min = {name: round(args.series / s * 60.0, 1) for name, s in seconds.items()}
    print(f"{args.series} series x {args.slices} slices of {args.size}x{args.size} ({len(files)} instances, "
          f"{mb:.0f} MB)")
    print(f"{'way':<10}{'seconds':>10}{'series/min':>12}")
    for name, s in seconds.items():
        print(f"{name:<10}{s:>10.2f}{per_min[name]:>12.1f}")
    print(json.dumps({
        "series": args.series, "instances": len(files),
        "dicomweb_series_per_min": per_min["dicomweb"], "dimse_series_per_min": per_min["dimse"],
        "folder_series_per_min": per_min["folder"],
        "dicomweb_vs_folder": round(seconds["folder"] / seconds["dicomweb"], 3),
        "dimse_vs_folder": round(seconds["folder"] / seconds["dimse"], 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
