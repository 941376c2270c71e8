"""The shipped simulation configs load, and `simulate`'s flags override exactly their keys."""
from __future__ import annotations

import dataclasses

import yaml

from simulation.cli import build_parser
from simulation.commands import DEMO_CONFIG, config_from_args
from simulation.config import DEFAULT_CONFIG, SimulationConfig


def _file(path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))["simulation"]


def test_the_shipped_configs_load_with_every_key_they_write():
    for path in (DEFAULT_CONFIG, DEMO_CONFIG):
        written = _file(path)
        loaded = dataclasses.asdict(SimulationConfig.load(path))
        assert {k: loaded[k] for k in written} == written, path.name


def test_simulate_flags_override_their_keys_and_nothing_else(tmp_path):
    args = build_parser().parse_args(["simulate", "--hospitals", "4", "--rounds", "1", "--epsilon", "2.5",
                                      "--task", "stage", "--out", str(tmp_path)])
    cfg = dataclasses.asdict(config_from_args(args))
    written = _file(DEFAULT_CONFIG)
    changed = {k: cfg[k] for k in cfg if k in written and cfg[k] != written[k]}
    assert changed == {"hospitals": 4, "rounds": 1, "epsilon": 2.5, "task": "stage"}


def test_a_bad_flag_value_is_the_command_s_error(tmp_path, capsys):
    from simulation.cli import main
    assert main(["simulate", "--hospitals", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pasta-fed simulate: error: ") and "hospitals: must be >= 2, got 1" in err
    assert not (tmp_path / "run").exists()
