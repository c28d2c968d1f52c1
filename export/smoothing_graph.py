"""The smoothing graph: one ONNX call per noise batch returns the class counts of randomized smoothing.

    smoothing_graph(model) -> ModelProto
        inputs  x      float32 1×C×H×W (a C×H×W array broadcasts too)
                noise  float32 B×C×H×W   (ε, passed in: the seeded Philox stream of `certify.smooth.noise_batches`)
                sigma  float32 scalar
        output  counts int64 K          counts[c] = #{i < B: argmax_k f(x + σ·ε_i)_k = c}

    smoothing_graph(model, packed=True, sigma=σ) -> ModelProto   (the form `targets.backends.compile_onnx` takes:
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
from onnxscript import TapeBuilder, ir

IR_VERSION = 10  # onnxruntime 1.31 refuses the IR version onnx 1.23 writes by default
MIN_OPSET = 13  # ReduceSum with axes as an input
PREFIX = "arq_smooth/"
FLOAT = ir.DataType.FLOAT


def _model_io(model: ir.Model) -> tuple[ir.Value, ir.Value, int]:
    """(input N×C×H×W, output N×K, K) of a one-input one-output classifier."""
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    if len(inputs) != 1 or len(model.graph.outputs) != 1:
        raise ValueError("the model must have one input (N×C×H×W) and one output (N×K logits)")
    inp, out = inputs[0], model.graph.outputs[0]
    if inp.shape is None or len(inp.shape) != 4 or not all(isinstance(d, int) for d in inp.shape[1:]):
        raise ValueError(f"input {inp.name!r} must be N×C×H×W with fixed C, H, W")
    if out.shape is None or len(out.shape) != 2 or not isinstance(out.shape[1], int):
        raise ValueError(f"output {out.name!r} must be N×K with a fixed number of classes K")
    return inp, out, out.shape[1]


def _const(op: TapeBuilder, name: str, value, dtype=np.int64) -> ir.Value:
    return op.initializer(ir.tensor(np.array(value, dtype), name=PREFIX + name))


def _counts(op: TapeBuilder, logits: ir.Value, k: int, count_op: str, keepdims: int) -> ir.Value:
    """ArgMax over axis 1, then per-class counts summed over the batch."""
    p = PREFIX
    top = op.ArgMax(logits, axis=1, keepdims=0, _outputs=[p + "argmax"])
    if count_op == "onehot":
        onehot = op.OneHot(top, _const(op, "depth", k), _const(op, "onoff", [0, 1]), axis=-1, _outputs=[p + "onehot"])
    elif count_op == "equal":
        col = op.Unsqueeze(top, _const(op, "axis1", [1]), _outputs=[p + "argmax_col"])
        hit = op.Equal(col, _const(op, "classes", np.arange(k)), _outputs=[p + "hit"])
        onehot = op.Cast(hit, to=ir.DataType.INT64, _outputs=[p + "onehot"])
    else:
        raise ValueError(f"count_op must be 'onehot' or 'equal', got {count_op!r}")
    return op.ReduceSum(onehot, _const(op, "axis0", [0]), keepdims=keepdims, _outputs=["counts"])


def smoothing_graph(model: onnx.ModelProto, *, packed: bool = False, sigma: float | None = None,
                    in_graph_noise: int | None = None, count_op: str = "onehot", check: bool = True
                    ) -> onnx.ModelProto:
    """Wrap a classifier ONNX into the smoothing graph described in the module docstring (a new ModelProto)."""
    classifier = ir.serde.deserialize_model(model)
    g = classifier.graph
    inp, logits, k = _model_io(classifier)
    if packed and inp.name == "input":  # the packed form's own input is called 'input'
        inp.name = "model_input"
    c, h, w = inp.shape[1:]
    if (packed or in_graph_noise) and sigma is None:
        raise ValueError("the packed and in-graph-noise forms bake σ in: pass sigma")
    if packed and in_graph_noise:
        raise ValueError("choose one of packed and in_graph_noise")
    p, pre, post = PREFIX, TapeBuilder(), TapeBuilder()  # nodes before and after the classifier's
    if packed:
        inputs = [ir.val("input", FLOAT, ["n", c, h, w])]
        s0, s1 = _const(pre, "s0", [0]), _const(pre, "s1", [1])
        x = pre.Slice(inputs[0], s0, s1, s0, _outputs=[p + "x"])
        noise = pre.Slice(inputs[0], s1, _const(pre, "send", [np.iinfo(np.int64).max]), s0, _outputs=[p + "noise"])
    elif in_graph_noise:
        x = ir.val("x", FLOAT, [1, c, h, w])
        inputs = [x]
        noise = pre.RandomNormal(dtype=FLOAT, mean=0.0, scale=1.0, shape=[int(in_graph_noise), c, h, w],
                                 _outputs=[p + "noise"])
    else:
        x, noise, sig = inputs = [ir.val("x", FLOAT, [1, c, h, w]), ir.val("noise", FLOAT, ["batch", c, h, w]),
                                  ir.val("sigma", FLOAT, [])]
    if packed or in_graph_noise:
        sig = _const(pre, "sigma", sigma, np.float32)
    noisy = pre.Add(x, pre.Mul(noise, sig, _outputs=[p + "scaled"]))
    counts = _counts(post, logits, k, count_op, keepdims=1 if packed else 0)
    counts.dtype, counts.shape = ir.DataType.INT64, ir.Shape([1, k] if packed else [k])

    # the classifier's nodes read the noisy batch under the classifier input's own name
    inp.replace_all_uses_with(noisy)
    g.inputs[:] = inputs
    noisy.name = inp.name
    g.outputs[:] = [counts]
    g.insert_before(g.node(0), pre.nodes)
    g.extend(post.nodes)
    for v in (*pre.initializers, *post.initializers):
        g.register_initializer(v)
    g.name = "arq_smoothing_graph"
    g.opset_imports[""] = max(MIN_OPSET, g.opset_imports.get("", MIN_OPSET))
    kind = "packed" if packed else ("in_graph_noise" if in_graph_noise else "x,noise,sigma")
    props = {"arq.smoothing_graph": kind, "arq.num_classes": str(k),
             **({"arq.sigma": repr(float(sigma))} if sigma is not None else {})}
    wrapped = ir.serde.serialize_model(ir.Model(g, ir_version=IR_VERSION, producer_name="arq-deploy smoothing_graph",
                                                functions=classifier.functions.values(), metadata_props=props))
    if check:
        onnx.checker.check_model(wrapped, full_check=True)
    return wrapped


def rename_input(model: onnx.ModelProto, new: str = "model_input") -> onnx.ModelProto:
    """A copy of the model whose graph input is called `new` (the packed form reserves the name 'input')."""
    m = ir.serde.deserialize_model(model)
    _model_io(m)[0].name = new
    return ir.serde.serialize_model(m)
