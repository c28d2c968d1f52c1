"""The ONNX graphs authored with onnxscript's builder and IR: export/smoothing_graph.py and export/qdq.py
(deploy/runtime/graph_opt.py's pattern rewrite is tested in test_graph_opt.py).

The expected node lists, initializers and attributes below are what the former onnx.helper implementations wrote for
the same models: the rewrite must produce the same graphs (node names aside where the old code left them empty) and,
run by onnxruntime, the same numbers.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from arq_deploy.export.qdq import check, float_onnx, insert_qdq
from arq_deploy.export.quantize.quant import quant_layers
from arq_deploy.export.smoothing_graph import rename_input, smoothing_graph

P = "arq_smooth/"
K = 3


def _classifier(opset: int = 11, input_name: str = "input") -> onnx.ModelProto:
    """input N×2×4×4 -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> logits N×3."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "conv.w"),
             numpy_helper.from_array(rng.standard_normal((K, 3)).astype(np.float32) * 4, "fc.w"),
             numpy_helper.from_array(np.array([10, 28, -8], np.float32), "fc.b")]  # logits close at x
    nodes = [helper.make_node("Conv", [input_name, "conv.w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1, name="fc")]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 2, 4, 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", K])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def _classifier_nodes(inp):
    return [("Conv", [inp, "conv.w"], ["c"]), ("Relu", ["c"], ["r"]), ("GlobalAveragePool", ["r"], ["p"]),
            ("Flatten", ["p"], ["f"]), ("Gemm", ["f", "fc.w", "fc.b"], ["logits"])]


ONEHOT = [("ArgMax", ["logits"], [P + "argmax"]), ("OneHot", [P + "argmax", P + "depth", P + "onoff"], [P + "onehot"]),
          ("ReduceSum", [P + "onehot", P + "axis0"], ["counts"])]
EQUAL = [("ArgMax", ["logits"], [P + "argmax"]), ("Unsqueeze", [P + "argmax", P + "axis1"], [P + "argmax_col"]),
         ("Equal", [P + "argmax_col", P + "classes"], [P + "hit"]), ("Cast", [P + "hit"], [P + "onehot"]),
         ("ReduceSum", [P + "onehot", P + "axis0"], ["counts"])]
PLAIN_INPUTS = [("x", [1, 2, 4, 4]), ("noise", ["batch", 2, 4, 4]), ("sigma", [])]

# kwargs -> (nodes in front of the classifier's, the classifier's input name there, counting nodes, graph inputs,
#            counts dims, arq_smooth/* initializers, ReduceSum keepdims, model properties)
FORMS = {
    "plain": ({}, [("Mul", ["noise", "sigma"], [P + "scaled"]), ("Add", ["x", P + "scaled"], ["input"])], "input",
              ONEHOT, PLAIN_INPUTS, [K], {"axis0": [0], "depth": K, "onoff": [0, 1]}, 0,
              {"arq.smoothing_graph": "x,noise,sigma", "arq.num_classes": "3"}),
    "equal": ({"count_op": "equal"}, [("Mul", ["noise", "sigma"], [P + "scaled"]),
                                       ("Add", ["x", P + "scaled"], ["input"])], "input",
              EQUAL, PLAIN_INPUTS, [K], {"axis0": [0], "classes": [0, 1, 2], "axis1": [1]}, 0,
              {"arq.smoothing_graph": "x,noise,sigma", "arq.num_classes": "3"}),
    "packed": ({"packed": True, "sigma": 0.25},
               [("Slice", ["input", P + "s0", P + "s1", P + "s0"], [P + "x"]),
                ("Slice", ["input", P + "s1", P + "send", P + "s0"], [P + "noise"]),
                ("Mul", [P + "noise", P + "sigma"], [P + "scaled"]), ("Add", [P + "x", P + "scaled"], ["model_input"])],
               "model_input", ONEHOT, [("input", ["n", 2, 4, 4])], [1, K],
               {"s0": [0], "s1": [1], "send": [2**63 - 1], "sigma": 0.25, "axis0": [0], "depth": K, "onoff": [0, 1]}, 1,
               {"arq.smoothing_graph": "packed", "arq.num_classes": "3", "arq.sigma": "0.25"}),
    "in_graph_noise": ({"in_graph_noise": 6, "sigma": 0.5},
                       [("RandomNormal", [], [P + "noise"]), ("Mul", [P + "noise", P + "sigma"], [P + "scaled"]),
                        ("Add", ["x", P + "scaled"], ["input"])], "input", ONEHOT, [("x", [1, 2, 4, 4])], [K],
                       {"sigma": 0.5, "axis0": [0], "depth": K, "onoff": [0, 1]}, 0,
                       {"arq.smoothing_graph": "in_graph_noise", "arq.num_classes": "3", "arq.sigma": "0.5"}),
}


def _wiring(model):
    return [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]


def _attrs(model, op_type):
    node = next(n for n in model.graph.node if n.op_type == op_type)
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _dims(vi):
    t = vi.type.tensor_type
    return t.elem_type, [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]


@pytest.mark.parametrize("form", FORMS)
def test_smoothing_graph_is_the_helper_built_graph(form):
    kwargs, front, model_input, count, inputs, counts_dims, inits, keepdims, props = FORMS[form]
    classifier = _classifier()
    before = classifier.SerializeToString()
    g = smoothing_graph(classifier, **kwargs)
    assert classifier.SerializeToString() == before  # the classifier is not touched (the packed form renames a copy)
    assert _wiring(g) == front + _classifier_nodes(model_input) + count
    assert [(i.name, *_dims(i)) for i in g.graph.input] == [(n, TensorProto.FLOAT, d) for n, d in inputs]
    assert [(o.name, *_dims(o)) for o in g.graph.output] == [("counts", TensorProto.INT64, counts_dims)]
    got = {i.name: numpy_helper.to_array(i) for i in g.graph.initializer}
    assert {k: v.tolist() for k, v in got.items() if k.startswith(P)} == {P + k: v for k, v in inits.items()}
    assert all(got[P + k].dtype == (np.float32 if k == "sigma" else np.int64) for k in inits)
    assert {"conv.w", "fc.w", "fc.b"} <= set(got)
    assert _attrs(g, "ArgMax") == {"axis": 1, "keepdims": 0}
    assert _attrs(g, "ReduceSum") == {"keepdims": keepdims}
    assert _attrs(g, "Gemm") == {"transB": 1} and _attrs(g, "Conv") == {"pads": [1, 1, 1, 1]}
    if form == "equal":
        assert _attrs(g, "Cast") == {"to": TensorProto.INT64}
    else:
        assert _attrs(g, "OneHot") == {"axis": -1}
    if form == "in_graph_noise":
        assert _attrs(g, "RandomNormal") == {"dtype": TensorProto.FLOAT, "mean": 0.0, "scale": 1.0,
                                             "shape": [6, 2, 4, 4]}
    assert {p.key: p.value for p in g.metadata_props} == props
    assert (g.ir_version, g.producer_name, g.graph.name) == (10, "arq-deploy smoothing_graph", "arq_smoothing_graph")
    assert [(o.domain, o.version) for o in g.opset_import] == [("", 13)]  # opset 11 raised to 13 (ReduceSum axes)
    onnx.checker.check_model(g, full_check=True)


def _session(model):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("form", ["plain", "equal", "packed"])
def test_smoothing_graph_counts_equal_the_classifier_on_the_noisy_batch(form):
    """x + σ·ε (Mul then Add in float32, as numpy computes it) through the classifier, argmax, counted."""
    kwargs, *_ = FORMS[form]
    classifier = _classifier(input_name="pixels" if form == "packed" else "input")
    rng = np.random.default_rng(1)
    x, eps, sigma = rng.random((1, 2, 4, 4), dtype=np.float32), rng.standard_normal((200, 2, 4, 4), np.float32), 0.25
    logits = _session(classifier).run(None, {classifier.graph.input[0].name: x + np.float32(sigma) * eps})[0]
    want = np.bincount(logits.argmax(1), minlength=K)
    assert (want > 0).sum() >= 2  # the noise changes the class sometimes: the counts say something
    g = smoothing_graph(classifier, **kwargs)
    if form == "packed":
        assert ("Add", ["arq_smooth/x", "arq_smooth/scaled"], ["pixels"]) in _wiring(g)  # no rename needed
        got = _session(g).run(None, {"input": np.concatenate([x, eps])})[0]
        assert got.shape == (1, K)
        got = got[0]
    else:
        got = _session(g).run(None, {"x": x, "noise": eps, "sigma": np.array(sigma, np.float32)})[0]
    assert got.dtype == np.int64 and np.array_equal(got, want)


def test_smoothing_graph_keeps_a_newer_opset_and_refuses_what_it_cannot_wrap():
    assert [(o.domain, o.version) for o in smoothing_graph(_classifier(opset=17)).opset_import] == [("", 17)]
    m = _classifier()
    with pytest.raises(ValueError, match="pass sigma"):
        smoothing_graph(m, packed=True)
    with pytest.raises(ValueError, match="choose one"):
        smoothing_graph(m, packed=True, in_graph_noise=4, sigma=0.5)
    with pytest.raises(ValueError, match="count_op"):
        smoothing_graph(m, count_op="bincount")
    two = _classifier()
    two.graph.output.append(helper.make_tensor_value_info("f", TensorProto.FLOAT, ["N", 3]))
    with pytest.raises(ValueError, match="one input"):
        smoothing_graph(two)
    flat = _classifier()
    flat.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "h"
    with pytest.raises(ValueError, match="fixed C, H, W"):
        smoothing_graph(flat)


def test_rename_input():
    m = _classifier()
    r = rename_input(m, "pixels")
    assert [i.name for i in r.graph.input] == ["pixels"] and r.graph.node[0].input[0] == "pixels"
    assert m.graph.input[0].name == "input" and m.graph.node[0].input[0] == "input"
    x = np.random.default_rng(2).random((5, 2, 4, 4), dtype=np.float32)
    assert np.array_equal(_session(r).run(None, {"pixels": x})[0], _session(m).run(None, {"input": x})[0])


# ------------------------------------------------------------------------------------------------ QDQ
MIXED_BITS = [(8, 8), (2, 8), (4, 4), (6, 6), (8, 8)]  # conv1..conv4, linear of digits_cnn

MIXED_OPS = ["Sub", "Div",
             "DequantizeLinear", "QuantizeLinear", "DequantizeLinear", "Conv", "Relu",
             "DequantizeLinear", "QuantizeLinear", "DequantizeLinear", "Conv", "Relu",
             "DequantizeLinear", "QuantizeLinear", "Clip", "DequantizeLinear", "Conv", "Relu",
             "DequantizeLinear", "QuantizeLinear", "Clip", "DequantizeLinear", "Conv", "Relu",
             "ReduceMean", "Reshape",
             "DequantizeLinear", "DequantizeLinear", "QuantizeLinear", "DequantizeLinear", "Gemm"]
PWLQ_LAYER = ["DequantizeLinear", "DequantizeLinear", "Add", "QuantizeLinear", "Clip", "DequantizeLinear"]
PWLQ_OPS = ["Sub", "Div", *PWLQ_LAYER, "Conv", "Relu", *PWLQ_LAYER, "Conv", "Relu", *PWLQ_LAYER, "Conv", "Relu",
            *PWLQ_LAYER, "Conv", "Relu", "ReduceMean", "Reshape", "DequantizeLinear", "DequantizeLinear", "Add",
            "DequantizeLinear", "QuantizeLinear", "Clip", "DequantizeLinear", "Gemm"]


def _ours(model, layer):
    """(op, name, inputs, outputs, axis) of the nodes insert_qdq added for a layer, then the layer's own node."""
    out = []
    for n in model.graph.node:
        if n.name.startswith(f"{layer}/"):
            out.append((n.op_type, n.name, list(n.input), list(n.output),
                        next((a.i for a in n.attribute if a.name == "axis"), None)))
        elif f"{layer}.input_dq" in n.input:
            out.append((n.op_type, "", list(n.input), list(n.output), None))
    return out


def _float_io(fgraph, layer):
    """The float graph's input and output names of the layer's node (the exporter's names)."""
    node = next(n for n in fgraph.graph.node if len(n.input) > 1 and n.input[1] == f"{layer}.weight")
    return node.input[0], node.output[0]


def _dq(layer, tag, axis=None):
    return ("DequantizeLinear", f"{layer}/{tag}_dq", [f"{layer}.{tag}_q", f"{layer}.{tag}_scale", f"{layer}.{tag}_zp"],
            [f"{layer}.{tag}_dq"], axis)


@pytest.fixture(scope="module")
def digits_qdq():
    """An (untrained, seeded) digits CNN calibrated under the mixed policy and under 4-bit PWLQ, with its float
    exports (opset 21 too, for native INT4 weights)."""
    from arq_deploy.core.data import load_dataset
    from arq_deploy.core.policy import QuantPolicy
    from arq_deploy.export.pipeline import load, quantize_calibrated
    from arq_deploy.export.quantize.layers import extract_layer_specs

    torch.manual_seed(0)
    lm = load("digits_cnn", None)
    calib = load_dataset("digits", "train").x(np.arange(128))
    names = [s.name for s in extract_layer_specs(lm.model, lm.input_shape)]
    mixed, _ = quantize_calibrated(lm, QuantPolicy.for_layers(names, MIXED_BITS), calib, 0.25)
    pwlq, _ = quantize_calibrated(lm, QuantPolicy.uniform(4), calib, 0.25, method="pwlq")
    x = load_dataset("digits", "test").x(np.arange(64))
    return {"mixed": (mixed, float_onnx(mixed, lm.input_shape)), "pwlq": (pwlq, float_onnx(pwlq, lm.input_shape)),
            "mixed21": (mixed, float_onnx(mixed, lm.input_shape, opset=21))}, x


def _torch_logits(qmodel, x):
    with torch.no_grad():
        return qmodel(torch.from_numpy(x)).numpy()


def test_insert_qdq_is_the_helper_built_graph(digits_qdq):
    cases, x = digits_qdq
    qmodel, fgraph = cases["mixed"]
    model = copy.deepcopy(fgraph)
    assert insert_qdq(model, qmodel) is model  # in place, as export_qdq and the search's latency tables use it
    check(model)
    assert [n.op_type for n in model.graph.node] == MIXED_OPS
    (c3_in, c3_out), (fc_in, fc_out) = _float_io(fgraph, "conv3"), _float_io(fgraph, "linear")
    # a 4-bit activation: QuantizeLinear -> Clip(0, 15) on the uint8 levels -> DequantizeLinear
    assert _ours(model, "conv3") == [
        _dq("conv3", "weight", 0),
        ("QuantizeLinear", "conv3/input_q", [c3_in, "conv3.input_scale", "conv3.input_zp"], ["conv3.input_q8"], None),
        ("Clip", "conv3/input_clip", ["conv3.input_q8", "conv3.input_lo", "conv3.input_hi"], ["conv3.input_q"], None),
        ("DequantizeLinear", "conv3/input_dq", ["conv3.input_q", "conv3.input_scale", "conv3.input_zp"],
         ["conv3.input_dq"], None),
        ("Conv", "", ["conv3.input_dq", "conv3.weight_dq"], [c3_out], None)]
    # the Gemm: weight and int32 bias through DequantizeLinear (axis 0: transB = 1 stores [out, in])
    assert _ours(model, "linear") == [
        _dq("linear", "weight", 0), _dq("linear", "bias", 0),
        ("QuantizeLinear", "linear/input_q", [fc_in, "linear.input_scale", "linear.input_zp"], ["linear.input_q"],
         None),
        ("DequantizeLinear", "linear/input_dq", ["linear.input_q", "linear.input_scale", "linear.input_zp"],
         ["linear.input_dq"], None),
        ("Gemm", "", ["linear.input_dq", "linear.weight_dq", "linear.bias_dq"], [fc_out], None)]
    inits = {t.name: t for t in model.graph.initializer}
    types = {k: inits[k].data_type for k in inits if k.startswith(("conv3.", "linear."))}
    U8, I8, I32, F = TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32, TensorProto.FLOAT
    assert types == {"conv3.input_hi": U8, "conv3.input_lo": U8, "conv3.input_scale": F, "conv3.input_zp": U8,
                     "conv3.weight_q": I8, "conv3.weight_scale": F, "conv3.weight_zp": I8,
                     "linear.bias_q": I32, "linear.bias_scale": F, "linear.bias_zp": I32, "linear.input_scale": F,
                     "linear.input_zp": U8, "linear.weight_q": U8, "linear.weight_scale": F, "linear.weight_zp": U8}
    assert int(numpy_helper.to_array(inits["conv3.input_hi"])) == 15
    assert not {f"{n}.weight" for n in ("conv1", "conv2", "conv3", "conv4", "linear")} & set(inits)
    assert "linear.bias" not in inits
    # onnxruntime computes what the fake-quant torch model computes
    a, t = _session(model).run(None, {"input": x})[0], _torch_logits(qmodel, x)
    assert np.abs(a - t).max() <= 1e-4 * np.abs(t).max()


def test_insert_qdq_pwlq_pieces_and_int4(digits_qdq):
    cases, x = digits_qdq
    qmodel, fgraph = cases["pwlq"]
    model = insert_qdq(copy.deepcopy(fgraph), qmodel)
    check(model)
    assert [n.op_type for n in model.graph.node] == PWLQ_OPS
    assert _ours(model, "linear")[:3] == [
        _dq("linear", "weight", 0), _dq("linear", "weight_tail", 0),
        ("Add", "linear/weight_add1", ["linear.weight_dq", "linear.weight_tail_dq"], ["linear.weight_sum"], None)]
    t = _torch_logits(qmodel, x)
    assert np.abs(_session(model).run(None, {"input": x})[0] - t).max() <= 1e-4 * np.abs(t).max()

    qmodel, fgraph = cases["mixed21"]
    native = insert_qdq(copy.deepcopy(fgraph), qmodel, int4_weights=True)
    check(native)
    types = {t.name: t.data_type for t in native.graph.initializer}
    assert [types[f"{n}.weight_q"] for n in ("conv1", "conv2", "conv3", "conv4", "linear")] == [
        TensorProto.UINT8, TensorProto.INT4, TensorProto.INT4, TensorProto.INT8, TensorProto.UINT8]
    assert types["conv2.weight_zp"] == types["conv3.weight_zp"] == TensorProto.INT4
    assert [n.op_type for n in native.graph.node] == MIXED_OPS
    container = insert_qdq(copy.deepcopy(fgraph), qmodel)
    a, b = (_session(m).run(None, {"input": x})[0] for m in (native, container))
    assert np.array_equal(a, b)  # the same dequantized weights, whichever container holds them


def test_insert_qdq_finds_a_transposed_matmul_weight_by_value(digits_qdq):
    """The float graph with the Gemm written as MatMul(x, Wᵀ) + Add under another weight name: the layer is found by
    its weight values, quantized along axis 1 of the [in, out] weight, and computes what the Gemm version does (the
    bias, no longer a node input, stays float: at most one bias quantization step apart)."""
    cases, x = digits_qdq
    qmodel, fgraph = cases["mixed"]
    g = copy.deepcopy(fgraph)
    gemm = next(n for n in g.graph.node if n.op_type == "Gemm")
    inits = {t.name: t for t in g.graph.initializer}
    w = numpy_helper.to_array(inits[gemm.input[1]])
    g.graph.initializer.remove(inits[gemm.input[1]])
    g.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "fc_matmul_w"))
    i = list(g.graph.node).index(gemm)
    new = [helper.make_node("MatMul", [gemm.input[0], "fc_matmul_w"], ["mm"], name="mm"),
           helper.make_node("Add", ["mm", gemm.input[2]], list(gemm.output), name="mm_bias")]
    g.graph.node.remove(gemm)
    for n in reversed(new):
        g.graph.node.insert(i, n)
    insert_qdq(g, qmodel)
    check(g)
    dq = next(n for n in g.graph.node if n.name == "linear/weight_dq")
    assert [a.i for a in dq.attribute if a.name == "axis"] == [1]
    inits = {t.name: numpy_helper.to_array(t) for t in g.graph.initializer}
    assert inits["linear.weight_q"].shape == (w.shape[1], w.shape[0]) and "fc_matmul_w" not in inits
    mm = next(n for n in g.graph.node if n.op_type == "MatMul")
    assert list(mm.input) == ["linear.input_dq", "linear.weight_dq"]
    gemm_model = insert_qdq(copy.deepcopy(fgraph), qmodel)
    a, b = (_session(m).run(None, {"input": x})[0] for m in (g, gemm_model))
    assert np.abs(a - b).max() <= float(quant_layers(qmodel)["linear"].bias_scale().max()) + 1e-7
