"""Fake-quant torch model + policy -> QDQ ONNX graph.

The float graph comes from `torch.onnx.export` (dynamo) of the fake-quant model with quantization switched off (so the
graph holds the BN-folded float weights under their module names). Then, for every quantized layer, graph surgery
inserts, in front of its Conv/Gemm/MatMul node:

    activation:  x -> QuantizeLinear(uint8, s_a, z_a) -> [Clip(0, 2^b - 1) on uint8 if a_bits < 8] -> DequantizeLinear -> node
    weight:      int8 initializer holding b-bit values (or native INT4 when asked) -> DequantizeLinear(axis=out) -> node
    bias:        int32 initializer (scale s_a·s_w per channel) -> DequantizeLinear -> node

A piecewise (PWLQ) weight has two int initializers, each with its DequantizeLinear (per channel), summed by an Add
that feeds the node: ŵ = C·s_c + T·s_t (search/quantizers.py). onnxruntime and TVM run it in float (the Add keeps
the weight out of their integer-conv fusion) and compute what the torch fake-quant model computes.

Sub-8-bit activations live in uint8 containers; an integer Clip after the QuantizeLinear keeps them in the b-bit
range. That is exactly fake_quant's clamp(round(x/s) + z, 0, 2^b - 1), and it leaves the Conv -> Quantize pattern
whole, so onnxruntime fuses those layers into QLinearConv and TVM's integer lowering requantizes them in integers
(a float Clip in front of the QuantizeLinear blocked both: ResNet-20's mixed policy ran 1.34x slower in onnxruntime
and had 1 instead of 9 requantized convs in TVM).
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from arq_deploy.errors import ModelFormatError, UnsupportedOpError
from arq_deploy.fileio import atomic_path

QUANT_OPS = ("Conv", "Gemm", "MatMul")
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def float_onnx(model, input_shape, opset: int | None = None) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) with a dynamic batch dimension; input 'input' N×C×H×W, output 'logits'."""
    import torch

    from arq_deploy.search.quant import set_quant_enabled

    model = copy.deepcopy(model).eval()
    set_quant_enabled(model, False)
    x = torch.rand(2, *input_shape)
    kwargs = {"opset_version": opset} if opset else {}
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, (x,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                 dynamic_shapes=({0: torch.export.Dim("batch")},), optimize=True, verbose=False,
                                 **kwargs)
    proto = prog.model_proto
    del proto.metadata_props[:]
    return proto


class _quiet:
    """Silence the exporter's progress prints on stdout."""

    def __enter__(self):
        import contextlib

        self._cm = contextlib.redirect_stdout(io.StringIO())
        self._cm.__enter__()

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)


def _const(name: str, arr: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _int4_tensor(name: str, q: np.ndarray) -> TensorProto:
    return helper.make_tensor(name, TensorProto.INT4, q.shape, q.astype(np.int8).flatten().tolist())


class _Graph:
    """Index over an ONNX graph for the surgery: initializers by name, consumers, nodes to insert before a node."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.g = model.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.before: dict[int, list] = {}

    def replace_init(self, name: str, tensor: TensorProto):
        self.g.initializer.remove(self.inits[name])
        tensor.name = name
        self.g.initializer.append(tensor)
        self.inits[name] = tensor

    def add_init(self, tensor: TensorProto):
        self.g.initializer.append(tensor)
        self.inits[tensor.name] = tensor

    def find_layer_node(self, layer: str, weight: np.ndarray):
        """The Conv/Gemm/MatMul node whose weight initializer is `layer.weight` (or equals the weight's values)."""
        by_name = f"{layer}.weight"
        candidates = [(i, n) for i, n in enumerate(self.g.node) if n.op_type in QUANT_OPS and len(n.input) > 1]
        for i, n in candidates:
            if n.input[1] == by_name:
                return i, n
        for i, n in candidates:
            t = self.inits.get(n.input[1])
            if t is not None and _same_weight(numpy_helper.to_array(t), weight, n):
                return i, n
        raise UnsupportedOpError(f"layer {layer}: no Conv/Gemm/MatMul node with its weight in the exported graph")

    def finish(self):
        nodes = list(self.g.node)
        del self.g.node[:]
        for i, n in enumerate(nodes):
            self.g.node.extend(self.before.get(i, []))
            self.g.node.append(n)


def _same_weight(arr: np.ndarray, w: np.ndarray, node) -> bool:
    return (arr.shape == w.shape and np.array_equal(arr, w)) or (arr.shape == w.T.shape and np.array_equal(arr, w.T))


def _weight_axis(node, arr_shape, w_shape) -> tuple[int, bool]:
    """(channel axis of the stored weight, whether the stored weight is the module weight transposed)."""
    if node.op_type == "Conv":
        return 0, False
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return (0, False) if trans_b else (1, True)
    return 1, True  # MatMul: x @ W^T stored as [in, out]


def insert_qdq(model: onnx.ModelProto, qmodel, int4_weights: bool = False) -> onnx.ModelProto:
    """Rewrite `model` (float export of `qmodel`) in place into a QDQ graph using qmodel's quantizers."""
    from arq_deploy.search.quant import quant_layers

    gr = _Graph(model)
    for name, mod in quant_layers(qmodel).items():
        w = mod.weight.detach().cpu().numpy()
        idx, node = gr.find_layer_node(name, w)
        _quantize_weight(gr, node, name, mod, w, int4_weights)
        if len(node.input) > 2 and node.input[2]:
            _quantize_bias(gr, node, name, mod)
        gr.before.setdefault(idx, []).extend(_activation_qdq(gr, node, name, mod))
    gr.finish()
    return model


def _unsigned_container(mod) -> bool:
    """W8A8 layers store weights as uint8 with zero point 128 (the same values, shifted).

    onnxruntime fuses QDQ into QLinearConv/QGemm; with uint8 activations and int8 weights its x86 AVX2 kernels
    (vpmaddubsw) add pairs of u8·s8 products in int16 and saturate once |w| > 63 meets a > 127 — measured here as
    a 4.6% top-1 disagreement on a W8A8 model. The u8·u8 kernels widen first and are exact. Below 8 bits on either
    side no pair can overflow (2·255·63 < 2^15 and 2·127·127 < 2^15), so int8 stays.
    """
    return mod.w_bits == 8 and mod.a_bits == 8


def _quantize_weight(gr: _Graph, node, name: str, mod, w: np.ndarray, int4: bool):
    axis, transposed = _weight_axis(node, None, w.shape)
    pieces = mod.weight_pieces()
    if len(pieces) > 1:
        return _quantize_weight_pieces(gr, node, name, mod, pieces, axis, transposed, int4)
    q = mod.weight_int().cpu().numpy()
    if transposed:
        q = q.T
    qname = f"{name}.weight_q"
    scale = mod.weight_scale().detach().cpu().numpy().astype(np.float32)
    gr.add_init(_const(f"{name}.weight_scale", scale))
    if int4 and mod.w_bits <= 4:
        gr.add_init(_int4_tensor(qname, q))
        zp_t = _int4_tensor(f"{name}.weight_zp", np.zeros_like(scale, dtype=np.int8))
    elif _unsigned_container(mod):
        gr.add_init(_const(qname, (q.astype(np.int16) + 128).astype(np.uint8)))
        zp_t = _const(f"{name}.weight_zp", np.full_like(scale, 128, dtype=np.uint8))
    else:
        gr.add_init(_const(qname, q.astype(np.int8)))
        zp_t = _const(f"{name}.weight_zp", np.zeros_like(scale, dtype=np.int8))
    gr.add_init(zp_t)
    dq = helper.make_node("DequantizeLinear", [qname, f"{name}.weight_scale", f"{name}.weight_zp"],
                          [f"{name}.weight_dq"], name=f"{name}/weight_dq", axis=axis)
    _drop_if_unused(gr, node.input[1], node)
    node.input[1] = f"{name}.weight_dq"
    gr.before.setdefault(_node_index(gr, node), []).append(dq)


def _quantize_weight_pieces(gr: _Graph, node, name: str, mod, pieces, axis: int, transposed: bool, int4: bool):
    """Σ_k DequantizeLinear(W_k, s_k, 0, axis) -> Add -> node weight (pieces k: '' (first), 'tail', ...)."""
    outs, nodes = [], []
    for k, (q, scale) in enumerate(pieces):
        tag = "weight" if k == 0 else ("weight_tail" if len(pieces) == 2 else f"weight_p{k}")
        q = q.cpu().numpy().T if transposed else q.cpu().numpy()
        scale = scale.detach().cpu().numpy().astype(np.float32)
        native4 = int4 and mod.w_bits <= 4
        gr.add_init(_int4_tensor(f"{name}.{tag}_q", q) if native4 else _const(f"{name}.{tag}_q", q.astype(np.int8)))
        zeros = np.zeros_like(scale, dtype=np.int8)
        gr.add_init(_int4_tensor(f"{name}.{tag}_zp", zeros) if native4 else _const(f"{name}.{tag}_zp", zeros))
        gr.add_init(_const(f"{name}.{tag}_scale", scale))
        ins = [f"{name}.{tag}_q", f"{name}.{tag}_scale", f"{name}.{tag}_zp"]
        nodes.append(helper.make_node("DequantizeLinear", ins, [f"{name}.{tag}_dq"], name=f"{name}/{tag}_dq",
                                      axis=axis))
        outs.append(f"{name}.{tag}_dq")
    total = outs[0]
    for k, o in enumerate(outs[1:], 1):
        total_k = f"{name}.weight_sum" if k == len(outs) - 1 else f"{name}.weight_sum{k}"
        nodes.append(helper.make_node("Add", [total, o], [total_k], name=f"{name}/weight_add{k}"))
        total = total_k
    _drop_if_unused(gr, node.input[1], node)
    node.input[1] = total
    gr.before.setdefault(_node_index(gr, node), []).extend(nodes)


def _quantize_bias(gr: _Graph, node, name: str, mod):
    bq = mod.bias_int()
    scale = mod.bias_scale().detach().cpu().numpy().astype(np.float32)
    gr.add_init(_const(f"{name}.bias_q", bq.cpu().numpy().astype(np.int32)))
    gr.add_init(_const(f"{name}.bias_scale", scale))
    gr.add_init(_const(f"{name}.bias_zp", np.zeros_like(scale, dtype=np.int32)))
    dq = helper.make_node("DequantizeLinear", [f"{name}.bias_q", f"{name}.bias_scale", f"{name}.bias_zp"],
                          [f"{name}.bias_dq"], name=f"{name}/bias_dq", axis=0)
    _drop_if_unused(gr, node.input[2], node)
    node.input[2] = f"{name}.bias_dq"
    gr.before.setdefault(_node_index(gr, node), []).append(dq)


def _activation_qdq(gr: _Graph, node, name: str, mod) -> list:
    x = node.input[0]
    s, z = mod.act_qparams()
    gr.add_init(_const(f"{name}.input_scale", np.array(s, np.float32)))
    gr.add_init(_const(f"{name}.input_zp", np.array(z, np.uint8)))
    nodes, q = [], f"{name}.input_q"
    if mod.a_bits < 8:  # clamp the uint8 levels to the b-bit range [0, 2^b - 1] (fake_quant's clamp, in integers)
        q = f"{name}.input_q8"
        gr.add_init(_const(f"{name}.input_lo", np.array(0, np.uint8)))
        gr.add_init(_const(f"{name}.input_hi", np.array(mod.a_qmax, np.uint8)))
    nodes.append(helper.make_node("QuantizeLinear", [x, f"{name}.input_scale", f"{name}.input_zp"], [q],
                                  name=f"{name}/input_q"))
    if mod.a_bits < 8:
        nodes.append(helper.make_node("Clip", [q, f"{name}.input_lo", f"{name}.input_hi"], [f"{name}.input_q"],
                                      name=f"{name}/input_clip"))
    nodes.append(helper.make_node("DequantizeLinear", [f"{name}.input_q", f"{name}.input_scale", f"{name}.input_zp"],
                                  [f"{name}.input_dq"], name=f"{name}/input_dq"))
    node.input[0] = f"{name}.input_dq"
    return nodes


def _node_index(gr: _Graph, node) -> int:
    for i, n in enumerate(gr.g.node):
        if n is node:
            return i
    raise RuntimeError("node vanished from graph")


def _drop_if_unused(gr: _Graph, init_name: str, node) -> None:
    """Remove the float initializer once the node no longer reads it (and nothing else does)."""
    if init_name not in gr.inits:
        return
    users = sum(1 for n in gr.g.node for i in n.input if i == init_name)
    if users <= 1:
        gr.g.initializer.remove(gr.inits.pop(init_name))


def set_metadata(model: onnx.ModelProto, meta: dict) -> None:
    """Store arq.* metadata (values JSON-encoded unless already strings)."""
    existing = {p.key: p for p in model.metadata_props}
    for k, v in meta.items():
        key = f"arq.{k}"
        val = v if isinstance(v, str) else json.dumps(v)
        if key in existing:
            existing[key].value = val
        else:
            model.metadata_props.add(key=key, value=val)


def read_metadata(model: onnx.ModelProto) -> dict:
    """The model's `arq.*` metadata, JSON values parsed (arq_deploy.artifact.onnx_arq_metadata)."""
    from arq_deploy.artifact import onnx_arq_metadata

    return onnx_arq_metadata(model)


def check(model: onnx.ModelProto) -> None:
    """onnx.checker full check (with shape inference); a failure is a ModelFormatError."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ModelFormatError(f"exported graph fails onnx.checker: {str(e).splitlines()[0]}") from None


def load_onnx(path: str | Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # protobuf DecodeError, ValidationError, ...
        raise ModelFormatError(f"{path} is not a valid ONNX model: {str(e).splitlines()[0][:200]}") from None
    return model


def save_onnx(model: onnx.ModelProto, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def export_qdq(qmodel, input_shape, meta: dict, int4_weights: bool = False) -> onnx.ModelProto:
    """Build and check the QDQ ONNX model of a calibrated fake-quant model. `meta` goes to arq.* metadata_props."""
    opset = 21 if int4_weights else None
    model = float_onnx(qmodel, input_shape, opset=opset)
    insert_qdq(model, qmodel, int4_weights=int4_weights)
    set_metadata(model, meta)
    model.producer_name = "arq-deploy"
    check(model)
    return model
