"""Compilation targets as data: name -> TVM target dict, host triple, cross compiler, runtimes, energy probe.

A `Target` is plain data (TVM's JSON target form, like TVM's tags). Values that depend on the machine that builds
(`HOST`: the host CPU name, its feature flags, its core count) are filled in by `resolve_tvm_target` at build time,
so importing this module imports neither TVM nor anything heavy.

Registered: `x86` (this machine), `x86-avx2` (an AVX2 CPU without AVX-512, runnable here), `cuda` (a generic NVIDIA GPU on an x86-64 host, sm_80; `cuda-smNN` names the
same target for another architecture, e.g. `cuda-sm75`, `cuda-sm90`), `jetson-nano` (sm_53 + Cortex-A57),
`jetson-orin-nano` (sm_87 + Cortex-A78AE), `rpi4` (Cortex-A72), `rpi5` (Cortex-A76 with the dot-product
instructions). ARM hosts are cross-compiled with `aarch64-linux-gnu-gcc` (Debian: gcc-aarch64-linux-gnu).

Registering twice raises; `get_target` names the known targets when it fails.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from arq_deploy.core.errors import ArqError, UnknownNameError
from arq_deploy.core.host import host_cores

HOST = "host"
"""Placeholder for a value of the build machine: `mcpu` (LLVM's host CPU name), `mattr` (the host's feature flags that
differ from that CPU's defaults, e.g. ones a hypervisor masks) and `num-cores` (all cores of the machine)."""

KINDS = ("cpu", "gpu")


@dataclass(frozen=True)
class Target:
    """One deployment target.

    tvm_target: TVM's JSON target dict, e.g. {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"};
        values equal to `HOST` are resolved on the build machine (see `resolve_tvm_target`).
    host_triple: the triple of the machine that runs the compiled library.
    cross_compiler: the C compiler `export_library` links with (None: the host's default compiler).
    ort_providers: onnxruntime execution providers to try on this target, best first.
    energy_probe: name of the energy probe that measures joules on this target ("rapl", "nvml", "ina3221",
        "vcgencmd", or "none").
    kind: "cpu" or "gpu" (a GPU target's tvm_target is TVM's CUDA dict, with its CPU in `host`).
    cross_package: the Debian package that provides `cross_compiler` (named in the error when it is missing).
    energy_note: why there is no probe (with energy_probe "none"), or what the probe reads.
    """

    name: str
    description: str
    tvm_target: Mapping[str, Any] = field(hash=False)
    host_triple: str
    cross_compiler: str | None = None
    ort_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    energy_probe: str = "none"
    kind: str = "cpu"
    cross_package: str | None = None
    energy_note: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"target {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if "kind" not in self.tvm_target:
            raise ValueError(f"target {self.name!r}: tvm_target needs a 'kind' key (llvm, cuda, ...)")
        object.__setattr__(self, "tvm_target", dict(self.tvm_target))
        object.__setattr__(self, "ort_providers", tuple(self.ort_providers))

    @property
    def is_host(self) -> bool:
        """True when the compiled library runs on the build machine (no cross compiler)."""
        return self.cross_compiler is None

    @property
    def host_arch(self) -> str:
        """The CPU architecture of the machine that runs the library: 'x86_64', 'aarch64', ..."""
        return self.host_triple.split("-")[0]

    @property
    def cuda_arch(self) -> str | None:
        """The GPU architecture ('sm_87') of a GPU target, else None."""
        return self.tvm_target.get("arch") if self.kind == "gpu" else None

    def to_json(self) -> dict:
        return {"name": self.name, "description": self.description, "tvm_target": dict(self.tvm_target),
                "host_triple": self.host_triple, "cross_compiler": self.cross_compiler,
                "ort_providers": list(self.ort_providers), "energy_probe": self.energy_probe, "kind": self.kind,
                "cross_package": self.cross_package, "energy_note": self.energy_note}


_REGISTRY: dict[str, Target] = {}


def register(target: Target | Callable[[], Target]) -> Any:
    """Add a target to the registry; raises ValueError when the name is taken.

    Use it as a call, `register(Target(...))`, which returns the target, or as a decorator on a zero-argument
    function returning a `Target`, which returns the function unchanged.
    """
    t = target() if callable(target) and not isinstance(target, Target) else target
    if not isinstance(t, Target):
        raise TypeError(f"register() takes a Target or a function returning one, got {type(t).__name__}")
    if t.name in _REGISTRY:
        raise ValueError(f"target {t.name!r} is already registered")
    _REGISTRY[t.name] = t
    return target


_CUDA_ARCH_NAME = re.compile(r"cuda-sm_?(\d{2,3}[a-z]?)")


def get_target(name: str) -> Target:
    """The registered target called `name`, or `cuda-smNN` (the `cuda` target for GPU architecture sm_NN);
    UnknownNameError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        m = _CUDA_ARCH_NAME.fullmatch(name) if isinstance(name, str) else None
        if m and "cuda" in _REGISTRY:
            return with_cuda_arch(_REGISTRY["cuda"], f"sm_{m.group(1)}", name=name)
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise UnknownNameError(f"unknown target {name!r}; known targets: {known} (and cuda-smNN for a GPU "
                               f"architecture, e.g. cuda-sm75)") from None


def with_cuda_arch(target: Target, arch: str, name: str | None = None) -> Target:
    """A copy of a GPU target compiled for another architecture `arch` ('sm_75'); `name` defaults to NAME-smNN."""
    if target.kind != "gpu":
        raise ArqError(f"target {target.name!r} is not a GPU target: it has no CUDA architecture to change")
    if not re.fullmatch(r"sm_\d{2,3}[a-z]?", arch):
        raise ArqError(f"CUDA architecture must look like sm_87, got {arch!r}")
    tvm_target = {**target.tvm_target, "arch": arch}
    desc = re.sub(r"sm_\d{2,3}[a-z]?", arch, target.description)
    return replace(target, name=name or f"{target.name}-{arch.replace('_', '')}", description=desc,
                   tvm_target=tvm_target)


def list_targets() -> list[Target]:
    """All registered targets, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def resolve_tvm_target(target: Target | str) -> dict:
    """The target's TVM dict with every `HOST` value filled in from this machine (imports TVM).

    mcpu -> LLVM's host CPU name (`tvm.target.codegen.llvm_get_system_cpu`); mattr -> the host's feature flags that
    differ from that CPU's defaults (LLVM's host feature query: '+f' on the host but not in the CPU model, '-f' in
    the model but masked here, e.g. by a hypervisor); num-cores -> all cores.
    """
    t = get_target(target) if isinstance(target, str) else target
    out = dict(t.tvm_target)
    needs_host = [k for k, v in out.items() if isinstance(v, str) and v == HOST]
    if not needs_host:
        return out
    if not t.is_host:
        raise ArqError(f"target {t.name!r} is cross-compiled but asks for host values for {needs_host}")
    machine = platform.machine().lower()
    arch = t.host_triple.split("-")[0]
    if machine not in (arch, "amd64" if arch == "x86_64" else arch):
        raise ArqError(f"target {t.name!r} is this machine's {arch} CPU, but this machine is {machine}: "
                       f"pick a cross-compiling target instead")
    for key in needs_host:
        if key == "mcpu":
            out[key] = _host_cpu()
        elif key == "mattr":
            out[key] = _host_mattr(out)
        elif key == "num-cores":
            out[key] = host_cores()
        else:
            raise ArqError(f"target {t.name!r}: no way to resolve {key!r} from the host")
    if not out.get("mattr", True):
        del out["mattr"]
    return out


def _host_cpu() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def _host_mattr(partial: dict) -> list[str]:
    import tvm
    from tvm.target import codegen

    host = {str(k): bool(v) for k, v in tvm.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")().items()}
    mcpu = partial.get("mcpu")
    if mcpu in (None, HOST):
        mcpu = _host_cpu()
    probe = {k: v for k, v in partial.items() if k in ("kind", "mtriple")}
    default = {str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target({**probe, "mcpu": mcpu}))}
    plus = sorted(f"+{f}" for f, on in host.items() if on and f not in default)
    minus = sorted(f"-{f}" for f, on in host.items() if not on and f in default)
    return plus + minus


register(Target(
    name="x86",
    description="this machine's x86-64 CPU (LLVM host CPU and features, all cores), TVM + onnxruntime CPU",
    tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": HOST, "mattr": HOST, "num-cores": HOST},
    host_triple="x86_64-linux-gnu",
    cross_compiler=None,
    ort_providers=("CPUExecutionProvider",),
    energy_probe="rapl",
    kind="cpu",
))

register(Target(
    name="x86-avx2",
    description="an x86-64 CPU with AVX2 and no AVX-512 (LLVM x86-64-v3: Haswell, Zen 1-3 and later; all cores of "
                "this machine), built here and run here when this CPU has AVX2, e.g. to measure the AVX2 kernels",
    tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3", "num-cores": HOST},
    host_triple="x86_64-linux-gnu",
    cross_compiler=None,
    ort_providers=("CPUExecutionProvider",),
    energy_probe="rapl",
    kind="cpu",
))

# --------------------------------------------------------------------------------------------------------------------
# GPU and ARM targets. Values from the boards' data sheets (CPU cores, CUDA compute capability, per-block limits).

AARCH64 = "aarch64-linux-gnu"
AARCH64_CC, AARCH64_CC_PACKAGE = "aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"
GPU_ORT = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _arm_cpu(mcpu: str, cores: int, mattr: tuple[str, ...] = ()) -> dict:
    """TVM's llvm dict for an aarch64 Linux CPU (NEON: 4 float32 lanes)."""
    d = {"kind": "llvm", "mtriple": AARCH64, "mcpu": mcpu, "num-cores": cores}
    return {**d, "mattr": list(mattr)} if mattr else d


def _cuda(arch: str, host: dict, registers_per_block: int = 65536) -> dict:
    """TVM's cuda dict: 1024 threads per block, 48 KiB static shared memory per block, 32-thread warps."""
    return {"kind": "cuda", "arch": arch, "max_num_threads": 1024, "max_threads_per_block": 1024,
            "thread_warp_size": 32, "max_shared_memory_per_block": 49152, "registers_per_block": registers_per_block,
            "host": host}


register(Target(
    name="cuda",
    description="a generic NVIDIA GPU (sm_80; cuda-smNN for another architecture) on an x86-64 host",
    tvm_target=_cuda("sm_80", {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}),
    host_triple="x86_64-linux-gnu",
    cross_compiler=None,
    ort_providers=GPU_ORT,
    energy_probe="nvml",
    energy_note="NVML's total-energy counter of the GPU (the board only, not the host CPU)",
    kind="gpu",
))

register(Target(
    name="jetson-nano",
    description="NVIDIA Jetson Nano: Maxwell GPU sm_53, 4× Cortex-A57 host",
    tvm_target=_cuda("sm_53", _arm_cpu("cortex-a57", 4), registers_per_block=32768),
    host_triple=AARCH64,
    cross_compiler=AARCH64_CC,
    cross_package=AARCH64_CC_PACKAGE,
    ort_providers=GPU_ORT,
    energy_probe="ina3221",
    energy_note="the module's INA3221 rails (total input power) sampled from sysfs",
    kind="gpu",
))

register(Target(
    name="jetson-orin-nano",
    description="NVIDIA Jetson Orin Nano: Ampere GPU sm_87, 6× Cortex-A78AE host",
    tvm_target=_cuda("sm_87", _arm_cpu("cortex-a78ae", 6)),
    host_triple=AARCH64,
    cross_compiler=AARCH64_CC,
    cross_package=AARCH64_CC_PACKAGE,
    ort_providers=GPU_ORT,
    energy_probe="ina3221",
    energy_note="the module's INA3221 rails (total input power) sampled from sysfs",
    kind="gpu",
))

register(Target(
    name="rpi4",
    description="Raspberry Pi 4 Model B: 4× Cortex-A72 (aarch64, NEON), onnxruntime CPU",
    tvm_target=_arm_cpu("cortex-a72", 4),
    host_triple=AARCH64,
    cross_compiler=AARCH64_CC,
    cross_package=AARCH64_CC_PACKAGE,
    ort_providers=("CPUExecutionProvider",),
    energy_probe="none",
    energy_note="the Raspberry Pi 4 has no power sensor that software can read: measure with an external USB-C "
                "power meter",
    kind="cpu",
))

register(Target(
    name="rpi5",
    description="Raspberry Pi 5: 4× Cortex-A76 (aarch64, NEON + dot product), onnxruntime CPU",
    tvm_target=_arm_cpu("cortex-a76", 4, ("+neon", "+dotprod")),
    host_triple=AARCH64,
    cross_compiler=AARCH64_CC,
    cross_package=AARCH64_CC_PACKAGE,
    ort_providers=("CPUExecutionProvider",),
    energy_probe="vcgencmd",
    energy_note="the PMIC's rail currents and voltages (`vcgencmd pmic_read_adc`)",
    kind="cpu",
))


def cpu_only(gpu: Target) -> Target:
    """The CPU of a GPU board as a target of its own (`NAME-cpu`): its host llvm dict, onnxruntime on the CPU."""
    host = dict(gpu.tvm_target.get("host") or {})
    if gpu.kind != "gpu" or host.get("kind") != "llvm":
        raise ArqError(f"target {gpu.name!r} has no llvm host CPU to build for")
    return replace(gpu, name=f"{gpu.name}-cpu", description=f"the CPU of the {gpu.description.split(':')[0]} "
                   f"({host.get('mcpu', 'generic')}), without the GPU", tvm_target=host,
                   ort_providers=("CPUExecutionProvider",), kind="cpu")


register(cpu_only(get_target("jetson-nano")))
register(cpu_only(get_target("jetson-orin-nano")))


def summary(t: Target) -> dict[str, str]:
    """The fields `arq-deploy targets` shows: name, kind, device, host triple, cross compiler, runtimes, energy."""
    tt = t.tvm_target
    cpu = tt.get("host", tt) if t.kind == "gpu" else tt
    mcpu = cpu.get("mcpu", t.host_arch)
    mcpu = "this CPU" if mcpu == HOST else mcpu
    mattr = [a for a in cpu.get("mattr", []) if a != HOST] if isinstance(cpu.get("mattr"), list) else []
    dev = f"{tt['arch']} + {mcpu}" if t.kind == "gpu" else mcpu
    providers = ",".join(p.replace("ExecutionProvider", "") for p in t.ort_providers)
    energy = t.energy_probe if t.energy_probe != "none" else f"none ({t.energy_note})" if t.energy_note else "none"
    return {"name": t.name, "kind": t.kind, "device": dev + (" " + " ".join(mattr) if mattr else ""),
            "host": t.host_triple, "cross_compiler": t.cross_compiler or "-", "onnxruntime": providers,
            "energy": energy}
