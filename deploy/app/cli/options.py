"""Options shared by several commands, and the parsing of their values into config fields."""

from __future__ import annotations

import click

from arq_deploy.core.config import ModelSource, Preprocess
from arq_deploy.core.errors import ArqError


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """'C,H,W' -> (C, H, W)."""
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ArqError(f"--input-shape must be C,H,W, got {text!r}") from None


def parse_policy(bits: str | None, policy: str | None):
    """--bits or --policy -> a QuantPolicy (None when neither is given)."""
    from arq_deploy.core.policy import QuantPolicy, parse_bits

    if bits and policy:
        raise ArqError("give --bits or --policy, not both")
    if policy:
        return QuantPolicy.load(policy)
    if bits:
        return parse_bits(bits)
    return None


def parse_preprocess(resize: int | None, center_crop: str | None) -> Preprocess:
    """--resize N and --center-crop N|H,W -> a Preprocess (validated there)."""
    crop = None
    if center_crop is not None:
        try:
            crop = tuple(int(v) for v in center_crop.split(","))
        except ValueError:
            raise ArqError(f"--center-crop must be N or H,W with positive integers, got {center_crop!r}") from None
        crop = crop * 2 if len(crop) == 1 else crop
    return Preprocess(resize=resize, crop=crop)


def model_source(model_name, weights, input_shape) -> ModelSource:
    return ModelSource(name=model_name, weights=weights, input_shape=parse_shape(input_shape))


model_opt = click.option("--model", "model_name", default=None, help="resnet20/32/44/56/110, mobilenetv2, digits_cnn, "
                         "or package.module:factory (default: the checkpoint's arch)")
weights_opt = click.option("--weights", default=None, type=click.Path(dir_okay=False),
                           help="checkpoint (.th/.pt state dict, loaded with weights_only) or torch.export .pt2")
shape_opt = click.option("--input-shape", default=None, help="C,H,W for a user model")
bits_opt = click.option("--bits", default=None, help="uniform bits: 8, W4A8 or 4,8; float for no quantization")
policy_opt = click.option("--policy", default=None, type=click.Path(dir_okay=False), help="policy.json")
data_opt = click.option("--data", default="digits", show_default=True,
                        help="'digits', a CIFAR-10 python-batch folder, an image folder or a .tar/.tar.gz of one")
resize_opt = click.option("--resize", type=int, default=None, metavar="N",
                          help="image data: scale each image so that its shorter side is N pixels (bilinear, as "
                               "torchvision's Resize(N)) [image files: fitted to the model's H×W, see --center-crop]")
crop_opt = click.option("--center-crop", "center_crop", default=None, metavar="N|H,W",
                        help="image data: keep the center N×N (or H×W) pixels, after --resize [image files given neither "
                             "option: --resize max(H,W) --center-crop H,W of the model's input]")
target_opt = click.option("--target", default=None,
                          help="where the model runs: x86, cuda, or a board's target with --remote (default: an "
                               "artifact's own target; x86 for an ONNX file)")
remote_opt = click.option("--remote", default=None, metavar="HOST:PORT",
                          help="run a compiled TVM artifact on a device through TVM RPC (python -m tvm.exec.rpc_server "
                               "on the device)")


def backend_opt(choices=("auto", "onnxruntime", "tvm", "qemu")):
    return click.option("--backend", type=click.Choice(list(choices)), default="auto", show_default=True,
                        help="runtime: auto (onnxruntime for .onnx, TVM for an artifact), onnxruntime, tvm, "
                             "qemu (an aarch64 artifact under qemu-user here)" + (", torch" if "torch" in choices else ""))


def preprocess_opts(f):
    """--resize, --center-crop (parsed with `parse_preprocess`)."""
    return resize_opt(crop_opt(f))


def model_opts(f):
    """--model, --weights, --input-shape."""
    return model_opt(weights_opt(shape_opt(f)))


def apply(opts):
    """Apply a list of click decorators in the order they are listed."""
    def deco(f):
        for o in reversed(opts):
            f = o(f)
        return f
    return deco
