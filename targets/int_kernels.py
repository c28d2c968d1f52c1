"""An integer conv2d for x86 that runs on `vpmaddwd` (int16 × int16 pairs summed into int32), exact for 8-bit data.

Why this instruction. On x86 without AVX-512 VNNI (this machine: AMD Zen 3, AVX2), the u8 × s8 instruction
`vpmaddubsw` saturates its int16 pair sums (255·127·2 > 32767: wrong results for 8-bit activations), and a plain int32
multiply (`vpmulld`) is slower than float FMA. `vpmaddwd` multiplies 16 int16 pairs and adds each pair into int32
exactly (|x|·|w|·2 <= 255·128·2), 16 multiply-adds per instruction against FMA's 8.

Layout. Input channels are paired: a pack stage (per image, inside the same function) turns the uint8 NCHW input
into int32 words holding two channels, `xs[n, c2, h, w] = x[n, 2c2, h, w] | x[n, 2c2+1, h, w] << 16` (zero padded;
an odd last channel pairs with 0), and the weights are packed the same way ahead of time, `w32[o, c2, kh, kw]`.
Then, for 8 consecutive output columns (one AVX2 vector),

    acc[n, o, oh, ow:ow+8] += vpmaddwd(xs[n, c2, oh·s+kh, ow+kw : ow+kw+8], broadcast(w32[o, c2, kh, kw]))

which is  Σ_{c2,kh,kw} lo(xs)·lo(w) + hi(xs)·hi(w)  = Σ_{c,kh,kw} x·w  (lo/hi: the sign-extended 16-bit halves).
For stride > 1 the pack stage also expands the kernel columns, `xs[n, c2, h, kw, ow] = pair(x[.., h, ow·s + kw])`, so
the 8 lanes stay contiguous. The TE compute states exactly this math (shifts on int32), and the schedule replaces the
8-lane inner loop by the intrinsic (`tensorize`), so the arithmetic TVM checks is the arithmetic that runs.

Requirements (else the caller uses a plain integer conv2d): uint8 activations with zero point 0 (after ReLU), int8
weights, groups = 1, dilation 1, output width a multiple of the vector lanes (8 with AVX2, 4 with SSE2).

Schedule (`schedule_qconv`): batch loop parallel, pack computed per image, register tile F=2 output channels × U=2
rows × 8 columns of int32 accumulators, reduction over (c2, kh, kw) inside, the fused epilogue (bias, requantize or
dequantize) computed per tile and vectorized.
"""

from __future__ import annotations

import numpy as np

CONV_BLOCK, PACK_BLOCK = "arq_qconv", "arq_qconv_pack"
TILE = {"F": 2, "U": 2}  # measured best of 1-8 × 1-4 on ResNet-20 (Zen 3): larger tiles spill registers
UNROLL = ("oi", "ohi", "rw")
_LLVM = {16: "llvm.x86.avx512.pmaddw.d.512", 8: "llvm.x86.avx2.pmadd.wd", 4: "llvm.x86.sse2.pmadd.wd"}
_REGISTERED: dict[int, str] = {}


def pmaddwd_lanes(tgt) -> int:
    """int32 lanes of the target's vpmaddwd (16 with AVX-512BW, 8 with AVX2, 4 with SSE2 on x86), 0 when none."""
    if tgt.kind.name != "llvm":
        return 0
    triple = str(tgt.attrs.get("mtriple", ""))
    if not triple.startswith(("x86_64", "i686")):
        return 0
    from tvm.target import codegen

    if codegen.llvm_cpu_has_features("avx512bw", tgt):
        return 16
    if codegen.llvm_cpu_has_features("avx2", tgt):
        return 8
    return 4 if codegen.llvm_cpu_has_features("sse2", tgt) else 0


def intrinsic(lanes: int) -> str:
    """Register (once) and return the name of the `lanes`-wide vpmaddwd tensor intrinsic."""
    if lanes in _REGISTERED:
        return _REGISTERED[lanes]
    from tvm.s_tir import TensorIntrin

    name = f"arq_pmaddwd_i16x{2 * lanes}"
    desc, impl = _intrin_funcs(lanes)
    try:
        TensorIntrin.register(name, desc, impl)
    except Exception:  # registered by an earlier import of this module (e.g. reloaded)
        TensorIntrin.get(name)
    _REGISTERED[lanes] = name
    return name


def _intrin_funcs(lanes: int):
    from tvm.script import tirx as T

    vec16, vec32 = f"int16x{2 * lanes}", f"int32x{lanes}"
    llvm = _LLVM[lanes]

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((lanes,), "int32", offset_factor=1), B: T.Buffer((1,), "int32", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes], B[0:1])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                with T.sblock("update"):
                    vi = T.axis.spatial(lanes, i)
                    C[vi] = C[vi] + (T.shift_right(T.shift_left(A[vi], 16), 16)
                                     * T.shift_right(T.shift_left(B[0], 16), 16)
                                     + T.shift_right(A[vi], 16) * T.shift_right(B[0], 16))

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((lanes,), "int32", offset_factor=1), B: T.Buffer((1,), "int32", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes], B[0:1])
            T.writes(C[0:lanes])
            a = T.reinterpret(A.vload([0], vec32), dtype=vec16)
            b = T.reinterpret(T.broadcast(B[0], lanes), dtype=vec16)
            C[T.ramp(T.int32(0), 1, lanes)] += T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(llvm), a, b,
                                                                        dtype=vec32)

    return desc, impl


def pack_weights(w_int: np.ndarray) -> np.ndarray:
    """O×C×KH×KW int weights (each in [-32768, 32767]) -> O×ceil(C/2)×KH×KW int32 words of channel pairs
    (channel 2c in the low 16 bits, 2c+1 in the high 16 bits, two's complement)."""
    o, c, kh, kw = w_int.shape
    w = np.zeros((o, c + c % 2, kh, kw), np.int64)
    w[:, :c] = w_int
    lo = w[:, 0::2] & 0xFFFF
    hi = (w[:, 1::2] & 0xFFFF) << 16
    return (lo | hi).astype(np.uint32).view(np.int32)


def fits(x_dtype: str, z_x: int, w_int: np.ndarray, groups: int, dilation, out_w: int, lanes: int) -> bool:
    """Whether `qconv2d` can compute this layer (see the module docstring)."""
    return (lanes > 0 and x_dtype == "uint8" and z_x == 0 and int(groups) == 1
            and all(int(d) == 1 for d in dilation) and out_w % lanes == 0
            and w_int.min() >= -32768 and w_int.max() <= 32767)


def qconv2d(x, w32, strides, padding):
    """TE compute: uint8 NCHW x, int32 pair-packed weights O×C2×KH×KW -> int32 NCHW conv2d (no zero points).

    strides: (sh, sw); padding: (top, left, bottom, right)."""
    from tvm import te, tirx

    n_, c_, h_, w_ = (int(d) for d in x.shape)
    o_, c2_, kh_, kw_ = (int(d) for d in w32.shape)
    sh, sw = (int(s) for s in strides)
    pt, pl, pb, pr = (int(p) for p in padding)
    oh_, ow_ = (h_ + pt + pb - kh_) // sh + 1, (w_ + pl + pr - kw_) // sw + 1

    def pix(n, c, h, w):
        ok = tirx.all(h >= pt, h < h_ + pt, w >= pl, w < w_ + pl, c < c_)
        v = x[n, tirx.min(c, c_ - 1), h - pt, w - pl].astype("int32")
        return tirx.if_then_else(ok, v, tirx.const(0, "int32"))

    if sw == 1:  # row width rounded up to 8 columns so that the pack stage vectorizes evenly
        xs = te.compute((n_, c2_, h_ + pt + pb, -(-(w_ + pl + pr) // 8) * 8),
                        lambda n, c2, h, w: pix(n, 2 * c2, h, w) | (pix(n, 2 * c2 + 1, h, w) << 16), name=PACK_BLOCK)

        def load(n, c2, oh, ow, kh, kw):
            return xs[n, c2, oh * sh + kh, ow + kw]
    else:
        xs = te.compute((n_, c2_, h_ + pt + pb, kw_, ow_),
                        lambda n, c2, h, kw, ow: pix(n, 2 * c2, h, ow * sw + kw)
                        | (pix(n, 2 * c2 + 1, h, ow * sw + kw) << 16), name=PACK_BLOCK)

        def load(n, c2, oh, ow, kh, kw):
            return xs[n, c2, oh * sh + kh, kw, ow]

    rc, rh, rw = te.reduce_axis((0, c2_), "rc"), te.reduce_axis((0, kh_), "rh"), te.reduce_axis((0, kw_), "rw")

    def lo(v):
        return (v << 16) >> 16

    def acc(n, o, oh, ow):
        a, b = load(n, rc, oh, ow, rh, rw), w32[o, rc, rh, rw]
        return te.sum(lo(a) * lo(b) + (a >> 16) * (b >> 16), axis=[rc, rh, rw])

    return te.compute((n_, o_, oh_, ow_), acc, name=CONV_BLOCK)


def schedule_qconv(sch, lanes: int, threads: int = 1) -> bool:
    """Schedule a (fused) PrimFunc holding `qconv2d`'s blocks in place; False when it holds none."""
    try:
        names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    except Exception:  # noqa: BLE001 - no root block: not a function of ours
        return False
    if CONV_BLOCK not in names or PACK_BLOCK not in names:
        return False
    rb, pack = sch.get_sblock(CONV_BLOCK), sch.get_sblock(PACK_BLOCK)
    root = sch.get_sblock("root")
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
    for name in names - {CONV_BLOCK, PACK_BLOCK} - outputs:  # epilogue chain: inline into the output block
        sch.compute_inline(sch.get_sblock(name))
    epilogue = [n for n in outputs if n != CONV_BLOCK]
    if not epilogue:
        epilogue = [sch.get(sch.cache_write(rb, 0, "global")).name_hint]
    n, o, oh, ow, rc, rh, rw = sch.get_loops(rb)
    ext = [int(sch.get(lp).extent) for lp in (n, o, oh, ow)]
    f = _divisor(ext[1], TILE["F"])
    u = _divisor(ext[2], TILE["U"])
    oo, oi = sch.split(o, [None, f])
    oho, ohi = sch.split(oh, [None, u])
    owo, owi = sch.split(ow, [None, lanes])
    sch.reorder(n, oo, oho, owo, rc, rh, rw, oi, ohi, owi)
    if ext[0] >= 2 * threads or ext[0] >= 8:
        sch.parallel(n)
    else:
        sch.parallel(sch.fuse(n, oo))
    sch.compute_at(pack, sch.get_loops(rb)[0])
    _vectorize_inner(sch, pack, lanes)
    for name in epilogue:
        eb = sch.get_sblock(name)
        sch.reverse_compute_at(eb, owo)
        _vectorize_inner(sch, eb, lanes)
    sch.set_scope(rb, 0, "local")
    init = sch.decompose_reduction(rb, rc)
    sch.tensorize(owi, intrinsic(lanes))
    for name, lp in (("oi", oi), ("ohi", ohi), ("rw", rw)):
        if name in UNROLL:
            sch.unroll(lp)
    sch.vectorize(sch.get_loops(init)[-1])
    return True


def _vectorize_inner(sch, block, lanes):
    loops = sch.get_loops(block)
    e = int(sch.get(loops[-1]).extent)
    f = _divisor(e, lanes)
    if f < 2:
        return
    inner = loops[-1] if f == e else sch.split(loops[-1], [None, f])[1]
    sch.vectorize(inner)


def _divisor(n: int, at_most: int) -> int:
    for f in range(min(at_most, n), 0, -1):
        if n % f == 0:
            return f
    return 1
