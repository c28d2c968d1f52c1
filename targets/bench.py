"""Latency, throughput, peak memory and energy of a Runner (wall clock, after warm-up).

    measure(runner, batch, repeats, warmup) -> Timing       one batch size: percentiles of per-call wall time
    bench(runner, batch_large=256, ...) -> dict             the whole benchmark (what `arq-deploy bench` writes)
    bench_artifact(path, target, ...) -> dict               an ONNX file (onnxruntime) or a TVM artifact directory

Latency is measured at batch 1 (p50/p90/p99 over `repeats` calls), throughput at `batch_large` (images / median
call time). Peak memory is the process's resident-set high-water mark during the benchmark minus its resident set
before it. Energy, where the target's probe can read its sensor (`arq_deploy.targets.energy`), is the energy of
repeated large-batch calls divided by the images they processed, with the machine's idle power measured just before
so the increase over idle is reported too; elsewhere it is "not available: <reason>".
"""

from __future__ import annotations

import datetime as _dt
import platform
import re
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from arq_deploy.core.errors import ArqError
from arq_deploy.core.host import host_info
from arq_deploy.targets.energy import EnergyProbe, NoProbe, get_probe

BENCH_FORMAT = "arq-deploy/bench"
BENCH_VERSION = 1


@dataclass(frozen=True)
class Timing:
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    images_per_s: float
    mean_ms: float = float("nan")
    min_ms: float = float("nan")
    repeats: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def measure(runner, batch: int = 1, repeats: int = 50, warmup: int = 5, seed: int = 0) -> Timing:
    """Time `repeats` calls of runner on a batch×C×H×W uniform batch; percentiles of per-call wall time.

    images_per_s = batch / median call time."""
    x = np.random.default_rng(seed).random((batch, *runner.input_shape), dtype=np.float32)
    for _ in range(warmup):
        runner(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        runner(x)
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1e3
    return Timing(batch, float(np.percentile(ms, 50)), float(np.percentile(ms, 90)), float(np.percentile(ms, 99)),
                  float(batch / np.median(times)), float(ms.mean()), float(ms.min()), int(repeats))


# --------------------------------------------------------------------------------------------------------------------
# Peak memory

def _proc_status_kb(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Resident-set high-water mark of this process over a block: `start()`, then `result()`.

    On Linux the kernel's VmHWM is reset at start, so the peak is that of the block alone; elsewhere it falls back
    to getrusage's ru_maxrss, the peak over the process's whole life (then a delta of 0 means the block stayed
    below an earlier peak)."""

    def start(self) -> None:
        self.rss0_kb = _proc_status_kb("VmRSS")
        self.exact = self.rss0_kb is not None and _reset_peak_rss()
        self.maxrss0_kb = _maxrss_kb()

    def result(self) -> dict:
        if self.exact:
            peak, method = _proc_status_kb("VmHWM"), "VmHWM reset through /proc/self/clear_refs at the start"
        else:
            peak, method = _maxrss_kb(), "getrusage ru_maxrss (the process's lifetime peak)"
        rss0 = self.rss0_kb if self.rss0_kb is not None else self.maxrss0_kb
        return {"rss_before_mb": _mb(rss0), "peak_rss_mb": _mb(peak),
                "peak_increase_mb": _mb(max(0, peak - rss0)) if peak is not None and rss0 is not None else None,
                "method": method}


def _maxrss_kb() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if platform.system() == "Darwin" else r  # bytes on macOS, kB on Linux


def _mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 2)


_MEMORY_SCOPE = {
    "onnxruntime": "this process's resident memory: onnxruntime's CPU arena (intermediate tensors, kept between "
                   "runs), the input batch and the outputs; memory on a GPU (CUDA provider) is not included",
    "tvm": "this process's resident memory: the Relax VM's pooled allocator (intermediate tensors, allocated on "
           "the first call and kept), the input batch and the outputs; the library itself was loaded before",
    "tvm-rpc": "this (client) process only: the model runs on the remote device, whose memory is not measured",
    "torch": "this process's resident memory: torch's CPU allocator, inputs and outputs",
}


# --------------------------------------------------------------------------------------------------------------------
# Energy

def measure_energy(runner, probe, batch: int, min_seconds: float = 2.0, idle_seconds: float = 1.0,
                   seed: int = 0) -> dict:
    """Joules per inference of `runner` at `batch`, read by an EnergyProbe.

    First the idle power P_idle over `idle_seconds` of sleep, then E over n ≥ 1 calls lasting ≥ `min_seconds`:
    J/inference = E / (n·batch); above idle: (E − P_idle·t) / (n·batch). The probe reads the whole machine (or GPU,
    or module): other work at the same time is counted too. Returns {"available": False, "reason"} where the probe
    cannot read its sensor.
    """
    ok, why = probe.available()
    if not ok:
        return {"probe": probe.name, "available": False, "reason": why}
    x = np.random.default_rng(seed).random((batch, *runner.input_shape), dtype=np.float32)
    runner(x)
    with probe.measure() as idle:
        time.sleep(idle_seconds)
    calls = 0
    with probe.measure() as run:
        t_end = time.perf_counter() + min_seconds
        while calls == 0 or time.perf_counter() < t_end:
            runner(x)
            calls += 1
    images = calls * batch
    if not run.joules > 0:
        return {"probe": probe.name, "available": False,
                "reason": f"the {probe.name} sensor read {run.joules:g} J over {run.seconds:.2f} s "
                          f"(a counter that does not advance)"}
    idle_w = idle.watts
    return {"probe": probe.name, "available": True, "joules": run.joules, "seconds": run.seconds, "images": images,
            "batch": batch, "joules_per_inference": run.joules / images, "mean_watts": run.watts,
            "idle_watts": idle_w, "above_idle_joules_per_inference": (run.joules - idle_w * run.seconds) / images,
            "samples": run.samples, "scope": getattr(probe, "description", "")}


# --------------------------------------------------------------------------------------------------------------------
# The benchmark

def bench(runner, batch_large: int = 256, repeats: int = 50, warmup: int = 5, probe=None, *,
          large_repeats: int | None = None, energy_seconds: float = 2.0, idle_seconds: float = 1.0,
          seed: int = 0) -> dict:
    """Benchmark a Runner: warm-up, latency p50/p90/p99 at batch 1 (`repeats` calls), throughput at `batch_large`
    (`large_repeats` calls, default max(3, repeats // 5)), peak memory, and joules per inference.

    probe: an EnergyProbe, a probe name, or None (no probe). Returns a JSON-ready dict; its
    `energy_j_per_inference` is a positive number or the string "not available: <reason>".
    """

    for what, v, lo in (("batch_large", batch_large, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ArqError(f"{what} must be an integer >= {lo}, got {v!r}")
    if probe is None:
        probe = NoProbe("no energy probe was given")
    elif not isinstance(probe, EnergyProbe):
        probe = get_probe(str(probe))
    large_repeats = large_repeats or max(3, repeats // 5)
    mem = PeakMemory()
    mem.start()
    latency = measure(runner, 1, repeats, warmup, seed)
    throughput = measure(runner, batch_large, large_repeats, max(1, warmup // 2), seed)
    memory = {**mem.result(), "measures": _MEMORY_SCOPE.get(runner.name, "this process's resident memory")}
    energy = measure_energy(runner, probe, batch_large, energy_seconds, idle_seconds, seed)
    per_inf = energy["joules_per_inference"] if energy["available"] else f"not available: {energy['reason']}"
    return {
        "format": BENCH_FORMAT, "format_version": BENCH_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "runner": runner.name, "input_shape": list(runner.input_shape), "num_classes": runner.num_classes,
        "runner_batch": getattr(runner, "batch_size", None), "warmup": warmup,
        "latency": latency.to_dict(), "throughput": throughput.to_dict(),
        "memory": memory, "energy_j_per_inference": per_inf, "energy": energy, "host": host_info(),
    }


# --------------------------------------------------------------------------------------------------------------------
# From a file: the runner and probe that `arq-deploy bench` uses


