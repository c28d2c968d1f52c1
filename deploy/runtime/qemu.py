"""Run cross-compiled aarch64 artifacts on an x86-64 machine under qemu-user, to check them before a board is at hand.

    with QemuWorker() as w:                      # one emulated aarch64 Python with TVM's runtime imported (~15-40 s)
        logits = QemuRunner("r20-rpi4/", worker=w)(x)   # x: float32 N×C×H×W in [0, 1] -> N×K logits

The environment (`make aarch64-env`, in `.aarch64/` of the repository, or wherever $ARQ_AARCH64_ENV points):
  * `qemu-aarch64-static` (Debian's qemu-user-static) on PATH: it runs aarch64 Linux programs on this CPU, with the
    aarch64 system files taken from `root/` (`-L root`);
  * `root/`: Debian's arm64 Python and the libraries it needs (libc, libstdc++, ...), unpacked from .debs;
  * `site/`: the aarch64 wheels of apache-tvm (+ the pinned apache-tvm-ffi) and numpy;
  * `.ready-v1`: written last, so a half-built environment is never used.

The aarch64 side (`qemu_worker.py`) loads TVM's runtime only (TVM_USE_RUNTIME_LIB=1, as on a device) and each
library with `tvm.runtime.load_module` + the Relax VM; batches travel as .npy files. Every library is checked against
the artifact's sha256 before it is loaded; an integer build's bit-packed weights (`weights.bin`) are checked and
unpacked here and handed to the worker once, as an .npz, to pass after the input on every call. Emulation is slow (tens of times slower than native), so this checks
correctness, never speed: timings taken under qemu say nothing about a real board.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arq_deploy.core.artifact import Artifact, load_artifact
from arq_deploy.core.errors import ArqError, ArtifactIntegrityError
from arq_deploy.core.weights import read_artifact_weights
from arq_deploy.runtime.runners import SamplingMixin, _batched, check_input

ENV_VAR = "ARQ_AARCH64_ENV"
READY = ".ready-v1"
QEMU = "qemu-aarch64-static"
WORKER = Path(__file__).with_name("qemu_worker.py")
START_TIMEOUT_S = 600.0  # `import tvm` under emulation takes 15-40 s on 2 loaded cores


class QemuEnvError(ArqError):
    """The aarch64-under-qemu environment is missing or incomplete."""


def default_env_dir() -> Path:
    """$ARQ_AARCH64_ENV, else `.aarch64/` in the repository that holds this package (an editable install)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return Path(__file__).resolve().parents[2] / ".aarch64"  # deploy/runtime/qemu.py -> the repository


@dataclass(frozen=True)
class AArch64Env:
    """A ready environment: the qemu binary, the aarch64 system root, its Python and the aarch64 wheels."""

    qemu: str
    root: Path
    python: Path
    site: Path

    def command(self, *args: str) -> list[str]:
        return [self.qemu, "-L", str(self.root), str(self.python), "-s", "-B", "-u", *args]

    def environ(self, threads: int) -> dict[str, str]:
        """The host environment minus Python/virtualenv settings, plus the aarch64 site and TVM's runtime-only mode."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "QEMU_", "TVM_"))}
        env.update(PYTHONPATH=str(self.site), PYTHONNOUSERSITE="1", TVM_USE_RUNTIME_LIB="1",
                   TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS="1")
        return env


def find_env(path: str | os.PathLike | None = None) -> AArch64Env:
    """The environment at `path` (default: `default_env_dir()`); QemuEnvError saying how to set it up otherwise."""
    d = Path(path) if path is not None else default_env_dir()
    fix = f"run `make aarch64-env` in the repository (or point ${ENV_VAR} at a ready environment)"
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise QemuEnvError(f"{QEMU} is not installed (Debian: apt-get install qemu-user-static): {fix}")
    if not (d / READY).is_file():
        raise QemuEnvError(f"no aarch64 environment at {d} ({READY} missing): {fix}")
    pythons = sorted((d / "root" / "usr" / "bin").glob("python3.[0-9]*"))
    pythons = [p for p in pythons if p.name.replace("python3.", "").isdigit()]
    if not pythons or not (d / "site" / "tvm").is_dir():
        raise QemuEnvError(f"the aarch64 environment at {d} lacks Python or TVM: {fix}")
    return AArch64Env(qemu=qemu, root=d / "root", python=pythons[-1], site=d / "site")


class QemuWorker:
    """One aarch64 Python under qemu-user serving load/run requests (see `qemu_worker.py`); use as a context
    manager or call `close()`. Several runners may share one worker (TVM is imported once)."""

    def __init__(self, env: AArch64Env | None = None, threads: int | None = None):
        self.env = env or find_env()
        self.threads = int(threads or os.cpu_count() or 1)
        self._dir = Path(tempfile.mkdtemp(prefix="arq-qemu-"))
        self._stderr = open(self._dir / "stderr.txt", "w+b")  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen(self.env.command(str(WORKER)), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr, env=self.env.environ(self.threads), text=True,
                                      cwd=self._dir)
        self._ids = itertools.count()
        self._finalizer = weakref.finalize(self, _shutdown, self._proc, self._stderr, self._dir)
        self.info = self._reply(START_TIMEOUT_S)

    def __enter__(self) -> QemuWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Ask the worker to quit, then remove its temporary files (idempotent)."""
        self._finalizer()

    def load(self, library: Path, sha256: str, params: list[np.ndarray] | None = None) -> int:
        """Load a library after checking its bytes against `sha256`; returns the handle for `run`. params: the
        tensors `main` takes after its input (an artifact's unpacked external weights), passed on every run."""
        data = Path(library).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ArtifactIntegrityError(f"{library} does not match its sha256 in the manifest (modified or corrupt)")
        k = next(self._ids)
        private = self._dir / f"lib{k}-{Path(library).name}"  # a private copy: the bytes checked are the bytes loaded
        private.write_bytes(data)
        req = {"op": "load", "id": k, "path": str(private)}
        if params:
            req["params"] = str(self._dir / f"params{k}.npz")
            np.savez(req["params"], *[np.ascontiguousarray(a) for a in params])
        self._request(req, f"cannot load {library} under qemu")
        return k

    def run(self, handle: int, x: np.ndarray) -> tuple[np.ndarray, float]:
        """(main(x), seconds the call took inside the emulated process) for a loaded library."""
        xin, yout = self._dir / "x.npy", self._dir / "y.npy"
        np.save(xin, np.ascontiguousarray(x, np.float32))
        rep = self._request({"op": "run", "id": handle, "in": str(xin), "out": str(yout)}, "running under qemu failed")
        return np.load(yout), float(rep["seconds"])

    def _request(self, req: dict, what: str) -> dict:
        if self._proc.poll() is not None:
            raise ArqError(f"{what}: the qemu worker has exited ({self._stderr_tail()})")
        self._proc.stdin.write(json.dumps(req) + "\n")
        self._proc.stdin.flush()
        rep = self._reply(None)
        if not rep.get("ok"):
            raise ArqError(f"{what}: {rep.get('error')}")
        return rep

    def _reply(self, timeout: float | None) -> dict:
        """The next `@arq` line of the worker (other output is ignored); ArqError when it dies (or, with a timeout,
        is killed for not answering in time) first."""
        timer = threading.Timer(timeout, self._proc.kill) if timeout else None
        if timer:
            timer.daemon = True
            timer.start()
        try:
            while True:
                line = self._proc.stdout.readline()
                if not line:
                    self._proc.wait(timeout=30)
                    late = f"no answer within {timeout:.0f} s; " if timer and not timer.is_alive() else ""
                    raise ArqError(f"the aarch64 Python under qemu exited ({late}code {self._proc.returncode}): "
                                   f"{self._stderr_tail()}")
                if line.startswith("@arq "):
                    return json.loads(line[5:])
        finally:
            if timer:
                timer.cancel()

    def _stderr_tail(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        lines = [ln for ln in self._stderr.read().decode(errors="replace").splitlines() if ln.strip()]
        return " | ".join(lines[-3:])[-600:] or "no output"


def _shutdown(proc: subprocess.Popen, stderr, tmp: Path) -> None:
    with contextlib.suppress(Exception):
        if proc.poll() is None:
            proc.stdin.write('{"op": "quit"}\n')
            proc.stdin.flush()
            proc.wait(timeout=30)
    with contextlib.suppress(Exception):
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    for f in (proc.stdin, proc.stdout, stderr):
        with contextlib.suppress(Exception):
            f.close()
    shutil.rmtree(tmp, ignore_errors=True)


class QemuRunner(SamplingMixin):
    """x: float32 N×C×H×W in [0, 1] -> float32 logits N×K, by an aarch64 artifact's library under qemu-user.

    The interface of `arq_deploy.runtime.tvm_runner.TvmRunner` (batches of the compiled size, the last one zero-padded).
    `worker`: a shared `QemuWorker` (default: a new one, closed by `close()`). `seconds`: time spent inside the
    emulated library (not a device timing).
    """

    def __init__(self, artifact: str | Path | Artifact, worker: QemuWorker | None = None):
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        target = self.artifact.manifest["target"]
        arch = str(target.get("host_triple") or "").split("-")[0]
        if target.get("kind", "cpu") != "cpu" or self.artifact.tvm_target.get("kind") != "llvm":
            raise ArqError(f"artifact {self.artifact.path} is a {target.get('kind')} artifact: only CPU (llvm) "
                           f"artifacts run under qemu (there is no GPU to emulate)")
        if arch != "aarch64":
            raise ArqError(f"artifact {self.artifact.path} was compiled for {arch or 'an unknown CPU'}, not aarch64: "
                           f"run it with TvmRunner")
        self.name = "tvm-qemu-aarch64"
        self.input_shape = self.artifact.input_shape
        self.num_classes = self.artifact.num_classes
        self.batch_size = self.artifact.batch_size
        self._own = worker is None
        self.worker = worker or QemuWorker()
        rel = self.artifact.library_path.relative_to(self.artifact.path).as_posix()
        self._handle = self.worker.load(self.artifact.library_path, self.artifact.files[rel],
                                        read_artifact_weights(self.artifact))
        self.seconds = 0.0

    def close(self) -> None:
        if self._own:
            self.worker.close()

    def __enter__(self) -> QemuRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, xb: np.ndarray) -> np.ndarray:
        n = len(xb)
        if n != self.batch_size:
            xb = np.concatenate([xb, np.zeros((self.batch_size - n, *xb.shape[1:]), np.float32)])
        y, s = self.worker.run(self._handle, xb)
        self.seconds += s
        return y[:n]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return _batched(self._run, check_input(x, self.input_shape), self.batch_size, self.num_classes)
