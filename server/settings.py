"""Run settings of a federated run, read from Flower's run config (kebab-case keys).

Defaults live in pyproject's `[tool.flwr.app.config]`; `flwr run . --run-config`
overrides them. Every key is validated here so that a typo fails at start, not in
round 7.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pasta_model.protocol import MAX_PROXIMAL_MU, TASKS
from synth.typed_config import typed_fields

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum")


class SettingsError(ValueError):
    """A run-config key is unknown, of the wrong type, or out of range."""


@dataclass(frozen=True)
class RunSettings:
    num_server_rounds: int = 3
    task: str = "report"
    local_epochs: int = 2
    learning_rate: float = 0.5
    batch_size: int = 16
    strategy: str = "fedavg"
    min_sites: int = 2
    fraction_sites: float = 1.0
    round_timeout: float = 600.0
    round_retries: int = 1
    dp_delta: float = 1e-5
    pretrained: str = ""
    run_dir: str = "runs/federation"
    resume: bool = True
    seed: int = 0
    proximal_mu: float = 0.01
    trimmed_beta: float = 0.2
    krum_malicious: int = 0
    eval_data: str = ""
    send_backbone: bool = True
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> RunSettings:
        values = typed_fields(cls, config, "run config", SettingsError, key_of=lambda n: n.replace("_", "-"),
                              exclude=("extra",))
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        checks = [
            (self.num_server_rounds >= 1, "num-server-rounds", "must be >= 1"),
            (self.task in TASKS, "task", f"must be one of {TASKS}"),
            (1 <= self.local_epochs <= 50, "local-epochs", "must be in 1..50"),
            (0 < self.learning_rate <= 1, "learning-rate", "must be in (0, 1] (sites refuse more)"),
            (1 <= self.batch_size <= 1024, "batch-size", "must be in 1..1024"),
            (self.strategy in STRATEGIES, "strategy", f"must be one of {STRATEGIES}"),
            (self.min_sites >= 1, "min-sites", "must be >= 1"),
            (0 < self.fraction_sites <= 1, "fraction-sites", "must be in (0, 1]"),
            (self.round_timeout > 0, "round-timeout", "must be > 0"),
            (self.round_retries >= 0, "round-retries", "must be >= 0"),
            (0 < self.dp_delta < 1, "dp-delta", "must be in (0, 1)"),
            (0 <= self.proximal_mu <= MAX_PROXIMAL_MU, "proximal-mu", f"must be in [0, {MAX_PROXIMAL_MU:g}]"),
            (self.learning_rate * self.proximal_mu <= 1, "proximal-mu",
             "times learning-rate must be <= 1 (sites refuse more: the proximal step would overshoot)"),
            (0 <= self.trimmed_beta < 0.5, "trimmed-beta", "must be in [0, 0.5)"),
            (self.krum_malicious >= 0, "krum-malicious", "must be >= 0"),
        ]
        for ok, key, why in checks:
            if not ok:
                raise SettingsError(f"run config: {key} {why}, got {getattr(self, key.replace('-', '_'))!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}

