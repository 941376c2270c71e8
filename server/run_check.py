"""Check a run config before `flwr run` submits it, naming the bad key.

Flower answers an unknown key with "[code: 15] Invalid run configuration." and starts a
run with a bad value that then fails inside the ServerApp, visible only in `flwr log`.
This check reads the same `--run-config` strings, with Flower's own parser, over the
app's defaults, and checks what the ServerApp would check at start: the settings, the
pretrained checkpoint (readable, has the task) and the run directory.
"""
from __future__ import annotations

from pathlib import Path

from flwr.common.config import parse_config_args

from pasta_model.checkpoint import CheckpointError, read_meta
from server.settings import RunSettings, SettingsError


def check_run_config(run_config: list[str]) -> RunSettings:
    """The settings a `flwr run ... --run-config <each>` would start with; SettingsError names the key."""
    try:
        overrides = parse_config_args(run_config)
    except (ValueError, SyntaxError) as exc:     # Flower's TOML parsing of the override strings
        raise SettingsError(f"run config: cannot parse {run_config!r}: {exc}") from None
    settings = RunSettings.from_run_config({**RunSettings().to_dict(), **overrides})
    check_inputs(settings)
    _check_run_dir(settings)
    return settings


def check_inputs(settings: RunSettings) -> None:
    """The files a run reads: the checkpoint (with the task) and eval-data. The ServerApp
    checks them too, before it writes anything into the run directory."""
    if not settings.pretrained:
        raise SettingsError("run config: pretrained: must name the pretrained PASTA checkpoint (an absolute path)")
    try:
        meta = read_meta(settings.pretrained)
    except CheckpointError as exc:
        raise SettingsError(f"run config: pretrained: {exc}") from None
    if settings.task not in meta.tasks:
        raise SettingsError(f"run config: task: {settings.task!r} is not in the checkpoint's tasks {meta.tasks}")
    if settings.eval_data and not Path(settings.eval_data).is_dir():
        raise SettingsError(f"run config: eval-data: folder not found: {settings.eval_data}")


def _check_run_dir(settings: RunSettings) -> None:
    if not settings.run_dir:
        raise SettingsError("run config: run-dir: must name the run directory (an absolute path)")
    run_dir = Path(settings.run_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not settings.resume:
        raise SettingsError(f"run config: run-dir: {run_dir} already holds a run; set resume=true to continue "
                            f"it or choose another run-dir")
