"""`--target` / `--backend` choose where a model runs for certify, check and bench; each stage writes its config
beside its output; a refused run leaves no file behind."""

import json
import socket

import pytest

from arq_deploy.core.config import BenchConfig, CertifyConfig, CompileConfig, ExportConfig
from arq_deploy.runtime.runners import cuda_driver_present


def one_line_error(rc, err, *fragments):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:"), (rc, err)
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture(scope="module")
def exported(cli, digits_model, tmp_path_factory):
    """The digits model's W8A8 export by the CLI, and the CLI's compile of it for x86."""
    _, ckpt = digits_model
    d = tmp_path_factory.mktemp("cli-targets")
    rc, out, err = cli("export", "--weights", ckpt, "--bits", "8", "--calib-images", "64", "--validate-images", "100",
                       "--out", d / "m.onnx")
    assert rc == 0, err
    rc, out, err = cli("compile", d / "m.onnx", "--target", "x86", "--batch-size", "20", "--out", d / "art")
    assert rc == 0, err
    return d


def test_export_and_compile_write_their_configs(exported, digits_model):
    cfg = ExportConfig.load(exported / "m.config.json")
    assert cfg.model.weights == str(digits_model[1]) and cfg.policy.describe() == "W8A8" and cfg.calib_images == 64
    comp = CompileConfig.load(exported / "art.config.json")
    assert comp.target == "x86" and comp.batch_size == 20 and comp.onnx == str(exported / "m.onnx")
    assert not (exported / "art" / "art.config.json").exists()  # the artifact holds only hashed files


def test_certify_on_x86_with_each_backend_gives_the_same_certificates(cli, exported, tmp_path):
    """onnxruntime on the QDQ model and TVM on its artifact, both on --target x86, certify the same test images
    with the same seeded noise; the config written beside the log says what ran."""
    common = ("--sigma", "0.25", "--n0", "20", "--n", "200", "--skip", "60", "--target", "x86")
    rc, _, err = cli("certify", exported / "m.onnx", *common, "--out", tmp_path / "ort.tsv")
    assert rc == 0, err
    rc, _, err = cli("certify", exported / "art", *common, "--backend", "tvm", "--out", tmp_path / "tvm.tsv")
    assert rc == 0, err
    cfg = CertifyConfig.load(tmp_path / "tvm.config.json")
    assert (cfg.target, cfg.backend, cfg.n, cfg.n0, cfg.alpha, cfg.seed) == ("x86", "tvm", 200, 20, 0.001, 0)
    meta = json.loads((tmp_path / "tvm.summary.json").read_text())["meta"]
    assert meta["target"] == "x86" and meta["backend"] == "tvm"

    def rows(p):
        lines = p.read_text().splitlines()[2:]
        return [ln.split("\t")[:4] for ln in lines]  # idx, label, predict, radius

    ort, tvm = rows(tmp_path / "ort.tsv"), rows(tmp_path / "tvm.tsv")
    assert len(ort) == len(tvm) >= 5
    agree = sum(a[2] == b[2] for a, b in zip(ort, tvm))
    assert agree >= len(ort) - 1  # the TVM build and onnxruntime agree to float rounding on the same noise


@pytest.mark.skipif(cuda_driver_present(), reason="this machine has an NVIDIA driver: the refusal cannot be seen")
@pytest.mark.parametrize("model", ["m.onnx", "art"])
def test_certify_target_cuda_without_a_gpu_is_one_line_and_no_file(cli, exported, tmp_path, model):
    out = tmp_path / "cuda.tsv"
    rc, _, err = cli("certify", exported / model, "--target", "cuda", "--sigma", "0.25", "--out", out)
    if model == "art":  # an x86 artifact is not a CUDA one: that is said before any device is looked for
        one_line_error(rc, err, "compiled for target 'x86'", "cuda")
    else:
        one_line_error(rc, err, "'cuda'", "GPU")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(cuda_driver_present(), reason="this machine has an NVIDIA driver")
def test_bench_and_check_take_target_cuda_too(cli, exported, tmp_path):
    rc, _, err = cli("bench", exported / "m.onnx", "--target", "cuda", "--repeats", "2", "--out", tmp_path / "b.json")
    one_line_error(rc, err, "GPU")
    rc, _, err = cli("check", "systematic", exported / "m.onnx", "--target", "cuda", "--out", tmp_path / "chk")
    one_line_error(rc, err, "GPU")
    assert list(tmp_path.iterdir()) == []


def test_certify_ray_to_an_unreachable_address_leaves_no_file(cli, exported, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, _, err = cli("certify", exported / "m.onnx", "--sigma", "0.25", "--ray", f"127.0.0.1:{port}",
                     "--out", tmp_path / "ray.tsv")
    one_line_error(rc, err, f"127.0.0.1:{port}")
    assert list(tmp_path.iterdir()) == []


def test_bench_with_the_qemu_backend_needs_an_aarch64_artifact(cli, exported, tmp_path):
    rc, _, err = cli("bench", exported / "m.onnx", "--backend", "qemu", "--out", tmp_path / "b.json")
    one_line_error(rc, err, "compiled artifacts")
    rc, out, err = cli("bench", exported / "art", "--repeats", "3", "--warmup", "1", "--batch", "20",
                       "--out", tmp_path / "b.json")
    assert rc == 0, err
    cfg = BenchConfig.load(tmp_path / "b.config.json")
    assert cfg.repeats == 3 and cfg.batch == 20
    assert json.loads((tmp_path / "b.json").read_text())["target"] == "x86"
