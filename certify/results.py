"""Certification results on disk: an append-only, resumable TSV log, a JSON summary and a certified-accuracy curve.

Log format (UTF-8):
    # {"alpha": 0.001, "n": 100000, ...}          <- the run's meta as one line of JSON (sorted keys)
    idx  label  predict  radius  correct  time  pa_lower  count_a  n0  n     <- tab-separated column names
    one `Certificate.to_row()` per line, each written whole, flushed and fsynced as soon as it is certified.
A crash can leave at most one partial last line (no newline); reopening truncates it away, and the run resumes with the
indices not yet in the file. Each input's noise seed is `input_seed(seed, idx)`, so a resumed run gives the same
certificates as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from arq_deploy.certify.smooth import COLUMNS, Certificate, Smooth
from arq_deploy.certify.stats import Summary
from arq_deploy.core.errors import CertificationInputError
from arq_deploy.core.fileio import atomic_path, write_json, write_text
from arq_deploy.core.validation import check_params
from arq_deploy.runtime.noise import input_seed

COLUMN_LINE = "\t".join(COLUMNS)


def _normalise_meta(meta: dict) -> dict:
    """meta as it reads back from JSON (tuples -> lists, ...); raises if it is not JSON-serialisable."""
    try:
        return json.loads(json.dumps(meta, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise CertificationInputError(f"certification meta must be JSON-serialisable: {e}") from None


def _truncate_partial_line(path: Path) -> bytes:
    """Cut everything after the last newline (a row interrupted mid-write) and return the remaining bytes."""
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return data[:keep]


def read_headed_lines(path: Path, data: bytes, column_line: str, kind: str, meta: dict, other: str,
                      hint: str) -> list[str]:
    """The lines of a '# {meta}' + column-line file (whole lines only), checked: UTF-8, both header lines, and a meta
    equal to `meta`; otherwise one clear CertificationInputError ("PATH <other>: meta differs in ...; <hint>")."""
    try:
        lines = data.decode("utf-8").split("\n")[:-1]
    except UnicodeDecodeError:
        raise CertificationInputError(f"{path} is not {kind} (not UTF-8 text)") from None
    if len(lines) < 2 or not lines[0].startswith("# ") or lines[1] != column_line:
        raise CertificationInputError(f"{path} is not {kind} (no '# meta' and matching column lines)")
    try:
        file_meta = json.loads(lines[0][2:])
    except ValueError:
        raise CertificationInputError(f"{path}: its meta line is not valid JSON") from None
    if file_meta != meta:
        diff = sorted(k for k in set(file_meta) | set(meta) if file_meta.get(k) != meta.get(k))
        raise CertificationInputError(
            f"{path} {other}: meta differs in {diff} "
            f"(file: {[file_meta.get(k) for k in diff]}, this run: {[meta.get(k) for k in diff]}); {hint}")
    return lines


class CertifyLog:
    """Append-only TSV of `Certificate`s for one run, identified by its `meta` dict; see the module docstring.

    Subclasses store richer certificates by overriding `cert_type` (with `to_row`/`from_row`) and `column_line`."""

    cert_type = Certificate
    column_line = COLUMN_LINE
    kind = "a certification log"

    def __init__(self, path: str | os.PathLike, meta: dict):
        self.path = Path(path)
        self.meta = _normalise_meta(meta)
        self._certs: dict[int, Certificate] = {}
        if self.path.exists() and self.path.stat().st_size > 0:
            self._load(_truncate_partial_line(self.path))
        else:
            # atomic: the header is never half-written
            write_text(self.path, "# " + json.dumps(self.meta, sort_keys=True) + "\n" + self.column_line + "\n")
        self._file = open(self.path, "a", encoding="utf-8")

    def _load(self, data: bytes) -> None:
        lines = read_headed_lines(self.path, data, self.column_line, self.kind, self.meta,
                                  "belongs to another run", "use another output path or the same settings")
        for line in lines[2:]:
            cert = self.cert_type.from_row(line)
            if cert.idx in self._certs:
                raise CertificationInputError(f"{self.path} holds input {cert.idx} twice (two runs wrote to it?)")
            self._certs[cert.idx] = cert

    def done_indices(self) -> set[int]:
        """Indices already certified in this log."""
        return set(self._certs)

    def certificates(self) -> list[Certificate]:
        """All certificates in the log, in the order they were written."""
        return list(self._certs.values())

    def append(self, cert: Certificate) -> None:
        """Write one whole row, then flush and fsync, so that it survives a crash right after this returns."""
        if cert.idx in self._certs:
            raise CertificationInputError(f"input {cert.idx} is already in {self.path}")
        self._file.write(cert.to_row() + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._certs[cert.idx] = cert

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "CertifyLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_run_matches_meta(meta: dict, **params) -> None:
    """A log whose meta names sigma/n0/n/alpha/seed must not be resumed with other values."""
    for key, value in params.items():
        if key in meta and meta[key] != value:
            raise CertificationInputError(f"the log's meta has {key}={meta[key]!r} but this run uses {key}={value!r}")


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("certify"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[acc]}"),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)


def _accuracy_text(certs: dict[int, Certificate]) -> str:
    if not certs:
        return "certified acc -"
    return f"certified acc {sum(c.correct for c in certs.values()) / len(certs):.3f}"


def certify_dataset(smooth: Smooth, x_all: np.ndarray, labels: Sequence[int], indices: Sequence[int], n0: int, n: int,
                    alpha: float, seed: int, log: CertifyLog, progress: bool = True,
                    randomized: bool = False) -> list[Certificate]:
    """CERTIFY x_all[i] (label labels[i]) for each i in `indices` not yet in `log`, appending each row as it finishes.

    Input i uses seed `input_seed(seed, i)`; randomized: the randomized Clopper-Pearson bound (`Smooth.certify`). Returns the certificates of all `indices` (old and new), sorted by index.
    An interruption (Ctrl-C, kill) loses only the input being certified at that moment.
    """
    n0, n, alpha = check_params(n0, n, alpha)
    _check_run_matches_meta(log.meta, sigma=smooth.sigma, n0=n0, n=n, alpha=alpha, seed=seed)
    wanted = sorted({int(i) for i in indices})
    if wanted and not (0 <= wanted[0] and wanted[-1] < min(len(x_all), len(labels))):
        raise CertificationInputError(f"indices must lie in [0, {min(len(x_all), len(labels))}), got {wanted[0]}"
                                      f"..{wanted[-1]}")
    wanted_set = set(wanted)
    done = {c.idx: c for c in log.certificates() if c.idx in wanted_set}
    todo = [i for i in wanted if i not in done]
    with _progress(progress) as bar:
        task = bar.add_task("certify", total=len(wanted), completed=len(done), acc=_accuracy_text(done))
        for i in todo:
            cert = smooth.certify(x_all[i], n0, n, alpha, seed=input_seed(seed, i), label=int(labels[i]), idx=i,
                                  randomized=randomized)
            log.append(cert)
            done[i] = cert
            bar.update(task, advance=1, acc=_accuracy_text(done))
    return [done[i] for i in wanted]


def write_summary(path_json: str | os.PathLike, summary: Summary, meta: dict) -> None:
    """Write {"meta": meta, "summary": summary.to_dict()} as JSON, atomically."""
    write_json(path_json, {"meta": _normalise_meta(meta), "summary": summary.to_dict()})


def certified_accuracy_curve(certs: Sequence[Certificate], radii: np.ndarray) -> np.ndarray:
    """acc(r) = (1/M)·#{correct and R ≥ r} for each r in `radii`."""
    correct = np.array([c.radius for c in certs if c.correct], dtype=np.float64)
    return (correct[None, :] >= np.asarray(radii, dtype=np.float64)[:, None]).sum(axis=1) / len(certs)


def plot_curve(certs: Sequence[Certificate], path_png: str | os.PathLike, sigma: float) -> None:
    """Plot certified accuracy against L2 radius (a step curve) to a PNG, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    certs = list(certs)
    if not certs:
        raise CertificationInputError("there are no certificates to plot")
    top = max([c.radius for c in certs] + [4.0 * sigma]) * 1.05
    radii = np.linspace(0.0, top, 400)
    fig = Figure(figsize=(5, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.step(radii, certified_accuracy_curve(certs, radii), where="post")
    ax.set(xlabel="L2 radius", ylabel="certified accuracy", ylim=(0, 1.02), xlim=(0, top),
           title=f"randomized smoothing, σ = {sigma:g}, {len(certs)} inputs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path_png) as tmp:
        fig.savefig(tmp, format="png")
