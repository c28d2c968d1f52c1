"""Binomial confidence bounds, certified radii and summaries of a certification run.

Randomized smoothing (Cohen, Rosenfeld, Kolter 2019) turns a base classifier f into g(x) = argmax_c P[f(x + σε) = c],
ε ~ N(0, I). If p_A = P[f(x + σε) = c_A] satisfies p_A ≥ p̲_A > 1/2, then g(x + δ) = c_A for every ‖δ‖₂ < σ·Φ⁻¹(p̲_A).
p̲_A comes from a one-sided Clopper-Pearson bound on k successes out of n Monte-Carlo draws.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy.stats import beta, norm

from arq_deploy.core.errors import CertificationInputError

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def _check_binomial(k: int, n: int, alpha: float) -> None:
    if not isinstance(n, numbers.Integral) or n < 1:
        raise CertificationInputError(f"the number of samples n must be an integer >= 1, got {n!r}")
    if not isinstance(k, numbers.Integral) or not 0 <= k <= n:
        raise CertificationInputError(f"the success count k must lie in [0, n] = [0, {n}], got {k!r}")
    if not (math.isfinite(alpha) and 0.0 < alpha < 1.0):
        raise CertificationInputError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")


def cp_lower(k: int, n: int, alpha: float) -> float:
    """One-sided (1 − α) Clopper-Pearson lower bound on p from k ~ Binomial(n, p).

    p̲ = B⁻¹(α; k, n − k + 1), the α-quantile of Beta(k, n − k + 1), and p̲ = 0 when k = 0.
    Guarantee: P[p̲ ≤ p] ≥ 1 − α for every p.
    """
    _check_binomial(k, n, alpha)
    if k == 0:
        return 0.0
    return float(beta.ppf(alpha, k, n - k + 1))


def cp_upper(k: int, n: int, alpha: float) -> float:
    """One-sided (1 − α) Clopper-Pearson upper bound: p̄ = B⁻¹(1 − α; k + 1, n − k), and p̄ = 1 when k = n."""
    _check_binomial(k, n, alpha)
    if k == n:
        return 1.0
    return float(beta.ppf(1.0 - alpha, k + 1, n - k))


def rcp_lower(k, n, alpha: float, u):
    """One-sided (1 − α) *randomized* Clopper-Pearson lower bound on p from k ~ Binomial(n, p) and an independent
    u ~ Uniform(0, 1) (Voráček 2024 use the randomized test to close CP's discreteness gap).

    The randomized p-value of H0: p ≤ p0, π(p0) = P_p0[X > k] + u·P_p0[X = k], is exactly Uniform(0, 1) under p0
    (it is P[(X', u') beats (X, u)] for an independent copy), and increases in p0. The bound is the root of π(p̲) = α,
    so P[p̲ > p] = P[π(p) < α] = α exactly: the coverage is 1 − α, not "at least". Since π(p0) ≤ P_p0[X ≥ k], the
    root lies at or above CP's: p̲ ∈ [cp_lower(k), cp_lower(k + 1)] (CP at k + 1 bounds it from above), so it is
    never looser. Where the exact rule's confidence set is empty (k = n and u ≤ α, an infinite radius) it returns
    cp_lower(n, n, α) instead, which only lowers the bound (coverage stays ≥ 1 − α).

    k, n, u may be numpy arrays (broadcast); the root is found by 64 vectorized bisection steps (float64 precision).
    Returns a float for scalar input, else an array.
    """
    from scipy.special import bdtrc, betaincinv
    from scipy.stats import binom

    scalar = all(np.ndim(v) == 0 for v in (k, n, u))
    k, n, u = np.broadcast_arrays(np.asarray(k, np.int64), np.asarray(n, np.int64), np.asarray(u, np.float64))
    if scalar:
        _check_binomial(int(k), int(n), alpha)
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise CertificationInputError("rcp_lower needs 0 <= k <= n and n >= 1")
    if not (math.isfinite(alpha) and 0.0 < alpha < 1.0):
        raise CertificationInputError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")
    if np.any(~np.isfinite(u)) or np.any(u < 0) or np.any(u > 1):
        raise CertificationInputError("the randomization u must lie in [0, 1]")
    kf, nf = k.astype(np.float64), n.astype(np.float64)
    lo = np.where(k > 0, betaincinv(np.maximum(kf, 1.0), nf - kf + 1.0, alpha), 0.0)
    hi = np.where(k < n, betaincinv(kf + 1.0, np.maximum(nf - kf, 1.0), alpha), 1.0)

    def pi(p):
        return bdtrc(k, n, p) + u * binom.pmf(k, n, p)

    empty = pi(hi) <= alpha  # k = n and u <= alpha: no root below 1
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        below = pi(mid) < alpha
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    out = np.where(empty, np.where(k > 0, betaincinv(np.maximum(kf, 1.0), nf - kf + 1.0, alpha), 0.0), lo)
    return float(out) if scalar else out


def radius(sigma: float, pa_lower: float) -> float:
    """Certified L2 radius R = σ·Φ⁻¹(p̲_A); positive only when p̲_A > 1/2 (callers abstain otherwise)."""
    return float(sigma * norm.ppf(pa_lower))


@dataclass(frozen=True)
class Summary:
    """Aggregate of a certification run over `count` inputs.

    certified_accuracy[i] = (1/M)·#{inputs: correct and R ≥ radii[i]}; acr = (1/M)·Σ R·1[correct];
    clean_accuracy = (1/M)·#{correct} (the smoothed classifier's accuracy, abstentions count as wrong).
    """

    radii: tuple[float, ...]
    certified_accuracy: tuple[float, ...]
    acr: float
    abstain_rate: float
    clean_accuracy: float
    seconds_per_input: float
    count: int

    def at(self, r: float) -> float:
        """Certified accuracy at radius r (must be one of `radii`)."""
        for ri, acc in zip(self.radii, self.certified_accuracy):
            if math.isclose(ri, r):
                return acc
        raise KeyError(f"radius {r} was not summarised; radii are {self.radii}")

    def to_dict(self) -> dict:
        """JSON-ready dict; certified accuracy is keyed by the radius written with `format(r, 'g')`."""
        d = asdict(self)
        d["radii"] = list(self.radii)
        d["certified_accuracy"] = {format(r, "g"): a for r, a in zip(self.radii, self.certified_accuracy)}
        return d


def summarize(certs: Iterable, radii: Sequence[float] = DEFAULT_RADII) -> Summary:
    """Summarise certificates (objects with `correct`, `radius`, `prediction`, `seconds`); see `Summary`."""
    certs = list(certs)
    if not certs:
        raise CertificationInputError("there are no certificates to summarise")
    m = len(certs)
    correct_radii = [c.radius for c in certs if c.correct]
    return Summary(
        radii=tuple(float(r) for r in radii),
        certified_accuracy=tuple(sum(r_c >= r for r_c in correct_radii) / m for r in radii),
        acr=sum(correct_radii) / m,
        abstain_rate=sum(c.prediction == -1 for c in certs) / m,
        clean_accuracy=len(correct_radii) / m,
        seconds_per_input=sum(c.seconds for c in certs) / m,
        count=m,
    )


def cost_to_match(points: Sequence[tuple[float, float]], target: float) -> tuple[float, str]:
    """What a baseline costs to reach `target` of a quality that grows with its cost (ACR against seconds).

    points: the baseline's measured (cost, quality) pairs, e.g. full CERTIFY at several N. The quality is made
    monotone (a running maximum over increasing cost) and the cost interpolated linearly between the two measured
    points that bracket `target`. Returns (cost, kind): kind "interpolated"; "at most" where the cheapest point already
    reaches the target (cost is that point's); "at least" where no point reaches it (cost is the dearest point's).
    """
    pts = sorted((float(c), float(q)) for c, q in points)
    if not pts:
        raise CertificationInputError("cost_to_match needs at least one measured point")
    best, mono = -math.inf, []
    for c, q in pts:
        best = max(best, q)
        mono.append((c, best))
    if mono[0][1] >= target:
        return mono[0][0], "at most"
    for (c0, q0), (c1, q1) in zip(mono, mono[1:]):
        if q1 >= target:
            return c0 + (c1 - c0) * (target - q0) / (q1 - q0), "interpolated"
    return mono[-1][0], "at least"
