"""The wire format of a federated round, shared by `client` and `server`.

Both sides import this module and never each other. The server's config is
untrusted input at a site: `RoundConfig.from_config_record` rejects unknown keys,
wrong types, out-of-range values and anything that looks like a path.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import fields
from enum import IntEnum
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import AfterValidator, Field, model_validator
from pydantic.dataclasses import dataclass
from torch import Tensor, nn

from synth.typed_config import WIRE, matching, one_of, parse

from .heads import TASKS  # the tasks a round may name: client and server import them from here
from .network import HEADS_PREFIX, head_keys
from .presets import preset_names

# Reply metric names (MetricRecord keys).
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
STEPS = "steps"
SAMPLE_RATE = "sample-rate"
REPLY_METRICS = (NUM_EXAMPLES, TRAIN_LOSS, EPSILON, DELTA, NOISE_MULTIPLIER, STEPS, SAMPLE_RATE)

# Every reply carries this ConfigRecord: {"name": <the site's own name, from its YAML>}.
SITE_RECORD = "site"
# Query messages (the backbone, before a site's first round): config "action" is one of these.
ACTION_HAS_BACKBONE = "has-backbone"
ACTION_INSTALL_BACKBONE = "install-backbone"
QUERY_ACTIONS = (ACTION_HAS_BACKBONE, ACTION_INSTALL_BACKBONE)
HAS_BACKBONE = "has-backbone"       # the MetricRecord key of the answer (1 or 0)

HEAD_DTYPE = np.dtype(np.float32)   # every head weight on the wire, both ways
MAX_HEAD_WEIGHT = 1.0e4             # |w| above this is no trained head: refused before any training
MAX_PROXIMAL_MU = 100.0

_SHA256 = re.compile(r"[0-9a-f]{64}")
_RUN_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class ProtocolError(ValueError):
    """A round message that breaks the protocol; the message names the offending key."""


# -- error replies ----------------------------------------------------------------------
class ErrorCode(IntEnum):
    """The only thing a site says about a failure: a code and its fixed message.

    The full reason (which may name files, counts or settings of the site) stays in the
    site's own log and audit log; the coordinator learns which kind of failure, no more.
    """
    INVALID_MESSAGE = 4100      # round config, head weights or query the site cannot accept
    PRIVACY_BUDGET = 4101       # the round does not fit in the site's privacy budget
    TOO_FEW_CASES = 4102        # too few cases to train or to release metrics
    BACKBONE = 4103             # backbone unavailable here, or the one sent is not accepted
    OUTBOX_REFUSED = 4104       # the reply would carry something the outbox does not allow
    SITE_POLICY = 4105          # refused by the site's own policy
    SITE_STATE = 4106           # the site's ledger and audit log disagree: its operator must look
    INTERNAL = 5000             # an unexpected error at the site
    SITE_CONFIG = 5001          # the site's own configuration cannot be used


ERROR_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.INVALID_MESSAGE: "invalid round message",
    ErrorCode.PRIVACY_BUDGET: "privacy budget of the site does not allow this round",
    ErrorCode.TOO_FEW_CASES: "too few cases at the site for this task",
    ErrorCode.BACKBONE: "backbone unavailable or not accepted by the site",
    ErrorCode.OUTBOX_REFUSED: "reply refused by the site's outbox",
    ErrorCode.SITE_POLICY: "refused by site policy",
    ErrorCode.SITE_STATE: "site state needs its operator's attention",
    ErrorCode.INTERNAL: "internal error at the site",
    ErrorCode.SITE_CONFIG: "site agent is not configured",
}


def error_message(code: int) -> str:
    """The fixed text that leaves with `code` (unknown codes read as an internal error)."""
    try:
        return ERROR_MESSAGES[ErrorCode(code)]
    except ValueError:
        return ERROR_MESSAGES[ErrorCode.INTERNAL]


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.startswith(("~", "."))


def _not_path_like(value: str) -> str:
    if _looks_like_path(value):
        raise ValueError("must not look like a path")
    return value


# -- the limits of a round: the coordinator's run settings use the same types -------------
Task = Annotated[str, one_of(TASKS)]
LocalEpochs = Annotated[int, Field(ge=1, le=50)]
LearningRate = Annotated[float, Field(gt=0, le=1)]
BatchSize = Annotated[int, Field(ge=1, le=1024)]
Delta = Annotated[float, Field(gt=0, lt=1)]
ProximalMu = Annotated[float, Field(ge=0, le=MAX_PROXIMAL_MU)]
PlannedRounds = Annotated[int, Field(ge=1, le=10000)]
Sha256 = Annotated[str, matching(_SHA256.pattern, "64 lowercase hex digits (a SHA-256)")]
RunId = Annotated[str, matching(_RUN_ID.pattern, "1-64 characters of [A-Za-z0-9_.-]"), AfterValidator(_not_path_like)]
WireString = Annotated[str, AfterValidator(_not_path_like)]


def check_proximal_step(learning_rate: float, proximal_mu: float) -> None:
    """Each proximal step is w -= lr*mu*(w - w_global): with lr*mu <= 1 it moves w towards
    the global weights, above that it overshoots and can blow up after the budget is spent."""
    if learning_rate * proximal_mu > 1:
        raise ValueError(f"proximal-mu ({proximal_mu:g}) times learning-rate ({learning_rate:g}) must be <= 1")


@dataclass(frozen=True, config=WIRE)
class RoundConfig:
    server_round: Annotated[int, Field(ge=1)]
    task: Task
    local_epochs: LocalEpochs
    learning_rate: LearningRate
    batch_size: BatchSize
    backbone_sha256: Sha256
    dp_delta: Delta
    planned_rounds: PlannedRounds
    run_id: RunId
    proximal_mu: ProximalMu = 0.0
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> RoundConfig:
        if self.server_round > self.planned_rounds:
            raise ValueError(f"server-round ({self.server_round}) must not exceed planned-rounds "
                             f"({self.planned_rounds})")
        check_proximal_step(self.learning_rate, self.proximal_mu)
        return self

    @classmethod
    def from_config_record(cls, record: Mapping[str, Any]) -> RoundConfig:
        """Parse a (kebab-case) ConfigRecord or plain dict; any problem -> ProtocolError."""
        wire = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in record.items()}
        return parse(cls, wire, "round config", ProtocolError)

    def to_config_dict(self) -> dict[str, int | float | str]:
        """Kebab-case dict to put into a Flower ConfigRecord."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, config=WIRE)
class QueryConfig:
    """The config of a backbone handshake query (before a site's first round)."""
    action: Annotated[str, one_of(QUERY_ACTIONS)]
    backbone_sha256: Sha256
    preset: Annotated[str, one_of(preset_names())] | None = None   # with install-backbone

    @model_validator(mode="after")
    def _install_names_its_preset(self) -> QueryConfig:
        if self.action == ACTION_INSTALL_BACKBONE and self.preset is None:
            raise ValueError(f"preset is required with action {ACTION_INSTALL_BACKBONE!r}")
        return self

    @classmethod
    def from_config_record(cls, record: Mapping[str, Any]) -> QueryConfig:
        return parse(cls, dict(record), "query config", ProtocolError)

    def to_config_dict(self) -> dict[str, str]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}


# -- head weights on the wire ------------------------------------------------------------
def _state_dict(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    return model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict


def heads_to_arrays(model_or_state_dict: nn.Module | Mapping[str, Tensor], task: str) -> dict[str, np.ndarray]:
    """The heads.<task>.* tensors as numpy arrays: the only weights a site sends."""
    sd = _state_dict(model_or_state_dict)
    keys = head_keys(sd, task)
    if not keys:
        raise ProtocolError(f"model has no weights for task {task!r}")
    return {k: sd[k].detach().cpu().numpy().copy() for k in keys}


def _dtype_name(dtype_or_value: Any) -> str:
    """'float32', 'int64', ...; a non-native byte order keeps its marker ('>f4')."""
    if isinstance(dtype_or_value, Tensor):
        dtype_or_value = dtype_or_value.dtype
    if isinstance(dtype_or_value, torch.dtype):
        return str(dtype_or_value).removeprefix("torch.")
    if isinstance(dtype_or_value, (np.dtype, type, str)):
        dtype = np.dtype(dtype_or_value)
    else:
        dtype = np.asarray(dtype_or_value).dtype
    return dtype.name if dtype.isnative else dtype.str


def check_array_dtypes(arrays: Mapping[str, Any], expected: Any) -> None:
    """Refuse any array whose dtype is not exactly `expected` (one dtype, or one per key).

    Received weights are never cast: an int64, bool, complex or float64 tensor where the
    model holds float32 is a malformed (or hostile) message, not something to repair.
    """
    for key, value in arrays.items():
        want = expected[key] if isinstance(expected, Mapping) else expected
        got = _dtype_name(value)
        if got != _dtype_name(want):
            raise ProtocolError(f"array {key!r} has dtype {got}, expected {_dtype_name(want)}")


def _check_values(key: str, values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise ProtocolError(f"head key {key!r} contains NaN or infinity")
    largest = float(np.abs(values).max()) if values.size else 0.0
    if largest > MAX_HEAD_WEIGHT:
        raise ProtocolError(f"head key {key!r} has a weight of magnitude {largest:.3g}, "
                            f"more than {MAX_HEAD_WEIGHT:g}")


def _check_task_keys(arrays: Mapping[str, Any], task: str) -> None:
    if task not in TASKS:
        raise ProtocolError(f"unknown task {task!r}")
    prefix = f"{HEADS_PREFIX}{task}."
    outside = sorted(k for k in arrays if not k.startswith(prefix))
    if outside:
        raise ProtocolError(f"refusing key(s) outside {prefix}*: {outside[:5]}")


def check_incoming_heads(arrays: Mapping[str, np.ndarray | Tensor], task: str) -> None:
    """What can be checked without the model: keys under heads.<task>., float32, finite, bounded.

    Run before any work on a round, so a message the site will refuse costs it nothing.
    """
    _check_task_keys(arrays, task)
    check_array_dtypes(arrays, HEAD_DTYPE)
    for key, value in arrays.items():
        _check_values(key, value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value))


def arrays_to_heads(model: nn.Module, arrays: Mapping[str, np.ndarray | Tensor], task: str) -> None:
    """Load received head weights; refuses any key outside heads.<task>., any shape or dtype
    change, and non-finite or absurdly large values (nothing is loaded then)."""
    _check_task_keys(arrays, task)
    own = model.state_dict()
    expected = set(head_keys(own, task))
    unknown = sorted(set(arrays) - expected)
    if unknown:
        raise ProtocolError(f"unknown head key(s) for task {task!r}: {unknown[:5]}")
    missing = sorted(expected - set(arrays))
    if missing:
        raise ProtocolError(f"missing head key(s) for task {task!r}: {missing[:5]}")
    check_array_dtypes(arrays, {k: own[k].dtype for k in arrays})
    new: dict[str, Tensor] = {}
    for key, value in arrays.items():
        t = value.detach().cpu() if isinstance(value, Tensor) else torch.from_numpy(np.asarray(value).copy())
        if tuple(t.shape) != tuple(own[key].shape):
            raise ProtocolError(f"head key {key!r} has shape {tuple(t.shape)}, expected {tuple(own[key].shape)}")
        _check_values(key, t.numpy())
        new[key] = t
    with torch.no_grad():
        for key, t in new.items():
            own[key].copy_(t)


def heads_to_array_record(model_or_state_dict: nn.Module | Mapping[str, Tensor], task: str):
    """A Flower ArrayRecord holding only heads.<task>.* (keeps the model's tensors intact)."""
    from flwr.app import Array, ArrayRecord
    arrays = heads_to_arrays(model_or_state_dict, task)
    return ArrayRecord({key: Array(value) for key, value in arrays.items()})


def array_record_to_heads(model: nn.Module, record, task: str) -> None:
    """Load a Flower ArrayRecord into the model's heads.<task>, refusing anything else."""
    arrays = {key: array.numpy() for key, array in record.items()}
    arrays_to_heads(model, arrays, task)
