"""Clopper-Pearson bounds, radii and run summaries (arq_deploy.certify.stats)."""

import math

import numpy as np
import pytest
from scipy.stats import norm

from arq_deploy.certify.smooth import ABSTAIN, Certificate
from arq_deploy.certify.stats import cp_lower, cp_upper, radius, summarize
from arq_deploy.core.errors import CertificationInputError


def binom_tail_ge(k: int, n: int, p: float) -> float:
    """P[Binomial(n, p) >= k] by summing the probability mass function term by term."""
    return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))


CASES = [(1, 10, 0.05), (5, 10, 0.05), (9, 10, 0.01), (37, 50, 0.1), (180, 200, 0.001), (499, 500, 0.05)]


@pytest.mark.parametrize("k,n,alpha", CASES)
def test_cp_lower_solves_the_binomial_tail_equation(k, n, alpha):
    # The one-sided CP lower bound is the p at which seeing >= k successes has probability exactly alpha.
    p = cp_lower(k, n, alpha)
    assert 0 < p < k / n
    assert binom_tail_ge(k, n, p) == pytest.approx(alpha, rel=1e-6)


@pytest.mark.parametrize("k,n,alpha", CASES)
def test_cp_upper_solves_the_binomial_tail_equation(k, n, alpha):
    # ... and the upper bound is the p at which seeing <= k successes has probability exactly alpha.
    p = cp_upper(k, n, alpha)
    assert k / n < p < 1
    assert 1 - binom_tail_ge(k + 1, n, p) == pytest.approx(alpha, rel=1e-6)


def test_cp_closed_forms_and_symmetry():
    # k = n: P[all n succeed] = p^n = alpha  =>  lower = alpha^(1/n); k = 0 bounds are 0 and 1 - alpha^(1/n).
    assert cp_lower(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100), rel=1e-12)
    assert cp_lower(0, 100, 0.001) == 0.0
    assert cp_upper(100, 100, 0.001) == 1.0
    assert cp_upper(0, 100, 0.001) == pytest.approx(1 - 0.001 ** (1 / 100), rel=1e-12)
    for k in (0, 3, 50, 97, 100):
        assert cp_upper(k, 100, 0.01) == pytest.approx(1 - cp_lower(100 - k, 100, 0.01), abs=1e-12)


def test_cp_lower_covers_with_probability_at_least_one_minus_alpha():
    # Exact coverage: sum the Binomial(n, p) mass of every k whose lower bound lies above p.
    n, alpha = 30, 0.1
    for p in (0.05, 0.3, 0.5, 0.77, 0.95):
        miss = sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1) if cp_lower(k, n, alpha) > p)
        assert miss <= alpha + 1e-12


def test_cp_monotone():
    lows = [cp_lower(k, 200, 0.01) for k in range(201)]
    assert all(a < b for a, b in zip(lows, lows[1:]))
    ups = [cp_upper(k, 200, 0.01) for k in range(201)]
    assert all(a < b for a, b in zip(ups, ups[1:]))
    assert all(lo < up for lo, up in zip(lows, ups))
    # A smaller alpha (more confidence) gives a lower lower bound; more samples at the same rate a tighter one.
    assert cp_lower(90, 100, 0.001) < cp_lower(90, 100, 0.01) < cp_lower(90, 100, 0.1)
    assert cp_lower(90, 100, 0.01) < cp_lower(900, 1000, 0.01) < cp_lower(9000, 10000, 0.01) < 0.9


@pytest.mark.parametrize("k,n,alpha", [(-1, 10, 0.1), (11, 10, 0.1), (1, 0, 0.1), (1, 10, 0.0), (1, 10, 1.0),
                                       (1, 10, float("nan")), (1.5, 10, 0.1)])
def test_cp_rejects_bad_arguments(k, n, alpha):
    with pytest.raises(CertificationInputError):
        cp_lower(k, n, alpha)
    with pytest.raises(CertificationInputError):
        cp_upper(k, n, alpha)


def test_radius():
    assert radius(0.25, 0.5) == 0.0
    assert radius(1.0, norm.cdf(1.0)) == pytest.approx(1.0, rel=1e-12)
    assert radius(0.5, norm.cdf(2.0)) == pytest.approx(1.0, rel=1e-12)
    assert radius(0.5, 0.3) < 0
    rs = [radius(0.5, p) for p in np.linspace(0.51, 0.999, 20)]
    assert all(a < b for a, b in zip(rs, rs[1:]))


def _cert(idx, label, pred, rad, seconds=1.0):
    return Certificate(idx=idx, label=label, prediction=pred, pa_lower=0.9 if pred != ABSTAIN else 0.4,
                       radius=rad, count_a=90, n0=10, n=100, seconds=seconds)


def test_summarize_hand_made_certificates():
    certs = [
        _cert(0, 3, 3, 0.10, 1.0),       # correct, small radius
        _cert(1, 3, 3, 0.50, 2.0),       # correct, radius exactly 0.5 (counts at r = 0.5)
        _cert(2, 1, 1, 1.20, 3.0),       # correct, large radius
        _cert(3, 2, 5, 0.90, 4.0),       # wrong class: never counts, however large its radius
        _cert(4, 0, ABSTAIN, 0.0, 5.0),  # abstention
    ]
    s = summarize(certs)
    assert s.count == 5
    assert s.radii == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert s.certified_accuracy == pytest.approx((3 / 5, 2 / 5, 2 / 5, 1 / 5, 1 / 5))
    assert s.clean_accuracy == pytest.approx(3 / 5)
    assert s.acr == pytest.approx((0.10 + 0.50 + 1.20) / 5)
    assert s.abstain_rate == pytest.approx(1 / 5)
    assert s.seconds_per_input == pytest.approx(3.0)
    assert s.at(0.5) == pytest.approx(2 / 5)
    d = s.to_dict()
    assert d["certified_accuracy"] == pytest.approx({"0": 0.6, "0.25": 0.4, "0.5": 0.4, "0.75": 0.2, "1": 0.2})
    assert d["acr"] == pytest.approx(0.36) and d["count"] == 5 and d["radii"] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_summarize_custom_radii_and_empty():
    s = summarize([_cert(0, 1, 1, 0.3), _cert(1, 1, 1, 0.7)], radii=(0.0, 0.5))
    assert s.certified_accuracy == pytest.approx((1.0, 0.5))
    with pytest.raises(CertificationInputError):
        summarize([])


def test_cost_to_match_interpolates_between_bracketing_runs():
    from arq_deploy.certify.stats import cost_to_match

    pts = [(10.0, 0.30), (20.0, 0.40), (50.0, 0.46)]
    c, kind = cost_to_match(pts, 0.35)
    assert kind == "interpolated" and c == pytest.approx(15.0)
    c, kind = cost_to_match(list(reversed(pts)), 0.43)  # order of the points does not matter
    assert kind == "interpolated" and math.isclose(c, 35.0)
    assert cost_to_match(pts, 0.40) == (pytest.approx(20.0), "interpolated")
    assert cost_to_match(pts, 0.2) == (10.0, "at most")
    assert cost_to_match(pts, 0.5) == (50.0, "at least")
    # a noisy dip (more samples, slightly lower quality) is levelled: the cheaper run already reached it
    c, kind = cost_to_match([(10.0, 0.30), (20.0, 0.42), (30.0, 0.41), (40.0, 0.50)], 0.415)
    assert kind == "interpolated" and c == pytest.approx(10.0 + 10.0 * (0.115 / 0.12))
    assert cost_to_match([(10.0, 0.30), (20.0, 0.42), (30.0, 0.41), (40.0, 0.50)], 0.46)[0] == \
        pytest.approx(30.0 + 10.0 * (0.04 / 0.08))
    with pytest.raises(CertificationInputError):
        cost_to_match([], 0.3)
