"""Anytime-valid sequential certification (certify/sequential.py) and the randomized Clopper-Pearson bound.

Soundness is tested with the stopping rule in force, on a stub base classifier whose count of c_A among m fresh
samples is drawn from Binomial(m, p_A) with p_A known: the rate of false "robust at r" claims (p_A < Φ(r/σ)) stays
within α + 3 sd over 2,000 certifications, while a mutant that re-tests fixed-N Clopper-Pearson at α after every batch
(no correction for the looks) exceeds that bound. The randomized CP bound covers p with probability 1 − α (exactly,
within sampling error) and is never looser than CP. Then the plumbing on a real `Smooth` (a linear classifier with a
closed-form p_A), the log (resume, mode refusal) and the CLI's one-line errors.
"""

import json
import math

import numpy as np
import pytest
from scipy.stats import norm

from arq_deploy.certify.sequential import (
    FUTILITY_BETA,
    NOT_ROBUST,
    ROBUST,
    UNDECIDED,
    LookSchedule,
    SequentialCertificate,
    SequentialLog,
    cap_radius,
    certify_adaptive,
    certify_dataset_sequential,
    certify_sequential,
    check_log_mode,
    check_radii,
    cap_reach,
    decide_at_radii,
    estimate_radius,
    look_schedule,
    max_radius,
    radii_schedule,
)
from arq_deploy.certify.smooth import Smooth
from arq_deploy.certify.stats import cp_lower, rcp_lower
from arq_deploy.core.errors import ArqError, CertificationInputError

SIGMA = 0.5
ALPHA = 0.1  # large, so that the tests have power
M = 2000  # certifications per soundness test


def binomial_sampler(p: float, rng):
    return lambda num: int(rng.binomial(num, p))


def three_sd_bound(alpha: float, m: int) -> float:
    return alpha + 3 * math.sqrt(alpha * (1 - alpha) / m)


# ------------------------------------------------------------------------------------------------ schedule
def test_schedule_spends_alpha_once_over_geometric_looks():
    s = look_schedule(0.001, 100_000, 500)
    assert s.looks == (500, 1000, 2000, 4000, 8000, 16000, 32000, 64000, 100000)
    assert s.alpha == pytest.approx(0.001) and s.alphas[-1] == pytest.approx(0.0005)
    assert look_schedule(0.01, 500, 500).looks == (500,) and look_schedule(0.01, 500, 500).alphas == (0.01,)
    # certify --radii: looks ×1.5, a quarter of α on the cap, the rest even over the other 12 looks
    r = radii_schedule(0.001, 100_000, 500)
    assert r.looks[:4] == (500, 750, 1125, 1688) and r.max_n == 100_000 and len(r.looks) == 14
    assert r.alpha == pytest.approx(0.001) and r.alphas[-1] == pytest.approx(0.00025)
    assert r.alphas[0] == pytest.approx(0.00075 / 13)
    # the most the cap can certify: σ·Φ⁻¹ of the last look's bound with every sample on c_A, (α/2)^(1/N)
    assert max_radius(0.25, s) == pytest.approx(0.25 * norm.ppf(0.0005 ** (1 / 100_000)), rel=1e-9)
    # the sequence's bounds are Clopper-Pearson at each look's α
    lo, hi = s.bounds(2, 1900)
    assert lo == pytest.approx(cp_lower(1900, 2000, s.alphas[2]), rel=1e-9) and 0.95 < hi < 1


@pytest.mark.parametrize("make,fragment", [
    (lambda: look_schedule(0.001, 400, 500), "below the first look"),
    (lambda: check_radii((0.25, 0.0), 0.25, look_schedule(0.001, 10_000, 500)), "> 0"),
    (lambda: check_radii((-0.5,), 0.25, look_schedule(0.001, 10_000, 500)), "> 0"),
    (lambda: check_radii((0.25, 0.25), 0.25, look_schedule(0.001, 10_000, 500)), "twice"),
    (lambda: check_radii((0.5, 1.0), 0.25, look_schedule(0.001, 10_000, 500)), "beyond what max_n = 10,000"),
    (lambda: LookSchedule((100, 100), (0.01, 0.01)), "increasing"),
])
def test_bad_schedules_and_radii_fail_with_one_line(make, fragment):
    with pytest.raises(CertificationInputError) as e:
        make()
    assert fragment in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ soundness
def false_robust_rate(p_a: float, radii, schedule, seed: int, m: int = M, futility=0.01) -> tuple[float, float]:
    """Share of m sequential certifications (stopping rule in force) with a false "robust at r" claim, and the mean
    samples used."""
    rng = np.random.default_rng(seed)
    false, used = 0, 0
    true_radius = SIGMA * norm.ppf(p_a)
    for _ in range(m):
        d = decide_at_radii(binomial_sampler(p_a, rng), SIGMA, radii, schedule, futility=futility)
        false += any(dec == ROBUST and r > true_radius for r, dec in zip(d.radii, d.decisions))
        used += d.samples
    return false / m, used / m


def test_false_robust_claims_stay_within_alpha_under_optional_stopping():
    # p_A just below Φ(0.5/σ): a claim at r = 0.5 is false, and the data sits close to the threshold, so every look
    # is a chance to cross it; the claim at 0.25 is true
    p_a = norm.cdf(0.5 / SIGMA) - 0.004
    schedule = look_schedule(ALPHA, 20_000, 100)
    bound = three_sd_bound(ALPHA, M)
    for futility in (0.01, None):
        rate, _used = false_robust_rate(p_a, (0.25, 0.5), schedule, seed=1, futility=futility)
        assert rate <= bound, (futility, rate, bound)
    # what certify --radii runs: its finer looks and its futility level
    rate, _used = false_robust_rate(p_a, (0.25, 0.5), radii_schedule(ALPHA, 20_000, 100), seed=5,
                                    futility=FUTILITY_BETA)
    assert rate <= bound, (rate, bound)
    # the mutant: fixed-N Clopper-Pearson at α re-tested after every batch of 100, no correction for the looks
    mutant = LookSchedule(tuple(range(100, 20_001, 100)), (ALPHA,) * 200)
    mutant_rate, _ = false_robust_rate(p_a, (0.25, 0.5), mutant, seed=1, futility=None)
    assert mutant_rate > bound, (mutant_rate, bound)  # measured: about 0.4 against the bound of 0.12


def test_one_sequence_serves_every_radius():
    # true radius between the requested radii: claims at the larger ones are false, all counted together
    p_a = norm.cdf(0.6 / SIGMA)
    rate, _ = false_robust_rate(p_a, (0.25, 0.5, 0.62, 0.75, 1.0), look_schedule(ALPHA, 20_000, 100), seed=2)
    assert rate <= three_sd_bound(ALPHA, M)


def test_clear_inputs_stop_early_and_decide_every_radius():
    rng = np.random.default_rng(3)
    schedule = look_schedule(0.001, 100_000, 500)
    d = decide_at_radii(binomial_sampler(0.999, rng), SIGMA, (0.25, 0.5, 0.75), schedule)
    assert d.decisions == (ROBUST,) * 3 and d.samples <= 2000
    d = decide_at_radii(binomial_sampler(0.3, rng), SIGMA, (0.25, 0.5), schedule)
    assert d.decisions == (NOT_ROBUST,) * 2 and d.samples == 500 and d.pa_upper < 0.5
    # p_A exactly at Φ(r/σ): neither claim can be made; without the futility stop the cap is reached and it abstains
    # there, with it the abstention comes as soon as p_A < p*(r) is clear (the cap would not certify r either)
    d = decide_at_radii(binomial_sampler(norm.cdf(0.5 / SIGMA), rng), SIGMA, (0.5,), look_schedule(0.001, 4000, 500),
                        futility=None)
    assert d.decisions == (UNDECIDED,) and d.samples == 4000


def test_futility_stop_abstains_early_only_where_the_cap_would_not_certify():
    schedule = look_schedule(0.001, 100_000, 500)
    t = norm.cdf(0.5 / SIGMA)
    reach = cap_reach(t, schedule)
    assert t < reach < 1 and schedule.cap_lower(round(reach * 100_000)) >= t > schedule.cap_lower(
        round(reach * 100_000) - 1)
    rng = np.random.default_rng(4)
    # p_A just below Φ(r/σ): not robust, but too close to the threshold for the upper sequence at α to say so before
    # the cap; the futility stop abstains once p_A < p* is clear at level β (measured: ~24,000 samples against 100,000)
    p_a = t - 0.003
    with_f = [decide_at_radii(binomial_sampler(p_a, rng), SIGMA, (0.5,), schedule) for _ in range(40)]
    without = [decide_at_radii(binomial_sampler(p_a, rng), SIGMA, (0.5,), schedule, futility=None) for _ in range(40)]
    assert not any(d.decisions == (ROBUST,) for d in with_f + without)
    assert all(d.decisions == (UNDECIDED,) for d in with_f)
    assert np.mean([d.samples for d in with_f]) < 0.5 * np.mean([d.samples for d in without])
    # p_A clearly above p*: futility never fires, robust as before
    d = decide_at_radii(binomial_sampler(min(1.0, reach + 0.01), rng), SIGMA, (0.5,), schedule)
    assert d.decisions == (ROBUST,)


def test_adaptive_radius_is_sound_and_saves_samples():
    p_a = 0.9
    true_radius = SIGMA * norm.ppf(p_a)
    schedule = look_schedule(ALPHA, 20_000, 100)
    rng = np.random.default_rng(4)
    ests = [estimate_radius(binomial_sampler(p_a, rng), SIGMA, schedule, 0.02) for _ in range(1000)]
    false = np.mean([e.radius > true_radius for e in ests])
    assert false <= three_sd_bound(ALPHA, 1000)
    # it stops once within the tolerance of what the cap would give at p̂, usually well before the cap
    assert np.mean([e.samples for e in ests]) < 0.7 * schedule.max_n
    for e in ests[:50]:
        assert e.samples == schedule.max_n or cap_radius(SIGMA, schedule, e.count / e.samples) - e.radius <= 0.02
    # an input that cannot be certified stops at the first look
    e = estimate_radius(binomial_sampler(0.2, rng), SIGMA, schedule, 0.02)
    assert e.radius == 0.0 and e.samples == 100 and e.early


# ------------------------------------------------------------------------------------------------ randomized CP
def test_randomized_clopper_pearson_covers_exactly_and_is_tighter():
    rng = np.random.default_rng(5)
    m, n = 20_000, 60
    for p in (0.55, 0.8, 0.9, 0.97):
        k, u = rng.binomial(n, p, m), rng.random(m)
        rcp = rcp_lower(k, n, ALPHA, u)
        cp = np.array([cp_lower(int(x), n, ALPHA) for x in range(n + 1)])[k]
        miss = float(np.mean(rcp > p))
        sd = math.sqrt(ALPHA * (1 - ALPHA) / m)
        assert miss <= ALPHA + 3 * sd, (p, miss)  # coverage >= 1 − α ...
        if p < 0.95:  # ... and exact: CP's discreteness slack is gone (near p = 1 the k = n, u <= α fallback to CP
            assert miss >= ALPHA - 3 * sd, (p, miss)  # gives some of it back: 0.97^60·α ≈ 0.016 here)
        assert np.all(rcp >= cp - 1e-12) and rcp.mean() > cp.mean() + 0.005, (p, rcp.mean(), cp.mean())
        assert float(np.mean(cp > p)) < miss  # CP itself is conservative here
    # closed forms: k = n gives (α/u)^(1/n) for u > α; k = 0 gives the root of 1 − (1 − u)(1 − p)^n = α for u < α
    assert rcp_lower(n, n, ALPHA, 0.5) == pytest.approx((ALPHA / 0.5) ** (1 / n), rel=1e-9)
    assert rcp_lower(0, n, ALPHA, 0.05) == pytest.approx(1 - ((1 - ALPHA) / (1 - 0.05)) ** (1 / n), rel=1e-9)
    assert rcp_lower(0, n, ALPHA, 0.5) == 0.0
    assert rcp_lower(n, n, ALPHA, 0.01) == pytest.approx(cp_lower(n, n, ALPHA))  # empty set: falls back to CP
    with pytest.raises(CertificationInputError):
        rcp_lower(5, 4, ALPHA, 0.5)


# ------------------------------------------------------------------------------------------------ on a Smooth
class Linear:
    """f(x) = 0 if w·x > 0 else 1, so P[f(x + σε) = 0] = Φ(w·x / (σ‖w‖)) in closed form."""

    name, input_shape, num_classes = "linear", (1, 2, 2), 2

    def __init__(self):
        self.w = np.array([1.0, -1.0, 0.5, 0.0], np.float32)
        self.calls = 0

    def __call__(self, x):
        self.calls += len(x)
        s = x.reshape(len(x), -1) @ self.w
        return np.stack([s, -s], axis=1)

    def input_for(self, p_a: float, sigma: float) -> np.ndarray:
        t = norm.ppf(p_a) * sigma * np.linalg.norm(self.w)
        return (t * self.w / np.dot(self.w, self.w)).reshape(self.input_shape).astype(np.float32)


def test_certify_sequential_on_a_smooth_is_seeded_and_correct():
    lin = Linear()
    smooth = Smooth(lin, 2, SIGMA, batch_size=256)
    schedule = look_schedule(0.001, 20_000, 500)
    x = lin.input_for(0.999, SIGMA)  # true radius 1.55
    c = certify_sequential(smooth, x, 100, (0.25, 0.5, 1.0), schedule, seed=7, label=0, idx=3)
    assert c.decisions == (ROBUST,) * 3 and c.radius == 1.0 and c.prediction == 0 and c.correct
    assert c.n < 5000 and lin.calls == 100 + c.n  # the model ran on exactly the samples the log says
    # the same seed with another batch size: the same certificate (the noise depends on the seed only)
    again = certify_sequential(Smooth(Linear(), 2, SIGMA, batch_size=1000), x, 100, (0.25, 0.5, 1.0), schedule,
                               seed=7, label=0, idx=3)
    assert (again.decisions, again.n, again.count_a, again.pa_lower) == (c.decisions, c.n, c.count_a, c.pa_lower)
    assert SequentialCertificate.from_row(c.to_row()) == c
    x = lin.input_for(0.3, SIGMA)  # g predicts class 1 at p = 0.7 (radius 0.26): selected class is 1
    c = certify_sequential(smooth, x, 100, (0.25, 0.5), schedule, seed=8, label=0)
    assert c.prediction == 1 and c.decision_at(0.5) == NOT_ROBUST
    a = certify_adaptive(smooth, lin.input_for(0.95, SIGMA), 100, schedule, 0.02, seed=9, label=0)
    assert 0 < a.radius <= SIGMA * norm.ppf(0.95) and a.n < schedule.max_n


def test_sequential_log_resumes_and_refuses_another_mode(tmp_path):
    lin = Linear()
    smooth = Smooth(lin, 2, SIGMA, batch_size=256)
    schedule = look_schedule(0.001, 8000, 500)
    xs = np.stack([lin.input_for(p, SIGMA) for p in (0.99, 0.9, 0.6, 0.2)])
    labels = [0, 0, 0, 0]
    meta = {"mode": "sequential", "radii": [0.25, 0.5]}
    path = tmp_path / "s.tsv"
    with SequentialLog(path, meta) as log:
        first = certify_dataset_sequential(smooth, xs, labels, [0, 1], 100, schedule, 0, log, radii=(0.25, 0.5),
                                           progress=False)
    calls = lin.calls
    with SequentialLog(path, meta) as log:
        every = certify_dataset_sequential(smooth, xs, labels, [0, 1, 2, 3], 100, schedule, 0, log,
                                           radii=(0.25, 0.5), progress=False)
    assert every[:2] == first and lin.calls - calls == sum(c.n0 + c.n for c in every[2:])
    check_log_mode(path, "sequential")
    for other in ("fixed", "adaptive", "randomized-cp"):
        with pytest.raises(CertificationInputError, match="written in sequential mode"):
            check_log_mode(path, other)


# ------------------------------------------------------------------------------------------------ config + CLI
def test_config_fields_validate_and_round_trip():
    from arq_deploy.core.config import CertifyConfig, ConfigError, IrsConfig

    c = CertifyConfig(out="c.tsv", model_path="m.onnx", sigma=0.25, radii=(0.5, 0.25), max_n=20_000)
    assert c.mode == "sequential" and c.radii == (0.25, 0.5) and c.n is None and c.first_n == 500
    assert CertifyConfig.from_json(c.to_json()) == c
    a = CertifyConfig(out="c.tsv", model_path="m.onnx", sigma=0.25, adaptive=True)
    assert a.mode == "adaptive" and a.tolerance == 0.015 and a.max_n == 100_000
    assert CertifyConfig.from_json(a.to_json()) == a
    r = CertifyConfig(out="c.tsv", model_path="m.onnx", sigma=0.25, randomized_cp=True)
    assert r.mode == "randomized-cp" and r.n == 10_000 and CertifyConfig.from_json(r.to_json()) == r
    bad = [
        ({"radii": (0.25,), "adaptive": True}, "two modes"),
        ({"radii": (0.0,)}, "> 0"),
        ({"radii": (0.25,), "max_n": 100, "first_n": 500}, "below the first batch"),
        ({"radii": (0.25,), "n": 1000}, "leave out --n"),
        ({"max_n": 1000}, "--radii or --adaptive"),
        ({"adaptive": True, "tolerance": -0.1}, "--tolerance"),
        ({"radii": (0.25,), "tolerance": 0.1}, "--tolerance belongs to --adaptive"),
        ({"radii": (0.25,), "randomized_cp": True}, "--randomized-cp"),
        ({"irs": IrsConfig("f.tsv", "f.onnx"), "randomized_cp": True, "sigma": None}, "--randomized-cp"),
    ]
    for kw, fragment in bad:
        kw = {"sigma": 0.25, **kw}
        with pytest.raises(ArqError) as e:
            CertifyConfig(out="c.tsv", model_path="m.onnx", **kw)
        assert isinstance(e.value, (ConfigError, CertificationInputError)) and fragment in str(e.value), (kw, e.value)


def _rows(path):
    return [l for l in path.read_text().splitlines() if l and not l.startswith(("#", "idx"))]


@pytest.mark.slow  # run by .ci/run (SLOW_TESTS); keeps `make test` near 15 minutes
def test_cli_sequential_adaptive_and_errors(cli, digits_model, tmp_path):
    from test_cli import assert_one_line_error

    _, ckpt = digits_model
    base = ["certify", "--weights", ckpt, "--sigma", "0.25", "--skip", "90", "--batch-size", "200"]
    seq = [*base, "--radii", "0.1,0.25", "--max-n", "2000", "--first-n", "200", "--out", tmp_path / "s.tsv"]
    rc, out, err = cli(*seq)
    assert rc == 0, err
    rows = _rows(tmp_path / "s.tsv")
    assert len(rows) == 6 and "samples per input" in out  # every 90th of the 540 digits test images
    certs = [SequentialCertificate.from_row(r) for r in rows]
    assert all(c.radii == (0.1, 0.25) and 200 <= c.n <= 2000 for c in certs)
    summary = json.loads((tmp_path / "s.summary.json").read_text())
    assert summary["meta"]["mode"] == "sequential" and set(summary["summary"]["certified_accuracy"]) == {"0", "0.1",
                                                                                                         "0.25"}
    meta = summary["meta"]
    assert meta["looks"] == list(radii_schedule(meta["alpha"], 2000, 200).looks) and meta["looks"][:2] == [200, 300]
    assert meta["futility_beta"] == FUTILITY_BETA and sum(meta["look_alphas"]) == pytest.approx(meta["alpha"])
    assert summary["summary"]["certified_accuracy"]["0.25"] == sum(c.correct and c.decision_at(0.25) == ROBUST
                                                                   for c in certs) / 6
    assert cli(*seq)[0] == 0 and _rows(tmp_path / "s.tsv") == rows  # resume: nothing new, same rows
    before = (tmp_path / "s.tsv").read_bytes()
    # another mode on the same log, then bad settings: one line, exit 2, the log untouched
    assert_one_line_error(*cli(*base, "--out", tmp_path / "s.tsv"), "sequential mode", "fixed")
    assert_one_line_error(*cli(*base, "--adaptive", "--max-n", "4000", "--out", tmp_path / "s.tsv"),
                          "sequential mode")
    assert_one_line_error(*cli(*base, "--radii", "0,0.25", "--out", tmp_path / "x.tsv"), "> 0")
    assert_one_line_error(*cli(*base, "--radii", "0.25,0.9", "--max-n", "4000", "--out", tmp_path / "x.tsv"),
                          "beyond what max_n = 4,000")
    assert_one_line_error(*cli(*base, "--radii", "0.25", "--max-n", "100", "--out", tmp_path / "x.tsv"),
                          "below the first batch")
    assert_one_line_error(*cli(*base, "--radii", "0.25", "--adaptive", "--out", tmp_path / "x.tsv"), "two modes")
    assert_one_line_error(*cli(*base, "--radii", "a,b", "--out", tmp_path / "x.tsv"), "--radii")
    assert (tmp_path / "s.tsv").read_bytes() == before and not (tmp_path / "x.tsv").exists()
    assert not (tmp_path / "x.config.json").exists()
    # adaptive: a Certificate per input with the samples it used
    rc, out, err = cli(*base, "--adaptive", "--max-n", "2000", "--first-n", "200", "--out", tmp_path / "a.tsv")
    assert rc == 0, err
    meta = json.loads((tmp_path / "a.summary.json").read_text())["meta"]
    assert meta["mode"] == "adaptive" and meta["tolerance"] == 0.015 and meta["samples_per_input"]["max"] <= 2100
    # randomized CP: fixed N, its own mode
    rc, out, err = cli(*base, "--n0", "20", "--n", "300", "--randomized-cp", "--out", tmp_path / "r.tsv")
    assert rc == 0, err
    assert json.loads((tmp_path / "r.summary.json").read_text())["meta"]["mode"] == "randomized-cp"
    assert_one_line_error(*cli(*base, "--n0", "20", "--n", "300", "--out", tmp_path / "r.tsv"), "randomized-cp mode")
