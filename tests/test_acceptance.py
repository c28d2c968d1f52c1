"""End-to-end acceptance of the foundation: the demo, and a mixed-precision ResNet-20 through onnxruntime and TVM."""

import json

import pytest
from conftest import R20_MIXED_POLICY

from arq_deploy.core.policy import QuantPolicy


def test_demo_fast_end_to_end(cli, tmp_path):
    rc, out, err = cli("demo", "--fast", "--out", tmp_path / "demo")
    assert rc == 0, err
    res = json.loads((tmp_path / "demo" / "demo.json").read_text())
    rows = {(r["policy"], r["backend"]): r for r in res["rows"]}
    assert set(rows) == {("float", "torch"), ("float", "onnxruntime"), ("W8A8", "onnxruntime"), ("W8A8", "tvm"),
                         ("mixed", "onnxruntime"), ("mixed", "tvm")}
    assert rows[("float", "torch")]["clean_acc"] > 0.8
    # the same quantized model certifies identically whichever runtime runs it (same seeded noise)
    for p in ("W8A8", "mixed"):
        a, b = rows[(p, "onnxruntime")], rows[(p, "tvm")]
        assert abs(a["acr"] - b["acr"]) < 0.02 and abs(a["clean_acc"] - b["clean_acc"]) < 0.01
    assert rows[("mixed", "tvm")]["bops_pct"] < rows[("W8A8", "tvm")]["bops_pct"] == pytest.approx(6.25)
    assert "ACR" in out and "mixed" in out
    for f in ("digits_cnn.W8A8.onnx", "digits_cnn.mixed.export.json", "targets/x86-mixed/manifest.json"):
        assert (tmp_path / "demo" / f).exists()


@pytest.mark.shared_data
@pytest.mark.slow  # run by .ci/run (SLOW_TESTS); keeps `make test` near 15 minutes
def test_resnet20_mixed_policy_onnxruntime_and_tvm_agree_with_torch(models_dir, cifar_dir, tmp_path):
    """Issue 2's acceptance: a policy with 2-, 4- and 6-bit layers exports, and onnxruntime and TVM both agree with
    the torch fake-quant model on >= 99% of the 1,000 lossless test images."""
    from arq_deploy.core.data import load_dataset
    from arq_deploy.export.pipeline import export_and_validate, load, pick, quantize_calibrated
    from arq_deploy.runtime.runners import OrtRunner, TorchRunner
    from arq_deploy.runtime.tvm_runner import TvmRunner
    from arq_deploy.targets.backends import compile_onnx

    policy = QuantPolicy.from_dict(R20_MIXED_POLICY)
    lm = load("resnet20", str(models_dir / "resnet20-12fca82f.th"))
    train, test = load_dataset(str(cifar_dir), "train"), load_dataset(str(cifar_dir), "test")
    res = export_and_validate(lm, policy, train, test, tmp_path / "mixed.onnx")
    assert {l["bits"] for l in res["layers"]} >= {"W2A8", "W4A4", "W6A6"}
    assert 0.02 < res["bops_fraction"] < 0.04
    art = compile_onnx(tmp_path / "mixed.onnx", target="x86", out_dir=tmp_path / "x86", batch_size=100)
    q, _ = quantize_calibrated(lm, policy, train.x(pick(len(train), 512, 0)), 0.0, 0)  # same seed: same model
    x = test.x()
    ref = TorchRunner(q, lm.input_shape, 10)(x).argmax(1)
    for runner in (OrtRunner(tmp_path / "mixed.onnx"), TvmRunner(art)):
        pred = runner(x).argmax(1)
        assert (pred == ref).mean() >= 0.99, runner.name
        assert (pred == test.labels).mean() > 0.85
