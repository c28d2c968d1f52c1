"""Per-layer fake quantization with straight-through gradients.

Weights: symmetric, per output channel, narrow range q ∈ [-(2^(b-1)-1), 2^(b-1)-1], scale_c = clip_c / q_max where
clip_c = r_c · max|W_c| and the ratio r_c minimises the channel's quantization MSE (searched once, so the scale follows
the weights during quantization-aware training).
Activations (the layer's input): per tensor, affine q ∈ [0, 2^b - 1] with zero point z; unsigned (z = 0) when the
calibration inputs are non-negative (after ReLU), otherwise asymmetric over the [lo, hi] percentile range.
Bias: int32 with scale s_a·s_w,c (what the QDQ ONNX graph stores).
Fake quantization computes  x̂ = (clamp(round(x/s) + z, q_min, q_max) - z) · s  with round = half-to-even, the
same arithmetic as ONNX QuantizeLinear/DequantizeLinear, so the torch model and the exported graph agree.

That is the default method, "percentile". Other methods (min-max, PWLQ, DoReFa, PACT, LSQ) are chosen by name in
`quantize_model(..., method=...)`; export/quantize/quantizers.py holds them, and every layer keeps one export interface
(weight_pieces / weight_int / weight_scale, act_qparams, bias_int / bias_scale) whatever the method.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from arq_deploy.core.policy import LayerBits, QuantPolicy
from arq_deploy.export.quantize.primitives import fake_quant, round_ste, weight_qmax  # noqa: F401  (re-exported)
from arq_deploy.export.quantize.quantizers import get_quantizer

INT32_MAX = 2**31 - 1


def mse_clip_ratios(w: torch.Tensor, bits: int, grid: int = 32, lowest: float = 0.3) -> torch.Tensor:
    """Per output channel, the clip ratio r ∈ [lowest, 1] of max|W| minimising ||W - Q(W)||²; w: C_out×...

    All grid ratios are evaluated at once: a G×C_out×K tensor."""
    wf = w.detach().reshape(w.shape[0], -1).float()
    amax = wf.abs().amax(dim=1).clamp_min(1e-12)
    qmax = weight_qmax(bits)
    ratios = torch.linspace(lowest, 1.0, grid)
    s = (ratios[:, None] * amax[None, :] / qmax)[:, :, None]  # G×C×1
    err = ((torch.clamp(torch.round(wf[None] / s), -qmax, qmax) * s - wf[None]) ** 2).sum(dim=2)  # G×C
    return ratios[err.argmin(dim=0)]


class _QuantMixin:
    """Shared state of QuantConv2d and QuantLinear (buffers are saved in the state dict)."""

    def _init_quant(self, bits: LayerBits, method: str = "percentile"):
        self.w_bits, self.a_bits = bits.w_bits, bits.a_bits
        self.method, self.quantizer = method, get_quantizer(method)
        out = self.weight.shape[0]
        self.register_buffer("w_clip_ratio", mse_clip_ratios(self.weight, self.w_bits))
        self.register_buffer("a_scale", torch.ones(()))
        self.register_buffer("a_zero_point", torch.zeros(()))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.quant_enabled = True
        self._calib: list[torch.Tensor] | None = None
        self._calib_min, self._calib_max = float("inf"), float("-inf")
        assert self.w_clip_ratio.shape == (out,)
        self.quantizer.setup(self)

    # weights ---------------------------------------------------------------------------------------------
    def weight_scale(self) -> torch.Tensor:
        """Per-output-channel weight scale (C_out), of the first piece (see weight_pieces); no gradient."""
        return self.quantizer.weight_scale(self)

    def weight_int(self) -> torch.Tensor:
        """Integer weights (int8 container), same shape as weight; the first piece (see weight_pieces)."""
        return self.quantizer.weight_int(self)

    def weight_pieces(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(W_q int8, s_w C_out)]: the dequantized weight is Σ W_q·s_w (one piece, two for PWLQ)."""
        return self.quantizer.weight_pieces(self)

    def qweight(self) -> torch.Tensor:
        """Fake-quantized weight (straight-through gradients), equal to Σ_pieces W_q·s_w."""
        return self.quantizer.qweight(self)

    def bias_scale(self) -> torch.Tensor:
        return (self.quantizer.act_scale(self) * self.weight_scale()).detach()

    def bias_int(self) -> torch.Tensor | None:
        if self.bias is None:
            return None
        q = torch.round(self.bias.detach() / self.bias_scale())
        return torch.clamp(q, -INT32_MAX, INT32_MAX).to(torch.int32)

    def qbias(self):
        if self.bias is None:
            return None
        return fake_quant(self.bias, self.bias_scale(), 0.0, -INT32_MAX, INT32_MAX)

    # activations -----------------------------------------------------------------------------------------
    @property
    def a_qmax(self) -> int:
        return 2**self.a_bits - 1

    def act_qparams(self) -> tuple[float, int]:
        """(scale, zero point) of the input quantizer as exported (a learned scale included)."""
        return float(self.quantizer.act_scale(self).detach()), int(round(float(self.a_zero_point)))

    def qinput(self, x: torch.Tensor) -> torch.Tensor:
        if self._calib is not None:
            self._observe(x)
            return x
        if not self.quant_enabled:
            return x
        return self.quantizer.qinput(self, x)

    def _observe(self, x: torch.Tensor, per_batch: int = 20000):
        flat = x.detach().reshape(-1).float()
        self._calib_min = min(self._calib_min, float(flat.min()))
        self._calib_max = max(self._calib_max, float(flat.max()))
        if flat.numel() > per_batch:
            idx = torch.randint(0, flat.numel(), (per_batch,), generator=torch.Generator().manual_seed(len(self._calib)))
            flat = flat[idx]
        self._calib.append(flat.cpu())

    def start_calibration(self):
        self._calib, self._calib_min, self._calib_max = [], float("inf"), float("-inf")

    def finish_calibration(self, percentile: float):
        vals = torch.cat(self._calib) if self._calib else torch.zeros(1)
        self._calib = None
        if self._calib_max < self._calib_min:  # nothing observed
            self._calib_min = self._calib_max = 0.0
        lo, hi = self.quantizer.calib_range(self, vals, self._calib_min, self._calib_max, percentile)
        self.quantizer.set_act_range(self, lo, hi)
        self.calibrated.fill_(True)

    def _adopt(self, float_module: nn.Module, bits: LayerBits, method: str = "percentile"):
        self.load_state_dict(float_module.state_dict())
        self._init_quant(bits, method)
        return self

    def forward(self, x):
        """Float op while calibrating or disabled; else op(Q(x), Q(W), Q(b))."""
        if self._calib is not None or not self.quant_enabled:
            self.qinput(x)
            return self._op(x, self.weight, self.bias)
        return self._op(self.qinput(x), self.qweight(), self.qbias())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w_bits={self.w_bits}, a_bits={self.a_bits}, method={self.method}"


class QuantConv2d(_QuantMixin, nn.Conv2d):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, bits: LayerBits, method: str = "percentile") -> "QuantConv2d":
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device)
        return q._adopt(conv, bits, method)

    def _op(self, x, w, b):
        return self._conv_forward(x, w, b)


class QuantLinear(_QuantMixin, nn.Linear):
    @classmethod
    def from_float(cls, lin: nn.Linear, bits: LayerBits, method: str = "percentile") -> "QuantLinear":
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, device=lin.weight.device)
        return q._adopt(lin, bits, method)

    def _op(self, x, w, b):
        return F.linear(x, w, b)


QUANT_TYPES = (QuantConv2d, QuantLinear)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a Conv2d into the conv (eval-mode statistics).

    Uses torch.fx; a model that cannot be traced is returned unchanged (its BatchNorms then run in float).
    Module names of the convolutions are kept, so policies keyed by name still apply.
    """
    from torch.fx.experimental.optimization import fuse

    model = copy.deepcopy(model).eval()
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return model
    try:
        return fuse(model)
    except Exception:  # untraceable control flow: keep BN unfolded
        return model


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def quantize_model(model: nn.Module, policy: QuantPolicy, specs, fold_bn: bool = True,
                   method: str = "percentile") -> nn.Module:
    """A fake-quant copy of `model`: each Conv2d/Linear the policy gives bits becomes QuantConv2d/QuantLinear,
    quantized by `method` (export/quantize/quantizers.py: percentile, minmax, pwlq, dorefa, pact, lsq; an unknown name raises
    UnknownNameError). Call `calibrate` before use."""
    get_quantizer(method)
    policy.validate(specs)
    qmodel = fold_batchnorm(model) if fold_bn else copy.deepcopy(model).eval()
    for spec in specs:
        bits = policy.bits(spec.name)
        if bits is None:
            continue
        mod = qmodel.get_submodule(spec.name)
        cls = QuantConv2d if isinstance(mod, nn.Conv2d) else QuantLinear
        _set_submodule(qmodel, spec.name, cls.from_float(mod, bits, method))
    return qmodel


def quant_layers(model: nn.Module) -> dict[str, _QuantMixin]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_TYPES)}


def model_quantizer(model: nn.Module) -> str | None:
    """The quantization method of a fake-quant model's layers ("a+b" if they differ), None without any."""
    names = sorted({m.method for m in quant_layers(model).values()})
    return "+".join(names) if names else None


@torch.no_grad()
def calibrate(qmodel: nn.Module, batches: Iterable[torch.Tensor], percentile: float = 99.99) -> nn.Module:
    """Set every activation quantizer's range from float forward passes over `batches` (N×C×H×W tensors).

    For a smoothing base model pass noisy batches x + σ·ε: noise widens activation ranges (TOOLCHAIN.md)."""
    layers = quant_layers(qmodel)
    qmodel.eval()
    batches = list(batches)
    for i, m in enumerate(layers.values()):
        m.calib_index = i  # picks the layer's tie-free scale widening (export/quantize/quantizers.tie_free_widening)
        m.start_calibration()
    try:
        for xb in batches:
            qmodel(xb)
    finally:
        for m in layers.values():
            m.finish_calibration(percentile)
    break_ties(qmodel, batches)
    return qmodel


# A value x/s exactly half-way between two integers is a rounding tie, and each runtime breaks it by its own float
# rounding (torch, onnxruntime and TVM sum in different orders), so one activation moves by a whole step in one and
# not in another. Random values sit that close to a tie about once per 10^6; a layer whose scale is commensurate with
# the integer lattice its input lies on (the previous layers' s_in·s_w,c·Z) has a fixed share of ties in one channel
# (1/136 and 1/232 seen). export/quantize/quantizers.tie_free_widening prevents most at calibration; QAT can drift back.
TIE_ULPS = 4  # |x/s - (k + 1/2)| within this many float32 ulps of x/s is a tie
TIE_RATE, TIE_MIN_HITS = 2e-3, 4  # a channel with at least this share and count of ties is commensurate
TIE_NUDGE = 1.0 + 3 * 2.0**-13  # 0.04 %: moves a tie by about 2·10^-4·|x/s|, far beyond float rounding


@torch.no_grad()
def tie_report(qmodel: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, dict]:
    """Per quantized layer, over the quantized model's forward passes on `batches`: the channel of its input with
    the largest share of rounding ties: {"channel", "ties", "values", "rate"} (values inside the quantizer's range)."""
    layers = quant_layers(qmodel)
    hits = {n: None for n in layers}
    totals = {n: None for n in layers}

    def hook(name, layer):
        def f(_mod, inp):
            x = inp[0].detach().float()
            s = float(layer.quantizer.act_scale(layer).detach())
            z = float(layer.a_zero_point)
            v = x / s
            inside = (v >= -z - 0.5) & (v <= layer.a_qmax - z + 0.5)
            tol = TIE_ULPS * torch.finfo(torch.float32).eps * v.abs().clamp_min(1.0)
            tie = inside & ((v - torch.floor(v) - 0.5).abs() <= tol)
            dims = [d for d in range(x.dim()) if d != 1]
            h, t = tie.sum(dim=dims), inside.sum(dim=dims)
            hits[name] = h if hits[name] is None else hits[name] + h
            totals[name] = t if totals[name] is None else totals[name] + t
        return f

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in layers.items()]
    was_training = qmodel.training
    qmodel.eval()
    try:
        for xb in batches:
            qmodel(xb)
    finally:
        for h in handles:
            h.remove()
        qmodel.train(was_training)
    out = {}
    for n in layers:
        if hits[n] is None:
            continue
        rate = hits[n].double() / totals[n].clamp_min(1).double()
        c = int(torch.argmax(rate))
        out[n] = {"channel": c, "ties": int(hits[n][c]), "values": int(totals[n][c]), "rate": float(rate[c])}
    return out


def _commensurate(row: dict) -> bool:
    return row["ties"] >= TIE_MIN_HITS and row["rate"] >= TIE_RATE


@torch.no_grad()
def break_ties(qmodel: nn.Module, batches: Iterable[torch.Tensor], rounds: int = 8) -> dict[str, int]:
    """Nudge (×TIE_NUDGE, zero point kept) the activation scale of every layer whose input has a channel full of
    rounding ties, re-measuring after each round, so torch, onnxruntime and TVM compute the same integers.
    Returns {layer: nudges} for the layers it changed; raises nothing (a layer still tied after `rounds` stays)."""
    batches = list(batches)
    layers = quant_layers(qmodel)
    nudged: dict[str, int] = {}
    for _ in range(rounds):
        tied = [n for n, row in tie_report(qmodel, batches).items() if _commensurate(row)]
        if not tied:
            break
        for n in tied:
            layers[n].quantizer.rescale_act(layers[n], TIE_NUDGE)
            nudged[n] = nudged.get(n, 0) + 1
            layers[n].tie_nudges = getattr(layers[n], "tie_nudges", 0) + 1  # what the export report lists
    return nudged


def tie_nudges(qmodel: nn.Module) -> dict[str, int]:
    """{layer: times break_ties nudged its scale} in this process (calibration and export)."""
    return {n: m.tie_nudges for n, m in quant_layers(qmodel).items() if getattr(m, "tie_nudges", 0)}


def set_quant_enabled(qmodel: nn.Module, enabled: bool) -> None:
    for m in quant_layers(qmodel).values():
        m.quant_enabled = enabled


def calibration_batches(x: torch.Tensor, sigma: float, batch_size: int = 128, copies: int = 1, seed: int = 0):
    """Yield batches of x (and `copies` noisy copies x + σ·ε when σ > 0), seeded."""
    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        if sigma > 0:
            for _ in range(copies):
                yield xb + sigma * torch.randn(xb.shape, generator=g)
        else:
            yield xb
