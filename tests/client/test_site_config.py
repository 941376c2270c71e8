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
    (tmp_path / "labels.csv").write_text("case_id\n")
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
    (lambda c: c["privacy"].update(delta=1.5), "privacy.delta: must be between 0 and 1"),
    (lambda c: c["privacy"].update(max_grad_norm="one"), "privacy.max_grad_norm: must be a number"),
    (lambda c: c["privacy"].pop("delta"), "privacy.delta: is required"),
    (lambda c: c["privacy"].update(epsilon=3), "privacy.epsilon: unknown key"),
    (lambda c: c.update(colour="blue"), "colour: unknown key"),
    (lambda c: c.update(site="hospital a/b"), "site: must use only letters"),
    (lambda c: c.update(device="tpu"), "device: must be auto, cpu, cuda or cuda:N"),
    (lambda c: c.update(min_cases_for_metrics=0), "min_cases_for_metrics: must be an integer >= 1"),
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


def test_cuda_device_index_is_accepted(tmp_path, base):
    base["device"] = "cuda:1"
    assert load_site_config(_write(tmp_path, base)).device == "cuda:1"


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
