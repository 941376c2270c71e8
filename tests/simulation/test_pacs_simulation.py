"""`pasta-fed simulate --pacs`: one hospital keeps its CT in a real Orthanc; the federation runs the same."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from client.check import check_site
from client.ingest import read_case, scan_site
from client.site_config import load_site_config
from pasta_model.protocol import EPSILON
from simulation import commands, pacs_site
from simulation.cli import build_parser, main
from simulation.commands import config_from_args
from simulation.config import SimulationConfig, SimulationConfigError
from simulation.orthanc import INSTALL, installed, running_orthanc
from simulation.pacs_site import EXPORT_FOLDER, nifti_to_dicom_series
from simulation.runner import simulate
from synth.dataset import generate_dataset, read_dataset

PRIVACY = {"max_epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0}
# 25 cases: 5 validation patients (a fifth), the least that releases evaluation metrics
SMALL = dict(hospitals=2, rounds=1, preset="tiny", task="detect", volume_size=48, cases_min=8, cases_max=25,
             heldout_cases=5, comparisons=[], audit=False, pacs=True)


def folder_site(root: Path, images: Path, labels: Path | None = None, masks: Path | None = None):
    """A site reading `images` as a folder (the reference the PACS copy must match)."""
    data = {"images": str(images), **({"labels": str(labels)} if labels else {}),
            **({"masks": str(masks)} if masks else {})}
    config = {"site": "folder", "data": data, "privacy": PRIVACY, "state_dir": str(root / "state"), "device": "cpu"}
    root.mkdir(parents=True, exist_ok=True)
    (root / "site.yaml").write_text(yaml.safe_dump(config))
    return load_site_config(root / "site.yaml")


def verdicts(config) -> list[tuple]:
    return [(c.case_id, c.status, c.reason, c.shape, c.spacing, c.hu_min, c.hu_max, c.tasks)
            for c in check_site(config).cases]


def orthanc_processes(config: Path) -> list[int]:
    """Live processes started with this Orthanc config (a zombie or a gone one is not listed)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(config).encode() in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def test_a_nifti_case_becomes_a_dicom_series_ingestion_reads_with_the_same_voxels(tmp_path: Path):
    generate_dataset(tmp_path / "gen", 1, size=48, spacing=3.0, seed=3, progress=False)
    nifti = read_dataset(tmp_path / "gen")[0].img
    series = nifti_to_dicom_series(nifti, tmp_path / "dicom" / "case", "P7", seed="t/case")
    assert series == nifti_to_dicom_series(nifti, tmp_path / "again", "P7", seed="t/case")   # stable UIDs
    scan = scan_site(folder_site(tmp_path / "site", tmp_path / "dicom"))
    assert not scan.rejected and [c.series_uid for c in scan.cases] == [series]
    read = read_case(scan.cases[0]).image
    original = sitk.ReadImage(str(nifti))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(original))
    np.testing.assert_allclose(read.GetOrigin(), original.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(read.GetSpacing(), original.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(read.GetDirection(), original.GetDirection(), atol=1e-6)


def test_the_pacs_flag_sets_the_config_and_its_absence_keeps_the_yaml():
    assert config_from_args(build_parser().parse_args(["simulate", "--pacs"])).pacs is True
    assert config_from_args(build_parser().parse_args(["simulate"])).pacs is False


def test_pacs_without_orthanc_fails_at_start_saying_how_to_install_it(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(pacs_site, "installed", lambda: False)
    with pytest.raises(SimulationConfigError, match="apt-get install -y orthanc orthanc-dicomweb"):
        simulate(SimulationConfig(**SMALL), tmp_path / "run")
    assert not (tmp_path / "run" / "sites").exists(), "nothing may be generated before the check"


def needs_orthanc() -> None:
    if not installed():
        pytest.skip(f"Orthanc with its DICOMweb plugin is not installed; {INSTALL}")


def test_the_simulations_orthanc_is_stopped_when_the_run_fails(tmp_path: Path):
    needs_orthanc()
    with pytest.raises(RuntimeError, match="the federation failed"), running_orthanc(tmp_path / "pacs") as server:
        assert orthanc_processes(tmp_path / "pacs" / "orthanc.json") == [server.process.pid]
        raise RuntimeError("the federation failed")
    assert server.process.poll() is not None
    assert not orthanc_processes(tmp_path / "pacs" / "orthanc.json")


@pytest.mark.slow
def test_the_demo_pretrains_then_federates_with_a_pacs_hospital_that_reads_like_its_folder_copy(
        tmp_path: Path, monkeypatch, capsys):
    """`pasta-fed demo` on a small config with --pacs's setting: the short pretraining and its figures,
    then a federation in which hospital-a's CT lives only in a real Orthanc; that hospital's verdicts
    equal its folder copy's, it trains and it evaluates, and the Orthanc is gone afterwards."""
    needs_orthanc()
    demo = tmp_path / "demo.yaml"
    demo.write_text(yaml.safe_dump({"simulation": {**SMALL, "comparisons": ["local"], "pretrain_cases": 8,
                                                   "pretrain_minutes": 0.2}}))
    monkeypatch.setattr(commands, "DEMO_CONFIG", demo)
    monkeypatch.setenv("PASTA_FED_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["demo", "--out", str(run)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"report: {run / 'report.md'}"
    figures = json.loads((run / "demo-pretraining.json").read_text(encoding="utf-8"))
    assert figures["heldout_cases"] == 8 and 0.0 <= figures["detect_auc"] <= 1.0
    assert figures["checkpoint"].startswith(str(tmp_path / "cache"))
    assert "local alone (DP)" in (run / "report.md").read_text(encoding="utf-8")
    assert not orthanc_processes(run / "pacs" / "orthanc.json"), "the simulation left its Orthanc running"

    site = run / "sites" / "hospital-a"
    raw = yaml.safe_load((site / "hospital.yaml").read_text())
    assert "images" not in raw["data"] and raw["pacs"]["dicomweb"].startswith("http://127.0.0.1:")
    pacs = load_site_config(site / "hospital.yaml")
    folder = folder_site(tmp_path / "folder", site / EXPORT_FOLDER, pacs.data.labels, pacs.data.masks)
    from_pacs = verdicts(pacs)
    assert from_pacs == verdicts(folder)
    assert sum(v[1] == "ok" for v in from_pacs) == 25

    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert record["sites"]["hospital-a"]["train"][EPSILON] > 0
    summary = check_site(pacs).summary
    assert summary["validation_patients_per_task"]["detect"] >= summary["min_cases_for_metrics"]
    assert record["sites"]["hospital-a"].get("evaluate"), record["sites"]["hospital-a"]
