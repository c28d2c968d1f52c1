"""Integer conv2d kernels: int8 data multiplied and summed into int32 by one SIMD instruction, exactly.

Six kernels; `select` picks the best the target has:

* `vpdpbusd` (AVX-512 VNNI, or AVX-VNNI on 256-bit vectors): per int32 lane, four u8 × s8 products summed into the
  accumulator, `acc += Σ_{k<4} u8(a_k)·s8(b_k)`, with no intermediate saturation (the `vpdpbusds` form saturates;
  this one does not): 64 multiply-adds per 512-bit instruction, exact for uint8 activations and int8 weights.
* `vpmaddwd` (SSE2/AVX2/AVX-512BW): 2 int16 × int16 products per int32 lane, `acc += lo(a)·lo(b) + hi(a)·hi(b)`,
  exact for 8-bit data (|x|·|w|·2 <= 255·128·2) and for weights up to 16 bits: the fallback without VNNI. (The
  u8 × s8 `vpmaddubsw` route saturates its int16 pair sums on 8-bit activations, 255·127·2 > 32767, so it is not used.)
* `vpmaddubsw` (SSSE3/AVX2/AVX-512BW, narrow (w, a) pairs): u8 × s8 adjacent pairs summed into int16 lanes
  (saturating), two per int32 word of 4 channels, 64 multiply-adds per 512-bit instruction (32 per 256-bit: 2× the
  MACs of vpmaddwd), kept as int16 partial sums (`vpaddw`) over a chunk of input-channel words and widened into
  int32 once per chunk (`vpmaddwd` with ones). Exact when no int16 sum can leave int16: with activations in
  [0, a_max] every partial sum of pair lane j lies in [−a_max·Σw⁻, a_max·Σw⁺] over the chunk's weights of that
  lane (`pair_chunk` picks the fewest equal chunks for which a_max·max(Σw⁺, Σw⁻) ≤ 32767 in every lane, from the
  layer's actual weights): W4A4 3×3 ≤ 15·18·7 = 1,890 per word, 17 words = 68 channels per chunk; W2A2: 606 words;
  W8A8 (255·2·127 > 32767): none, so vpmaddwd / vpdpbusd. `auto` gives AVX2 and AVX-512BW targets without VNNI
  `vpmaddwd` with `vpmaddubsw` as its per-layer variant; VNNI targets keep vpdpbusd alone (64 exact MACs per
  instruction already; vpmaddubsw + vpaddw measured slower there, benchmarks/x86_narrow_bench.py), unless the
  family is named (`vpmaddubsw`: the narrow kernel per layer, else the target's exact kernel). The packed weights
  are the words themselves (O×chunks×n×KH×KW); the TE compute states each int16 lane j as the pair dot product of
  bytes 2j, 2j+1 (`pair_dot`), which is what one vpmaddubsw of a broadcast weight word computes.
* `sdot` (AArch64 dot product, FEAT_DotProd: Raspberry Pi 5's Cortex-A76, Jetson Orin's Cortex-A78AE): per int32
  lane, four s8 × s8 products summed into the accumulator, 16 multiply-adds per 128-bit instruction. uint8
  activations do not fit s8, so the pack stage stores x − 128 and the layer adds 128·Σ_{c,kh,kw} w[o] back (a
  constant per output channel, folded into the bias: `Kernel.x_offset`); padded pixels are stored as −128 (x = 0),
  so the identity Σ x·w = Σ (x − 128)·w + 128·Σ w holds at the borders too. (The u8 × s8 `usdot` needs FEAT_I8MM,
  which neither of those cores has.)
* `smlal` (AArch64 without the dot product: Raspberry Pi 4's Cortex-A72, Jetson Nano's A57): int16 × int16
  widening multiply-add into int32 lanes, `smlal`/`smlal2 v.4s, v.4h, v.4h`, 4 multiply-adds per instruction,
  exact for uint8 activations (as int16, no offset) × weights up to 16 bits while K·a_max·max|w| fits int32.
* `smlal_narrow` (the same cores, narrow (w, a) pairs): int8 × int8 into int16 lanes, `smlal`/`smlal2 v.8h,
  v.8b/16b`, 8 multiply-adds per instruction, the int16 partial sums widened into int32 (`saddw`/`saddw2`) once
  per chunk of input channels. Exact when every partial sum fits int16: a chunk of n channels sums n·KH·KW
  products of at most a_max·max|w| each, so n ≤ 32767 // (KH·KW·a_max·max|w|) (`narrow_chunk`); activations must
  fit int8 (a_max ≤ 127, i.e. ≤ 7-bit levels). W4A4 (15·7·9 = 945 per channel): 34 channels per int16 sum; W2A2:
  all; W7A7 (127·63·9 > 32767): none, so smlal. `select` gives rpi4 `smlal` with `smlal_narrow` as its variant,
  and `choose` picks per layer, from the layer's actual max|w| and activation levels (int_lowering reads a_max
  from the graph's integer Clip), the first that is exact: smlal_narrow, else smlal, else the plain int32 conv2d.

The NEON kernels keep one channel per element (no words): the pack stage writes the padded input as int16 or
int8, `xs[n, c, h, w]`, the L lanes are L consecutive output columns, and one weight is broadcast,

    acc[n, o, oh, ow:ow+L] += wide(xs[n, c, oh·s+kh, ow+kw : ow+kw+L]) · wide(w[o, c, kh, kw])

(smlal_narrow: into int16 `part[n, ch, o, oh, ow]` over the chunk's channels, then acc += int32(part)). The
tensor intrinsic states wide(A[i])·wide(B[0]) added to C[i] and its implementation is that expression on vectors,
which LLVM selects as smull/smlal/smlal2 (the tests read it back from the library's disassembly).

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
within the kernel's range (int8 for vpdpbusd, sdot and smlal_narrow, int16 for vpmaddwd and smlal), groups = 1,
dilation 1, output width a multiple of 4 (of 8 for smlal_narrow), and the NEON kernels' sum bounds (`fits`).

Schedule (`schedule_qconv`): batch loop parallel (with the output-channel tiles when there are fewer images than
twice the threads), pack computed per image inside it (or, for few images, once before it, parallel over channel
words), its rows vectorized over the interior columns (`_schedule_pack`), register tile F output channels × U rows
× L columns of int32 accumulators (F, U: `tile`), reduction over (cg, kh, kw) inside, the fused epilogue (bias,
requantize or dequantize) computed per tile and vectorized.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

CONV_BLOCK, PACK_BLOCK = "arq_qconv", "arq_qconv_pack"
PACK_COLUMNS = "arq_pack_columns"  # the stride-1 pack block's annotation: [left padding columns, input width]
# False: the pack as it was scheduled before (computed inside the conv's parallel loop whatever the batch, its rows
# vectorized with the padding test in them, which TVM scalarizes), for measuring the difference (x86_narrow_bench)
VECTORIZED_PACK = True
UNROLL = ("oi", "ohi", "rw")
KERNELS = ("vpdpbusd", "vpmaddwd", "vpmaddubsw", "sdot", "smlal", "smlal_narrow")  # x86 (vpdpbusd with VNNI,
# else vpmaddwd with vpmaddubsw for narrow pairs), then AArch64 (sdot with the dot-product extension, else smlal
# with smlal_narrow)
NEON_KERNELS = ("smlal", "smlal_narrow")  # one channel per element (int16 / int8), not packed words
NARROW_KERNELS = ("smlal_narrow", "vpmaddubsw")  # int16 partial sums per chunk of input channels, then widened
INT16_MAX, INT32_MAX = 32767, 2**31 - 1


@dataclass(frozen=True)
class Kernel:
    """One SIMD integer dot-product instruction at the vector widths a target has.

    name: "vpdpbusd" | "vpmaddwd" | "vpmaddubsw" | "sdot" | "smlal" | "smlal_narrow"; group: input channels per int32 word (4 | 2;
    1 for the NEON kernels, which keep one channel per element); widths: ((accumulator lanes, LLVM intrinsic or ""),
    ...) widest first; w_range: the weight values it multiplies exactly; tile: (F, U) register tile; x_offset:
    subtracted from every uint8 activation before packing (128 for the signed-only sdot, whose caller adds
    x_offset·Σw[o] back), else 0; operand: "int32" (packed words) or the NEON kernels' element type, "int16"
    (smlal) or "int8" (smlal_narrow); variants: kernels `choose` tries first for each layer (on rpi4:
    smlal_narrow before smlal)."""

    name: str
    group: int
    widths: tuple[tuple[int, str], ...]
    w_range: tuple[int, int]
    tile: tuple[int, int]
    x_offset: int = 0
    operand: str = "int32"  # element type of the packed data: int32 words of `group` fields, or (NEON) int16 / int8
    variants: tuple[Kernel, ...] = ()  # narrower kernels tried first, per layer (`choose`)

    def lanes_for(self, out_w: int) -> int:
        """The widest vector (int32 lanes) whose lane count divides out_w; 0 when none does."""
        for lanes, _ in self.widths:
            if out_w % lanes == 0:
                return lanes
        return 0

    def llvm(self, lanes: int) -> str:
        return dict(self.widths)[lanes]

    def to_json(self) -> dict:
        out = {"name": self.name, "lanes": [lanes for lanes, _ in self.widths], "tile": list(self.tile)}
        if self.variants:
            out["variants"] = [v.to_json() for v in self.variants]
        return out


_VNNI = {16: "llvm.x86.avx512.vpdpbusd.512", 8: "llvm.x86.avx512.vpdpbusd.256", 4: "llvm.x86.avx512.vpdpbusd.128"}
_PMADDWD = {16: "llvm.x86.avx512.pmaddw.d.512", 8: "llvm.x86.avx2.pmadd.wd", 4: "llvm.x86.sse2.pmadd.wd"}
# u8 × s8 adjacent pairs into saturating int16 (vpmaddubsw): keyed by int32 lanes (the result has twice as many
# int16 lanes: two pair sums per 4-byte word)
_PMADDUBSW = {16: "llvm.x86.avx512.pmaddubs.w.512", 8: "llvm.x86.avx2.pmadd.ub.sw", 4: "llvm.x86.ssse3.pmadd.ub.sw.128"}
# Whether `auto` on a VNNI target also tries vpmaddubsw for narrow layers (measured: see `select`)
VNNI_NARROW = False
_SDOT = "llvm.aarch64.neon.sdot.v4i32.v16i8"
# AArch64 without the dot product (Cortex-A72, A57): smlal/smlal2 on one channel per element, output columns in the
# lanes and one weight broadcast; the TE compute and the tensor intrinsic state plain widening multiply-adds, which
# LLVM selects as smull/smlal(2) (the tests read the libraries' disassembly). smlal: int16 × int16 -> int32,
# 8 columns per int16x8 vector (4 per int16x4); smlal_narrow: int8 × int8 -> int16, 16 columns per int8x16 (8 per
# int8x8), partial sums widened into int32 (saddw) once per chunk of input channels.
_SMLAL_WIDTHS = ((8, ""), (4, ""))
_NARROW_WIDTHS = ((16, ""), (8, ""))
_NEON_NARROW_TILE = (4, 2)  # 4·2 int16x8 pairs: 16 accumulators, as smlal's 4·2 int32x4 pairs
# NEON: 32 128-bit registers; F=4·U=4 keeps 16 accumulators, 4 input vectors and 4 weight broadcasts in registers.
# Not measured on a board (qemu says nothing about speed): a starting point, like any untuned schedule here.
_NEON_TILE = (4, 4)
# F output channels × U rows per register tile, measured on ResNet-20 W8A8 at batch 256: on Zen 3 (AVX2, 16 vector
# registers) F=2·U=2 was best of 1-8 × 1-4; on Zen 4 (AVX-512, 32 registers) vpdpbusd ran 5,255 / 6,070-6,589 /
# 7,537-8,509 / 5,494 img/s at 2·2 / 4·2 / 8·2 / 16·1 and vpmaddwd 3,711 / 5,160 / 5,280 at 2·2 / 4·2 / 8·2
_TILE = {"avx512": (8, 2), "avx2": (2, 2)}


def select(tgt, name: str = "auto") -> Kernel | None:
    """The integer conv kernel for an LLVM target: `name` ("auto": on x86 vpdpbusd where the target has VNNI, else
    vpmaddwd; on AArch64 sdot where it has the dot-product extension, else smlal with smlal_narrow as its variant
    for narrow (w, a) pairs; "smlal": the 8-bit NEON kernel alone; "none": no kernel) at the vector widths its
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
        if name in ("auto", "smlal", "smlal_narrow") and has("neon"):
            smlal = Kernel("smlal", 1, _SMLAL_WIDTHS, (-32768, 32767), _NEON_NARROW_TILE, operand="int16")
            if name == "smlal":  # the 8-bit kernel alone (for comparisons)
                return smlal
            narrow = Kernel("smlal_narrow", 1, _NARROW_WIDTHS, (-128, 127), _NEON_NARROW_TILE, operand="int8")
            return replace(smlal, variants=(narrow,))
        return None
    if not triple.startswith(("x86_64", "i686")) or name in ("sdot", *NEON_KERNELS):
        return None

    wide = has("avx512bw", "avx512vl")
    tile = _TILE["avx512" if has("avx512f") else "avx2"]
    vnni = None
    if has("avx512vnni") and wide:
        vnni = Kernel("vpdpbusd", 4, tuple(_VNNI.items()), (-128, 127), tile)
    elif has("avxvnni"):  # the same intrinsics, VEX-encoded on 256-bit vectors
        vnni = Kernel("vpdpbusd", 4, ((8, _VNNI[8]), (4, _VNNI[4])), (-128, 127), tile)
    if name == "vpdpbusd":
        return vnni
    lanes = [16] if has("avx512bw") else []
    lanes += [8] if has("avx2") else []
    pmaddwd = (Kernel("vpmaddwd", 2, tuple((n, _PMADDWD[n]) for n in lanes + [4]), (-32768, 32767), tile)
               if has("sse2") else None)
    if name == "vpmaddwd":  # the 8-bit kernel alone (for comparisons)
        return pmaddwd
    base = vnni or pmaddwd
    narrow_lanes = lanes + ([4] if has("ssse3") else [])
    if base is None or not narrow_lanes:
        return base if name == "auto" else None
    narrow = Kernel("vpmaddubsw", 4, tuple((n, _PMADDUBSW[n]) for n in narrow_lanes), (-128, 127), tile)
    if name == "vpmaddubsw" or vnni is None or VNNI_NARROW:  # narrow layers on vpmaddubsw, the rest on base
        return replace(base, variants=(narrow,))
    return base


def block_names(kernel: Kernel) -> tuple[str, str]:
    """(conv block, pack block) names of `qconv2d`'s stages for this kernel (the schedule finds them by name)."""
    return f"{CONV_BLOCK}_{kernel.name}", f"{PACK_BLOCK}_{kernel.name}"


_REGISTERED: dict[tuple[str, int], str] = {}


def intrinsic(kernel: Kernel, lanes: int) -> str:
    """Register (once) and return the name of the kernel's `lanes`-wide tensor intrinsic."""
    key = (kernel.name, lanes)
    if key in _REGISTERED:
        return _REGISTERED[key]
    return _register(key, f"arq_{kernel.name}_i32x{lanes}", *_intrin_funcs(kernel, lanes))


def _register(key: tuple[str, int], name: str, desc, impl) -> str:
    """Register the tensor intrinsic `name` (desc, impl) once per process and remember it under `key`."""
    from tvm.s_tir import TensorIntrin

    try:
        TensorIntrin.register(name, desc, impl)
    except Exception:  # noqa: BLE001 - registered by an earlier import of this module (e.g. reloaded)
        TensorIntrin.get(name)
    _REGISTERED[key] = name
    return name


def widen_intrinsic(lanes: int) -> str:
    """Register (once) and return the name of smlal_narrow's widening step, C[i] += int32(A[i]) for int16 A."""
    key = ("widen", lanes)
    if key in _REGISTERED:
        return _REGISTERED[key]
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((lanes,), "int16", offset_factor=1, scope="local"),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                with T.sblock("update"):
                    vi = T.axis.spatial(lanes, i)
                    C[vi] = C[vi] + T.Cast("int32", A[vi])

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((lanes,), "int16", offset_factor=1, scope="local"),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = C[T.ramp(T.int32(0), 1, lanes)] + T.Cast(
                f"int32x{lanes}", A.vload([0], f"int16x{lanes}"))

    return _register(key, f"arq_widen_i16_i32x{lanes}", desc, impl)


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


PAIR_SHIFTS = np.array([0, 16], np.int32)  # bit offset of vpmaddubsw's pair j in a word: `pair_dot`'s shift table


def pair_dot(a, b, s):
    """Σ over the bytes at bit offsets s and s + 8 of field(a)·field(b), unsigned bytes of a times signed bytes of b,
    as a TIR expression; s = PAIR_SHIFTS[j] gives vpmaddubsw's int16 lane j of the int32 word lane (before
    saturation). The shift comes from a table, not from arithmetic on j, so that j stays an index: relax's int64
    loop variables would otherwise widen the words to int64, where `<< 24 >> 24` no longer sign-extends a byte."""
    a0, a1 = (a >> s) & 255, (a >> (s + 8)) & 255
    b0, b1 = ((b >> s) << 24) >> 24, ((b >> (s + 8)) << 24) >> 24
    return a0 * b0 + a1 * b1


def _intrin_funcs(kernel: Kernel, lanes: int):
    from tvm.script import tirx as T

    if kernel.operand != "int32":
        return _neon_intrin_funcs(kernel, lanes)
    if kernel.name == "vpmaddubsw":
        return _pair_intrin_funcs(kernel, lanes)
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


def _pair_intrin_funcs(kernel: Kernel, lanes: int):
    """vpmaddubsw: C[i, j] += int16(pair_dot(A[i], B[0], j)) for i < lanes, j < 2: two int16 pair sums per int32
    word of 4 u8 activations times one broadcast weight word of 4 s8. The implementation is one vpmaddubsw of the
    activation words by the broadcast weight word, whose int16 lane 2i+j is exactly that pair sum. The instruction
    saturates each pair sum to int16 and vpaddw wraps; both equal the stated int16 arithmetic where no sum leaves
    int16, which `pair_chunk` guarantees."""
    from tvm.script import tirx as T

    llvm, vec32, vec8, vec16 = kernel.llvm(lanes), f"int32x{lanes}", f"int8x{4 * lanes}", f"int16x{2 * lanes}"

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((lanes,), "int32", offset_factor=1), B: T.Buffer((1,), "int32", offset_factor=1),
             S: T.Buffer((2,), "int32", offset_factor=1),
             C: T.Buffer((lanes, 2), "int16", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(C[0:lanes, 0:2], A[0:lanes], S[0:2], B[0:1])  # the compute's access order
            T.writes(C[0:lanes, 0:2])
            for i, j in T.grid(lanes, 2):
                with T.sblock("update"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    C[vi, vj] = C[vi, vj] + T.Cast("int16", pair_dot(A[vi], B[0], S[vj]))

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((lanes,), "int32", offset_factor=1), B: T.Buffer((1,), "int32", offset_factor=1),
             S: T.Buffer((2,), "int32", offset_factor=1),
             C: T.Buffer((lanes, 2), "int16", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(C[0:lanes, 0:2], A[0:lanes], S[0:2], B[0:1])  # the compute's access order
            T.writes(C[0:lanes, 0:2])
            a = T.reinterpret(A.vload([0], vec32), dtype=vec8)
            b = T.reinterpret(T.broadcast(B[0], lanes), dtype=vec8)
            C[0, T.ramp(T.int32(0), 1, 2 * lanes)] = C[0, T.ramp(T.int32(0), 1, 2 * lanes)] + \
                T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(llvm), a, b, dtype=vec16)

    return desc, impl


def pair_widen_intrinsic(lanes: int) -> str:
    """Register (once) and return the name of vpmaddubsw's widening step, C[i] += int32(A[i, 0]) + int32(A[i, 1])
    for int16 A: `vpmaddwd` of the int16 pair sums with ones."""
    key = ("pair_widen", lanes)
    if key in _REGISTERED:
        return _REGISTERED[key]
    from tvm.script import tirx as T

    vec32, llvm = f"int32x{lanes}", _PMADDWD[lanes]

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((lanes, 2), "int16", offset_factor=1, scope="local"),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes, 0:2])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                with T.sblock("update"):
                    vi = T.axis.spatial(lanes, i)
                    C[vi] = C[vi] + (T.Cast("int32", A[vi, 0]) + T.Cast("int32", A[vi, 1]))

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((lanes, 2), "int16", offset_factor=1, scope="local"),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes, 0:2])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = C[T.ramp(T.int32(0), 1, lanes)] + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm), A[0, T.ramp(T.int32(0), 1, 2 * lanes)],
                T.broadcast(T.int16(1), 2 * lanes), dtype=vec32)

    return _register(key, f"arq_pair_widen_i16_i32x{lanes}", desc, impl)


def _neon_intrin_funcs(kernel: Kernel, lanes: int):
    """C[i] += wide(A[i])·wide(B[0]) for i < lanes: int16 × int16 -> int32 (smlal) or int8 × int8 -> int16
    (smlal_narrow). The implementation is the same arithmetic on vectors (sign-extend, multiply, add), which LLVM's
    AArch64 backend selects as smull/smlal/smlal2 (by halves of a 128-bit register)."""
    from tvm.script import tirx as T

    src = kernel.operand
    dst = "int32" if src == "int16" else "int16"
    vsrc, vdst = f"{src}x{lanes}", f"{dst}x{lanes}"

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((lanes,), src, offset_factor=1), B: T.Buffer((1,), src, offset_factor=1),
             C: T.Buffer((lanes,), dst, offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes], B[0:1])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                with T.sblock("update"):
                    vi = T.axis.spatial(lanes, i)
                    C[vi] = C[vi] + T.Cast(dst, A[vi]) * T.Cast(dst, B[0])

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((lanes,), src, offset_factor=1), B: T.Buffer((1,), src, offset_factor=1),
             C: T.Buffer((lanes,), dst, offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes], B[0:1])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = C[T.ramp(T.int32(0), 1, lanes)] + T.Cast(
                vdst, A.vload([0], vsrc)) * T.Cast(vdst, T.broadcast(B[0], lanes))

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


def fits(kernel: Kernel | None, x_dtype: str, z_x: int, w_int: np.ndarray, groups: int, dilation, out_w: int,
         a_max: int = 255) -> bool:
    """Whether `qconv2d` with this kernel computes this layer exactly (see the module docstring).

    a_max: the largest activation level the layer's input can hold (255 for uint8; 2^b − 1 where the graph clips the
    levels to b bits). The NEON kernels also check their sums' ranges: smlal's int32 accumulator must hold
    K·a_max·max|w| (K = C·KH·KW), smlal_narrow's int16 partial sums KH·KW·a_max·max|w| for at least one input
    channel (`narrow_chunk`), with activations that fit int8 (a_max ≤ 127)."""
    if not (kernel is not None and kernel.lanes_for(out_w) > 0 and x_dtype == "uint8" and z_x == 0
            and int(groups) == 1 and all(int(d) == 1 for d in dilation)
            and w_int.min() >= kernel.w_range[0] and w_int.max() <= kernel.w_range[1]):
        return False
    if kernel.name == "smlal":
        return w_int[0].size * int(a_max) * _w_abs_max(w_int) <= INT32_MAX
    if kernel.name == "smlal_narrow":
        return int(a_max) <= 127 and narrow_chunk(w_int, a_max) > 0
    if kernel.name == "vpmaddubsw":
        return pair_chunk(w_int, a_max) > 0
    return True


def choose(kernel: Kernel | None, x_dtype: str, z_x: int, w_int: np.ndarray, groups: int, dilation, out_w: int,
           a_max: int = 255) -> Kernel | None:
    """The first kernel of `family(kernel)` (its narrower variants, then itself) that computes this layer exactly
    (`fits`); None: the layer runs on the plain integer conv2d."""
    for k in family(kernel):
        if fits(k, x_dtype, z_x, w_int, groups, dilation, out_w, a_max):
            return k
    return None


def family(kernel: Kernel | None) -> tuple[Kernel, ...]:
    """kernel's variants, then kernel (empty for None): the kernels one integer build may run, in preference order."""
    return () if kernel is None else (*kernel.variants, kernel)


def _w_abs_max(w_int: np.ndarray) -> int:
    return int(np.abs(w_int.astype(np.int64)).max()) if w_int.size else 0


def narrow_chunk(w_int: np.ndarray, a_max: int) -> int:
    """smlal_narrow: input channels per int16 partial sum. Each product is at most a_max·max|w| in magnitude, so
    n·KH·KW of them stay within ±32767 for n ≤ 32767 // (KH·KW·a_max·max|w|); the C channels are split into the
    fewest chunks of at most that many (equal sizes, the last zero-padded). 0: not even one channel fits."""
    c, per_channel = w_int.shape[1], int(np.prod(w_int.shape[2:])) * int(a_max) * _w_abs_max(w_int)
    n_max = c if per_channel == 0 else min(c, INT16_MAX // per_channel)
    if n_max < 1:
        return 0
    chunks = -(-c // n_max)
    return -(-c // chunks)


def pair_bounds(w_int: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """vpmaddubsw's sum bounds per word of 4 input channels: (pos, neg), each O×words×2 (int32 lane pair j holds
    channels 4c+2j, 4c+2j+1): Σ over the pair's channels and KH·KW of max(w, 0), and of max(−w, 0). With
    activations in [0, a_max], every sum of any subset of the pair's products lies in [−a_max·neg, a_max·pos]."""
    o, c = w_int.shape[:2]
    words = -(-c // 4)
    w = np.zeros((o, words * 4, *w_int.shape[2:]), np.int64)
    w[:, :c] = w_int
    w = w.reshape(o, words, 2, 2, -1)
    return np.maximum(w, 0).sum(axis=(3, 4)), np.maximum(-w, 0).sum(axis=(3, 4))


def pair_chunk(w_int: np.ndarray, a_max: int) -> int:
    """vpmaddubsw: words of 4 input channels per int16 partial sum (0: not even one word fits). A chunk of n words
    adds, in each int16 lane, n·KH·KW pair sums of one output channel's weights; whatever the activations in
    [0, a_max] and the order of the additions (vpmaddubsw's pair sums included), every partial sum lies within
    [−a_max·Σneg, a_max·Σpos] over the chunk (`pair_bounds`), so the chunk is exact when a_max·max(Σpos, Σneg)
    ≤ 32767 in every lane of every output channel. The words are split into the fewest equal chunks (the last
    zero-padded) for which that holds. Exact, not a worst case over all weights: it reads the layer's weights."""
    if int(a_max) < 0 or w_int.size == 0:
        return 0
    pos, neg = pair_bounds(w_int)
    words = pos.shape[1]
    if int(a_max) * max(int(pos.max(initial=0)), int(neg.max(initial=0))) > INT16_MAX:
        return 0
    for chunks in range(1, words + 1):
        n = -(-words // chunks)
        pad = -(-words // n) * n - words
        p = np.pad(pos, ((0, 0), (0, pad), (0, 0))).reshape(len(pos), -1, n, 2).sum(axis=2)
        q = np.pad(neg, ((0, 0), (0, pad), (0, 0))).reshape(len(neg), -1, n, 2).sum(axis=2)
        if int(a_max) * max(int(p.max()), int(q.max())) <= INT16_MAX:
            return n
    return 1


def kernel_chunk(kernel: Kernel, w_int: np.ndarray, a_max: int = 255) -> int | None:
    """A narrow kernel's int16 partial-sum chunk for this layer (`pair_chunk` words of vpmaddubsw, `narrow_chunk`
    channels of smlal_narrow), which shapes its loops and weight layout; None for the other kernels, whose code does
    not depend on the layer's weights."""
    if kernel.name == "vpmaddubsw":
        return pair_chunk(w_int, a_max)
    if kernel.name == "smlal_narrow":
        return narrow_chunk(w_int, a_max)
    return None


def packed_weights(kernel: Kernel, w_int: np.ndarray, a_max: int = 255) -> np.ndarray:
    """The weight constant `qconv2d` takes for this kernel: words (`pack_weights`) for vpdpbusd/vpmaddwd/sdot;
    O×chunks×n×KH×KW words for vpmaddubsw (n = `pair_chunk` words, missing words 0); O×C×KH×KW int16 for smlal;
    O×chunks×n×KH×KW int8 for smlal_narrow (n = `narrow_chunk`, missing channels 0)."""
    if kernel.name == "vpmaddubsw":
        words = pack_weights(w_int, kernel.group)
        o, cg, kh, kw = words.shape
        n = pair_chunk(w_int, a_max)
        chunks = -(-cg // n)
        out = np.zeros((o, chunks * n, kh, kw), np.int32)
        out[:, :cg] = words
        return out.reshape(o, chunks, n, kh, kw)
    if kernel.operand == "int32":
        return pack_weights(w_int, kernel.group)
    if kernel.operand == "int16":
        return w_int.astype(np.int16)
    o, c, kh, kw = w_int.shape
    n = narrow_chunk(w_int, a_max)
    chunks = -(-c // n)
    w = np.zeros((o, chunks * n, kh, kw), np.int8)
    w[:, :c] = w_int
    return w.reshape(o, chunks, n, kh, kw)


def qconv2d(x, wp, strides, padding, kernel: Kernel, shifts=None):
    """TE compute: uint8 NCHW x, packed weights O×CG×KH×KW (`packed_weights`) -> int32 NCHW conv2d (no zero points),
    less kernel.x_offset·Σ_{c,kh,kw} w[o] (`offset_correction`) when the kernel has an activation offset.

    strides: (sh, sw); padding: (top, left, bottom, right); shifts: vpmaddubsw's `PAIR_SHIFTS` as a tensor."""
    from tvm import te, tirx

    g, bits, off = kernel.group, 32 // kernel.group, kernel.x_offset
    conv_name, pack_name = block_names(kernel)
    n_, c_, h_, w_ = (int(d) for d in x.shape)
    dims = [int(d) for d in wp.shape]  # cg_: channel words (packed; vpmaddubsw: all chunks), or channels (NEON)
    o_, cg_, kh_, kw_ = dims[0], int(np.prod(dims[1:-2])), dims[-2], dims[-1]
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

    if kernel.operand != "int32":  # NEON: one channel per element (int16 or int8); wp O×C×KH×KW or O×chunks×n×KH×KW
        def word(n, c, h, w):  # the element itself
            return pix(n, c, h, w).astype(kernel.operand)

    if sw == 1:  # row width rounded up to 8 columns so that the pack stage vectorizes evenly
        # PACK_COLUMNS tells the schedule where the padding columns are: (left, interior)
        xs = te.compute((n_, cg_, h_ + pt + pb, -(-(w_ + pl + pr) // 8) * 8), word, name=pack_name,
                        attrs={PACK_COLUMNS: [pl, w_]})

        def load(n, cg, oh, ow, kh, kw):
            return xs[n, cg, oh * sh + kh, ow + kw]
    else:
        xs = te.compute((n_, cg_, h_ + pt + pb, kw_, ow_),
                        lambda n, cg, h, kw, ow: word(n, cg, h, ow * sw + kw), name=pack_name)

        def load(n, cg, oh, ow, kh, kw):
            return xs[n, cg, oh * sh + kh, kw, ow]

    if kernel.operand != "int32":
        return _neon_conv(load, wp, (n_, o_, oh_, ow_), kernel)
    if kernel.name == "vpmaddubsw":
        return _pair_conv(load, wp, shifts, (n_, o_, oh_, ow_), kernel)
    rc, rh, rw = te.reduce_axis((0, cg_), "rc"), te.reduce_axis((0, kh_), "rh"), te.reduce_axis((0, kw_), "rw")

    def acc(n, o, oh, ow):
        return te.sum(word_dot(load(n, rc, oh, ow, rh, rw), wp[o, rc, rh, rw], g, off != 0), axis=[rc, rh, rw])

    return te.compute((n_, o_, oh_, ow_), acc, name=conv_name)


def part_name(kernel: Kernel) -> str:
    """smlal_narrow's int16 partial-sum stage (one chunk of input channels)."""
    return f"{CONV_BLOCK}_{kernel.name}_part"


def _pair_conv(load, wp, shifts, out_shape, kernel: Kernel):
    """vpmaddubsw: per chunk of n words (4 input channels each), two int16 partial sums per output pixel,
    part[n, ch, o, oh, ow, j] = Σ_{c<n,kh,kw} int16(pair_dot(x word, w word, shifts[j])) (exact: `pair_chunk` keeps
    every partial sum within int16), then acc = Σ_ch int32(part[.., 0]) + int32(part[.., 1])."""
    from tvm import te

    conv_name = block_names(kernel)[0]
    chunks, per = int(wp.shape[1]), int(wp.shape[2])
    ri, rh, rw = (te.reduce_axis((0, e), nm) for e, nm in ((per, "ri"), (int(wp.shape[3]), "rh"),
                                                            (int(wp.shape[4]), "rw")))
    part = te.compute((out_shape[0], chunks, *out_shape[1:], 2), lambda n, ch, o, oh, ow, j: te.sum(
        pair_dot(load(n, ch * per + ri, oh, ow, rh, rw), wp[o, ch, ri, rh, rw], shifts[j]).astype("int16"),
        axis=[ri, rh, rw]), name=part_name(kernel))
    rch = te.reduce_axis((0, chunks), "rch")
    return te.compute(out_shape, lambda n, o, oh, ow: te.sum(
        part[n, rch, o, oh, ow, 0].astype("int32") + part[n, rch, o, oh, ow, 1].astype("int32"), axis=rch),
        name=conv_name)


def _neon_conv(load, wp, out_shape, kernel: Kernel):
    """smlal: acc = Σ_{c,kh,kw} int32(x)·int32(w) over int16 operands. smlal_narrow: per chunk of n input channels
    part[n, ch, ..] = Σ_{c<n,kh,kw} int16(x)·int16(w) over int8 operands (exact: `narrow_chunk` keeps every partial
    sum within int16), then acc = Σ_ch int32(part[n, ch, ..])."""
    from tvm import te

    conv_name = block_names(kernel)[0]
    rh, rw = te.reduce_axis((0, int(wp.shape[-2])), "rh"), te.reduce_axis((0, int(wp.shape[-1])), "rw")
    if kernel.name == "smlal":
        rc = te.reduce_axis((0, int(wp.shape[1])), "rc")
        return te.compute(out_shape, lambda n, o, oh, ow: te.sum(
            load(n, rc, oh, ow, rh, rw).astype("int32") * wp[o, rc, rh, rw].astype("int32"), axis=[rc, rh, rw]),
            name=conv_name)
    chunks, per = int(wp.shape[1]), int(wp.shape[2])
    ri = te.reduce_axis((0, per), "ri")
    part = te.compute((out_shape[0], chunks, *out_shape[1:]), lambda n, ch, o, oh, ow: te.sum(
        load(n, ch * per + ri, oh, ow, rh, rw).astype("int16") * wp[o, ch, ri, rh, rw].astype("int16"),
        axis=[ri, rh, rw]), name=part_name(kernel))
    rch = te.reduce_axis((0, chunks), "rch")
    return te.compute(out_shape, lambda n, o, oh, ow: te.sum(part[n, rch, o, oh, ow].astype("int32"), axis=rch),
                      name=conv_name)


def _top_blocks(sch) -> set[str]:
    """The names of the blocks under a schedule's root block (none where it has no root block: not ours)."""
    try:
        return {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    except Exception:  # noqa: BLE001 - no root block: not a function of ours
        return set()


def _held_kernel(names: set[str], kernel: Kernel) -> Kernel | None:
    """The member of kernel's family whose `qconv2d` blocks are among names, or None."""
    return next((k for k in family(kernel) if set(block_names(k)) <= names), None)


def holds_qconv(func, kernel: Kernel) -> bool:
    """Whether PrimFunc func holds `qconv2d`'s blocks of kernel or one of its variants."""
    from tvm import s_tir

    return _held_kernel(_top_blocks(s_tir.Schedule(func)), kernel) is not None


def schedule_qconv(sch, kernel: Kernel, threads: int = 1) -> bool:
    """Schedule a (fused) PrimFunc holding `qconv2d`'s blocks (of kernel or one of its variants) in place; False when
    it holds none. Raises where it holds them and the kernel's schedule cannot apply (the caller reports it)."""
    names = _top_blocks(sch)
    k = _held_kernel(names, kernel)
    return k is not None and _schedule_one(sch, k, names, threads)


def _schedule_one(sch, kernel: Kernel, names: set, threads: int) -> bool:
    conv_name, pack_name = block_names(kernel)
    narrow = kernel.name in NARROW_KERNELS
    part = part_name(kernel) if narrow else None
    rb, pack = sch.get_sblock(conv_name), sch.get_sblock(pack_name)
    root = sch.get_sblock("root")
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
    for name in names - {conv_name, pack_name, part} - outputs:  # epilogue chain: inline into the output block
        sch.compute_inline(sch.get_sblock(name))
    epilogue = [n for n in outputs if n != conv_name]
    if not epilogue:
        epilogue = [sch.get(sch.cache_write(rb, 0, "global")).name_hint]
    n, o, oh, ow, *red = sch.get_loops(rb)
    ext = [int(sch.get(lp).extent) for lp in (n, o, oh, ow)]
    lanes = kernel.lanes_for(ext[3])
    if not lanes:  # `fits` admits no such layer; should one reach here, the build reports it rather than skip it
        raise ValueError(f"{kernel.name}: no vector width divides the output width {ext[3]}")
    f = _divisor(ext[1], kernel.tile[0])
    u = _divisor(ext[2], kernel.tile[1])
    oo, oi = sch.split(o, [None, f])
    oho, ohi = sch.split(oh, [None, u])
    owo, owi = sch.split(ow, [None, lanes])
    sch.reorder(n, oo, oho, owo, *red, oi, ohi, owi)
    per_image = ext[0] >= 2 * threads or ext[0] >= 8  # enough images to parallelize over the batch alone
    sch.parallel(n if per_image else sch.fuse(n, oo))
    if narrow:  # the partial sums inside the chunk loop first (they, not rb, consume the pack stage)
        sch.compute_at(sch.get_sblock(part), red[0])
    _schedule_pack(sch, pack, rb, lanes, per_image)
    for name in epilogue:
        eb = sch.get_sblock(name)
        sch.reverse_compute_at(eb, owo)
        _vectorize_inner(sch, eb, lanes)
    sch.set_scope(rb, 0, "local")
    if narrow:  # int16 partial sums per chunk of input channels, tensorized; the chunk loop widens them into rb
        _schedule_partial(sch, sch.get_sblock(part), red[0], kernel, (f, u, lanes))
        init = sch.decompose_reduction(rb, red[0])
        # int32 += sext(int16): saddw/saddw2 (smlal_narrow); int32 += pair sum of int16: vpmaddwd with ones
        widen = pair_widen_intrinsic(lanes) if kernel.name == "vpmaddubsw" else widen_intrinsic(lanes)
        sch.tensorize(sch.get_loops(rb)[-1], widen)
        sch.vectorize(sch.get_loops(init)[-1])
        return True
    rw = red[-1]
    init = sch.decompose_reduction(rb, red[0])
    sch.tensorize(owi, intrinsic(kernel, lanes))
    for name, lp in (("oi", oi), ("ohi", ohi), ("rw", rw)):
        if name in UNROLL:
            sch.unroll(lp)
    sch.vectorize(sch.get_loops(init)[-1])
    return True


def _schedule_partial(sch, pb, chunk_loop, kernel: Kernel, tile: tuple[int, int, int]) -> None:
    """smlal_narrow's partial-sum block, already computed at the conv's chunk loop over the register tile:
    reductions (channels of the chunk, kh, kw) outside, the F×U×lanes int16 tile inside, the lanes tensorized."""
    depth = 1 + [sch.get(lp).same_as(sch.get(chunk_loop)) for lp in sch.get_loops(pb)].index(True)
    # compute_at made one loop per iter var of extent > 1, in iter var order: (o, oh, ow) of the tile, (j: the two
    # int16 pair sums of vpmaddubsw), then (ri, rh, rw)
    pair = kernel.name == "vpmaddubsw"
    extents = dict(zip(("oi", "ohi", "owi"), tile, strict=True))
    if pair:
        extents["j"] = 2
    extents.update(zip(("ri", "rh", "rw"), (int(v.dom.extent) for v in sch.get(pb).iter_vars[6 if pair else 5:]),
                       strict=True))
    names = [name for name, e in extents.items() if e > 1]
    loops = dict(zip(names, sch.get_loops(pb)[depth:], strict=True))
    red = [loops[n] for n in ("ri", "rh", "rw") if n in loops]
    sch.reorder(*red, *[loops[n] for n in ("oi", "ohi") if n in loops], loops["owi"], *([loops["j"]] if pair else []))
    sch.set_scope(pb, 0, "local")
    init = sch.decompose_reduction(pb, red[0])
    sch.tensorize(loops["owi"], intrinsic(kernel, tile[2]))
    for name in UNROLL:
        if name in loops:
            sch.unroll(loops[name])
    sch.vectorize(sch.get_loops(init)[-1])


def _schedule_pack(sch, pack, rb, lanes: int, per_image: bool) -> None:
    """The pack stage (activations to padded words or elements). per_image: the conv's parallel loop is the batch
    alone, so each image's pack is computed inside it, where the conv reads it from cache; otherwise (few images:
    the parallel loop also runs over output-channel tiles, each of which would repack the whole image) the pack runs
    once, before the conv, parallel over images and channel words.

    Its rows are vectorized without the padding test: the columns of a stride-1 pack split into the left padding,
    the interior and the rest (`loop_partition`), so that the interior, where every column reads the input, has no
    column-dependent condition, which the vectorizer cannot keep in vector form (it would scalarize the whole row
    into byte loads and branches). The few columns either side of it stay scalar."""
    if per_image or not VECTORIZED_PACK:
        sch.compute_at(pack, sch.get_loops(rb)[0])
    else:
        sch.parallel(sch.fuse(*sch.get_loops(pack)[:2]))  # images × channel words
    cols = sch.get(pack).annotations.get(PACK_COLUMNS)
    wl = sch.get_loops(pack)[-1]
    extent = int(sch.get(wl).extent)
    left, width = (int(v) for v in cols) if cols is not None else (0, 0)
    # the old schedule, or a strided pack (columns gathered per kernel column): the rows vectorized as they are
    if not VECTORIZED_PACK or not 0 < width <= extent - left:
        _vectorize_inner(sch, pack, lanes)
        return
    # pieces before the interior's end; the last one's extent is inferred (loop_partition wants the given ones'
    # sum below the loop's extent)
    pieces = ([left] if left > 0 else []) + ([width] if left + width < extent else [])
    parts = sch.loop_partition(wl, [*pieces, None]) if pieces else [wl]
    # the whole interior as one vector (LLVM splits it into registers; a partitioned loop cannot be split)
    sch.vectorize(parts[1 if left > 0 else 0])


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
