"""The smoothing graph: one ONNX call per noise batch returns the class counts of randomized smoothing.

    smoothing_graph(model) -> ModelProto
        inputs  x      float32 1×C×H×W (a C×H×W array broadcasts too)
                noise  float32 B×C×H×W   (ε, passed in: the seeded Philox stream of `certify.smooth.noise_batches`)
                sigma  float32 scalar
        output  counts int64 K          counts[c] = #{i < B: argmax_k f(x + σ·ε_i)_k = c}

    smoothing_graph(model, packed=True, sigma=σ) -> ModelProto   (the form `targets.tvm_build.compile_onnx` takes:
        one N×C×H×W input; row 0 is x, rows 1..B are ε; σ is a constant; output counts 1×K int64)

    smoothing_graph(model, in_graph_noise=B, sigma=σ) -> ModelProto   (input x only: ε drawn by RandomNormal inside
        the graph. NOT reproducible with the Philox stream and not usable for certificates whose noise must be
        replayed; kept to measure what in-graph noise generation would buy.)

The model is any ONNX classifier with one input N×C×H×W (`input`) and one output N×K (`logits`). The noisy batch is
x + σ·ε computed as Mul then Add in float32, the same two roundings as `Smooth.sample_counts`, so the counts equal the
Python loop's for the same noise and the same runtime. The counting is `ArgMax` → `OneHot` → `ReduceSum` (or, with
`count_op="equal"`, `Equal` against the constant [0..K) → `Cast` → `ReduceSum`, for importers without OneHot).
ArgMax picks the first maximum on ties, as numpy's argmax does.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10  # onnxruntime 1.31 refuses the IR version onnx 1.23 writes by default
MIN_OPSET = 13  # ReduceSum with axes as an input
PREFIX = "arq_smooth/"


def _model_io(model: onnx.ModelProto) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto, int]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise ValueError("the model must have one input (N×C×H×W) and one output (N×K logits)")
    inp, out = inputs[0], model.graph.output[0]
    dims = inp.type.tensor_type.shape.dim
    if len(dims) != 4 or not all(d.HasField("dim_value") for d in dims[1:]):
        raise ValueError(f"input {inp.name!r} must be N×C×H×W with fixed C, H, W")
    odims = out.type.tensor_type.shape.dim
    if len(odims) != 2 or not odims[1].HasField("dim_value"):
        raise ValueError(f"output {out.name!r} must be N×K with a fixed number of classes K")
    return inp, out, int(odims[1].dim_value)


def _count_nodes(logits: str, k: int, count_op: str, counts: str, keepdims: int) -> tuple[list, list]:
    """ArgMax over axis 1, then per-class counts summed over the batch."""
    p = PREFIX
    nodes = [helper.make_node("ArgMax", [logits], [p + "argmax"], axis=1, keepdims=0)]
    inits = [numpy_helper.from_array(np.array([0], np.int64), p + "axis0")]
    if count_op == "onehot":
        inits += [numpy_helper.from_array(np.array(k, np.int64), p + "depth"),
                  numpy_helper.from_array(np.array([0, 1], np.int64), p + "onoff")]
        nodes.append(helper.make_node("OneHot", [p + "argmax", p + "depth", p + "onoff"], [p + "onehot"], axis=-1))
    elif count_op == "equal":
        inits += [numpy_helper.from_array(np.arange(k, dtype=np.int64), p + "classes"),
                  numpy_helper.from_array(np.array([1], np.int64), p + "axis1")]
        nodes += [helper.make_node("Unsqueeze", [p + "argmax", p + "axis1"], [p + "argmax_col"]),
                  helper.make_node("Equal", [p + "argmax_col", p + "classes"], [p + "hit"]),
                  helper.make_node("Cast", [p + "hit"], [p + "onehot"], to=TensorProto.INT64)]
    else:
        raise ValueError(f"count_op must be 'onehot' or 'equal', got {count_op!r}")
    nodes.append(helper.make_node("ReduceSum", [p + "onehot", p + "axis0"], [counts], keepdims=keepdims))
    return nodes, inits


def smoothing_graph(model: onnx.ModelProto, *, packed: bool = False, sigma: float | None = None,
                    in_graph_noise: int | None = None, count_op: str = "onehot", check: bool = True
                    ) -> onnx.ModelProto:
    """Wrap a classifier ONNX into the smoothing graph described in the module docstring (a new ModelProto)."""
    if packed and _model_io(model)[0].name == "input":
        model = rename_input(model)
    inp, out, k = _model_io(model)
    c, h, w = (int(d.dim_value) for d in inp.type.tensor_type.shape.dim[1:])
    if (packed or in_graph_noise) and sigma is None:
        raise ValueError("the packed and in-graph-noise forms bake σ in: pass sigma")
    if packed and in_graph_noise:
        raise ValueError("choose one of packed and in_graph_noise")
    p, f32 = PREFIX, TensorProto.FLOAT
    noisy = inp.name  # the model's nodes read the noisy batch under the model input's own name
    g = model.graph
    nodes, inits = [], []
    if packed:
        inputs = [helper.make_tensor_value_info("input", f32, ["n", c, h, w])]
        inits += [numpy_helper.from_array(np.array([0], np.int64), p + "s0"),
                  numpy_helper.from_array(np.array([1], np.int64), p + "s1"),
                  numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), p + "send"),
                  numpy_helper.from_array(np.array(sigma, np.float32), p + "sigma")]
        nodes += [helper.make_node("Slice", ["input", p + "s0", p + "s1", p + "s0"], [p + "x"]),
                  helper.make_node("Slice", ["input", p + "s1", p + "send", p + "s0"], [p + "noise"]),
                  helper.make_node("Mul", [p + "noise", p + "sigma"], [p + "scaled"]),
                  helper.make_node("Add", [p + "x", p + "scaled"], [noisy])]
    elif in_graph_noise:
        inputs = [helper.make_tensor_value_info("x", f32, [1, c, h, w])]
        inits.append(numpy_helper.from_array(np.array(sigma, np.float32), p + "sigma"))
        nodes += [helper.make_node("RandomNormal", [], [p + "noise"], dtype=f32, mean=0.0, scale=1.0,
                                   shape=[int(in_graph_noise), c, h, w]),
                  helper.make_node("Mul", [p + "noise", p + "sigma"], [p + "scaled"]),
                  helper.make_node("Add", ["x", p + "scaled"], [noisy])]
    else:
        inputs = [helper.make_tensor_value_info("x", f32, [1, c, h, w]),
                  helper.make_tensor_value_info("noise", f32, ["batch", c, h, w]),
                  helper.make_tensor_value_info("sigma", f32, [])]
        nodes += [helper.make_node("Mul", ["noise", "sigma"], [p + "scaled"]),
                  helper.make_node("Add", ["x", p + "scaled"], [noisy])]
    counts = "counts"
    cnodes, cinits = _count_nodes(out.name, k, count_op, counts, keepdims=1 if packed else 0)
    outputs = [helper.make_tensor_value_info(counts, TensorProto.INT64, [1, k] if packed else [k])]
    graph = helper.make_graph(nodes + list(g.node) + cnodes, "arq_smoothing_graph", inputs, outputs,
                              initializer=inits + list(g.initializer) + cinits,
                              value_info=[v for v in g.value_info if v.name != noisy])
    opsets = [o for o in model.opset_import if o.domain not in ("", "ai.onnx")]
    version = max(MIN_OPSET, next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), MIN_OPSET))
    opsets.append(helper.make_opsetid("", version))
    wrapped = helper.make_model(graph, opset_imports=opsets, producer_name="arq-deploy smoothing_graph")
    wrapped.ir_version = IR_VERSION
    wrapped.functions.extend(model.functions)
    helper.set_model_props(wrapped, {"arq.smoothing_graph": "packed" if packed else
                                     ("in_graph_noise" if in_graph_noise else "x,noise,sigma"),
                                     "arq.num_classes": str(k), **({"arq.sigma": repr(float(sigma))}
                                                                    if sigma is not None else {})})
    if check:
        onnx.checker.check_model(wrapped, full_check=True)
    return wrapped


def rename_input(model: onnx.ModelProto, new: str = "model_input") -> onnx.ModelProto:
    """A copy of the model whose graph input is called `new` (the packed form reserves the name 'input')."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inp, _, _ = _model_io(m)
    old = inp.name
    inp.name = new
    for n in m.graph.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new
    return m
