"""Typed config dataclasses from YAML or Flower's run config: errors name the bad key.

The one place that turns raw values into a dataclass's field types (pretraining,
simulation and run settings use it); it lives in `synth`, the package every other one
already imports. Strings are accepted for numbers and booleans because Flower's
`--run-config` and environment overrides deliver them; a float is never silently
truncated into an int.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
_WHAT = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string", "Path": "a path"}


def coerce(where: str, key: str, raw: Any, annotation: Any, error: type[Exception] = ValueError) -> Any:
    """`raw` as the field type `annotation` (a class or its string under postponed
    annotations); `X | None` accepts None; containers and other types pass unchanged."""
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = [p.strip() for p in name.split("|")]
    if "None" in parts:
        if raw is None:
            return None
        parts.remove("None")
    base = parts[0] if len(parts) == 1 else name
    try:
        if base == "bool":
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in _TRUE + _FALSE:
                return raw.lower() in _TRUE
            if isinstance(raw, int) and raw in (0, 1):
                return bool(raw)
            raise ValueError
        if base == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if base == "float":
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if base == "str":
            if isinstance(raw, (dict, list, tuple)):
                raise ValueError
            return str(raw)
        if base == "Path":
            if not isinstance(raw, (str, Path)):
                raise ValueError
            return Path(raw)
        return raw
    except (TypeError, ValueError):
        pass
    raise error(f"{where}: {key} must be {_WHAT.get(base, base)}, got {raw!r}")


def typed_fields(cls, raw: Mapping[str, Any], where: str, error: type[Exception] = ValueError,
                 key_of: Callable[[str], str] = lambda name: name, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """{field name: coerced value} for the keys of `raw`; an unknown key is an error that
    lists the valid ones. `key_of` maps a field name to its key in `raw` (kebab-case for
    Flower's run config)."""
    fields = {key_of(f.name): f for f in dataclasses.fields(cls) if f.init and f.name not in exclude}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise error(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    return {fields[k].name: coerce(where, k, v, fields[k].type, error) for k, v in raw.items()}
