"""Fake-quantization arithmetic shared by the quantized layers and the quantizers: round-half-to-even with a
straight-through gradient, and x̂ = (clamp(round(x/s) + z, q_min, q_max) - z) · s (ONNX QuantizeLinear/DequantizeLinear)."""

from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round half-to-even forward, identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quant(x, scale, zero_point, qmin: int, qmax: int):
    """(clamp(round(x/scale) + z, qmin, qmax) - z) · scale, with STE; gradient is zero where clamped.

    Computed as round(clamp(x/scale, qmin - z, qmax - z)) · scale: the same values (the bounds are integers), but
    the clamp comes before the rounding, so a value that merely rounds to the top or bottom level keeps its
    straight-through gradient (torch.clamp passes none at its bounds); only x/scale outside [qmin - z, qmax - z]
    is cut (LSQ's and PACT's gradients need this)."""
    return round_ste(torch.clamp(x / scale, qmin - zero_point, qmax - zero_point)) * scale


def weight_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1
