"""Integer conv2d kernels: int8 data multiplied and summed into int32 by one SIMD instruction, exactly.

Three instructions, the best the target has (`select`):

* `vpdpbusd` (AVX-512 VNNI, or AVX-VNNI on 256-bit vectors): per int32 lane, four u8 × s8 products summed into the
  accumulator, `acc += Σ_{k<4} u8(a_k)·s8(b_k)`, with no intermediate saturation (the `vpdpbusds` form saturates;
  this one does not): 64 multiply-adds per 512-bit instruction, exact for uint8 activations and int8 weights.
* `vpmaddwd` (SSE2/AVX2/AVX-512BW): 2 int16 × int16 products per int32 lane, `acc += lo(a)·lo(b) + hi(a)·hi(b)`,
  exact for 8-bit data (|x|·|w|·2 <= 255·128·2) and for weights up to 16 bits: the fallback without VNNI. (The
  u8 × s8 `vpmaddubsw` route saturates its int16 pair sums on 8-bit activations, 255·127·2 > 32767, so it is not used.)
* `sdot` (AArch64 dot product, FEAT_DotProd: Raspberry Pi 5's Cortex-A76, Jetson Orin's Cortex-A78AE): per int32
  lane, four s8 × s8 products summed into the accumulator, 16 multiply-adds per 128-bit instruction. uint8
  activations do not fit s8, so the pack stage stores x − 128 and the layer adds 128·Σ_{c,kh,kw} w[o] back (a
  constant per output channel, folded into the bias: `Kernel.x_offset`); padded pixels are stored as −128 (x = 0),
  so the identity Σ x·w = Σ (x − 128)·w + 128·Σ w holds at the borders too. (The u8 × s8 `usdot` needs FEAT_I8MM,
  which neither of those cores has.)

Layout. G input channels (G = 4 for vpdpbusd and sdot, 2 for vpmaddwd) share one int32 word: a pack stage (per image, inside
the same function) turns the uint8 NCHW input into `xs[n, cg, h, w] = Σ_k x[n, G·cg+k, h, w] << (32/G)·k` (zero
padded: channels past C are 0), and the weights are packed the same way ahead of time, `wp[o, cg, kh, kw]` (bytes,
or 16-bit halves, two's complement). Then, for L consecutive output columns (one vector),

    acc[n, o, oh, ow:ow+L] += dot_G(xs[n, cg, oh·s+kh, ow+kw : ow+kw+L], broadcast(wp[o, cg, kh, kw]))

which sums Σ_{cg,kh,kw,k} x·w = the conv. For stride > 1 the pack stage also expands the kernel columns,
`xs[n, cg, h, kw, ow] = pack(x[.., h, ow·s + kw])`, so the L lanes stay contiguous. The TE compute states exactly
this math (shifts and masks on int32), and the schedule replaces the L-lane inner loop by the instruction
(`tensorize`), so the arithmetic TVM checks is the arithmetic that runs.

Vector width per layer: the widest of the target's widths (16, 8 or 4 int32 lanes; 4 on NEON) that divides the
layer's output width, so a ResNet's 8-column last stage runs on 256-bit vectors where its 32-column first stage runs
on 512-bit ones.

Requirements (else the caller uses a plain integer conv2d): uint8 activations with zero point 0 (after ReLU), weights
within the kernel's range (int8 for vpdpbusd and sdot, int16 for vpmaddwd), groups = 1, dilation 1, output width a multiple of
4.

Schedule (`schedule_qconv`): batch loop parallel, pack computed per image, register tile F output channels × U rows ×
L columns of int32 accumulators (F, U: `tile`), reduction over (cg, kh, kw) inside, the fused epilogue (bias,
requantize or dequantize) computed per tile and vectorized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONV_BLOCK, PACK_BLOCK = "arq_qconv", "arq_qconv_pack"
UNROLL = ("oi", "ohi", "rw")
KERNELS = ("vpdpbusd", "vpmaddwd", "sdot")  # x86 in preference order of `select(.., "auto")`, then AArch64


@dataclass(frozen=True)
class Kernel:
    """One SIMD integer dot-product instruction at the vector widths a target has.

    name: "vpdpbusd" | "vpmaddwd" | "sdot"; group: input channels per int32 word (4 | 2); widths: ((int32 lanes,
    LLVM intrinsic), ...) widest first; w_range: the weight values it multiplies exactly; tile: (F, U) register
    tile; x_offset: subtracted from every uint8 activation before packing (128 for the signed-only sdot, whose
    caller adds x_offset·Σw[o] back), else 0."""

    name: str
    group: int
    widths: tuple[tuple[int, str], ...]
    w_range: tuple[int, int]
    tile: tuple[int, int]
    x_offset: int = 0

    def lanes_for(self, out_w: int) -> int:
        """The widest vector (int32 lanes) whose lane count divides out_w; 0 when none does."""
        for lanes, _ in self.widths:
            if out_w % lanes == 0:
                return lanes
        return 0

    def llvm(self, lanes: int) -> str:
        return dict(self.widths)[lanes]

    def to_json(self) -> dict:
        return {"name": self.name, "lanes": [lanes for lanes, _ in self.widths], "tile": list(self.tile)}


_VNNI = {16: "llvm.x86.avx512.vpdpbusd.512", 8: "llvm.x86.avx512.vpdpbusd.256", 4: "llvm.x86.avx512.vpdpbusd.128"}
_PMADDWD = {16: "llvm.x86.avx512.pmaddw.d.512", 8: "llvm.x86.avx2.pmadd.wd", 4: "llvm.x86.sse2.pmadd.wd"}
_SDOT = "llvm.aarch64.neon.sdot.v4i32.v16i8"
# NEON: 32 128-bit registers; F=4·U=4 keeps 16 accumulators, 4 input vectors and 4 weight broadcasts in registers.
# Not measured on a board (qemu says nothing about speed): a starting point, like any untuned schedule here.
_NEON_TILE = (4, 4)
# F output channels × U rows per register tile, measured on ResNet-20 W8A8 at batch 256: on Zen 3 (AVX2, 16 vector
# registers) F=2·U=2 was best of 1-8 × 1-4; on Zen 4 (AVX-512, 32 registers) vpdpbusd ran 5,255 / 6,070-6,589 /
# 7,537-8,509 / 5,494 img/s at 2·2 / 4·2 / 8·2 / 16·1 and vpmaddwd 3,711 / 5,160 / 5,280 at 2·2 / 4·2 / 8·2
_TILE = {"avx512": (8, 2), "avx2": (2, 2)}


def select(tgt, name: str = "auto") -> Kernel | None:
    """The integer conv kernel for an LLVM target: `name` ("auto": on x86 vpdpbusd where the target has VNNI, else
    vpmaddwd; on AArch64 sdot where it has the dot-product extension; "none": no kernel) at the vector widths its
    features allow; None when the target cannot run it.

    Raises ValueError for an unknown name."""
    if name not in ("auto", "none", *KERNELS):
        raise ValueError(f"integer kernel must be one of auto, none, {', '.join(KERNELS)}; got {name!r}")
    if name == "none" or tgt.kind.name != "llvm":
        return None
    triple = str(tgt.attrs.get("mtriple", ""))
    from tvm.target import codegen

    def has(*features):
        return all(codegen.llvm_cpu_has_features(f, tgt) for f in features)

    if triple.startswith(("aarch64", "arm64")):
        if name in ("auto", "sdot") and has("dotprod"):
            return Kernel("sdot", 4, ((4, _SDOT),), (-128, 127), _NEON_TILE, x_offset=128)
        return None
    if not triple.startswith(("x86_64", "i686")) or name == "sdot":
        return None

    wide = has("avx512bw", "avx512vl")
    tile = _TILE["avx512" if has("avx512f") else "avx2"]
    if name in ("auto", "vpdpbusd"):
        if has("avx512vnni") and wide:
            return Kernel("vpdpbusd", 4, tuple(_VNNI.items()), (-128, 127), tile)
        if has("avxvnni"):  # the same intrinsics, VEX-encoded on 256-bit vectors
            return Kernel("vpdpbusd", 4, ((8, _VNNI[8]), (4, _VNNI[4])), (-128, 127), tile)
        if name == "vpdpbusd":
            return None
    lanes = [16] if has("avx512bw") else []
    lanes += [8] if has("avx2") else []
    lanes += [4] if has("sse2") else []
    if not lanes:
        return None
    return Kernel("vpmaddwd", 2, tuple((n, _PMADDWD[n]) for n in lanes), (-32768, 32767), tile)


def block_names(kernel: Kernel) -> tuple[str, str]:
    """(conv block, pack block) names of `qconv2d`'s stages for this kernel (the schedule finds them by name)."""
    return f"{CONV_BLOCK}_{kernel.name}", f"{PACK_BLOCK}_{kernel.name}"


_REGISTERED: dict[tuple[str, int], str] = {}


def intrinsic(kernel: Kernel, lanes: int) -> str:
    """Register (once) and return the name of the kernel's `lanes`-wide tensor intrinsic."""
    key = (kernel.name, lanes)
    if key in _REGISTERED:
        return _REGISTERED[key]
    from tvm.s_tir import TensorIntrin

    name = f"arq_{kernel.name}_i32x{lanes}"
    desc, impl = _intrin_funcs(kernel, lanes)
    try:
        TensorIntrin.register(name, desc, impl)
    except Exception:  # registered by an earlier import of this module (e.g. reloaded)
        TensorIntrin.get(name)
    _REGISTERED[key] = name
    return name


def word_dot(a, b, group: int, signed_a: bool = False):
    """Σ_k field_k(a)·field_k(b) of two int32 words of `group` fields (bytes of a, unsigned or with signed_a signed,
    times signed bytes of b for 4; signed 16-bit halves for 2), as a TIR expression: one lane of the instruction."""
    if group == 2:
        return ((a << 16) >> 16) * ((b << 16) >> 16) + (a >> 16) * (b >> 16)
    if signed_a:
        ta = [(a << 24) >> 24, (a << 16) >> 24, (a << 8) >> 24, a >> 24]
    else:
        ta = [a & 255, (a >> 8) & 255, (a >> 16) & 255, (a >> 24) & 255]
    tb = [(b << 24) >> 24, (b << 16) >> 24, (b << 8) >> 24, b >> 24]
    return ta[0] * tb[0] + ta[1] * tb[1] + ta[2] * tb[2] + ta[3] * tb[3]


def _intrin_funcs(kernel: Kernel, lanes: int):
    from tvm.script import tirx as T

    vec16, vec32 = f"int16x{2 * lanes}", f"int32x{lanes}"
    llvm, group = kernel.llvm(lanes), kernel.group
    signed = kernel.x_offset != 0
    vec8 = f"int8x{4 * lanes}" if kernel.name == "sdot" or _vnni_takes_bytes() else vec32

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((lanes,), "int32", offset_factor=1), B: T.Buffer((1,), "int32", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes], B[0:1])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                with T.sblock("update"):
                    vi = T.axis.spatial(lanes, i)
                    C[vi] = C[vi] + word_dot(A[vi], B[0], group, signed)

    if kernel.name in ("vpdpbusd", "sdot"):
        @T.prim_func(s_tir=True)
        def impl(A: T.Buffer((lanes,), "int32", offset_factor=1), B: T.Buffer((1,), "int32", offset_factor=1),
                 C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")):
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:lanes], B[0:1])
                T.writes(C[0:lanes])
                a = T.reinterpret(A.vload([0], vec32), dtype=vec8)
                b = T.reinterpret(T.broadcast(B[0], lanes), dtype=vec8)
                C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(llvm), C[T.ramp(T.int32(0), 1, lanes)], a, b, dtype=vec32)
    else:
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


def _vnni_takes_bytes() -> bool:
    """LLVM 22 (TVM 0.27's) declares the vpdpbusd intrinsics on <N x i8> byte vectors; older LLVMs on <N x i32>."""
    from tvm.target import codegen

    return int(codegen.llvm_version_major()) >= 22


def pack_weights(w_int: np.ndarray, group: int = 2) -> np.ndarray:
    """O×C×KH×KW int weights -> O×ceil(C/group)×KH×KW int32 words: channel group·c + k in field k (bits
    (32/group)·k upwards, two's complement), missing channels 0."""
    o, c, kh, kw = w_int.shape
    bits = 32 // group
    w = np.zeros((o, -(-c // group) * group, kh, kw), np.int64)
    w[:, :c] = w_int
    word = np.zeros((o, w.shape[1] // group, kh, kw), np.int64)
    for k in range(group):
        word |= (w[:, k::group] & ((1 << bits) - 1)) << (bits * k)
    return word.astype(np.uint32).view(np.int32)


def offset_correction(kernel: Kernel, w_int: np.ndarray) -> np.ndarray | None:
    """int32 per output channel to add to `qconv2d`'s result: x_offset·Σ_{c,kh,kw} w[o] (None without an offset)."""
    if not kernel.x_offset:
        return None
    return (int(kernel.x_offset) * w_int.reshape(len(w_int), -1).astype(np.int64).sum(axis=1)).astype(np.int32)


def fits(kernel: Kernel | None, x_dtype: str, z_x: int, w_int: np.ndarray, groups: int, dilation, out_w: int) -> bool:
    """Whether `qconv2d` with this kernel can compute this layer (see the module docstring)."""
    return (kernel is not None and kernel.lanes_for(out_w) > 0 and x_dtype == "uint8" and z_x == 0
            and int(groups) == 1 and all(int(d) == 1 for d in dilation)
            and w_int.min() >= kernel.w_range[0] and w_int.max() <= kernel.w_range[1])


def qconv2d(x, wp, strides, padding, kernel: Kernel):
    """TE compute: uint8 NCHW x, packed weights O×CG×KH×KW (`pack_weights`) -> int32 NCHW conv2d (no zero points),
    less kernel.x_offset·Σ_{c,kh,kw} w[o] (`offset_correction`) when the kernel has an activation offset.

    strides: (sh, sw); padding: (top, left, bottom, right)."""
    from tvm import te, tirx

    g, bits, off = kernel.group, 32 // kernel.group, kernel.x_offset
    conv_name, pack_name = block_names(kernel)
    n_, c_, h_, w_ = (int(d) for d in x.shape)
    o_, cg_, kh_, kw_ = (int(d) for d in wp.shape)
    sh, sw = (int(s) for s in strides)
    pt, pl, pb, pr = (int(p) for p in padding)
    oh_, ow_ = (h_ + pt + pb - kh_) // sh + 1, (w_ + pl + pr - kw_) // sw + 1

    def pix(n, c, h, w):
        ok = tirx.all(h >= pt, h < h_ + pt, w >= pl, w < w_ + pl, c < c_)
        v = x[n, tirx.min(c, c_ - 1), h - pt, w - pl].astype("int32")
        return tirx.if_then_else(ok, v, tirx.const(0, "int32"))

    def field(n, c, h, w):  # x (x − x_offset as a byte with an offset: padding becomes the byte of −x_offset)
        return ((pix(n, c, h, w) - off) & 255) if off else pix(n, c, h, w)

    def word(n, cg, h, w):
        v = field(n, g * cg, h, w)
        for k in range(1, g):
            v = v | (field(n, g * cg + k, h, w) << (bits * k))
        return v

    if sw == 1:  # row width rounded up to 8 columns so that the pack stage vectorizes evenly
        xs = te.compute((n_, cg_, h_ + pt + pb, -(-(w_ + pl + pr) // 8) * 8), word, name=pack_name)

        def load(n, cg, oh, ow, kh, kw):
            return xs[n, cg, oh * sh + kh, ow + kw]
    else:
        xs = te.compute((n_, cg_, h_ + pt + pb, kw_, ow_),
                        lambda n, cg, h, kw, ow: word(n, cg, h, ow * sw + kw), name=pack_name)

        def load(n, cg, oh, ow, kh, kw):
            return xs[n, cg, oh * sh + kh, kw, ow]

    rc, rh, rw = te.reduce_axis((0, cg_), "rc"), te.reduce_axis((0, kh_), "rh"), te.reduce_axis((0, kw_), "rw")

    def acc(n, o, oh, ow):
        return te.sum(word_dot(load(n, rc, oh, ow, rh, rw), wp[o, rc, rh, rw], g, off != 0), axis=[rc, rh, rw])

    return te.compute((n_, o_, oh_, ow_), acc, name=conv_name)


def schedule_qconv(sch, kernel: Kernel, threads: int = 1) -> bool:
    """Schedule a (fused) PrimFunc holding `qconv2d`'s blocks in place; False when it holds none."""
    conv_name, pack_name = block_names(kernel)
    try:
        names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    except Exception:  # noqa: BLE001 - no root block: not a function of ours
        return False
    if conv_name not in names or pack_name not in names:
        return False
    rb, pack = sch.get_sblock(conv_name), sch.get_sblock(pack_name)
    root = sch.get_sblock("root")
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
    for name in names - {conv_name, pack_name} - outputs:  # epilogue chain: inline into the output block
        sch.compute_inline(sch.get_sblock(name))
    epilogue = [n for n in outputs if n != conv_name]
    if not epilogue:
        epilogue = [sch.get(sch.cache_write(rb, 0, "global")).name_hint]
    n, o, oh, ow, rc, rh, rw = sch.get_loops(rb)
    ext = [int(sch.get(lp).extent) for lp in (n, o, oh, ow)]
    lanes = kernel.lanes_for(ext[3])
    if not lanes:
        return False
    f = _divisor(ext[1], kernel.tile[0])
    u = _divisor(ext[2], kernel.tile[1])
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
    sch.tensorize(owi, intrinsic(kernel, lanes))
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
