"""Anytime-valid sequential certification: decide robustness at given radii, or estimate the radius, with as few
noise samples per input as the input needs.

CERTIFY (Cohen et al. 2019) spends the same N estimation samples on every input. Most inputs need far fewer: an input
whose p_A is far above Φ(r/σ) is certified at r after a few hundred samples, and one whose p_A is far below after as
few. Stopping when the data is clear is only sound if the bound stays valid under *optional stopping*: re-testing a
fixed-n Clopper-Pearson bound after every batch at level α lets the chance of a false claim grow with the number of
looks (tests/test_sequential.py shows a mutant doing that exceed α several times over).

The confidence sequence. Looks are fixed in advance on a geometric grid n_1 = first_n, n_{j+1} = ratio·n_j, with the
cap max_n as the last look (`look_schedule`). At look j the one-sided Clopper-Pearson bounds of the k_j successes among
the first n_j samples are taken at level α_j, with Σ_j α_j = α (half of α on the last look, where the inputs that
need every sample end up, the other half spread evenly over the earlier looks). By the union bound

    P[∃ j: L_j > p_A] ≤ Σ_j P[L_j > p_A] ≤ Σ_j α_j = α,

so (L_j) is a lower confidence sequence: at *any* stopping time τ, however it depends on the data, P[L_τ > p_A] ≤ α.
The same holds for the upper sequence (U_j). Running max/min of the bounds are kept (the intersection of a confidence
sequence with its past is one too). With a cap, the number of looks J is small (log₂(max_n / first_n) + 1, e.g. 9 for
500 … 100,000), so the union bound costs little: CP at α/16 instead of α moves a bound by about a third of its width.
A betting (e-process) confidence sequence would need no grid, but gains little over a grid this coarse with a hard
cap, and CP keeps the exactness of the binomial tail; the schedule is a parameter (`LookSchedule`), so another
can be dropped in.

All radii at once. A "robust at r" claim is made when L_j ≥ Φ(r/σ). On the event {L_j ≤ p_A for all j}, which has
probability ≥ 1 − α, every such claim at every radius is true (p_A ≥ L_j ≥ Φ(r/σ), so σ·Φ⁻¹(p_A) ≥ r). One confidence
sequence therefore serves every requested radius simultaneously: α is not split across radii. "Not robust at r" is
claimed when U_j < Φ(r/σ); those claims are covered by the upper sequence at its own α (a false one only withholds a
certificate; it never certifies anything). An input still undecided at a radius when the cap is reached abstains there.

c_A is selected from n0 separate selection samples (a disjoint noise stream), so, given c_A, the estimation samples are
i.i.d. Bernoulli(p_A) and the sequence is valid for the selected class.

Adaptive radius estimation (`estimate_radius`) uses the same sequence and stops at the first look where the radius it
certifies, σ·Φ⁻¹(L_j), is within `tolerance` of what the cap could give at the current empirical p̂ (σ·Φ⁻¹ of the
last look's bound with k = round(p̂·max_n) of max_n samples), or where U_j ≤ 1/2 (it can certify nothing). Any stopping
rule keeps the guarantee; this one trades at most ≈ tolerance of radius per input for the samples it saves.

The API search can call: `decide_at_radii(sample, sigma, radii, schedule)` and `estimate_radius(sample, sigma, schedule,
tolerance)`, where `sample(num)` returns how many of `num` fresh samples the base classifier gave c_A. `certify_sequential`
and `certify_adaptive` wrap a `Smooth`: segment j of the estimation samples is the noise stream (seed,
"estimation-look{j}") of the counter-based generator, so a certificate depends on the seed only (not on the batch size,
the backend, or anything certified before) and a resumed run gives the same rows.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import betaincinv
from scipy.stats import norm

from arq_deploy.certify.results import CertifyLog, _accuracy_text, _progress
from arq_deploy.certify.smooth import ABSTAIN, COLUMNS, Certificate, Smooth
from arq_deploy.certify.stats import radius as radius_of
from arq_deploy.core.errors import CertificationInputError
from arq_deploy.core.validation import check_alpha, check_count, check_sigma
from arq_deploy.runtime.noise import input_seed

ROBUST, NOT_ROBUST, UNDECIDED = "robust", "not-robust", "abstain"
DECISIONS = (ROBUST, NOT_ROBUST, UNDECIDED)
DEFAULT_FIRST_N = 500
DEFAULT_RATIO = 2.0
FINAL_SHARE = 0.5  # the share of α spent on the last look (the cap)
FUTILITY_BETA = 0.05  # per-look level of the futility stop's upper bound (decide_at_radii; no guarantee rests on it)
# The look grid of `certify --radii` (`radii_schedule`): finer looks (×1.5) and a quarter of α on the cap, picked by
# replaying schedules on the measured hit rates of 100 CIFAR-10 inputs per σ (benchmarks/sequential_schedule_sim.py;
# with β = 0.05, a simulated loss of at most 0.44 pp of certified accuracy at one radius; 5% fewer evaluations
# measured on 100 other inputs at σ = 0.5, docs/certification.md).
RADII_RATIO = 1.5
RADII_FINAL_SHARE = 0.25

MODES = ("fixed", "randomized-cp", "sequential", "adaptive", "irs")


# ------------------------------------------------------------------------------------------------ the schedule
@dataclass(frozen=True)
class LookSchedule:
    """Looks n_1 < … < n_J (cumulative estimation samples) and the level α_j of each look's Clopper-Pearson bounds.

    The sequence of bounds is valid at level Σ α_j (`alpha`) under any stopping rule (union bound over the looks).
    """

    looks: tuple[int, ...]
    alphas: tuple[float, ...]

    def __post_init__(self):
        looks, alphas = tuple(int(n) for n in self.looks), tuple(float(a) for a in self.alphas)
        if not looks or len(looks) != len(alphas):
            raise CertificationInputError("a look schedule needs one α per look and at least one look")
        if looks[0] < 1 or any(b <= a for a, b in itertools.pairwise(looks)):
            raise CertificationInputError(f"looks must be increasing sample counts >= 1, got {looks}")
        if not all(0.0 < a < 1.0 for a in alphas):
            raise CertificationInputError(f"every look's α must lie in (0, 1), got {alphas}")
        object.__setattr__(self, "looks", looks)
        object.__setattr__(self, "alphas", alphas)

    @property
    def max_n(self) -> int:
        return self.looks[-1]

    @property
    def alpha(self) -> float:
        """The level the whole sequence holds at: Σ α_j."""
        return float(sum(self.alphas))

    def bounds(self, j: int, k):
        """(lower, upper) one-sided Clopper-Pearson bounds at level α_j of k successes among looks[j] samples
        (k may be an array)."""
        n, a = self.looks[j], self.alphas[j]
        k = np.asarray(k, np.float64)
        lo = np.where(k > 0, betaincinv(np.maximum(k, 1.0), n - k + 1.0, a), 0.0)
        hi = np.where(k < n, 1.0 - betaincinv(np.maximum(n - k, 1.0), k + 1.0, a), 1.0)
        return (float(lo), float(hi)) if lo.ndim == 0 else (lo, hi)

    def cap_lower(self, k) -> float:
        """The last look's lower bound of k successes among max_n samples (what the cap can certify)."""
        return self.bounds(len(self.looks) - 1, k)[0]


def look_schedule(alpha: float, max_n: int, first_n: int = DEFAULT_FIRST_N, ratio: float = DEFAULT_RATIO,
                  final_share: float = FINAL_SHARE, near_cap: bool = True) -> LookSchedule:
    """Looks first_n, ratio·first_n, ratio²·first_n, … below max_n, then max_n; α_J = final_share·α on the last look
    and the rest of α split evenly over the others (all of α when there is one look). near_cap=False drops a look
    within √ratio of the cap (e.g. 97,310 before 100,000), which would spend its share of α on almost no samples."""
    alpha = check_alpha(alpha)
    max_n, first_n = check_count("max_n", max_n), check_count("first_n", first_n)
    if max_n < first_n:
        raise CertificationInputError(f"the cap max_n = {max_n:,} is below the first look (first batch) first_n = "
                                      f"{first_n:,}: raise --max-n or lower --first-n")
    if not (math.isfinite(ratio) and ratio > 1.0):
        raise CertificationInputError(f"the look ratio must be > 1, got {ratio!r}")
    looks, n = [], float(first_n)
    while round(n) < max_n and (near_cap or round(n) * math.sqrt(ratio) < max_n):
        looks.append(round(n))
        n *= ratio
    looks.append(max_n)
    if len(looks) == 1:
        return LookSchedule((max_n,), (alpha,))
    rest = alpha * (1.0 - final_share) / (len(looks) - 1)
    return LookSchedule(tuple(looks), (rest,) * (len(looks) - 1) + (alpha * final_share,))


def radii_schedule(alpha: float, max_n: int, first_n: int = DEFAULT_FIRST_N) -> LookSchedule:
    """The look schedule of sequential certification at given radii (`certify --radii`): `look_schedule` with the
    ratio RADII_RATIO, RADII_FINAL_SHARE of α on the cap and no look just below the cap (adaptive estimation and the
    search keep the defaults)."""
    return look_schedule(alpha, max_n, first_n, RADII_RATIO, RADII_FINAL_SHARE, near_cap=False)


def max_radius(sigma: float, schedule: LookSchedule) -> float:
    """The largest radius the schedule can ever certify: σ·Φ⁻¹ of the cap's lower bound with all max_n samples c_A."""
    return radius_of(check_sigma(sigma), schedule.cap_lower(schedule.max_n))


def check_radii(radii: Sequence[float], sigma: float, schedule: LookSchedule) -> tuple[float, ...]:
    """The radii as sorted floats; one clear CertificationInputError for a radius <= 0, a repeated radius, or one the
    cap cannot certify even with every sample on c_A."""
    try:
        rs = [float(r) for r in radii]
    except (TypeError, ValueError):
        raise CertificationInputError(f"radii must be numbers, got {radii!r}") from None
    if not rs:
        raise CertificationInputError("give at least one radius to decide")
    for r in rs:
        if not (math.isfinite(r) and r > 0):
            raise CertificationInputError(f"every radius must be a finite number > 0, got {r!r}")
    if len(set(rs)) != len(rs):
        raise CertificationInputError(f"a radius is listed twice in {rs}")
    top = max_radius(sigma, schedule)
    for r in sorted(rs):
        if r > top:
            raise CertificationInputError(
                f"radius {r:g} is beyond what max_n = {schedule.max_n:,} samples can certify at α = "
                f"{schedule.alpha:g} with σ = {sigma:g} (at most {top:.3f}, every sample on c_A): raise --max-n or "
                f"drop that radius")
    return tuple(sorted(rs))


# ------------------------------------------------------------------------------------------------ the tests
@dataclass(frozen=True)
class SequentialDecision:
    """Per radius: ROBUST (L ≥ Φ(r/σ)), NOT_ROBUST (U < Φ(r/σ)) or UNDECIDED (cap reached); the estimation samples
    used, c_A's count among them, the confidence sequence's bounds where it stopped, and the looks taken."""

    radii: tuple[float, ...]
    decisions: tuple[str, ...]
    samples: int
    count: int
    pa_lower: float
    pa_upper: float
    looks: int


@dataclass(frozen=True)
class RadiusEstimate:
    """`estimate_radius`'s answer: the certified radius σ·Φ⁻¹(L) (0 when L ≤ 1/2), the samples used, c_A's count, the
    bounds where it stopped, the looks taken, and whether it stopped before the cap."""

    radius: float
    samples: int
    count: int
    pa_lower: float
    pa_upper: float
    looks: int
    early: bool


def _draw(sample: Callable[[int], int], num: int) -> int:
    got = sample(num)
    try:
        k = int(got)
    except (TypeError, ValueError):
        raise CertificationInputError(f"the sampler returned {got!r}, not a count") from None
    if not 0 <= k <= num:
        raise CertificationInputError(f"the sampler returned {k} successes out of {num} samples")
    return k


def _run_sequence(sample, schedule: LookSchedule):
    """Yield (j, n, k, L, U) after each look: running max/min of the looks' bounds."""
    k = n = 0
    lo, hi = 0.0, 1.0
    for j, look in enumerate(schedule.looks):
        k += _draw(sample, look - n)
        n = look
        lj, uj = schedule.bounds(j, k)
        lo, hi = max(lo, lj), min(hi, uj)
        yield j, n, k, lo, hi


@functools.lru_cache(maxsize=64)  # the same (threshold, schedule) for every input of a run
def cap_reach(t: float, schedule: LookSchedule) -> float:
    """p*: the smallest success rate k/max_n whose cap bound certifies threshold t (cap_lower(k) ≥ t); 1.0 where no
    k does. A p_A below p* would, at the cap, most likely not be certified at t."""
    lo, hi = 0, schedule.max_n
    if schedule.cap_lower(hi) < t:
        return 1.0
    while lo < hi:  # cap_lower is increasing in k
        mid = (lo + hi) // 2
        if schedule.cap_lower(mid) >= t:
            hi = mid
        else:
            lo = mid + 1
    return lo / schedule.max_n


def decide_at_radii(sample: Callable[[int], int], sigma: float, radii: Sequence[float],
                    schedule: LookSchedule, futility: float | None = FUTILITY_BETA) -> SequentialDecision:
    """Decide, for every radius r, whether the smoothed classifier is robust at r around the input (g(x + δ) = c_A for
    ‖δ‖ < r), stopping at the first look where every radius is decided.

    sample(num) -> how many of num fresh base-classifier samples land on c_A. Guarantee: P[some "robust" claim is
    false] ≤ schedule.alpha, whatever the stopping; see the module docstring.

    `futility` (β, or None for no futility stop): also stop at r (UNDECIDED: abstain there) once the one-sided
    Clopper-Pearson upper bound at level β of the samples so far is below p*(r) (`cap_reach`): the cap itself would
    then most likely not certify r, so the rest of the samples would only confirm an abstention. Abstaining never
    certifies anything, so β touches no guarantee (it need not be corrected for the looks): it only sets how often an
    input that the cap would have certified is given up early (at most β per look where p_A ≥ p*). This is what makes
    inputs whose p_A sits between Φ(r/σ) and p*(r) cheap; without it they run to the cap and abstain there."""
    sigma = check_sigma(sigma)
    radii = check_radii(radii, sigma, schedule)
    thresholds = [float(norm.cdf(r / sigma)) for r in radii]
    reach = [cap_reach(t, schedule) if futility else 0.0 for t in thresholds]
    decided: list[str | None] = [None] * len(radii)
    for j, n, k, lo, hi in _run_sequence(sample, schedule):
        give_up = 1.0 - betaincinv(n - k, k + 1.0, futility) if futility and k < n else 1.0
        for i, t in enumerate(thresholds):
            if decided[i] is None:
                if lo >= t:
                    decided[i] = ROBUST
                elif hi < t:
                    decided[i] = NOT_ROBUST
                elif give_up < reach[i]:
                    decided[i] = UNDECIDED
        if all(d is not None for d in decided) or lo > hi:  # lo > hi: the sequence has failed; stop where it is
            break
    return SequentialDecision(radii=radii, decisions=tuple(d or UNDECIDED for d in decided), samples=n, count=k,
                              pa_lower=lo, pa_upper=hi, looks=j + 1)


def cap_radius(sigma: float, schedule: LookSchedule, p_hat: float) -> float:
    """The radius the cap would certify if the empirical rate stayed p̂: σ·Φ⁻¹ of the last look's lower bound with
    round(p̂·max_n) of max_n samples on c_A (0 where that bound is ≤ 1/2)."""
    lo = schedule.cap_lower(round(p_hat * schedule.max_n))
    return radius_of(sigma, lo) if lo > 0.5 else 0.0


def estimate_radius(sample: Callable[[int], int], sigma: float, schedule: LookSchedule,
                    tolerance: float) -> RadiusEstimate:
    """Certify a radius with an input-specific number of samples: stop at the first look where σ·Φ⁻¹(L_j) is within
    `tolerance` of `cap_radius` at the current p̂, or where U_j ≤ 1/2. The radius is σ·Φ⁻¹(L) where L > 1/2, else 0
    (abstain). P[radius > σ·Φ⁻¹(p_A)] ≤ schedule.alpha under this (or any) stopping rule."""
    sigma = check_sigma(sigma)
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
        raise CertificationInputError(f"the radius tolerance must be a finite number > 0, got {tolerance!r}")
    last = len(schedule.looks) - 1
    for j, n, k, lo, hi in _run_sequence(sample, schedule):
        now = radius_of(sigma, lo) if lo > 0.5 else 0.0
        if hi <= 0.5 or lo > hi or cap_radius(sigma, schedule, k / n) - now <= tolerance:
            break
    return RadiusEstimate(radius=now, samples=n, count=k, pa_lower=lo, pa_upper=hi, looks=j + 1, early=j < last)


# ------------------------------------------------------------------------------------------------ on a model
SEQUENTIAL_COLUMNS = COLUMNS + ("pa_upper", "decisions")


@dataclass(frozen=True)
class SequentialCertificate(Certificate):
    """A `Certificate` of sequential certification at given radii: `n` is the estimation samples used, `radius` the
    largest radius decided ROBUST (0.0 if none), `decisions` one of ROBUST/NOT_ROBUST/UNDECIDED per radius of the run,
    `pa_upper` the upper confidence sequence where it stopped. prediction = c_A where p̲_A > 1/2, else ABSTAIN."""

    pa_upper: float = 1.0
    radii: tuple[float, ...] = ()
    decisions: tuple[str, ...] = ()

    def decision_at(self, r: float) -> str:
        for ri, d in zip(self.radii, self.decisions):
            if math.isclose(ri, r):
                return d
        raise KeyError(f"radius {r} was not decided; radii are {self.radii}")

    def to_row(self) -> str:
        dec = ",".join(f"{r!r}:{d}" for r, d in zip(self.radii, self.decisions))
        return super().to_row() + f"\t{float(self.pa_upper)!r}\t{dec}"

    @classmethod
    def from_row(cls, line: str) -> SequentialCertificate:
        parts = line.rstrip("\n").split("\t")
        if len(parts) != len(SEQUENTIAL_COLUMNS):
            raise CertificationInputError(
                f"a sequential certificate row needs {len(SEQUENTIAL_COLUMNS)} tab-separated fields, got {line!r}")
        base = Certificate.from_row("\t".join(parts[: len(COLUMNS)]))
        try:
            pairs = [item.rsplit(":", 1) for item in parts[-1].split(",")] if parts[-1] else []
            radii = tuple(float(r) for r, _ in pairs)
            decisions = tuple(d for _, d in pairs)
            pa_upper = float(parts[len(COLUMNS)])
        except ValueError:
            raise CertificationInputError(f"malformed sequential certificate row {line!r}") from None
        if any(d not in DECISIONS for d in decisions):
            raise CertificationInputError(f"sequential certificate row {line!r}: unknown decision")
        return cls(**{f: getattr(base, f) for f in base.__dataclass_fields__}, pa_upper=pa_upper, radii=radii,
                   decisions=decisions)


class SequentialLog(CertifyLog):
    """`CertifyLog` of `SequentialCertificate`s (the CERTIFY columns, then pa_upper and the per-radius decisions)."""

    cert_type = SequentialCertificate
    column_line = "\t".join(SEQUENTIAL_COLUMNS)
    kind = "a sequential certification log"


def smooth_sampler(smooth: Smooth, x, c_a: int, seed: int) -> Callable[[int], int]:
    """sample(num) for `smooth` at x: segment j (the j-th call) draws num samples from the noise stream
    (seed, "estimation-look{j}"), disjoint from the selection stream, and returns c_A's count among them."""
    calls = [0]

    def sample(num: int) -> int:
        j = calls[0]
        calls[0] += 1
        return int(smooth.sample_counts(x, num, seed, f"estimation-look{j}")[c_a])

    return sample


def _select(smooth: Smooth, x, n0: int, seed: int) -> int:
    return int(smooth.sample_counts(x, check_count("n0", n0), seed, "selection").argmax())


def certify_sequential(smooth: Smooth, x, n0: int, radii: Sequence[float], schedule: LookSchedule, seed: int = 0,
                       label: int = -1, idx: int = -1, futility: float | None = FUTILITY_BETA) -> SequentialCertificate:
    """Select c_A from n0 samples (as CERTIFY), then `decide_at_radii` on fresh samples of the same seed."""
    start = time.perf_counter()
    c_a = _select(smooth, x, n0, seed)
    d = decide_at_radii(smooth_sampler(smooth, x, c_a, seed), smooth.sigma, radii, schedule, futility)
    robust = [r for r, dec in zip(d.radii, d.decisions) if dec == ROBUST]
    return SequentialCertificate(idx=int(idx), label=int(label), prediction=c_a if d.pa_lower > 0.5 else ABSTAIN,
                                 pa_lower=d.pa_lower, radius=max(robust, default=0.0), count_a=d.count, n0=int(n0),
                                 n=d.samples, seconds=time.perf_counter() - start, pa_upper=d.pa_upper,
                                 radii=d.radii, decisions=d.decisions)


def certify_adaptive(smooth: Smooth, x, n0: int, schedule: LookSchedule, tolerance: float, seed: int = 0,
                     label: int = -1, idx: int = -1) -> Certificate:
    """Select c_A from n0 samples, then `estimate_radius`; a `Certificate` whose n is the estimation samples used."""
    start = time.perf_counter()
    c_a = _select(smooth, x, n0, seed)
    e = estimate_radius(smooth_sampler(smooth, x, c_a, seed), smooth.sigma, schedule, tolerance)
    certified = e.pa_lower > 0.5
    return Certificate(idx=int(idx), label=int(label), prediction=c_a if certified else ABSTAIN,
                       pa_lower=e.pa_lower, radius=e.radius if certified else 0.0, count_a=e.count, n0=int(n0),
                       n=e.samples, seconds=time.perf_counter() - start)


def certify_each(one: Callable[[int], Certificate], num_items: int, indices: Sequence[int], log: CertifyLog,
                 progress: bool = True) -> list[Certificate]:
    """one(i) for each i in `indices` not yet in `log`, appending each row as it finishes (resumable, like
    `certify_dataset`); returns the certificates of all `indices`, sorted by index."""
    wanted = sorted({int(i) for i in indices})
    if wanted and not (0 <= wanted[0] and wanted[-1] < num_items):
        raise CertificationInputError(f"indices must lie in [0, {num_items}), got {wanted[0]}..{wanted[-1]}")
    wanted_set = set(wanted)
    done = {c.idx: c for c in log.certificates() if c.idx in wanted_set}
    with _progress(progress) as bar:
        task = bar.add_task("certify", total=len(wanted), completed=len(done), acc=_accuracy_text(done))
        for i in (i for i in wanted if i not in done):
            cert = one(i)
            log.append(cert)
            done[i] = cert
            bar.update(task, advance=1, acc=_accuracy_text(done))
    return [done[i] for i in wanted]


def certify_dataset_sequential(smooth: Smooth, x_all, labels, indices, n0: int, schedule: LookSchedule, seed: int,
                               log: CertifyLog, radii: Sequence[float] | None = None, tolerance: float | None = None,
                               progress: bool = True) -> list[Certificate]:
    """`certify_sequential` (radii given) or `certify_adaptive` (tolerance given) of x_all[i] for each index, input i
    with seed `input_seed(seed, i)`, rows appended to `log` as they finish."""
    if (radii is None) == (tolerance is None):
        raise CertificationInputError("give radii (sequential decisions) or a tolerance (adaptive radius), not both")
    if radii is not None:
        radii = check_radii(radii, smooth.sigma, schedule)

        def one(i):
            return certify_sequential(smooth, x_all[i], n0, radii, schedule, input_seed(seed, i), int(labels[i]), i)
    else:
        def one(i):
            return certify_adaptive(smooth, x_all[i], n0, schedule, tolerance, input_seed(seed, i), int(labels[i]), i)
    return certify_each(one, min(len(x_all), len(labels)), indices, log, progress)


# ------------------------------------------------------------------------------------------------ log modes
def log_mode(path) -> str | None:
    """The mode an existing log was written in ("fixed", "randomized-cp", "sequential", "adaptive", "irs"), or None
    when there is no log yet (or its first line is not a meta line: the log class says what is wrong then)."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return None
    with open(p, "rb") as f:
        first = f.readline()
    try:
        meta = json.loads(first.decode("utf-8")[2:]) if first.startswith(b"# ") else None
    except ValueError:
        return None
    if not isinstance(meta, dict):
        return None
    return meta.get("mode") or ("irs" if meta.get("method") == "irs" else "fixed")


def check_log_mode(path, mode: str) -> None:
    """Refuse, with one line, to resume a log written in another mode."""
    found = log_mode(path)
    if found is not None and found != mode:
        raise CertificationInputError(f"{path} was written in {found} mode, this run is {mode}: resume it in the same "
                                      "mode or use another --out")


__all__ = ["LookSchedule", "SequentialCertificate", "SequentialLog", "cap_radius", "certify_adaptive",
           "certify_dataset_sequential", "certify_sequential", "check_log_mode", "check_radii", "decide_at_radii",
           "estimate_radius", "log_mode", "look_schedule", "max_radius", "radii_schedule"]
