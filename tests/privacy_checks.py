"""Privacy figures computed independently of the code under test, for tests to compare against.

The sites account with Opacus; these helpers use Google's dp-accounting library, so a test
that compares the two checks the ledger against a second implementation, not against itself.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import dp_accounting
from opacus.accountants import RDPAccountant

# Opacus' own RDP orders: with the same orders both libraries bound the same curve
OPACUS_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)


def dp_accounting_epsilon(charges: Iterable[Sequence[float]], delta: float,
                          orders: Sequence[float] = OPACUS_ORDERS) -> float:
    """RDP epsilon at `delta` of DP-SGD charges `(noise_multiplier, sample_rate, steps)`, by dp-accounting.

    A charge with sample rate < 1 is a Poisson-subsampled Gaussian, one with rate 1 a plain
    Gaussian (every patient in every step); `steps` repeats of it compose.
    """
    accountant = dp_accounting.rdp.RdpAccountant(list(orders))
    for sigma, q, steps in charges:
        event = dp_accounting.GaussianDpEvent(float(sigma))
        if q < 1:
            event = dp_accounting.PoissonSampledDpEvent(float(q), event)
        accountant.compose(event, int(steps))
    return float(accountant.get_epsilon(delta))
