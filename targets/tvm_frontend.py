"""ONNX into TVM Relax, shared by every TVM backend: the model's input/output spec, the operator check, weight
folding, the import itself, cross-compiler checks and the atomic artifact directory.

    io_spec(model, batch_size) -> (input spec, output spec)
    import_onnx(model, input_name, shape, path) -> Relax IRModule
    _staging_dir(out_dir): a temp dir that replaces out_dir on success and is removed on failure
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from arq_deploy.core.errors import ArqError, ModelFormatError, UnsupportedOpError
from arq_deploy.targets.registry import Target

# ONNX tensor types TVM 0.27's ONNX importer cannot read from initializers (sub-byte types).
_SUB_BYTE_TYPES = ("INT4", "UINT4", "INT2", "UINT2", "FLOAT4E2M1")


def io_spec(model, batch_size: int) -> tuple[dict, dict]:
    """The model's one N×C×H×W float32 input (shape with N = batch_size) and its one output."""
    from onnx import TensorProto

    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelFormatError(f"expected one graph input, got {[i.name for i in inputs]}")
    i = inputs[0]
    tt = i.type.tensor_type
    if tt.elem_type != TensorProto.FLOAT:
        raise ModelFormatError(f"input {i.name!r} must be float32, got {TensorProto.DataType.Name(tt.elem_type)}")
    dims = list(tt.shape.dim)
    if len(dims) != 4 or not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims[1:]):
        raise ModelFormatError(f"input {i.name!r} must be N×C×H×W with fixed C, H, W; got "
                               f"{[d.dim_value if d.HasField('dim_value') else d.dim_param for d in dims]}")
    if dims[0].HasField("dim_value") and dims[0].dim_value not in (0, batch_size):
        raise ModelFormatError(f"input {i.name!r} has a fixed batch of {dims[0].dim_value}; compile with batch_size="
                               f"{dims[0].dim_value} or export with a dynamic batch dimension")
    if len(model.graph.output) != 1:
        raise ModelFormatError(f"expected one graph output (logits), got {[o.name for o in model.graph.output]}")
    o = model.graph.output[0]
    odims = [d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim]
    oshape = [batch_size] + odims[1:] if odims else None
    inp = {"name": i.name, "shape": [batch_size] + [d.dim_value for d in dims[1:]], "dtype": "float32",
           "range": [0.0, 1.0], "layout": "NCHW"}
    return inp, {"name": o.name, "shape": oshape}


def check_supported(model) -> None:
    """Reject, with one line naming the culprit, what TVM 0.27's ONNX importer cannot take."""
    from onnx import TensorProto
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            raise UnsupportedOpError(f"ONNX op {n.domain}::{n.op_type} (node {n.name or n.output[0]!r}) is not a "
                                     f"standard ONNX op; TVM cannot import it")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    known = _get_convert_map()
    missing = sorted({n.op_type for n in model.graph.node if n.op_type not in known})
    if missing:
        node = next(n for n in model.graph.node if n.op_type == missing[0])
        more = f" (and {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise UnsupportedOpError(f"ONNX op {missing[0]} (node {node.name or node.output[0]!r}){more} has no TVM "
                                 f"converter (opset {opset})")
    sub_byte = {getattr(TensorProto, n): n for n in _SUB_BYTE_TYPES if hasattr(TensorProto, n)}
    for init in model.graph.initializer:
        if init.data_type in sub_byte:
            raise UnsupportedOpError(f"initializer {init.name!r} has type {sub_byte[init.data_type]}, which TVM's ONNX "
                                     f"importer cannot read: store sub-8-bit values in int8 containers")
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            for a in n.attribute:
                if a.name == "block_size" and a.i:
                    raise UnsupportedOpError(f"ONNX op {n.op_type} (node {n.name or n.output[0]!r}) uses block_size="
                                             f"{a.i}; TVM supports per-tensor and per-axis quantization only")


def fold_weight_dequantize(model):
    """A copy of the model with every DequantizeLinear of initializers (weights, biases) replaced by its float result.

    y = (x - zero_point) * scale in float32, per tensor or along `axis`: what TVM's FoldConstant computes, but in numpy
    (TVM compiles one TIR function per folded tensor: ~9 s of an 13 s ResNet-20 QDQ build).
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    folded, keep = [], []
    for n in model.graph.node:
        ins = [i for i in n.input if i]
        if n.op_type != "DequantizeLinear" or not all(i in inits for i in ins):
            keep.append(n)
            continue
        x = numpy_helper.to_array(inits[ins[0]])
        scale = numpy_helper.to_array(inits[ins[1]]).astype(np.float32)
        zp = numpy_helper.to_array(inits[ins[2]]) if len(ins) > 2 else np.zeros((), x.dtype)
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and x.ndim > 0:
            axis = axis % x.ndim
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        y = ((x.astype(np.float32) - zp.astype(np.float32)) * scale).astype(np.float32)
        folded.append(numpy_helper.from_array(y, n.output[0]))
    if not folded:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    out.graph.initializer.extend(folded)
    return out


def import_onnx(model, input_name: str, shape: list[int], path: Path, fold_weights: bool = True):
    """tvm.relax.frontend.onnx.from_onnx with a static input shape; weights become constants of the module.

    fold_weights: replace DequantizeLinear of initializers by float initializers first (`fold_weight_dequantize`);
    False keeps them as dequantize(constant), which integer lowering needs."""
    from tvm.relax.frontend.onnx import from_onnx

    if fold_weights:
        model = fold_weight_dequantize(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return from_onnx(model, shape_dict={input_name: list(shape)}, keep_params_in_input=False)
    except Exception as e:  # OpNotImplemented, TVMError, ValueError, ...
        msg = _first_line(e)
        if type(e).__name__ == "OpNotImplemented":
            raise UnsupportedOpError(f"{path.name}: {msg}") from None
        node = _failing_node(e.__traceback__)
        where = f" at ONNX op {node.op_type} (node {node.name or node.output[0]!r})" if node is not None else ""
        raise UnsupportedOpError(f"TVM's ONNX importer failed on {path.name}{where}: {type(e).__name__}: {msg}") \
            from None


def _failing_node(tb):
    """The ONNX node the importer was converting when it raised (its loop variable `node`), if it can be found."""
    node = None
    while tb is not None:
        f = tb.tb_frame
        if f.f_code.co_filename.endswith("onnx_frontend.py") and hasattr(f.f_locals.get("node"), "op_type"):
            node = f.f_locals["node"]
        tb = tb.tb_next
    return node


def _output_shape(func) -> list[int] | None:
    try:
        return [int(d) for d in func.ret_struct_info.shape]
    except Exception:  # tuple outputs or symbolic shapes: fall back to the ONNX graph's output
        return None


def require_cross_compiler(t: Target) -> None:
    """ArqError naming the Debian package to install when the target's (cross) compiler is not on PATH.

    `compile_onnx` checks this before building for another CPU architecture, and again when linking fails.

    A cross-compiled library (t.host_triple, e.g. aarch64-linux-gnu) is linked by `export_library(cc=...)` with the
    target's C compiler; TVM itself generates the machine code (LLVM), so only the linker driver is needed here.
    """
    cc = t.cross_compiler
    if cc is None or shutil.which(cc):
        return
    install = (f"apt-get install {t.cross_package}" if t.cross_package else
               f"install a C compiler for {t.host_triple} and put {cc} on PATH")
    raise ArqError(f"target {t.name!r} links its {t.host_triple} library with {cc}, which is not installed: "
                   f"{install}" + (" (or run `make aarch64-env`)" if t.host_arch == "aarch64" else ""))


@contextlib.contextmanager
def _staging_dir(out_dir: Path):
    """Yield an empty temp dir next to out_dir; on success it replaces out_dir, on failure it is removed."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old / "a")
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            if old is not None:
                os.replace(old / "a", out_dir)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _first_line(e: BaseException) -> str:
    """The first informative line of an exception message (TVM messages may start with a traceback)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("Traceback", "File ", "^"))] or lines
    return (lines[0] if lines else type(e).__name__)[:300]
