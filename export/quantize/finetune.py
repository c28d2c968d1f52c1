"""Training modes for float training and quantization-aware training (QAT): one loss per mode, in a small registry.

Images are float32 N×C×H×W in [0, 1] pixel space (normalisation lives inside the model), so noise and attacks act on
pixels. For a batch (x, y), the model f being trained and a frozen teacher f_T:

* ``vanilla``:  L = CE(f(x), y)
* ``gaussian``: L = CE(f(x + σ·ε), y), ε ~ N(0, I) (noise augmentation for a smoothing base model, Cohen et al. 2019)
* ``pgd``:      L = CE(f(x*), y), x* = PGD(f, x, y) (adversarial training, Madry et al. 2018)
* ``distill``:  L = (1 - w)·T²·KL(softmax(f_T(x)/T) ‖ softmax(f(x*)/T)) + w·CE(f(x), y), x* = PGD(f, x, y)
  (adversarially robust distillation, ARD, Goldblum et al. 2020: the student on its own PGD examples is matched to
  the teacher's soft labels on the clean image; w = `clean_weight` weighs the clean cross-entropy; KL is averaged
  over the batch).

PGD (L∞, radius ε, step α, K steps, random start), on CE(f(·), y) with f in eval mode (BatchNorm running statistics):
x⁰ = Π(x + U(-ε, ε)),  xᵏ⁺¹ = Π(xᵏ + α·sign(∇ₓ CE(f(xᵏ), y))),  Π = projection onto {x' : ‖x' - x‖∞ ≤ ε} ∩ [0, 1]^d.
The default step is α = 2.5·ε/K (Madry et al.). Random draws come from one seeded torch.Generator.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from arq_deploy.core.errors import ArqError, UnknownNameError


class TrainConfigError(ArqError):
    """Bad training-mode settings (ε < 0, steps < 1, distillation without a teacher, ...)."""


# ------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class TrainConfig:
    """A training mode and its settings; invalid values raise TrainConfigError (or UnknownNameError for the mode)."""

    mode: str = "gaussian"
    sigma: float = 0.0
    eps: float = 8 / 255
    pgd_steps: int = 7
    pgd_step_size: float | None = None
    temperature: float = 4.0
    clean_weight: float = 0.0
    quantizer: str | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise UnknownNameError(f"unknown training mode {self.mode!r}; known: {', '.join(MODES)}")
        _check(self.sigma >= 0, f"sigma must be >= 0, got {self.sigma}")
        _check(self.sigma == 0 or self.mode == "gaussian",
               f"sigma (Gaussian noise) belongs to mode 'gaussian'; mode {self.mode!r} takes sigma 0")
        _check(0 <= self.eps <= 1, f"eps must be in [0, 1] (pixel scale, e.g. 8/255), got {self.eps}")
        _check(float(self.pgd_steps).is_integer() and self.pgd_steps >= 1,
               f"PGD steps must be an integer >= 1, got {self.pgd_steps}")
        _check(self.pgd_step_size is None or self.pgd_step_size > 0,
               f"PGD step size must be > 0, got {self.pgd_step_size}")
        _check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        _check(0 <= self.clean_weight <= 1, f"clean weight must be in [0, 1], got {self.clean_weight}")

    @property
    def adversarial(self) -> bool:
        return self.mode in ("pgd", "distill")

    @property
    def step_size(self) -> float:
        """α: the given PGD step, else 2.5·ε/K."""
        return self.pgd_step_size if self.pgd_step_size is not None else 2.5 * self.eps / self.pgd_steps

    def check_teacher(self, has_teacher: bool) -> None:
        _check(has_teacher or self.mode != "distill", "mode 'distill' needs a teacher (--teacher CKPT)")
        _check(not has_teacher or self.mode == "distill",
               f"a teacher is used by mode 'distill' only, not {self.mode!r}")

    def to_dict(self) -> dict:
        """The settings that apply to this mode (others None), for checkpoint metadata and histories."""
        d = asdict(self)
        if not self.adversarial:
            d.update(eps=None, pgd_steps=None, pgd_step_size=None)
        else:
            d["pgd_step_size"] = self.step_size
        if self.mode != "distill":
            d.update(temperature=None, clean_weight=None)
        return d


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise TrainConfigError(message)


def parse_pixels(text: str | float, option: str = "--eps") -> float:
    """'8/255', '0.03' or a number -> a float in [0, 1] (pixel scale); anything else raises TrainConfigError."""
    s = str(text).strip()
    try:
        num, _, den = s.partition("/")
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise TrainConfigError(f"{option} must be a number or a fraction like 8/255, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or value > 1:
        raise TrainConfigError(f"{option} must be in [0, 1] (pixel scale, e.g. 8/255), got {text!r}")
    return value


INITS = ("random", "weights")


def training_options(mode: str, sigma: float | None, eps: str | float, pgd_steps: int, pgd_step_size: str | None,
                     temperature: float, clean_weight: float, quantizer: str | None, teacher: str | None,
                     init: str | None, weights: str | None, quantized: bool) -> tuple[TrainConfig, str]:
    """Check the `train` command's options before any work -> (TrainConfig, init 'random' | 'weights').

    σ defaults to 0.25 in mode gaussian and 0 otherwise; init defaults to 'weights' when weights are given."""
    if mode not in MODES:
        raise UnknownNameError(f"unknown --mode {mode!r}; known: {', '.join(MODES)}")
    _check(sigma is None or mode == "gaussian", f"--sigma is the noise of --mode gaussian, not of --mode {mode}")
    sigma = (0.25 if mode == "gaussian" else 0.0) if sigma is None else sigma
    _check(sigma >= 0, f"--sigma must be >= 0, got {sigma}")
    _check(pgd_steps >= 1, f"--pgd-steps must be >= 1, got {pgd_steps}")
    step = None if pgd_step_size is None else parse_pixels(pgd_step_size, "--pgd-step-size")
    _check(step is None or step > 0, "--pgd-step-size must be > 0")
    _check(temperature > 0, f"--temperature must be > 0, got {temperature}")
    _check(0 <= clean_weight <= 1, f"--clean-weight must be in [0, 1], got {clean_weight}")
    _check(teacher is not None or mode != "distill", "--mode distill needs --teacher CKPT (the float teacher)")
    _check(teacher is None or mode == "distill", f"--teacher is used by --mode distill only, not --mode {mode}")
    _check(quantizer is None or quantized, "--quantizer applies to quantization-aware training: give --bits or "
           "--policy (for PTQ, pass the quantizer to export)")
    if quantizer is not None:
        from arq_deploy.export.quantize.quantizers import get_quantizer

        get_quantizer(quantizer)  # UnknownNameError listing the known ones
    init = init or ("weights" if weights else "random")
    _check(init in INITS, f"--init must be random or weights, got {init!r}")
    _check(init != "weights" or weights is not None, "--init weights needs --weights CKPT")
    _check(init != "random" or weights is None, "--init random starts from random weights: drop --weights and give "
           "--model NAME")
    cfg = TrainConfig(mode, float(sigma), parse_pixels(eps), int(pgd_steps), step, float(temperature),
                      float(clean_weight), quantizer)
    return cfg, init


# ------------------------------------------------------------------------------------------------- pieces
def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
               generator: torch.Generator | None = None, random_start: bool = True) -> torch.Tensor:
    """L∞ PGD maximising CE(model(x*), y) within ‖x* - x‖∞ ≤ eps and x* ∈ [0,1]; x: N×C×H×W, y: N -> x* (detached).

    The model runs in eval mode during the attack (BatchNorm uses running statistics) and gets its mode back after;
    only the input gradient is taken, parameter gradients are untouched."""
    was_training = model.training
    model.eval()
    x = x.detach()
    lo, hi = (x - eps).clamp_min(0.0), (x + eps).clamp_max(1.0)
    if random_start and eps > 0:
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x_adv = torch.min(torch.max(x + (2 * u - 1) * eps, lo), hi)
    else:
        x_adv = x.clone()
    try:
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), lo), hi)
    finally:
        model.train(was_training)
    return x_adv.detach()


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch; logits N×K -> scalar (0 when s = t)."""
    t = temperature
    return t * t * F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                            reduction="batchmean", log_target=True)


def frozen_teacher(teacher, input_shape, num_classes: int) -> nn.Module:
    """A private eval-mode copy of `teacher` (a LoadedModel or nn.Module) that takes input_shape and gives K logits."""
    module = getattr(teacher, "model", teacher)
    if not isinstance(module, nn.Module):
        raise TrainConfigError(f"the teacher must be a LoadedModel or torch module, got {type(teacher).__name__}")
    module = copy.deepcopy(module).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            k = module(torch.zeros(1, *input_shape)).shape[-1]
    except RuntimeError as e:
        raise TrainConfigError(f"the teacher does not take inputs of shape {tuple(input_shape)}: "
                               f"{str(e).splitlines()[0][:200]}") from None
    _check(k == num_classes, f"the teacher has {k} classes, the student {num_classes}")
    return module


# ------------------------------------------------------------------------------------------------- mode registry
@dataclass
class StepContext:
    """What a mode's loss needs besides the batch: settings, the seeded generator and the frozen teacher."""

    config: TrainConfig
    generator: torch.Generator
    teacher: nn.Module | None = None


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, StepContext], tuple[torch.Tensor, torch.Tensor]]
MODES: dict[str, LossFn] = {}


def register_mode(name: str):
    """Decorator: MODES[name] = fn(model, x, y, ctx) -> (loss, logits on the training inputs); twice raises."""

    def deco(fn: LossFn) -> LossFn:
        if name in MODES:
            raise ValueError(f"training mode {name!r} registered twice")
        MODES[name] = fn
        return fn

    return deco


def _adversarial(model, x, y, ctx: StepContext) -> torch.Tensor:
    c = ctx.config
    return pgd_attack(model, x, y, c.eps, c.step_size, c.pgd_steps, ctx.generator)


@register_mode("vanilla")
def _vanilla(model, x, y, ctx):
    out = model(x)
    return F.cross_entropy(out, y), out


@register_mode("gaussian")
def _gaussian(model, x, y, ctx):
    noisy = x + ctx.config.sigma * torch.randn(x.shape, generator=ctx.generator, dtype=x.dtype, device=x.device)
    out = model(noisy)
    return F.cross_entropy(out, y), out


@register_mode("pgd")
def _pgd(model, x, y, ctx):
    out = model(_adversarial(model, x, y, ctx))
    return F.cross_entropy(out, y), out


@register_mode("distill")
def _distill(model, x, y, ctx):
    c = ctx.config
    with torch.no_grad():
        soft = ctx.teacher(x)
    out = model(_adversarial(model, x, y, ctx))
    loss = (1 - c.clean_weight) * distill_kl(out, soft, c.temperature)
    if c.clean_weight > 0:
        loss = loss + c.clean_weight * F.cross_entropy(model(x), y)
    return loss, out


def training_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext):
    """The configured mode's (loss, logits on the training inputs) for one batch; model in train mode."""
    return MODES[ctx.config.mode](model, x, y, ctx)
