"""`search --ray`: one reward's validation images evaluated in parallel by Ray actors.

Why inside one reward. The DDPG agent is sequential: episode e's actions depend on the rewards of episodes < e, so
whole episodes cannot run side by side (only the warm-up and random-search episodes could, a small part of a
default 200-episode search). A reward, however, is a sum over validation images: the IRS reward is
ACR = (1/m)·Σ_i R_i with R_i depending only on image i (its float certificate, its float labels on the IRS noise
and k_i, the quantized model's disagreements away from f's class on that noise); "full" certifies each image on its
own and "accuracy" averages per-image hits. So every reward of every episode is split by image:

  driver:  quantize + calibrate + export the policy's QDQ ONNX graph once (as the sequential reward does) and send
           its bytes to every actor;
  actor j: holds a fixed, balanced share of the images (x, label, float labels loaded from the cache file
           `float-irs-labels.npy` itself, at start), builds an onnxruntime session from the bytes and returns its
           images' per-image values (k_i, radius_i or prediction_i);
  driver:  puts the values in image order and computes the reward exactly as the sequential code does.

Image i's noise comes from the counter-based stream keyed by (seed, i, purpose), batched per image as in the
sequential code, so the per-image values, and hence the rewards, equal a sequential run's (tested). The driver's
part (quantization, calibration, export; about half of a digits reward, less for larger validation sets) stays
sequential: the speed-up is bounded by Amdahl's law.
"""

from __future__ import annotations

import numpy as np

from arq_deploy.certify.distributed import RayConnectionError, _check_reachable, connect
from arq_deploy.certify.incremental import away_from
from arq_deploy.certify.smooth import Smooth
from arq_deploy.core.errors import ArqError
from arq_deploy.runtime.noise import input_seed
from arq_deploy.runtime.runners import OrtRunner
from arq_deploy.search.reward import RewardConfig, irs_noise_labels

START_TIMEOUT_S = 180.0


class _ShardWorker:
    """One actor: a share `idx` of the validation images; `evaluate(onnx bytes)` -> {i: per-image value}."""

    def __init__(self, cfg: dict, idx: list[int], x: np.ndarray, y: np.ndarray, work: list[bool],
                 labels_path: str | None, num_classes: int, threads: int):

        self.cfg = RewardConfig.from_dict(cfg)
        self.idx, self.x, self.y, self.work = list(idx), x, y, list(work)
        self.num_classes, self.threads = int(num_classes), int(threads)
        self.labels = np.load(labels_path, allow_pickle=False)[self.idx] if labels_path else None

    def ready(self) -> int:
        return len(self.idx)

    def evaluate(self, onnx_bytes: bytes) -> dict:

        runner = OrtRunner(onnx_bytes, batch_size=self.cfg.batch_size, providers=["CPUExecutionProvider"],
                           threads=self.threads)
        return {"irs": self._irs, "full": self._full, "accuracy": self._accuracy}[self.cfg.kind](runner)

    def _irs(self, runner) -> dict:

        c, out = self.cfg, {}
        for j, i in enumerate(self.idx):
            if self.work[j]:
                got = irs_noise_labels(runner, self.x[j], c.n_p, c.sigma, c.seed, i, c.batch_size)
                # work[j]: f certified image j correctly, so its c_A is the label y[j]
                out[i] = away_from(int(self.y[j]), self.labels[j], got)
        return out

    def _full(self, runner) -> dict:

        c = self.cfg
        smooth = Smooth(runner, self.num_classes, c.sigma, batch_size=c.batch_size)
        out = {}
        for j, i in enumerate(self.idx):
            cert = smooth.certify(self.x[j], c.n0, c.n, c.alpha, seed=input_seed(c.seed, i), label=int(self.y[j]),
                                  idx=i)
            out[i] = cert.radius if cert.correct else 0.0
        return out

    def _accuracy(self, runner) -> dict:
        if not self.idx:
            return {}
        pred = np.asarray(runner(self.x)).argmax(axis=1)
        return {i: int(p) for i, p in zip(self.idx, pred)}


class RewardPool:
    """Ray actors sharing a `RewardEvaluator`'s images. `connect()` (before any expensive work: a bad address fails
    at once), `start(evaluator)` (after `evaluator.prepare`), then the evaluator calls `evaluate`; `close()` ends
    the actors, and Ray if this pool started it."""

    def __init__(self, address: str, num_workers: int | None = None, num_cpus: int | None = None):
        if num_workers is not None and (isinstance(num_workers, bool) or int(num_workers) < 1):
            raise ArqError(f"--ray-workers must be >= 1, got {num_workers}")
        self.address, self.num_workers, self.num_cpus = address, num_workers, num_cpus
        self.started, self.actors = False, []

    def check(self) -> "RewardPool":
        """RayConnectionError now when the address is malformed or nothing listens there (no connection made)."""

        if not isinstance(self.address, str) or not self.address.strip():
            raise RayConnectionError(f"--ray must be 'auto', 'local' or HOST:PORT, got {self.address!r}")
        if self.address.strip() not in ("auto", "local"):
            _check_reachable(self.address.strip())
        return self

    def connect(self) -> "RewardPool":

        self.started = connect(self.address, num_cpus=self.num_cpus)
        return self

    def start(self, ev) -> "RewardPool":
        """Start the actors with balanced shares of ev's images and attach the pool to ev."""
        import ray

        if ev.cfg.backend != "onnxruntime":
            raise ArqError("--ray evaluates rewards with onnxruntime (the deployed QDQ graph), not the torch backend")
        m = len(ev.val_idx)
        if ev.cfg.kind == "irs":  # only images the float model certified correctly cost work
            work = [ev.irs_needed(i) for i in range(m)]
        else:
            work = [True] * m
        order = [i for i in range(m) if work[i]] + [i for i in range(m) if not work[i]]
        count = self.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        count = max(1, min(count, sum(work) or 1))
        shares = [sorted(order[j::count]) for j in range(count)]
        labels = str(ev.cache_dir / "float-irs-labels.npy") if ev.cfg.kind == "irs" else None
        remote = ray.remote(num_cpus=1)(_ShardWorker)
        self.actors = [remote.remote(ev.cfg.to_dict(), s, ev.x_val[s], ev.y_val[s], [work[i] for i in s], labels,
                                     ev.lm.num_classes, 1) for s in shares]
        try:
            ray.get([a.ready.remote() for a in self.actors], timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise ArqError(f"{count} Ray actors did not start within {START_TIMEOUT_S:g} s; ask for fewer "
                           f"(--ray-workers)") from None
        except ray.exceptions.RayError as e:
            raise _worker_error(e) from None
        ev.pool = self
        return self

    def evaluate(self, onnx_bytes: bytes) -> dict:
        """{image position: value} over all images, from every actor's share."""
        import ray

        ref = ray.put(onnx_bytes)
        try:
            parts = ray.get([a.evaluate.remote(ref) for a in self.actors])
        except ray.exceptions.RayError as e:
            raise _worker_error(e) from None
        out = {}
        for p in parts:
            out.update(p)
        return out

    def close(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # the node may be gone
                pass
        self.actors = []
        if self.started and ray.is_initialized():
            ray.shutdown()
        self.started = False


def _worker_error(e) -> ArqError:
    cause = getattr(e, "cause", None)
    if isinstance(cause, ArqError):
        return cause
    first = next((ln for ln in str(cause or e).splitlines() if ln.strip()), type(e).__name__)
    return ArqError(f"a Ray reward worker failed: {first} (episodes already logged are kept; rerun to resume)")
