"""Energy probes: the integrator on known power traces, RAPL on a sysfs tree in its real file format (and the real
sysfs), INA3221 on both Jetson sysfs layouts, the Pi 5 PMIC parser on captured `vcgencmd pmic_read_adc` text, NVML."""

import ast
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from arq_deploy.core.errors import ArqError, UnknownNameError
from arq_deploy.targets.energy import (
    EnergyProbe,
    Ina3221Probe,
    NoProbe,
    NvmlProbe,
    ProbeUnavailableError,
    RaplProbe,
    VcgencmdProbe,
    get_probe,
    integrate_power,
    parse_pmic_adc,
    pmic_power_w,
    probe_names,
    register_probe,
)

# `vcgencmd pmic_read_adc` on a Raspberry Pi 5 (firmware 2024+): currents and voltages of the PMIC's rails, each
# with its own ADC index, then the input voltage and the RTC battery, which have no current reading.
PMIC_PI5 = """\
 3V7_WL_SW_A current(0)=0.04250400A
   3V3_SYS_A current(1)=0.09961320A
   1V8_SYS_A current(2)=0.19821600A
  DDR_VDD2_A current(3)=0.03418800A
  DDR_VDDQ_A current(4)=0.00000000A
   1V1_SYS_A current(5)=0.19329770A
   0V8_SW_A current(6)=0.31746000A
  VDD_CORE_A current(7)=1.52410000A
   3V3_DAC_A current(17)=0.00012210A
   3V3_ADC_A current(18)=0.00030525A
   0V8_AON_A current(16)=0.00244200A
      HDMI_A current(22)=0.01709400A
 3V7_WL_SW_V volt(8)=3.71740800V
   3V3_SYS_V volt(9)=3.31317500V
   1V8_SYS_V volt(10)=1.80439600V
  DDR_VDD2_V volt(11)=1.11135600V
  DDR_VDDQ_V volt(12)=0.60146520V
   1V1_SYS_V volt(13)=1.10549400V
   0V8_SW_V volt(14)=0.80366300V
  VDD_CORE_V volt(15)=0.88034200V
   3V3_DAC_V volt(20)=3.30805800V
   3V3_ADC_V volt(21)=3.30439600V
   0V8_AON_V volt(19)=0.80073260V
      HDMI_V volt(23)=5.15568000V
     EXT5V_V volt(24)=5.13248000V
      BATT_V volt(25)=nanV
"""
PMIC_PAIRS = {  # rail: (A, V), read off the text above by hand
    "3V7_WL_SW": (0.04250400, 3.71740800), "3V3_SYS": (0.09961320, 3.31317500), "1V8_SYS": (0.19821600, 1.80439600),
    "DDR_VDD2": (0.03418800, 1.11135600), "DDR_VDDQ": (0.0, 0.60146520), "1V1_SYS": (0.19329770, 1.10549400),
    "0V8_SW": (0.31746000, 0.80366300), "VDD_CORE": (1.52410000, 0.88034200), "3V3_DAC": (0.00012210, 3.30805800),
    "3V3_ADC": (0.00030525, 3.30439600), "0V8_AON": (0.00244200, 0.80073260), "HDMI": (0.01709400, 5.15568000),
}
# What vcgencmd says on a Pi 4, which has no PMIC ADC.
PMIC_PI4 = 'error=1 error_msg="Command not registered: pmic_read_adc"\n'


# ---------------------------------------------------------------------------------------------------------------
# The integrator

def test_integrate_constant_and_linear_power_exactly():
    assert integrate_power([0.0, 0.5, 2.0], [5.0, 5.0, 5.0]) == pytest.approx(10.0)
    # a 0 -> 10 W ramp over 4 s, sampled at irregular times: the trapezoid rule is exact for linear power
    t = [0.0, 0.3, 1.1, 2.0, 3.7, 4.0]
    assert integrate_power(t, [2.5 * s for s in t]) == pytest.approx(20.0, rel=1e-12)
    assert integrate_power([1.0], [7.0]) == 0.0 and integrate_power([], []) == 0.0


def test_integrate_a_smooth_trace_converges():
    """P(t) = 3 + sin t over one period: E = 6π; the trapezoid error falls as 1/n²."""
    def err(n):
        t = [2 * math.pi * i / n for i in range(n + 1)]
        return abs(integrate_power(t, [3 + math.sin(s) for s in t]) - 6 * math.pi)

    assert err(1000) < 1e-9 + 1e-3 and err(100) < 0.02
    n = 7  # a coarse, non-symmetric sampling has a real error that shrinks with more samples
    t = [2 * math.pi * (i / n) ** 1.5 for i in range(n + 1)]
    coarse = abs(integrate_power(t, [3 + math.sin(s) for s in t]) - 6 * math.pi)
    assert coarse > err(1000)


def test_integrate_rejects_bad_traces():
    with pytest.raises(ValueError, match="2 times but 3"):
        integrate_power([0, 1], [1, 2, 3])
    with pytest.raises(ValueError, match="must not decrease"):
        integrate_power([0, 2, 1], [1, 1, 1])


# ---------------------------------------------------------------------------------------------------------------
# RAPL

def make_powercap(root: Path, zones: dict) -> Path:
    """A /sys/class/powercap tree in the kernel's format: one folder per zone with name, energy_uj,
    max_energy_range_uj; plus the control-type folder `intel-rapl` (no colon), which is not a zone."""
    (root / "intel-rapl").mkdir(parents=True)
    (root / "intel-rapl" / "enabled").write_text("1\n")
    for zone, (name, energy, rng) in zones.items():
        d = root / zone
        d.mkdir()
        (d / "name").write_text(name + "\n")
        (d / "energy_uj").write_text(f"{energy}\n")
        (d / "max_energy_range_uj").write_text(f"{rng}\n")
        (d / "enabled").write_text("1\n")
    return root


def set_energy(root: Path, zone: str, uj: int) -> None:
    (root / zone / "energy_uj").write_text(f"{uj}\n")


RANGE = 262143328850  # a common max_energy_range_uj


def server_tree(tmp_path):
    return make_powercap(tmp_path / "powercap", {
        "intel-rapl:0": ("package-0", 1_000_000, RANGE),
        "intel-rapl:0:0": ("core", 500_000, RANGE),      # inside the package: not added again
        "intel-rapl:0:1": ("dram", 2_000_000, RANGE),    # outside the package domain: added
        "intel-rapl:1": ("package-1", RANGE - 1_000_000, RANGE),  # about to wrap
        "intel-rapl:2": ("psys", 9_000_000, RANGE),      # the whole SoC: would count everything twice
    })


def test_rapl_picks_packages_and_dram(tmp_path):
    probe = RaplProbe(server_tree(tmp_path))
    assert [z.name for z in probe.zones()] == ["intel-rapl:0", "intel-rapl:1", "intel-rapl:0:1"]
    assert probe.available() == (True, "")


def test_rapl_counts_increments_and_wraps(tmp_path):
    root = server_tree(tmp_path)
    probe = RaplProbe(root, poll_s=3600)  # no poller read in between: only the reads made here
    probe.start()
    set_energy(root, "intel-rapl:0", 4_000_000)            # +3 J
    set_energy(root, "intel-rapl:0:1", 2_500_000)          # +0.5 J
    set_energy(root, "intel-rapl:1", 500_000)              # wrapped: +1 J to the range, +0.5 J after it
    set_energy(root, "intel-rapl:0:0", 99_000_000)         # a core sub-zone: not counted
    set_energy(root, "intel-rapl:2", 99_000_000)           # psys: not counted
    probe.sample()
    set_energy(root, "intel-rapl:1", 200_000)              # wrapped a second time: + (range − 0.5 J) + 0.2 J
    joules = probe.stop()
    expected = 3.0 + 0.5 + 1.5 + (RANGE - 500_000 + 200_000) * 1e-6
    assert joules == pytest.approx(expected, abs=1e-9)
    assert probe.samples() == 3


def test_rapl_measure_context_and_amd_style_tree(tmp_path):
    """An AMD Zen CPU shows up through the same powercap driver with a single package zone (no DRAM domain)."""
    root = make_powercap(tmp_path / "pc", {"intel-rapl:0": ("package-0", 10, 2**32)})
    probe = get_probe("rapl", root=root, poll_s=3600)
    with probe.measure() as m:
        set_energy(root, "intel-rapl:0", 2_000_010)
    assert m.joules == pytest.approx(2.0) and m.seconds > 0 and m.samples == 2 and m.watts > 0


def test_rapl_not_available_explains_why(tmp_path):
    ok, why = RaplProbe(tmp_path / "absent").available()
    assert not ok and "does not exist" in why and "virtual machine" in why
    (tmp_path / "empty").mkdir()
    ok, why = RaplProbe(tmp_path / "empty").available()
    assert not ok and "no RAPL zones" in why
    root = make_powercap(tmp_path / "broken", {"intel-rapl:0": ("package-0", 0, RANGE)})
    set_energy(root, "intel-rapl:0", 0)
    (root / "intel-rapl:0" / "energy_uj").write_text("not a number\n")
    ok, why = RaplProbe(root).available()
    assert not ok and "cannot read" in why and "energy_uj" in why
    with pytest.raises(ProbeUnavailableError, match="cannot read"):
        RaplProbe(root).start()


def test_rapl_root_only_counter(tmp_path):
    """Linux >= 5.10 makes energy_uj readable by root only (mode 0400); here a 0200 file, read without the
    capabilities that let root ignore file modes (dropped with util-linux's setpriv when the tests run as root)."""
    root = make_powercap(tmp_path / "pc", {"intel-rapl:0": ("package-0", 5, RANGE)})
    (root / "intel-rapl:0" / "energy_uj").chmod(0o200)
    code = f"from arq_deploy.targets.energy import RaplProbe; print(repr(RaplProbe({str(root)!r}).available()))"
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without util-linux's setpriv: file modes cannot hide energy_uj")
        caps = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    ok, why = ast.literal_eval(out)  # the (bool, str) tuple printed by the child
    assert not ok and "readable by root only" in why and "chmod" in why


def test_rapl_on_this_machine():
    """The real /sys/class/powercap: measured where readable, else skipped with the reason."""
    probe = RaplProbe(poll_s=0.2)
    ok, why = probe.available()
    if not ok:
        assert why
        pytest.skip(f"RAPL not available here: {why}")
    with probe.measure() as m:
        t_end = time.perf_counter() + 0.5
        while time.perf_counter() < t_end:
            sum(i * i for i in range(1000))
    assert m.joules > 0 and 0 < m.watts < 2000


# ---------------------------------------------------------------------------------------------------------------
# INA3221 (Jetson)

def make_orin_hwmon(sys_root: Path, rails: dict) -> Path:
    """JetPack 5/6: /sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmonN with in{n}_label, in{n}_input (mV),
    curr{n}_input (mA), and the shunt-sum channel in7, which is not a rail."""
    d = sys_root / "bus" / "i2c" / "drivers" / "ina3221" / "1-0040" / "hwmon" / "hwmon3"
    d.mkdir(parents=True)
    (d / "name").write_text("ina3221\n")
    for n, (label, (mv, ma)) in enumerate(rails.items(), start=1):
        (d / f"in{n}_label").write_text(label + "\n")
        (d / f"in{n}_input").write_text(f"{mv}\n")
        (d / f"curr{n}_input").write_text(f"{ma}\n")
    (d / "in7_label").write_text("sum of shunt voltages\n")
    (d / "in7_input").write_text("12\n")
    return d


def make_nano_iio(sys_root: Path, rails: list) -> Path:
    """JetPack 4 (Nano): /sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0 with rail_name_N, in_power{N}_input (mW)."""
    d = sys_root / "bus" / "i2c" / "drivers" / "ina3221x" / "6-0040" / "iio:device0"
    d.mkdir(parents=True)
    for n, (label, mw) in enumerate(rails):
        (d / f"rail_name_{n}").write_text(label + "\n")
        (d / f"in_power{n}_input").write_text(f"{mw}\n")
        (d / f"in_current{n}_input").write_text("0\n")
    return d


ORIN = {"VDD_IN": (5000, 1200), "VDD_CPU_GPU_CV": (5000, 400), "VDD_SOC": (5000, 300)}  # mV, mA


def test_ina3221_orin_layout_reads_the_input_rail(tmp_path):
    make_orin_hwmon(tmp_path, ORIN)
    probe = Ina3221Probe(tmp_path, poll_s=0.02)
    found = probe.rails()
    assert sorted(found) == ["VDD_CPU_GPU_CV", "VDD_IN", "VDD_SOC"]
    assert found["VDD_IN"]() == pytest.approx(6.0) and found["VDD_SOC"]() == pytest.approx(1.5)
    assert probe.chosen() == ["VDD_IN"]  # the module input; the others are parts of it
    with probe.measure() as m:
        time.sleep(0.25)
    t, p = probe.trace()
    assert m.samples >= 3 and set(p) == {6.0}
    assert m.joules == pytest.approx(6.0 * (t[-1] - t[0]), rel=1e-9) and m.joules > 6.0 * 0.2


def test_ina3221_nano_layout_and_chosen_rails(tmp_path):
    make_nano_iio(tmp_path, [("POM_5V_IN", 3500), ("POM_5V_GPU", 800), ("POM_5V_CPU", 1100)])
    assert Ina3221Probe(tmp_path).chosen() == ["POM_5V_IN"]
    probe = Ina3221Probe(tmp_path, rails=["POM_5V_GPU", "POM_5V_CPU"], poll_s=0.02)
    probe.start()
    assert probe._power_w() == pytest.approx(1.9)
    time.sleep(0.1)
    joules = probe.stop()
    t, _ = probe.trace()
    assert joules == pytest.approx(1.9 * (t[-1] - t[0]), rel=1e-9)
    ok, why = Ina3221Probe(tmp_path, rails=["VDD_GPU"]).available()
    assert not ok and "VDD_GPU" in why and "POM_5V_IN" in why


def test_ina3221_on_this_machine():
    probe = Ina3221Probe()
    ok, why = probe.available()
    if not ok:
        assert "INA3221" in why or "cannot read" in why
        pytest.skip(f"INA3221 not available here: {why}")
    with probe.measure() as m:
        time.sleep(0.3)
    assert m.joules > 0


# ---------------------------------------------------------------------------------------------------------------
# vcgencmd (Raspberry Pi 5)

def test_pmic_parser_pairs_rails_by_name():
    rails = parse_pmic_adc(PMIC_PI5)
    assert rails.keys() == PMIC_PAIRS.keys()  # EXT5V_V and BATT_V (no current; nanV) left out
    for name, (a, v) in PMIC_PAIRS.items():
        assert rails[name] == (pytest.approx(a), pytest.approx(v))
    assert pmic_power_w(PMIC_PI5) == pytest.approx(sum(a * v for a, v in PMIC_PAIRS.values()), rel=1e-12)
    assert 1.5 < pmic_power_w(PMIC_PI5) < 3.0  # an idle Pi 5's rails add up to about 2 W


def test_pmic_parser_ignores_what_is_not_a_reading():
    assert parse_pmic_adc(PMIC_PI4) == {} and pmic_power_w(PMIC_PI4) == 0.0
    assert parse_pmic_adc("") == {}
    assert parse_pmic_adc("VDD_CORE_A current(7)=1.0A\n") == {}  # a current without its voltage
    assert parse_pmic_adc("VDD_CORE_A current(7)=1.5A\nVDD_CORE_V volt(15)=0.8V\n") == {"VDD_CORE": (1.5, 0.8)}


def _printer(text: str, tmp_path: Path) -> list[str]:
    """A command that prints `text` the way vcgencmd does (a stand-in for the binary, which needs a Pi)."""
    f = tmp_path / "pmic.txt"
    f.write_text(text)
    return [sys.executable, "-c", f"import sys; sys.stdout.write(open({str(f)!r}).read())"]


def test_vcgencmd_probe_samples_and_integrates(tmp_path):
    probe = VcgencmdProbe(command=_printer(PMIC_PI5, tmp_path), poll_s=0.05)
    assert probe.available() == (True, "")
    with probe.measure() as m:
        time.sleep(0.6)
    t, p = probe.trace()
    watts = pmic_power_w(PMIC_PI5)
    assert m.samples >= 3 and all(w == pytest.approx(watts) for w in p)
    assert m.joules == pytest.approx(watts * (t[-1] - t[0]), rel=1e-9)
    assert 0.5 * m.seconds * watts < m.joules < 1.5 * m.seconds * watts


def test_vcgencmd_not_available_explains_why(tmp_path):
    ok, why = VcgencmdProbe(command=["vcgencmd-not-installed-here", "pmic_read_adc"]).available()
    assert not ok and "not found" in why
    ok, why = VcgencmdProbe(command=_printer(PMIC_PI4, tmp_path)).available()
    assert not ok and "Pi 5" in why and "Command not registered" in why
    ok, why = VcgencmdProbe(command=[sys.executable, "-c", "import sys; sys.exit(3)"]).available()
    assert not ok and "exit 3" in why


# ---------------------------------------------------------------------------------------------------------------
# NVML, "none", the registry

def test_nvml_on_this_machine():
    probe = NvmlProbe(poll_s=0.1)
    ok, why = probe.available()
    if not ok:
        assert why and ("NVML" in why or "nvidia-ml-py" in why or "GPU" in why)
        with pytest.raises(ProbeUnavailableError, match="nvml"):
            probe.start()
        pytest.skip(f"NVML not available here: {why}")
    with probe.measure() as m:
        time.sleep(0.5)
    assert m.joules > 0 and m.watts < 2000


def test_registry_and_none():
    assert {"rapl", "nvml", "ina3221", "vcgencmd", "none"} <= set(probe_names())
    with pytest.raises(UnknownNameError, match="rapl"):
        get_probe("joulemeter")
    with pytest.raises(ValueError, match="already registered"):
        register_probe("rapl")(type("Again", (EnergyProbe,), {}))
    ok, why = get_probe("none").available()
    assert not ok and "no energy probe" in why
    with pytest.raises(ProbeUnavailableError, match="no energy probe"):
        NoProbe().start()
    with pytest.raises(ArqError, match="not started"):
        RaplProbe().stop()
