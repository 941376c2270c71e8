"""Import the released PASTA weights (PASTA_final.pth) into a PastaNet.

Users download the file themselves; this module only reads it, with
`torch.load(weights_only=True)` so no code in it ever runs. The public PASTA code
loads three containers (a dict with `network_weights`, a dict with `state_dict`, a
bare state dict) and strips `module.` / `_orig_mod.` prefixes; so do we. Its task
outputs (`seg_outputs.*`, `head.*`) are skipped: our heads are trained anew.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .heads import TASKS
from .network import PastaNet, build_model
from .presets import PRESETS_FILE, Preset, get_preset, load_presets

log = logging.getLogger(__name__)

STRIP_PREFIXES = ("module.", "_orig_mod.")
SKIP_PREFIXES = ("seg_outputs.", "head.")
CONTAINER_KEYS = ("network_weights", "state_dict")


class ReleasedImportError(ValueError):
    """The file cannot be imported; the message names the file and the keys at fault."""


@dataclass
class ImportSummary:
    source: str
    container: str                       # network_weights | state_dict | bare
    preset: str
    variant: str                         # segmentation | classification (encoder only)
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    encoder_only: bool = False           # encoder complete, no bottleneck/decoder tensors at all

    @property
    def ok(self) -> bool:
        return not self.shape_mismatched and not self.unexpected and (
            not self.missing or self.encoder_only)

    def render(self) -> str:
        lines = [
            f"source:     {self.source}",
            f"container:  {self.container}",
            f"preset:     {self.preset}",
            f"variant:    {self.variant}",
            f"matched:    {len(self.matched)} backbone tensors",
            f"skipped:    {len(self.skipped)} task-output tensors ({_prefix_counts(self.skipped)})",
            f"missing:    {len(self.missing)}",
            f"unexpected: {len(self.unexpected)}",
            f"mismatched: {len(self.shape_mismatched)}",
        ]
        if self.encoder_only:
            lines.append("note: encoder-only checkpoint; the bottleneck and decoder keep their random "
                         "initialisation, so the segment head needs pretraining of the decoder:")
        lines += [f"  missing    {k}" for k in self.missing]
        lines += [f"  unexpected {k}" for k in self.unexpected]
        lines += [f"  mismatched {k}: file {list(f)} vs model {list(m)}" for k, f, m in self.shape_mismatched]
        return "\n".join(lines)


def _prefix_counts(keys: Sequence[str]) -> str:
    counts: dict[str, int] = {}
    for k in keys:
        counts[k.split(".")[0]] = counts.get(k.split(".")[0], 0) + 1
    return ", ".join(f"{p}.*: {n}" for p, n in counts.items()) or "none"


def strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def unwrap_container(obj: Any, source: str = "<object>") -> tuple[dict[str, Tensor], str]:
    """The state dict inside one of the three released containers, prefixes stripped."""
    if not isinstance(obj, Mapping):
        raise ReleasedImportError(f"{source}: expected a dict, got {type(obj).__name__}")
    container = "bare"
    for key in CONTAINER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            obj, container = obj[key], key
            break
    state: dict[str, Tensor] = {}
    not_tensors = []
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            not_tensors.append(str(key))
            continue
        name = strip_prefixes(str(key))
        if name in state:
            raise ReleasedImportError(f"{source}: key {name!r} occurs twice after stripping prefixes")
        state[name] = value
    if not state:
        raise ReleasedImportError(f"{source}: no tensors found (top-level keys: {sorted(map(str, obj))[:10]})")
    if not_tensors:
        log.warning("%s: ignoring %d non-tensor entries (%s)", source, len(not_tensors), not_tensors[:5])
    return state, container


def _expected_shapes(preset: Preset) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        net = PastaNet(preset, ())
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def released_layout(preset: str | Preset, variant: str = "segmentation",
                    num_classes: int = 2) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the released network for a preset (the paper preset gives PASTA_final's)."""
    preset = get_preset(preset)
    shapes = _expected_shapes(preset)
    skips = list(reversed(preset.stage_features()))
    for i, ch in enumerate(skips):  # deep supervision outputs, deepest first
        shapes[f"seg_outputs.{i}.weight"] = (num_classes, ch, 1, 1, 1)
    if variant == "classification":
        widths = [preset.deep_features, *preset.head_hidden, num_classes]
        for j in range(len(widths) - 1):
            shapes[f"head.{2 * j}.weight"] = (widths[j + 1], widths[j])
            shapes[f"head.{2 * j}.bias"] = (widths[j + 1],)
    elif variant != "segmentation":
        raise ValueError(f"unknown variant {variant!r}; valid: segmentation, classification")
    return shapes


def _encoder_prefixes(preset: Preset) -> tuple[str, ...]:
    return tuple(f"conv_blocks_context.{i}." for i in range(preset.num_pools))


def compare(state: Mapping[str, Tensor], preset: Preset, source: str = "<state dict>",
            container: str = "bare") -> ImportSummary:
    """Match a released state dict against a preset's backbone, key by key."""
    expected = _expected_shapes(preset)
    summary = ImportSummary(source=source, container=container, preset=preset.name, variant="segmentation")
    for key, value in state.items():
        if key.startswith(SKIP_PREFIXES):
            summary.skipped.append(key)
        elif key not in expected:
            summary.unexpected.append(key)
        elif tuple(value.shape) != expected[key]:
            summary.shape_mismatched.append((key, tuple(value.shape), expected[key]))
        else:
            summary.matched.append(key)
    summary.missing = [k for k in expected if k not in state]
    encoder = _encoder_prefixes(preset)
    encoder_complete = not [k for k in summary.missing if k.startswith(encoder)]
    no_decoder = not [k for k in state if k in expected and not k.startswith(encoder)]
    summary.encoder_only = bool(summary.missing) and encoder_complete and no_decoder
    if summary.encoder_only or any(k.startswith("head.") for k in state):
        summary.variant = "classification"
    return summary


def infer_preset(state: Mapping[str, Tensor], presets_file: Path = PRESETS_FILE) -> Preset:
    """The preset whose backbone matches the most tensors (name and shape) of `state`."""
    best, best_score = None, 0
    for preset in load_presets(presets_file).values():
        expected = _expected_shapes(preset)
        score = sum(1 for k, v in state.items() if expected.get(k) == tuple(v.shape))
        if score > best_score and score > 0:
            best, best_score = preset, score
    if best is None:
        raise ReleasedImportError("no preset matches any tensor of the file; is this a PASTA checkpoint?")
    return best


def load_released_state(path: str | os.PathLike) -> tuple[dict[str, Tensor], str]:
    """torch.load(weights_only=True) the file (memory-mapped when possible) and unwrap it."""
    path = Path(path)
    if not path.is_file():
        raise ReleasedImportError(f"{path}: no such file")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:
        raise ReleasedImportError(
            f"{path}: cannot be read as plain tensors with torch.load(weights_only=True) ({exc}); "
            "files that need code to unpickle are refused") from None
    return unwrap_container(obj, str(path))


def import_released(path: str | os.PathLike, preset: str | Preset | None = None,
                    tasks: Sequence[str] = TASKS) -> tuple[PastaNet, ImportSummary]:
    """Build a PastaNet with the released backbone weights and fresh heads.

    Refuses shape mismatches and unknown keys; refuses missing backbone keys unless
    the file is the encoder-only classification variant, whose missing decoder keys
    the summary lists.
    """
    state, container = load_released_state(path)
    preset = infer_preset(state) if preset is None else get_preset(preset)
    summary = compare(state, preset, str(path), container)
    if summary.shape_mismatched:
        raise ReleasedImportError(
            f"{path}: {len(summary.shape_mismatched)} tensor(s) have the wrong shape for preset "
            f"{preset.name!r}: " + "; ".join(f"{k} file {list(f)} vs model {list(m)}"
                                             for k, f, m in summary.shape_mismatched[:10]))
    if summary.unexpected:
        raise ReleasedImportError(f"{path}: {len(summary.unexpected)} key(s) unknown to preset "
                                  f"{preset.name!r}: {summary.unexpected[:10]}")
    if summary.missing and not summary.encoder_only:
        raise ReleasedImportError(f"{path}: {len(summary.missing)} backbone key(s) missing for preset "
                                  f"{preset.name!r}: {summary.missing[:10]}")
    if summary.missing:
        log.warning("%s: encoder-only checkpoint; %d decoder/bottleneck keys keep random weights",
                    path, len(summary.missing))
    model = build_model(preset, tasks)
    result = model.load_state_dict({k: state[k] for k in summary.matched}, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return model, summary
