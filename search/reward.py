"""The search's reward: robustness of the smoothed quantized model on a fixed validation subset of training images.

kinds
  "irs"       (ARQ) the ACR of the smoothed f_q from incremental randomized smoothing (see
              `arq_deploy.certify.incremental`) against the float model f's certificates, computed once per search:
                  R_i = σ·Φ⁻¹(p̲_A,i − ζ̄_i)  if f certified x_i correctly and p̲_A,i − ζ̄_i > 1/2, else 0,
                  ζ̄_i = cp_upper(k_i, n_p, α_ζ),  k_i = #{j < n_p: f(x_i + σε_ij) ≠ f_q(x_i + σε_ij)},
                  reward = ACR = (1/m)·Σ_i R_i.
              The float labels f(x_i + σε_ij) do not depend on the policy: they are computed once and cached, so an
              episode runs only f_q, and only on the inputs f certified correctly. No fallback to full certification
              inside the search (an input IRS cannot certify counts 0: a lower bound of its full-certification radius
              in expectation of the same quantity, and the cheap signal HAQ/ARQ want).
  "full"      the ACR of CERTIFY(f_q) from scratch with (n0, n, α) on the same inputs and seeds (the comparison that
              shows what IRS saves).
  "accuracy"  HAQ's reward: the clean top-1 accuracy of the quantized base classifier f_q on the same inputs.
  "adaptive"  the ACR of f_q with an input-specific number of f_q samples, at most n_p per input (the IRS reward's
              per-input budget), drawn in looks first_n, 2·first_n, … , n_p (`certify.sequential.look_schedule`)
              and stopped as soon as more samples would not move the radius by more than `tolerance`; see below.

The adaptive reward. On the inputs f certified correctly (the others count 0, as for "irs"), with c = y_i (= f's c_A),
f_q runs on the first n_j samples of IRS's noise stream (seed_i, "irs"), where f's labels are cached, and two
anytime-valid Clopper-Pearson confidence sequences over the same looks are kept (`LookSchedule`: per-look levels
summing to α, resp. α_ζ; running max/min of the bounds):
    direct  L_j ≤ p_q = P[f_q(x + σε) = c]     from h_j = #{f_q = c} among n_j samples          (level α)
    IRS     U_j ≥ ζ_A = P[f = c ≠ f_q]          from k_j = #{f = c ≠ f_q} among the same samples   (level α_ζ)
and p̲_q,j = max(L_j, p̲_A − U_j), where p̲_A is f's CERTIFY bound (p_A − ζ_A ≤ p_q, as in IRS). The stopping time τ is
the first look where (a) the upper direct bound is ≤ 1/2 (nothing can be certified), or (b) the radius now,
σ·Φ⁻¹(p̲_q,j), is within `tolerance` of what the cap would give at the current rates h/n and k/n (the same rule as
`estimate_radius`, applied to the combined bound), or, with stop = "float", (c) the radius now is within `tolerance`
of f's own certified radius σ·Φ⁻¹(p̲_A) on x_i (f_q is already about as robust there as the float model; more samples
could add at most `tolerance` up to f's radius, and beyond it only show f_q more robust than f: a ranking of
quantized models, which lose robustness against f, needs little of that, and it is where the cap rule spends most
samples on near-float policies).
R_i = σ·Φ⁻¹(p̲_q,τ) if p̲_q,τ > 1/2, else 0.
Soundness: c is fixed before any f_q sample (the label), so h_j and k_j are binomial counts of fixed-n prefixes of
i.i.d. samples, and each sequence holds at every look simultaneously (union bound over the looks), hence at the
data-dependent τ. R_i overstates the radius of the smoothed f_q only if the float bound fails (≤ α), the direct
sequence fails (≤ α) or the ζ sequence fails (≤ α_ζ): P[R_i wrong] ≤ 2α + α_ζ, IRS's α + α_ζ plus the direct
sequence. No n0 selection samples are spent (c is the label; an input f_q gets wrong has p_q ≤ 1/2 and stops at the
first looks with radius 0). The reward records `samples` = the f_q forward passes actually made (counted at the
sampler), with the per-input mean, the share of inputs that stopped before the cap, and how many inputs' bound came
from the IRS side.

Every kind first quantizes the float model with the policy and calibrates its activation ranges on `calib` training
images plus σ-noise (no fine-tuning inside the loop, as HAQ/ARQ). Rewards are cached by policy.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from arq_deploy.certify.incremental import away_from, zeta_labels
from arq_deploy.certify.results import CertifyLog, certify_dataset
from arq_deploy.certify.sequential import look_schedule
from arq_deploy.certify.smooth import ABSTAIN, Smooth
from arq_deploy.certify.stats import cp_upper, radius, summarize
from arq_deploy.core.errors import PolicyError
from arq_deploy.core.fileio import atomic_path
from arq_deploy.export.pipeline import quantize_calibrated
from arq_deploy.export.qdq import float_onnx, insert_qdq
from arq_deploy.export.quantize.layers import extract_layer_specs
from arq_deploy.runtime.noise import input_seed, noise_range
from arq_deploy.runtime.runners import OrtRunner, TorchRunner

KINDS = ("irs", "full", "accuracy", "adaptive")
ADAPTIVE_FIELDS = ("first_n", "tolerance", "stop")  # in the manifest only for kind "adaptive" (old runs resume unchanged)
STOPS = ("cap", "float")  # the adaptive reward's stopping rule: (a)+(b), or (a)+(b)+(c) of the module docstring


@dataclass(frozen=True)
class RewardConfig:
    """Settings of the reward (stored in the search manifest; a resumed search must match them)."""

    kind: str = "irs"
    sigma: float = 0.25
    images: int = 50  # validation subset of the training split
    calib_images: int = 256
    n0: int = 100
    n: int = 2000  # float model's CERTIFY (and "full" per episode)
    alpha: float = 0.001
    n_p: int = 200  # IRS disagreement samples per input
    alpha_zeta: float = 0.001
    seed: int = 0
    batch_size: int = 500
    backend: str = "onnxruntime"  # runs f_q: its QDQ ONNX export in onnxruntime (what is deployed), or torch fake-quant
    first_n: int = 25  # "adaptive": the first look (f_q samples); later looks double up to the cap n_p
    tolerance: float = 0.05  # "adaptive": stop when the cap could add at most this much radius
    stop: str = "cap"  # "adaptive": "float" also stops when the radius is within tolerance of f's certified radius

    def __post_init__(self):
        if self.backend not in ("onnxruntime", "torch"):
            raise PolicyError(f"reward backend must be onnxruntime or torch, got {self.backend!r}")
        if self.kind not in KINDS:
            raise PolicyError(f"unknown reward {self.kind!r}; choose one of {', '.join(KINDS)}")
        if not self.sigma > 0:
            raise PolicyError(f"sigma must be > 0, got {self.sigma}")
        for name in ("images", "calib_images", "n0", "n", "n_p", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise PolicyError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("alpha", "alpha_zeta"):
            if not 0 < getattr(self, name) < 1:
                raise PolicyError(f"{name} must lie strictly between 0 and 1, got {getattr(self, name)}")
        if isinstance(self.first_n, bool) or int(self.first_n) < 1 or (
                self.kind == "adaptive" and int(self.first_n) > int(self.n_p)):
            raise PolicyError(f"first_n (the adaptive reward's first look) must lie in [1, n_p = {self.n_p}], got "
                              f"{self.first_n}")
        if not (isinstance(self.tolerance, (int, float)) and not isinstance(self.tolerance, bool)
                and math.isfinite(self.tolerance) and self.tolerance > 0):
            raise PolicyError(f"tolerance must be a radius > 0, got {self.tolerance!r}")
        if self.stop not in STOPS:
            raise PolicyError(f"unknown stopping rule {self.stop!r}; choose one of {', '.join(STOPS)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.kind != "adaptive":  # a manifest written before the adaptive reward existed still matches
            for name in ADAPTIVE_FIELDS:
                d.pop(name)
        elif self.stop == "cap":  # an adaptive run from before the "float" rule resumes unchanged
            d.pop("stop")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RewardConfig":
        return cls(**d)


def policy_key(policy, names) -> str:
    """Canonical text of a policy's bits in layer order (the reward cache key)."""
    return ",".join(f"{policy.bits(n).w_bits}/{policy.bits(n).a_bits}" for n in names)


def split_indices(n_train: int, images: int, calib_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint seeded (validation, calibration) index sets of the training split, each sorted."""
    if images + calib_images > n_train:
        raise PolicyError(f"the training split has {n_train} images; the search needs {images} validation + "
                          f"{calib_images} calibration images")
    perm = np.random.default_rng(seed).permutation(n_train)
    return np.sort(perm[:images]), np.sort(perm[images:images + calib_images])


class RewardEvaluator:
    """reward(policy) -> (reward, info), cached by policy. `prepare(cache_dir)` certifies the float model once
    (resumable CertifyLog `float-cert.tsv`) and caches its labels on the IRS noise (`float-irs-labels.npy`)."""

    def __init__(self, lm, train_ds, config: RewardConfig, progress: bool = False, indices=None):
        """indices: explicit (validation, calibration) index arrays of train_ds instead of the seeded split."""

        self.lm, self.cfg, self.progress = lm, config, progress
        self.specs = extract_layer_specs(lm.model, lm.input_shape)
        self.names = [s.name for s in self.specs]
        self.val_idx, self.calib_idx = (split_indices(len(train_ds), config.images, config.calib_images, config.seed)
                                        if indices is None else (np.asarray(indices[0]), np.asarray(indices[1])))
        self.x_val = train_ds.x(self.val_idx)
        self.y_val = train_ds.labels[self.val_idx].astype(np.int64)
        self.x_calib = train_ds.x(self.calib_idx)
        self.cache: dict[str, tuple[float, dict]] = {}
        self.float_certs = None
        self.float_labels = None
        self._float_graph = None  # float ONNX of the BN-folded model: the same for every policy
        self.evaluations = 0  # rewards actually computed (not from the cache)
        self.seconds = 0.0
        self.cache_dir: Path | None = None  # set by prepare()
        self.pool = None  # a `reward_ray.RewardPool` evaluating the images in Ray actors (search --ray)

    # ------------------------------------------------------------ setup

    def float_runner(self):
        """f, in the reward's backend: the float model's ONNX graph in onnxruntime (3-6x torch eager on a CPU for
        the CIFAR ResNets), or torch. Its certificates and IRS labels are computed once per search."""

        if self.cfg.backend == "torch":
            return TorchRunner(self.lm.model, self.lm.input_shape, self.lm.num_classes, batch_size=self.cfg.batch_size)

        graph = float_onnx(self.lm.model, self.lm.input_shape).SerializeToString()
        return OrtRunner(graph, batch_size=self.cfg.batch_size)

    def prepare(self, cache_dir: str | Path) -> dict:
        """Certify f on the validation inputs and cache its IRS-noise labels; returns a summary of f's certificates."""

        cache_dir = Path(cache_dir).resolve()
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = cache_dir
        c = self.cfg
        t0 = time.perf_counter()
        runner = self.float_runner()
        meta = {"model": self.lm.name, "sigma": c.sigma, "n0": c.n0, "n": c.n, "alpha": c.alpha, "seed": c.seed,
                "data": "search-validation", "indices": [int(i) for i in self.val_idx], "float_backend": runner.name}
        if c.kind != "accuracy":
            smooth = Smooth(runner, self.lm.num_classes, c.sigma, batch_size=c.batch_size)
            with CertifyLog(cache_dir / "float-cert.tsv", meta) as log:
                certs = certify_dataset(smooth, self.x_val, self.y_val, range(len(self.val_idx)), c.n0, c.n, c.alpha,
                                        c.seed, log, progress=self.progress)
            self.float_certs = certs
        if c.kind in ("irs", "adaptive"):  # the same file: f's labels on the first n_p samples of the IRS stream
            path = cache_dir / "float-irs-labels.npy"
            if path.exists():
                labels = np.load(path, allow_pickle=False)
                if labels.shape != (len(self.val_idx), c.n_p):
                    raise PolicyError(f"{path} does not match this search's settings (shape {labels.shape})")
            else:
                labels = np.stack([self._labels_on_irs_noise(runner, i) for i in range(len(self.val_idx))])
                with atomic_path(path) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, labels, allow_pickle=False)
            self.float_labels = labels
        out = {"seconds": time.perf_counter() - t0}
        if self.float_certs is not None:
            s = summarize(self.float_certs)
            out |= {"acr": s.acr, "certified_accuracy": s.to_dict()["certified_accuracy"],
                    "clean_accuracy": s.clean_accuracy}
        return out

    def _labels_on_irs_noise(self, runner, i: int) -> np.ndarray:
        return irs_noise_labels(runner, self.x_val[i], self.cfg.n_p, self.cfg.sigma, self.cfg.seed, i,
                                self.cfg.batch_size)

    def irs_needed(self, i: int) -> bool:
        """Whether the IRS reward runs f_q on input i (f certified it correctly)."""

        cert = self.float_certs[i]
        return cert.prediction != ABSTAIN and cert.prediction == self.y_val[i]

    # ------------------------------------------------------------ evaluation

    def quantized_runner(self, policy):

        if self.cfg.backend == "torch":
            qmodel, _ = quantize_calibrated(self.lm, policy, self.x_calib, self.cfg.sigma, self.cfg.seed)
            return TorchRunner(qmodel, self.lm.input_shape, self.lm.num_classes, batch_size=self.cfg.batch_size)
        return OrtRunner(self.quantized_onnx(policy), batch_size=self.cfg.batch_size)

    def quantized_onnx(self, policy) -> bytes:
        """The serialized QDQ ONNX graph of the policy's calibrated model (what onnxruntime runs)."""
        import copy

        qmodel, _ = quantize_calibrated(self.lm, policy, self.x_calib, self.cfg.sigma, self.cfg.seed)
        if self._float_graph is None:
            self._float_graph = float_onnx(qmodel, self.lm.input_shape)
        return insert_qdq(copy.deepcopy(self._float_graph), qmodel).SerializeToString()

    def __call__(self, policy) -> tuple[float, dict]:
        key = policy_key(policy, self.names)
        if key in self.cache:
            reward, info = self.cache[key]
            return reward, info | {"cached": True}
        if self.cfg.kind != "accuracy" and self.float_certs is None:
            raise RuntimeError("call prepare() before evaluating rewards")
        t0 = time.perf_counter()
        if self.pool is not None:  # per-image values from Ray actors (reward_ray), combined below as sequentially
            runner, per_image = None, self.pool.evaluate(self.quantized_onnx(policy))
        else:
            runner, per_image = self.quantized_runner(policy), None
        reward, info = self.score(runner, per_image)
        info["seconds"] = time.perf_counter() - t0
        self.evaluations += 1
        self.seconds += info["seconds"]
        self.cache[key] = (reward, info)
        return reward, info | {"cached": False}

    def score(self, runner, per_image: dict | None = None) -> tuple[float, dict]:
        """This reward kind's (reward, info) of the quantized model `runner` (uncached; after `prepare`)."""
        kinds = {"irs": self._irs, "full": self._full, "accuracy": self._accuracy, "adaptive": self._adaptive}
        return kinds[self.cfg.kind](runner, per_image)

    def remember(self, policy, reward: float, info: dict) -> None:
        """Put a reward computed earlier (a resumed search's log) into the cache."""
        self.cache[policy_key(policy, self.names)] = (float(reward), dict(info))

    def _irs(self, runner, per_image: dict | None = None) -> tuple[float, dict]:
        """per_image: {i: k_i} computed elsewhere (Ray actors); else k_i is computed here with runner."""

        c, radii, ks, samples = self.cfg, [], [], 0
        for i, cert in enumerate(self.float_certs):
            if not self.irs_needed(i):
                radii.append(0.0)
                continue
            k = per_image[i] if per_image is not None else \
                away_from(cert.prediction, self.float_labels[i], self._labels_on_irs_noise(runner, i))
            samples += c.n_p
            ks.append(k)
            pa = cert.pa_lower - cp_upper(k, c.n_p, c.alpha_zeta)
            radii.append(radius(c.sigma, pa) if pa > 0.5 else 0.0)
        acr, info = _acr_info(radii, samples)
        return acr, info | {"mean_disagreement": float(np.mean(ks)) / c.n_p if ks else 0.0}

    def _full(self, runner, per_image: dict | None = None) -> tuple[float, dict]:

        c = self.cfg
        if per_image is not None:
            return _acr_info([per_image[i] for i in range(len(self.val_idx))], len(self.val_idx) * (c.n0 + c.n))
        smooth = Smooth(runner, self.lm.num_classes, c.sigma, batch_size=c.batch_size)
        radii = []
        for i in range(len(self.val_idx)):
            cert = smooth.certify(self.x_val[i], c.n0, c.n, c.alpha, seed=input_seed(c.seed, i),
                                  label=int(self.y_val[i]), idx=i)
            radii.append(cert.radius if cert.correct else 0.0)
        return _acr_info(radii, len(radii) * (c.n0 + c.n))

    def _adaptive(self, runner, per_image: dict | None = None) -> tuple[float, dict]:
        """The adaptive reward (module docstring): per input the float model certified correctly, `adaptive_input`."""
        if per_image is not None:
            raise PolicyError("the adaptive reward runs without Ray actors")
        c, radii, per_input, early, irs_side = self.cfg, [], [], 0, 0
        for i, cert in enumerate(self.float_certs):
            if not self.irs_needed(i):
                radii.append(0.0)
                continue
            got = adaptive_input(runner, self.x_val[i], int(self.y_val[i]), self.float_labels[i], cert.pa_lower, c,
                                 input_seed(c.seed, i))
            radii.append(got["radius"])
            per_input.append(got["samples"])
            early += got["early"]
            irs_side += got["bound"] == "irs"
        acr, info = _acr_info(radii, sum(per_input))
        return acr, info | {"samples_per_input": float(np.mean(per_input)) if per_input else 0.0,
                            "inputs_sampled": len(per_input), "early_stops": early, "irs_bound_inputs": irs_side}

    def _accuracy(self, runner, per_image: dict | None = None) -> tuple[float, dict]:
        if per_image is not None:
            pred = np.array([per_image[i] for i in range(len(self.val_idx))])
        else:
            pred = np.asarray(runner(self.x_val)).argmax(axis=1)
        acc = float(np.mean(pred == self.y_val))
        return acc, {"accuracy": acc, "samples": len(self.x_val)}


def irs_noise_labels(runner, x: np.ndarray, n_p: int, sigma: float, seed: int, i: int, batch_size: int) -> np.ndarray:
    """argmax of runner on x + σε_j, j < n_p, with IRS's noise stream of input i (int16, n_p); x: C×H×W."""

    return zeta_labels(runner, x, sigma, n_p, input_seed(seed, i), batch_size=batch_size).astype(np.int16)


def adaptive_input(runner, x: np.ndarray, label: int, float_labels: np.ndarray, pa_lower: float, cfg: RewardConfig,
                   seed: int) -> dict:
    """One input of the adaptive reward (module docstring): f_q on looks of IRS's noise stream (seed, "irs") up to
    cfg.n_p samples, the direct and IRS confidence sequences, and the stopping rule. float_labels: f's labels on the
    first n_p samples of that stream; pa_lower: f's CERTIFY bound for c = label (with cfg.stop = "float", its radius
    σ·Φ⁻¹(pa_lower) is where rule (c) stops). Returns {"radius", "samples" (f_q
    forward passes made), "looks", "early" (stopped before the cap), "bound" ("direct" or "irs": the larger side)}."""
    direct = look_schedule(cfg.alpha, cfg.n_p, cfg.first_n)
    zeta = look_schedule(cfg.alpha_zeta, cfg.n_p, cfg.first_n)
    last, cap = len(direct.looks) - 1, direct.max_n
    x = np.asarray(x, dtype=np.float32)
    sig = np.float32(cfg.sigma)
    h = k = n = 0
    lo, hi, zeta_hi = 0.0, 1.0, 1.0

    def radius_at(p: float) -> float:
        return radius(cfg.sigma, p) if p > 0.5 else 0.0

    near_float = radius_at(pa_lower) - cfg.tolerance if cfg.stop == "float" else math.inf

    for j, look in enumerate(direct.looks):
        for start in range(n, look, cfg.batch_size):
            stop = min(look, start + cfg.batch_size)
            pred = np.asarray(runner(x[None] + sig * noise_range(x.shape, seed, "irs", start, stop))).argmax(axis=1)
            on_c = float_labels[start:stop] == label
            h += int(np.sum(pred == label))
            k += int(np.sum(on_c & (pred != label)))
        n = look
        lj, uj = direct.bounds(j, h)
        lo, hi, zeta_hi = max(lo, lj), min(hi, uj), min(zeta_hi, zeta.bounds(j, k)[1])
        now = radius_at(max(lo, pa_lower - zeta_hi))
        at_cap = radius_at(max(direct.cap_lower(round(h / n * cap)),
                               pa_lower - zeta.bounds(last, round(k / n * cap))[1]))
        if hi <= 0.5 or at_cap - now <= cfg.tolerance or now >= near_float:
            break
    return {"radius": now, "samples": n, "looks": j + 1, "early": j < last,
            "bound": "irs" if pa_lower - zeta_hi > lo else "direct"}


def _acr_info(radii: list[float], samples: int) -> tuple[float, dict]:
    r = np.asarray(radii, dtype=np.float64)
    acr = float(r.mean()) if len(r) else 0.0
    return acr, {"acr": acr, "cert_acc_0": float(np.mean(r > 0)), "cert_acc_0.25": float(np.mean(r >= 0.25)),
                 "cert_acc_0.5": float(np.mean(r >= 0.5)), "samples": int(samples)}


def save_json_line(path: Path, row: dict) -> None:
    """Append one JSON row and fsync it (the search log is append-only)."""
    import os

    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
