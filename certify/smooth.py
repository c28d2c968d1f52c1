"""Randomized smoothing: Monte-Carlo PREDICT and CERTIFY of Cohen, Rosenfeld and Kolter (ICML 2019).

The smoothed classifier of a base classifier f (a `Runner`'s argmax) at an input x is

    g(x) = argmax_c P[f(x + σε) = c],   ε ~ N(0, I) in pixel space (no clipping).

CERTIFY picks c_A from n0 noisy samples, then bounds p_A = P[f(x + σε) = c_A] from below with a one-sided
Clopper-Pearson bound p̲_A on n *fresh* samples. If p̲_A > 1/2, then with probability ≥ 1 − α over the sampling,
g(x + δ) = c_A for every ‖δ‖₂ < R = σ·Φ⁻¹(p̲_A); otherwise it abstains.

Noise is reproducible: sample i of stream (seed, purpose) is drawn from the chunk ⌊i / CHUNK⌋, whose Philox key is a
hash of (seed, purpose, chunk index). It therefore depends on neither the batch size nor anything drawn before.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from scipy.stats import binomtest

from arq_deploy.certify.stats import cp_lower, radius
from arq_deploy.errors import CertificationInputError

ABSTAIN = -1
CHUNK = 100  # noise samples per Philox key
COLUMNS = ("idx", "label", "predict", "radius", "correct", "time", "pa_lower", "count_a", "n0", "n")


@dataclass(frozen=True)
class Certificate:
    """The result of CERTIFY on one input. prediction = ABSTAIN (−1) with radius 0.0 when it abstains.

    pa_lower: p̲_A for the selected class c_A (kept even when abstaining); count_a: its count among the n estimation
    samples; seconds: wall time of this certification.
    """

    idx: int
    label: int
    prediction: int
    pa_lower: float
    radius: float
    count_a: int
    n0: int
    n: int
    seconds: float

    @property
    def correct(self) -> bool:
        """The smoothed prediction is the label (an abstention is never correct)."""
        return self.prediction != ABSTAIN and self.prediction == self.label

    def to_row(self) -> str:
        """One TSV line (no newline) in `COLUMNS` order; floats use repr so that they round-trip exactly."""
        fields = (self.idx, self.label, self.prediction, repr(float(self.radius)), int(self.correct),
                  repr(float(self.seconds)), repr(float(self.pa_lower)), self.count_a, self.n0, self.n)
        return "\t".join(str(f) for f in fields)

    @classmethod
    def from_row(cls, line: str) -> "Certificate":
        """Parse a line written by `to_row`; raises CertificationInputError on a malformed line."""
        parts = line.rstrip("\n").split("\t")
        if len(parts) != len(COLUMNS):
            raise CertificationInputError(f"a certificate row needs {len(COLUMNS)} tab-separated fields, got {line!r}")
        try:
            idx, label, pred, rad, correct, secs, pa, count_a, n0, n = parts
            cert = cls(idx=int(idx), label=int(label), prediction=int(pred), pa_lower=float(pa), radius=float(rad),
                       count_a=int(count_a), n0=int(n0), n=int(n), seconds=float(secs))
        except ValueError:
            raise CertificationInputError(f"malformed certificate row {line!r}") from None
        if int(correct) != int(cert.correct):
            raise CertificationInputError(f"certificate row {line!r}: its 'correct' field contradicts label/predict")
        return cert


def _digest_int(text: str, nbytes: int) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=nbytes).digest(), "little")


def _check_seed(seed) -> int:
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise CertificationInputError(f"seed must be an integer, got {seed!r}")
    return int(seed)


def input_seed(base_seed: int, idx: int) -> int:
    """The seed for input `idx` of a run seeded with `base_seed`: a 63-bit hash of (base_seed, idx).

    Depends on nothing else, so certifying idx alone, inside a dataset run, or after a resume gives the same result.
    """
    return _digest_int(f"arq-input:{_check_seed(base_seed)}:{_check_seed(idx)}", 8) >> 1


def _chunk_noise(shape: tuple[int, ...], seed: int, purpose: str, chunk: int) -> np.ndarray:
    """CHUNK × shape standard normal float32 draws from Philox keyed by a 128-bit hash of (seed, purpose, chunk)."""
    key = _digest_int(f"arq-noise:{seed}:{purpose}:{chunk}", 16)
    rng = np.random.Generator(np.random.Philox(key=key))
    return rng.standard_normal((CHUNK, *shape), dtype=np.float32)


def noise_batches(shape: tuple[int, ...], num: int, seed: int, purpose: str, batch_size: int) -> Iterator[np.ndarray]:
    """Yield ε_0 … ε_{num−1} ~ N(0, I) (float32, each of `shape`) in batches of `batch_size` (the last may be short).

    ε_i is row i mod CHUNK of `_chunk_noise(shape, seed, purpose, i // CHUNK)`, so the concatenation of the batches
    is the same array for every batch_size.
    """
    seed = _check_seed(seed)
    buffer: list[np.ndarray] = []
    buffered = 0
    for chunk in range(math.ceil(num / CHUNK)):
        block = _chunk_noise(shape, seed, purpose, chunk)[: num - chunk * CHUNK]
        buffer.append(block)
        buffered += len(block)
        while buffered >= batch_size:
            joined = np.concatenate(buffer) if len(buffer) > 1 else buffer[0]
            yield joined[:batch_size]
            buffer, buffered = [joined[batch_size:]], buffered - batch_size
    if buffered:
        yield np.concatenate(buffer)


def _check_count(name: str, value) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise CertificationInputError(f"{name} (number of noise samples) must be an integer >= 1, got {value!r}")
    return int(value)


def _check_alpha(alpha) -> float:
    if not isinstance(alpha, numbers.Real) or not (math.isfinite(alpha) and 0.0 < alpha < 1.0):
        raise CertificationInputError(f"alpha (failure probability) must lie strictly between 0 and 1, got {alpha!r}")
    return float(alpha)


def check_params(n0, n, alpha) -> tuple[int, int, float]:
    """Validate CERTIFY's (n0, n, alpha) and return them as (int, int, float)."""
    return _check_count("n0", n0), _check_count("n", n), _check_alpha(alpha)


class Smooth:
    """The smoothed classifier g of `runner` with Gaussian noise level σ (`sigma`, in units of pixels in [0, 1])."""

    def __init__(self, runner, num_classes: int, sigma: float, batch_size: int = 1000):
        if not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma <= 0:
            raise CertificationInputError(f"sigma (noise level) must be a finite number > 0, got {sigma!r}")
        if not isinstance(num_classes, numbers.Integral) or num_classes < 2:
            raise CertificationInputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        runner_classes = getattr(runner, "num_classes", -1)
        if runner_classes > 0 and runner_classes != num_classes:
            raise CertificationInputError(f"num_classes={num_classes} but runner {runner.name!r} has {runner_classes}")
        self.runner = runner
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        self.batch_size = _check_count("batch_size", batch_size)
        self.input_shape = tuple(int(d) for d in runner.input_shape)

    def _check_x(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.shape != self.input_shape:
            raise CertificationInputError(f"input has shape {x.shape}, expected one C×H×W image of {self.input_shape}")
        if not np.all(np.isfinite(x)):
            raise CertificationInputError("input contains NaN or infinite values")
        return np.ascontiguousarray(x, dtype=np.float32)

    def sample_counts(self, x, num: int, seed: int, purpose: str = "estimation") -> np.ndarray:
        """counts[c] = #{i < num: argmax f(x + σε_i) = c}, int64 of length num_classes.

        ε_i comes from the noise stream (seed, purpose); see `noise_batches`.
        """
        x = self._check_x(x)
        num = _check_count("num", num)
        fast = getattr(self.runner, "counts", None)
        if fast is not None:  # the runner samples itself (same noise stream, noise made ahead of the forward pass)
            return np.asarray(fast(x, num, self.sigma, seed, purpose), dtype=np.int64)
        sigma = np.float32(self.sigma)
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for eps in noise_batches(self.input_shape, num, seed, purpose, self.batch_size):
            logits = np.asarray(self.runner(x[None] + sigma * eps))
            if logits.shape != (len(eps), self.num_classes):
                raise CertificationInputError(
                    f"runner returned logits of shape {logits.shape}, expected ({len(eps)}, {self.num_classes})")
            counts += np.bincount(logits.argmax(axis=1), minlength=self.num_classes)
        return counts

    def certify(self, x, n0: int, n: int, alpha: float, seed: int = 0, label: int = -1, idx: int = -1) -> Certificate:
        """CERTIFY: c_A = argmax of n0 selection counts; p̲_A = cp_lower(count of c_A among n estimation samples, n, α).

        Abstain unless p̲_A > 1/2; otherwise the radius is σ·Φ⁻¹(p̲_A). The two sample sets use disjoint noise
        streams ("selection", "estimation") of the same seed, so the estimate is independent of the selection.
        """
        start = time.perf_counter()
        n0, n, alpha = check_params(n0, n, alpha)
        x = self._check_x(x)
        c_a = int(self.sample_counts(x, n0, seed, "selection").argmax())
        count_a = int(self.sample_counts(x, n, seed, "estimation")[c_a])
        pa_lower = cp_lower(count_a, n, alpha)
        if pa_lower > 0.5:
            prediction, rad = c_a, radius(self.sigma, pa_lower)
        else:
            prediction, rad = ABSTAIN, 0.0
        return Certificate(idx=int(idx), label=int(label), prediction=prediction, pa_lower=pa_lower, radius=rad,
                           count_a=count_a, n0=n0, n=n, seconds=time.perf_counter() - start)

    def predict(self, x, n: int, alpha: float, seed: int = 0) -> int:
        """PREDICT: with top two counts n_A ≥ n_B of n samples, return c_A if the two-sided binomial test of
        n_A ~ Binomial(n_A + n_B, 1/2) rejects at level α, else ABSTAIN. P[returns a class ≠ g(x)] ≤ α.
        """
        n, alpha = _check_count("n", n), _check_alpha(alpha)
        counts = self.sample_counts(x, n, seed, "prediction")
        top2 = np.argsort(-counts, kind="stable")[:2]
        n_a, n_b = int(counts[top2[0]]), int(counts[top2[1]])
        if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2[0])
