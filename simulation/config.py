"""The simulation's settings: a typed dataclass loaded from YAML, errors name the bad key."""
from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from pasta_model.protocol import BatchSize, Delta, LearningRate, LocalEpochs, PlannedRounds, Task
from server.settings import STRATEGIES
from synth.typed_config import FILE, one_of, parse

COMPARISONS = ("local", "pooled", "pooled_no_dp", "pooled_scratch")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "simulation.yaml"
# `pretrained:` the model shipped with the package (the default), or pretrain one here (null or "pretrain")
SHIPPED, PRETRAIN = "shipped", "pretrain"


class SimulationConfigError(ValueError):
    pass


Count = Annotated[int, Field(ge=1)]


@dataclass(config=FILE)
class SimulationConfig:
    hospitals: Annotated[int, Field(ge=2)] = 3
    rounds: PlannedRounds = 3
    preset: str = "tiny"
    task: Task = "report"
    epsilon: Annotated[float, Field(gt=0)] = 8.0
    delta: Delta = 1e-5
    seed: int = 0
    local_epochs: LocalEpochs = 2
    learning_rate: LearningRate = 0.5
    batch_size: BatchSize = 16
    strategy: Annotated[str, one_of(STRATEGIES)] = "fedavg"
    volume_size: Annotated[int, Field(ge=48)] = 64
    cases_min: Annotated[int, Field(ge=8)] = 8
    cases_max: Count = 60
    heldout_cases: Annotated[int, Field(ge=5)] = 16
    pretrain_cases: Count = 100
    pretrain_minutes: Annotated[float, Field(gt=0)] = 5.0
    pretrained: str | None = SHIPPED     # SHIPPED, a checkpoint path, or None / PRETRAIN: pretrain one here
    comparisons: list[Annotated[str, one_of(COMPARISONS)]] = field(default_factory=lambda: list(COMPARISONS))
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    # the empirical privacy audit of the first site in the report (about 10 s with 1,000 canaries: on)
    audit: bool = True
    audit_canaries: Annotated[int, Field(ge=2)] = 1000
    # the first hospital's CT in a local Orthanc (PACS) instead of a folder (simulation/pacs_site.py)
    pacs: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> SimulationConfig:
        if self.cases_min > self.cases_max:
            raise ValueError(f"cases_min ({self.cases_min}) must be <= cases_max ({self.cases_max})")
        return self

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], source: str = "config") -> SimulationConfig:
        return parse(cls, raw, source, SimulationConfigError)

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> SimulationConfig:
        path = Path(path) if path else DEFAULT_CONFIG
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SimulationConfigError(f"{path}: cannot read ({exc})") from None
        raw = raw.get("simulation", raw)
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_mapping(raw, str(path))

    @property
    def spacing_mm(self) -> float:
        """Generate at the preset's own spacing: the FOV is volume_size x spacing, centred on the lesion's organ."""
        from pasta_model.presets import get_preset
        return float(get_preset(self.preset).spacing_mm)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
