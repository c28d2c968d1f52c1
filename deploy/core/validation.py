"""Checks of the numbers every stage takes (sample counts, seeds, α, σ), raising one clear CertificationInputError."""

from __future__ import annotations

import math
import numbers

from arq_deploy.core.errors import CertificationInputError


def check_seed(seed) -> int:
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise CertificationInputError(f"seed must be an integer, got {seed!r}")
    return int(seed)


def check_count(name: str, value) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise CertificationInputError(f"{name} (number of noise samples) must be an integer >= 1, got {value!r}")
    return int(value)


def check_alpha(alpha) -> float:
    if not isinstance(alpha, numbers.Real) or not (math.isfinite(alpha) and 0.0 < alpha < 1.0):
        raise CertificationInputError(f"alpha (failure probability) must lie strictly between 0 and 1, got {alpha!r}")
    return float(alpha)


def check_params(n0, n, alpha) -> tuple[int, int, float]:
    """Validate CERTIFY's (n0, n, alpha) and return them as (int, int, float)."""
    return check_count("n0", n0), check_count("n", n), check_alpha(alpha)


def check_sigma(sigma) -> float:
    """σ, the smoothing noise's standard deviation in pixel units: a finite number > 0."""
    if not isinstance(sigma, numbers.Real) or isinstance(sigma, bool) or not (math.isfinite(sigma) and sigma > 0):
        raise CertificationInputError(f"sigma (noise level) must be a finite number > 0, got {sigma!r}")
    return float(sigma)
