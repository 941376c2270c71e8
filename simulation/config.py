"""The simulation's settings: a typed dataclass loaded from YAML, errors name the bad key."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from synth.typed_config import typed_fields

COMPARISONS = ("local", "pooled", "pooled_no_dp", "pooled_scratch")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "simulation.yaml"
# `pretrained:` the model shipped with the package (the default), or pretrain one here (null or "pretrain")
SHIPPED, PRETRAIN = "shipped", "pretrain"


class SimulationConfigError(ValueError):
    pass


@dataclass
class SimulationConfig:
    hospitals: int = 3
    rounds: int = 3
    preset: str = "tiny"
    task: str = "report"
    epsilon: float = 8.0
    delta: float = 1e-5
    seed: int = 0
    local_epochs: int = 2
    learning_rate: float = 0.5
    batch_size: int = 16
    strategy: str = "fedavg"
    volume_size: int = 64
    cases_min: int = 8
    cases_max: int = 60
    heldout_cases: int = 16
    pretrain_cases: int = 100
    pretrain_minutes: float = 5.0
    pretrained: str | None = SHIPPED     # SHIPPED, a checkpoint path, or None / PRETRAIN: pretrain one here
    comparisons: list[str] = field(default_factory=lambda: list(COMPARISONS))
    max_grad_norm: float = 1.0
    # the empirical privacy audit of the first site in the report (about 10 s with 1,000 canaries: on)
    audit: bool = True
    audit_canaries: int = 1000

    def __post_init__(self) -> None:
        checks = [
            (self.hospitals >= 2, "hospitals", "must be >= 2"),
            (self.rounds >= 1, "rounds", "must be >= 1"),
            (self.epsilon > 0, "epsilon", "must be > 0"),
            (0 < self.delta < 1, "delta", "must be in (0, 1)"),
            (8 <= self.cases_min <= self.cases_max, "cases_min", "must be >= 8 and <= cases_max"),
            (self.heldout_cases >= 5, "heldout_cases", "must be >= 5"),
            (self.volume_size >= 48, "volume_size", "must be >= 48"),
            (self.audit_canaries >= 2, "audit_canaries", "must be >= 2"),
            (all(c in COMPARISONS for c in self.comparisons), "comparisons", f"each must be one of {COMPARISONS}"),
        ]
        for ok, key, why in checks:
            if not ok:
                raise SimulationConfigError(f"simulation config: {key} {why}, got {getattr(self, key)!r}")

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], source: str = "config") -> SimulationConfig:
        return cls(**typed_fields(cls, raw, source, SimulationConfigError))

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
