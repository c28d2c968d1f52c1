"""Facts about this machine: its CPU architecture, cores, ISA flags and a summary recorded beside every measurement."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine_arch() -> str:
    """This machine's CPU architecture as a triple's first part: 'x86_64', 'aarch64', ..."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def host_cores() -> int:
    """All cores of this machine (os.cpu_count)."""
    return os.cpu_count() or 1


# the SIMD features that decide the kernels: LLVM's name (what a compiled library may use) -> the /proc/cpuinfo flag
LLVM_FEATURES = {"avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl",
                 "avx512vnni": "avx512_vnni", "avx512vbmi": "avx512vbmi", "avx512vpopcntdq": "avx512_vpopcntdq",
                 "avxvnni": "avx_vnni", "neon": "asimd", "dotprod": "asimddp", "i8mm": "i8mm", "sve": "sve"}
SIMD_FLAGS = tuple(LLVM_FEATURES.values())


def cpu_model_and_flags() -> tuple[str | None, list[str]]:
    """The CPU's model name and the ISA flags (of SIMD_FLAGS) that decide the kernels, from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, []
    model, flags = None, set()
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model") and model is None:
            model = val.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(val.split())
    return model, [f for f in SIMD_FLAGS if f in flags]


def host_info() -> dict:
    """This machine as recorded beside a measurement: architecture, CPU model, ISA flags, cores, load, Python."""
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    model, flags = cpu_model_and_flags()
    return {"machine": platform.machine(), "processor": platform.processor() or None, "cpu_model": model,
            "isa_flags": flags, "system": platform.system(), "cpus": os.cpu_count(), "load_average": load,
            "python": platform.python_version()}
