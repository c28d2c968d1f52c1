"""The CUDA backend (GPU servers, Jetson GPUs): TVM's CUDA build (dlight schedules, offline fatbin), TVM's VM on
`tvm.cuda()`, onnxruntime's CUDA/TensorRT providers, NVML energy. Where no GPU is present, opening a runner fails with
one `DeviceUnavailableError` line (the CLI exits 2); building needs no GPU."""

from __future__ import annotations

from pathlib import Path

from arq_deploy.core.artifact import Artifact
from arq_deploy.core.errors import ArqError, DeviceUnavailableError
from arq_deploy.runtime.runners import cuda_driver_present
from arq_deploy.runtime.tvm_runner import TvmRunner
from arq_deploy.targets import tvm_build
from arq_deploy.targets.backends import cpu
from arq_deploy.targets.gpu_build import compile_gpu
from arq_deploy.targets.registry import Target

KIND = "gpu"


def require_gpu(target: Target) -> None:
    """DeviceUnavailableError unless an NVIDIA driver is present (checked without importing TVM or torch)."""
    if not cuda_driver_present():
        raise DeviceUnavailableError(
            f"target {target.name!r} runs on an NVIDIA GPU, and this machine has none (no NVIDIA driver, "
            f"libcuda.so.1): run on a machine with a GPU, or use --target x86")


def build(onnx_path: Path, target: Target, out_dir: Path, *, batch_size: int = tvm_build.DEFAULT_BATCH,
          opt_level: int = 3, single: bool = True, fatbin: str = "auto", schedule: str = "arq",
          tune_trials: int = 0, tuning_db=None, integer: bool = False, int_kernel: str = "auto") -> Path:
    """`gpu_build.compile_gpu`; CPU-only options (tuning, integer lowering) are refused with a clear error."""
    batch_size, _, _ = tvm_build.check_build_options(target, batch_size, schedule, tune_trials, tuning_db, integer,
                                                     int_kernel)
    return compile_gpu(onnx_path, target, out_dir, batch_size=batch_size, opt_level=opt_level, single=single,
                       fatbin=fatbin)


def open_artifact(artifact: Artifact, target: Target):
    """TVM's VM on the local GPU (`tvm.cuda(0)`)."""
    require_gpu(target)

    return TvmRunner(artifact)


def open_onnx(path: Path, target: Target, batch_size: int | None = None):
    """onnxruntime with the CUDA (or TensorRT) provider; refuses to fall back to the CPU silently."""
    require_gpu(target)
    runner = cpu.open_onnx(path, target, batch_size)
    if set(runner.providers) <= {"CPUExecutionProvider"}:
        raise ArqError(f"target {target.name!r} needs a GPU, but onnxruntime fell back to the CPU here "
                       f"(its GPU providers did not load: a CUDA/TensorRT library is missing)")
    return runner


def energy_probe(target: Target, name: str | None = None):
    return cpu.energy_probe(target, name)
