import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from arq_deploy.core.errors import ExportMismatchError, ModelFormatError
from arq_deploy.core.policy import QuantPolicy
from arq_deploy.export.pipeline import export_and_validate
from arq_deploy.export.qdq import load_onnx, read_metadata
from arq_deploy.export.quantize.layers import extract_layer_specs
from arq_deploy.runtime.runners import OrtRunner

MIXED_BITS = [(8, 8), (2, 8), (4, 4), (6, 6), (8, 8)]


def mixed_policy(specs):
    return QuantPolicy.for_layers([s.name for s in specs], MIXED_BITS)


@pytest.fixture(scope="module")
def digits_exports(digits, digits_model, tmp_path_factory):
    train_ds, test_ds = digits
    lm, _ = digits_model
    specs = extract_layer_specs(lm.model, lm.input_shape)
    out = tmp_path_factory.mktemp("exp")
    res = {name: export_and_validate(lm, pol, train_ds, test_ds, out / f"{name}.onnx", sigma=0.25)
           for name, pol in (("w8a8", QuantPolicy.uniform(8)), ("mixed", mixed_policy(specs)))}
    res["int4"] = export_and_validate(lm, mixed_policy(specs), train_ds, test_ds, out / "int4.onnx", sigma=0.25,
                                      int4_weights=True)
    return out, res, specs


def _q_nodes(model, op):
    return [n for n in model.graph.node if n.op_type == op]


def test_export_report_and_metadata(digits_exports):
    out, res, specs = digits_exports
    for name in ("w8a8", "mixed"):
        rep = json.loads((out / f"{name}.export.json").read_text())
        assert rep["validation"]["top1_agreement"] >= 0.99
        assert rep["validation"]["noisy_top1_agreement"] >= 0.99
        assert rep["validation"]["images"] == 540
        model = load_onnx(out / f"{name}.onnx")
        meta = read_metadata(model)
        assert meta["bops"] == rep["bops"] and meta["sigma"] == 0.25
        assert QuantPolicy.from_dict(meta["policy"]).bops(specs) == rep["bops"]
        assert meta["mean"] and meta["std"] and meta["input_shape"] == [1, 8, 8]
    assert res["w8a8"]["bops_fraction"] == pytest.approx(64 / 1024)


def test_graph_structure_qcdq(digits_exports):
    out, _, specs = digits_exports
    model = onnx.load(str(out / "mixed.onnx"))
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: t for t in model.graph.initializer}
    # normalisation is the first op on the pixel input
    assert model.graph.node[0].op_type == "Sub" and model.graph.node[0].input[0] == "input"
    assert len(_q_nodes(model, "QuantizeLinear")) == len(specs)
    clips = {n.name.split("/")[0] for n in _q_nodes(model, "Clip")}
    assert clips == {s.name for s, (w, a) in zip(specs, MIXED_BITS) if a < 8}
    for s, (w, a) in zip(specs, MIXED_BITS):
        q = numpy_helper.to_array(inits[f"{s.name}.weight_q"])
        zp = numpy_helper.to_array(inits[f"{s.name}.weight_zp"])
        if (w, a) == (8, 8):  # uint8 container, zero point 128: onnxruntime's exact u8u8 kernels
            assert q.dtype == np.uint8 and np.all(zp == 128) and q.min() >= 1
            q = q.astype(np.int16) - 128
        else:
            assert q.dtype == np.int8 and np.all(zp == 0)
        assert np.abs(q).max() <= 2 ** (w - 1) - 1
        assert f"{s.name}.weight" not in inits  # no float copy of the weights left behind
        if a < 8:  # QuantizeLinear -> Clip(0, 2^a - 1) on the uint8 levels -> DequantizeLinear
            lo, hi = (numpy_helper.to_array(inits[f"{s.name}.input_{k}"]) for k in ("lo", "hi"))
            assert lo.dtype == hi.dtype == np.uint8 and int(lo) == 0 and int(hi) == 2**a - 1
            clip = next(n for n in model.graph.node if n.name == f"{s.name}/input_clip")
            producer = next(n for n in model.graph.node if clip.input[0] in n.output)
            consumer = next(n for n in model.graph.node if clip.output[0] in n.input)
            assert (producer.op_type, consumer.op_type) == ("QuantizeLinear", "DequantizeLinear")


def test_int4_weights_native(digits_exports):
    out, res, specs = digits_exports
    model = onnx.load(str(out / "int4.onnx"))
    types = {t.name: t.data_type for t in model.graph.initializer}
    low = [s.name for s, (w, a) in zip(specs, MIXED_BITS) if w <= 4]
    assert all(types[f"{n}.weight_q"] == TensorProto.INT4 for n in low)
    assert res["int4"]["validation"]["top1_agreement"] >= 0.99
    # same numbers as the int8-container export
    x = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    a, b = OrtRunner(out / "int4.onnx")(x), OrtRunner(out / "mixed.onnx")(x)
    assert np.allclose(a, b, atol=1e-5)


def test_mismatch_raises_and_writes_nothing(digits, digits_model, tmp_path):
    train_ds, test_ds = digits
    lm, _ = digits_model
    with pytest.raises(ExportMismatchError, match="agreement"):
        export_and_validate(lm, QuantPolicy.uniform(8), train_ds, test_ds, tmp_path / "m.onnx", min_agreement=1.01)
    assert list(tmp_path.iterdir()) == []


def test_malformed_onnx(tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ModelFormatError):
        load_onnx(p)
    with pytest.raises(ModelFormatError):
        OrtRunner(p)
    # a model in memory that onnxruntime rejects: one line naming "the model", not the model's text
    bad = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []), ir_version=99)
    for src in (bad, bad.SerializeToString(), b"\x08\x07garbage"):
        with pytest.raises(ModelFormatError, match="cannot load the model") as e:
            OrtRunner(src)
        assert "\n" not in str(e.value) and len(str(e.value)) < 400


@pytest.mark.shared_data
def test_resnet20_w8a8_export_accuracy(models_dir, cifar_dir, tmp_path):
    """Issue 2's acceptance: W8A8 ResNet-20 through onnxruntime keeps >= 90.5% on the 1,000 lossless images."""
    from arq_deploy.core.data import load_dataset
    from arq_deploy.export.pipeline import load

    lm = load("resnet20", str(models_dir / "resnet20-12fca82f.th"))
    res = export_and_validate(lm, QuantPolicy.uniform(8), load_dataset(str(cifar_dir), "train"),
                              load_dataset(str(cifar_dir), "test"), tmp_path / "r20.onnx")
    v = res["validation"]
    assert v["images"] == 1000
    assert v["accuracy_candidate"] >= 0.905
    assert v["top1_agreement"] >= 0.99
