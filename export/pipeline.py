"""Stage functions shared by the CLI and the demo: quantize+calibrate, export+validate, train, certify.

No click objects here; every function takes plain values and returns plain results.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arq_deploy.core.errors import ArqError, DataFormatError
from arq_deploy.core.fileio import atomic_path, sha256_file, write_bytes, write_json
from arq_deploy.core.models import Normalize, load_model, model_input_shape
from arq_deploy.core.policy import QuantPolicy
from arq_deploy.core.progress import progress_bar
from arq_deploy.export.qdq import export_qdq
from arq_deploy.export.quantize.finetune import (
    StepContext,
    TrainConfig,
    TrainConfigError,
    frozen_teacher,
    training_loss,
)
from arq_deploy.export.quantize.layers import extract_layer_specs
from arq_deploy.export.quantize.quant import (
    calibrate,
    calibration_batches,
    float_layers,
    model_quantizer,
    quantize_model,
    tie_nudges,
)
from arq_deploy.export.quantize.quantizers import get_quantizer
from arq_deploy.export.validate import compare_runners, require_agreement
from arq_deploy.runtime.runners import OrtRunner, TorchRunner


@dataclass
class LoadedModel:
    name: str
    model: object  # torch.nn.Module (float, or fake-quant for a QAT checkpoint)
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    meta: dict  # checkpoint metadata (sigma, epochs, policy, ...)

    @property
    def policy(self) -> QuantPolicy | None:
        """The policy of a quantization-aware checkpoint (its model is the fake-quant one), else None."""
        p = self.meta.get("policy")
        return None if p is None else QuantPolicy.from_dict(p)


def load(model_name: str, weights: str | None, num_classes: int = 10, input_shape=None) -> LoadedModel:
    """Build/load a model. A checkpoint written by `train --policy` is rebuilt as its fake-quant model."""
    import torch

    def as_trained(model, name, meta):  # a `train --policy` checkpoint holds the fake-quant model
        if meta.get("policy") is None:
            return model

        shape = _input_shape(name, meta, input_shape)
        specs = extract_layer_specs(model, shape)
        method = meta.get("quantizer") or "percentile"  # the checkpoint's quantization method (train --quantizer)
        return quantize_model(model, QuantPolicy.from_dict(meta["policy"]), specs, method=method, input_shape=shape)

    model, meta = load_model(model_name, weights, num_classes, prepare=as_trained)
    model_name = meta.get("arch", model_name)
    shape = _input_shape(model_name, meta, input_shape)
    norm = next((m for m in model.modules() if isinstance(m, Normalize)), None)
    mean = tuple(norm.mean.flatten().tolist()) if norm is not None else tuple(meta.get("mean", ()))
    std = tuple(norm.std.flatten().tolist()) if norm is not None else tuple(meta.get("std", ()))
    with torch.no_grad():
        k = int(model.eval()(torch.zeros(1, *shape)).shape[-1])
    return LoadedModel(model_name, model.eval(), shape, k, mean, std, meta)


def _input_shape(name, meta, given):

    shape = given or meta.get("input_shape") or model_input_shape(name)
    if shape is None:
        raise ArqError(f"model {name!r}: give --input-shape C,H,W")
    return tuple(int(v) for v in shape)


def check_data_fits(ds, lm: LoadedModel) -> None:
    if tuple(ds.input_shape) != tuple(lm.input_shape):
        raise DataFormatError(f"data {ds.name} has images of shape {ds.input_shape}, the model {lm.name} expects "
                              f"{lm.input_shape}")


def quantize_calibrated(lm: LoadedModel, policy, calib_x: np.ndarray, sigma: float, seed: int = 0,
                        percentile: float = 99.99, copies: int = 1, method: str = "percentile",
                        skip_unsupported: bool = False):
    """Fake-quant model with activation ranges calibrated on calib_x (+ σ-noise copies when σ > 0).

    `method` names the quantizer (export/quantize/quantizers.py: percentile, minmax, pwlq, dorefa, pact, lsq); learnable ones
    (pact, lsq) start from the calibration. A layer the quantizer cannot take raises UnsupportedOpError, or with
    `skip_unsupported` stays in float (a warning names it). Returns (qmodel, specs)."""
    import torch

    specs = extract_layer_specs(lm.model, lm.input_shape)
    qmodel = quantize_model(lm.model, policy, specs, method=method, skip_unsupported=skip_unsupported,
                            input_shape=lm.input_shape)
    calibrate(qmodel, calibration_batches(torch.from_numpy(calib_x), sigma, copies=copies, seed=seed), percentile)
    return qmodel, specs


def pick(n_total: int, n: int, seed: int) -> np.ndarray:
    """n distinct indices of range(n_total), seeded, sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=min(n, n_total), replace=False))


def export_and_validate(lm: LoadedModel, policy, train_ds, test_ds, out: str | Path, sigma: float = 0.0,
                        calib_images: int = 512, validate_images: int = 1000, min_agreement: float = 0.99,
                        int4_weights: bool = False, seed: int = 0, report: str | Path | None = None,
                        method: str | None = None, skip_unsupported: bool = False) -> dict:
    """policy -> calibrated fake-quant model -> QDQ ONNX at `out` (atomically) -> onnxruntime vs torch check.

    `method`: the quantizer (export/quantize/quantizers.py; default percentile, or a QAT checkpoint's own, which a different
    name contradicts: ArqError). A layer the quantizer cannot take raises UnsupportedOpError naming it; with
    `skip_unsupported` it stays in float (a warning names it) and the report lists it under "float_layers" (the
    metadata's policy gives it no bits). Writes `report` (default: OUT with suffix .export.json, with "quantizer") and
    returns its dict; raises ExportMismatchError (after writing nothing) when the agreement is below `min_agreement`."""

    check_data_fits(train_ds, lm)
    check_data_fits(test_ds, lm)

    if method is not None:
        get_quantizer(method)  # unknown names fail first
    t0 = time.perf_counter()
    if lm.policy is not None:  # a QAT checkpoint is already quantized and calibrated
        trained = lm.meta.get("quantizer") or "percentile"
        if method is not None and method != trained:
            raise ArqError(f"the checkpoint was trained with quantizer {trained!r}; drop --quantizer {method} or "
                           f"export the float model")
        import torch

        from arq_deploy.export.quantize.quant import break_ties, calibration_batches

        policy = lm.policy
        qmodel, specs = lm.model, extract_layer_specs(lm.model, lm.input_shape)
        # training can drift a scale onto its input's integer lattice: nudge it off (export/quantize/quant.break_ties)
        calib_x = torch.from_numpy(train_ds.x(pick(len(train_ds), calib_images, seed)))
        break_ties(qmodel, calibration_batches(calib_x, sigma, seed=seed))
        calibration = {"in_training": True}
    else:
        calib_x = train_ds.x(pick(len(train_ds), calib_images, seed))
        method = method or "percentile"
        qmodel, specs = quantize_calibrated(lm, policy, calib_x, sigma, seed, method=method,
                                            skip_unsupported=skip_unsupported)
        calibration = {"images": len(calib_x), "noise_sigma": sigma,
                       "percentile": None if method == "minmax" else 99.99, "seed": seed}
    skipped = float_layers(qmodel)
    resolved = policy.resolve(specs)
    if skipped:  # the policy as deployed: the layers left in float get no bits
        resolved = QuantPolicy(layers={n: b for n, b in resolved.layers.items() if n not in skipped})
    meta = {
        "format_version": 1,
        "model": lm.name,
        "policy": resolved.to_dict(),
        "policy_summary": resolved.describe(),
        "bops": resolved.bops(specs),
        "bops_fraction": resolved.bops_fraction(specs),
        "macs": sum(s.macs for s in specs),
        "input_shape": list(lm.input_shape),
        "num_classes": lm.num_classes,
        # the data's class names, so that `predict` answers with them (an image folder's names, sorted)
        "classes": list(train_ds.classes) if len(train_ds.classes) == lm.num_classes else None,
        "mean": list(lm.mean),
        "std": list(lm.std),
        "sigma": sigma,
        "quantizer": model_quantizer(qmodel),
        "calibration": {**calibration, "tie_nudges": tie_nudges(qmodel)},
    }
    model = export_qdq(qmodel, lm.input_shape, meta, int4_weights=int4_weights)
    t_export = time.perf_counter() - t0
    out = Path(out)
    with atomic_path(out) as tmp:
        import onnx

        onnx.save(model, str(tmp))
        vidx = pick(len(test_ds), validate_images, seed)
        ort_runner = OrtRunner(tmp, providers=["CPUExecutionProvider"])
        agreement = compare_runners(TorchRunner(qmodel, lm.input_shape, lm.num_classes), ort_runner,
                                    test_ds.x(vidx), test_ds.labels[vidx], sigma=sigma, seed=seed)
        require_agreement(agreement, min_agreement, f"export of {lm.name} {resolved.describe()}")
    result = {"onnx": str(out), **meta, "float_layers": skipped, "int4_weights": int4_weights,
              "export_seconds": round(t_export, 2),
              "validation": {"data": test_ds.name, **agreement.to_dict(), "min_agreement": min_agreement},
              "layers": [{"name": s.name, "macs": s.macs, "bits": str(resolved.bits(s.name))} for s in specs]}
    result["torch_model"] = str(save_paired_qmodel(out, qmodel, lm, sigma, resolved, meta["quantizer"]))
    write_json(report or out.with_suffix(".export.json"), result)
    return result


def save_paired_qmodel(onnx_path: Path, qmodel, lm: LoadedModel, sigma: float, policy, quantizer: str) -> Path:
    """Write the calibrated fake-quant torch model beside its ONNX export as NAME.qmodel.pt (white-box attacks on the
    deployed model need its gradients; see arq_deploy.app.checks). It records the ONNX file's sha256, so a checkpoint
    that belongs to another export is refused."""

    path = onnx_path.with_suffix(".qmodel.pt")
    training = {k: lm.meta[k] for k in ("mode", "eps", "teacher", "init") if lm.meta.get(k) is not None}
    save_checkpoint(path, qmodel, lm, sigma, int(lm.meta.get("epochs") or 0), policy=policy, history=None,
                    training={**training, "quantizer": quantizer, "onnx_sha256": sha256_file(onnx_path)})
    return path


def train(lm: LoadedModel, train_ds, sigma: float, epochs: int, lr: float = 0.01, batch_size: int = 128,
          seed: int = 0, policy=None, progress: bool = True, calib_images: int = 512, mode: str = "gaussian",
          eps: float = 8 / 255, pgd_steps: int = 7, pgd_step_size: float | None = None, teacher=None,
          temperature: float = 4.0, clean_weight: float = 0.0, quantizer: str | None = None):
    """Train or fine-tune lm.model (in place) with SGD (Nesterov, weight decay 5e-4) and a one-cycle LR.

    `mode` picks the loss (export/quantize/finetune.py): "vanilla" CE on x; "gaussian" CE on x + σ·ε; "pgd" CE on L∞ PGD
    examples (eps, pgd_steps, pgd_step_size; Madry et al.); "distill" ARD from `teacher` (a LoadedModel or torch
    module; temperature, clean_weight). With a `policy`, quantization-aware: the fake-quant model (straight-through
    gradients; `quantizer` names the quantization method) is calibrated first (on x + σ·ε in mode gaussian, else on
    clean x) and trained in the same mode. Returns (model in eval mode, history: one dict per epoch with the mode,
    eps, teacher, quantizer, mean loss and accuracy on the training inputs of that mode)."""
    import torch

    cfg = TrainConfig(mode, sigma, eps, pgd_steps, pgd_step_size, temperature, clean_weight, quantizer)
    cfg.check_teacher(teacher is not None)
    if quantizer is not None and policy is None:
        raise TrainConfigError("a quantizer applies to quantization-aware training: give a policy (--bits/--policy)")
    check_data_fits(train_ds, lm)
    torch.manual_seed(seed)
    teacher_model = frozen_teacher(teacher, lm.input_shape, lm.num_classes) if teacher is not None else None
    model = lm.model
    if policy is not None:
        from arq_deploy.export.quantize.quantizers import DEFAULT_QUANTIZER

        quantizer = quantizer or DEFAULT_QUANTIZER
        calib_x = train_ds.x(pick(len(train_ds), calib_images, seed))
        model, _ = quantize_calibrated(lm, policy, calib_x, cfg.sigma, seed, method=quantizer)
    x_all = torch.from_numpy(train_ds.x())
    y_all = torch.from_numpy(train_ds.labels.astype(np.int64))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * max(1, len(x_all) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    ctx = StepContext(cfg, g, teacher_model)
    record = {"mode": cfg.mode, "eps": cfg.to_dict()["eps"], "teacher": _teacher_name(teacher), "quantizer": quantizer}
    history = []
    with progress_bar(f"train ({cfg.mode})", total=steps, enabled=progress) as (bar, task):
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(len(x_all), generator=g)
            loss_sum, correct, seen = 0.0, 0, 0
            for i in range(0, len(perm) - batch_size + 1, batch_size):
                idx = perm[i : i + batch_size]
                loss, out = training_loss(model, x_all[idx], y_all[idx], ctx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((out.argmax(1) == y_all[idx]).sum())
                seen += len(idx)
                bar.update(task, advance=1, info=f"epoch {epoch + 1}/{epochs} loss {loss_sum / seen:.3f}")
            history.append({"epoch": epoch + 1, **record, "loss": loss_sum / max(seen, 1),
                            "train_acc": correct / max(seen, 1)})
    return model.eval(), history


def _teacher_name(teacher) -> str | None:
    if teacher is None:
        return None
    return getattr(teacher, "name", None) or type(getattr(teacher, "model", teacher)).__name__


CHECKPOINT_KEYS = ("state_dict", "arch", "sigma", "epochs", "mean", "std", "num_classes", "input_shape", "policy",
                   "history")


def save_checkpoint(path, model, lm: LoadedModel, sigma: float, epochs: int, policy=None, history=None,
                    training: dict | None = None) -> None:
    """Write a checkpoint (atomically): state dict + metadata that `load` reads back.

    `training` (JSON-able, e.g. TrainConfig.to_dict() plus teacher/init records) is stored as top-level keys: mode,
    eps, pgd_steps, pgd_step_size, temperature, clean_weight, quantizer, teacher, init. Without it, the mode, eps,
    teacher and quantizer come from the last history row (else mode = gaussian if sigma > 0 else vanilla)."""
    import io

    import torch

    if training is None:
        last = (history or [{}])[-1]
        training = {k: last[k] for k in ("mode", "eps", "teacher", "quantizer") if k in last}
        training.setdefault("mode", "gaussian" if sigma > 0 else "vanilla")
    clash = sorted(set(training) & set(CHECKPOINT_KEYS))
    if clash:
        raise ValueError(f"training metadata may not override checkpoint keys {clash}")
    ckpt = {"state_dict": model.state_dict(), "arch": lm.name, "sigma": float(sigma), "epochs": int(epochs),
            "mean": list(lm.mean), "std": list(lm.std), "num_classes": lm.num_classes,
            "input_shape": list(lm.input_shape), "policy": policy.to_dict() if policy is not None else None,
            "history": json.dumps(history or []), **training}
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    write_bytes(path, buf.getvalue())
