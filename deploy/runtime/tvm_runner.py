"""A Runner over a compiled TVM artifact (see `arq_deploy.targets.tvm_build` and `arq_deploy.core.artifact`)."""

from __future__ import annotations

import os
import tempfile
import threading
import uuid
from pathlib import Path

import numpy as np

from arq_deploy.core.artifact import Artifact, load_artifact
from arq_deploy.core.errors import ArqError, DeviceUnavailableError
from arq_deploy.core.host import cpu_model_and_flags, machine_arch
from arq_deploy.runtime.runners import CompiledRunner, _batched, check_input

# runtime.config_threadpool affinity mode: worker threads may run on any of the given cores (no pinning).
_SHARE_ALL_CORES = -3


def available_cores() -> list[int]:
    """The cores this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def require_native(artifact: Artifact) -> None:
    """ArqError when the artifact's library was compiled for another CPU architecture than this machine's, or uses
    SIMD features this CPU lacks (manifest target.cpu_features against /proc/cpuinfo): an AVX-512 VNNI build on an
    AVX2-only CPU would otherwise die of an illegal instruction in the middle of a run."""
    arch = str(artifact.manifest["target"].get("host_triple") or "").split("-")[0]
    here = machine_arch()
    if arch and arch != here:
        raise ArqError(f"artifact {artifact.path} was cross-compiled for {arch} ({artifact.target_name!r}) and cannot "
                       f"run on this {here} machine: run it on the device (--remote HOST:PORT), or here under "
                       f"qemu-user with arq_deploy.runtime.qemu.QemuRunner (set up with `make aarch64-env`)")
    needed = artifact.manifest["target"].get("cpu_features") or []
    _, have = cpu_model_and_flags()
    missing = [f for f in needed if f not in have]
    if missing and have:  # no flags at all: /proc/cpuinfo unreadable, nothing to compare with
        raise ArqError(f"artifact {artifact.path} was built for a CPU with {', '.join(missing)} "
                       f"({artifact.target_name!r}, mcpu {artifact.tvm_target.get('mcpu', 'generic')}), which this "
                       f"CPU lacks: rebuild it here (--target x86, or x86-avx2 for any AVX2 CPU)")


class TvmRunner(CompiledRunner):
    """x: float32 N×C×H×W in [0, 1] -> float32 logits N×K, on a verified artifact's library with TVM's Relax VM.

    The library's `main` has a fixed batch (the artifact's batch_size): inputs are cut into batches of that size and
    the last partial batch is zero-padded, unless it has at most `single_max` images and the artifact has a batch-1
    library (`library_b1`), which then runs them one by one (single-image latency without a padded batch).

    `threads` (default: every core this process may use) sets TVM's CPU thread pool. TVM's own default is half the
    logical cores on x86 (it assumes hyper-threading: one thread on a 2-core VM) and it pins the calling thread to
    core 0; this runner asks for all cores without pinning, per calling thread (TVM's pool is thread-local).
    """

    def __init__(self, artifact: str | Path | Artifact, threads: int | None = None, single_max: int | None = None):
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        kind = self.artifact.manifest["target"].get("kind", "cpu")
        tvm_kind = self.artifact.tvm_target.get("kind", "llvm")
        if (kind, tvm_kind) not in (("cpu", "llvm"), ("gpu", "cuda")):
            raise ArqError(f"artifact {self.artifact.path} was built for {self.artifact.target_name!r} ({tvm_kind}); "
                           f"TvmRunner runs CPU (llvm) and CUDA artifacts")
        require_native(self.artifact)
        import tvm

        self.device = "cuda" if tvm_kind == "cuda" else "cpu"
        dev = tvm.cuda(0) if self.device == "cuda" else tvm.cpu()
        if not dev.exist:
            raise DeviceUnavailableError(f"artifact {self.artifact.path} runs on a CUDA GPU, and TVM finds none here")

        self.name = "tvm"
        self.input_shape = self.artifact.input_shape
        self.num_classes = self.artifact.num_classes
        self.batch_size = self.artifact.batch_size
        cores = available_cores()
        self.threads = int(threads) if threads else len(cores)
        self._cores = [str(c) for c in cores]
        self._configured: set[int] = set()
        self._tvm = tvm
        self._dev = dev
        self._load_libraries(single_max)

    def _load_vm(self, path: Path, data: bytes):
        """Load a library from a private copy of its verified bytes.

        The copy has a fresh name, because dlopen returns the library already loaded under the same path: a library
        rebuilt in place would otherwise silently run the old code. Loading the checked bytes also closes the gap
        between `load_artifact`'s check and loading.
        """
        from tvm import relax

        with tempfile.TemporaryDirectory(prefix="arq-tvm-") as d:
            private = Path(d) / f"{uuid.uuid4().hex}-{path.name}"
            private.write_bytes(data)
            try:
                return relax.VirtualMachine(self._tvm.runtime.load_module(str(private)), self._dev)
            except Exception as e:  # a library for another CPU/ABI, missing symbols, ...
                msg = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
                raise ArqError(f"cannot load {path} on this machine: {msg}") from None

    def _configure_threads(self) -> None:
        tid = threading.get_ident()
        if self.device == "cpu" and tid not in self._configured:
            self._tvm.get_global_func("runtime.config_threadpool")(_SHARE_ALL_CORES, self.threads, self._cores)
            self._configured.add(tid)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = check_input(x, self.input_shape)
        self._configure_threads()
        return _batched(self._run, x, self.batch_size, self.num_classes)

    def _before_counts(self) -> None:
        self._configure_threads()
