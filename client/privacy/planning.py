"""Noise planning: the noise multiplier that makes the whole federation fit the site's budget.

Pure functions. The site plans from its own budget (max_epsilon, delta), its own
data (N patients, batch size) and the coordinator's announced plan (rounds x local
epochs), taking into account what the ledger says is already spent. Re-planning
every round from the ledger adapts to missed or replayed rounds.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

from .ledger import BudgetExceeded, epsilon_of, merge_history


@dataclass(frozen=True)
class PoissonSchedule:
    sample_rate: float      # probability that a patient is in a step's batch
    steps_per_epoch: int


def poisson_schedule(n_patients: int, batch_size: int) -> PoissonSchedule:
    """The sample rate and steps per epoch Opacus' make_private(poisson_sampling=True) will use.

    Opacus sets sample_rate = 1 / len(data_loader) = 1 / ceil(N / B), so the planner and
    the trainer must agree on that (not on B / N) for the ledger to match the engine.
    The expected batch is therefore N / ceil(N / B) <= B patients.
    """
    if n_patients < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sample_rate = 1.0 / math.ceil(n_patients / batch_size)
    # Opacus' sampler runs int(1 / sample_rate) steps per epoch, which is one less than
    # ceil(N / B) for some values (e.g. 93) because of float rounding: mirror it exactly.
    return PoissonSchedule(sample_rate=sample_rate, steps_per_epoch=int(1 / sample_rate))


def noise_for_budget(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     history: Sequence[Sequence] = (), mechanism: str = "rdp",
                     epsilon_tolerance: float = 0.01) -> float:
    """Smallest noise (within tolerance) such that history + `steps` more steps stays <= target.

    Without history this is exactly `opacus.accountants.utils.get_noise_multiplier`; with
    history it runs the same doubling-then-bisection search, evaluating Opacus'
    accountant on the full history plus the planned steps.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not history:
        try:
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=int(steps),
                                              accountant=mechanism, epsilon_tolerance=epsilon_tolerance))
        except ValueError as exc:
            raise BudgetExceeded(0.0, float("inf"), target_epsilon, delta, what="plan") from exc

    spent = epsilon_of(mechanism, history, delta)

    def eps_with(sigma: float) -> float:
        return epsilon_of(mechanism, merge_history(history, sigma, sample_rate, steps), delta)

    sigma_low, sigma_high, eps_high = 0.0, 10.0, float("inf")
    while eps_high > target_epsilon:
        sigma_high *= 2
        eps_high = eps_with(sigma_high)
        if sigma_high > MAX_SIGMA:
            raise BudgetExceeded(spent, eps_high, target_epsilon, delta, what="plan")
    while target_epsilon - eps_high > epsilon_tolerance:
        sigma = (sigma_low + sigma_high) / 2
        eps = eps_with(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
        if sigma_high - sigma_low < 1e-9:  # the history alone sits just under the target
            break
    return float(sigma_high)


@dataclass(frozen=True)
class NoisePlan:
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int                 # rounds the plan covers (this one included)
    epsilon_spent: float        # before this plan
    projected_epsilon: float    # after all planned rounds at this noise
    max_epsilon: float
    delta: float
    mechanism: str


def evaluation_noise(*, max_epsilon: float, share: float, delta: float, evaluations: int,
                     mechanism: str = "rdp") -> float:
    """Noise multiplier of one DP evaluation (a Gaussian mechanism, sample rate 1) such that
    `evaluations` of them alone cost `share * max_epsilon`: the site's share for evaluation."""
    if not 0 < share < 1:
        raise ValueError(f"evaluation share must be in (0, 1), got {share}")
    try:
        return float(get_noise_multiplier(target_epsilon=share * max_epsilon, target_delta=delta, sample_rate=1.0,
                                          steps=int(evaluations), accountant=mechanism, epsilon_tolerance=0.01))
    except ValueError as exc:
        raise BudgetExceeded(0.0, float("inf"), share * max_epsilon, delta, what="evaluation plan") from exc


def plan_noise(*, max_epsilon: float, delta: float, n_patients: int, batch_size: int, local_epochs: int,
               rounds: int, history: Sequence[Sequence] = (), mechanism: str = "rdp",
               epsilon_tolerance: float = 0.01, reserved: Sequence[Sequence] = ()) -> NoisePlan:
    """One noise multiplier for the `rounds` remaining rounds so the site ends at ~max_epsilon.

    `reserved`: future releases to keep room for (the planned evaluations, as history
    items); they are planned for, not charged. Raises BudgetExceeded when the history
    (and the reservation) leave no room for the plan.
    """
    for n, q, s in reserved:
        history = merge_history(history, n, q, s)
    if local_epochs < 1:
        raise ValueError(f"local_epochs must be >= 1, got {local_epochs}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    sched = poisson_schedule(n_patients, batch_size)
    steps_per_round = sched.steps_per_epoch * int(local_epochs)
    total_steps = steps_per_round * int(rounds)
    sigma = noise_for_budget(target_epsilon=max_epsilon, delta=delta, sample_rate=sched.sample_rate,
                             steps=total_steps, history=history, mechanism=mechanism,
                             epsilon_tolerance=epsilon_tolerance)
    projected = epsilon_of(mechanism, merge_history(history, sigma, sched.sample_rate, total_steps), delta)
    return NoisePlan(noise_multiplier=sigma, sample_rate=sched.sample_rate, steps_per_round=steps_per_round,
                     rounds=int(rounds), epsilon_spent=epsilon_of(mechanism, history, delta),
                     projected_epsilon=projected, max_epsilon=max_epsilon, delta=delta, mechanism=mechanism)
