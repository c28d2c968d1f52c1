"""Compilation targets as data: name -> TVM target dict, host triple, cross compiler, runtimes, energy probe.

A `Target` is plain data (TVM's JSON target form, like TVM's tags). Values that depend on the machine that builds
(`HOST`: the host CPU name, its feature flags, its core count) are filled in by `resolve_tvm_target` at build time,
so importing this module imports neither TVM nor anything heavy.

Registering twice raises; `get_target` names the known targets when it fails.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from arq_deploy.errors import ArqError, UnknownNameError

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
    energy_probe: name of the energy probe that measures joules on this target ("rapl", "tegrastats", "none", ...).
    kind: "cpu" or "gpu".
    """

    name: str
    description: str
    tvm_target: Mapping[str, Any] = field(hash=False)
    host_triple: str
    cross_compiler: str | None = None
    ort_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    energy_probe: str = "none"
    kind: str = "cpu"

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

    def to_json(self) -> dict:
        return {"name": self.name, "description": self.description, "tvm_target": dict(self.tvm_target),
                "host_triple": self.host_triple, "cross_compiler": self.cross_compiler,
                "ort_providers": list(self.ort_providers), "energy_probe": self.energy_probe, "kind": self.kind}


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


def get_target(name: str) -> Target:
    """The registered target called `name`; UnknownNameError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise UnknownNameError(f"unknown target {name!r}; known targets: {known}") from None


def list_targets() -> list[Target]:
    """All registered targets, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def host_cores() -> int:
    """All cores of this machine (os.cpu_count)."""
    return os.cpu_count() or 1


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
