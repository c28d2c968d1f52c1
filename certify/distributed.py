"""Certification over a Ray cluster: the inputs of a `certify_dataset` run, shared out among Ray actors.

Each actor ("worker") builds its own `Runner` from a small picklable *runner spec* (the driver never ships a model),
wraps it in a `Smooth`, and certifies one input per call. The driver keeps about `inflight` calls queued per worker,
takes results as they finish (`ray.wait`), appends each to the `CertifyLog` at once and gives that worker the next
index, so a slow worker never stalls the others.

Input i is certified with seed `input_seed(seed, i)` and the noise does not depend on the batch size or on what ran
before, so the certificates equal those of the sequential `certify_dataset` (all fields but `seconds`), however the
inputs are spread over workers, and an interrupted run resumes from its log with no input lost or repeated.

Runner specs (plain dicts):
    {"kind": "onnxruntime", "path": "model.onnx", "batch_size": 500, "providers": [...]}   (providers optional)
    {"kind": "tvm", "artifact": "runs/NAME/targets/x86"}                 (the artifact's hashes are checked on load)
The paths must be readable on every node of the cluster, and every node needs this package installed.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import socket
from pathlib import Path
from typing import Sequence

import numpy as np

from arq_deploy.certify.results import CertifyLog, _accuracy_text, _check_run_matches_meta, _progress
from arq_deploy.certify.smooth import Certificate, Smooth
from arq_deploy.core.errors import ArqError, CertificationInputError, UnknownNameError
from arq_deploy.core.validation import check_params
from arq_deploy.runtime.noise import input_seed
from arq_deploy.runtime.tvm_runner import TvmRunner

CONNECT_TIMEOUT_S = 5.0
START_TIMEOUT_S = 180.0  # for the workers to start and load their runners
RUNNER_KINDS = ("onnxruntime", "tvm")


class RayConnectionError(ArqError):
    """A Ray cluster address that cannot be reached, or Ray that cannot be started."""


class WorkerError(ArqError):
    """A Ray worker died or failed outside the certification itself (the rows already written are kept)."""


# ---------------------------------------------------------------------------------------------------- runner specs
def runner_spec(model_path: str | os.PathLike, backend: str = "auto", batch_size: int = 500) -> dict:
    """The spec of the Runner `make_runner(model_path, backend)` would build: a directory is a TVM artifact, a file
    an ONNX model. Paths are made absolute (workers may run in another directory)."""
    p = Path(model_path).resolve()
    if backend == "auto":
        backend = "tvm" if p.is_dir() else "onnxruntime"
    if backend == "onnxruntime":
        return {"kind": "onnxruntime", "path": str(p), "batch_size": int(batch_size)}
    if backend == "tvm":
        return {"kind": "tvm", "artifact": str(p)}
    if backend == "torch":
        raise ArqError("distributed certification runs an ONNX model or a TVM artifact, not the torch backend: "
                       "export the model first (arq-deploy export)")
    raise UnknownNameError(f"unknown backend {backend!r}; known for distributed certification: auto, "
                           f"{', '.join(RUNNER_KINDS)}")


def check_runner_spec(spec) -> dict:
    """Validate a runner spec on the driver (before any worker starts) and return a plain copy of it."""
    if not isinstance(spec, dict) or spec.get("kind") not in RUNNER_KINDS:
        raise UnknownNameError(f"a runner spec is a dict with 'kind' in {list(RUNNER_KINDS)}, got {spec!r}")
    key = "path" if spec["kind"] == "onnxruntime" else "artifact"
    if not isinstance(spec.get(key), (str, os.PathLike)):
        raise ArqError(f"a {spec['kind']!r} runner spec needs {key!r} (a path), got {spec!r}")
    return {**spec, key: str(spec[key])}


def build_runner(spec: dict, threads: int | None = None, use_gpu: bool = False):
    """Build the Runner a spec describes, with `threads` CPU threads (its share of the node's cores).

    Without `use_gpu`, onnxruntime runs on the CPU EP unless the spec names its providers.
    """
    spec = check_runner_spec(spec)
    if spec["kind"] == "onnxruntime":
        from arq_deploy.runtime.runners import OrtRunner

        providers = spec.get("providers") or (None if use_gpu else ["CPUExecutionProvider"])
        return OrtRunner(spec["path"], batch_size=int(spec.get("batch_size", 500)), providers=providers,
                         threads=threads)

    return TvmRunner(spec["artifact"], threads=threads)


# -------------------------------------------------------------------------------------------------------- the actor
class _Worker:
    """Holds one Runner and its Smooth; certifies one input per call. Wrapped with `ray.remote` at run time."""

    def __init__(self, spec: dict, num_classes: int, sigma: float, batch_size: int, threads: int, use_gpu: bool):
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()
        self.error: Exception | None = None
        try:
            self.smooth = Smooth(build_runner(spec, threads, use_gpu), num_classes, sigma, batch_size=batch_size)
        except Exception as e:  # reported by ready(), so the driver sees the real error, not a dead actor
            self.error = e

    def ready(self) -> tuple[str, tuple[int, ...]]:
        """(node id, model input shape), or the error that building the runner raised."""
        if self.error is not None:
            raise self.error
        return self.node_id, self.smooth.input_shape

    def certify(self, x: np.ndarray, n0: int, n: int, alpha: float, seed: int, label: int, idx: int):
        return self.smooth.certify(x, n0, n, alpha, seed=seed, label=label, idx=idx), self.node_id


# ------------------------------------------------------------------------------------------------- connecting to Ray
def _parse_host_port(address: str) -> tuple[str, int]:
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayConnectionError(f"Ray address {address!r} is not 'auto', 'local' or HOST:PORT")
    return host.strip("[]"), int(port)


def _check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    host, port = _parse_host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise RayConnectionError(f"cannot reach a Ray cluster at {address}: {reason} (after at most {timeout:g} s); "
                                 "check the address, or use --ray local") from None


def check_address(address: str) -> None:
    """RayConnectionError now, before any file is written, when `address` (or RAY_ADDRESS for "auto") names a
    cluster that cannot be reached; "local" always works."""
    if not isinstance(address, str) or not address.strip():
        raise RayConnectionError(f"Ray address must be 'auto', 'local' or HOST:PORT, got {address!r}")
    address = address.strip()
    if address == "auto":
        _existing_cluster()
    elif address != "local":
        _check_reachable(address)


def _existing_cluster() -> str | None:
    """RAY_ADDRESS, else the address of the last cluster `ray start` began on this machine, if it still answers."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env:
        if env in ("auto", "local"):
            return None if env == "local" else _recorded_cluster()
        _check_reachable(env)  # the user asked for it: an unreachable one is an error
        return env
    return _recorded_cluster()


def _recorded_cluster() -> str | None:
    try:
        from ray._private.utils import read_ray_address

        addr = read_ray_address(None)
    except Exception:  # a private helper that may move between Ray versions
        return None
    if not addr:
        return None
    try:
        _check_reachable(addr, timeout=1.0)
    except RayConnectionError:
        return None  # a stale record of a cluster that is gone
    return addr


def _quiet_init(ray, **kwargs) -> None:
    kwargs.setdefault("logging_level", logging.ERROR)
    kwargs.setdefault("log_to_driver", False)
    ray.init(**kwargs)


def connect(address: str = "auto", num_cpus: int | None = None) -> bool:
    """Connect this process to Ray; return True when it started the connection (and so should shut it down).

    address: "local" starts a new local instance with `num_cpus` CPUs (default: all); "auto" connects to an existing
    cluster (RAY_ADDRESS, or one `ray start` began on this machine) and otherwise starts a local one; HOST:PORT (or
    ray://HOST:PORT) connects there, after checking within CONNECT_TIMEOUT_S that something listens. A process
    already connected to Ray keeps that connection (and this returns False).
    """
    import ray

    if ray.is_initialized():
        return False
    if not isinstance(address, str) or not address.strip():
        raise RayConnectionError(f"Ray address must be 'auto', 'local' or HOST:PORT, got {address!r}")
    address = address.strip()
    target = None
    if address == "auto":
        target = _existing_cluster()
    elif address != "local":
        _check_reachable(address)
        target = address
    try:
        if target is None:
            _quiet_init(ray, address="local", num_cpus=num_cpus, include_dashboard=False)
        else:
            _quiet_init(ray, address=target)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {target}" if target else "a local Ray instance"
        msg = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise RayConnectionError(f"cannot start or join {where}: {msg}") from None
    return True


# ---------------------------------------------------------------------------------------------------- the driver
def _check_smoothing(sigma, num_classes) -> float:
    if not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma <= 0:
        raise CertificationInputError(f"sigma (noise level) must be a finite number > 0, got {sigma!r}")
    if not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise CertificationInputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return float(sigma)


def _worker_count(ray, num_workers: int | None, cpus_per_worker: int) -> int:
    if num_workers is not None:
        if not isinstance(num_workers, numbers.Integral) or num_workers < 1:
            raise ArqError(f"num_workers must be an integer >= 1, got {num_workers!r}")
        return int(num_workers)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    return max(1, cpus // cpus_per_worker)


def _unwrap(e: Exception) -> Exception:
    """The ArqError a worker raised (so the CLI prints its one line), else a WorkerError naming what happened."""
    import ray

    cause = getattr(e, "cause", None)
    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(cause, ArqError):
        return cause
    first = next((ln for ln in str(cause or e).splitlines() if ln.strip()), type(e).__name__)
    return WorkerError(f"a Ray worker failed: {first} (the rows already in the log are kept; rerun to resume)")


def certify_dataset_ray(runner_spec: dict, x_all: np.ndarray, labels: Sequence[int], indices: Sequence[int], n0: int,
                        n: int, alpha: float, seed: int, sigma: float, num_classes: int, log: CertifyLog,
                        address: str = "auto", batch_size: int = 500, progress: bool = True,
                        num_workers: int | None = None, cpus_per_worker: int = 1, gpus_per_worker: float = 0,
                        inflight: int = 2, num_cpus: int | None = None,
                        node_of: dict[int, str] | None = None) -> list[Certificate]:
    """`certify_dataset` with the inputs shared among Ray actors; the same certificates (all fields but `seconds`).

    runner_spec: see the module docstring (`runner_spec()` makes one from a model path). Certifies x_all[i] (float32
    C×H×W in [0, 1], label labels[i]) for each i in `indices` not yet in `log`, appending each row as soon as its
    result reaches the driver; returns the certificates of all `indices` (old and new), sorted by index.
    address: "auto" | "local" | HOST:PORT (see `connect`); num_cpus: CPUs of a local instance started here.
    num_workers: actors to start (default: the cluster's CPUs // cpus_per_worker); each reserves `cpus_per_worker`
    CPUs (its runtime's thread count) and `gpus_per_worker` GPUs; `inflight` calls are queued per actor.
    node_of: if given, filled with {idx: Ray node id of the worker that certified it} for the inputs computed here.
    Ray is shut down on return only if this call started it; the actors are always ended.
    """
    spec = check_runner_spec(runner_spec)
    n0, n, alpha = check_params(n0, n, alpha)
    sigma = _check_smoothing(sigma, num_classes)
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise CertificationInputError(f"seed must be an integer, got {seed!r}")
    if not isinstance(cpus_per_worker, numbers.Integral) or cpus_per_worker < 1:
        raise ArqError(f"cpus_per_worker must be an integer >= 1, got {cpus_per_worker!r}")
    if not isinstance(inflight, numbers.Integral) or inflight < 1:
        raise ArqError(f"inflight must be an integer >= 1, got {inflight!r}")
    _check_run_matches_meta(log.meta, sigma=sigma, n0=n0, n=n, alpha=alpha, seed=seed)
    wanted = sorted({int(i) for i in indices})
    size = min(len(x_all), len(labels))
    if wanted and not (0 <= wanted[0] and wanted[-1] < size):
        raise CertificationInputError(f"indices must lie in [0, {size}), got {wanted[0]}..{wanted[-1]}")
    wanted_set = set(wanted)
    done = {c.idx: c for c in log.certificates() if c.idx in wanted_set}
    todo = [i for i in wanted if i not in done]
    if todo:
        _run(spec, x_all, labels, todo, n0, n, alpha, int(seed), sigma, int(num_classes), log, done, address,
             batch_size, progress, num_workers, int(cpus_per_worker), gpus_per_worker, int(inflight), num_cpus,
             node_of, total=len(wanted))
    return [done[i] for i in wanted]


def _run(spec, x_all, labels, todo, n0, n, alpha, seed, sigma, num_classes, log, done, address, batch_size, progress,
         num_workers, cpus_per_worker, gpus_per_worker, inflight, num_cpus, node_of, total) -> None:
    import ray

    started = connect(address, num_cpus=num_cpus)
    actors = []
    try:
        count = min(_worker_count(ray, num_workers, cpus_per_worker), len(todo))
        remote = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(_Worker)
        actors = [remote.remote(spec, num_classes, sigma, batch_size, cpus_per_worker, gpus_per_worker > 0)
                  for _ in range(count)]
        try:
            shapes = {shape for _, shape in ray.get([a.ready.remote() for a in actors], timeout=START_TIMEOUT_S)}
        except ray.exceptions.GetTimeoutError:
            cpus = ray.cluster_resources().get("CPU", 0)
            raise WorkerError(f"{count} Ray workers of {cpus_per_worker} CPU(s) did not all start within "
                              f"{START_TIMEOUT_S:g} s (the cluster has {cpus:g} CPUs); ask for fewer workers") from None
        except ray.exceptions.RayError as e:
            raise _unwrap(e) from None
        data_shape = tuple(np.shape(x_all)[1:])
        if shapes != {data_shape}:
            raise ArqError(f"data images are {data_shape}, the model expects {sorted(shapes)[0]}")
        _feed(ray, actors, x_all, labels, todo, n0, n, alpha, seed, log, done, progress, inflight, node_of, total)
    finally:
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # the connection or the node may be gone already
                pass
        if started:
            ray.shutdown()


def _feed(ray, actors, x_all, labels, todo, n0, n, alpha, seed, log, done, progress, inflight, node_of, total):
    """Keep `inflight` calls queued per actor; append each result to the log as it arrives."""
    queue = iter(todo)
    pending: dict = {}  # ObjectRef -> actor

    def submit(actor) -> None:
        i = next(queue, None)
        if i is not None:
            x = np.ascontiguousarray(x_all[i], dtype=np.float32)
            ref = actor.certify.remote(x, n0, n, alpha, input_seed(seed, i), int(labels[i]), i)
            pending[ref] = actor

    for _ in range(inflight):
        for a in actors:
            submit(a)
    with _progress(progress) as bar:
        task = bar.add_task("certify", total=total, completed=len(done), acc=_accuracy_text(done))
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ready[0])
            try:
                cert, node = ray.get(ready[0])
            except ray.exceptions.RayError as e:
                raise _unwrap(e) from None
            log.append(cert)
            done[cert.idx] = cert
            if node_of is not None:
                node_of[cert.idx] = node
            bar.update(task, advance=1, acc=_accuracy_text(done))
            submit(actor)
