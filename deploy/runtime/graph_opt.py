"""Exact graph rewrites that keep a runtime in its fast layout.

    shortcut_to_conv(model) -> (ModelProto, rewritten)
    for_onnxruntime(model or path) -> (ModelProto | None, rewritten)    (what the onnxruntime runners load)

The option-A shortcut of the CIFAR ResNets (He et al. 2016: subsample by 2, zero-pad the new channels) exports as

    x -> Slice(axis 2, step 2) -> Slice(axis 3, step 2) -> Pad(channels, zeros) -> Add(conv2 output, ·)

onnxruntime's x86 layout pass (NCHWc, channels blocked by 8 or 16) has no NCHWc Slice or Pad, so it leaves that
layout at every shortcut, and once a residual is plain NCHW every later block of the network computes its Add and
ReLU apart from the convolution, with a reorder on each side (on ResNet-20: 12 reorders, 6 separate Adds and ReLUs;
about 10% of its time at batch 100).

The same map is a 1×1 convolution with strides (s_h, s_w) and a 0/1 weight W[before + c, c] = 1. It is exact: each
output is one input times 1.0 plus exact zeros (finite inputs), so the rewritten shortcut computes bit for bit what the
Slice/Pad chain computes (tested with onnxruntime's optimisations off). With them on, onnxruntime fuses the residual
Add and the ReLU into the block's second convolution, which adds in another order: the logits move by float32
rounding (≈1e-6), as they do between any two runtimes. Only float32 graphs without QuantizeLinear are rewritten:
QDQ graphs run their convolutions as QLinearConv, where a float shortcut convolution would add layout changes instead
of removing them.

The rewrite is an onnxscript pattern rule: the rewriter matches x -> Slice -> Slice -> Pad (or one Slice over both
axes) whose Slice outputs nothing else reads, `_shortcut` checks the constants, `_as_conv` builds the Conv.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import shape_inference
from onnxscript import ir
from onnxscript.rewriter import RewriteRule, RewriteRuleSet

BIG_END = 2**31 - 1  # a Slice `end` at least this large means "to the end of the axis"


def _array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind a node input (initializer or Constant node), flattened; None if absent or not constant."""
    t = None if value is None else ir.convenience.get_const_tensor(value)
    return None if t is None else t.numpy().ravel()


def _optional_consts(node: ir.Node, first: int, count: int) -> list[np.ndarray | None] | None:
    """The constants of inputs first..first+count-1 (None where absent); None if a present one is not constant."""
    values = (list(node.inputs) + [None] * count)[first:first + count]
    arrays = [_array(v) for v in values]
    return None if any(v is not None and a is None for v, a in zip(values, arrays)) else arrays


def _slice_strides(node: ir.Node, rank: int) -> dict[int, int] | None:
    """{axis: step} of a Slice that only subsamples spatial axes from index 0 to the end, else None."""
    consts = _optional_consts(node, 1, 4)
    if consts is None or consts[0] is None or consts[1] is None:
        return None
    starts, ends, axes, steps = consts
    axes = np.arange(len(starts)) if axes is None else axes
    steps = np.ones(len(starts), np.int64) if steps is None else steps
    out = {}
    for st, en, ax, sp in zip(starts, ends, axes, steps):
        ax = int(ax) + rank if ax < 0 else int(ax)
        if ax not in (2, 3) or st != 0 or en < BIG_END or sp < 1 or ax in out:
            return None
        out[ax] = int(sp)
    return out


def _channel_pad(node: ir.Node, rank: int) -> tuple[int, int] | None:
    """(before, after) of a zero constant Pad that pads only the channel axis (1), else None."""
    attrs = node.attributes
    if attrs.get_string("mode", "constant") != "constant":
        return None
    if "pads" in attrs:  # opset < 11
        pads, value, axes = np.array(attrs.get_ints("pads")), attrs.get_float("value", 0.0), None
    else:
        consts = _optional_consts(node, 1, 3)
        if consts is None or consts[0] is None:
            return None
        pads, value, axes = consts
        value = float(value[0]) if value is not None and value.size else 0.0
    if value != 0.0:
        return None
    axes = np.arange(rank) if axes is None else np.array([a + rank if a < 0 else a for a in axes])
    if len(pads) != 2 * len(axes) or np.any(pads < 0):
        return None
    per_axis = {int(a): (int(pads[i]), int(pads[i + len(axes)])) for i, a in enumerate(axes)}
    if any(v != (0, 0) for a, v in per_axis.items() if a != 1):
        return None
    return per_axis.get(1, (0, 0))


def _shortcut(x: ir.Value, out: ir.Value) -> tuple[list[int], tuple[int, int]] | None:
    """(strides, channel pads) when the matched chain x -> Slice… -> Pad -> out is an option-A shortcut on a float32
    N×C×H×W tensor, else None."""
    if x.dtype != ir.DataType.FLOAT or x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[1], int):
        return None
    strides: dict[int, int] = {}
    v = out.producer().inputs[0]
    while v is not x:  # the matched Slices, from the Pad back to x
        st = _slice_strides(v.producer(), 4)
        if st is None or set(st) & set(strides):
            return None
        strides.update(st)
        v = v.producer().inputs[0]
    cpad = _channel_pad(out.producer(), 4)
    return None if cpad is None else ([strides.get(2, 1), strides.get(3, 1)], cpad)


def _as_conv(op, x: ir.Value, out: ir.Value) -> ir.Value:
    """The 1×1 strided Conv with the 0/1 weight W[before + c, c] = 1 that computes the shortcut."""
    strides, (before, after) = _shortcut(x, out)
    cin = x.shape[1]
    w = np.zeros((cin + before + after, cin, 1, 1), np.float32)
    w[np.arange(cin) + before, np.arange(cin), 0, 0] = 1.0
    weight = op.initializer(ir.tensor(w, name=f"{out.name}__shortcut_w"))
    return op.Conv(x, weight, kernel_shape=[1, 1], strides=strides,
                   _name=f"{out.producer().name or out.name}__as_conv")


def _slice_pad(slices: int):
    """The pattern x -> Slice (× slices) -> Pad -> out; constants and attributes are checked by `_shortcut`."""
    def pattern(op, x):
        for _ in range(slices):
            x = op.Slice(x, _allow_other_inputs=True)
        return op.Pad(x, _allow_other_inputs=True, _outputs=["out"])
    return pattern


def _rules() -> RewriteRuleSet:
    """Two Slices (one per spatial axis, as torch exports x[:, :, ::2, ::2]) before one Slice over both axes. The
    matcher only takes Slices whose outputs nothing else reads, so they can go. A new set per call: the matchers keep
    the match in progress, so threads must not share one."""
    return RewriteRuleSet([RewriteRule(_slice_pad(k), _as_conv, lambda _, x, out: _shortcut(x, out) is not None)
                           for k in (2, 1)])


def shortcut_to_conv(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite every Slice(spatial step)…→Pad(channels, zeros) chain on a float32 N×C×H×W tensor into one 1×1
    strided Conv with a 0/1 weight (see the module docstring). Returns (a new model, number of chains rewritten)."""
    graph_ir = ir.serde.deserialize_model(shape_inference.infer_shapes(model))
    count = _rules().apply_to_model(graph_ir)
    if not count:
        return onnx.ModelProto.FromString(model.SerializeToString()), 0
    inits = graph_ir.graph.initializers
    for v in list(inits.values()):  # the Slice and Pad constants nothing reads any more
        if not v.uses() and not v.is_graph_input() and not v.is_graph_output():
            del inits[v.name]
    return ir.serde.serialize_model(graph_ir), count


def is_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "QLinearConv", "ConvInteger") for n in model.graph.node)


def for_onnxruntime(model: onnx.ModelProto | str | Path | bytes) -> tuple[onnx.ModelProto | None, int]:
    """The model onnxruntime should load: the rewritten graph when a float graph has option-A shortcuts, else None
    (load the original as it is). Never raises on a model it cannot analyse: that is onnxruntime's to report."""
    try:
        if isinstance(model, (bytes, bytearray)):
            model = onnx.ModelProto.FromString(bytes(model))
        elif not isinstance(model, onnx.ModelProto):
            model = onnx.load(str(model))
        if is_qdq(model) or not any(n.op_type == "Pad" for n in model.graph.node):
            return None, 0
        new, k = shortcut_to_conv(model)
    except Exception:  # malformed models keep their own error path (onnxruntime's load error)
        return None, 0
    return (new, k) if k else (None, 0)


def ort_source(model: onnx.ModelProto | str | Path | bytes, rewrite: bool = True) -> tuple[str | bytes, int]:
    """What to hand `onnxruntime.InferenceSession` for a model, a path or serialized bytes: the rewritten graph's
    bytes when `rewrite` finds a shortcut, else the model as given (a path string or bytes); and the number of
    shortcuts rewritten."""
    new, k = for_onnxruntime(model) if rewrite else (None, 0)
    if new is not None:
        return new.SerializeToString(), k
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString(), 0
    return (bytes(model) if isinstance(model, (bytes, bytearray)) else str(model)), 0
