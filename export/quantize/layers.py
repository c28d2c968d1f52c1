"""Quantizable-layer discovery: `LayerSpec` per Conv2d/Linear, in execution order, with MACs and parameter counts."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LayerSpec:
    """One quantizable layer. Sizes are per input sample; `macs` = multiply-accumulates of one forward pass.

    conv:   macs = H_out·W_out · C_out · (C_in / groups) · K_h·K_w
    linear: macs = C_in · C_out (times any leading spatial/sequence positions)
    """

    index: int
    name: str
    kind: str  # "conv", "dwconv" (depthwise) or "linear"
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    in_size: tuple[int, int]  # input H, W (1, 1 for linear)
    out_size: tuple[int, int]
    macs: int
    params: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LayerSpec":
        d = dict(d)
        for k in ("kernel", "stride", "in_size", "out_size"):
            d[k] = tuple(d[k])
        return cls(**d)


def extract_layer_specs(model, input_shape: tuple[int, int, int]) -> list[LayerSpec]:
    """Run one forward pass on zeros of shape 1×C×H×W and record every Conv2d/Linear in execution order.

    A module called more than once (weight sharing) is listed once, with MACs summed over its calls.
    """
    import torch
    import torch.nn as nn

    records: dict[str, dict] = {}
    order: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(mod, inputs, output):
        name = names[mod]
        x = inputs[0]
        if isinstance(mod, nn.Conv2d):
            macs = output.shape[2] * output.shape[3] * mod.out_channels * (mod.in_channels // mod.groups) \
                * mod.kernel_size[0] * mod.kernel_size[1]
            rec = dict(kind="dwconv" if mod.groups > 1 and mod.groups == mod.in_channels else "conv",
                       in_channels=mod.in_channels, out_channels=mod.out_channels, kernel=tuple(mod.kernel_size),
                       stride=tuple(mod.stride), groups=mod.groups, in_size=tuple(x.shape[2:4]),
                       out_size=tuple(output.shape[2:4]), macs=int(macs))
        else:
            positions = int(x[..., 0].numel() // x.shape[0]) if x.dim() > 1 else 1
            rec = dict(kind="linear", in_channels=mod.in_features, out_channels=mod.out_features, kernel=(1, 1),
                       stride=(1, 1), groups=1, in_size=(1, 1), out_size=(1, 1),
                       macs=int(mod.in_features * mod.out_features * positions))
        if name in records:
            records[name]["macs"] += rec["macs"]
        else:
            rec["params"] = sum(p.numel() for p in mod.parameters(recurse=False))
            records[name] = rec
            order.append(name)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [LayerSpec(index=i, name=n, **records[n]) for i, n in enumerate(order)]


def total_macs(specs: list[LayerSpec]) -> int:
    return sum(s.macs for s in specs)


def specs_to_json(specs: list[LayerSpec]) -> str:
    return json.dumps([s.to_dict() for s in specs], indent=2)
