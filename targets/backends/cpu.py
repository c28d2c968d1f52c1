"""The CPU backend (x86-64 hosts, Raspberry Pi and Jetson CPUs): TVM's LLVM build, TVM's VM on the CPU, onnxruntime's
CPU provider, the target's energy probe (RAPL, INA3221, vcgencmd)."""

from __future__ import annotations

from pathlib import Path

from arq_deploy.core.artifact import Artifact
from arq_deploy.core.errors import ArqError
from arq_deploy.runtime.runners import OrtRunner, cuda_driver_present
from arq_deploy.runtime.tvm_runner import TvmRunner
from arq_deploy.targets import tvm_build
from arq_deploy.targets.energy import NoProbe, get_probe
from arq_deploy.targets.registry import Target

KIND = "cpu"
NVIDIA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")  # listed by onnxruntime-gpu without a GPU


def build(onnx_path: Path, target: Target, out_dir: Path, **options) -> Path:
    """`tvm_build.compile_onnx` (schedules, integer lowering, tuning, cross-linking)."""
    return tvm_build.compile_onnx(onnx_path, target, out_dir, **options)


def open_artifact(artifact: Artifact, target: Target):
    """TVM's VM on this machine's CPU."""
    return TvmRunner(artifact)


def ort_providers(target: Target) -> list[str]:
    """The target's onnxruntime providers that work here, best first; ArqError where none of them does."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    use = [p for p in target.ort_providers
           if p in available and (p not in NVIDIA_PROVIDERS or cuda_driver_present())]
    if target.kind == "gpu":
        use = [p for p in use if p != "CPUExecutionProvider"]
    if not use:
        raise ArqError(f"target {target.name!r} runs onnxruntime with {list(target.ort_providers)}, and no "
                       f"{'GPU ' if target.kind == 'gpu' else ''}provider of these works here "
                       f"(available: {sorted(available)}; a CUDA provider also needs an NVIDIA driver)")
    return use


def open_onnx(path: Path, target: Target, batch_size: int | None = None):
    """onnxruntime with the target's providers."""
    kwargs = {"batch_size": batch_size} if batch_size else {}
    return OrtRunner(path, providers=ort_providers(target), **kwargs)


def energy_probe(target: Target, name: str | None = None):
    name = name or target.energy_probe or "none"
    return NoProbe(f"target {target.name!r} has no energy probe") if name == "none" else get_probe(name)
