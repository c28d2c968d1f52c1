"""Randomized smoothing against linear base classifiers whose smoothed behaviour is known in closed form.

For the two-class base classifier f(x) = 1[w·x + b > 0] (logits [0, w·x + b]) and noise σε, ε ~ N(0, I):
    w·(x + σε) + b ~ N(m, σ²‖w‖²),  m = w·x + b,  so  P[f(x + σε) = 1] = Φ(m / (σ‖w‖)),
and the smoothed classifier's exact L2 robustness radius is the distance to the hyperplane, |m| / ‖w‖
(= σ·|Φ⁻¹(p_1)|, so CERTIFY with the true p_A would return it exactly).
"""

import math

import numpy as np
import pytest
from scipy.stats import binom, norm

from arq_deploy.certify.smooth import ABSTAIN, Smooth
from arq_deploy.certify.stats import cp_lower
from arq_deploy.core.errors import CertificationInputError
from arq_deploy.runtime.noise import CHUNK, input_seed, noise_batches

SHAPE = (1, 4, 4)
D = 16


class AffineRunner:
    """A real (tiny) base classifier: logits = x_flat @ W.T + b, computed in float64, returned as float32."""

    name = "affine"
    input_shape = SHAPE

    def __init__(self, W, b):
        self.W = np.asarray(W, dtype=np.float64)
        self.b = np.asarray(b, dtype=np.float64)
        self.num_classes = len(self.W)

    def __call__(self, x):
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        return (x @ self.W.T + self.b).astype(np.float32)


def two_class(w, b=0.0):
    """logits = [0, w·x + b]."""
    return AffineRunner(np.stack([np.zeros(D), w]), [0.0, b])


def margin(runner, x):
    """m = w·x + b for the two-class runner, from the float32 input actually certified."""
    return float(np.asarray(x, dtype=np.float64).ravel() @ runner.W[1] + runner.b[1])


def true_p1(runner, x, sigma):
    return float(norm.cdf(margin(runner, x) / (sigma * np.linalg.norm(runner.W[1]))))


def true_radius(runner, x):
    return abs(margin(runner, x)) / float(np.linalg.norm(runner.W[1]))


def inputs_with_p1(runner, p1, sigma, rng):
    """float32 inputs (one per entry of p1) at random places with P[f(x + σε) = 1] = p1: random pixels in [0, 1],
    then moved along w to the margin m = σ‖w‖Φ⁻¹(p1)."""
    p1 = np.atleast_1d(p1)
    w, b = runner.W[1], runner.b[1]
    x0 = rng.uniform(size=(len(p1), D))
    m = sigma * np.linalg.norm(w) * norm.ppf(p1)
    x = x0 + ((m - x0 @ w - b) / (w @ w))[:, None] * w
    return x.reshape(len(p1), *SHAPE).astype(np.float32)


@pytest.fixture(scope="module")
def w():
    return np.random.default_rng(7).normal(size=D)


# ---------------------------------------------------------------- analytic radius


@pytest.mark.parametrize("sigma,p", [(0.25, 0.7), (0.5, 0.99), (1.0, 0.9)])
def test_certified_radius_matches_analytic_radius(w, sigma, p):
    runner = two_class(w, b=0.3)
    x = inputs_with_p1(runner, p, sigma, np.random.default_rng(1))[0]
    p_true, r_true = true_p1(runner, x, sigma), true_radius(runner, x)
    assert r_true == pytest.approx(sigma * norm.ppf(p), rel=1e-4)  # the closed form we rely on
    n, alpha = 100_000, 0.001
    cert = Smooth(runner, 2, sigma).certify(x, n0=100, n=n, alpha=alpha, seed=11, label=1)
    assert cert.prediction == 1 and cert.correct and (cert.n0, cert.n) == (100, n)
    # The Monte-Carlo count is Binomial(n, p_true): within 5 sd (fails with probability < 1e-6 if the noise is right).
    sd = math.sqrt(p_true * (1 - p_true) / n)
    assert abs(cert.count_a / n - p_true) < 5 * sd
    # Soundness: p̲_A <= p_A, hence R_cert <= R_true (fails with probability <= alpha for a given seed).
    assert cert.pa_lower < p_true and cert.radius < r_true
    # Tightness: at n = 1e5 the CP bound is p̂ − z_{1−α}·sd to within ~1/n, and p̂ >= p − 5 sd (as above), so
    # p̲_A >= p − Δ with Δ = (z_{1−α} + 5)·sd + 1/n; through R = σΦ⁻¹(p) that is a radius gap of at most tol.
    delta = (norm.ppf(1 - alpha) + 5) * sd + 1 / n
    tol = sigma * (norm.ppf(p_true) - norm.ppf(p_true - delta))
    assert r_true - cert.radius <= tol
    assert tol < 0.1 * r_true  # the tolerance is tight enough to mean something


# ---------------------------------------------------------------- soundness over many inputs


def test_soundness_rate_is_at_most_alpha(w):
    # M random inputs with P[class 1] spread over [0.25, 0.9995] (so both classes, near-ties and large radii occur).
    # A certificate is violated when it names a class other than the smoothed classifier's or a radius above the
    # true one. CERTIFY guarantees P[violation] <= alpha for each input independently, so the violated fraction of
    # M is at most alpha + 3·sqrt(alpha(1 − alpha)/M) except with probability ~0.1%.
    sigma, n0, n, alpha, M = 0.5, 64, 300, 0.05, 1000
    runner = two_class(w, b=-0.2)
    rng = np.random.default_rng(2024)
    p1 = rng.uniform(0.25, 0.9995, size=M)
    xs = inputs_with_p1(runner, p1, sigma, rng)
    smooth = Smooth(runner, 2, sigma, batch_size=256)
    violations = abstains = 0
    for i, x in enumerate(xs):
        truth = int(margin(runner, x) > 0)
        cert = smooth.certify(x, n0, n, alpha, seed=input_seed(5, i), label=truth, idx=i)
        abstains += cert.prediction == ABSTAIN
        if cert.prediction != ABSTAIN and (cert.prediction != truth or cert.radius > true_radius(runner, x)):
            violations += 1
    assert violations / M <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / M)
    # Inputs with p_A well above 1/2 are certified, not abstained on: the set is not vacuously "sound".
    assert abstains / M < 0.3


def test_radius_is_not_overly_conservative(w):
    # All inputs have p_A = 0.9. Then K ~ Binomial(n, 0.9) and the certified radius is the known function
    # r(K) = σΦ⁻¹(cp_lower(K, n, α)) (0 when it abstains), so the expected gap E[R_true − r(K)] and its sd are
    # computable exactly. The mean gap over M inputs must lie within 4 standard errors of that expectation
    # (a looser bound, a wrong alpha or reusing the selection samples would move it by more).
    sigma, n0, n, alpha, M, p = 0.25, 64, 500, 0.05, 300, 0.9
    runner = two_class(w)
    xs = inputs_with_p1(runner, np.full(M, p), sigma, np.random.default_rng(3))
    smooth = Smooth(runner, 2, sigma)
    gaps = [true_radius(runner, x) - smooth.certify(x, n0, n, alpha, seed=input_seed(9, i), label=1).radius
            for i, x in enumerate(xs)]
    ks = np.arange(n + 1)
    r_k = np.array([max(sigma * norm.ppf(cp_lower(int(k), n, alpha)), 0.0) for k in ks])
    pmf = binom.pmf(ks, n, p)
    gap_k = sigma * norm.ppf(p) - r_k
    expected = float(pmf @ gap_k)
    sd = math.sqrt(float(pmf @ (gap_k - expected) ** 2))
    assert abs(np.mean(gaps) - expected) <= 4 * sd / math.sqrt(M)
    assert expected < 0.05  # the stated gap: 0.032 (sd of the mean 0.001) for a true radius of 0.32 at n = 500


# ---------------------------------------------------------------- PREDICT


def test_predict_abstains_on_an_exact_tie(w):
    # b = 0 and x = 0: w·(σε) is symmetric about 0, so both classes have probability exactly 1/2 and any answer is
    # a type-I error of the binomial test: at most alpha of the time (+3 sd over M trials).
    runner, M, alpha = two_class(w), 300, 0.05
    smooth = Smooth(runner, 2, 0.5)
    x = np.zeros(SHAPE, np.float32)
    answered = sum(smooth.predict(x, n=100, alpha=alpha, seed=s) != ABSTAIN for s in range(M))
    assert answered / M <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / M)


def test_predict_answers_correctly_when_separated(w):
    runner, sigma = two_class(w), 0.5
    smooth = Smooth(runner, 2, sigma)
    x1, x0 = inputs_with_p1(runner, [0.99, 0.01], sigma, np.random.default_rng(4))
    assert all(smooth.predict(x1, n=100, alpha=0.001, seed=s) == 1 for s in range(20))
    assert all(smooth.predict(x0, n=100, alpha=0.001, seed=s) == 0 for s in range(20))


def test_predict_wrong_answer_rate_is_at_most_alpha(w):
    # p_1 = 0.55: g(x) = 1. PREDICT may abstain, but it returns class 0 with probability <= alpha.
    runner, sigma, M, alpha = two_class(w), 0.5, 300, 0.05
    smooth = Smooth(runner, 2, sigma)
    x = inputs_with_p1(runner, 0.55, sigma, np.random.default_rng(5))[0]
    answers = [smooth.predict(x, n=200, alpha=alpha, seed=s) for s in range(M)]
    assert answers.count(0) / M <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / M)
    assert answers.count(1) > 0


def test_certify_abstains_near_a_tie(w):
    runner, sigma = two_class(w), 0.5
    x = inputs_with_p1(runner, 0.5, sigma, np.random.default_rng(6))[0]
    cert = Smooth(runner, 2, sigma).certify(x, n0=100, n=2000, alpha=0.001, seed=3, label=1)
    assert cert.prediction == ABSTAIN and cert.radius == 0.0 and not cert.correct and cert.pa_lower < 0.5


# ---------------------------------------------------------------- reproducibility


@pytest.fixture(scope="module")
def three_class():
    rng = np.random.default_rng(8)
    return AffineRunner(rng.normal(size=(3, D)), rng.normal(size=3) * 0.1)


def test_noise_is_independent_of_batch_size():
    ref = np.concatenate(list(noise_batches(SHAPE, 1037, 42, "estimation", 1000)))
    assert ref.shape == (1037, *SHAPE) and ref.dtype == np.float32
    for bs in (1, 7, 100, 333, 5000):
        batches = list(noise_batches(SHAPE, 1037, 42, "estimation", bs))
        assert all(len(b) == bs for b in batches[:-1]) and 0 < len(batches[-1]) <= bs
        np.testing.assert_array_equal(np.concatenate(batches), ref)
    # A prefix of the stream is the stream of a smaller sample count: sample i depends only on (seed, purpose, i).
    np.testing.assert_array_equal(np.concatenate(list(noise_batches(SHAPE, 250, 42, "estimation", 64))), ref[:250])
    # Standard normal: mean 0, sd 1 (16,592 draws: se of the mean is 0.008).
    assert abs(ref.mean()) < 0.04 and abs(ref.std() - 1) < 0.03
    # Different seeds, purposes and chunks give different noise.
    other_seed = np.concatenate(list(noise_batches(SHAPE, 1037, 43, "estimation", 1000)))
    other_purpose = np.concatenate(list(noise_batches(SHAPE, 1037, 42, "selection", 1000)))
    assert not np.array_equal(ref, other_seed) and not np.array_equal(ref, other_purpose)
    assert not np.array_equal(ref[:CHUNK], ref[CHUNK : 2 * CHUNK])


def test_counts_identical_for_every_batch_size(three_class):
    x = np.random.default_rng(9).uniform(size=SHAPE).astype(np.float32)
    counts = [Smooth(three_class, 3, 0.5, batch_size=bs).sample_counts(x, 1000, seed=123) for bs in (7, 100, 1000)]
    assert counts[0].dtype == np.int64 and counts[0].shape == (3,) and counts[0].sum() == 1000
    assert (counts[0] > 50).sum() >= 2  # the classifier is genuinely random under noise here
    for c in counts[1:]:
        np.testing.assert_array_equal(c, counts[0])
    other = Smooth(three_class, 3, 0.5).sample_counts(x, 1000, seed=124)
    assert not np.array_equal(other, counts[0])


def test_certify_is_reproducible_and_uses_separate_streams(three_class):
    x = np.random.default_rng(10).uniform(size=SHAPE).astype(np.float32)
    a = Smooth(three_class, 3, 0.25, batch_size=64).certify(x, 100, 2000, 0.01, seed=77, label=0, idx=5)
    b = Smooth(three_class, 3, 0.25, batch_size=999).certify(x, 100, 2000, 0.01, seed=77, label=0, idx=5)
    assert (a.prediction, a.pa_lower, a.radius, a.count_a) == (b.prediction, b.pa_lower, b.radius, b.count_a)
    smooth = Smooth(three_class, 3, 0.25)
    sel = smooth.sample_counts(x, 100, 77, "selection")
    est = smooth.sample_counts(x, 2000, 77, "estimation")
    assert a.count_a == est[sel.argmax()]
    assert a.pa_lower == cp_lower(int(est[sel.argmax()]), 2000, 0.01)


def test_input_seed():
    """input_seed(base, idx) is a fixed 63-bit hash of (base, idx): the same in every process and call order (a resumed
    or sharded run certifies input idx on the same noise), different for different (base, idx), and pinned so that a
    change of the hash (which would silently change every stored certificate) fails here."""
    import json
    import os
    import subprocess
    import sys

    # pinned: blake2b-64 of "arq-input:{base}:{idx}", little-endian, shifted right by one bit
    assert input_seed(0, 0) == 2278652787598782987
    assert input_seed(0, 5) == 2982486185818800919
    assert input_seed(7, 123456) == 5640581578023712605
    pairs = [(s, i) for s in (0, 1, 12, 2**40, -3) for i in range(0, 400, 7)] + [(1, 23), (12, 3)]
    here = [input_seed(s, i) for s, i in pairs]
    assert len(set(here)) == len(pairs)  # different base or idx: different seeds ((1, 23) vs (12, 3) included)
    assert all(0 <= s < 2**63 for s in here) and max(here) >= 2**62  # the whole 63-bit range is used
    # numpy integers name the same input as Python ints
    assert input_seed(np.int64(7), np.int32(123456)) == input_seed(7, 123456)
    # another interpreter (another str-hash salt), computing the pairs in reverse order, gets the same seeds
    code = ("import json, sys; from arq_deploy.runtime.noise import input_seed; "
            "pairs = json.loads(sys.stdin.read()); print(json.dumps([input_seed(s, i) for s, i in pairs[::-1]]))")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(pairs), capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert json.loads(out)[::-1] == here
    with pytest.raises(CertificationInputError, match="seed"):
        input_seed(True, 5)
    with pytest.raises(CertificationInputError, match="seed"):
        input_seed(0, 2.0)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("sigma", [0, -0.5, float("nan"), float("inf")])
def test_bad_sigma(w, sigma):
    with pytest.raises(CertificationInputError, match="sigma"):
        Smooth(two_class(w), 2, sigma)


def test_num_classes_must_match_runner(w):
    with pytest.raises(CertificationInputError, match="num_classes"):
        Smooth(two_class(w), 3, 0.5)


@pytest.mark.parametrize("kwargs,word", [
    (dict(n0=0), "^n0 "), (dict(n0=-3), "^n0 "), (dict(n0=2.5), "^n0 "),
    (dict(n=0), r"^n \("), (dict(n=True), r"^n \("),
    (dict(alpha=0.0), "alpha"), (dict(alpha=1.0), "alpha"), (dict(alpha=-0.1), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
])
def test_bad_certify_parameters(w, kwargs, word):
    smooth = Smooth(two_class(w), 2, 0.5)
    args = dict(n0=10, n=100, alpha=0.01) | kwargs
    with pytest.raises(CertificationInputError, match=word):
        smooth.certify(np.zeros(SHAPE, np.float32), **args)


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(alpha=0.0), dict(alpha=2.0)])
def test_bad_predict_parameters(w, kwargs):
    with pytest.raises(CertificationInputError):
        Smooth(two_class(w), 2, 0.5).predict(np.zeros(SHAPE, np.float32), **(dict(n=100, alpha=0.01) | kwargs))


@pytest.mark.parametrize("shape", [(4, 4), (1, 1, 4, 4), (1, 4, 5), (3, 4, 4)])
def test_wrong_shape_input(w, shape):
    smooth = Smooth(two_class(w), 2, 0.5)
    with pytest.raises(CertificationInputError, match="shape"):
        smooth.certify(np.zeros(shape, np.float32), 10, 100, 0.01)
    with pytest.raises(CertificationInputError, match="shape"):
        smooth.predict(np.zeros(shape, np.float32), 100, 0.01)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input(w, bad):
    x = np.zeros(SHAPE, np.float32)
    x[0, 2, 3] = bad
    with pytest.raises(CertificationInputError, match="NaN or infinite"):
        Smooth(two_class(w), 2, 0.5).certify(x, 10, 100, 0.01)
