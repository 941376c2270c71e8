"""Run settings of a federated run, read from Flower's run config (kebab-case keys).

Defaults live in pyproject's `[tool.flwr.app.config]`; `flwr run . --run-config`
overrides them. Every key is validated here, with the limits the sites apply to a round
(`pasta_model.protocol`), so that a typo or a value the sites would refuse fails at
start, not in round 7.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, model_validator
from pydantic.dataclasses import dataclass

from pasta_model.protocol import (
    BatchSize,
    Delta,
    LearningRate,
    LocalEpochs,
    PlannedRounds,
    ProximalMu,
    Task,
    check_proximal_step,
)
from synth.typed_config import KEBAB, one_of, parse

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum")

Positive = Annotated[float, Field(gt=0)]
AtLeastOne = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]


def _absolute_or_unset(path: str) -> str:
    """The ServerApp runs in the SuperLink's working folder, not the coordinator's shell:
    a relative path would land (or be looked for) somewhere else."""
    if path and not Path(path).expanduser().is_absolute():
        raise ValueError("must be an absolute path (the ServerApp does not run in your shell's folder)")
    return str(Path(path).expanduser()) if path else path


AbsolutePath = Annotated[str, AfterValidator(_absolute_or_unset)]


class SettingsError(ValueError):
    """A run-config key is unknown, of the wrong type, or out of range."""


@dataclass(frozen=True, config=KEBAB)
class RunSettings:
    num_server_rounds: PlannedRounds = 3
    task: Task = "report"
    local_epochs: LocalEpochs = 2
    learning_rate: LearningRate = 0.5
    batch_size: BatchSize = 16
    strategy: Annotated[str, one_of(STRATEGIES)] = "fedavg"
    min_sites: AtLeastOne = 2
    fraction_sites: Annotated[float, Field(gt=0, le=1)] = 1.0
    round_timeout: Positive = 600.0
    round_retries: NonNegative = 1
    dp_delta: Delta = 1e-5
    pretrained: AbsolutePath = ""      # required by the ServerApp
    run_dir: AbsolutePath = ""         # required by the ServerApp
    resume: bool = True
    seed: int = 0
    proximal_mu: ProximalMu = 0.01
    trimmed_beta: Annotated[float, Field(ge=0, lt=0.5)] = 0.2
    krum_malicious: NonNegative = 0
    eval_data: AbsolutePath = ""
    send_backbone: bool = True

    @model_validator(mode="after")
    def _sites_accept_the_proximal_step(self) -> RunSettings:
        check_proximal_step(self.learning_rate, self.proximal_mu)
        return self

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> RunSettings:
        return parse(cls, config, "run config", SettingsError)

    def to_dict(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}
