"""Integer lowering: QDQ conv2d / matmul patterns in a Relax module -> integer operators.

TVM's ONNX importer turns a QDQ layer into float operators on dequantized tensors:

    x  = dequantize(x_q, s_x, z_x)                      activation, per tensor (uint8 or int8)
    w  = dequantize(W_q, s_w, z_w, axis=out)            constant weight, per output channel (or per tensor)
    y  = conv2d(x, w)             | matmul(x, permute_dims(w)) | matmul(x, w)
    y  = y + reshape(dequantize(b_q, s_b, 0))           optional int32 bias with s_b = s_x·s_w
    [y = relu(y)]  [y_q = quantize(y, s_y, z_y)]        optional, when each step is the only use of the last

This pass rewrites every such layer into integer arithmetic (exact, whatever the bits):

    acc[n,o,...] = Σ_k (x_q - z_x)[n,k] · (W_q - z_w)[o,k]  +  b_q[o]           int32 (conv2d/matmul, out_dtype int32)

with x_q fed as it is when z_x = 0 (uint8/int8 × int8 weights) and widened to int16 otherwise (x_q - z_x spans
[-255, 255]); zero padding of the integer input is exactly the float zero. Then either

    requantize (the layer ends in `quantize`):  y_q = clip(round(float(acc) · m[o]) + z_y, lo, hi),
        m[o] = float32(float32(s_x · s_w[o]) / s_y), round half to even (onnxruntime's QLinearConv/QGemm arithmetic;
        a relu before the quantize raises lo to z_y, which is what quantizing relu(y) gives);
    or dequantize (the next op needs float):   y = float(acc) · float32(s_x · s_w[o])  (+ float bias if b's scale is
        not s_x·s_w).

The bias is added in int32 when its scale equals s_x·s_w to 1e-6 relative (what QLinearConv assumes), else in float.
Remaining `dequantize(constant)` calls (weights of layers that did not match) are evaluated in numpy, so no
constant-folding TIR functions are compiled for them. Layers that do not match (non-constant weights, per-tensor
activation scale missing, per-channel scales on a reduction axis, non-NCHW layouts) stay in float. Where a layer is
rewritten, results differ from the float graph only where the float graph rounds (its sums are float32, the
integer sums are exact), which the tests bound against onnxruntime and an exact numpy reference.

The conv layers that fit run on a SIMD dot-product kernel of `arq_deploy.targets.int_kernels` (x86: vpdpbusd with
VNNI, else vpmaddubsw where the layer's (w, a) pair keeps its int16 partial sums exact, else vpmaddwd; AArch64 with the dot-product extension: sdot; AArch64 without: smlal_narrow where the layer's
(w, a) pair keeps int16 partial sums exact, else smlal; the same integer arithmetic); elsewhere on relax conv2d with
int32 output. The choice is per layer (`int_kernels.choose`), from the layer's max |w| and its activation levels
(a_max: 255 for uint8, or 2^b - 1 where the exporter's integer Clip bounds them), and recorded in the report.

    lower_integer(mod, kernel=None) -> (mod, report)
        report: {"conv2d": n, "matmul": n, "requantized": n, "float_out": n, "conv2d_kernel": n, "kernel": name,
                 "conv2d_kernels": {kernel name: n},
                 "conv2d_layers": [{"shape", "w_max", "a_max", "kernel", "chunk"}, ...]}
    integer_lowering_pass(report, kernel)   the same as a tvm.transform module pass
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from arq_deploy.targets import int_kernels

BIAS_RTOL = 1e-6
_INT_RANGE = {"uint8": (0, 255), "int8": (-128, 127), "int16": (-32768, 32767)}


@dataclass
class _Layer:
    """One matched QDQ layer: where it starts (anchor) and ends in the binding list, and the integer data."""

    kind: str  # "conv2d" | "matmul"
    anchor: Any  # the conv2d/matmul binding var
    end: Any  # the var whose value the rewrite replaces
    skip: set = field(default_factory=set)  # vars whose bindings disappear (absorbed into the rewrite)
    x_q: Any = None  # relax expr of the quantized activation
    z_x: int = 0
    a_max: int = 255  # the largest level x_q can hold (its dtype's, or the graph's integer Clip to b bits: 2^b - 1)
    s_x: np.float32 = np.float32(1)
    w_int: np.ndarray | None = None  # conv: O×I×kh×kw ; matmul: K×N
    s_w: np.ndarray | None = None  # per output channel, float32 (length O or N)
    attrs: Any = None  # conv2d attrs
    bias_int: np.ndarray | None = None  # int32, per output channel
    bias_float: np.ndarray | None = None  # float32, per output channel (bias scale != s_x·s_w)
    requant: dict | None = None  # {"s_y", "z_y", "dtype", "lo", "hi"}


def lower_integer(mod, func_name: str = "main", kernel=None):
    """Rewrite the QDQ layers of `mod[func_name]` into integer operators; returns (new module, report dict).

    kernel: an `arq_deploy.targets.int_kernels.Kernel` (vpdpbusd / vpmaddwd / sdot / smlal) used for the conv layers
        it fits, or one of its variants (smlal_narrow) where that fits first (`int_kernels.choose`, from the layer's
        weights and activation levels); report["conv2d_kernel"] counts the layers on a kernel, report["conv2d_kernels"]
        per kernel name, and report["conv2d_layers"] lists every conv in graph order with its weight shape, max |w|,
        activation levels (a_max), kernel (None: the plain integer conv2d) and a narrow kernel's int16 partial-sum chunk
        (`int_kernels.kernel_chunk`). kernel None: plain integer conv2d everywhere.
    The input module is not modified."""
    from tvm import relax

    gv = mod.get_global_var(func_name)
    layers = _plan(mod[gv], mod)
    report = {"conv2d": 0, "matmul": 0, "requantized": 0, "float_out": 0, "conv2d_kernel": 0,
              "kernel": kernel.name if kernel is not None else None, "conv2d_kernels": {}, "conv2d_layers": []}
    for ly in layers:
        report[ly.kind] += 1
        report["requantized" if ly.requant else "float_out"] += 1
    out = _Rewriter(layers, kernel, report).rewrite(mod, gv)
    return relax.transform.DeadCodeElimination()(out), report


def integer_lowering_pass(report: dict | None = None, kernel=None):
    """`lower_integer` as a tvm.transform module pass (opt_level 0); fills `report` when given."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="ArqIntegerLowering")
    def _pass(mod, _ctx):
        new, rep = lower_integer(mod, kernel=kernel)
        if report is not None:
            report.update(rep)
        return new

    return _pass


# --------------------------------------------------------------------------------------------------------------------
# Matching (on the original function; pure analysis)

def _plan(func, mod=None) -> list[_Layer]:
    from tvm import relax

    bindings = [b for blk in func.body.blocks for b in blk.bindings]
    value = {b.var: b.value for b in bindings if isinstance(b, relax.VarBinding)}
    uses: dict[Any, list] = {}
    for b in bindings:
        for v in relax.analysis.free_vars(b.value):
            uses.setdefault(v, []).append(b.var)
    for v in relax.analysis.free_vars(func.body.body):
        uses.setdefault(v, []).append(None)
    layers = []
    for b in bindings:
        ly = _match_layer(b.var, b.value, value, mod)
        if ly is not None:
            _extend_chain(ly, value, uses)
            layers.append(ly)
    return layers


def _op(expr) -> str | None:
    from tvm import relax

    if isinstance(expr, relax.Call) and hasattr(expr.op, "name"):
        return expr.op.name
    return None


def _const(expr) -> np.ndarray | None:
    """The numpy value of a constant expression (TVM 0.27: tvm.ir.expr.Constant), else None."""
    import tvm

    if isinstance(expr, tvm.ir.expr.Constant):
        return expr.value.numpy()
    return None


def _bound(expr, value: dict):
    """The value bound to a var (the expression itself when it is not a bound var)."""
    return value.get(expr, expr)


def _dq_parts(expr, value: dict):
    """(q, scale, zero point, axis) of dequantize(q, const scale, const zp) -> float32, else None."""
    call = _bound(expr, value)
    if _op(call) != "relax.dequantize" or str(call.attrs.out_dtype) != "float32":
        return None
    s, z = _const(call.args[1]), _const(call.args[2])
    if s is None or z is None:
        return None
    return call.args[0], s.astype(np.float32), z, int(call.attrs.axis)


def _per_channel(arr: np.ndarray, n: int) -> np.ndarray | None:
    """A scale/zero point as a length-n vector (scalar broadcast), or None when it has another shape."""
    a = np.asarray(arr).reshape(-1)
    if a.size == 1:
        return np.repeat(a, n)
    return a if a.size == n else None


def _activation(expr, value: dict, mod=None):
    """(x_q, z_x, s_x, a_max) of a per-tensor dequantize of an 8-bit activation, else None."""
    parts = _dq_parts(expr, value)
    if parts is None:
        return None
    q, s, z, _ = parts
    dtype = str(q.ty.dtype) if hasattr(q.ty, "dtype") else ""
    if dtype not in ("uint8", "int8") or s.size != 1 or z.size != 1:
        return None
    return q, int(np.asarray(z).reshape(-1)[0]), np.float32(s.reshape(-1)[0]), _levels_max(q, value, mod)


def _levels_max(q, value: dict, mod=None) -> int:
    """The largest value the integer activation q can hold: its dtype's maximum, lowered by the integer Clip the
    exporter puts after a sub-8-bit QuantizeLinear (TVM imports Clip(q, lo, hi) on uint8 as call_tir(maximum)
    then call_tir(minimum) with scalar constants; relax.clip / relax.minimum count too). Only a bound the graph
    proves is used: a call_tir counts when its PrimFunc is a single elementwise min with the scalar."""
    hi = _INT_RANGE[str(q.ty.dtype)][1]
    call = _bound(q, value)
    for _ in range(8):
        op = _op(call)
        if op == "relax.clip":  # clip(x, PrimValue lo, PrimValue hi)
            top = getattr(getattr(call.args[2], "value", None), "value", None)
            if isinstance(top, (int, float)):
                hi = min(hi, int(np.floor(top)))
            call = _bound(call.args[0], value)
        elif op in ("relax.minimum", "relax.maximum"):
            c = _const(call.args[1])
            if op == "relax.minimum" and c is not None and c.size == 1:
                hi = min(hi, int(c.reshape(-1)[0]))
            call = _bound(call.args[0], value)
        elif op == "relax.call_tir" and mod is not None and len(call.args[1].fields) == 2:
            src, other = call.args[1].fields
            c = _const(other)
            kind = _scalar_minmax(mod, call.args[0]) if c is not None and c.size == 1 else None
            if kind is None:
                break
            if kind == "min":
                hi = min(hi, int(c.reshape(-1)[0]))
            call = _bound(src, value)
        else:
            break
    return int(hi)


def _scalar_minmax(mod, gv) -> str | None:
    """"min" / "max" when PrimFunc gv is one block storing T.min / T.max of its first parameter's element (at the
    stored index) and its second, 0-d, parameter; else None."""
    from tvm import s_tir, tirx

    try:
        func = mod[gv]
        if not isinstance(func, tirx.PrimFunc) or len(func.params) != 3:
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        store = sch.get(blocks[0]).body if len(blocks) == 1 else None
        v = getattr(store, "value", None)
        kind = {"Min": "min", "Max": "max"}.get(type(v).__name__)
        if kind is None or not isinstance(store, tirx.BufferStore):
            return None
        a, b = v.a, v.b
        ok = (a.source.same_as(func.params[0]) and b.source.same_as(func.params[1]) and len(b.indices) == 0
              and [str(i) for i in a.indices] == [str(i) for i in store.indices])
        return kind if ok else None
    except Exception:  # noqa: BLE001 - any other shape of function: no bound from it
        return None


def _weight(expr, value: dict, out_axis: int):
    """(W_q - z_w as int array, per-output-channel scale) of dequantize(constant W_q) with scales on out_axis."""
    parts = _dq_parts(expr, value)
    if parts is None:
        return None
    q, s, z, axis = parts
    wq = _const(q)
    if wq is None or wq.dtype.kind not in "iu" or wq.itemsize > 2:
        return None
    n = wq.shape[out_axis]
    if s.size != 1 and (axis % wq.ndim != out_axis % wq.ndim):
        return None  # per-channel scales on a reduction axis cannot be factored out of the sum
    s_vec, z_vec = _per_channel(s, n), _per_channel(z, n)
    if s_vec is None or z_vec is None:
        return None
    shape = [1] * wq.ndim
    shape[out_axis] = n
    w = wq.astype(np.int32) - z_vec.astype(np.int32).reshape(shape)
    return w, s_vec.astype(np.float32)


def _match_layer(var, call, value: dict, mod=None) -> _Layer | None:
    op = _op(call)
    if op == "relax.nn.conv2d":
        a = call.attrs
        if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != ("NCHW", "OIHW", "NCHW"):
            return None
        if str(a.out_dtype) not in ("", "float32", "void", "None"):
            return None
        act, wt = _activation(call.args[0], value, mod), _weight(call.args[1], value, 0)
        if act is None or wt is None:
            return None
        return _Layer("conv2d", var, var, x_q=act[0], z_x=act[1], s_x=act[2], a_max=act[3], w_int=wt[0], s_w=wt[1],
                      attrs=a)
    if op == "relax.matmul":
        act = _activation(call.args[0], value)
        if act is None or len(call.args[0].ty.shape) != 2:
            return None
        rhs = _bound(call.args[1], value)
        if _op(rhs) == "relax.permute_dims" and [int(i) for i in rhs.attrs.axes] == [1, 0]:
            wt = _weight(rhs.args[0], value, 0)
            wt = (wt[0].T, wt[1]) if wt is not None else None
        else:
            wt = _weight(call.args[1], value, 1)
        if wt is None or wt[0].ndim != 2:
            return None
        return _Layer("matmul", var, var, x_q=act[0], z_x=act[1], s_x=act[2], w_int=wt[0], s_w=wt[1])
    return None


def _only_use(var, uses: dict):
    """The one binding var that uses `var`, or None (several uses, or the function's result)."""
    u = uses.get(var, [])
    return u[0] if len(u) == 1 else None


def _extend_chain(ly: _Layer, value: dict, uses: dict) -> None:
    """Absorb the bias add, then `[relu ->] quantize` when each link is the only use of the one before."""
    n_out = ly.s_w.size
    nxt = _only_use(ly.end, uses)
    if nxt is not None and _op(value[nxt]) == "relax.add":
        bias = _bias(value[nxt], ly.end, value, ly, n_out)
        if bias is not None:
            ly.end = nxt
    if ly.bias_float is not None:
        return  # a float bias is added after dequantizing; the quantize stays a float op
    cur, relu = ly.end, False
    nxt = _only_use(cur, uses)
    if nxt is not None and _op(value[nxt]) == "relax.nn.relu":
        cur, relu = nxt, True
        nxt = _only_use(cur, uses)
    if nxt is None or _op(value[nxt]) != "relax.quantize":
        return
    q = value[nxt]
    s, z = _const(q.args[1]), _const(q.args[2])
    dtype = str(q.attrs.out_dtype)
    if s is None or z is None or s.size != 1 or z.size != 1 or dtype not in ("uint8", "int8"):
        return
    z_y = int(np.asarray(z).reshape(-1)[0])
    lo, hi = _INT_RANGE[dtype]
    ly.requant = {"s_y": np.float32(s.reshape(-1)[0]), "z_y": z_y, "dtype": dtype,
                  "lo": max(lo, z_y) if relu else lo, "hi": hi}
    if ly.end is not ly.anchor:
        ly.skip.add(ly.end)
    if relu:
        ly.skip.add(cur)
    ly.end = nxt


def _bias(add_call, acc_var, value: dict, ly: _Layer, n: int) -> bool | None:
    """Record the layer's bias from add(acc, [reshape](dequantize(b_q))) into ly; None when it is not one."""
    args = list(add_call.args)
    if len(args) != 2 or not any(a.same_as(acc_var) for a in args):
        return None
    other = args[1] if args[0].same_as(acc_var) else args[0]
    src = _bound(other, value)
    if _op(src) == "relax.reshape":
        target = [int(d) for d in src.ty.shape]
        want = [1, n, 1, 1] if ly.kind == "conv2d" else [n]
        if target != want and not (ly.kind == "matmul" and target == [1, n]):
            return None
        src = src.args[0]
    elif ly.kind == "conv2d":
        return None  # a conv bias must be broadcast along channels
    parts = _dq_parts(src, value)
    if parts is None:
        return None
    q, s, z, _ = parts
    bq = _const(q)
    if bq is None or bq.reshape(-1).size != n:
        return None
    s_vec, z_vec = _per_channel(s, n), _per_channel(z, n)
    if s_vec is None or z_vec is None:
        return None
    b_int = bq.reshape(-1).astype(np.int64) - z_vec.astype(np.int64)
    s_acc = np.float32(ly.s_x) * ly.s_w
    if bq.dtype == np.int32 and np.allclose(s_vec, s_acc, rtol=BIAS_RTOL, atol=0):
        ly.bias_int = b_int.astype(np.int32)
    else:
        ly.bias_float = (b_int.astype(np.float32) * s_vec).astype(np.float32)
    return True


# --------------------------------------------------------------------------------------------------------------------
# Rewriting

class _Rewriter:
    """Re-emits the function's bindings; matched layers become integer ops, absorbed bindings disappear."""

    def __init__(self, layers: list[_Layer], kernel=None, report: dict | None = None):
        self.kernel, self.report = kernel, report if report is not None else {}
        self.by_anchor = {ly.anchor: ly for ly in layers}
        self.skip = set()
        for ly in layers:
            self.skip |= ly.skip | {ly.end}

    def rewrite(self, mod, gv):
        from tvm import relax

        rw = self

        @relax.expr_functor.mutator
        class _M(relax.PyExprMutator):
            def visit_var_binding_(self, binding):
                bb = self.builder_
                ly = rw.by_anchor.get(binding.var)
                if ly is not None:
                    expr = emit_layer(bb, ly, self.visit_expr(ly.x_q), rw.kernel, rw.report)
                    dataflow = isinstance(ly.end, relax.DataflowVar)
                    new = bb.emit(expr) if dataflow else bb.emit_output(expr)
                    self.set_var_remap(ly.end, new)
                elif binding.var not in rw.skip:
                    folded = _fold_dequantize(binding.value)
                    if folded is None or not isinstance(binding.var, relax.DataflowVar):
                        super().visit_var_binding_(binding)
                    else:
                        self.set_var_remap(binding.var, bb.emit(folded))

        m = _M(mod)
        m.builder_.update_func(gv, m.visit_expr(mod[gv]))
        return m.builder_.get()


def emit_layer(bb, ly: _Layer, x_q, kernel=None, report: dict | None = None):
    """Emit the integer ops of one layer into `bb`; returns the last expression (not yet emitted)."""
    from tvm import relax
    from tvm.relax import op as R

    x = x_q
    if ly.z_x != 0:  # x_q - z_x spans [-255, 255]: widen to int16
        x = bb.emit(R.subtract(R.astype(x_q, "int16"), relax.const(np.int16(ly.z_x))))
    w_dtype = "int8" if ly.w_int.min() >= -128 and ly.w_int.max() <= 127 else "int16"
    w = relax.const(ly.w_int.astype(w_dtype))
    bias = ly.bias_int
    chosen = _use_kernel(ly, x_q, kernel) if ly.kind == "conv2d" else None
    if ly.kind == "conv2d" and report is not None:
        report.setdefault("conv2d_layers", []).append({
            "shape": [int(d) for d in ly.w_int.shape], "w_max": int(np.abs(ly.w_int.astype(np.int64)).max()),
            "a_max": int(ly.a_max), "kernel": chosen.name if chosen is not None else None,
            "chunk": int_kernels.kernel_chunk(chosen, ly.w_int, ly.a_max) if chosen is not None else None})
    if chosen is not None:
        a = ly.attrs
        strides, padding = [int(v) for v in a.strides], [int(v) for v in a.padding]
        args = [x_q, relax.const(int_kernels.packed_weights(chosen, ly.w_int, ly.a_max))]
        if chosen.name == "vpmaddubsw":  # the pair shift table (`int_kernels.pair_dot`)
            args.append(relax.const(int_kernels.PAIR_SHIFTS))
        acc = bb.emit_te(lambda xq, wp, *sh: int_kernels.qconv2d(xq, wp, strides, padding, chosen, *sh), *args,
                         primfunc_name_hint=int_kernels.block_names(chosen)[0])
        chan = (1, -1, 1, 1)
        corr = int_kernels.offset_correction(chosen, ly.w_int)
        if corr is not None:  # the kernel summed (x − x_offset)·w: add x_offset·Σw back, with the bias
            bias = corr if bias is None else (bias.astype(np.int64) + corr).astype(np.int32)
        if report is not None:
            report["conv2d_kernel"] = report.get("conv2d_kernel", 0) + 1
            per = report.setdefault("conv2d_kernels", {})
            per[chosen.name] = per.get(chosen.name, 0) + 1
    elif ly.kind == "conv2d":
        a = ly.attrs
        acc = bb.emit(R.nn.conv2d(x, w, strides=a.strides, padding=a.padding, dilation=a.dilation,
                                  groups=int(a.groups), out_dtype="int32"))
        chan = (1, -1, 1, 1)
    else:
        acc = bb.emit(R.matmul(x, w, out_dtype="int32"))
        chan = (-1,)
    if bias is not None:
        acc = bb.emit(R.add(acc, relax.const(bias.reshape(chan))))
    f = bb.emit(R.astype(acc, "float32"))
    s_acc = (np.float32(ly.s_x) * ly.s_w).astype(np.float32)
    if ly.requant is None:
        y = R.multiply(f, relax.const(s_acc.reshape(chan)))
        if ly.bias_float is not None:
            y = R.add(bb.emit(y), relax.const(ly.bias_float.reshape(chan)))
        return y
    rq = ly.requant
    m = (s_acc / rq["s_y"]).astype(np.float32)
    y = bb.emit(R.round(R.multiply(f, relax.const(m.reshape(chan)))))
    if rq["z_y"]:
        y = bb.emit(R.add(y, relax.const(np.float32(rq["z_y"]))))
    y = bb.emit(R.clip(y, float(rq["lo"]), float(rq["hi"])))
    return R.astype(y, rq["dtype"])


def _use_kernel(ly: _Layer, x_q, kernel):
    """The kernel (kernel or one of its variants) that computes this conv layer exactly, else None."""
    if kernel is None:
        return None

    a = ly.attrs
    pad = [int(v) for v in a.padding]
    if len(pad) == 2:
        pad = pad * 2
    out_w = (int(x_q.ty.shape[3]) + pad[1] + pad[3] - ly.w_int.shape[3]) // int(a.strides[1]) + 1
    return int_kernels.choose(kernel, str(x_q.ty.dtype), ly.z_x, ly.w_int, int(a.groups), a.dilation, out_w,
                              ly.a_max)


def _fold_dequantize(call):
    """dequantize(constant q, constant s, constant z) evaluated in numpy (ONNX DequantizeLinear), else None."""
    from tvm import relax

    if _op(call) != "relax.dequantize" or str(call.attrs.out_dtype) != "float32":
        return None
    q, s, z = (_const(a) for a in call.args)
    if q is None or s is None or z is None:
        return None
    s, z = s.astype(np.float32), z.astype(np.float32)
    if s.size > 1 and q.ndim > 0:
        shape = [1] * q.ndim
        shape[int(call.attrs.axis) % q.ndim] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return relax.const(((q.astype(np.float32) - z) * s).astype(np.float32))
