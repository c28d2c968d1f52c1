"""Where a model runs: one backend module per target kind, each with the same functions, chosen from the target.

    compile_onnx(onnx_path, target, out_dir, ...) -> artifact directory   (the kind's TVM build)
    open_runner(model, target, remote, backend) -> (Runner, Target)         (the one way to get a Runner for a model)
    probe_for(target, remote, name) -> EnergyProbe
    bench_artifact(path, target, remote, ...) -> dict                      (what `arq-deploy bench` writes)

Backend modules (`cpu`, `gpu`) define `KIND`, `build(onnx_path, target, out_dir, **options)`,
`open_artifact(artifact, target, backend)`, `open_onnx(path, target, batch_size)` and `energy_probe(target, name)`.
A model is an ONNX file (onnxruntime) or a compiled artifact directory (TVM); `--remote HOST:PORT` runs an artifact
on a board's TVM RPC server, and backend "torch" runs a loaded torch model (`torch_model`, a `LoadedModel`).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from arq_deploy.core.artifact import load_artifact
from arq_deploy.core.errors import ArqError, UnknownNameError
from arq_deploy.runtime.runners import TorchRunner
from arq_deploy.targets.backends import cpu, gpu
from arq_deploy.targets.bench import bench
from arq_deploy.targets.energy import NoProbe, get_probe
from arq_deploy.targets.registry import Target, get_target
from arq_deploy.targets.tvm_build import DEFAULT_BATCH

BACKENDS = {cpu.KIND: cpu, gpu.KIND: gpu}
RUNTIMES = ("auto", "onnxruntime", "tvm", "qemu", "torch")


def backend_for(target: Target):
    """The backend module of a target's kind."""
    try:
        return BACKENDS[target.kind]
    except KeyError:
        raise UnknownNameError(f"target {target.name!r} has kind {target.kind!r}; known kinds: "
                               f"{', '.join(BACKENDS)}") from None


def _target(target: str | Target | None, default: str | None = None) -> Target | None:
    if isinstance(target, Target):
        return target
    name = target or default
    return get_target(name) if name else None


def compile_onnx(onnx_path: str | os.PathLike, target: str | Target = "x86", out_dir: str | os.PathLike | None = None,
                 *, batch_size: int = DEFAULT_BATCH, **options) -> Path:
    """Compile an ONNX classifier into an artifact directory with the backend of the target's kind.

    out_dir defaults to <onnx dir>/targets/<target name>; options are the backend's (`tvm_build.compile_onnx` for
    CPU targets: schedule, tune_trials, tuning_db, integer, int_kernel, single, opt_level; `gpu_build.compile_gpu`
    for GPU targets: single, opt_level). Returns out_dir."""
    t = _target(target)
    onnx_path = Path(onnx_path)
    out_dir = Path(out_dir) if out_dir is not None else onnx_path.parent / "targets" / t.name
    return backend_for(t).build(onnx_path, t, out_dir, batch_size=batch_size, **options)


def runs_here(target: Target) -> bool:
    """Whether this machine's CPU architecture is the target's host architecture."""
    arch = target.host_triple.split("-")[0].lower()
    aliases = {"x86_64": {"x86_64", "amd64"}, "aarch64": {"aarch64", "arm64"}}
    return platform.machine().lower() in aliases.get(arch, {arch})


def open_runner(model: str | os.PathLike | None, target: str | Target | None = None, remote: str | None = None,
                backend: str = "auto", batch_size: int | None = None, torch_model=None):
    """(runner, target) for a model on a target.

    model: an .onnx file (onnxruntime with the target's providers), an artifact directory (TVM, locally or over RPC
    on `remote` HOST:PORT; backend "qemu" runs an aarch64 artifact under qemu-user here), or None with backend
    "torch" and `torch_model` (a LoadedModel). target defaults to the artifact's own target, or x86 for an ONNX file.
    """
    if backend not in RUNTIMES:
        raise UnknownNameError(f"unknown backend {backend!r}; known: {', '.join(RUNTIMES)}")
    t = _target(target)  # unknown names fail before anything loads
    if backend == "torch" or (backend == "auto" and model is None):
        return _torch_runner(torch_model, t, remote, batch_size)
    p = Path(model)
    if not p.exists():
        raise ArqError(f"{p} does not exist: give an .onnx model or a compiled artifact directory")
    if p.is_dir():
        if backend == "onnxruntime":
            raise ArqError(f"{p} is a compiled TVM artifact: backend 'onnxruntime' runs .onnx files")
        art = load_artifact(p)
        t = t or get_target(art.target_name)
        if art.target_name != t.name:
            raise ArqError(f"{p} was compiled for target {art.target_name!r}, not {t.name!r}: compile it "
                           f"with --target {t.name}, or drop --target")
        if remote:
            from arq_deploy.runtime.rpc_runner import RpcTvmRunner, parse_address

            parse_address(remote)
            return RpcTvmRunner(art, remote), t
        if backend == "qemu":
            from arq_deploy.runtime.qemu import QemuRunner

            return QemuRunner(art), t
        if not runs_here(t):
            raise ArqError(f"{p} was compiled for {t.name!r} ({t.host_triple}) and cannot run on this "
                           f"{platform.machine()} machine: run it on the device with --remote HOST:PORT, or here "
                           f"under qemu-user with --backend qemu (set up with `make aarch64-env`)")
        return backend_for(t).open_artifact(art, t), t
    if backend in ("tvm", "qemu"):
        raise ArqError(f"backend {backend!r} runs compiled artifacts: compile the model first "
                       f"(arq-deploy compile {p} --target {(t.name if t else 'x86')} --out DIR)")
    t = t or get_target("x86")
    if remote:
        raise ArqError("--remote runs compiled TVM artifacts: compile the model first "
                       f"(arq-deploy compile {p} --target {t.name} --out DIR)")
    if not runs_here(t):
        raise ArqError(f"an ONNX model runs here with onnxruntime, but target {t.name!r} is another machine "
                       f"({t.host_triple}): compile it for {t.name} and use --remote HOST:PORT")
    return backend_for(t).open_onnx(p, t, batch_size), t


def _torch_runner(lm, t: Target | None, remote: str | None, batch_size: int | None):

    if lm is None:
        raise ArqError("the torch backend needs --model/--weights")
    if remote:
        raise ArqError("--remote runs compiled TVM artifacts, not a torch model: export and compile it first")
    t = t or get_target("x86")
    device = "cuda" if t.kind == "gpu" else "cpu"
    if device == "cuda":
        gpu.require_gpu(t)
    return TorchRunner(lm.model, lm.input_shape, lm.num_classes, device=device, batch_size=batch_size or 256), t


def probe_for(target: Target, remote: str | None = None, name: str | None = None):
    """The energy probe for a target (or `name`); a remote run cannot be read by this machine's sensors."""
    name = name or getattr(target, "energy_probe", "none") or "none"
    if remote:
        return NoProbe(f"the model runs on the remote device {remote} and the {name!r} probe reads this machine's "
                       f"sensors: run `arq-deploy bench` on the device itself to measure energy")
    return backend_for(target).energy_probe(target, name)


def bench_artifact(path: str | os.PathLike, target: str | None = None, remote: str | None = None,
                   batch_large: int = 256, repeats: int = 50, warmup: int = 5, probe: str | None = None,
                   backend: str = "auto", **kwargs) -> dict:
    """`bench` of an ONNX file or artifact directory on a target (see `open_runner`, `probe_for`)."""
    for what, v, lo in (("--batch", batch_large, 1), ("--repeats", repeats, 1), ("--warmup", warmup, 0)):
        if v < lo:
            raise ArqError(f"{what} must be >= {lo}, got {v}")
    if probe is not None:
        get_probe(probe)  # unknown names fail before anything loads
    runner, t = open_runner(path, target, remote, backend)
    result = bench(runner, batch_large, repeats, warmup, probe_for(t, remote, probe), **kwargs)
    extra = {"model": str(path), "target": t.name, "remote": remote}
    if hasattr(runner, "providers"):
        extra["providers"] = list(runner.providers)
    return {**extra, **result}
