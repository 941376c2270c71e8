"""DP-SGD for task heads on cached backbone features (Opacus), and the same loop without DP.

One row of `inputs` is one patient: Poisson sampling and per-sample clipping then
bound what any one patient can change, which is what the ledger's epsilon means.
Rows sharing a patient id are rejected (pick one scan per patient first, e.g. with
`first_row_per_patient`).

Accounting uses ONE accountant across rounds: `private_round` reserves the round's
cost in the ledger, hands the ledger's restored accountant to the PrivacyEngine (so
Opacus appends this round's steps to the model's whole history), and commits after
training -- the epsilon reported covers every round so far, not just this one.
"""
from __future__ import annotations

import contextlib
import logging
import secrets
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from opacus import PrivacyEngine
from opacus.accountants.accountant import IAccountant
from opacus.grad_sample import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from pasta_model.device import select_device

from .ledger import PrivacyLedger, make_accountant
from .planning import poisson_schedule

log = logging.getLogger(__name__)

Targets = Tensor | Mapping[str, Tensor]
LossFn = Callable[[Tensor, Tensor | dict[str, Tensor]], Tensor]


@dataclass
class DPTrainResult:
    loss: float                 # mean training loss over the samples seen this round
    steps: int                  # optimizer (privacy) steps taken this round
    sample_rate: float          # Poisson sample rate per step (plain: batch fraction)
    noise_multiplier: float     # 0.0 without DP
    epsilon: float | None       # epsilon over the model's whole history after this round (None: no DP/no delta)
    delta: float | None
    num_examples: int           # patients (rows); FedAvg weights sites by this
    epochs: int
    seconds: float              # whole call, set-up (make_private, data loaders) included
    device: str
    train_seconds: float        # the epochs' loop alone
    head: nn.Module = field(repr=False)                     # the trained module (the caller's, unless fixed)
    accountant: IAccountant | None = field(default=None, repr=False)


def _fresh_seed() -> int:
    """A new seed for every call: Poisson batches and noise must be independent across rounds
    (the same seed every round would repeat the noise, and differences of rounds would cancel it)."""
    return secrets.randbits(62)


def check_one_row_per_patient(patient_ids: Sequence | None, n_rows: int) -> None:
    """Patient-level DP needs one sample per patient: reject duplicated patient ids."""
    if patient_ids is None:
        return
    ids = list(patient_ids)
    if len(ids) != n_rows:
        raise ValueError(f"patient_ids has {len(ids)} entries for {n_rows} rows")
    dups = sorted({str(p) for p, rows in Counter(ids).items() if rows > 1})
    if dups:
        shown = ", ".join(dups[:5]) + (" ..." if len(dups) > 5 else "")
        raise ValueError(f"{len(dups)} patient(s) have several rows ({shown}); DP-SGD needs one row per "
                         f"patient for the guarantee to be patient-level: keep one scan per patient "
                         f"(first_row_per_patient) or aggregate them")


def first_row_per_patient(patient_ids: Sequence) -> list[int]:
    """Indices of the first row of each patient, in order."""
    seen: set = set()
    first: list[int] = []
    for i, p in enumerate(patient_ids):
        if p not in seen:
            seen.add(p)
            first.append(i)
    return first


def _dataset(inputs: Tensor, targets: Targets) -> tuple[TensorDataset, tuple[str, ...] | None]:
    n = inputs.shape[0]
    if isinstance(targets, Mapping):
        keys = tuple(targets)
        tensors = [torch.as_tensor(targets[k]) for k in keys]
    else:
        keys, tensors = None, [torch.as_tensor(targets)]
    for name, t in zip(keys or ("targets",), tensors):
        if t.shape[0] != n:
            raise ValueError(f"{name} has {t.shape[0]} rows, inputs have {n}")
    return TensorDataset(inputs, *tensors), keys


def _unpack(batch, keys, device):
    x = batch[0].to(device, non_blocking=True)
    ys = [t.to(device, non_blocking=True) for t in batch[1:]]
    return x, (dict(zip(keys, ys)) if keys is not None else ys[0])


def _proximal_step(params: Sequence[nn.Parameter], global_params: Sequence[Tensor], lr: float, mu: float) -> None:
    """FedProx: w -= lr * mu * (w - w_global), the gradient of mu/2 ||w - w_global||^2.

    Applied as its own step rather than added to the loss: Opacus builds the update from
    per-sample gradients of the data term only, so a proximal term in the loss would be
    silently dropped under DP. It depends on no patient data, so it costs no privacy.
    """
    with torch.no_grad():
        for p, g in zip(params, global_params):
            p.sub_(lr * mu * (p - g))


def _global_tensors(head: nn.Module, global_params, device) -> list[Tensor] | None:
    if global_params is None:
        return None
    if isinstance(global_params, Mapping):
        names = [n for n, _ in head.named_parameters()]
        missing = [n for n in names if n not in global_params]
        if missing:
            raise ValueError(f"global_params lacks {missing[:3]}")
        return [torch.as_tensor(global_params[n]).to(device) for n in names]
    return [torch.as_tensor(g).to(device) for g in global_params]


def _prepared_head(head: nn.Module) -> nn.Module:
    errors = ModuleValidator.validate(head, strict=False)
    if not errors:
        return head
    fixed = ModuleValidator.fix(head)
    remaining = ModuleValidator.validate(fixed, strict=False)
    if remaining:
        raise ValueError(f"head cannot be trained with DP-SGD: {remaining}")
    log.warning("head was not DP-compatible (%s); training a fixed copy (see result.head)", errors)
    return fixed


@contextlib.contextmanager
def _physical_batches(dp_loader, max_physical_batch_size: int | None, optimizer):
    """Logical (privacy) batches as they are, or split by BatchMemoryManager to bound memory."""
    if not max_physical_batch_size:
        yield dp_loader
        return
    with BatchMemoryManager(data_loader=dp_loader, max_physical_batch_size=max_physical_batch_size,
                            optimizer=optimizer) as physical:
        yield physical


def train_head_dp(head: nn.Module, inputs: Tensor, targets: Targets, loss_fn: LossFn, *, epochs: int,
                  batch_size: int, lr: float, noise_multiplier: float, max_grad_norm: float,
                  device: str | torch.device = "auto", seed: int | None = None, accountant: IAccountant | None = None,
                  mechanism: str = "rdp", delta: float | None = None, patient_ids: Sequence | None = None,
                  max_physical_batch_size: int | None = None, global_params=None, prox_mu: float = 0.0,
                  momentum: float = 0.0, grad_sample_mode: str = "hooks") -> DPTrainResult:
    """Fine-tune `head` with DP-SGD: Poisson sampling, per-sample clipping, Gaussian noise.

    `loss_fn(outputs, targets)` must be a mean over the batch's samples. `accountant`
    (e.g. a ledger reservation's) receives this round's steps; without it a fresh one
    of `mechanism` is used and the result's epsilon covers this round only. `seed`
    fixes sampling and noise for tests; leave it None in production (fresh per call).
    """
    t0 = time.perf_counter()
    _check_dp_settings(noise_multiplier, max_grad_norm)
    check_one_row_per_patient(patient_ids, inputs.shape[0])
    dev = select_device(device)
    seed = _fresh_seed() if seed is None else int(seed)
    dataset, keys = _dataset(inputs, targets)
    sched = poisson_schedule(len(dataset), batch_size)
    module = _prepared_head(head).to(dev)
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    globals_ = _global_tensors(module, global_params, dev)
    proximal = (lambda: _proximal_step(params, globals_, lr, prox_mu)) if prox_mu and globals_ else None
    with _expected_opacus_warnings_silenced():
        private = _make_private(module, params, dataset, accountant=accountant, mechanism=mechanism,
                                batch_size=batch_size, lr=lr, momentum=momentum,
                                noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, seed=seed,
                                device=dev, grad_sample_mode=grad_sample_mode)
        t_loop = time.perf_counter()
        try:
            loss_sum, seen = _dp_epochs(private.module, private.optimizer, private.loader, loss_fn, keys, dev,
                                        epochs, max_physical_batch_size, proximal)
        finally:
            private.module.to_standard_module()  # removes Opacus' hooks from the head
            _clear_per_sample_state(params)
    train_seconds = _seconds_since(t_loop, dev)
    acc = private.engine.accountant
    eps = float(acc.get_epsilon(delta=delta)) if delta is not None else None
    return DPTrainResult(loss=loss_sum / max(seen, 1), steps=_accounted_steps(acc) - private.steps_before,
                         sample_rate=sched.sample_rate, noise_multiplier=float(noise_multiplier), epsilon=eps,
                         delta=delta, num_examples=len(dataset), epochs=epochs,
                         seconds=time.perf_counter() - t0, device=str(dev), train_seconds=train_seconds,
                         head=module, accountant=acc)


def _check_dp_settings(noise_multiplier: float, max_grad_norm: float) -> None:
    """DP-SGD without noise or without a clipping bound gives no guarantee: refuse both."""
    if noise_multiplier <= 0:
        raise ValueError(f"noise_multiplier must be > 0 for DP-SGD, got {noise_multiplier}")
    if max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")


@dataclass
class _PrivateTraining:
    """What Opacus' make_private hands back, plus the accountant's step count before this call."""

    engine: PrivacyEngine
    module: AbstractGradSampleModule
    optimizer: DPOptimizer
    loader: DataLoader
    steps_before: int


def _accounted_steps(accountant: IAccountant) -> int:
    return sum(steps for _, _, steps in accountant.history)


def _make_private(module: nn.Module, params: Sequence[nn.Parameter], dataset: TensorDataset, *,
                  accountant: IAccountant | None, mechanism: str, batch_size: int, lr: float, momentum: float,
                  noise_multiplier: float, max_grad_norm: float, seed: int, device: torch.device,
                  grad_sample_mode: str) -> _PrivateTraining:
    """PrivacyEngine.make_private with Poisson sampling and seeded batches and noise.

    A given `accountant` is installed before make_private, because Opacus binds its
    step hook to the engine's accountant object then: this round's steps land in it.
    """
    engine = PrivacyEngine(accountant=accountant.mechanism() if accountant is not None else mechanism)
    if accountant is not None:
        engine.accountant = accountant
    steps_before = _accounted_steps(engine.accountant)
    gs_module, dp_optimizer, dp_loader = engine.make_private(
        module=module, optimizer=torch.optim.SGD(params, lr=lr, momentum=momentum),
        data_loader=DataLoader(dataset, batch_size=batch_size, shuffle=False,
                               generator=torch.Generator().manual_seed(seed)),
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, poisson_sampling=True,
        noise_generator=torch.Generator(device=device).manual_seed(seed + 1), grad_sample_mode=grad_sample_mode)
    return _PrivateTraining(engine, gs_module, dp_optimizer, dp_loader, steps_before)


def _seconds_since(start: float, device: torch.device) -> float:
    """Wall seconds since `start`, after the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def _expected_opacus_warnings_silenced():
    """Silence, for this training only (not process-wide), two warnings that are expected here."""
    with warnings.catch_warnings():
        # secure_mode (torchcsprng) is off; the generators are seeded from the OS CSPRNG per
        # call (docs/privacy.md)
        warnings.filterwarnings("ignore", message="Secure RNG turned off", module="opacus")
        # heads on cached features: inputs never need gradients, which Opacus' hooks warn about
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def _dp_epochs(gs_module, dp_optimizer, dp_loader, loss_fn: LossFn, keys, dev: torch.device, epochs: int,
               max_physical_batch_size: int | None, proximal: Callable[[], None] | None) -> tuple[float, int]:
    """The DP-SGD loop; returns (summed loss, samples seen). The proximal step follows each real
    (not virtual) optimizer step: `pre_step` clips, noises and says whether this is one."""
    loss_sum, seen = 0.0, 0
    for _ in range(epochs):
        with _physical_batches(dp_loader, max_physical_batch_size, dp_optimizer) as physical:
            for batch in physical:
                x, y = _unpack(batch, keys, dev)
                dp_optimizer.zero_grad(set_to_none=True)
                out = gs_module(x)
                if x.shape[0] == 0:  # empty Poisson batch: still a step (noise only), no loss to log
                    loss = out.sum() * 0.0
                else:
                    loss = loss_fn(out, y)
                    loss_sum += float(loss.detach()) * x.shape[0]
                    seen += x.shape[0]
                loss.backward()
                if dp_optimizer.pre_step():
                    dp_optimizer.original_optimizer.step()
                    if proximal is not None:
                        proximal()
    return loss_sum, seen


def _clear_per_sample_state(params: Sequence[nn.Parameter]) -> None:
    for p in params:
        for attr in ("summed_grad", "grad_sample"):
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None  # the last noisy gradient is not part of the result


def train_head_plain(head: nn.Module, inputs: Tensor, targets: Targets, loss_fn: LossFn, *, epochs: int,
                     batch_size: int, lr: float, noise_multiplier: float = 0.0, max_grad_norm: float = 0.0,
                     device: str | torch.device = "auto", seed: int | None = None,
                     accountant: IAccountant | None = None, mechanism: str = "rdp", delta: float | None = None,
                     patient_ids: Sequence | None = None, max_physical_batch_size: int | None = None,
                     global_params=None, prox_mu: float = 0.0,
                     momentum: float = 0.0, grad_sample_mode: str = "hooks") -> DPTrainResult:
    """The same loop without DP (shuffled fixed-size batches): the non-private baseline.

    Takes train_head_dp's arguments so the two are interchangeable; the DP-only ones
    (noise, clipping, accountant) are ignored.
    """
    t0 = time.perf_counter()
    check_one_row_per_patient(patient_ids, inputs.shape[0])
    dev = select_device(device)
    seed = _fresh_seed() if seed is None else int(seed)
    dataset, keys = _dataset(inputs, targets)
    n = len(dataset)
    module = head.to(dev)
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    globals_ = _global_tensors(module, global_params, dev)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    loss_sum, seen, steps = 0.0, 0, 0
    t_loop = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            x, y = _unpack(batch, keys, dev)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(module(x), y)
            loss.backward()
            optimizer.step()
            if prox_mu and globals_ is not None:
                _proximal_step(params, globals_, lr, prox_mu)
            loss_sum += float(loss.detach()) * x.shape[0]
            seen += x.shape[0]
            steps += 1
    train_seconds = _seconds_since(t_loop, dev)
    return DPTrainResult(loss=loss_sum / max(seen, 1), steps=steps, sample_rate=min(1.0, batch_size / n),
                         noise_multiplier=0.0, epsilon=None, delta=None, num_examples=n, epochs=epochs,
                         seconds=time.perf_counter() - t0, device=str(dev), train_seconds=train_seconds,
                         head=module)


def private_round(ledger: PrivacyLedger, *, run_id: str, round: int, max_epsilon: float, delta: float,
                  head: nn.Module, inputs: Tensor, targets: Targets, loss_fn: LossFn, epochs: int,
                  batch_size: int, lr: float, noise_multiplier: float, max_grad_norm: float,
                  task: str | None = None, replay: bool = False, backbone: str | None = None,
                  **train_kwargs) -> DPTrainResult:
    """One federated round at a site: reserve its cost, train with the ledger's accountant, commit.

    Noise and Poisson batches come from a fresh OS-CSPRNG seed per call unless `seed` is
    given (simulations and tests only): a retried round never repeats an earlier attempt's noise.

    Raises ledger.BudgetExceeded before touching the head when the round does not fit;
    the ledger is durably updated before this returns (i.e. before any reply is sent).
    """
    sched = poisson_schedule(inputs.shape[0], batch_size)
    # cheap checks first: a round that cannot run must not cost budget
    check_one_row_per_patient(train_kwargs.get("patient_ids"), inputs.shape[0])
    _dataset(inputs, targets)
    if max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    if train_kwargs.get("seed") is not None:
        log.warning("private_round with a fixed seed: every call repeats the same noise, which voids the DP "
                    "guarantee across attempts; only simulations and tests may do this")
    reservation = ledger.reserve(run_id=run_id, round=round, noise_multiplier=noise_multiplier,
                                 sample_rate=sched.sample_rate, steps=sched.steps_per_epoch * epochs,
                                 max_epsilon=max_epsilon, delta=delta, task=task, replay=replay,
                                 backbone=backbone)
    accountant = reservation.accountant()
    result = train_head_dp(head, inputs, targets, loss_fn, epochs=epochs, batch_size=batch_size, lr=lr,
                           noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                           accountant=accountant, delta=delta, **train_kwargs)
    ledger.commit(reservation, accountant)
    result.epsilon = ledger.epsilon(delta)
    return result


__all__ = ["DPTrainResult", "train_head_dp", "train_head_plain", "private_round",
           "check_one_row_per_patient", "first_row_per_patient", "make_accountant"]
