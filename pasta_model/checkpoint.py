"""Checkpoints as safetensors files: weights plus JSON metadata, never pickled code.

The metadata (preset, tasks, label vocabularies, package version, backbone SHA-256,
free-form `extra`) sits in the safetensors header, so it can be read without
touching the tensors and a checkpoint can be rebuilt without trusting its author.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from synth import vocabulary
from synth.atomic import atomic_path

from .heads import DETECT_OUTPUTS, REPORT_OUTPUTS, SEGMENT_CLASSES
from .network import HEADS_PREFIX, ORGAN_HEAD_PREFIX, PastaNet, build_model

log = logging.getLogger(__name__)

META_KEY = "pasta_fed"
FORMAT = "pasta-fed-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not describe a PastaNet."""


@dataclass
class CheckpointMeta:
    preset: str
    tasks: list[str]
    vocabularies: dict
    package_version: str
    backbone_sha256: str
    extra: dict = field(default_factory=dict)


def package_version() -> str:
    try:
        from importlib.metadata import version
        return version("pasta-fed")
    except Exception:  # not installed (running from a source tree)
        return "0+unknown"


def vocabularies() -> dict:
    """The label orders a checkpoint's logits are indexed by."""
    return {
        "lesion_types": list(vocabulary.LESION_TYPE_NAMES),
        "host_organs": list(vocabulary.HOST_ORGANS),
        "attributes": {k: list(v) for k, v in vocabulary.ATTRIBUTES.items()},
        "t_stages": list(vocabulary.T_STAGES),
        "report_outputs": dict(REPORT_OUTPUTS),
        "detect_outputs": list(DETECT_OUTPUTS),
        "segment_classes": list(SEGMENT_CLASSES),
    }


def _state_dict(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if isinstance(model_or_state_dict, nn.Module):
        return model_or_state_dict.state_dict()
    return model_or_state_dict


def backbone_sha256(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> str:
    """SHA-256 over the backbone tensors (sorted keys; name, shape, dtype and bytes).

    Sites compare it every round: heads are only meaningful on the backbone they
    were trained on.
    """
    sd = _state_dict(model_or_state_dict)
    digest = hashlib.sha256()
    for key in sorted(k for k in sd if not k.startswith(HEADS_PREFIX)):
        t = sd[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(json.dumps(list(t.shape)).encode())
        digest.update(str(t.dtype).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


HALF_DTYPES = (torch.float16, torch.bfloat16)


def as_fp32(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """fp16 / bf16 tensors (a checkpoint stored small for shipping) as float32; others unchanged.

    The loader's model is always fp32; the recorded backbone SHA-256 of a half-precision
    file is that of these fp32 tensors, i.e. of the backbone a site will hold."""
    return {k: v.float() if v.dtype in HALF_DTYPES else v for k, v in tensors.items()}


def save_checkpoint(path: str | os.PathLike, model: PastaNet, extra: dict | None = None,
                    storage_dtype: torch.dtype | None = None) -> CheckpointMeta:
    """Write weights + metadata atomically (temp file in the same folder, then rename).

    `storage_dtype` (torch.float16 or torch.bfloat16) stores the floating tensors at half
    the size; `load_checkpoint` casts them back to float32, and the recorded backbone
    SHA-256 is that of the cast-back weights."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if storage_dtype is not None:
        if storage_dtype not in HALF_DTYPES:
            raise ValueError(f"storage_dtype must be one of {HALF_DTYPES}, got {storage_dtype}")
        tensors = {k: v.to(storage_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    meta = CheckpointMeta(
        preset=model.preset.name,
        tasks=list(model.tasks),
        vocabularies=vocabularies(),
        package_version=package_version(),
        backbone_sha256=backbone_sha256(as_fp32(tensors)),
        extra=dict(extra or {}),
    )
    try:
        header = {META_KEY: json.dumps(dataclasses.asdict(meta), sort_keys=True), "format": FORMAT}
    except TypeError as exc:
        raise ValueError(f"{path}: checkpoint 'extra' must be JSON-serialisable ({exc})") from None
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    log.info("saved checkpoint %s (preset %s, tasks %s)", path, meta.preset, meta.tasks)
    return meta


def _meta_from_header(path: Path, header: Mapping[str, str] | None) -> CheckpointMeta:
    if not header or META_KEY not in header:
        raise CheckpointError(f"{path}: not a pasta-fed checkpoint (no '{META_KEY}' metadata in the header)")
    try:
        raw = json.loads(header[META_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({exc})") from None
    names = {f.name for f in dataclasses.fields(CheckpointMeta)}
    missing = sorted(names - {"extra"} - set(raw))
    if missing:
        raise CheckpointError(f"{path}: metadata lacks key(s) {missing}")
    return CheckpointMeta(**{k: raw[k] for k in names if k in raw})


def read_meta(path: str | os.PathLike) -> CheckpointMeta:
    """Metadata only; the tensors are not read."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    return _meta_from_header(path, header)


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in a checkpoint, from the header alone."""
    with safe_open(str(path), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


def _check_vocabularies(path: Path, meta: CheckpointMeta) -> None:
    """Class indices are positions in the label vocabularies: a checkpoint trained with
    other ones would name every prediction wrongly, so it is refused, naming the first."""
    ours = json.loads(json.dumps(vocabularies()))
    for name, labels in ours.items():
        theirs = meta.vocabularies.get(name)
        if theirs != labels:
            raise CheckpointError(f"{path}: vocabulary {name!r} differs from this software's "
                                  f"(checkpoint: {theirs}, here: {labels}); the checkpoint was trained with "
                                  f"another label set (pasta-fed {meta.package_version})")


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[PastaNet, CheckpointMeta]:
    """Rebuild the model the metadata describes and load its weights strictly (always as
    float32: a half-precision file is cast up before its backbone hash is checked)."""
    path = Path(path)
    meta = read_meta(path)
    _check_vocabularies(path, meta)
    tensors = as_fp32(load_file(str(path), device="cpu"))
    try:
        model = build_model(meta.preset, meta.tasks,
                            organs=any(k.startswith(ORGAN_HEAD_PREFIX) for k in tensors))
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{path}: weights do not fit preset {meta.preset!r}: {exc}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path}: weights do not match preset {meta.preset!r} with tasks {meta.tasks}: "
                              f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    actual = backbone_sha256(tensors)
    if actual != meta.backbone_sha256:
        raise CheckpointError(f"{path}: backbone SHA-256 {actual} differs from the recorded "
                              f"{meta.backbone_sha256}; the file is corrupt or was edited")
    return model.to(device), meta
