"""Validation of an exported ONNX model against the torch fake-quant model it came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from arq_deploy.core.errors import ExportMismatchError


@dataclass(frozen=True)
class Agreement:
    """Top-1 agreement and logit difference of two runners on the same images (clean and, if σ > 0, noisy)."""

    images: int
    top1_agreement: float
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    accuracy_reference: float | None
    accuracy_candidate: float | None
    noisy_top1_agreement: float | None = None
    sigma: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def compare_runners(reference, candidate, x: np.ndarray, labels: np.ndarray | None = None, sigma: float = 0.0,
                    seed: int = 0) -> Agreement:
    """Run both runners on x (N×C×H×W float32 in [0,1]) and, if σ > 0, on x + σ·ε."""
    lr, lc = reference(x), candidate(x)
    diff = np.abs(lr - lc)
    acc = (lambda l: float((l.argmax(1) == labels).mean())) if labels is not None else (lambda l: None)
    noisy = None
    if sigma > 0:
        rng = np.random.Generator(np.random.Philox(seed))
        xn = x + sigma * rng.standard_normal(x.shape, dtype=np.float32)
        noisy = float((reference(xn).argmax(1) == candidate(xn).argmax(1)).mean())
    return Agreement(images=len(x), top1_agreement=float((lr.argmax(1) == lc.argmax(1)).mean()),
                     max_abs_logit_diff=float(diff.max()), mean_abs_logit_diff=float(diff.mean()),
                     accuracy_reference=acc(lr), accuracy_candidate=acc(lc), noisy_top1_agreement=noisy,
                     sigma=sigma or None)


def require_agreement(a: Agreement, min_agreement: float, what: str) -> None:
    worst = min(v for v in (a.top1_agreement, a.noisy_top1_agreement) if v is not None)
    if worst < min_agreement:
        raise ExportMismatchError(
            f"{what}: top-1 agreement {worst:.4f} with the torch fake-quant model is below {min_agreement:.4f} "
            f"(max logit difference {a.max_abs_logit_diff:.3g})")
