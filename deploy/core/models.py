"""Model zoo and model loading.

Every model here takes RGB (or grayscale) pixels in [0, 1], N×C×H×W float32, and normalises them as its first
operation (`Normalize`), so that randomized-smoothing noise is added in pixel space (Cohen et al. 2019) and the exported
graph starts with the normalisation. Normalisation buffers are not persistent: published checkpoints load unchanged.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from arq_deploy.core.errors import ModelFormatError, UnknownNameError, WeightsMismatchError

CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)
DIGITS_MEAN = (0.3,)
DIGITS_STD = (0.4,)


class Normalize(nn.Module):
    """(x - mean) / std per channel; x: N×C×H×W."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


# ---------------------------------------------------------------- CIFAR ResNets (He et al. 2016, option-A shortcut)
class ShortcutA(nn.Module):
    """Option-A shortcut: stride-2 subsampling and zero-padding of the extra channels (no parameters)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = ShortcutA(planes // 4) if (stride != 1 or in_planes != planes) else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs: 3 stages of n basic blocks with 16/32/64 channels."""

    def __init__(self, depth: int, num_classes: int = 10, mean=CIFAR_MEAN, std=CIFAR_STD):
        super().__init__()
        if (depth - 2) % 6:
            raise UnknownNameError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.in_planes = 16
        self.layer1 = self._stage(16, n, 1)
        self.layer2 = self._stage(32, n, 2)
        self.layer3 = self._stage(64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _stage(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# ---------------------------------------------------------------- CIFAR MobileNetV2 (Sandler et al. 2018)
class InvertedResidual(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        hidden = in_planes * expansion
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = None
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes))
        self.residual = stride == 1

    def forward(self, x):
        out = F.relu6(self.bn1(self.conv1(x)))
        out = F.relu6(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if not self.residual:
            return out
        return out + (self.shortcut(x) if self.shortcut is not None else x)


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 for 32×32 inputs (first conv and second stage at stride 1)."""

    # expansion, out_planes, blocks, stride
    CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 10, mean=CIFAR_MEAN, std=CIFAR_STD, width: float = 1.0):
        super().__init__()
        c = lambda v: max(8, int(round(v * width)))  # noqa: E731
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, c(32), 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c(32))
        layers, in_planes = [], c(32)
        for expansion, out, n, stride in self.CFG:
            for s in [stride] + [1] * (n - 1):
                layers.append(InvertedResidual(in_planes, c(out), expansion, s))
                in_planes = c(out)
        self.layers = nn.Sequential(*layers)
        self.conv2 = nn.Conv2d(in_planes, c(1280), 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c(1280))
        self.linear = nn.Linear(c(1280), num_classes)

    def forward(self, x):
        out = F.relu6(self.bn1(self.conv1(self.normalize(x))))
        out = F.relu6(self.bn2(self.conv2(self.layers(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ---------------------------------------------------------------- small CNN for scikit-learn's 8×8 digits
class DigitsCNN(nn.Module):
    """Four convolutions and a linear layer for 1×8×8 inputs."""

    def __init__(self, num_classes: int = 10, mean=DIGITS_MEAN, std=DIGITS_STD, in_channels: int = 1):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 64, 3, 2, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.conv4 = nn.Conv2d(64, 64, 3, 1, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(64)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = self.normalize(x)
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3), (self.conv4, self.bn4)):
            out = F.relu(bn(conv(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@dataclass(frozen=True)
class ModelInfo:
    name: str
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


MODELS: dict[str, ModelInfo] = {}


def register(info: ModelInfo) -> None:
    if info.name in MODELS:
        raise ValueError(f"model {info.name!r} registered twice")
    MODELS[info.name] = info


for _d in (20, 32, 44, 56, 110):
    register(ModelInfo(f"resnet{_d}", (lambda d: lambda **kw: CifarResNet(d, **kw))(_d), (3, 32, 32), CIFAR_MEAN,
                       CIFAR_STD))
register(ModelInfo("mobilenetv2", CifarMobileNetV2, (3, 32, 32), CIFAR_MEAN, CIFAR_STD))
register(ModelInfo("digits_cnn", DigitsCNN, (1, 8, 8), DIGITS_MEAN, DIGITS_STD))


def build_model(name: str, num_classes: int = 10, mean=None, std=None) -> nn.Module:
    """A zoo model by name, or a user's `package.module:factory` (called with num_classes if it accepts it)."""
    if ":" in name:
        return _user_factory(name, num_classes, mean, std)
    if name not in MODELS:
        raise UnknownNameError(f"unknown model {name!r}; known: {', '.join(MODELS)} or package.module:factory")
    info = MODELS[name]
    return info.factory(num_classes=num_classes, mean=mean or info.mean, std=std or info.std)


def model_input_shape(name: str) -> tuple[int, int, int] | None:
    return MODELS[name].input_shape if name in MODELS else None


def _user_factory(spec: str, num_classes: int, mean, std) -> nn.Module:
    mod_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise UnknownNameError(f"cannot load model factory {spec!r}: {e}") from None
    try:
        model = factory(num_classes=num_classes)
    except TypeError:
        model = factory()
    if not isinstance(model, nn.Module):
        raise ModelFormatError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if mean and std:  # a checkpoint of a user's model without normalisation stores empty lists
        model = Normalized(model, mean, std)
    return model


class Normalized(nn.Module):
    """Wraps a user's model that expects normalised inputs so it takes pixels in [0, 1]."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, x):
        return self.model(self.normalize(x))


# ---------------------------------------------------------------- checkpoints
def read_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint safely (weights_only) and return {'state_dict': ..., plus any metadata}."""
    path = Path(path)
    if not path.is_file():
        raise WeightsMismatchError(f"weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, unsafe globals
        raise WeightsMismatchError(f"cannot read weights {path}: {str(e).splitlines()[0]}") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        ckpt = dict(obj)
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        ckpt = {"state_dict": obj}
    else:
        raise WeightsMismatchError(f"{path} holds neither a state dict nor a dict with 'state_dict'")
    ckpt["state_dict"] = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    return ckpt


def apply_state_dict(model: nn.Module, state_dict: dict, source: str | Path) -> None:
    """Load `state_dict` into `model` strictly; a mismatch is a WeightsMismatchError naming `source`."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        raise WeightsMismatchError(f"weights {source} do not fit the model: {msg[:300]}") from None


def load_weights(model: nn.Module, path: str | Path) -> dict:
    """Load a checkpoint into `model` strictly; returns the checkpoint's metadata (without the state dict)."""
    ckpt = read_checkpoint(path)
    apply_state_dict(model, ckpt["state_dict"], path)
    return {k: v for k, v in ckpt.items() if k != "state_dict"}


def load_model(name: str | None, weights: str | Path | None = None, num_classes: int = 10,
               prepare: Callable[[nn.Module, str, dict], nn.Module] | None = None) -> tuple[nn.Module, dict]:
    """Build a model and load its weights (the checkpoint is read once). A `.pt2` file is a `torch.export` archive
    (name is then ignored). `prepare(model, name, meta)` may rebuild the model before the weights go in (a QAT
    checkpoint holds a fake-quant model). Returns (model in eval mode, checkpoint metadata incl. 'arch')."""
    if weights is not None and str(weights).endswith(".pt2"):
        return _load_exported_program(weights), {}
    ckpt = read_checkpoint(weights) if weights is not None else {}
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    if name in (None, "", "auto"):
        name = meta.get("arch")
    if not name:
        raise UnknownNameError("no model name given and the checkpoint does not name its architecture: give --model")
    meta["arch"] = name
    model = build_model(name, num_classes=int(meta.get("num_classes", num_classes)), mean=meta.get("mean"),
                        std=meta.get("std"))
    if prepare is not None:
        model = prepare(model, name, meta)
    if weights is not None:
        apply_state_dict(model, ckpt["state_dict"], weights)
    return model.eval(), meta


def _load_exported_program(path) -> nn.Module:
    try:
        ep = torch.export.load(str(path))
    except Exception as e:
        raise ModelFormatError(f"cannot load torch.export archive {path}: {str(e).splitlines()[0]}") from None
    return ep.module()
