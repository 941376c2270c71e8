"""The epsilon lower bound of a one-run privacy audit (Steinke, Nasr, Jagielski, NeurIPS 2023).

"Privacy Auditing with One (1) Training Run", arXiv:2305.08846: m canaries, each included
in the training data independently with probability 1/2; after one run the auditor guesses
"in" or "out" for r of them (abstaining on the rest) and v guesses are right. If the
training is (eps, delta)-DP with respect to each canary, the number of correct guesses is
dominated by W ~ Binomial(r, e^eps / (1 + e^eps)) up to a delta term (their Theorem 3 and
Corollary 5.4; Appendix D gives it as code):

    P[correct >= v] <= P[W >= v] + 2 m delta * max_{i=1..v} P[v - i <= W < v] / i

The right-hand side is the p-value of v under the hypothesis "(eps, delta)-DP"; the audit's
lower bound is the largest eps that this p-value rejects at level 1 - confidence. The two
examples the paper prints (m=1000, r=100, v=75, delta=1e-4 -> 0.673; m=100000, r=1510,
v=1439, delta=1e-5 -> 2.675, both at 95 %) are reproduced by `tests/client/test_privacy_audit.py`.

The paper's own code bisects 30 times from an integer bracket; here the bisection runs to
1e-9, which only sharpens the last digit.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats


def _check_counts(m: int, r: int, v: int, delta: float) -> None:
    if not (isinstance(m, (int, np.integer)) and isinstance(r, (int, np.integer)) and isinstance(v, (int, np.integer))):
        raise TypeError(f"m, r, v must be integers (counts), got {m!r}, {r!r}, {v!r}")
    if not 0 <= v <= r <= m or m < 1:
        raise ValueError(f"need 0 <= v <= r <= m and m >= 1 (v correct of r guesses, m canaries), "
                         f"got m={m}, r={r}, v={v}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of at least v correct guesses out of r, m canaries, if the run is (epsilon, delta)-DP."""
    _check_counts(m, r, v, delta)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
    q = 1.0 / (1.0 + math.exp(-epsilon))     # accuracy of epsilon-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, q))  # P[W >= v]
    if v == 0 or delta == 0:
        return min(1.0, tail)
    i = np.arange(1, v + 1)
    below = stats.binom.cdf(v - 1, r, q) - stats.binom.cdf(v - 1 - i, r, q)   # P[v - i <= W < v]
    alpha = float(np.max(below / i))
    return min(1.0, tail + 2.0 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95,
                        tolerance: float = 1e-9) -> float:
    """The largest epsilon that v correct guesses of r (m canaries) reject at `confidence`; 0 if none."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    level = 1.0 - confidence
    rejects = lambda eps: one_run_p_value(m, r, v, eps, delta) <= level  # noqa: E731
    if not rejects(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejects(hi):
        lo, hi = hi, 2.0 * hi
        if hi > 1e4:        # every epsilon rejected: only possible with delta = 0 and perfect guesses
            return math.inf
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if rejects(mid):
            lo = mid
        else:
            hi = mid
    return lo


__all__ = ["one_run_p_value", "epsilon_lower_bound"]
