"""Config loading names the bad key, never truncates or guesses a type, and every config
shares the limits the sites apply to a round."""
from __future__ import annotations

from pathlib import Path

import pytest

from pasta_model.pretrain import PretrainConfig
from pasta_model.protocol import ProtocolError, RoundConfig
from server.settings import RunSettings, SettingsError
from simulation.config import SimulationConfig, SimulationConfigError


@pytest.mark.parametrize("raw, message", [
    ({"epsilon": "lots"}, "epsilon: must be a number, got 'lots'"),
    ({"rounds": 2.5}, "rounds: must be an integer, got 2.5"),
    ({"rounds": True}, "rounds: must be an integer, got True"),
    ({"preset": ["tiny"]}, "preset: must be a string"),
    ({"round": 3}, "round: unknown key (valid keys: audit, audit_canaries,"),
    ({"comparisons": ["pooled", "federated"]}, "comparisons.1: must be one of local, pooled"),
    ({"cases_min": 70}, "cases_min (70) must be <= cases_max (60)"),
])
def test_simulation_config_errors_name_the_key(raw, message):
    with pytest.raises(SimulationConfigError) as err:
        SimulationConfig.from_mapping(raw, "sim.yaml")
    assert str(err.value).startswith("sim.yaml: ") and message in str(err.value)


def test_strings_from_overrides_become_their_field_types():
    cfg = SimulationConfig.from_mapping({"rounds": "4", "epsilon": "2.5", "pretrained": None})
    assert (cfg.rounds, cfg.epsilon, cfg.pretrained) == (4, 2.5, None)
    run = RunSettings.from_run_config({"num-server-rounds": "2", "resume": "false"})
    assert (run.num_server_rounds, run.resume) == (2, False)
    with pytest.raises(SettingsError, match="run config: resume: must be true or false, got 'maybe'"):
        RunSettings.from_run_config({"resume": "maybe"})


def test_the_wire_reads_no_string_as_a_number():
    """The coordinator may be hostile: a round config is parsed strictly."""
    wire = RoundConfig(server_round=1, task="report", local_epochs=1, learning_rate=0.5, batch_size=4,
                       backbone_sha256="a" * 64, dp_delta=1e-5, planned_rounds=2, run_id="r").to_config_dict()
    with pytest.raises(ProtocolError, match="round config: local-epochs: must be an integer, got '3'"):
        RoundConfig.from_config_record({**wire, "local-epochs": "3"})
    with pytest.raises(ProtocolError, match="round config: batch-size: must be an integer, got True"):
        RoundConfig.from_config_record({**wire, "batch-size": True})


@pytest.mark.parametrize("key, value", [("learning-rate", 2.0), ("local-epochs", 51), ("batch-size", 2048),
                                        ("dp-delta", 1.0), ("proximal-mu", 101.0)])
def test_a_run_the_sites_would_refuse_fails_at_start(key, value):
    """One set of limits: what the coordinator accepts at start is what a site accepts in a round."""
    with pytest.raises(SettingsError, match=f"run config: {key}: must be"):
        RunSettings.from_run_config({key: value})
    wire = RoundConfig(server_round=1, task="report", local_epochs=1, learning_rate=0.5, batch_size=4,
                       backbone_sha256="a" * 64, dp_delta=1e-5, planned_rounds=2, run_id="r").to_config_dict()
    with pytest.raises(ProtocolError, match=f"round config: {key}: must be"):
        RoundConfig.from_config_record({**wire, key: value})


def test_settings_built_in_code_are_validated_too():
    with pytest.raises(ValueError, match="less than or equal to 1"):
        RunSettings(learning_rate=2.0)
    with pytest.raises(ValueError, match="learning-rate"):
        RunSettings(learning_rate=1.0, proximal_mu=2.0)


def test_pretrain_config_checks_types():
    cfg = PretrainConfig.from_dict({"data": "d", "out": "o", "max_minutes": "10"})
    assert cfg.max_minutes == 10.0 and cfg.data == Path("d")
    with pytest.raises(ValueError, match="pretrain config: lr: must be a number, got 'fast'"):
        PretrainConfig.from_dict({"data": "d", "out": "o", "lr": "fast"})
    with pytest.raises(ValueError, match="batch_size: must be an integer, got 2.5"):
        PretrainConfig.from_dict({"data": "d", "out": "o", "batch_size": 2.5})
    with pytest.raises(ValueError, match="max_minutes: must be a number, got True"):
        PretrainConfig.from_dict({"data": "d", "out": "o", "max_minutes": True})


@pytest.mark.parametrize("key", ["pretrained", "run-dir", "eval-data"])
def test_relative_coordinator_paths_are_refused_at_start(key):
    """The ServerApp runs in the SuperLink's folder: a relative run-dir once landed there."""
    with pytest.raises(SettingsError, match=f"run config: {key}: must be an absolute path"):
        RunSettings.from_run_config({key: "runs/federation"})
    assert getattr(RunSettings.from_run_config({key: "/srv/x"}), key.replace("-", "_")) == "/srv/x"
