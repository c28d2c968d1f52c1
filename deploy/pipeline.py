"""Stage functions shared by the CLI and the demo: quantize+calibrate, export+validate, train, certify.

No click objects here; every function takes plain values and returns plain results.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arq_deploy.errors import ArqError, DataFormatError


@dataclass
class LoadedModel:
    name: str
    model: object  # torch.nn.Module (float, or fake-quant for a QAT checkpoint)
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    meta: dict  # checkpoint metadata (sigma, epochs, policy, ...)


def load(model_name: str, weights: str | None, num_classes: int = 10, input_shape=None) -> LoadedModel:
    """Build/load a model. A checkpoint written by `train --policy` is rebuilt as its fake-quant model."""
    import torch

    from arq_deploy.models import Normalize, load_model

    def as_trained(model, name, meta):  # a `train --policy` checkpoint holds the fake-quant model
        if meta.get("policy") is None:
            return model
        from arq_deploy.search.layers import extract_layer_specs
        from arq_deploy.search.policy import QuantPolicy
        from arq_deploy.search.quant import quantize_model

        specs = extract_layer_specs(model, _input_shape(name, meta, input_shape))
        return quantize_model(model, QuantPolicy.from_dict(meta["policy"]), specs)

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
    from arq_deploy.models import model_input_shape

    shape = given or meta.get("input_shape") or model_input_shape(name)
    if shape is None:
        raise ArqError(f"model {name!r}: give --input-shape C,H,W")
    return tuple(int(v) for v in shape)


def check_data_fits(ds, lm: LoadedModel) -> None:
    if tuple(ds.input_shape) != tuple(lm.input_shape):
        raise DataFormatError(f"data {ds.name} has images of shape {ds.input_shape}, the model {lm.name} expects "
                              f"{lm.input_shape}")


def quantize_calibrated(lm: LoadedModel, policy, calib_x: np.ndarray, sigma: float, seed: int = 0,
                        percentile: float = 99.99, copies: int = 1):
    """Fake-quant model with activation ranges calibrated on calib_x (+ σ-noise copies when σ > 0)."""
    import torch

    from arq_deploy.search.layers import extract_layer_specs
    from arq_deploy.search.quant import calibrate, calibration_batches, quantize_model

    specs = extract_layer_specs(lm.model, lm.input_shape)
    qmodel = quantize_model(lm.model, policy, specs)
    calibrate(qmodel, calibration_batches(torch.from_numpy(calib_x), sigma, copies=copies, seed=seed), percentile)
    return qmodel, specs


def pick(n_total: int, n: int, seed: int) -> np.ndarray:
    """n distinct indices of range(n_total), seeded, sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=min(n, n_total), replace=False))


def export_and_validate(lm: LoadedModel, policy, train_ds, test_ds, out: str | Path, sigma: float = 0.0,
                        calib_images: int = 512, validate_images: int = 1000, min_agreement: float = 0.99,
                        int4_weights: bool = False, seed: int = 0, report: str | Path | None = None) -> dict:
    """policy -> calibrated fake-quant model -> QDQ ONNX at `out` (atomically) -> onnxruntime vs torch check.

    Writes `report` (default: OUT with suffix .export.json) and returns its dict; raises ExportMismatchError (after
    writing nothing) when the agreement is below `min_agreement`."""
    from arq_deploy.export.qdq import export_qdq
    from arq_deploy.export.validate import compare_runners, require_agreement
    from arq_deploy.runners import OrtRunner, TorchRunner
    from arq_deploy.fileio import atomic_path, write_json

    check_data_fits(train_ds, lm)
    check_data_fits(test_ds, lm)
    t0 = time.perf_counter()
    if lm.meta.get("policy") is not None:  # a QAT checkpoint is already quantized and calibrated
        from arq_deploy.search.layers import extract_layer_specs
        from arq_deploy.search.policy import QuantPolicy

        policy = QuantPolicy.from_dict(lm.meta["policy"])
        qmodel, specs = lm.model, extract_layer_specs(lm.model, lm.input_shape)
        calibration = {"in_training": True}
    else:
        calib_x = train_ds.x(pick(len(train_ds), calib_images, seed))
        qmodel, specs = quantize_calibrated(lm, policy, calib_x, sigma, seed)
        calibration = {"images": len(calib_x), "noise_sigma": sigma, "percentile": 99.99, "seed": seed}
    resolved = policy.resolve(specs)
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
        "mean": list(lm.mean),
        "std": list(lm.std),
        "sigma": sigma,
        "calibration": calibration,
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
    result = {"onnx": str(out), **meta, "int4_weights": int4_weights, "export_seconds": round(t_export, 2),
              "validation": {"data": test_ds.name, **agreement.to_dict(), "min_agreement": min_agreement},
              "layers": [{"name": s.name, "macs": s.macs, "bits": str(resolved.bits(s.name))} for s in specs]}
    write_json(report or out.with_suffix(".export.json"), result)
    return result


def train(lm: LoadedModel, train_ds, sigma: float, epochs: int, lr: float = 0.01, batch_size: int = 128,
          seed: int = 0, policy=None, progress: bool = True, calib_images: int = 512):
    """Gaussian-noise-augmented training (x + σ·ε each step) with SGD + cosine LR; with a policy, quantization-aware
    (fake-quant with straight-through gradients, calibrated on noisy inputs first). Returns (model, history)."""
    import torch
    import torch.nn.functional as F

    from arq_deploy.progress import progress_bar

    check_data_fits(train_ds, lm)
    torch.manual_seed(seed)
    model = lm.model
    if policy is not None:
        model, _ = quantize_calibrated(lm, policy, train_ds.x(pick(len(train_ds), calib_images, seed)), sigma, seed)
    x_all = torch.from_numpy(train_ds.x())
    y_all = torch.from_numpy(train_ds.labels.astype(np.int64))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * max(1, len(x_all) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    history = []
    with progress_bar("train", total=steps, enabled=progress) as (bar, task):
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(len(x_all), generator=g)
            loss_sum, correct, seen = 0.0, 0, 0
            for i in range(0, len(perm) - batch_size + 1, batch_size):
                idx = perm[i : i + batch_size]
                xb = x_all[idx] + sigma * torch.randn(len(idx), *x_all.shape[1:], generator=g)
                out = model(xb)
                loss = F.cross_entropy(out, y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((out.argmax(1) == y_all[idx]).sum())
                seen += len(idx)
                bar.update(task, advance=1, info=f"epoch {epoch + 1}/{epochs} loss {loss_sum / seen:.3f}")
            history.append({"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "noisy_train_acc": correct / max(seen, 1)})
    return model.eval(), history


def save_checkpoint(path, model, lm: LoadedModel, sigma: float, epochs: int, policy=None, history=None) -> None:
    import io

    import torch

    from arq_deploy.fileio import write_bytes

    ckpt = {"state_dict": model.state_dict(), "arch": lm.name, "sigma": float(sigma), "epochs": int(epochs),
            "mean": list(lm.mean), "std": list(lm.std), "num_classes": lm.num_classes,
            "input_shape": list(lm.input_shape), "policy": policy.to_dict() if policy is not None else None,
            "history": json.dumps(history or [])}
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    write_bytes(path, buf.getvalue())


def make_runner(model_path: str, backend: str = "auto", lm: LoadedModel | None = None, batch_size: int = 500):
    """A Runner for an .onnx file (onnxruntime), an artifact directory (TVM), or a loaded torch model."""
    from arq_deploy.errors import UnknownNameError

    p = Path(model_path) if model_path else None
    if backend == "auto":
        backend = "torch" if lm is not None else ("tvm" if p is not None and p.is_dir() else "onnxruntime")
    if backend == "onnxruntime":
        from arq_deploy.runners import OrtRunner

        return OrtRunner(p, batch_size=batch_size)
    if backend == "tvm":
        from arq_deploy.tvm_runner import TvmRunner

        return TvmRunner(p)
    if backend == "torch":
        from arq_deploy.runners import TorchRunner

        if lm is None:
            raise ArqError("the torch backend needs --model/--weights")
        return TorchRunner(lm.model, lm.input_shape, lm.num_classes, batch_size=batch_size)
    raise UnknownNameError(f"unknown backend {backend!r}; known: auto, onnxruntime, tvm, torch")
