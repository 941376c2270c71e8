"""The site YAML is validated on load; every error names the file and the key path."""
from __future__ import annotations

import pytest
import yaml

from client.site_config import SiteConfigError, load_site_config


def _write(tmp_path, config: dict):
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def base(tmp_path) -> dict:
    (tmp_path / "ct").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "labels.csv").write_text("case_id,patient_id\n")
    return {
        "site": "hospital-a",
        "data": {"images": "ct", "labels": "labels.csv", "masks": "masks"},
        "privacy": {"max_epsilon": 8.0, "delta": 1.0e-5, "max_grad_norm": 1.0},
        "state_dir": "state",
        "device": "auto",
    }


def test_relative_paths_resolve_against_the_yaml_folder(tmp_path, base):
    config = load_site_config(_write(tmp_path, base))
    assert config.site == "hospital-a"
    assert config.data.images == (tmp_path / "ct").resolve()
    assert config.data.labels == (tmp_path / "labels.csv").resolve()
    assert config.state_dir == (tmp_path / "state").resolve()
    assert config.privacy.max_epsilon == 8.0 and config.privacy.delta == 1e-5
    assert config.min_cases_for_metrics == 5 and config.backbone is None


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["privacy"].update(max_epsilon=-1), "privacy.max_epsilon: must be > 0, got -1"),
    (lambda c: c["privacy"].update(delta=1.5), "privacy.delta: must be < 1, got 1.5"),
    (lambda c: c["privacy"].update(delta=1.0), "privacy.delta: must be < 1, got 1.0"),
    (lambda c: c["privacy"].update(delta=0.05), "privacy.delta: must be at most 0.01"),
    (lambda c: c["data"].update(one_scan_per_patient="yes"), "data.one_scan_per_patient: must be true or false"),
    (lambda c: c["privacy"].update(max_grad_norm="one"), "privacy.max_grad_norm: must be a number"),
    (lambda c: c["privacy"].pop("delta"), "privacy.delta: is required"),
    (lambda c: c["privacy"].update(epsilon=3), "privacy.epsilon: unknown key (valid keys: delta, evaluation_share,"),
    (lambda c: c.update(colour="blue"), "colour: unknown key (valid keys: backbone, backbones, data, device,"),
    (lambda c: c.update(site="hospital a/b"), "site: must be made of letters, digits"),
    (lambda c: c.update(device="tpu"), "device: must be auto, cpu, cuda or cuda:N"),
    (lambda c: c.update(min_cases_for_metrics=0), "min_cases_for_metrics: must be >= 1, got 0"),
    (lambda c: c.update(data="ct"), "data: must be a mapping"),
    (lambda c: c["data"].update(images="nowhere"), "data.images: folder not found"),
    (lambda c: c["data"].update(labels="missing.csv"), "data.labels: file not found"),
    (lambda c: c.update(state_dir="ct/cache"), "state_dir:"),
    (lambda c: c.update(state_dir="masks"), "inside the hospital's data"),
])
def test_bad_values_name_the_file_and_key(tmp_path, base, edit, message):
    edit(base)
    path = _write(tmp_path, base)
    with pytest.raises(SiteConfigError) as err:
        load_site_config(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_on_a_host_without_cuda_is_refused(tmp_path, base, monkeypatch, device):
    """Otherwise the round would fail in the trainer, after its privacy was charged."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base["device"] = device
    path = _write(tmp_path, base)
    with pytest.raises(SiteConfigError, match=f"{path}: device: {device} requested, but this host has no"):
        load_site_config(path)
    base["device"] = "auto"
    assert load_site_config(_write(tmp_path, base)).device == "auto"


def test_cuda_device_index_must_exist_on_this_host(tmp_path, base, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    base["device"] = "cuda:1"
    assert load_site_config(_write(tmp_path, base)).device == "cuda:1"
    base["device"] = "cuda:2"
    with pytest.raises(SiteConfigError, match=r"device: cuda:2 requested, but this host has 2 CUDA device\(s\)"):
        load_site_config(_write(tmp_path, base))


def test_labels_without_patient_id_need_one_scan_per_patient(tmp_path, base):
    (tmp_path / "labels.csv").write_text("case_id;tumor_present\nliver_01;1\n")
    path = _write(tmp_path, base)
    with pytest.raises(SiteConfigError) as err:
        load_site_config(path)
    text = str(err.value)
    assert text.startswith(f"{path}: data.labels: {tmp_path / 'labels.csv'} has no patient_id column")
    assert "data.one_scan_per_patient: true" in text
    base["data"]["one_scan_per_patient"] = True
    config = load_site_config(_write(tmp_path, base))
    assert config.data.one_scan_per_patient is True
    (tmp_path / "labels.csv").write_text("case_id;patient_id\nliver_01;P1\n")   # any delimiter the reader takes
    base["data"].pop("one_scan_per_patient")
    assert load_site_config(_write(tmp_path, base)).data.one_scan_per_patient is False


def test_writes_are_refused_inside_data(tmp_path, base):
    config = load_site_config(_write(tmp_path, base))
    assert config.is_inside_data(tmp_path / "ct" / "x.nii.gz")
    assert config.is_inside_data(tmp_path / "labels.csv")
    assert not config.is_inside_data(tmp_path / "out.nii.gz")


def test_not_yaml_mapping_is_an_error(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(SiteConfigError, match="top level must be a mapping"):
        load_site_config(path)


def test_example_site_yaml_and_labels_csv_are_valid(tmp_path):
    from pathlib import Path

    from client.ingest import read_labels

    repo = Path(__file__).resolve().parents[2]
    example = yaml.safe_load((repo / "configs" / "hospital.example.yaml").read_text())
    for key in ("images", "masks"):
        (tmp_path / key).mkdir()
        example["data"][key] = str(tmp_path / key)
    example["data"]["labels"] = str(repo / "docs" / "examples" / "labels.example.csv")
    example["state_dir"] = str(tmp_path / "state")
    config = load_site_config(_write(tmp_path, example))
    assert config.site == "hospital-a" and config.privacy.max_epsilon == 8.0
    table = read_labels(config.data.labels)
    assert table.errors == [] and len(table.labels) == 5
