"""Model presets: network width/depth, spacing and crop sizes, read from presets.yaml.

Plans live in data (presets.yaml) so a new size needs no code change; this module only
gives them a typed, validated face.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from synth.typed_config import FILE, parse

PRESETS_FILE = Path(__file__).with_name("presets.yaml")


Positive = Annotated[int, Field(ge=1)]


@dataclass(frozen=True, config=FILE)
class Preset:
    name: str                 # tiny | small | base | paper
    base_features: Positive   # channels of the first encoder stage
    max_features: Positive    # channel cap (deep stages and bottleneck)
    num_pools: Positive       # stride-2 downsamplings, bottleneck included
    spacing_mm: Annotated[float, Field(gt=0)]   # target isotropic spacing
    crop_size: Positive       # lesion-centred crop edge (segment/report/stage/survival)
    detect_crop_size: Positive  # organ crop edge for detect
    head_hidden: tuple[Positive, ...]  # MLP hidden sizes of the classification heads

    @model_validator(mode="after")
    def _crops_fit_the_pools(self) -> Preset:
        for key in ("crop_size", "detect_crop_size"):
            if getattr(self, key) % self.divisor:
                raise ValueError(f"{key} ({getattr(self, key)}) must be a multiple of 2**num_pools = {self.divisor}")
        return self

    def stage_features(self) -> tuple[int, ...]:
        """Channels of encoder stages 0..num_pools-1 (the bottleneck excluded)."""
        return tuple(min(self.base_features * 2 ** i, self.max_features) for i in range(self.num_pools))

    @property
    def bottleneck_features(self) -> int:
        return min(self.base_features * 2 ** self.num_pools, self.max_features)

    @property
    def deep_features(self) -> int:
        """Channels of the deepest encoder stage: the classification heads' input."""
        return self.stage_features()[-1]

    @property
    def divisor(self) -> int:
        """Every spatial input dimension must be a multiple of this."""
        return 2 ** self.num_pools


def _preset_from_mapping(name: str, raw: Any, source: Path) -> Preset:
    return parse(Preset, raw, f"{source}: preset {name!r}", name=name)


def load_presets(path: str | Path = PRESETS_FILE) -> dict[str, Preset]:
    """Read and validate every preset of a presets YAML file."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of preset name -> settings")
    return {name: _preset_from_mapping(str(name), value, path) for name, value in raw.items()}


@lru_cache(maxsize=1)
def _builtin() -> dict[str, Preset]:
    return load_presets(PRESETS_FILE)


def preset_names() -> tuple[str, ...]:
    return tuple(_builtin())


def get_preset(name: str | Preset) -> Preset:
    """The named built-in preset; a Preset passes through unchanged."""
    if isinstance(name, Preset):
        return name
    presets = _builtin()
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(presets)}")
    return presets[name]
