"""Randomized smoothing: Monte-Carlo PREDICT and CERTIFY of Cohen, Rosenfeld and Kolter (ICML 2019).

The smoothed classifier of a base classifier f (a `Runner`'s argmax) at an input x is

    g(x) = argmax_c P[f(x + σε) = c],   ε ~ N(0, I) in pixel space (no clipping).

CERTIFY picks c_A from n0 noisy samples, then bounds p_A = P[f(x + σε) = c_A] from below with a one-sided
Clopper-Pearson bound p̲_A on n *fresh* samples. If p̲_A > 1/2, then with probability ≥ 1 − α over the sampling,
g(x + δ) = c_A for every ‖δ‖₂ < R = σ·Φ⁻¹(p̲_A); otherwise it abstains.

Noise is reproducible: ε comes from the seeded stream of `arq_deploy.runtime.noise` (Philox, keyed by a hash of
(seed, purpose, chunk index)), so it depends on neither the batch size nor anything drawn before.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import time
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

from arq_deploy.certify.stats import cp_lower, radius, rcp_lower
from arq_deploy.core.errors import CertificationInputError
from arq_deploy.core.validation import check_alpha, check_count, check_params
from arq_deploy.runtime.noise import noise_batches

ABSTAIN = -1
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


def randomization_u(seed: int) -> float:
    """The uniform u of the randomized Clopper-Pearson bound for noise seed `seed`: Philox keyed by a hash of
    (seed, "randomized-cp"), independent of the noise streams (whose keys hash other purposes)."""
    key = int.from_bytes(hashlib.blake2b(f"arq-rcp:{int(seed)}".encode(), digest_size=16).digest(), "little")
    return float(np.random.Generator(np.random.Philox(key=key)).random())


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
        self.batch_size = check_count("batch_size", batch_size)
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
        num = check_count("num", num)
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

    def certify(self, x, n0: int, n: int, alpha: float, seed: int = 0, label: int = -1, idx: int = -1,
                randomized: bool = False) -> Certificate:
        """CERTIFY: c_A = argmax of n0 selection counts; p̲_A = cp_lower(count of c_A among n estimation samples, n, α).

        Abstain unless p̲_A > 1/2; otherwise the radius is σ·Φ⁻¹(p̲_A). The two sample sets use disjoint noise
        streams ("selection", "estimation") of the same seed, so the estimate is independent of the selection.
        randomized: p̲_A is the randomized Clopper-Pearson bound (`stats.rcp_lower`, exact coverage 1 − α, never
        below CP's) with its uniform u drawn from the seed (`randomization_u`), so the certificate stays reproducible.
        """
        start = time.perf_counter()
        n0, n, alpha = check_params(n0, n, alpha)
        x = self._check_x(x)
        c_a = int(self.sample_counts(x, n0, seed, "selection").argmax())
        count_a = int(self.sample_counts(x, n, seed, "estimation")[c_a])
        pa_lower = rcp_lower(count_a, n, alpha, randomization_u(seed)) if randomized else cp_lower(count_a, n, alpha)
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
        return self.predict_with_counts(x, n, alpha, seed)[0]

    def predict_with_counts(self, x, n: int, alpha: float, seed: int = 0) -> tuple[int, np.ndarray]:
        """`predict`'s answer and the class counts (int64, length K) it was decided on."""
        n, alpha = check_count("n", n), check_alpha(alpha)
        counts = self.sample_counts(x, n, seed, "prediction")
        top2 = np.argsort(-counts, kind="stable")[:2]
        n_a, n_b = int(counts[top2[0]]), int(counts[top2[1]])
        if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
            return ABSTAIN, counts
        return int(top2[0]), counts
