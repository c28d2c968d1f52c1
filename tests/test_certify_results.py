"""The resumable certification log, dataset certification, JSON summary and curve (arq_deploy.certify.results)."""

import json

import numpy as np
import pytest

from arq_deploy.certify.results import (
    COLUMN_LINE,
    CertifyLog,
    certified_accuracy_curve,
    certify_dataset,
    plot_curve,
    write_summary,
)
from arq_deploy.certify.smooth import ABSTAIN, Certificate, Smooth
from arq_deploy.certify.stats import summarize
from arq_deploy.core.errors import CertificationInputError
from arq_deploy.runtime.noise import input_seed

SHAPE = (1, 4, 4)
SIGMA, N0, N, ALPHA, SEED = 0.5, 20, 200, 0.01, 3
META = {"sigma": SIGMA, "n0": N0, "n": N, "alpha": ALPHA, "seed": SEED, "model": "toy-linear-3"}


class AffineRunner:
    """A real (tiny) 3-class base classifier: logits = x_flat @ W.T + b. Optionally raises KeyboardInterrupt at its
    `interrupt_at`-th call, as Ctrl-C would in the middle of a run."""

    name = "affine"
    input_shape = SHAPE
    num_classes = 3

    def __init__(self, interrupt_at=None):
        rng = np.random.default_rng(0)
        self.W, self.b = rng.normal(size=(3, 16)), rng.normal(size=3)
        self.calls, self.interrupt_at = 0, interrupt_at

    def __call__(self, x):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return (np.asarray(x, np.float64).reshape(len(x), -1) @ self.W.T + self.b).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(8, *SHAPE)).astype(np.float32)
    runner = AffineRunner()
    labels = [int(np.argmax(runner(xi[None])[0])) for xi in x]
    labels[2] = (labels[2] + 1) % 3  # one wrong label so that "correct" is not always 1
    return x, labels


def smooth(interrupt_at=None):
    return Smooth(AffineRunner(interrupt_at), 3, SIGMA, batch_size=64)


def key(c):
    """Everything of a certificate but its wall time."""
    return (c.idx, c.label, c.prediction, c.pa_lower, c.radius, c.count_a, c.n0, c.n)


def run(path, data, indices, sm=None):
    x, labels = data
    with CertifyLog(path, META) as log:
        return certify_dataset(sm or smooth(), x, labels, indices, N0, N, ALPHA, SEED, log, progress=False)


def test_certificate_row_round_trip():
    for c in (Certificate(4, 2, 2, 0.9876543210123, 1.2345678901234, 987, 100, 1000, 0.123456789),
              Certificate(5, 1, ABSTAIN, 0.41, 0.0, 410, 100, 1000, 2.5)):
        row = c.to_row()
        assert "\n" not in row and len(row.split("\t")) == len(COLUMN_LINE.split("\t"))
        assert Certificate.from_row(row) == c
    with pytest.raises(CertificationInputError):
        Certificate.from_row("1\t2\t3")


def test_new_log_has_meta_and_column_lines(tmp_path):
    path = tmp_path / "certify.tsv"
    with CertifyLog(path, META) as log:
        assert log.done_indices() == set() and log.certificates() == []
    lines = path.read_text().split("\n")
    assert lines[0].startswith("# ") and json.loads(lines[0][2:]) == META
    assert lines[1] == "idx\tlabel\tpredict\tradius\tcorrect\ttime\tpa_lower\tcount_a\tn0\tn"
    assert lines[2:] == [""]


def test_resume_after_kill_9(tmp_path, data):
    path = tmp_path / "certify.tsv"
    first = run(path, data, [0, 1, 2])
    assert [c.idx for c in first] == [0, 1, 2]
    # kill -9 in the middle of writing row 3: a partial line without newline.
    with open(path, "a") as f:
        f.write("3\t1\t1\t0.41")
    with CertifyLog(path, META) as log:
        assert log.done_indices() == {0, 1, 2}
        assert [key(c) for c in log.certificates()] == [key(c) for c in first]
    lines = path.read_text().split("\n")
    assert len(lines) == 2 + 3 + 1 and lines[-1] == "" and lines[-2].startswith("2\t")  # partial line gone
    everything = run(path, data, range(8))
    assert [c.idx for c in everything] == list(range(8))
    # The first three come from the log (same wall time as written), the rest were certified now.
    assert [c.seconds for c in everything[:3]] == [c.seconds for c in first]
    rows = path.read_text().split("\n")[2:-1]
    assert sorted(int(r.split("\t")[0]) for r in rows) == list(range(8))  # no index repeated or lost
    # The resumed run equals an uninterrupted run and certifying each input alone (per-input seeds).
    fresh = run(tmp_path / "fresh.tsv", data, range(8))
    assert [key(c) for c in everything] == [key(c) for c in fresh]
    x, labels = data
    alone = smooth().certify(x[6], N0, N, ALPHA, seed=input_seed(SEED, 6), label=labels[6], idx=6)
    assert key(alone) == key(fresh[6])
    assert not fresh[2].correct and sum(c.correct for c in fresh) >= 5


def test_ctrl_c_loses_nothing_already_appended(tmp_path, data):
    path = tmp_path / "certify.tsv"
    # Each certification calls the runner twice (selection: 20 samples, estimation: 200 in 4 batches of 64) = 5
    # calls; interrupting at call 13 stops inside the third input.
    with pytest.raises(KeyboardInterrupt):
        run(path, data, range(8), sm=smooth(interrupt_at=13))
    with CertifyLog(path, META) as log:
        assert log.done_indices() == {0, 1}
    assert [key(c) for c in run(path, data, range(8))] == [key(c) for c in run(tmp_path / "b.tsv", data, range(8))]


def test_meta_mismatch_and_foreign_files(tmp_path, data):
    path = tmp_path / "certify.tsv"
    run(path, data, [0])
    with pytest.raises(CertificationInputError, match="belongs to another run"):
        CertifyLog(path, META | {"sigma": 0.25})
    with pytest.raises(CertificationInputError, match="belongs to another run"):
        CertifyLog(path, META | {"extra": 1})
    other = tmp_path / "notes.tsv"
    other.write_text("hello\nworld\n")
    with pytest.raises(CertificationInputError, match="not a certification log"):
        CertifyLog(other, META)
    # The log's meta names n and seed: resuming it with other values is refused.
    x, labels = data
    with CertifyLog(path, META) as log:
        with pytest.raises(CertificationInputError, match="n=200"):
            certify_dataset(smooth(), x, labels, [1], N0, 500, ALPHA, SEED, log, progress=False)
        with pytest.raises(CertificationInputError, match="indices"):
            certify_dataset(smooth(), x, labels, [8], N0, N, ALPHA, SEED, log, progress=False)
        with pytest.raises(CertificationInputError, match="already"):
            log.append(log.certificates()[0])


def test_progress_bar_run(tmp_path, data):
    certs = run_with_progress(tmp_path / "p.tsv", data)
    assert [c.idx for c in certs] == [1, 4]


def run_with_progress(path, data):
    x, labels = data
    with CertifyLog(path, META) as log:
        return certify_dataset(smooth(), x, labels, [4, 1, 4], N0, N, ALPHA, SEED, log, progress=True)


def test_write_summary_and_curve(tmp_path, data):
    certs = run(tmp_path / "certify.tsv", data, range(8))
    summary = summarize(certs)
    write_summary(tmp_path / "out" / "certificate.json", summary, META)
    saved = json.loads((tmp_path / "out" / "certificate.json").read_text())
    assert saved["meta"] == META
    assert saved["summary"]["count"] == 8 and saved["summary"]["acr"] == pytest.approx(summary.acr)
    assert saved["summary"]["certified_accuracy"]["0"] == pytest.approx(sum(c.correct for c in certs) / 8)
    png = tmp_path / "out" / "curve.png"
    plot_curve(certs, png, SIGMA)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["certificate.json", "curve.png"]  # no temp files
    with pytest.raises(CertificationInputError):
        plot_curve([], tmp_path / "empty.png", SIGMA)


def test_certified_accuracy_curve_values():
    certs = [Certificate(0, 1, 1, 0.9, 0.5, 90, 10, 100, 1.0), Certificate(1, 1, 1, 0.8, 0.2, 80, 10, 100, 1.0),
             Certificate(2, 1, 0, 0.9, 0.9, 90, 10, 100, 1.0), Certificate(3, 1, ABSTAIN, 0.3, 0.0, 30, 10, 100, 1.0)]
    curve = certified_accuracy_curve(certs, np.array([0.0, 0.2, 0.3, 0.5, 0.6]))
    np.testing.assert_allclose(curve, [0.5, 0.5, 0.25, 0.25, 0.0])
