"""The one typed-config mechanism: pydantic dataclasses, and errors that name file and key.

Every file and message the project reads (run config, round config, site YAML,
simulation and pretraining settings, presets) is a `pydantic.dataclasses.dataclass`
with one of the configs below, its limits written once as `Annotated` field types, and is
built by `parse`, which turns pydantic's errors into one line that names the source and
the key. It lives in `synth`, the bottom of the import graph, so that every package can
use it.

- `FILE`: YAML files and command-line overrides. Strings become numbers and booleans
  (Flower's `--run-config`, environment overrides), a float is never truncated into an
  int, NaN and infinity are refused, an unknown key is an error.
- `STRICT`: a site's own YAML, which guards its patients' privacy: no string is read as
  a number or a boolean (nested sections are parsed one by one).
- `KEBAB`: like `FILE`, with Flower's kebab-case keys (`learning-rate`).
- `WIRE`: messages from the coordinator, who may be hostile: kebab-case and strict (no
  string is read as a number, no bool as an int).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from types import UnionType
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from pydantic import AfterValidator, ConfigDict, ValidationError


def _kebab(name: str) -> str:
    return name.replace("_", "-")


_COMMON: dict[str, Any] = {"extra": "forbid", "allow_inf_nan": False}
FILE = ConfigDict(**_COMMON)
STRICT = ConfigDict(**_COMMON, strict=True)
KEBAB = ConfigDict(**_COMMON, alias_generator=_kebab, validate_by_name=True, validate_by_alias=True)
WIRE = ConfigDict(**_COMMON, alias_generator=_kebab, validate_by_name=True, validate_by_alias=True, strict=True)

T = TypeVar("T")

# pydantic error type -> what the value must be
_MUST = {
    "float_type": "must be a number", "float_parsing": "must be a number",
    "int_type": "must be an integer", "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "string_type": "must be a string", "finite_number": "must be finite",
    "greater_than": "must be > {gt}", "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}", "less_than_equal": "must be <= {le}",
    "list_type": "must be a list", "tuple_type": "must be a list", "dict_type": "must be a mapping",
    "dataclass_type": "must be a mapping", "path_type": "must be a path",
}


def one_of(choices: Collection[str]) -> AfterValidator:
    """A field validator: the value is one of `choices` (a vocabulary tuple)."""
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(str, choices))}")
        return value
    return AfterValidator(check)


def matching(pattern: str, what: str) -> AfterValidator:
    """A field validator: the whole string matches `pattern`; the error says `what` it must be."""
    regex = re.compile(pattern)

    def check(value: str) -> str:
        if regex.fullmatch(value) is None:
            raise ValueError(f"must be {what}")
        return value
    return AfterValidator(check)


def describe(exc: ValidationError, where: str, valid: Collection[str] = (), prefix: str = "") -> str:
    """One line per problem, each naming `where` and the key path (`prefix` + key)."""
    listing = f" (valid keys: {', '.join(sorted(valid))})" if valid else ""
    lines = [f"{where}: {prefix}{_key(e['loc'])}: unknown key{listing}"
             for e in exc.errors() if e["type"] == "unexpected_keyword_argument"]
    for error in exc.errors():
        if error["type"] == "unexpected_keyword_argument":
            continue
        key, rule = _key(error["loc"]), _rule(error)
        quiet = error["type"] == "missing" or not key   # a whole-object rule names its own values
        got = "" if quiet else f", got {error['input']!r}"
        section = f"{prefix.rstrip('.')}: " if prefix else ""
        lines.append(f"{where}: {prefix}{key}: {rule}{got}" if key else f"{where}: {section}{rule}")
    return "; ".join(lines)


def _key(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _rule(error: Mapping[str, Any]) -> str:
    if error["type"] == "missing":
        return "is required"
    if error["type"] == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    template = _MUST.get(error["type"])
    limits = {k: f"{v:g}" if isinstance(v, float) else v for k, v in error.get("ctx", {}).items()}
    return template.format(**limits) if template else str(error["msg"]).lower()


def parse(cls: Callable[..., T], raw: Mapping[str, Any], where: str, error: type[Exception] = ValueError,
          prefix: str = "", **extra: Any) -> T:
    """`cls(**raw, **extra)`, with any problem raised as `error` naming `where` and the key
    (`prefix` names the section a nested mapping came from, e.g. "privacy.")."""
    if not isinstance(raw, Mapping):
        raise error(f"{where}: must be a mapping, got {type(raw).__name__}")
    for key, what in _numbers(cls).items():
        if isinstance(raw.get(key), bool):      # pydantic's lax mode would read True as 1
            raise error(f"{where}: {prefix}{key}: must be {what}, got {raw[key]!r}")
    valid = [key for key in keys_of(cls) if key not in extra]     # `extra` is set by the caller, not the file
    for key in raw:
        if key in extra:
            raise error(f"{where}: {prefix}{key}: unknown key (valid keys: {', '.join(sorted(valid))})")
    try:
        return cls(**{str(k): v for k, v in raw.items()}, **extra)
    except ValidationError as exc:
        raise error(describe(exc, where, valid, prefix)) from None


def _numbers(cls: Any) -> dict[str, str]:
    """{key: "an integer" | "a number"} for the numeric fields of `cls` (optional ones too)."""
    what = {int: "an integer", float: "a number"}
    numbers = {}
    for name, info in getattr(cls, "__pydantic_fields__", {}).items():
        union = get_origin(info.annotation) in (Union, UnionType)
        kinds = [_bare(arg) for arg in (get_args(info.annotation) if union else (info.annotation,))
                 if arg is not type(None)]
        if len(kinds) == 1 and kinds[0] in what:
            numbers[info.alias or name] = what[kinds[0]]
    return numbers


def _bare(annotation: Any) -> Any:
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def keys_of(cls: Any) -> list[str]:
    """The keys a config dataclass accepts, as they are written in its source (aliases)."""
    return [info.alias or name for name, info in getattr(cls, "__pydantic_fields__", {}).items()
            if info.init is not False]
