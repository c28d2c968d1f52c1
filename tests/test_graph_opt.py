"""export.graph_opt: the option-A shortcut as a 1×1 strided convolution (exact), and the runners that load it."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from arq_deploy.export.qdq import float_onnx
from arq_deploy.runtime.graph_opt import for_onnxruntime, ort_source, shortcut_to_conv


@pytest.fixture(scope="module")
def resnet20_fp32(tmp_path_factory):
    from arq_deploy.core.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    with torch.no_grad():  # non-trivial BN statistics, so the residual path carries real values
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    proto = float_onnx(model, (3, 32, 32))
    path = tmp_path_factory.mktemp("graph_opt") / "r20.onnx"
    onnx.save(proto, str(path))
    return proto, path


def _noisy(b=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((b, 3, 32, 32), dtype=np.float32)
    return x + np.float32(0.25) * rng.standard_normal(x.shape, dtype=np.float32)


def _run(model, x, level, optimized_path=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def test_resnet20_shortcuts_become_exact_convs(resnet20_fp32):
    proto, _ = resnet20_fp32
    new, k = shortcut_to_conv(proto)
    assert k == 2  # the two option-A shortcuts (stages 2 and 3)
    ops = [n.op_type for n in new.graph.node]
    assert "Slice" not in ops and "Pad" not in ops
    assert ops.count("Conv") == [n.op_type for n in proto.graph.node].count("Conv") + 2
    onnx.checker.check_model(new, full_check=True)
    x = _noisy()
    # without onnxruntime's own rewrites both graphs compute the same float32 numbers, bit for bit
    a = _run(proto, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    b = _run(new, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert np.array_equal(a, b)
    # with them (the fused residual Add adds in another order) only float32 rounding separates them
    a = _run(proto, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    b = _run(new, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert np.abs(a - b).max() < 1e-4 * max(1.0, np.abs(a).max())
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.98


def test_resnet20_rewrite_replaces_only_the_chains(resnet20_fp32):
    """Node for node: the original graph with each Slice→Slice→Pad chain replaced by a Conv that reads the chain's
    input, writes the Pad's output and carries the 0/1 weight `<pad output>__shortcut_w` (16 -> 32 and 32 -> 64
    channels: W[8 + c, c] = 1, then W[16 + c, c] = 1); the chains' constants go, everything else stays."""
    proto, _ = resnet20_fp32
    new, _ = shortcut_to_conv(proto)
    producer = {o: n for n in proto.graph.node for o in n.output}
    expected, chains = [], set()
    for n in proto.graph.node:
        if n.op_type == "Pad":
            s2 = producer[n.input[0]]
            s1 = producer[s2.input[0]]
            assert (s1.op_type, s2.op_type) == ("Slice", "Slice")
            chains.update({s1.name, s2.name})
            expected.append(("Conv", [s1.input[0], f"{n.output[0]}__shortcut_w"], list(n.output), f"{n.name}__as_conv",
                             {"kernel_shape": [1, 1], "strides": [2, 2]}))
        else:
            expected.append((n.op_type, list(n.input), list(n.output), n.name,
                             {a.name: helper.get_attribute_value(a) for a in n.attribute}))
    expected = [e for e in expected if e[3] not in chains]
    got = [(n.op_type, list(n.input), list(n.output), n.name,
            {a.name: helper.get_attribute_value(a) for a in n.attribute}) for n in new.graph.node]
    assert got == expected
    old_inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    new_inits = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    weights = {e[1][1] for e in expected if e[3].endswith("__as_conv")}
    assert len(weights) == 2 and set(new_inits) - set(old_inits) == weights
    assert all(np.array_equal(new_inits[k], old_inits[k]) for k in set(new_inits) - weights)
    assert {i for n in new.graph.node for i in n.input} >= set(new_inits)  # no constant left unread
    for w in weights:
        cin = new_inits[w].shape[1]
        want = np.zeros((2 * cin, cin, 1, 1), np.float32)
        want[np.arange(cin) + cin // 2, np.arange(cin)] = 1.0
        assert new_inits[w].dtype == np.float32 and np.array_equal(new_inits[w], want)
    assert (new.ir_version, new.opset_import) == (proto.ir_version, proto.opset_import)
    assert [i.name for i in new.graph.input] == ["input"] and [o.name for o in new.graph.output] == ["logits"]


def _optimized_ops(model, tmp_path, name):
    path = tmp_path / name
    _run(model, _noisy(4), ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized_path=path)
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_onnxruntime_keeps_the_blocked_layout_after_the_rewrite(resnet20_fp32, tmp_path):
    """The reason for the rewrite: onnxruntime's NCHWc pass no longer leaves its layout at each shortcut."""
    proto, _ = resnet20_fp32
    before = _optimized_ops(proto, tmp_path, "before.onnx")
    if "ReorderInput" not in before:
        pytest.skip("this onnxruntime build applies no NCHWc layout here")
    after = _optimized_ops(shortcut_to_conv(proto)[0], tmp_path, "after.onnx")
    reorders = lambda ops: ops.count("ReorderInput") + ops.count("ReorderOutput")  # noqa: E731
    assert reorders(before) >= 8 and before.count("Add") >= 6
    assert reorders(after) <= 2 and after.count("Add") == 0 and after.count("Relu") == 0


def _graph(nodes, inits, in_shape=(None, 4, None, None), out_shape=(None, None, None, None), opset=18):
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, list(in_shape))
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)
    g = helper.make_graph(nodes, "g", [inp], [out], [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _shortcut(starts=0, steps=2, pads=(0, 2, 0, 0, 0, 2, 0, 0), value=None):
    nodes = [helper.make_node("Slice", ["input", "s", "e", "a2", "st"], ["t1"]),
             helper.make_node("Slice", ["t1", "s", "e", "a3", "st"], ["t2"]),
             helper.make_node("Pad", ["t2", "p"] + (["v"] if value is not None else []), ["out"], mode="constant")]
    inits = {"s": np.array([starts], np.int64), "e": np.array([2**63 - 1], np.int64), "a2": np.array([2], np.int64),
             "a3": np.array([3], np.int64), "st": np.array([steps], np.int64), "p": np.array(pads, np.int64)}
    if value is not None:
        inits["v"] = np.array(value, np.float32)
    return _graph(nodes, inits)


@pytest.mark.parametrize("pads", [(0, 2, 0, 0, 0, 2, 0, 0), (0, 0, 0, 0, 0, 3, 0, 0), (0, 1, 0, 0, 0, 0, 0, 0)])
def test_channel_pads_and_strides_of_a_small_graph(pads):
    m = _shortcut(pads=pads)
    new, k = shortcut_to_conv(m)
    assert k == 1 and [n.op_type for n in new.graph.node] == ["Conv"]
    x = np.random.default_rng(1).standard_normal((3, 4, 9, 7), dtype=np.float32)  # odd sizes: ceil(H/2) rows
    a = _run(m, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    b = _run(new, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert a.shape == b.shape == (3, 4 + pads[1] + pads[5], 5, 4)
    assert np.array_equal(a, b)


def _same_on_onnxruntime(m, new, shape=(3, 4, 9, 7), seed=1):
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    a = _run(m, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    b = _run(new, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert a.shape == b.shape and np.array_equal(a, b)
    return a


def test_the_small_graph_becomes_one_conv_node_for_node():
    new, k = shortcut_to_conv(_shortcut())
    assert k == 1 and len(new.graph.node) == 1
    conv = new.graph.node[0]
    assert (conv.op_type, list(conv.input), list(conv.output), conv.name) == (
        "Conv", ["input", "out__shortcut_w"], ["out"], "out__as_conv")  # the Pad had no name: named by its output
    assert {a.name: helper.get_attribute_value(a) for a in conv.attribute} == {"kernel_shape": [1, 1],
                                                                               "strides": [2, 2]}
    (w,) = new.graph.initializer  # the Slice and Pad constants are gone
    want = np.zeros((8, 4, 1, 1), np.float32)
    want[[2, 3, 4, 5], [0, 1, 2, 3]] = 1.0
    assert w.name == "out__shortcut_w" and np.array_equal(numpy_helper.to_array(w), want)


def test_constants_from_constant_nodes():
    """Slice and Pad parameters given by Constant nodes (not initializers) are read too (the Constant nodes stay,
    as only initializers are cleaned up)."""
    m = _shortcut()
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in m.graph.initializer]
    nodes = consts + list(m.graph.node)
    del m.graph.node[:], m.graph.initializer[:]
    m.graph.node.extend(nodes)
    new, k = shortcut_to_conv(m)
    assert k == 1 and [n.op_type for n in new.graph.node] == ["Constant"] * 6 + ["Conv"]
    assert _same_on_onnxruntime(m, new).shape == (3, 8, 5, 4)


def test_opset10_pad_with_attributes():
    """Pad before opset 11 holds pads and value as attributes."""
    nodes = [helper.make_node("Slice", ["input", "s", "e", "a2", "st"], ["t1"]),
             helper.make_node("Slice", ["t1", "s", "e", "a3", "st"], ["t2"]),
             helper.make_node("Pad", ["t2"], ["out"], mode="constant", pads=[0, 1, 0, 0, 0, 3, 0, 0], value=0.0)]
    inits = {"s": np.array([0], np.int64), "e": np.array([2**31 - 1], np.int64), "a2": np.array([2], np.int64),
             "a3": np.array([3], np.int64), "st": np.array([2], np.int64)}
    m = _graph(nodes, inits, opset=10)
    onnx.checker.check_model(m, full_check=True)
    new, k = shortcut_to_conv(m)
    assert k == 1 and [n.op_type for n in new.graph.node] == ["Conv"]
    assert _same_on_onnxruntime(m, new).shape == (3, 8, 5, 4)
    m.graph.node[2].attribute[-1].f = 1.0  # a non-zero pad value is not a shortcut
    assert shortcut_to_conv(m)[1] == 0


def test_one_slice_over_both_axes():
    nodes = [helper.make_node("Slice", ["input", "s", "e", "a", "st"], ["t"]),
             helper.make_node("Pad", ["t", "p"], ["out"], mode="constant")]
    inits = {"s": np.array([0, 0], np.int64), "e": np.array([2**63 - 1] * 2, np.int64),
             "a": np.array([-1, 2], np.int64), "st": np.array([3, 2], np.int64),  # axis -1 is W: strides (2, 3)
             "p": np.array([0, 2, 0, 0, 0, 2, 0, 0], np.int64)}
    m = _graph(nodes, inits)
    new, k = shortcut_to_conv(m)
    assert k == 1 and [n.op_type for n in new.graph.node] == ["Conv"]
    assert [a.ints for a in new.graph.node[0].attribute if a.name == "strides"] == [[2, 3]]
    assert _same_on_onnxruntime(m, new).shape == (3, 8, 5, 3)


def test_a_chain_whose_first_slice_is_no_subsample_keeps_that_slice():
    """Slice(rows from 1) -> Slice(every 2nd column) -> Pad: the second Slice and the Pad still make a shortcut
    (the first Slice stays in front of the Conv); exact like every other rewrite."""
    m = _shortcut()
    m.graph.node[0].input[1] = "one"
    m.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
    new, k = shortcut_to_conv(m)
    assert k == 1 and [n.op_type for n in new.graph.node] == ["Slice", "Conv"]
    assert _same_on_onnxruntime(m, new).shape == (3, 8, 4, 4)


@pytest.mark.parametrize("kwargs", [dict(starts=1), dict(value=0.5), dict(pads=(0, 2, 1, 0, 0, 2, 0, 0)),
                                    dict(steps=-1)])
def test_other_slices_and_pads_are_left_alone(kwargs):
    m = _shortcut(**kwargs)
    new, k = shortcut_to_conv(m)
    assert k == 0
    assert [n.op_type for n in new.graph.node] == ["Slice", "Slice", "Pad"]


def test_a_slice_used_elsewhere_stays():
    """The first Slice also feeds a graph output: it stays, and only the rest of the chain becomes the conv."""
    m = _shortcut()
    m.graph.output.append(helper.make_tensor_value_info("t1", TensorProto.FLOAT, [None] * 4))
    new, k = shortcut_to_conv(m)
    assert k == 1 and [n.op_type for n in new.graph.node] == ["Slice", "Conv"]
    x = np.random.default_rng(2).standard_normal((2, 4, 8, 6), dtype=np.float32)
    a = _run(m, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    b = _run(new, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert np.array_equal(a, b) and a.shape == (2, 8, 4, 3)


def test_qdq_and_malformed_models_are_not_rewritten():
    m = _shortcut()
    q = [helper.make_node("QuantizeLinear", ["input", "qs", "qz"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "qs", "qz"], ["dq"])]
    m.graph.node[0].input[0] = "dq"
    nodes = q + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.extend([numpy_helper.from_array(np.array(0.1, np.float32), "qs"),
                                numpy_helper.from_array(np.array(128, np.uint8), "qz")])
    onnx.checker.check_model(m)
    assert shortcut_to_conv(m)[1] == 1  # the pattern itself is there
    assert for_onnxruntime(m) == (None, 0)  # but a QDQ graph is left to onnxruntime's QDQ fusions
    assert for_onnxruntime(b"not an onnx model") == (None, 0)
    assert ort_source(b"not an onnx model") == (b"not an onnx model", 0)


def test_runners_load_the_rewritten_graph(resnet20_fp32):
    from arq_deploy.export.smoothing_graph import smoothing_graph
    from arq_deploy.runtime.runners import OrtRunner
    from arq_deploy.runtime.sampling import OrtSmoothingGraph, ParallelOrtSampler

    proto, path = resnet20_fp32
    r, plain = OrtRunner(path, batch_size=32), OrtRunner(path, batch_size=32, rewrite=False)
    assert (r.graph_rewrites, plain.graph_rewrites) == (2, 0)
    x = _noisy(40, seed=3)
    a, b = r(x), plain(x)
    # the model in memory (proto or bytes) loads like its file
    for src in (proto, proto.SerializeToString()):
        m = OrtRunner(src, batch_size=32)
        assert m.graph_rewrites == 2 and np.array_equal(m(x), a)
    assert np.abs(a - b).max() < 1e-4 * max(1.0, np.abs(a).max())
    sg = smoothing_graph(proto)
    assert OrtSmoothingGraph(sg, batch_size=50).graph_rewrites == 2
    assert ParallelOrtSampler(path, 2, 50).graph_rewrites == 2
    # counts with and without the rewrite: the same classifier up to float32 rounding
    xi = _noisy(1, seed=4)[0].clip(0, 1)
    c1 = r.counts(xi, 200, 0.25, seed=7)
    c2 = plain.counts(xi, 200, 0.25, seed=7)
    assert c1.sum() == c2.sum() == 200 and np.abs(c1 - c2).sum() <= 4
