"""Energy probes: the joules a machine consumes while a block of code runs, read from its own sensors.

    probe = get_probe("rapl")            # "rapl", "nvml", "ina3221", "vcgencmd", "none"
    ok, why = probe.available()          # (False, "<reason>") where the sensor is absent or unreadable
    with probe.measure() as m:           # or: probe.start(); work(); joules = probe.stop()
        work()
    m.joules, m.seconds, m.watts

Two kinds of sensor:
  * counter probes (`rapl`: Linux powercap RAPL, Intel and AMD; `nvml`: NVIDIA's total-energy counter) read a
    cumulative energy counter c(t): E = Σ_i Δc_i · unit, where a counter that wrapped (c_{i+1} < c_i) adds its range
    (`max_energy_range_uj`) to that step. A thread reads the counters every `poll_s` seconds so that a long run that
    wraps more than once is still counted right;
  * power probes (`ina3221`: the Jetson module's INA3221 rails; `vcgencmd`: a Pi 5's PMIC rails) sample the power
    P(t_i) in watts every `poll_s` seconds in a thread and integrate with the trapezoid rule:
    E = Σ_i (P_i + P_{i+1}) / 2 · (t_{i+1} − t_i)  (`integrate_power`).

Every probe measures the whole machine (or module, or GPU) it reads, not one process: other work running at the
same time is counted too. Probes are registered by name (`register_probe`; registering twice raises).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from arq_deploy.core.errors import ArqError, UnknownNameError


class ProbeUnavailableError(ArqError):
    """An energy probe was started on a machine where it cannot read its sensor."""


@dataclass
class Measurement:
    """The result of `EnergyProbe.measure()`: filled in when the block ends."""

    probe: str
    joules: float = float("nan")
    seconds: float = float("nan")
    samples: int = 0

    @property
    def watts(self) -> float:
        """Mean power over the block, joules / seconds."""
        return self.joules / self.seconds if self.seconds > 0 else float("nan")


class EnergyProbe:
    """One interface for every sensor: `available()`, `start()`, `stop() -> joules`, or `measure()`."""

    name = "?"
    description = ""

    def available(self) -> tuple[bool, str]:
        """(True, "") when the sensor can be read here, else (False, one line saying why and what to do)."""
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> float:
        """Joules consumed since `start()`."""
        raise NotImplementedError

    def samples(self) -> int:
        """Sensor readings taken since `start()` (for the record)."""
        return 0

    def _require(self) -> None:
        ok, why = self.available()
        if not ok:
            raise ProbeUnavailableError(f"energy probe {self.name!r} is not available: {why}")

    @contextlib.contextmanager
    def measure(self) -> Iterator[Measurement]:
        """Context manager around start()/stop(); the yielded Measurement is filled in when the block exits."""
        m = Measurement(self.name)
        self.start()
        t0 = time.perf_counter()
        try:
            yield m
        finally:
            m.joules = self.stop()
            m.seconds = time.perf_counter() - t0
            m.samples = self.samples()


_PROBES: dict[str, type[EnergyProbe]] = {}


def register_probe(name: str) -> Callable[[type[EnergyProbe]], type[EnergyProbe]]:
    """Class decorator: register an EnergyProbe subclass under `name`; a name taken twice raises ValueError."""

    def deco(cls: type[EnergyProbe]) -> type[EnergyProbe]:
        if name in _PROBES:
            raise ValueError(f"energy probe {name!r} is already registered")
        cls.name = name
        _PROBES[name] = cls
        return cls

    return deco


def probe_names() -> list[str]:
    return sorted(_PROBES)


def get_probe(name: str, **kwargs) -> EnergyProbe:
    """A new probe of the registered kind `name` (kwargs go to its constructor); UnknownNameError otherwise."""
    try:
        cls = _PROBES[name]
    except (KeyError, TypeError):
        raise UnknownNameError(f"unknown energy probe {name!r}; known: {', '.join(probe_names())}") from None
    return cls(**kwargs)


def integrate_power(times: Sequence[float], watts: Sequence[float]) -> float:
    """Trapezoid-rule energy in joules of power samples P(t_i) (watts) at increasing times t_i (seconds).

    E = Σ_i (P_i + P_{i+1}) / 2 · (t_{i+1} − t_i); fewer than two samples give 0. Exact for piecewise-linear power.
    """
    if len(times) != len(watts):
        raise ValueError(f"{len(times)} times but {len(watts)} power samples")
    energy = 0.0
    for i in range(len(times) - 1):
        dt = times[i + 1] - times[i]
        if dt < 0:
            raise ValueError(f"sample times must not decrease (t[{i + 1}] < t[{i}])")
        energy += 0.5 * (watts[i] + watts[i + 1]) * dt
    return energy


class _Poller:
    """Calls `fn` every `period` seconds in a daemon thread until `stop()`; the first exception stops it and is
    re-raised by `stop()`."""

    def __init__(self, fn: Callable[[], None], period: float):
        self._fn, self._period = fn, float(period)
        self._halt = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="arq-energy-poller", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._halt.wait(self._period):
            try:
                self._fn()
            except BaseException as e:  # reported by stop()
                self._error = e
                return

    def stop(self) -> None:
        self._halt.set()
        self._thread.join()
        if self._error is not None:
            raise self._error


# --------------------------------------------------------------------------------------------------------------------
# Counter probes

class _CounterProbe(EnergyProbe):
    """Cumulative counters read by `_read()` (ints, one per counter) in units of `_unit_j` joules; `_ranges[i]`
    is counter i's wrap-around range (None: it does not wrap)."""

    _unit_j = 1.0

    def __init__(self, poll_s: float = 1.0):
        self.poll_s = float(poll_s)
        self._lock = threading.Lock()
        self._poller: _Poller | None = None
        self._last: list[int] = []
        self._ranges: list[int | None] = []
        self._total = 0
        self._reads = 0

    def _open(self) -> None:
        """Prepare to read (find the counters, set `_ranges`)."""

    def _close(self) -> None:
        """Release what `_open` took."""

    def _read(self) -> list[int]:
        raise NotImplementedError

    def start(self) -> None:
        if self._poller is not None:
            raise ArqError(f"energy probe {self.name!r} is already running")
        self._require()
        self._open()
        self._last, self._total, self._reads = self._read(), 0, 1
        self._poller = _Poller(self.sample, self.poll_s)

    def sample(self) -> None:
        """Read the counters now and add the (wrap-corrected) increments to the total; the poller calls this."""
        with self._lock:
            now = self._read()
            for i, (a, b) in enumerate(zip(self._last, now)):
                step = b - a
                if step < 0:  # wrapped (or reset, where the range is unknown: count from zero)
                    rng = self._ranges[i] if i < len(self._ranges) else None
                    step = b + (rng - a if rng else 0)
                self._total += step
            self._last = now
            self._reads += 1

    def stop(self) -> float:
        if self._poller is None:
            raise ArqError(f"energy probe {self.name!r} was not started")
        poller, self._poller = self._poller, None
        try:
            poller.stop()
            self.sample()
        finally:
            self._close()
        return self._total * self._unit_j

    def samples(self) -> int:
        return self._reads


_RAPL_ZONE = re.compile(r"^[a-z]+-rapl:(\d+)(?::(\d+))?$")


@register_probe("rapl")
class RaplProbe(_CounterProbe):
    """Linux powercap RAPL (Intel, and AMD Zen through the same driver): `<root>/*-rapl:N[:M]/energy_uj` (µJ).

    Counted zones: every top-level package zone (`name` = package-N) plus every `dram` zone (DRAM is outside the
    package domain); with no package zone, every top-level zone but `psys`. Sub-zones core/uncore lie inside their
    package and are not added again. Since Linux 5.10 energy_uj is readable by root only.
    """

    description = "Linux powercap RAPL energy counters (CPU package + DRAM), x86 Intel and AMD"
    _unit_j = 1e-6

    def __init__(self, root: str | Path = "/sys/class/powercap", poll_s: float = 1.0):
        super().__init__(poll_s)
        self.root = Path(root)
        self._zones: list[Path] = []

    def zones(self) -> list[Path]:
        """The zone directories that are counted (see the class docstring); [] when there are none."""
        if not self.root.is_dir():
            return []
        found = []
        for d in sorted(self.root.iterdir()):
            m = _RAPL_ZONE.match(d.name)
            if m and (d / "energy_uj").exists():
                name = (d / "name").read_text().strip() if (d / "name").is_file() else ""
                found.append((d, name, m.group(2) is None))
        packages = [d for d, name, top in found if top and name.startswith("package")]
        dram = [d for d, name, _ in found if name == "dram"]
        if packages:
            return packages + dram
        return [d for d, name, top in found if top and name != "psys"] or [d for d, _, top in found if top]

    def available(self) -> tuple[bool, str]:
        if not self.root.is_dir():
            return False, (f"{self.root} does not exist (no powercap interface: a virtual machine, a container "
                           f"without /sys, or a kernel without intel_rapl)")
        zones = self.zones()
        if not zones:
            return False, f"no RAPL zones under {self.root} (a virtual machine, or a CPU/kernel without RAPL)"
        for z in zones:
            for f in ("energy_uj", "max_energy_range_uj"):
                try:
                    int((z / f).read_text().strip() or "0")
                except PermissionError:
                    return False, (f"{z / f} is readable by root only (Linux >= 5.10); run as root or "
                                   f"`sudo chmod a+r {self.root}/*-rapl:*/energy_uj`")
                except (OSError, ValueError) as e:
                    return False, f"cannot read {z / f}: {e}"
        return True, ""

    def _open(self) -> None:
        self._zones = self.zones()
        self._ranges = [int((z / "max_energy_range_uj").read_text().strip() or "0") or None for z in self._zones]

    def _read(self) -> list[int]:
        return [int((z / "energy_uj").read_text().strip()) for z in self._zones]

    def zone_names(self) -> list[str]:
        return [f"{z.name} ({(z / 'name').read_text().strip() if (z / 'name').is_file() else '?'})"
                for z in self.zones()]


@register_probe("nvml")
class NvmlProbe(_CounterProbe):
    """NVIDIA GPUs through NVML (`nvidia-ml-py`): `nvmlDeviceGetTotalEnergyConsumption`, millijoules since the
    driver loaded (Volta and newer). `device_index` None counts every GPU, else only that one. Measures the GPU
    board, not the host CPU."""

    description = "NVIDIA GPU total-energy counter through NVML (Volta and newer)"
    _unit_j = 1e-3

    def __init__(self, device_index: int | None = None, poll_s: float = 1.0):
        super().__init__(poll_s)
        self.device_index = device_index
        self._handles: list = []

    def _nvml(self):
        import pynvml

        return pynvml

    def available(self) -> tuple[bool, str]:
        try:
            nv = self._nvml()
        except ImportError:
            return False, "the nvidia-ml-py package is not installed (pip install nvidia-ml-py)"
        try:
            nv.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
            return False, f"NVML cannot start ({_nvml_text(e)}): no NVIDIA driver or GPU on this machine"
        try:
            handles = self._device_handles(nv)
            if not handles:
                return False, "NVML finds no NVIDIA GPU on this machine"
            for i, h in handles:
                try:
                    nv.nvmlDeviceGetTotalEnergyConsumption(h)
                except Exception as e:
                    return False, (f"GPU {i} does not report its total energy ({_nvml_text(e)}; needs a Volta or "
                                   f"newer GPU)")
        except ArqError as e:
            return False, str(e)
        finally:
            with contextlib.suppress(Exception):
                nv.nvmlShutdown()
        return True, ""

    def _device_handles(self, nv) -> list:
        count = int(nv.nvmlDeviceGetCount())
        indices = range(count) if self.device_index is None else [int(self.device_index)]
        if any(not 0 <= i < count for i in indices):
            raise ArqError(f"GPU index {self.device_index} is out of range: NVML sees {count} GPU(s)")
        return [(i, nv.nvmlDeviceGetHandleByIndex(i)) for i in indices]

    def _open(self) -> None:
        nv = self._nvml()
        nv.nvmlInit()
        self._handles = [h for _, h in self._device_handles(nv)]
        self._ranges = [None] * len(self._handles)

    def _close(self) -> None:
        with contextlib.suppress(Exception):
            self._nvml().nvmlShutdown()

    def _read(self) -> list[int]:
        nv = self._nvml()
        return [int(nv.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self._handles]


def _nvml_text(e: BaseException) -> str:
    text = str(e).strip()
    return text or type(e).__name__


# --------------------------------------------------------------------------------------------------------------------
# Power probes

class _PowerProbe(EnergyProbe):
    """Samples `_power_w()` (watts) every `poll_s` seconds in a thread; stop() integrates (trapezoid)."""

    def __init__(self, poll_s: float = 0.1):
        self.poll_s = float(poll_s)
        self._lock = threading.Lock()
        self._poller: _Poller | None = None
        self._t: list[float] = []
        self._p: list[float] = []

    def _power_w(self) -> float:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Fix what to read (rails) before sampling."""

    def sample(self) -> None:
        """Take one power reading now; the poller calls this."""
        p = self._power_w()
        t = time.perf_counter()
        with self._lock:
            self._t.append(t)
            self._p.append(p)

    def start(self) -> None:
        if self._poller is not None:
            raise ArqError(f"energy probe {self.name!r} is already running")
        self._require()
        self._prepare()
        self._t, self._p = [], []
        self.sample()
        self._poller = _Poller(self.sample, self.poll_s)

    def stop(self) -> float:
        if self._poller is None:
            raise ArqError(f"energy probe {self.name!r} was not started")
        poller, self._poller = self._poller, None
        poller.stop()
        self.sample()
        with self._lock:
            return integrate_power(self._t, self._p)

    def samples(self) -> int:
        return len(self._t)

    def trace(self) -> tuple[list[float], list[float]]:
        """(times in s, watts) of the last run."""
        with self._lock:
            return list(self._t), list(self._p)


_TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")


@register_probe("ina3221")
class Ina3221Probe(_PowerProbe):
    """The INA3221 power monitors of NVIDIA Jetson modules, read from sysfs under `root` (default /sys):

      * JetPack 4 (Nano, TX2): `bus/i2c/drivers/ina3221x/*/iio:device*/in_power{N}_input` in mW,
        rail names in `rail_name_{N}`;
      * JetPack 5/6 (Orin): `bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in{N}_input` (bus voltage, mV) and
        `curr{N}_input` (mA), N = 1..3, rail names in `in{N}_label`; P = V · I.

    `rails`: rail names to add up. Default: the module's input rail (VDD_IN on Orin, POM_5V_IN on Nano) when there
    is one, since the other rails are parts of it; else all rails.
    """

    description = "NVIDIA Jetson INA3221 power rails (sysfs), sampled and integrated"

    def __init__(self, root: str | Path = "/sys", rails: Sequence[str] | None = None, poll_s: float = 0.05):
        super().__init__(poll_s)
        self.root = Path(root)
        self.rails_wanted = list(rails) if rails else None
        self._readers: dict[str, Callable[[], float]] = {}

    def rails(self) -> dict[str, Callable[[], float]]:
        """{rail name: function returning its power in watts} for every rail found."""
        out: dict[str, Callable[[], float]] = {}
        drivers = self.root / "bus" / "i2c" / "drivers"
        for f in sorted(drivers.glob("ina3221x/*/iio:device*/in_power*_input")):
            n = f.name[len("in_power"):-len("_input")]
            label = _read_text(f.parent / f"rail_name_{n}") or f"{f.parent.parent.name}:{n}"
            out[label] = lambda f=f: int(f.read_text().strip()) / 1e3
        for d in sorted(drivers.glob("ina3221/*/hwmon/hwmon*")):
            for n in (1, 2, 3):
                volts, amps = d / f"in{n}_input", d / f"curr{n}_input"
                if volts.is_file() and amps.is_file():
                    label = _read_text(d / f"in{n}_label") or f"{d.parent.parent.name}:{n}"
                    out[label] = lambda v=volts, a=amps: int(v.read_text().strip()) * int(a.read_text().strip()) / 1e6
        return out

    def chosen(self) -> list[str]:
        """The rails this probe adds up (see `rails` in the class docstring)."""
        found = self.rails()
        if self.rails_wanted:
            missing = [r for r in self.rails_wanted if r not in found]
            if missing:
                raise ArqError(f"INA3221 rails {missing} not found; this machine has {sorted(found) or 'none'}")
            return list(self.rails_wanted)
        total = [r for r in _TOTAL_RAILS if r in found]
        return total[:1] or sorted(found)

    def available(self) -> tuple[bool, str]:
        found = self.rails()
        if not found:
            return False, (f"no INA3221 power rails under {self.root}/bus/i2c/drivers/ina3221*/ (not a Jetson, "
                           f"or its ina3221 driver is not loaded)")
        try:
            for name in self.chosen():
                found[name]()
        except ArqError as e:
            return False, str(e)
        except PermissionError as e:
            return False, f"cannot read the INA3221 rails ({e}); run as root or grant read access"
        except (OSError, ValueError) as e:
            return False, f"cannot read the INA3221 rails: {e}"
        return True, ""

    def _prepare(self) -> None:
        found = self.rails()
        self._readers = {name: found[name] for name in self.chosen()}

    def _power_w(self) -> float:
        return sum(read() for read in self._readers.values())


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


_PMIC_LINE = re.compile(r"^\s*(?P<rail>\S+?)_(?P<unit>[AV])(?:\s+(?:current|volt)\(\d+\))?"
                        r"=(?P<value>\S+?)(?P=unit)\s*$")


def parse_pmic_adc(text: str) -> dict[str, tuple[float, float]]:
    """{rail: (amps, volts)} from the output of `vcgencmd pmic_read_adc` (Raspberry Pi 5).

    Lines look like `  VDD_CORE_A current(7)=0.75012000A` and `  VDD_CORE_V volt(15)=0.86173300V`: a rail's current
    and voltage carry the suffixes _A and _V and different ADC indices, so they are paired by name. Rails with only a
    voltage (EXT5V_V, BATT_V) or only a current, and values that are not numbers (nanV), are left out.
    """
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        m = _PMIC_LINE.match(line)
        if not m:
            continue
        try:
            value = float(m["value"])
        except ValueError:
            continue
        if value != value:  # nan
            continue
        (amps if m["unit"] == "A" else volts)[m["rail"]] = value
    return {r: (amps[r], volts[r]) for r in sorted(amps) if r in volts}


def pmic_power_w(text: str) -> float:
    """Σ over paired rails of amps × volts, in watts (the PMIC's output rails: board input losses and USB
    peripherals are not included, so this is below the power drawn at the USB-C input)."""
    return sum(a * v for a, v in parse_pmic_adc(text).values())


@register_probe("vcgencmd")
class VcgencmdProbe(_PowerProbe):
    """Raspberry Pi 5: `vcgencmd pmic_read_adc` sampled every `poll_s` seconds, power = Σ rails A × V, integrated.

    `command`: the command that prints the PMIC readings (default `vcgencmd pmic_read_adc`). Pi 4 and earlier have
    no PMIC ADC (vcgencmd answers `error=...`): not available there.
    """

    description = "Raspberry Pi 5 PMIC rails via `vcgencmd pmic_read_adc`, sampled and integrated"

    def __init__(self, command: Sequence[str] = ("vcgencmd", "pmic_read_adc"), poll_s: float = 0.2,
                 timeout_s: float = 5.0):
        super().__init__(poll_s)
        self.command = list(command)
        self.timeout_s = float(timeout_s)

    def _output(self) -> str:
        p = subprocess.run(self.command, capture_output=True, text=True, timeout=self.timeout_s)
        if p.returncode != 0:
            raise ArqError(f"`{' '.join(self.command)}` failed (exit {p.returncode}): "
                           f"{(p.stderr or p.stdout).strip().splitlines()[:1]}")
        return p.stdout

    def available(self) -> tuple[bool, str]:
        if shutil.which(self.command[0]) is None:
            return False, (f"{self.command[0]} not found (not Raspberry Pi OS; vcgencmd comes with the raspi-utils "
                           f"package)")
        try:
            out = self._output()
        except (ArqError, OSError, subprocess.TimeoutExpired) as e:
            return False, str(e)
        if not parse_pmic_adc(out):
            first = next((ln.strip() for ln in out.splitlines() if ln.strip()), "(no output)")
            return False, f"`{' '.join(self.command)}` gives no PMIC current/voltage pairs (needs a Pi 5): {first}"
        return True, ""

    def _power_w(self) -> float:
        return pmic_power_w(self._output())


@register_probe("none")
class NoProbe(EnergyProbe):
    """A target without an energy sensor: never available."""

    description = "no energy sensor"

    def __init__(self, reason: str = "this target has no energy probe"):
        self.reason = reason

    def available(self) -> tuple[bool, str]:
        return False, self.reason

    def start(self) -> None:
        self._require()

    def stop(self) -> float:
        raise ProbeUnavailableError(f"energy probe 'none': {self.reason}")
