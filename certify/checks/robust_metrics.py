"""Robustness metrics over corruption / systematic-noise / attack results, and the corruption heat map.

Notation: A_{c,s} is a model's top-1 accuracy on corruption c at severity s, E_{c,s} = 1 − A_{c,s} its error,
A_0 / E_0 its clean accuracy / error; a superscript ref marks the reference (float) model.

* CE_c = Σ_s E_{c,s} / Σ_s E^ref_{c,s};                 mCE = mean_c CE_c            (Hendrycks & Dietterich 2019)
* relCE_c = Σ_s (E_{c,s} − E_0) / Σ_s (E^ref_{c,s} − E^ref_0);   relative mCE = mean_c relCE_c
* mNR = mean_{c,s} (A_0 − A_{c,s}) / A_0: the mean natural-robustness *loss*, the fraction of the clean accuracy that
  the corruptions take away (0 = unaffected, 1 = everything lost). This is our statement of RobustMQ's natural-noise
  summary; the paper's own text was not available to check its exact formula, so it is recorded under this name with
  this definition (the JSON also carries the plain mean corrupted accuracy, `mean_accuracy`).
* ACC_s (systematic noise, RobustMQ) = mean_v A_v over the systematic variations v (the identity "reference" pipeline
  excluded); `acc_drop` = A_reference − ACC_s and `worst_drop` = A_reference − min_v A_v.
* WCAR = min_a A_a: the worst-case accuracy over a set of attacks a (at one ε).

Also: `JsonlLog` (re-exported from arq_deploy.core.resultlog, the append-only resumable result log), `check_images`,
`RobustnessInputError`, and `plot_heatmap` (corruption × severity accuracy PNG, written atomically).
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Iterable, Mapping

import numpy as np

from arq_deploy.core.errors import ArqError
from arq_deploy.core.fileio import atomic_path
from arq_deploy.core.resultlog import JsonlLog  # noqa: F401  (re-exported: the checks' result log)


class RobustnessInputError(ArqError):
    """Bad robustness-check input: images not N×C×H×W in [0, 1], NaN, bad severities, missing results."""


def check_images(x, what: str = "images") -> np.ndarray:
    """x as float32 N×C×H×W (C = 1 or 3), finite and inside [0, 1]; RobustnessInputError otherwise."""
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or min(x.shape[2:], default=0) < 2:
        raise RobustnessInputError(f"{what} must be N×C×H×W with C = 1 or 3 and H, W >= 2, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise RobustnessInputError(f"{what} must be float pixels in [0, 1], got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.size and not np.isfinite(x).all():
        raise RobustnessInputError(f"{what} contain NaN or infinite pixels")
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise RobustnessInputError(f"{what} must lie in [0, 1] (pixel space), got [{x.min():.4g}, {x.max():.4g}]")
    return x


def check_labels(labels, n: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise RobustnessInputError(f"labels must be {n} integers, got {y.dtype} of shape {y.shape}")
    return y.astype(np.int64)


def data_digest(x: np.ndarray, labels: np.ndarray) -> str:
    """16 hex digits of sha256 over the float32 images and int64 labels (pins a result log to its data)."""
    h = hashlib.sha256(np.ascontiguousarray(x, np.float32).tobytes())
    h.update(np.ascontiguousarray(labels, np.int64).tobytes())
    return h.hexdigest()[:16]


def open_log(log, meta: dict) -> JsonlLog | None:
    """A JsonlLog from a path (with `meta`), the given JsonlLog itself, or None for no log."""
    if log is None or isinstance(log, JsonlLog):
        return log
    return JsonlLog(os.fspath(log), meta)


# --------------------------------------------------------------------------------------------------- metrics


def _table(rows: Iterable[Mapping]) -> dict[str, dict[int, float]]:
    """{corruption: {severity: accuracy}} from rows with corruption / severity / accuracy."""
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        out.setdefault(str(r["corruption"]), {})[int(r["severity"])] = float(r["accuracy"])
    return out


def _paired(model: dict, ref: dict, names) -> list[str]:
    names = [n for n in (names if names is not None else model) if n in model]
    missing = [n for n in names if n not in ref or set(ref[n]) != set(model[n])]
    if missing:
        raise RobustnessInputError(f"the reference results lack (or have other severities for) {', '.join(missing)}; "
                                   "run the same corruptions and severities on the reference model")
    if not names:
        raise RobustnessInputError("no corruption results to summarise")
    return names


def corruption_errors(rows, ref_rows, names=None) -> dict[str, float]:
    """CE_c = Σ_s (1 − A_{c,s}) / Σ_s (1 − A^ref_{c,s}) per corruption c (over the severities both have)."""
    model, ref = _table(rows), _table(ref_rows)
    out = {}
    for c in _paired(model, ref, names):
        den = sum(1.0 - a for a in ref[c].values())
        out[c] = sum(1.0 - a for a in model[c].values()) / den if den > 0 else math.nan
    return out


def mce(rows, ref_rows, names=None) -> float:
    """mean_c CE_c (NaN when the reference makes no error at all on some corruption)."""
    return float(np.mean(list(corruption_errors(rows, ref_rows, names).values())))


def relative_mce(rows, ref_rows, clean_acc: float, ref_clean_acc: float, names=None) -> float:
    """mean_c Σ_s (E_{c,s} − E_0) / Σ_s (E^ref_{c,s} − E^ref_0) with E = 1 − accuracy."""
    model, ref = _table(rows), _table(ref_rows)
    vals = []
    for c in _paired(model, ref, names):
        den = sum(ref_clean_acc - a for a in ref[c].values())
        vals.append(sum(clean_acc - a for a in model[c].values()) / den if den != 0 else math.nan)
    return float(np.mean(vals))


def mnr(rows, clean_acc: float, names=None) -> float:
    """mean_{c,s} (A_0 − A_{c,s}) / A_0 (see the module docstring)."""
    if not clean_acc > 0:
        raise RobustnessInputError(f"mNR needs a clean accuracy > 0, got {clean_acc}")
    accs = [a for c, sev in _table(rows).items() if names is None or c in names for a in sev.values()]
    if not accs:
        raise RobustnessInputError("no corruption results to summarise")
    return float(np.mean([(clean_acc - a) / clean_acc for a in accs]))


def acc_s(accuracies: Mapping[str, float], reference: str = "reference") -> dict:
    """RobustMQ's systematic-noise summary from {variation: accuracy} (which holds the identity `reference`)."""
    if reference not in accuracies:
        raise RobustnessInputError(f"ACC_s needs the {reference!r} pipeline's accuracy")
    var = {k: float(v) for k, v in accuracies.items() if k != reference}
    if not var:
        raise RobustnessInputError("ACC_s needs at least one systematic variation besides the reference")
    ref = float(accuracies[reference])
    mean = float(np.mean(list(var.values())))
    worst = min(var, key=var.get)
    return {"acc_s": mean, "reference_accuracy": ref, "acc_drop": ref - mean, "worst": worst,
            "worst_accuracy": var[worst], "worst_drop": ref - var[worst]}


def wcar(accuracies: Mapping[str, float]) -> float:
    """Worst-case accuracy over attacks: min_a accuracy_a ({attack: accuracy}, at one ε)."""
    vals = [float(v) for v in accuracies.values()]
    if not vals:
        raise RobustnessInputError("WCAR needs at least one attack's accuracy")
    if any(not (0.0 <= v <= 1.0) for v in vals):
        raise RobustnessInputError(f"WCAR: accuracies must lie in [0, 1], got {accuracies}")
    return min(vals)


# --------------------------------------------------------------------------------------------------- heat map


def plot_heatmap(rows, path_png, title: str = "accuracy under corruption", clean_acc: float | None = None) -> None:
    """corruption (rows, in first-seen order) × severity (columns) accuracy heat map, to a PNG written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = _table(rows)
    if not table:
        raise RobustnessInputError("there are no corruption results to plot")
    names = list(table)
    sevs = sorted({s for v in table.values() for s in v})
    grid = np.array([[table[c].get(s, np.nan) for s in sevs] for c in names])
    fig = Figure(figsize=(1.2 + 0.75 * len(sevs), 0.9 + 0.3 * len(names)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(sevs)), [str(s) for s in sevs])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i, j in np.ndindex(grid.shape):
        if np.isfinite(grid[i, j]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if grid[i, j] < 0.6 else "black")
    ax.set_xlabel("severity")
    ax.set_title(title + (f" (clean {clean_acc:.3f})" if clean_acc is not None else ""), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, label="accuracy")
    fig.tight_layout()
    with atomic_path(path_png) as tmp:
        fig.savefig(tmp, format="png")


def plot_systematic(rows, path_png, title: str = "accuracy under systematic noise") -> None:
    """Horizontal bars: accuracy per systematic variation (rows with variation / accuracy), the reference dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = list(rows)
    if not rows:
        raise RobustnessInputError("there are no systematic-noise results to plot")
    names = [r["variation"] for r in rows]
    accs = [float(r["accuracy"]) for r in rows]
    fig = Figure(figsize=(6, 0.9 + 0.22 * len(rows)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh(range(len(rows)), accs, color=["tab:gray" if n == "reference" else "tab:blue" for n in names])
    if "reference" in names:
        ax.axvline(accs[names.index("reference")], color="k", ls="--", lw=0.8)
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1.02), xlabel="accuracy")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path_png) as tmp:
        fig.savefig(tmp, format="png")
