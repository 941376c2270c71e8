"""Model presets: network width/depth, spacing and crop sizes, read from presets.yaml.

Plans live in data (presets.yaml) so a new size needs no code change; this module only
gives them a typed, validated face.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

PRESETS_FILE = Path(__file__).with_name("presets.yaml")


@dataclass(frozen=True)
class Preset:
    name: str                 # tiny | small | base | paper
    base_features: int        # channels of the first encoder stage
    max_features: int         # channel cap (deep stages and bottleneck)
    num_pools: int            # stride-2 downsamplings, bottleneck included
    spacing_mm: float         # target isotropic spacing
    crop_size: int            # lesion-centred crop edge (segment/report/stage/survival)
    detect_crop_size: int     # organ crop edge for detect
    head_hidden: tuple[int, ...]  # MLP hidden sizes of the classification heads

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


_INT_FIELDS = ("base_features", "max_features", "num_pools", "crop_size", "detect_crop_size")


def _preset_from_mapping(name: str, raw: Any, source: Path) -> Preset:
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: preset {name!r} must be a mapping, got {type(raw).__name__}")
    fields = {f.name for f in dataclasses.fields(Preset)} - {"name"}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"{source}: preset {name!r} has unknown key(s) {unknown}")
    missing = sorted(fields - set(raw))
    if missing:
        raise ValueError(f"{source}: preset {name!r} lacks key(s) {missing}")
    for key in _INT_FIELDS:
        value = raw[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{source}: preset {name!r} key {key!r} must be a positive integer, got {value!r}")
    spacing = raw["spacing_mm"]
    if not isinstance(spacing, (int, float)) or isinstance(spacing, bool) or spacing <= 0:
        raise ValueError(f"{source}: preset {name!r} key 'spacing_mm' must be a positive number, got {spacing!r}")
    hidden = raw["head_hidden"]
    if not isinstance(hidden, (list, tuple)) or not all(isinstance(h, int) and h > 0 for h in hidden):
        raise ValueError(f"{source}: preset {name!r} key 'head_hidden' must be a list of positive integers")
    preset = Preset(name=name, spacing_mm=float(spacing), head_hidden=tuple(hidden),
                    **{k: raw[k] for k in _INT_FIELDS})
    for key in ("crop_size", "detect_crop_size"):
        if getattr(preset, key) % preset.divisor:
            raise ValueError(f"{source}: preset {name!r} key {key!r} must be a multiple of "
                             f"2**num_pools = {preset.divisor}")
    return preset


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
