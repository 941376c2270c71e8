"""Config loading names the bad key and never truncates or guesses a type."""
from __future__ import annotations

from pathlib import Path

import pytest

from pasta_model.pretrain import PretrainConfig
from server.settings import RunSettings, SettingsError
from simulation.config import SimulationConfig, SimulationConfigError


@pytest.mark.parametrize("raw, message", [
    ({"epsilon": "lots"}, "epsilon must be a number, got 'lots'"),
    ({"rounds": 2.5}, "rounds must be an integer, got 2.5"),
    ({"rounds": True}, "rounds must be an integer"),
    ({"preset": ["tiny"]}, "preset must be a string"),
    ({"round": 3}, "unknown key(s) ['round']"),
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
    with pytest.raises(SettingsError, match="run config: resume must be true or false, got 'maybe'"):
        RunSettings.from_run_config({"resume": "maybe"})


def test_pretrain_config_checks_types():
    cfg = PretrainConfig.from_dict({"data": "d", "out": "o", "max_minutes": "10"})
    assert cfg.max_minutes == 10.0 and cfg.data == Path("d")
    with pytest.raises(ValueError, match="pretrain config: lr must be a number, got 'fast'"):
        PretrainConfig.from_dict({"data": "d", "out": "o", "lr": "fast"})
    with pytest.raises(ValueError, match="batch_size must be an integer, got 2.5"):
        PretrainConfig.from_dict({"data": "d", "out": "o", "batch_size": 2.5})
