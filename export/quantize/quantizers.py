"""Quantization methods for QuantConv2d / QuantLinear: a registry of `Quantizer`s chosen by name per model.

Every method fills the same export interface of a quantized layer (export/quantize/quant.py), so the QDQ writer
(export/qdq.py) and every backend see one format whatever the method:

    weight_pieces() -> [(W_q int8 C_out×..., s_w float C_out)]   ŵ = Σ_pieces W_q · s_w (per output channel)
    weight_int(), weight_scale()                                 the first piece (the only one but for PWLQ)
    act_qparams() -> (s_a, z_a)                                 x̂ = (clamp(round(x/s_a) + z_a, 0, 2^b_a - 1) - z_a)·s_a
    bias_int(), bias_scale() = s_a · s_w                         int32

Weights use the symmetric narrow-range grid q ∈ [-Q, Q], Q = 2^(b-1) - 1, per output channel; activations the
unsigned affine grid [0, 2^b - 1] with a zero point (z = 0 for non-negative inputs). Rounding is half-to-even with
straight-through (identity) gradients, as in export/quantize/quant.py. Methods (b = the layer's bits):

* ``percentile`` (PTQ, default): clip_c = r_c·max|W_c| with the MSE-optimal ratio r_c; activation range from the
  calibration inputs' 0.01 / 99.99 percentiles (lower end 0 when they are non-negative).
* ``minmax`` (PTQ): clip_c = max|W_c|; activation range = calibration [min, max] (exact, not subsampled).
* ``pwlq`` (PTQ, Fang et al. ECCV 2020, their non-overlapping scheme (3)): per output channel, m = max|W_c| and a
  breakpoint p ∈ (0, m/2] (the ratio p/m searched on a grid, coarse 0.01 then fine 0.001, to minimise ||W - Ŵ||²)
  split [-m, m] into the centre R1 = [-p, p] and the tails R2 = [-m, -p) ∪ (p, m]; each of the four pieces gets
  (b-1)-bit uniform levels, the sign the b-th bit:
      ŵ = sign(w)·k·s_c,         s_c = p / Q,        k = round(|w| / s_c) ∈ [0, Q]       (w ∈ R1)
      ŵ = sign(w)·(p + k·s_t),   s_t = (m - p) / Q,  k = round((|w| - p) / s_t) ∈ [0, Q]  (w ∈ R2)
  Both pieces are b-bit integers (plus one region bit of storage, as in the paper). Since p = Q·s_c, the export
  writes two int initializers  C = sign·k (R1) or sign·Q (R2)  and  T = 0 (R1) or sign·k (R2)  with
  ŵ = C·s_c + T·s_t: two DequantizeLinear nodes summed by an Add. Activations as ``percentile``.
* ``dorefa`` (QAT, Zhou et al. 2016): w' = tanh(W) / max|tanh(W_c)| ∈ [-1, 1] per output channel, quantized on the
  narrow int grid, ŵ = γ_c · round(Q·w') / Q. Deviation: DoReFa's k-bit grid 2·round((2^k-1)(w'/2+1/2))/(2^k-1) - 1
  has 2^k levels and no zero, which no integer zero point can express; the narrow grid keeps zero and exports as
  b-bit ints. γ_c (a buffer, fixed after quantize_model) is the least-squares fit of W_c by w'_c: DoReFa relies on
  a BatchNorm after the conv for the scale, but BatchNorms are folded into the convs here. Activations: DoReFa
  clips to a fixed [0, 1]; here the fixed range is the calibrated one (as ``percentile``), because with BN folded
  the inputs are not scaled to [0, 1].
* ``pact`` (QAT, Choi et al. 2018): y = clip(x, 0, α) with a learnable α (`pact_alpha`, initialised to the
  calibrated upper end), ŷ = round(y / s)·s with s = α / (2^b - 1); ∂ŷ/∂α = 1 where x ≥ α, else 0 (PACT's
  straight-through estimate: s is not differentiated). Export: s_a = α/(2^b - 1), z_a = 0. A layer whose
  calibration inputs go negative (the first conv after Normalize) keeps the calibrated asymmetric quantizer
  (`pact_on` False). Weights: as ``percentile`` (the PACT paper used DoReFa's weights; this pairing isolates the
  activation quantizer).
* ``lsq`` (QAT, Esser et al. ICLR 2020): learnable steps, per output channel for weights (`lsq_w_step`, from the
  ``percentile`` MSE scale) and per tensor for activations (`lsq_a_step`, from the calibrated scale; the calibrated
  zero point stays fixed, 0 after ReLU), v̂ = (clamp(round(v/s) + z, q_min, q_max) - z)·s, whose step gradient is
  ∂v̂/∂s = round(v/s) - v/s inside the grid and the clamped level (q - z) outside. The step's gradient is scaled
  by g = 1/sqrt(N·Q_P) as in the paper: N = the layer's weights N_W (for every channel's step) or the activation
  features per image (C·H·W), Q_P = the positive levels (2^(b-1) - 1 for weights, 2^b - 1 - z for activations).
  With N = the weights of one channel instead, 8-bit steps went negative within 6 SGD steps at lr 0.01 (a weight
  outside the grid adds Q_P·∂L/∂ŵ = 127·∂L/∂ŵ to ∂L/∂s, against ≈ 0.3·∂L/∂ŵ inside). Weights use |s| (their
  symmetric grid is the same for -s). Measured on digits (BN folded): SGD lr 0.01 (momentum 0.9) is stable at
  2-8 bits; lr 0.05 makes 8-bit steps swing by 100x (and diverges QAT of every method here, percentile included).

Learned scales (PACT, LSQ) are read through act_qparams()/weight_scale(); the layer's `a_scale` buffer mirrors the
learned activation scale as of the last forward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from arq_deploy.core.errors import UnknownNameError
from arq_deploy.export.quantize.primitives import fake_quant, round_ste, weight_qmax

DEFAULT_QUANTIZER = "percentile"
QUANTIZERS: dict[str, "Quantizer"] = {}
_EPS = 1e-8


def register_quantizer(name: str):
    """Class decorator: register an instance of the class under `name` (registering a name twice raises)."""

    def deco(cls):
        if name in QUANTIZERS:
            raise ValueError(f"quantizer {name!r} registered twice")
        cls.name = name
        QUANTIZERS[name] = cls()
        return cls

    return deco


def get_quantizer(name: str) -> "Quantizer":
    """The registered quantizer `name`; UnknownNameError listing the known ones otherwise."""
    q = QUANTIZERS.get(name) if isinstance(name, str) else None
    if q is None:
        raise UnknownNameError(f"unknown quantizer {name!r}; known: {', '.join(quantizer_names())}")
    return q


def quantizer_names() -> list[str]:
    return list(QUANTIZERS)


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Value x (exactly), gradient g·∂L/∂x (LSQ's step-size gradient scaling)."""
    y = x * g
    return x.detach() + (y - y.detach())


def _per_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A length-C_out vector shaped to broadcast over a C_out×... weight."""
    return v.reshape(-1, *[1] * (like.dim() - 1))


def _rows(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


# --------------------------------------------------------------------------------------------- uniform (base)
@register_quantizer("percentile")
class Quantizer:
    """Uniform PTQ: MSE-clipped symmetric per-channel weights, percentile-calibrated affine activations.

    The base class of every method: a method overrides the weight part, the activation part, or both. All state
    lives on the layer (parameters and buffers, so that it is in the state dict); the quantizer is stateless."""

    name = "percentile"
    learnable = False  # has parameters of its own (trained in QAT)

    def setup(self, layer) -> None:
        """Register the method's parameters/buffers on a new layer (after its weights are in place)."""

    # weights ---------------------------------------------------------------------------------------------
    def weight_scale(self, layer) -> torch.Tensor:
        amax = _rows(layer.weight.detach()).abs().amax(dim=1).clamp_min(1e-12)
        return amax * layer.w_clip_ratio / weight_qmax(layer.w_bits)

    def weight_int(self, layer) -> torch.Tensor:
        s = _per_channel(self.weight_scale(layer), layer.weight)
        q = weight_qmax(layer.w_bits)
        return torch.clamp(torch.round(layer.weight.detach() / s), -q, q).to(torch.int8)

    def weight_pieces(self, layer) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.weight_int(layer), self.weight_scale(layer))]

    def qweight(self, layer) -> torch.Tensor:
        s = _per_channel(self.weight_scale(layer), layer.weight)
        q = weight_qmax(layer.w_bits)
        return fake_quant(layer.weight, s, 0.0, -q, q)

    # activations -----------------------------------------------------------------------------------------
    def act_scale(self, layer) -> torch.Tensor:
        """The activation scale used in the forward pass (a learned one carries gradients)."""
        return layer.a_scale

    def qinput(self, layer, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, layer.a_scale, layer.a_zero_point, 0, layer.a_qmax)

    def calib_range(self, layer, vals: torch.Tensor, vmin: float, vmax: float, percentile: float):
        """[lo, hi] from the calibration samples `vals` (subsampled) and the exact min/max seen."""
        hi = float(torch.quantile(vals, percentile / 100.0)) if vals.numel() > 1 else float(vals.max())
        lo = 0.0 if vmin >= 0 else min(float(torch.quantile(vals, 1 - percentile / 100.0)), 0.0)
        return lo, hi

    def set_act_range(self, layer, lo: float, hi: float) -> None:
        hi = max(hi, lo + 1e-8)
        scale = (hi - lo) / layer.a_qmax * tie_free_widening(int(getattr(layer, "calib_index", 0)))
        zp = 0.0 if lo == 0.0 else min(max(round(-lo / scale), 0), layer.a_qmax)
        layer.a_scale.fill_(scale)
        layer.a_zero_point.fill_(float(zp))

    def rescale_act(self, layer, factor: float) -> None:
        """Multiply the activation scale by `factor` (zero point kept): export/quantize/quant.break_ties' nudge."""
        with torch.no_grad():
            layer.a_scale.mul_(factor)


# A layer's input lies on the previous layers' integer lattices s_in·s_w,c·Z (the int32 bias is on them too). When a
# calibrated scale happens to be a small-denominator rational multiple of such a step, a fixed share of that channel's
# values fall exactly on a rounding tie (k + 1/2), and every runtime breaks an exact tie by its own float rounding:
# onnxruntime, TVM and torch disagree on them. (ResNet-20, mixed policy: layer2.1's input scale was 232 times
# layer2.0.conv2's channel-26 step, so 1 in 232 of that channel's values were ties, and 27 % of the test images had a
# different downstream activation in onnxruntime than in TVM; top-1 agreement 99.7 %.) One widening factor for all
# layers did not help there (the relation survived multiplying both scales by it), so layer i's calibrated scale is
# widened by 1 + 2^-9·(1/4 + 3/4·{i·φ}) (a Weyl sequence: any two of 20 layers' factors differ by at least 5·10^-5,
# of 60 by 1.2·10^-5, far above float32 rounding; at most 0.2 % of the range, and the largest observed value still
# maps to q_max). export/quantize/quant.break_ties then checks for ties that remain or that training brings back.
def tie_free_widening(index: int) -> float:
    frac = (index * 0.6180339887498949) % 1.0
    return 1.0 + 2.0**-9 * (0.25 + 0.75 * frac)


# --------------------------------------------------------------------------------------------- min-max PTQ
@register_quantizer("minmax")
class MinMaxQuantizer(Quantizer):
    """clip_c = max|W_c|; activations over the exact calibration [min(min, 0), max]."""

    def setup(self, layer) -> None:
        layer.w_clip_ratio.fill_(1.0)

    def calib_range(self, layer, vals, vmin, vmax, percentile):
        return (0.0 if vmin >= 0 else vmin), vmax


# --------------------------------------------------------------------------------------------- PWLQ
def pwlq_quantize(w: torch.Tensor, ratio: torch.Tensor, bits: int, ste: bool = False):
    """Piecewise linear quantization of a C_out×... weight with breakpoint p_c = ratio_c·max|W_c|.

    Returns (ŵ, C, T, s_c, s_t): ŵ = C·s_c + T·s_t (per channel scales), C, T integer-valued float tensors in
    [-Q, Q], Q = 2^(b-1) - 1. With ste, ŵ carries identity gradients to w (scales are not differentiated)."""
    q = weight_qmax(bits)
    wd = w.detach()
    m = _rows(wd).abs().amax(dim=1).clamp_min(1e-12)
    p = ratio * m
    s_c, s_t = (p / q).clamp_min(1e-12), ((m - p) / q).clamp_min(1e-12)
    a, sign = w.abs() if ste else wd.abs(), torch.sign(wd)
    pc, sc, st = _per_channel(p, w), _per_channel(s_c, w), _per_channel(s_t, w)
    rnd = round_ste if ste else torch.round
    center = wd.abs() <= pc
    k_c = torch.clamp(rnd(a / sc), 0, q)
    k_t = torch.clamp(rnd((a - pc) / st), 0, q)
    c = sign * torch.where(center, k_c, torch.full_like(k_c, q))
    t = sign * torch.where(center, torch.zeros_like(k_t), k_t)
    return c * sc + t * st, c, t, s_c, s_t


def pwlq_breakpoints(w: torch.Tensor, bits: int, lowest: float = 0.02, fine: float = 0.001) -> torch.Tensor:
    """Per output channel, the ratio p/max|W_c| ∈ [lowest, 0.5] minimising ||W_c - PWLQ(W_c)||²: a grid of 0.01
    over all channels at once (G×C×K), then ±0.01 around each channel's best in steps of `fine`."""
    wf = _rows(w.detach().float())
    coarse = torch.arange(lowest, 0.5 + 1e-9, 0.01)
    best = _pwlq_best(wf, coarse[None, :].expand(len(wf), -1), bits)
    offsets = torch.arange(-0.01, 0.01 + 1e-9, fine)
    return _pwlq_best(wf, (best[:, None] + offsets[None, :]).clamp(lowest * 0.5, 0.5), bits)


def _pwlq_best(wf: torch.Tensor, ratios: torch.Tensor, bits: int) -> torch.Tensor:
    """ratios: C×G candidates; returns the C best (lowest squared error)."""
    g = ratios.shape[1]
    w_g = wf[None].expand(g, -1, -1)  # G×C×K
    wq = pwlq_quantize(w_g.reshape(g * len(wf), -1), ratios.T.reshape(-1), bits)[0].reshape(w_g.shape)
    err = ((wq - w_g) ** 2).sum(dim=2)  # G×C
    return ratios.gather(1, err.argmin(dim=0)[:, None])[:, 0]


@register_quantizer("pwlq")
class PwlqQuantizer(Quantizer):
    """Piecewise linear weights (two b-bit grids per channel), percentile activations; buffer `pwlq_ratio` = p/m."""

    def setup(self, layer) -> None:
        layer.register_buffer("pwlq_ratio", pwlq_breakpoints(layer.weight, layer.w_bits))

    def _pieces(self, layer):
        return pwlq_quantize(layer.weight, layer.pwlq_ratio, layer.w_bits)

    def weight_scale(self, layer) -> torch.Tensor:
        return self._pieces(layer)[3]

    def weight_int(self, layer) -> torch.Tensor:
        return self._pieces(layer)[1].to(torch.int8)

    def weight_pieces(self, layer):
        _, c, t, s_c, s_t = self._pieces(layer)
        return [(c.to(torch.int8), s_c), (t.to(torch.int8), s_t)]

    def qweight(self, layer) -> torch.Tensor:
        return pwlq_quantize(layer.weight, layer.pwlq_ratio, layer.w_bits, ste=True)[0]


# --------------------------------------------------------------------------------------------- DoReFa
def dorefa_normalize(w: torch.Tensor) -> torch.Tensor:
    """w' = tanh(W) / max|tanh(W_c)| per output channel (differentiable), values in [-1, 1]."""
    t = torch.tanh(w)
    return t / _per_channel(_rows(t).abs().amax(dim=1).clamp_min(1e-12), w)


@register_quantizer("dorefa")
class DorefaQuantizer(Quantizer):
    """tanh-normalised weights on the narrow int grid times a fixed per-channel γ (buffer `dorefa_gamma`)."""

    def setup(self, layer) -> None:
        w, wn = _rows(layer.weight.detach()), _rows(dorefa_normalize(layer.weight.detach()))
        gamma = (w * wn).sum(dim=1) / (wn * wn).sum(dim=1).clamp_min(1e-12)
        layer.register_buffer("dorefa_gamma", gamma.clamp_min(1e-12))

    def weight_scale(self, layer) -> torch.Tensor:
        return layer.dorefa_gamma / weight_qmax(layer.w_bits)

    def weight_int(self, layer) -> torch.Tensor:
        q = weight_qmax(layer.w_bits)
        return torch.clamp(torch.round(dorefa_normalize(layer.weight.detach()) * q), -q, q).to(torch.int8)

    def qweight(self, layer) -> torch.Tensor:
        q = weight_qmax(layer.w_bits)
        k = torch.clamp(round_ste(dorefa_normalize(layer.weight) * q), -q, q)
        return k * _per_channel(self.weight_scale(layer), layer.weight)


# --------------------------------------------------------------------------------------------- PACT
@register_quantizer("pact")
class PactQuantizer(Quantizer):
    """Learnable clip α per layer (`pact_alpha`) for non-negative inputs; `pact_on` marks where it applies."""

    learnable = True

    def setup(self, layer) -> None:
        layer.pact_alpha = nn.Parameter(torch.ones((), device=layer.weight.device))
        layer.register_buffer("pact_on", torch.zeros((), dtype=torch.bool))

    def act_scale(self, layer) -> torch.Tensor:
        if not bool(layer.pact_on):
            return layer.a_scale
        return layer.pact_alpha.clamp_min(_EPS) / layer.a_qmax

    def qinput(self, layer, x):
        if not bool(layer.pact_on):
            return super().qinput(layer, x)
        alpha = layer.pact_alpha.clamp_min(_EPS)
        with torch.no_grad():
            layer.a_scale.copy_(alpha / layer.a_qmax)
        y = torch.where(x >= alpha, alpha, x.clamp_min(0))  # clip(x, 0, α): ∂y/∂α = 1 where x ≥ α
        s = (alpha / layer.a_qmax).detach()
        return round_ste(y / s) * s  # y/s ∈ [0, 2^b - 1] up to rounding error: no clamp (it would cut α's gradient)

    def set_act_range(self, layer, lo, hi):
        super().set_act_range(layer, lo, hi)
        layer.pact_on.fill_(lo == 0.0)
        with torch.no_grad():
            layer.pact_alpha.fill_(float(layer.a_scale) * layer.a_qmax)

    def rescale_act(self, layer, factor: float) -> None:
        super().rescale_act(layer, factor)
        if bool(layer.pact_on):
            with torch.no_grad():
                layer.pact_alpha.mul_(factor)


# --------------------------------------------------------------------------------------------- LSQ
def lsq_grad_scale(n: int, q_pos: int) -> float:
    """LSQ's step-gradient scale g = 1 / sqrt(N · Q_P)."""
    return 1.0 / math.sqrt(max(n, 1) * max(q_pos, 1))


@register_quantizer("lsq")
class LsqQuantizer(Quantizer):
    """Learnable steps: `lsq_w_step` (C_out) and `lsq_a_step` (scalar, zero point fixed from calibration)."""

    learnable = True

    def setup(self, layer) -> None:
        layer.lsq_w_step = nn.Parameter(super().weight_scale(layer).clone())
        layer.lsq_a_step = nn.Parameter(torch.ones((), device=layer.weight.device))

    def _w_step(self, layer) -> torch.Tensor:
        """|s| (the symmetric weight grid gives the same ŵ for -s, so a step crossing zero stays meaningful)."""
        return layer.lsq_w_step.abs().clamp_min(_EPS)

    def weight_scale(self, layer) -> torch.Tensor:
        return self._w_step(layer).detach()

    def qweight(self, layer) -> torch.Tensor:
        q = weight_qmax(layer.w_bits)
        g = lsq_grad_scale(layer.weight.numel(), q)  # N_W: the layer's weights (per-channel N was unstable at 8 bits)
        s = _per_channel(grad_scale(self._w_step(layer), g), layer.weight)
        return fake_quant(layer.weight, s, 0.0, -q, q)

    def act_scale(self, layer) -> torch.Tensor:
        return layer.lsq_a_step.clamp_min(_EPS)

    def qinput(self, layer, x):
        s = self.act_scale(layer)
        with torch.no_grad():
            layer.a_scale.copy_(s)
        z = layer.a_zero_point
        g = lsq_grad_scale(x[0].numel(), layer.a_qmax - int(z))
        return fake_quant(x, grad_scale(s, g), z, 0, layer.a_qmax)

    def set_act_range(self, layer, lo, hi):
        super().set_act_range(layer, lo, hi)
        with torch.no_grad():
            layer.lsq_a_step.fill_(float(layer.a_scale))

    def rescale_act(self, layer, factor: float) -> None:
        super().rescale_act(layer, factor)
        with torch.no_grad():
            layer.lsq_a_step.mul_(factor)
