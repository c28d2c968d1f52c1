"""Incremental randomized smoothing (IRS; Ugare, Singh, Misailovic, ICLR 2024): certify a quantized model f_q by reusing
the certificate of the float model f it was derived from.

Let c_A and p̲_A be CERTIFY's class and (1 − α) lower bound on p_A = P[f(x + σε) = c_A] for f, read from a float
certification log (the *cache*). IRS bounds the disparity ζ = P[f(x + σε) ≠ f_q(x + σε)] and uses
P[f_q = c_A] ≥ p_A − ζ. Only disagreements that take samples away from c_A can lower P[f_q = c_A], so this module
bounds the one-sided disparity instead (a tighter bound, sound for the same reason):
    ζ_A = P[f(x + σε) = c_A, f_q(x + σε) ≠ c_A] ≤ ζ,
    P[f_q(x + σε) = c_A] ≥ P[f(x + σε) = c_A, f_q(x + σε) = c_A] = p_A − ζ_A ≥ p̲_A − ζ̄_A,
where ζ̄_A = cp_upper(k, n_p, α_ζ) and k = #{i < n_p : f(x + σε_i) = c_A ≠ f_q(x + σε_i)} over n_p fresh noisy
inputs run through BOTH models. (On ResNet-20 W8A8 at σ = 0.5, k was 44% of the two-sided disagreement count over 40
test images × 2,000 samples.) If p̲_A,q = p̲_A − ζ̄_A > 1/2 the smoothed f_q predicts c_A within the L2 radius
σ·Φ⁻¹(p̲_A,q) ("irs" path); otherwise the input is certified from scratch with CERTIFY of f_q (n0, n, α; the "full"
path, the same certificate as a plain `Smooth(f_q).certify` with the same seed), or, with the fallback turned off,
abstains (the "abstain" path: IRS alone, at the cost of the n_p samples only; an abstention is never wrong).

Soundness. An "irs" certificate is wrong only if p̲_A > p_A (probability ≤ α, the float run's CERTIFY) or ζ̄_A < ζ_A
(probability ≤ α_ζ; c_A is fixed by the float run before the ζ samples are drawn, so k ~ Binomial(n_p, ζ_A)): by a
union bound P[irs path and wrong] ≤ α + α_ζ, the guarantee IRS states. A "full" certificate is wrong only if f_q's
own CERTIFY fails (probability ≤ α, whatever the path decision). Over both paths a union bound gives
P[the certificate of an input is wrong] ≤ 2α + α_ζ in the worst case. α is in the log's meta, α_ζ in the meta and in
every row.

Independence. The ζ samples use the noise stream (seed, "irs"), independent of the "selection" and "estimation"
streams from which the float run's c_A and p̲_A came, so ζ̄_A is a valid bound whatever p̲_A turned out to be. The
fallback uses the same seed as the float run (so its rows equal `arq-deploy certify` of f_q); its CERTIFY bound holds
unconditionally, which is all the union bound above needs.

Cost. The n_p disagreement samples run f as well as f_q: `float_time` and `float_samples` record that cost separately.
f's labels on them do not depend on f_q, so a `FloatLabelStore` beside the cache keeps them: the first incremental run
against a cache computes them, every later one (another policy, another search) runs only f_q.
The cache is a `CertifyLog` file (the output of `arq-deploy certify` on the float model), read without modifying it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from arq_deploy.certify.results import (
    COLUMN_LINE,
    CertifyLog,
    _check_run_matches_meta,
    _truncate_partial_line,
    read_headed_lines,
)
from arq_deploy.certify.smooth import ABSTAIN, COLUMNS, Certificate, Smooth
from arq_deploy.certify.stats import cp_upper, radius
from arq_deploy.core.errors import CertificationInputError
from arq_deploy.core.fileio import write_text
from arq_deploy.core.progress import progress_bar
from arq_deploy.core.validation import check_alpha, check_params
from arq_deploy.runtime.noise import check_count, input_seed, noise_batches

IRS, FULL, ABSTAINED = "irs", "full", "abstain"
NOISE_PURPOSE = "irs"
# k counts f = c_A ≠ f_q only (the module docstring). In the log meta, so that a log of the two-sided count (earlier
# versions) is not continued with this one.
DISPARITY = "away-from-c_A"
EXTRA_COLUMNS = ("path", "float_pa_lower", "k", "n_p", "zeta_upper", "alpha_zeta", "quant_samples", "float_samples",
                 "float_time")
INCREMENTAL_COLUMNS = COLUMNS + EXTRA_COLUMNS
INCREMENTAL_COLUMN_LINE = "\t".join(INCREMENTAL_COLUMNS)
IDENTITY_KEYS = ("sigma", "data", "model_sha256")  # cache vs run: a mismatch is an error


# ---------------------------------------------------------------- the float cache


@dataclass(frozen=True)
class CacheEntry:
    """The float model's certificate of one input: prediction c_A (ABSTAIN if it abstained), p̲_A, count_a of n."""

    idx: int
    label: int
    prediction: int
    pa_lower: float
    radius: float
    count_a: int
    n0: int
    n: int

    @classmethod
    def from_certificate(cls, cert: Certificate) -> "CacheEntry":
        return cls(idx=cert.idx, label=cert.label, prediction=cert.prediction, pa_lower=cert.pa_lower,
                   radius=cert.radius, count_a=cert.count_a, n0=cert.n0, n=cert.n)


class FloatCache:
    """A float model's certification log (`CertifyLog` format, e.g. `arq-deploy certify FLOAT --out F.tsv`), read only.

    meta: the log's meta dict (sigma, n0, n, alpha, seed, data, model, model_sha256, ...). A partial last line (a float
    run killed or still running) is ignored, not removed.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise CertificationInputError(
                f"cannot read the float certification log {self.path}: {e.strerror}") from None
        try:
            lines = data[: data.rfind(b"\n") + 1].decode("utf-8").split("\n")[:-1]
        except UnicodeDecodeError:
            raise CertificationInputError(f"{self.path} is not a certification log (not UTF-8 text)") from None
        if len(lines) < 2 or not lines[0].startswith("# ") or lines[1] != COLUMN_LINE:
            raise CertificationInputError(f"{self.path} is not a float certification log (from `arq-deploy certify`)")
        try:
            self.meta = json.loads(lines[0][2:])
        except ValueError:
            raise CertificationInputError(f"{self.path}: its meta line is not valid JSON") from None
        for key in ("sigma", "alpha", "n0", "n", "seed"):
            if key not in self.meta:
                raise CertificationInputError(
                    f"{self.path}: its meta lacks {key!r}, needed for incremental certification")
        self._entries: dict[int, CacheEntry] = {}
        for line in lines[2:]:
            cert = Certificate.from_row(line)
            if cert.idx in self._entries:
                raise CertificationInputError(f"{self.path} holds input {cert.idx} twice")
            self._entries[cert.idx] = CacheEntry.from_certificate(cert)

    @property
    def sigma(self) -> float:
        return float(self.meta["sigma"])

    @property
    def alpha(self) -> float:
        return float(self.meta["alpha"])

    def indices(self) -> set[int]:
        return set(self._entries)

    def entry(self, idx: int) -> CacheEntry:
        """The cached certificate of input idx; CertificationInputError if the float run did not certify it."""
        try:
            return self._entries[int(idx)]
        except KeyError:
            raise CertificationInputError(
                f"the float certification log {self.path} has no row for input {idx}; certify the float model on the "
                "same inputs first (same --skip/--max)") from None

    def check(self, **run) -> None:
        """Refuse a run whose identity differs from the cache's: every given key (sigma, data, model_sha256, n0, n,
        alpha, seed, ...) must equal the cache meta's value; a given model_sha256 the cache does not record is
        refused."""
        for key, value in run.items():
            if value is None:
                continue
            if key not in self.meta:
                if key == "model_sha256":
                    raise CertificationInputError(
                        f"{self.path} does not record the float model's sha256, so it cannot be checked against it")
                continue
            mine = self.meta[key]
            if not (float(mine) == float(value) if key == "sigma" else mine == value):
                raise CertificationInputError(
                    f"the float certification log {self.path} was made with {key}={mine!r} but this run uses "
                    f"{key}={value!r}; certify the float model with the same settings or pick the matching log")


class FloatLabelStore:
    """f's labels on the IRS noise of each input, kept beside a float cache so that f runs on the ζ samples once,
    not once per quantized model (the search reward does the same with `float-irs-labels.npy`).

    File: a `# {meta}` JSON line (the float cache's identity: sigma, seed, data, model, model_sha256; the float
    backend; the noise purpose; the format), the column line `idx<TAB>n_p<TAB>labels`, then one row per input:
    its index, how many samples, and the labels as base64 of little-endian int16. Rows are appended and fsynced as
    they are computed; a partial last line (a kill mid-write) is cut when the store is opened. The noise stream
    is the same array for every batch size and n_p (`noise_batches`), so a row of n samples serves any n_p ≤ n; a
    longer row for an input supersedes a shorter one. A file made for another float log, model or backend is refused.
    """

    COLUMNS = "idx\tn_p\tlabels"
    FORMAT = "int16-le-base64"

    def __init__(self, path: str | os.PathLike, cache: FloatCache, float_backend: str):

        self.path = Path(path)
        m = cache.meta
        self.meta = {k: m[k] for k in ("sigma", "seed", "data", "model", "model_sha256") if k in m}
        self.meta |= {"float_backend": str(float_backend), "noise": NOISE_PURPOSE, "format": self.FORMAT}
        self._rows: dict[int, np.ndarray] = {}
        if self.path.exists() and self.path.stat().st_size > 0:
            self._load()
        else:
            write_text(self.path, "# " + json.dumps(self.meta, sort_keys=True) + "\n" + self.COLUMNS + "\n")

    def _load(self) -> None:
        import base64
        import binascii

        lines = read_headed_lines(self.path, _truncate_partial_line(self.path), self.COLUMNS, "a float label store",
                                  self.meta,
                                  "holds the labels of another float run",
                                  "delete it or pass another --float-labels path")
        for line in lines[2:]:
            try:
                idx, n, text = line.split("\t")
                labels = np.frombuffer(base64.b64decode(text, validate=True), dtype="<i2").astype(np.int64)
                idx, n = int(idx), int(n)
            except (ValueError, binascii.Error):
                raise CertificationInputError(f"{self.path}: malformed row {line[:60]!r}") from None
            if len(labels) != n:
                raise CertificationInputError(f"{self.path}: row of input {idx} says {n} labels, holds {len(labels)}")
            if idx not in self._rows or n > len(self._rows[idx]):
                self._rows[idx] = labels

    def get(self, idx: int, n_p: int) -> np.ndarray | None:
        """f's first n_p labels of input idx, or None if no stored row has that many."""
        row = self._rows.get(int(idx))
        return None if row is None or len(row) < n_p else row[:n_p]

    def put(self, idx: int, labels: np.ndarray) -> None:
        """Append input idx's labels (fsynced) unless a row at least as long is already stored."""
        import base64

        labels = np.asarray(labels)
        idx = int(idx)
        if idx in self._rows and len(self._rows[idx]) >= len(labels):
            return
        if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.int16).max):
            raise CertificationInputError("class labels must lie in [0, 32767] to be stored")
        text = base64.b64encode(labels.astype("<i2").tobytes()).decode("ascii")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{idx}\t{len(labels)}\t{text}\n")
            f.flush()
            os.fsync(f.fileno())
        self._rows[idx] = labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self._rows)


def zeta_labels(runner, x: np.ndarray, sigma: float, n_p: int, seed: int, num_classes: int | None = None,
                batch_size: int = 1000) -> np.ndarray:
    """argmax runner(x + σε_j) for j < n_p, ε_j from the ζ stream (seed, "irs") of one input (x: float32 C×H×W; seed:
    that input's seed): f's labels on the samples IRS draws for x, the ones `disagreements` uses."""
    sig = np.float32(sigma)
    return np.concatenate([_labels(runner, x[None] + sig * eps, num_classes)
                           for eps in noise_batches(x.shape, n_p, seed, NOISE_PURPOSE, batch_size)])


def fill_label_store(store: FloatLabelStore, float_runner, cache: FloatCache, x_all: np.ndarray,
                     indices: Sequence[int], n_p: int, num_classes: int, batch_size: int = 1000) -> int:
    """Compute f's labels on the first n_p ζ samples of each input in `indices` that the float run did not abstain on
    and the store lacks (the labels `certify_incremental` would compute), ahead of the incremental runs. Returns the
    number of f forward passes made."""
    n_p = check_count("n_p", n_p)
    drawn = 0
    for i in sorted({int(i) for i in indices}):
        if cache.entry(i).prediction == ABSTAIN or store.get(i, n_p) is not None:
            continue
        x = np.asarray(x_all[i], dtype=np.float32)
        store.put(i, zeta_labels(float_runner, x, cache.sigma, n_p, input_seed(cache.meta["seed"], i), num_classes,
                                 batch_size))
        drawn += n_p
    return drawn


# ---------------------------------------------------------------- the certificate


@dataclass(frozen=True)
class IncrementalCertificate(Certificate):
    """A `Certificate` of the quantized model f_q plus how it was obtained.

    path: "irs" (radius from p̲_A,q = float p̲_A − ζ̄_A; then count_a, n0, n are the float run's), "full" (CERTIFY of
    f_q; count_a, n0, n are f_q's) or "abstain" (the bound failed and the fallback is off: prediction ABSTAIN, radius 0,
    pa_lower the failed p̲_A,q, count_a, n0, n the float run's). float_pa_lower: the cached p̲_A of f.
    k: disagreements f = c_A ≠ f_q among n_p samples (n_p = 0, k = 0, ζ̄ = 1 when the float certificate abstained and
    none were drawn).
    zeta_upper: cp_upper(k, n_p, α_ζ).
    quant_samples / float_samples: forward passes of f_q / f on noisy inputs. float_time: seconds spent running f.
    seconds: wall time of the whole incremental certification (f runs included).
    """

    path: str
    float_pa_lower: float
    k: int
    n_p: int
    zeta_upper: float
    alpha_zeta: float
    quant_samples: int
    float_samples: int
    float_time: float

    def to_row(self) -> str:
        extra = (self.path, repr(float(self.float_pa_lower)), self.k, self.n_p, repr(float(self.zeta_upper)),
                 repr(float(self.alpha_zeta)), self.quant_samples, self.float_samples, repr(float(self.float_time)))
        return super().to_row() + "\t" + "\t".join(str(f) for f in extra)

    @classmethod
    def from_row(cls, line: str) -> "IncrementalCertificate":
        parts = line.rstrip("\n").split("\t")
        if len(parts) != len(INCREMENTAL_COLUMNS):
            raise CertificationInputError(
                f"an incremental certificate row needs {len(INCREMENTAL_COLUMNS)} tab-separated fields, got {line!r}")
        base = Certificate.from_row("\t".join(parts[: len(COLUMNS)]))
        path, fpa, k, n_p, zeta, az, qs, fs, ft = parts[len(COLUMNS):]
        if path not in (IRS, FULL, ABSTAINED):
            raise CertificationInputError(f"malformed incremental certificate row {line!r}: path {path!r}")
        try:
            return cls(**{f.name: getattr(base, f.name) for f in fields(Certificate)}, path=path,
                       float_pa_lower=float(fpa), k=int(k), n_p=int(n_p), zeta_upper=float(zeta), alpha_zeta=float(az),
                       quant_samples=int(qs), float_samples=int(fs), float_time=float(ft))
        except ValueError:
            raise CertificationInputError(f"malformed incremental certificate row {line!r}") from None


def check_irs_params(n_p, alpha_zeta) -> tuple[int, float]:
    """Validate n_p (an integer >= 1) and α_ζ (in (0, 1))."""
    n_p = check_count("n_p", n_p)
    try:
        alpha_zeta = check_alpha(alpha_zeta)
    except CertificationInputError:
        raise CertificationInputError(
            f"alpha_zeta (failure probability of the disparity bound) must lie strictly between 0 and 1, "
            f"got {alpha_zeta!r}") from None
    return n_p, alpha_zeta


def _labels(runner, batch: np.ndarray, num_classes: int | None) -> np.ndarray:
    """argmax of runner's logits on batch; with num_classes, the logits must be len(batch) × num_classes."""
    logits = np.asarray(runner(batch))
    if num_classes is not None and logits.shape != (len(batch), num_classes):
        raise CertificationInputError(
            f"runner {getattr(runner, 'name', '?')!r} returned logits of shape {logits.shape}, "
            f"expected ({len(batch)}, {num_classes})")
    return logits.argmax(axis=1)


def away_from(cls: int, float_labels: np.ndarray, quant_labels: np.ndarray) -> int:
    """#{i : float_labels[i] = cls ≠ quant_labels[i]}: the disagreements that lower P[f_q = cls] (see the module
    docstring: k of the one-sided disparity ζ_A)."""
    f, q = np.asarray(float_labels), np.asarray(quant_labels)
    return int(np.count_nonzero((f == cls) & (q != cls)))


def disagreements(float_runner, quant_runner, x: np.ndarray, sigma: float, n_p: int, seed: int, num_classes: int,
                  cls: int, batch_size: int = 1000, float_labels: np.ndarray | None = None
                  ) -> tuple[int, float, np.ndarray]:
    """k = #{i < n_p: argmax f(x + σε_i) = cls ≠ argmax f_q(x + σε_i)}, ε_i from the stream (seed, "irs"), the
    seconds spent in f, and f's n_p labels. x: one float32 C×H×W input (already validated); cls: the float model's
    c_A. float_labels: f's labels on these n_p samples, cached from an earlier run (`FloatLabelStore`): then f does
    not run at all."""
    sig = np.float32(sigma)
    k, float_time, done, out = 0, 0.0, 0, []
    for eps in noise_batches(x.shape, n_p, seed, NOISE_PURPOSE, batch_size):
        batch = x[None] + sig * eps
        if float_labels is not None:
            y_f = float_labels[done:done + len(eps)]
        else:
            t0 = time.perf_counter()
            y_f = _labels(float_runner, batch, num_classes)
            float_time += time.perf_counter() - t0
        done += len(eps)
        out.append(y_f)
        k += away_from(cls, y_f, _labels(quant_runner, batch, num_classes))
    return k, float_time, np.concatenate(out)


def certify_incremental(float_runner, quant_runner, cache_entry: CacheEntry, x, sigma: float, n_p: int,
                        alpha_zeta: float, n0: int, n: int, alpha: float, seed: int, label: int = -1, idx: int = -1,
                        num_classes: int | None = None, batch_size: int = 1000,
                        label_store: "FloatLabelStore | None" = None, fallback: bool = True) -> IncrementalCertificate:
    """IRS of f_q = `quant_runner` at x, given the float model f's cached certificate of x (see the module docstring).

    seed: this input's seed (a dataset run passes `input_seed(seed, idx)`, as `certify_dataset` does); the ζ samples
    use its "irs" stream, the fallback CERTIFY its "selection"/"estimation" streams. n0, n, α are the fallback's
    (CERTIFY of f_q). Guarantee: P[irs path and wrong] ≤ α_float + α_ζ; P[wrong] ≤ 2α + α_ζ (union bound).
    label_store: f's labels on the ζ samples, kept across runs; a stored row (of this input, at least n_p samples) is
    used instead of running f, and a computed one is stored. Sound for every f_q: the labels are f's on the same
    (seed, "irs") noise whichever run computed them, and each f_q's k is still Binomial(n_p, ζ_A) for that f_q.
    fallback=False: abstain where the bound fails instead of running CERTIFY of f_q (the "abstain" path).
    """
    start = time.perf_counter()
    n_p, alpha_zeta = check_irs_params(n_p, alpha_zeta)
    n0, n, alpha = check_params(n0, n, alpha)
    num_classes = int(num_classes if num_classes is not None else getattr(quant_runner, "num_classes", -1))
    smooth_q = Smooth(quant_runner, num_classes, sigma, batch_size=batch_size)
    f_classes = getattr(float_runner, "num_classes", -1)
    if f_classes > 0 and f_classes != num_classes:
        raise CertificationInputError(f"the float model has {f_classes} classes, the quantized model {num_classes}")
    if tuple(float_runner.input_shape) != smooth_q.input_shape:
        raise CertificationInputError(f"the float model takes {tuple(float_runner.input_shape)} inputs, the quantized "
                                      f"model {smooth_q.input_shape}")
    if idx >= 0 and cache_entry.idx != idx:
        raise CertificationInputError(f"the cache entry is for input {cache_entry.idx}, not {idx}")
    x = smooth_q._check_x(x)

    key = int(idx if idx >= 0 else cache_entry.idx)
    k, zeta, float_time, drawn, stored = 0, 1.0, 0.0, 0, None
    if cache_entry.prediction != ABSTAIN:  # a float abstention (p̲_A ≤ 1/2) cannot be rescued: go to CERTIFY directly
        stored = label_store.get(key, n_p) if label_store is not None else None
        k, float_time, y_f = disagreements(float_runner, quant_runner, x, smooth_q.sigma, n_p, seed, num_classes,
                                           cache_entry.prediction, batch_size, float_labels=stored)
        if label_store is not None and stored is None:
            label_store.put(key, y_f)
        zeta, drawn = cp_upper(k, n_p, alpha_zeta), n_p
    pa_q = cache_entry.pa_lower - zeta
    common = dict(idx=key, label=int(label), float_pa_lower=cache_entry.pa_lower, k=k, n_p=drawn, zeta_upper=zeta,
                  alpha_zeta=alpha_zeta, float_samples=0 if stored is not None else drawn, float_time=float_time)
    if cache_entry.prediction != ABSTAIN and pa_q > 0.5:
        return IncrementalCertificate(**common, prediction=cache_entry.prediction, pa_lower=pa_q,
                                      radius=radius(smooth_q.sigma, pa_q), count_a=cache_entry.count_a,
                                      n0=cache_entry.n0, n=cache_entry.n, path=IRS, quant_samples=drawn,
                                      seconds=time.perf_counter() - start)
    if not fallback:
        return IncrementalCertificate(**common, prediction=ABSTAIN, pa_lower=pa_q, radius=0.0,
                                      count_a=cache_entry.count_a, n0=cache_entry.n0, n=cache_entry.n, path=ABSTAINED,
                                      quant_samples=drawn, seconds=time.perf_counter() - start)
    full = smooth_q.certify(x, n0, n, alpha, seed=seed, label=label, idx=common["idx"])
    return IncrementalCertificate(**common, prediction=full.prediction, pa_lower=full.pa_lower, radius=full.radius,
                                  count_a=full.count_a, n0=full.n0, n=full.n, path=FULL,
                                  quant_samples=drawn + n0 + n, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------- the incremental log


def _fallback_n(cache: FloatCache, fallback_n: int | None) -> int | None:
    """The fallback CERTIFY's N when it differs from the float run's (0: no fallback, abstain), else None (the meta
    then leaves it out)."""
    if fallback_n is None:
        return None
    if isinstance(fallback_n, int) and not isinstance(fallback_n, bool) and fallback_n == 0:
        return 0
    fallback_n = check_count("fallback_n", fallback_n)
    return None if fallback_n == int(cache.meta["n"]) else fallback_n


def incremental_meta(cache: FloatCache, n_p: int, alpha_zeta: float, fallback_n: int | None = None, **quant) -> dict:
    """The meta of an incremental run: the quantized model's identity (`quant`: model, model_sha256, backend, ...),
    the cache's sigma/data/n0/n/alpha/seed, the float model's identity (float_model, float_model_sha256, float_backend),
    the float log path, n_p and α_ζ, method "irs", and `fallback_n` where the fallback CERTIFY's N is not the float
    run's."""
    n_p, alpha_zeta = check_irs_params(n_p, alpha_zeta)
    m = cache.meta
    meta = {k: m[k] for k in ("sigma", "n0", "n", "alpha", "seed", "data") if k in m}
    meta |= {f"float_{k}": m[k] for k in ("model", "model_sha256", "backend") if k in m}
    meta |= {"method": "irs", "disparity": DISPARITY, "float_log": str(cache.path), "n_p": n_p,
             "alpha_zeta": alpha_zeta}
    fb = _fallback_n(cache, fallback_n)
    if fb is not None:
        meta["fallback_n"] = fb
    return meta | quant


class IncrementalLog(CertifyLog):
    """Append-only TSV of `IncrementalCertificate`s: a `# {meta}` JSON line, the `INCREMENTAL_COLUMNS` line (the
    `CertifyLog` columns, then the IRS ones), one row per input, each flushed and fsynced. Reopening cuts a partial last
    line (a kill -9 mid-write) and refuses a file whose meta differs, exactly as `CertifyLog`."""

    cert_type = IncrementalCertificate
    column_line = INCREMENTAL_COLUMN_LINE
    kind = "an incremental certification log"


def _progress_text(certs: dict) -> str:
    if not certs:
        return "irs - | certified acc -"
    m = len(certs)
    return (f"irs {sum(c.path == IRS for c in certs.values()) / m:.0%} | "
            f"certified acc {sum(c.correct for c in certs.values()) / m:.3f}")


def certify_incremental_dataset(float_runner, quant_runner, cache: FloatCache, x_all: np.ndarray,
                                labels: Sequence[int], indices: Sequence[int], n_p: int, alpha_zeta: float,
                                log: IncrementalLog, num_classes: int | None = None, sigma: float | None = None,
                                batch_size: int = 1000, progress: bool = True,
                                label_store: "FloatLabelStore | None" = None,
                                fallback_n: int | None = None) -> list[IncrementalCertificate]:
    """IRS of x_all[i] for each i in `indices` not yet in `log`, appending each row as it finishes. label_store: f's
    ζ-sample labels kept across runs (`FloatLabelStore`, made for this cache): f runs only where it has no row.

    σ, n0, n, α and the seed are the cache's (a given `sigma` must equal it; the fallback CERTIFY uses the float
    run's settings, except its N where `fallback_n` is given: a float log certified at a large N, paid once, need
    not make every fallback that expensive; fallback_n=0 turns the fallback off, abstaining where the bound fails; the
    log's meta must then say the same `fallback_n`, see `incremental_meta`); input i uses `input_seed(seed, i)`.
    Every index must be in the cache (checked before any work).
    Returns the certificates of all `indices`, sorted by index; an interruption loses only the input in flight, and a
    resumed run gives the same rows. The log's meta (see `incremental_meta`) must match the cache and n_p, α_ζ.
    """
    n_p, alpha_zeta = check_irs_params(n_p, alpha_zeta)
    cache.check(sigma=sigma)
    m = cache.meta
    sigma, seed = float(m["sigma"]), m["seed"]
    n0, n, alpha = check_params(m["n0"], m["n"], m["alpha"])
    _check_run_matches_meta(log.meta, sigma=sigma, n0=n0, n=n, alpha=alpha, seed=seed, n_p=n_p, alpha_zeta=alpha_zeta)
    fb = _fallback_n(cache, fallback_n)
    if log.meta.get("fallback_n") != fb:
        raise CertificationInputError(f"the log's meta has fallback_n={log.meta.get('fallback_n')!r} but this run "
                                      f"uses fallback_n={fb!r} (None: the float run's N, {n})")
    n_fallback = n if not fb else fb
    if "data" in log.meta and "data" in m:
        cache.check(data=log.meta["data"])
    if "float_model_sha256" in log.meta:
        cache.check(model_sha256=log.meta["float_model_sha256"])
    wanted = sorted({int(i) for i in indices})
    if wanted and not (0 <= wanted[0] and wanted[-1] < min(len(x_all), len(labels))):
        raise CertificationInputError(f"indices must lie in [0, {min(len(x_all), len(labels))}), got {wanted[0]}"
                                      f"..{wanted[-1]}")
    missing = sorted(set(wanted) - cache.indices())
    if missing:
        cache.entry(missing[0])  # raises, naming the first missing index
    wanted_set = set(wanted)
    done = {c.idx: c for c in log.certificates() if c.idx in wanted_set}
    todo = [i for i in wanted if i not in done]

    with progress_bar("certify (IRS)", len(wanted), enabled=progress) as (bar, task):
        bar.update(task, completed=len(done), info=_progress_text(done))
        for i in todo:
            cert = certify_incremental(float_runner, quant_runner, cache.entry(i), x_all[i], sigma, n_p, alpha_zeta,
                                       n0, n_fallback, alpha, input_seed(seed, i), label=int(labels[i]), idx=i,
                                       num_classes=num_classes, batch_size=batch_size, label_store=label_store,
                                       fallback=fb != 0)
            log.append(cert)
            done[i] = cert
            bar.update(task, advance=1, info=_progress_text(done))
    return [done[i] for i in wanted]


def cost_summary(certs: Sequence[IncrementalCertificate]) -> dict:
    """Where the time went: fraction certified on the irs path, mean f_q and f forward passes per input, mean seconds
    per input in total and in f (the float model's share of IRS's cost)."""
    certs = list(certs)
    if not certs:
        raise CertificationInputError("there are no certificates to summarise")
    m = len(certs)
    return {"count": m, "irs_fraction": sum(c.path == IRS for c in certs) / m,
            "quant_samples_per_input": sum(c.quant_samples for c in certs) / m,
            "float_samples_per_input": sum(c.float_samples for c in certs) / m,
            "seconds_per_input": sum(c.seconds for c in certs) / m,
            "float_seconds_per_input": sum(c.float_time for c in certs) / m,
            "mean_zeta_upper": sum(c.zeta_upper for c in certs if c.n_p) / max(1, sum(1 for c in certs if c.n_p))}
