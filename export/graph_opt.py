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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

BIG_END = 2**31 - 1  # a Slice `end` at least this large means "to the end of the axis"


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node values by name."""
    vals = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            vals[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return vals


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[list[int | None], int]]:
    """Inferred (dims, element type) of every value that has them."""
    inferred = shape_inference.infer_shapes(model)
    out = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = ([d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim], t.elem_type)
    return out


def _slice_strides(node: onnx.NodeProto, consts: dict, rank: int) -> dict[int, int] | None:
    """{axis: step} of a Slice that only subsamples spatial axes from index 0 to the end, else None."""
    ins = list(node.input) + [""] * (5 - len(node.input))
    if any(name and name not in consts for name in ins[1:]) or not ins[1] or not ins[2]:
        return None
    starts, ends = consts[ins[1]].ravel(), consts[ins[2]].ravel()
    axes = consts[ins[3]].ravel() if ins[3] else np.arange(len(starts))
    steps = consts[ins[4]].ravel() if ins[4] else np.ones(len(starts), np.int64)
    out = {}
    for st, en, ax, sp in zip(starts, ends, axes, steps):
        ax = int(ax) + rank if ax < 0 else int(ax)
        if ax not in (2, 3) or st != 0 or en < BIG_END or sp < 1 or ax in out:
            return None
        out[ax] = int(sp)
    return out


def _channel_pad(node: onnx.NodeProto, consts: dict, rank: int) -> tuple[int, int] | None:
    """(before, after) of a zero constant Pad that pads only the channel axis (1), else None."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("mode", b"constant") not in (b"constant", "constant"):
        return None
    if "pads" in attrs:  # opset < 11
        pads, value, axes = np.array(attrs["pads"]), attrs.get("value", 0.0), None
    else:
        ins = list(node.input) + [""] * (4 - len(node.input))
        if ins[1] not in consts or (ins[2] and ins[2] not in consts) or (ins[3] and ins[3] not in consts):
            return None
        pads = consts[ins[1]].ravel()
        value = float(consts[ins[2]].ravel()[0]) if ins[2] and consts[ins[2]].size else 0.0
        axes = consts[ins[3]].ravel() if ins[3] else None
    if value != 0.0:
        return None
    axes = np.arange(rank) if axes is None else np.array([a + rank if a < 0 else a for a in axes])
    if len(pads) != 2 * len(axes) or np.any(pads < 0):
        return None
    per_axis = {int(a): (int(pads[i]), int(pads[i + len(axes)])) for i, a in enumerate(axes)}
    if any(v != (0, 0) for a, v in per_axis.items() if a != 1):
        return None
    return per_axis.get(1, (0, 0))


def shortcut_to_conv(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite every Slice(spatial step)…→Pad(channels, zeros) chain on a float32 N×C×H×W tensor into one 1×1
    strided Conv with a 0/1 weight (see the module docstring). Returns (a new model, number of chains rewritten)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    consts, shapes = _constants(model), _shapes(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for o in model.graph.output:
        uses[o.name] = uses.get(o.name, 0) + 1

    replace: dict[int, onnx.NodeProto] = {}
    dropped: set[int] = set()
    for pad in model.graph.node:
        if pad.op_type != "Pad" or pad.domain not in ("", "ai.onnx"):
            continue
        chain, src = [], pad.input[0]
        while src in producer and producer[src].op_type == "Slice" and uses.get(src) == 1 and len(chain) < 4:
            chain.append(producer[src])
            src = producer[src].input[0]
        dims, elem = shapes.get(src, ([], 0))
        if not chain or len(dims) != 4 or dims[1] is None or elem != TensorProto.FLOAT:
            continue
        strides: dict[int, int] = {}
        for s in chain:
            st = _slice_strides(s, consts, 4)
            if st is None or set(st) & set(strides):
                strides = {}
                break
            strides.update(st)
        cpad = _channel_pad(pad, consts, 4) if strides else None
        if cpad is None:
            continue
        cin, (before, after) = int(dims[1]), cpad
        w = np.zeros((cin + before + after, cin, 1, 1), np.float32)
        w[np.arange(cin) + before, np.arange(cin), 0, 0] = 1.0
        wname = f"{pad.output[0]}__shortcut_w"
        model.graph.initializer.append(numpy_helper.from_array(w, wname))
        replace[id(pad)] = helper.make_node("Conv", [src, wname], [pad.output[0]], kernel_shape=[1, 1],
                                            strides=[strides.get(2, 1), strides.get(3, 1)],
                                            name=f"{pad.name or pad.output[0]}__as_conv")
        dropped.update(id(s) for s in chain)
    if not replace:
        return model, 0
    nodes = [replace.get(id(n), n) for n in model.graph.node if id(n) not in dropped]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _drop_unused_initializers(model)
    return model, len(replace)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


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
