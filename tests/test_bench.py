"""`bench` and `arq-deploy bench`: latency percentiles, throughput, peak memory and energy of the digits model on
onnxruntime and on a TVM x86 artifact; the energy path end to end with a real (sampling) probe; bad input."""

import json

import pytest
from test_cli import assert_one_line_error
from test_energy import PMIC_PI5, _printer

from arq_deploy.core.errors import ArqError, UnknownNameError
from arq_deploy.runtime.runners import OrtRunner
from arq_deploy.targets.backends import bench_artifact
from arq_deploy.targets.bench import bench, measure_energy
from arq_deploy.targets.energy import NoProbe, VcgencmdProbe, pmic_power_w

KEYS = {"format", "runner", "input_shape", "latency", "throughput", "memory", "energy_j_per_inference", "energy",
        "host"}


@pytest.fixture(scope="module")
def digits_builds(digits, digits_model, tmp_path_factory):
    """The digits CNN exported as W8A8 QDQ ONNX and compiled for x86 (batch 32)."""
    from arq_deploy.core.policy import QuantPolicy
    from arq_deploy.export.pipeline import export_and_validate
    from arq_deploy.targets.backends import compile_onnx

    lm, _ = digits_model
    d = tmp_path_factory.mktemp("bench")
    export_and_validate(lm, QuantPolicy.uniform(8), *digits, d / "w8a8.onnx", sigma=0.25, validate_images=100)
    return d / "w8a8.onnx", compile_onnx(d / "w8a8.onnx", "x86", d / "x86", batch_size=32)


def check_result(res: dict, runner_name: str, batch: int):
    assert KEYS <= res.keys() and res["runner"] == runner_name
    lat, thr = res["latency"], res["throughput"]
    assert lat["batch"] == 1 and thr["batch"] == batch
    for t in (lat, thr):
        assert 0 < t["min_ms"] <= t["p50_ms"] <= t["p90_ms"] <= t["p99_ms"]
        assert t["images_per_s"] == pytest.approx(t["batch"] / (t["p50_ms"] / 1e3), rel=1e-6)  # batch / median
    mem = res["memory"]
    assert mem["peak_rss_mb"] >= mem["rss_before_mb"] > 0 and mem["measures"]
    assert mem["peak_increase_mb"] == pytest.approx(mem["peak_rss_mb"] - mem["rss_before_mb"], abs=0.011)
    e = res["energy_j_per_inference"]
    if isinstance(e, str):
        assert e.startswith("not available: ") and len(e) > len("not available: ") + 10
        assert res["energy"]["available"] is False and res["energy"]["reason"] in e
    else:
        assert e > 0 and res["energy"]["available"] is True
    json.dumps(res)  # JSON-ready


def test_bench_onnxruntime(digits_builds):
    onnx_path, _ = digits_builds
    res = bench(OrtRunner(onnx_path), batch_large=64, repeats=15, warmup=2, probe="rapl",
                energy_seconds=0.3, idle_seconds=0.1)
    check_result(res, "onnxruntime", 64)
    assert res["energy"]["probe"] == "rapl"


def test_bench_tvm_artifact(digits_builds):
    _, art = digits_builds
    res = bench_artifact(art, "x86", batch_large=70, repeats=15, warmup=2, energy_seconds=0.3, idle_seconds=0.1)
    check_result(res, "tvm", 70)
    assert res["target"] == "x86" and res["runner_batch"] == 32 and res["throughput"]["repeats"] == 3


def test_energy_per_inference_with_a_readable_probe(digits_builds, tmp_path):
    """The available-probe path end to end: the real sampling probe, reading Pi 5 PMIC text from a stand-in command
    (constant power P), so joules per inference must equal P·t / images."""
    onnx_path, _ = digits_builds
    probe = VcgencmdProbe(command=_printer(PMIC_PI5, tmp_path), poll_s=0.05)
    e = measure_energy(OrtRunner(onnx_path), probe, batch=32, min_seconds=0.4, idle_seconds=0.2)
    watts = pmic_power_w(PMIC_PI5)
    assert e["available"] and e["images"] % 32 == 0 and e["images"] >= 32
    assert e["mean_watts"] == pytest.approx(watts, rel=0.3)  # the trace spans slightly less than the wall time
    assert e["joules_per_inference"] == pytest.approx(e["joules"] / e["images"])
    assert e["idle_watts"] == pytest.approx(watts, rel=0.3)
    assert abs(e["above_idle_joules_per_inference"]) < 0.3 * e["joules_per_inference"]
    res = bench(OrtRunner(onnx_path), batch_large=32, repeats=5, warmup=1, probe=probe, energy_seconds=0.3,
                idle_seconds=0.1)
    assert isinstance(res["energy_j_per_inference"], float) and res["energy_j_per_inference"] > 0


def test_bench_checks_its_arguments(digits_builds):
    runner = OrtRunner(digits_builds[0])
    with pytest.raises(ArqError, match="repeats"):
        bench(runner, repeats=0)
    with pytest.raises(UnknownNameError, match="joulemeter"):
        bench(runner, repeats=2, probe="joulemeter")
    res = bench(runner, batch_large=8, repeats=3, warmup=0, probe=NoProbe("measured elsewhere"))
    assert res["energy_j_per_inference"] == "not available: measured elsewhere"


def test_cli_bench_writes_json(cli, digits_builds, tmp_path):
    onnx_path, _ = digits_builds
    out = tmp_path / "bench-x86.json"
    rc, stdout, err = cli("bench", onnx_path, "--target", "x86", "--batch", "48", "--repeats", "10", "--warmup", "1",
                          "--out", out)
    assert rc == 0, err
    res = json.loads(out.read_text())
    check_result(res, "onnxruntime", 48)
    assert res["target"] == "x86" and res["providers"] == ["CPUExecutionProvider"]
    assert "img/s at batch 48" in stdout and str(out) in stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("args,fragments", [
    (["bench", "/nonexistent/model.onnx", "--out", "never.json"], ["/nonexistent/model.onnx", "does not exist"]),
    (["bench", "README.md", "--target", "z80", "--out", "never.json"], ["z80", "x86"]),
    (["bench", "README.md", "--probe", "joulemeter", "--out", "never.json"], ["joulemeter", "rapl"]),
    (["bench", "README.md", "--batch", "0", "--out", "never.json"], ["--batch"]),
])
def test_cli_bench_bad_input(cli, tmp_path, args, fragments):
    rc, out, err = cli(*args, cwd=tmp_path)
    assert_one_line_error(rc, out, err, *fragments)
    assert not any(p.name.startswith("never") for p in tmp_path.iterdir())


def test_cli_bench_bad_model_and_remote_onnx(cli, digits_builds, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    assert_one_line_error(*cli("bench", bad, "--out", tmp_path / "never.json"), "bad.onnx")
    assert_one_line_error(*cli("bench", digits_builds[0], "--remote", "127.0.0.1:9", "--out",
                               tmp_path / "never.json"), "--remote", "compile")
    assert not (tmp_path / "never.json").exists()


def test_artifact_for_another_target_is_refused(digits_builds):
    from arq_deploy.targets.registry import list_targets

    other = [t.name for t in list_targets() if t.name != "x86"]
    if not other:
        pytest.skip("only the x86 target is registered")
    with pytest.raises(ArqError, match=f"compiled for target 'x86', not '{other[0]}'"):
        bench_artifact(digits_builds[1], other[0], repeats=2)


def test_onnx_for_a_device_target_is_refused_here(digits_builds):
    """onnxruntime runs the ONNX file on this machine: measuring it under another machine's target name (an ARM
    board, or a GPU target without a usable GPU provider) would mislabel the numbers."""
    import platform

    from arq_deploy.runtime.runners import cuda_driver_present
    from arq_deploy.targets.registry import list_targets

    here = platform.machine().lower()
    foreign = [t for t in list_targets() if t.host_triple.split("-")[0] not in (here, "amd64" if here == "x86_64"
                                                                                else here)]
    gpu_here = [t for t in list_targets() if t.kind == "gpu" and t not in foreign]
    if not foreign and not (gpu_here and not cuda_driver_present()):
        pytest.skip("no registered target runs on another architecture or needs a GPU missing here")
    for t in foreign[:1]:
        with pytest.raises(ArqError, match="--remote"):
            bench_artifact(digits_builds[0], t.name, repeats=2)
    if gpu_here and not cuda_driver_present():
        with pytest.raises(ArqError, match="NVIDIA GPU"):
            bench_artifact(digits_builds[0], gpu_here[0].name, repeats=2)


def test_measure_isolated_times_each_runtime_in_its_own_process(digits_builds):
    """The study's timings: an ONNX file (onnxruntime) and a TVM artifact, each timed in a fresh process that runs
    the given plan; this process starts no runtime thread for them."""
    import threading
    from pathlib import Path

    from arq_deploy.targets.isolated import measure_isolated

    onnx_path, art = digits_builds
    before = len(list(Path("/proc/self/task").iterdir())), threading.active_count()
    for model, target in ((onnx_path, "x86"), (art, None)):
        t1, tb = measure_isolated(model, target, [(1, 12, 2), (48, 3, 1)], seed=1)
        assert (t1.batch, t1.repeats, tb.batch, tb.repeats) == (1, 12, 48, 3)
        for t in (t1, tb):
            assert 0 < t.min_ms <= t.p50_ms <= t.p90_ms <= t.p99_ms
            assert t.images_per_s == pytest.approx(t.batch / (t.p50_ms / 1e3), rel=1e-6)
    assert (len(list(Path("/proc/self/task").iterdir())), threading.active_count()) == before


def test_measure_isolated_bad_input(digits_builds, tmp_path):
    from arq_deploy.targets.isolated import measure_isolated

    onnx_path, art = digits_builds
    with pytest.raises(ArqError, match="does not exist"):
        measure_isolated(tmp_path / "missing.onnx")
    with pytest.raises(ArqError, match="compiled for target 'x86'"):
        measure_isolated(art, "x86-avx2", [(1, 2, 0)])
    with pytest.raises(ArqError, match="measurement plan"):
        measure_isolated(onnx_path, None, [(0, 5, 1)])
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ArqError, match="onnxruntime cannot load") as e:
        measure_isolated(bad)
    assert "\n" not in str(e.value)
