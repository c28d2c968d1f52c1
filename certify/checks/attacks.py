"""Adversarial attacks on the quantized model, transferred to the deployed artifact (issue 7, part 4).

Threat model: images x ∈ [0, 1]^(C×H×W) in pixel space (normalisation lives inside the models); an attack returns
x' = x + δ with ‖δ‖_p ≤ r and x' ∈ [0, 1].

* White-box attacks (FGSM, PGD L∞, PGD L2, AutoAttack) differentiate the torch fake-quant model; its rounding passes
  gradients straight through (export/quantize/quant.py `round_ste`). Their adversarial examples are then fed to the deployed
  Runner (onnxruntime / TVM): the *transferred* accuracy, an upper bound of the Runner's white-box robust accuracy.
* Square (black-box random search on the margin, L∞) queries the deployed Runner itself: no gradient is needed.
* WCAR(ε) = min_a acc_a(ε), the worst-case accuracy over the attacks a run at radius ε (`wcar`). The per-image
  worst case, 1/N Σ_i Π_a 1[attack a fails on image i], is reported beside it as `union_accuracy` (≤ WCAR).
* L2 attacks use the radius r = l2_scale·ε for a nominal L∞ ε, so one ε list drives every attack. The default
  l2_scale is √(d/12) for d = C·H·W input values: 16 on CIFAR-10 (8/255 -> 0.50, the usual L2 budget), growing with
  √d as L∞-to-L2 norm ratios do (2.31 on 8×8 digits). Every row records the radius it used.
* Numbers are trusted only after `gradient_masking_check` passes (PGD loss rises with steps and ε, Square does not
  beat PGD, PGD at a large ε drives accuracy to about 0).

Everything is seeded: each (attack, ε, batch) draws its randomness from its own seed inside `torch.random.fork_rng`,
so no global RNG state leaks and a resumed run (append-only JSONL log, `arq_deploy.core.resultlog.JsonlLog`) equals an
uninterrupted one. torch and torchattacks are imported lazily.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from arq_deploy.certify.checks import robust_metrics as rm
from arq_deploy.core.errors import ArqError, UnknownNameError
from arq_deploy.core.fileio import atomic_path
from arq_deploy.core.progress import progress_bar
from arq_deploy.core.resultlog import JsonlLog, ResultLogMismatchError

# ------------------------------------------------------------------------------------------------ errors, config


class AttackInputError(ArqError):
    """Bad attack parameters (ε, steps, queries) or inputs (shape, NaN, pixels outside [0, 1], labels)."""


@dataclass(frozen=True)
class AttackConfig:
    """Attack budgets. PGD / PGD-L2 use `steps` iterations of size 2.5·r/steps from a random start (Madry et al.).

    `apgd_steps` is the iteration count of APGD-CE / APGD-T in "autoattack-apgd" (the "autoattack" ensemble keeps
    torchattacks 3.5.1's own settings: APGD-CE and APGD-T with 10 iterations, FAB-T, Square with 5,000 queries; the
    original AutoAttack runs APGD for 100). `square_queries` bounds the "square" attack's queries per image.
    `l2_scale`: the L2 radius per unit of nominal ε (None: √(d/12), see the module docstring)."""

    steps: int = 20
    apgd_steps: int = 10
    square_queries: int = 1000
    l2_scale: float | None = None

    def __post_init__(self):
        for name in ("steps", "apgd_steps", "square_queries"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise AttackInputError(f"attack {name} must be an integer >= 1, got {v!r}")
        if self.l2_scale is not None and not (math.isfinite(self.l2_scale) and self.l2_scale > 0):
            raise AttackInputError(f"l2_scale must be > 0, got {self.l2_scale!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack: `build(model, radius, cfg, seed, num_classes) -> torchattacks.Attack`."""

    name: str
    norm: str  # "Linf" | "L2"
    white_box: bool  # True: crafted on the torch model; False: queries the deployed Runner directly
    build: Callable
    doc: str
    min_classes: int = 2


ATTACKS: dict[str, AttackSpec] = {}


def register(name: str, norm: str, white_box: bool, doc: str, min_classes: int = 2):
    def deco(fn):
        if name in ATTACKS:
            raise ValueError(f"attack {name!r} is registered twice")
        ATTACKS[name] = AttackSpec(name, norm, white_box, fn, doc, min_classes)
        return fn

    return deco


@register("fgsm", "Linf", True, "FGSM: one step x + r·sign(∇ₓ CE), Goodfellow et al.")
def _fgsm(model, r, cfg, seed, k):
    import torchattacks

    return torchattacks.FGSM(model, eps=r)


@register("pgd", "Linf", True, "PGD L∞: `steps` signed-gradient steps of 2.5·r/steps from a random start")
def _pgd(model, r, cfg, seed, k):
    import torchattacks

    return torchattacks.PGD(model, eps=r, alpha=2.5 * r / cfg.steps, steps=cfg.steps, random_start=True)


@register("pgd-l2", "L2", True, "PGD L2 (torchattacks PGDL2): normalised-gradient steps of 2.5·r/steps")
def _pgd_l2(model, r, cfg, seed, k):
    import torchattacks

    return torchattacks.PGDL2(model, eps=r, alpha=2.5 * r / cfg.steps, steps=cfg.steps, random_start=True)


@register("autoattack", "Linf", True, "AutoAttack standard (torchattacks): APGD-CE, APGD-T, FAB-T, Square 5000",
          min_classes=4)  # APGD-T's targeted DLR loss reads the 4th-largest logit
def _autoattack(model, r, cfg, seed, k):
    import torchattacks

    return torchattacks.AutoAttack(model, norm="Linf", eps=r, version="standard", n_classes=k, seed=seed)


@register("autoattack-apgd", "Linf", True, "AutoAttack's gradient part only: APGD-CE then APGD-T (cheaper)",
          min_classes=4)
def _autoattack_apgd(model, r, cfg, seed, k):
    import torchattacks

    return torchattacks.MultiAttack([
        torchattacks.APGD(model, norm="Linf", eps=r, steps=cfg.apgd_steps, seed=seed, loss="ce", n_restarts=1),
        torchattacks.APGDT(model, norm="Linf", eps=r, steps=cfg.apgd_steps, seed=seed, n_classes=k, n_restarts=1),
    ])


@register("square", "Linf", False, "Square (black-box random search on the margin), on the deployed Runner")
def _square(model, r, cfg, seed, k):
    import torchattacks

    return torchattacks.Square(model, norm="Linf", eps=r, n_queries=cfg.square_queries, n_restarts=1, seed=seed)


DEFAULT_ATTACKS = ("fgsm", "pgd", "pgd-l2", "autoattack-apgd", "square")


def get_attack(name: str) -> AttackSpec:
    if name not in ATTACKS:
        raise UnknownNameError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    return ATTACKS[name]


def attack_radius(name: str, eps: float, cfg: AttackConfig, dim: int) -> float:
    """The radius attack `name` uses for the nominal L∞ ε on inputs of dim = C·H·W values: ε for an L∞ attack,
    l2_scale·ε for an L2 attack (l2_scale None: √(dim/12))."""
    if get_attack(name).norm != "L2":
        return float(eps)
    return float(eps) * (cfg.l2_scale if cfg.l2_scale is not None else math.sqrt(dim / 12))


def eps_label(eps: float) -> str:
    """'8/255' when ε·255 is (nearly) an integer, else ε with 6 significant digits."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:.6g}"


# ------------------------------------------------------------------------------------------------ input checks


def check_eps(eps: float) -> float:
    try:
        e = float(eps)
    except (TypeError, ValueError):
        raise AttackInputError(f"eps must be a number, got {eps!r}") from None
    if not math.isfinite(e) or e < 0:
        raise AttackInputError(f"eps must be finite and >= 0, got {eps!r}")
    return e


def check_images(x, labels, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """x: float N×C×H×W (N ≥ 1), finite, in [0, 1]; labels: N integers in [0, num_classes).
    Returns (float32 x, int64 y); an ArqError subclass names the problem otherwise."""
    x = rm.check_images(x)
    if len(x) == 0:
        raise AttackInputError("images: the batch is empty")
    y = rm.check_labels(labels, len(x))
    if y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
        raise AttackInputError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    return x, y


# ------------------------------------------------------------------------------------------------ torch plumbing


def _device(model):
    import torch

    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def seeded(seed: int):
    """torch's RNG seeded with `seed` inside, the caller's RNG state (CPU, and CUDA when initialised) restored."""
    import torch

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed) & 0x7FFFFFFF)
        yield


@contextlib.contextmanager
def _frozen(model):
    """Parameters without gradients (attacks need ∇ₓ only), eval mode; both restored afterwards."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    training = model.training
    for p in params:
        p.requires_grad_(False)
    model.eval()
    try:
        yield model
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(training)


def runner_module(runner):
    """A Runner as a torch nn.Module: forward(x N×C×H×W tensor) = torch.from_numpy(runner(x.numpy())), logits N×K.

    No gradient flows (black-box attacks only). A zero-size parameter tells torchattacks the device (CPU)."""
    import torch
    import torch.nn as nn

    class RunnerModule(nn.Module):
        def __init__(self, r):
            super().__init__()
            self.runner = r
            self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

        def forward(self, x):
            out = self.runner(x.detach().cpu().numpy().astype(np.float32, copy=False))
            return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(x.device)

    return RunnerModule(runner)


def job_seed(seed: int, *parts) -> int:
    """A 31-bit seed for one unit of work, a function of the run's seed and the unit's identity only."""
    return zlib.crc32("/".join(map(repr, (int(seed), *parts))).encode()) & 0x7FFFFFFF


def attack_batch(name: str, model, x, y, eps: float, cfg: AttackConfig | None = None, seed: int = 0,
                 num_classes: int | None = None):
    """Adversarial examples of attack `name` at nominal ε for a torch batch x (N×C×H×W in [0,1]) with labels y (N).

    `model` is a torch module (a Runner wrapped by `runner_module` for black-box attacks). Returns a detached tensor
    x' on x's device with ‖x' - x‖_p ≤ r (`attack_radius`) and x' ∈ [0, 1]; ε = 0 returns x itself."""
    import torch

    spec = get_attack(name)
    cfg = cfg or AttackConfig()
    r = attack_radius(name, check_eps(eps), cfg, int(x[0].numel()))
    if r == 0:
        return x.detach().clone()
    if num_classes is None:
        with torch.no_grad():
            num_classes = int(model(x[:1]).shape[-1])
    if num_classes < spec.min_classes:
        raise AttackInputError(f"attack {name} needs a model with at least {spec.min_classes} classes, this one has "
                               f"{num_classes}")
    with seeded(seed), _frozen(model):
        atk = spec.build(model, r, cfg, int(seed), int(num_classes))
        adv = atk(x, y)
    return _project(adv.detach(), x, r, spec.norm)


def _project(adv, x, r: float, norm: str):
    """Guard against float drift: clip x' - x back into the r-ball (L∞ or L2) and x' into [0, 1]."""
    import torch

    d = adv - x
    if norm == "Linf":
        d = d.clamp(-r, r)
    else:
        n = d.flatten(1).norm(dim=1).clamp_min(1e-12)
        d = d * torch.clamp(r / n, max=1.0).view(-1, *[1] * (d.dim() - 1))
    return (x + d).clamp(0.0, 1.0)


def _predict(model, xb):
    import torch

    with torch.no_grad():
        return model(xb).argmax(1)


# ------------------------------------------------------------------------------------------------ metrics


wcar = rm.wcar  # WCAR = min over attacks of the accuracy at one ε (certify/robust_metrics.py)


def _bits(mask) -> str:
    return "".join("1" if b else "0" for b in np.asarray(mask, bool))


def _unbits(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), np.uint8) == ord("1")


# ------------------------------------------------------------------------------------------------ the run


def attack_settings(x: np.ndarray, labels: np.ndarray, attacks, eps_list, seed: int, batch_size: int,
                    cfg: AttackConfig) -> dict:
    """What the rows depend on (pinned in the JSONL log's meta): data digest, attacks, ε list, seed, batch, budgets."""
    return {"check": "attacks", "images": int(len(x)), "data_sha256": rm.data_digest(x, labels),
            "attacks": list(attacks), "eps": [float(e) for e in eps_list], "seed": int(seed),
            "batch_size": int(batch_size), **cfg.to_dict()}


def _open_log(log, settings: dict):
    """None, a path (a JsonlLog with `settings` as meta is opened), or a JsonlLog whose meta holds `settings`."""
    import json

    if log is None or isinstance(log, JsonlLog):
        if log is not None:
            want = json.loads(json.dumps(settings, sort_keys=True))
            diff = sorted(k for k, v in want.items() if log.meta.get(k) != v)
            if diff:
                raise ResultLogMismatchError(f"{log.path} was written with other attack settings ({', '.join(diff)} "
                                             "differ): rerun with the same settings or pick another --out")
        return log
    return JsonlLog(log, settings)


def _jobs(attacks, eps_list) -> list[tuple[str, float]]:
    return [("clean", 0.0)] + [(a, e) for a in attacks for e in eps_list]


def job_key(attack: str, eps: float) -> str:
    return "clean" if attack == "clean" else f"{attack}@{eps:.10g}"


def run_attacks(torch_model, runner, x, labels, attacks=DEFAULT_ATTACKS, eps_list=(2 / 255, 8 / 255), seed: int = 0,
                log=None, batch_size: int = 100, progress: bool = False, cfg: AttackConfig | None = None) -> list[dict]:
    """One row per (attack, ε) plus a "clean" row, each appended to `log` as soon as it is done (resumable).

    torch_model: the torch fake-quant model (white-box gradients); runner: the deployed Runner (numpy N×C×H×W ->
    logits N×K). x: float32 N×C×H×W in [0, 1]; labels: N ints. `log`: None, a path, or a JsonlLog (see `_open_log`).
    Row: attack, eps, norm, radius, crafted_on ("torch" for white-box, "runner" for Square), torch_accuracy and
    runner_accuracy on the adversarial examples, agreement (fraction of equal torch/runner predictions), the
    per-image correctness as '0'/'1' strings (torch_correct, runner_correct), max_dist (largest ‖x'-x‖_p seen),
    seconds. Rows already in the log are returned as logged, not recomputed."""
    cfg = cfg or AttackConfig()
    for a in attacks:
        get_attack(a)
    eps_list = [check_eps(e) for e in eps_list]
    if not attacks or not eps_list:
        raise AttackInputError("give at least one attack and one eps")
    if int(batch_size) < 1:
        raise AttackInputError(f"batch size must be >= 1, got {batch_size}")
    k = int(runner.num_classes)
    x, y = check_images(x, labels, k)
    log = _open_log(log, attack_settings(x, y, attacks, eps_list, seed, batch_size, cfg))
    todo = [j for j in _jobs(attacks, eps_list) if log is None or job_key(*j) not in log]
    rows = {}

    n_batches = math.ceil(len(x) / batch_size)
    with progress_bar("attacks", total=len(todo) * n_batches, enabled=progress) as (bar, task):
        for attack, eps in todo:
            bar.update(task, info=f"{attack} ε={eps_label(eps)}")
            row = _run_job(torch_model, runner, x, y, attack, eps, seed, batch_size, cfg, k,
                           lambda: bar.update(task, advance=1))
            rows[job_key(attack, eps)] = log.append(job_key(attack, eps), row) if log is not None else row
    return [rows.get(job_key(*j)) or log.get(job_key(*j)) for j in _jobs(attacks, eps_list)]


def _run_job(torch_model, runner, x, y, attack, eps, seed, batch_size, cfg, k, tick) -> dict:
    import torch

    t0 = time.perf_counter()
    dev = _device(torch_model)
    spec = ATTACKS.get(attack)
    white = spec is None or spec.white_box  # "clean" is evaluated like a white-box row
    target = torch_model if white else runner_module(runner)
    tc, rc, same, dist = [], [], [], 0.0
    for b, i in enumerate(range(0, len(x), batch_size)):
        xb = torch.from_numpy(x[i : i + batch_size]).to(dev)
        yb = torch.from_numpy(y[i : i + batch_size]).to(dev)
        if attack == "clean":
            adv = xb
        else:
            adv = attack_batch(attack, target, xb, yb, eps, cfg, job_seed(seed, attack, eps, b), k)
            d = (adv - xb).flatten(1)
            dist = max(dist, float((d.abs().amax(1) if spec.norm == "Linf" else d.norm(dim=1)).max()))
        with torch.no_grad(), _frozen(torch_model):
            tp = _predict(torch_model, adv).cpu().numpy()
        rp = np.asarray(runner(adv.detach().cpu().numpy())).argmax(1)
        tc.append(tp == y[i : i + batch_size])
        rc.append(rp == y[i : i + batch_size])
        same.append(tp == rp)
        tick()
    tc, rc, same = np.concatenate(tc), np.concatenate(rc), np.concatenate(same)
    norm = spec.norm if spec else "none"
    return {"attack": attack, "eps": float(eps), "eps_label": eps_label(eps), "norm": norm,
            "radius": attack_radius(attack, eps, cfg, int(x[0].size)) if spec else 0.0,
            "crafted_on": "none" if spec is None else ("torch" if white else "runner"), "images": int(len(x)),
            "torch_accuracy": float(tc.mean()), "runner_accuracy": float(rc.mean()),
            "agreement": float(same.mean()),
            "torch_correct": _bits(tc), "runner_correct": _bits(rc), "max_dist": dist,
            "seconds": round(time.perf_counter() - t0, 3)}


# ------------------------------------------------------------------------------------------------ gradient masking


def _ce_and_correct(model, adv, yb):
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(adv)
        return F.cross_entropy(logits, yb, reduction="sum").item(), int((logits.argmax(1) == yb).sum())


def _evaluate(model, x, y, attack, eps, cfg, seed, batch_size, k) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` on attack(x) at nominal ε, attacking `model` itself."""
    import torch

    dev = _device(model)
    loss, correct = 0.0, 0
    for b, i in enumerate(range(0, len(x), batch_size)):
        xb, yb = torch.from_numpy(x[i : i + batch_size]).to(dev), torch.from_numpy(y[i : i + batch_size]).to(dev)
        adv = attack_batch(attack, model, xb, yb, eps, cfg, job_seed(seed, "masking", attack, eps, cfg.steps, b), k)
        with _frozen(model):
            l, c = _ce_and_correct(model, adv, yb)
        loss, correct = loss + l, correct + c
    return loss / len(x), correct / len(x)


def _zero_grad_fraction(model, x, y, batch_size) -> float:
    """Fraction of images whose input gradient ∇ₓ CE is exactly zero (shattered / saturated gradients)."""
    import torch
    import torch.nn.functional as F

    dev, zero = _device(model), 0
    with _frozen(model):
        for i in range(0, len(x), batch_size):
            xb = torch.from_numpy(x[i : i + batch_size]).to(dev).requires_grad_(True)
            yb = torch.from_numpy(y[i : i + batch_size]).to(dev)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xb), yb, reduction="sum"), xb)
            zero += int((g.flatten(1).abs().amax(1) == 0).sum())
    return zero / len(x)


def _rising(values: list[tuple[float, float]], what: str, tol: float) -> list[str]:
    """Reasons where the loss falls from one ladder rung (setting, loss) to the next by more than tol·max(1, |L|)."""
    out = []
    for (s0, l0), (s1, l1) in zip(values, values[1:]):
        if l1 < l0 - tol * max(1.0, abs(l0)):
            out.append(f"PGD loss falls with larger {what}: {l0:.4f} at {s0} -> {l1:.4f} at {s1}")
    return out


def gradient_masking_check(model, x, y, eps: float, *, cfg: AttackConfig | None = None, steps=(5, 10, 20),
                           eps_factors=(0.0, 0.25, 0.5, 1.0, 2.0), large_eps: float = 64 / 255,
                           large_eps_max_acc: float = 0.05, acc_tol: float = 0.02, loss_tol: float = 0.05,
                           seed: int = 0, batch_size: int = 100, num_classes: int | None = None) -> dict:
    """Is white-box PGD on `model` (torch, N×C×H×W in [0,1] -> logits) a trustworthy attack at ε? Three tests:

    (a) the mean cross-entropy L of PGD's examples does not fall (beyond loss_tol·max(1, |L|)) with more steps
        (`steps`, each of size 2.5·ε/steps) nor with a larger radius (ε·`eps_factors`, at max(steps)), and it does
        rise from the smallest to the largest radius of that ladder;
    (b) black-box Square (cfg.square_queries queries) does not beat PGD: acc_Square ≥ min_steps acc_PGD - acc_tol;
    (c) PGD at `large_eps` (an essentially unbounded L∞ budget) drives accuracy to ≤ large_eps_max_acc.
    Returns {"passed", "reasons" (why it failed; empty when passed), the measured ladders and accuracies, and
    "zero_grad_fraction" (images with an exactly-zero input gradient; informational)}."""
    cfg = cfg or AttackConfig()
    eps, large_eps = check_eps(eps), check_eps(large_eps)
    if eps <= 0:
        raise AttackInputError("the gradient-masking check needs eps > 0")
    steps = sorted({int(s) for s in steps})
    x, y = check_images(x, y, num_classes)
    if num_classes is None:
        import torch

        with torch.no_grad():
            num_classes = int(model(torch.from_numpy(x[:1]).to(_device(model))).shape[-1])
    run = lambda atk, e, c: _evaluate(model, x, y, atk, e, c, seed, batch_size, num_classes)  # noqa: E731
    by_steps = [(s, *run("pgd", eps, dataclasses.replace(cfg, steps=s)))
                for s in steps]
    top = dataclasses.replace(cfg, steps=steps[-1])
    by_eps = [(f * eps, *(by_steps[-1][1:] if f == 1.0 else run("pgd", f * eps, top))) for f in sorted(eps_factors)]
    pgd_acc = min(a for _, _, a in by_steps)
    _, sq_acc = run("square", eps, cfg)
    _, big_acc = run("pgd", large_eps, top)
    reasons = _rising([(f"{s} steps", l) for s, l, _ in by_steps], "steps", loss_tol)
    reasons += _rising([(f"eps {eps_label(e)}", l) for e, l, _ in by_eps], "eps", loss_tol)
    if len(by_eps) > 1 and not by_eps[-1][1] > by_eps[0][1]:
        reasons.append(f"PGD does not raise the loss at all: {by_eps[0][1]:.4f} at eps {eps_label(by_eps[0][0])}, "
                       f"{by_eps[-1][1]:.4f} at eps {eps_label(by_eps[-1][0])} (flat: zero or shattered gradients)")
    if sq_acc < pgd_acc - acc_tol:
        reasons.append(f"black-box Square beats white-box PGD at eps {eps_label(eps)}: accuracy {sq_acc:.3f} < "
                       f"{pgd_acc:.3f} - {acc_tol}: the gradients are masked")
    if big_acc > large_eps_max_acc:
        reasons.append(f"PGD at eps {eps_label(large_eps)} leaves accuracy {big_acc:.3f} > {large_eps_max_acc}: an "
                       "unbounded attack should reach ~0 (gradients masked or too few steps)")
    return {"passed": not reasons, "reasons": reasons, "eps": eps, "images": int(len(x)),
            "loss_vs_steps": [{"steps": s, "loss": l, "accuracy": a} for s, l, a in by_steps],
            "loss_vs_eps": [{"eps": e, "loss": l, "accuracy": a} for e, l, a in by_eps],
            "pgd_accuracy": pgd_acc, "square_accuracy": sq_acc, "large_eps": large_eps,
            "large_eps_accuracy": big_acc, "zero_grad_fraction": _zero_grad_fraction(model, x, y, batch_size),
            "tolerances": {"loss": loss_tol, "accuracy": acc_tol, "large_eps_max_accuracy": large_eps_max_acc},
            "config": {**cfg.to_dict(), "steps": steps}}


# ------------------------------------------------------------------------------------------------ summary, entry


def summarize_attacks(rows: list[dict], masking: dict | None = None) -> dict:
    """{"clean": torch/runner accuracy and agreement, "wcar": per ε > 0 (label -> entry), "max_transfer_gap",
    "trusted", "masking"}. An entry holds WCAR on the Runner ("runner": all attacks, i.e. transferred white-box and
    Square on the Runner), WCAR in torch ("torch": white-box attacks) and the per-image worst cases ("union_runner",
    "union_torch"). `trusted` is True only when `masking` (a gradient_masking_check report) passed."""
    clean = next((r for r in rows if r["attack"] == "clean"), None)
    per_eps: dict[float, list[dict]] = {}
    for r in rows:
        if r["attack"] != "clean" and r["eps"] > 0:
            per_eps.setdefault(r["eps"], []).append(r)
    wc = {}
    for e, rs in sorted(per_eps.items()):
        white = [r for r in rs if r["crafted_on"] == "torch"]
        entry = {"eps": e, "attacks": [r["attack"] for r in rs],
                 "runner": wcar({r["attack"]: r["runner_accuracy"] for r in rs}),
                 "union_runner": float(np.logical_and.reduce([_unbits(r["runner_correct"]) for r in rs]).mean())}
        if white:
            entry["torch"] = wcar({r["attack"]: r["torch_accuracy"] for r in white})
            entry["union_torch"] = float(np.logical_and.reduce([_unbits(r["torch_correct"]) for r in white]).mean())
        wc[eps_label(e)] = entry
    gaps = [abs(r["torch_accuracy"] - r["runner_accuracy"]) for r in rows if r["crafted_on"] == "torch"]
    return {"clean": {k: clean[k] for k in ("torch_accuracy", "runner_accuracy", "agreement")} if clean else None,
            "wcar": wc, "max_transfer_gap": max(gaps) if gaps else None,
            "trusted": bool(masking and masking.get("passed")), "masking": masking}


def check_attacks(torch_model, runner, x, labels, attacks=DEFAULT_ATTACKS, eps_list=(2 / 255, 8 / 255),
                  seed: int = 0, log=None, batch_size: int = 100, progress: bool = False,
                  cfg: AttackConfig | None = None, masking_eps: float | None = None,
                  masking_images: int | None = 100, extra_meta: dict | None = None) -> dict:
    """The whole attack check: `run_attacks`, then `gradient_masking_check` on the torch model at masking_eps
    (default max(eps_list)) over the first `masking_images` images (logged as row "masking", so it resumes too),
    then `summarize_attacks`. `log`: None, a path or a JsonlLog (as in run_attacks); `extra_meta` (e.g. the
    artifact's sha256) is pinned in the log's meta beside the attack settings.
    Returns {"check": "attacks", "meta", "summary" (summarize_attacks), "rows" (without the per-image strings)}."""
    cfg = cfg or AttackConfig()
    x, y = check_images(x, labels, int(runner.num_classes))
    eps_list = [check_eps(e) for e in eps_list]
    if not attacks or not eps_list:
        raise AttackInputError("give at least one attack and one eps")
    m_eps = max(eps_list) if masking_eps is None else check_eps(masking_eps)
    n = len(x) if masking_images is None else max(1, min(int(masking_images), len(x)))
    meta = {**(extra_meta or {}), **attack_settings(x, y, attacks, eps_list, seed, batch_size, cfg),
            "masking_eps": m_eps, "masking_images": n}
    log = _open_log(log, meta)
    rows = run_attacks(torch_model, runner, x, y, attacks, eps_list, seed, log, batch_size, progress, cfg)
    masking = log.get("masking") if log is not None else None
    if masking is None:
        masking = gradient_masking_check(torch_model, x[:n], y[:n], m_eps, cfg=cfg, seed=seed,
                                         batch_size=batch_size, num_classes=int(runner.num_classes))
        if log is not None:
            masking = log.append("masking", masking)
    masking = {k: v for k, v in masking.items() if k != "key"}
    return {"check": "attacks", "meta": meta, "summary": summarize_attacks(rows, masking),
            "rows": [{k: v for k, v in r.items() if not k.endswith("_correct") and k != "key"} for r in rows]}


def plot_attacks(result: dict, path_png) -> None:
    """Accuracy vs nominal ε per attack (solid: deployed Runner, dashed: torch fake-quant), clean accuracy dotted,
    WCAR on the Runner in black; to a PNG written atomically. `result` is check_attacks' return value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, summary = result["rows"], result["summary"]
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for i, name in enumerate(dict.fromkeys(r["attack"] for r in rows if r["attack"] != "clean")):
        rs = sorted((r for r in rows if r["attack"] == name), key=lambda r: r["eps"])
        color = f"C{i % 10}"
        ax.plot([r["eps"] * 255 for r in rs], [r["runner_accuracy"] for r in rs], "o-", color=color, label=name)
        if rs[0]["crafted_on"] == "torch":
            ax.plot([r["eps"] * 255 for r in rs], [r["torch_accuracy"] for r in rs], "x--", color=color, alpha=0.6)
    w = sorted(summary["wcar"].values(), key=lambda e: e["eps"])
    ax.plot([e["eps"] * 255 for e in w], [e["runner"] for e in w], "s-", color="black", lw=2, label="WCAR")
    if summary["clean"]:
        ax.axhline(summary["clean"]["runner_accuracy"], color="gray", ls=":", label="clean")
    ax.set_xlabel("nominal L∞ ε (×1/255; L2 attacks use their recorded radius)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("attacks: " + ("trusted" if summary["trusted"] else "NOT trusted (gradient-masking check failed)"))
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path_png) as tmp:
        FigureCanvasAgg(fig).print_png(str(tmp))
