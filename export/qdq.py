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
from onnxscript import TapeBuilder, ir

from arq_deploy.core.artifact import onnx_arq_metadata
from arq_deploy.core.errors import ModelFormatError, UnsupportedOpError
from arq_deploy.core.fileio import atomic_path

QUANT_OPS = ("Conv", "Gemm", "MatMul")
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def float_onnx(model, input_shape, opset: int | None = None) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) with a dynamic batch dimension; input 'input' N×C×H×W, output 'logits'."""
    import torch

    from arq_deploy.export.quantize.quant import set_quant_enabled  # torch: loaded only where a model is exported

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


def _init(op: TapeBuilder, name: str, arr: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    """An initializer (dtype INT4 packs an int8 array into native 4-bit values)."""
    return op.initializer(ir.tensor(np.asarray(arr), dtype=dtype, name=name))


def _layer_nodes(g: ir.Graph, layer: str, weight: np.ndarray) -> list[ir.Node]:
    """The Conv/Gemm/MatMul nodes that read `layer`'s weight (several when the layer is called more than once): those
    whose weight initializer is named `layer.weight`, else those whose weight initializer holds the same values
    (where that finds nodes of other layers too, e.g. equal weights the exporter stored once, those whose torch name
    scopes name the layer). A node into which the ONNX optimizer folded a BatchNorm is refused: its weight is no
    longer the layer's."""
    candidates = [n for n in g if n.op_type in QUANT_OPS and len(n.inputs) > 1 and n.inputs[1] is not None]
    found = [n for n in candidates if n.inputs[1].name == f"{layer}.weight"]
    if not found:
        found = [n for n in candidates if n.inputs[1].const_value is not None
                 and _same_weight(n.inputs[1].const_value.numpy(), weight)]
        if len(found) > 1:
            found = [n for n in found if layer in _name_scopes(n)] or found
    if not found:
        raise UnsupportedOpError(f"layer {layer}: no Conv/Gemm/MatMul node with its weight in the exported graph "
                                 f"(its forward transforms the weight, or the exporter folded it into another op)")
    for n in found:
        if "FuseBatchNorm" in n.metadata_props.get("pkg.onnxscript.rewriter.rule_name", ""):
            raise UnsupportedOpError(
                f"layer {layer}: the ONNX exporter folded a BatchNorm into it that torch did not fold before "
                f"quantizing, so the exported weight is not the quantized one; make the BatchNorm directly follow "
                f"the layer in code torch.export can trace, or leave the layer in float")
    return found


def _name_scopes(node: ir.Node) -> list[str]:
    """The torch module names the exporter recorded for a node (empty when it recorded none)."""
    try:
        return list(json.loads(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]").replace("'", '"')))
    except ValueError:
        return []


def _same_weight(arr: np.ndarray, w: np.ndarray) -> bool:
    return (arr.shape == w.shape and np.array_equal(arr, w)) or (arr.shape == w.T.shape and np.array_equal(arr, w.T))


def _weight_axis(node: ir.Node) -> tuple[int, bool]:
    """(channel axis of the stored weight, whether the stored weight is the module weight transposed)."""
    if node.op_type == "Conv":
        return 0, False
    if node.op_type == "Gemm":
        return (0, False) if node.attributes.get_int("transB", 0) else (1, True)
    return 1, True  # MatMul: x @ W^T stored as [in, out]


def insert_qdq(model: onnx.ModelProto, qmodel, int4_weights: bool = False) -> onnx.ModelProto:
    """Rewrite `model` (float export of `qmodel`) in place into a QDQ graph using qmodel's quantizers."""
    from arq_deploy.export.quantize.quant import quant_layers  # torch: loaded only where a model is exported

    graph_ir = ir.serde.deserialize_model(model)
    g = graph_ir.graph
    for layer, mod in quant_layers(qmodel).items():
        for k, node in enumerate(_layer_nodes(g, layer, mod.weight.detach().cpu().numpy())):
            name = layer if k == 0 else f"{layer}.call{k}"  # a layer called again: its own names, the same numbers
            op, (weight, bias) = TapeBuilder(), (list(node.inputs[1:3]) + [None])[:2]
            node.replace_input_with(1, _weight_dq(op, node, name, mod, int4_weights))
            if bias is not None:
                if mod.bias is None:
                    raise UnsupportedOpError(f"layer {layer}: its node in the exported graph adds a bias the layer "
                                             f"does not have")
                node.replace_input_with(2, _bias_dq(op, name, mod))
            node.replace_input_with(0, _activation_qdq(op, node.inputs[0], name, mod))
            g.insert_before(node, op.nodes)
            for v in op.initializers:
                g.register_initializer(v)
            for v in (weight, bias):  # the float weight and bias, once nothing else reads them
                if v is not None and v.is_initializer() and not (v.uses() or v.is_graph_input() or v.is_graph_output()):
                    del g.initializers[v.name]
    model.CopyFrom(ir.serde.serialize_model(graph_ir))
    return model


def _unsigned_container(mod) -> bool:
    """W8A8 layers store weights as uint8 with zero point 128 (the same values, shifted).

    onnxruntime fuses QDQ into QLinearConv/QGemm; with uint8 activations and int8 weights its x86 AVX2 kernels
    (vpmaddubsw) add pairs of u8·s8 products in int16 and saturate once |w| > 63 meets a > 127 — measured here as
    a 4.6% top-1 disagreement on a W8A8 model. The u8·u8 kernels widen first and are exact. Below 8 bits on either
    side no pair can overflow (2·255·63 < 2^15 and 2·127·127 < 2^15), so int8 stays.
    """
    return mod.w_bits == 8 and mod.a_bits == 8


def _weight_dq(op: TapeBuilder, node: ir.Node, name: str, mod, int4: bool) -> ir.Value:
    """DequantizeLinear(W_q, s_w, z_w, axis=out) of each weight piece ('weight', then 'weight_tail' for PWLQ, or
    'weight_p{k}'), summed by Adds when there are several."""
    axis, transposed = _weight_axis(node)
    pieces = mod.weight_pieces()
    total = None
    for k, (q, scale) in enumerate(pieces):
        tag = "weight" if k == 0 else ("weight_tail" if len(pieces) == 2 else f"weight_p{k}")
        q = q.cpu().numpy().T if transposed else q.cpu().numpy()
        scale = scale.detach().cpu().numpy().astype(np.float32)
        dtype = ir.DataType.INT4 if int4 and mod.w_bits <= 4 else None
        if dtype is None and len(pieces) == 1 and _unsigned_container(mod):
            q, zp = (q.astype(np.int16) + 128).astype(np.uint8), np.full_like(scale, 128, dtype=np.uint8)
        else:
            q, zp = q.astype(np.int8), np.zeros_like(scale, dtype=np.int8)
        dq = op.DequantizeLinear(_init(op, f"{name}.{tag}_q", q, dtype), _init(op, f"{name}.{tag}_scale", scale),
                                 _init(op, f"{name}.{tag}_zp", zp, dtype), axis=axis,
                                 _outputs=[f"{name}.{tag}_dq"], _name=f"{name}/{tag}_dq")
        if total is not None:
            suffix = "" if k == len(pieces) - 1 else str(k)
            dq = op.Add(total, dq, _outputs=[f"{name}.weight_sum{suffix}"], _name=f"{name}/weight_add{k}")
        total = dq
    return total


def _bias_dq(op: TapeBuilder, name: str, mod) -> ir.Value:
    """int32 bias at scale s_a·s_w per channel -> DequantizeLinear."""
    scale = mod.bias_scale().detach().cpu().numpy().astype(np.float32)
    return op.DequantizeLinear(_init(op, f"{name}.bias_q", mod.bias_int().cpu().numpy().astype(np.int32)),
                               _init(op, f"{name}.bias_scale", scale),
                               _init(op, f"{name}.bias_zp", np.zeros_like(scale, dtype=np.int32)), axis=0,
                               _outputs=[f"{name}.bias_dq"], _name=f"{name}/bias_dq")


def _activation_qdq(op: TapeBuilder, x: ir.Value, name: str, mod) -> ir.Value:
    """x -> QuantizeLinear(uint8) -> [Clip to the b-bit levels when a_bits < 8] -> DequantizeLinear."""
    s, z = mod.act_qparams()
    scale = _init(op, f"{name}.input_scale", np.array(s, np.float32))
    zp = _init(op, f"{name}.input_zp", np.array(z, np.uint8))
    clip = mod.a_bits < 8
    q = op.QuantizeLinear(x, scale, zp, _outputs=[f"{name}.input_q8" if clip else f"{name}.input_q"],
                          _name=f"{name}/input_q")
    if clip:  # clamp the uint8 levels to the b-bit range [0, 2^b - 1] (fake_quant's clamp, in integers)
        q = op.Clip(q, _init(op, f"{name}.input_lo", np.array(0, np.uint8)),
                    _init(op, f"{name}.input_hi", np.array(mod.a_qmax, np.uint8)),
                    _outputs=[f"{name}.input_q"], _name=f"{name}/input_clip")
    return op.DequantizeLinear(q, scale, zp, _outputs=[f"{name}.input_dq"], _name=f"{name}/input_dq")


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
    """The model's `arq.*` metadata, JSON values parsed (arq_deploy.core.artifact.onnx_arq_metadata)."""

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
