"""Adversarial attacks (certify/attacks.py): closed-form success on a linear classifier with a known decision boundary,
the gradient-masking check on a deliberately masked model, transfer to a real onnxruntime artifact, Square on the
deployed Runner, resumption from a truncated log, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from arq_deploy.certify.checks import attacks as A
from arq_deploy.core.errors import ArqError, UnknownNameError
from arq_deploy.core.resultlog import ResultLogMismatchError

SHAPE = (3, 8, 8)
D = 3 * 8 * 8
FACTORS = np.array([0.3, 0.6, 0.8, 1.1, 1.5, 3.0] * 4)  # distance to the boundary in units of the attack radius


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny torch ops with 2 OpenMP threads on a loaded 2-core box are ~100× slower than with one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------- a known boundary


def linear_model(seed=0):
    """Binary logits [0, w·x + b] over flattened x: class 1 iff w·x + b > 0 (a hyperplane in [0,1]^D)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, generator=g) / D**0.5
    lin = nn.Linear(D, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([torch.zeros(D), w]))
        lin.bias.copy_(torch.tensor([0.0, float(-0.5 * w.sum())]))
    return nn.Sequential(nn.Flatten(), lin), w.numpy().astype(np.float64), float(-0.5 * w.sum())


def at_distance(w, b, dist, norm, seed=1):
    """Points at L∞ (or L2) distance `dist` from the hyperplane w·x + b = 0, alternating sides, labelled by side.

    The L∞ distance of x is |w·x + b| / ‖w‖₁ (nearest point x - z·sign(w)/‖w‖₁), the L2 distance |w·x + b| / ‖w‖₂;
    points and their nearest boundary points stay in [0.1, 0.9]^D, so the box [0, 1] does not change the distance."""
    rng = np.random.default_rng(seed)
    n = len(dist)
    x0 = rng.uniform(0.4, 0.6, (n, D))
    side = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    direction, scale = (np.sign(w), np.abs(w).sum()) if norm == "Linf" else (w / np.linalg.norm(w), np.linalg.norm(w))
    t = (side * np.asarray(dist) * scale - (x0 @ w + b)) / scale
    x = x0 + t[:, None] * direction[None]
    nearest = x - (side * np.asarray(dist) * scale / scale)[:, None] * direction[None]
    assert min(x.min(), nearest.min()) > 0.1 and max(x.max(), nearest.max()) < 0.9
    return x.reshape(n, *SHAPE).astype(np.float32), (side > 0).astype(np.int64)


class RoundInput(nn.Module):
    """A deliberately masked model: inputs rounded to 8 bits by torch.round (no straight-through gradient), so
    ∇ₓ = 0 everywhere while the decision function is (nearly) unchanged."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 255) / 255)


def _adv(name, model, x, y, eps, **cfg):
    return A.attack_batch(name, model, torch.from_numpy(x), torch.from_numpy(y), eps, A.AttackConfig(**cfg), seed=0)


def _flipped(model, adv, y):
    with torch.no_grad():
        return model(adv).argmax(1).numpy() != y


@pytest.mark.parametrize("name,norm,eps", [("pgd", "Linf", 0.05), ("pgd-l2", "L2", 0.3)])
def test_pgd_flips_exactly_the_inputs_closer_than_eps(name, norm, eps):
    model, w, b = linear_model()
    x, y = at_distance(w, b, FACTORS * eps, norm)
    adv = _adv(name, model, x, y, eps, l2_scale=1.0)
    flipped = _flipped(model, adv, y)
    assert flipped[FACTORS < 1].all()  # the attack finds every boundary crossing inside the ball ...
    assert not flipped[FACTORS > 1].any()  # ... and none exists outside it
    d = (adv - torch.from_numpy(x)).flatten(1)
    size = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
    assert float(size.max()) <= eps * (1 + 1e-5) and adv.min() >= 0 and adv.max() <= 1
    if norm == "Linf":  # PGD on a linear model ends at the ball's vertex x - ε·s·sign(w), s = +1 for class 1
        s = np.where(y == 1, 1.0, -1.0)[:, None]
        vertex = x.reshape(len(x), -1) - eps * s * np.sign(w)[None]
        assert np.abs(adv.numpy().reshape(len(x), -1) - vertex).max() < 1e-6


def test_fgsm_is_the_closed_form_step_including_the_box():
    """FGSM: x' = clip(x + ε·sign(∇ₓ CE), 0, 1); for logits [0, z], ∇ₓ CE = (p₁ - y)·w: x' = clip(x - ε·s·sign(w))."""
    model, w, _ = linear_model()
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (16, *SHAPE)).astype(np.float32)  # pixels near 0 and 1: the clip binds
    x[0] = 0.0
    x[1] = 1.0
    y = rng.integers(0, 2, 16)
    adv = _adv("fgsm", model, x, y, 0.1).numpy().reshape(16, -1)
    s = np.where(y == 1, 1.0, -1.0)[:, None]
    want = np.clip(x.reshape(16, -1) - 0.1 * s * np.sign(w)[None], 0, 1)
    assert np.abs(adv - want).max() < 1e-6


def test_attacks_are_seeded_and_leave_the_global_rng_alone():
    model, w, b = linear_model()
    masked = RoundInput(model)  # zero gradient: PGD's output is its seeded random start
    x, y = at_distance(w, b, FACTORS * 0.05, "Linf")
    run = lambda seed: A.attack_batch("pgd", masked, torch.from_numpy(x), torch.from_numpy(y), 0.05,  # noqa: E731
                                      A.AttackConfig(steps=2), seed=seed)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = run(7)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(a, run(7)) and not torch.equal(a, run(8))
    assert 0 < float((a - torch.from_numpy(x)).abs().max()) <= 0.05


def test_masking_check_catches_a_masked_model_and_passes_an_honest_one():
    model, w, b = linear_model()
    x, y = at_distance(w, b, FACTORS * 0.05, "Linf")
    cfg = A.AttackConfig(square_queries=300)
    honest = A.gradient_masking_check(model, x, y, 0.05, cfg=cfg)
    assert honest["passed"] and honest["reasons"] == []
    assert honest["pgd_accuracy"] == pytest.approx(0.5)  # exactly the FACTORS < 1 half flips
    assert honest["square_accuracy"] >= honest["pgd_accuracy"] and honest["large_eps_accuracy"] == 0.0
    losses = [r["loss"] for r in honest["loss_vs_eps"]]
    assert losses == sorted(losses)

    masked = A.gradient_masking_check(RoundInput(model), x, y, 0.05, cfg=cfg)
    assert not masked["passed"]
    assert masked["pgd_accuracy"] == 1.0 and masked["square_accuracy"] < 0.9  # Square sees through the masking
    assert any("Square beats white-box PGD" in r for r in masked["reasons"])
    assert any("64/255" in r for r in masked["reasons"])
    assert masked["zero_grad_fraction"] == 1.0


def test_wcar_and_labels():
    assert A.wcar({"pgd": 0.4, "square": 0.55, "fgsm": 0.5}) == 0.4
    with pytest.raises(ArqError):
        A.wcar({})
    assert A.eps_label(8 / 255) == "8/255" and A.eps_label(0.1) == "0.1"
    cfg = A.AttackConfig()
    assert A.attack_radius("pgd-l2", 8 / 255, cfg, 3 * 32 * 32) == pytest.approx(16 * 8 / 255)
    assert A.attack_radius("pgd", 8 / 255, cfg, 3 * 32 * 32) == 8 / 255


def test_bad_input_is_refused_with_one_clear_line():
    model, w, b = linear_model()
    x, y = at_distance(w, b, FACTORS[:4] * 0.05, "Linf")
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with pytest.raises(UnknownNameError, match="known: fgsm, pgd"):
        A.attack_batch("cw", model, xt, yt, 0.1)
    with pytest.raises(ArqError, match=">= 0"):
        A.attack_batch("pgd", model, xt, yt, -1 / 255)
    with pytest.raises(ArqError, match="at least 4 classes"):
        A.attack_batch("autoattack", model, xt, yt, 0.1)
    with pytest.raises(ArqError, match=">= 1"):
        A.AttackConfig(steps=0)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    runner = _TorchRunner(model)
    for xs, ys, msg in ((bad, y, "NaN"), (x + 0.5, y, r"\[0, 1\]"), (x[0], y, "N×C×H×W"), (x, y[:2], "labels"),
                        (x, y + 5, "labels must lie")):
        with pytest.raises(ArqError, match=msg):
            A.run_attacks(model, runner, xs, ys, ["pgd"], [0.1])
    with pytest.raises(UnknownNameError):
        A.run_attacks(model, runner, x, y, ["pgd", "nope"], [0.1])
    with pytest.raises(ArqError, match=">= 0"):
        A.run_attacks(model, runner, x, y, ["pgd"], [0.1, float("nan")])


def _TorchRunner(model):
    from arq_deploy.runtime.runners import TorchRunner

    return TorchRunner(model, SHAPE, 2)


def test_import_does_not_pull_in_torch():
    code = "import sys, arq_deploy.certify.checks.attacks as a; assert a.ATTACKS and 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------------------------------------- a deployed artifact


@pytest.fixture(scope="module")
def deployed(digits, digits_model, tmp_path_factory):
    """The digits CNN at W8A8 as a deployed pair: its torch fake-quant checkpoint (saved and loaded back, as
    `train --policy` writes it), the QDQ ONNX exported from exactly that model, onnxruntime on it, and 60 test images.
    Returns (torch model, OrtRunner, x, y, checkpoint path, onnx path)."""
    from arq_deploy.core.policy import QuantPolicy
    from arq_deploy.export.pipeline import export_and_validate, load, pick, quantize_calibrated, save_checkpoint
    from arq_deploy.runtime.runners import OrtRunner

    train_ds, test_ds = digits
    lm, _ = digits_model
    qmodel, specs = quantize_calibrated(lm, QuantPolicy.uniform(8), train_ds.x(pick(len(train_ds), 512, 0)), 0.25, 0)
    out = tmp_path_factory.mktemp("atk")
    save_checkpoint(out / "w8a8.pt", qmodel, lm, 0.25, 6, policy=QuantPolicy.uniform(8).resolve(specs))
    lq = load(None, str(out / "w8a8.pt"))
    export_and_validate(lq, None, train_ds, test_ds, out / "w8a8.onnx", sigma=0.25, validate_images=200)
    idx = pick(len(test_ds), 60, 1)
    ort = OrtRunner(out / "w8a8.onnx", providers=["CPUExecutionProvider"])
    return lq.model, ort, test_ds.x(idx), test_ds.labels[idx], out / "w8a8.pt", out / "w8a8.onnx"


TRANSFER_TOL = 0.05  # |torch accuracy - onnxruntime accuracy| on the same adversarial examples (3 of 60 images)


def test_white_box_examples_transfer_to_onnxruntime(deployed):
    qmodel, ort, x, y = deployed[:4]
    rows = A.run_attacks(qmodel, ort, x, y, ["fgsm", "pgd", "pgd-l2"], [0.1], seed=0, batch_size=32)
    clean = rows[0]
    assert clean["attack"] == "clean" and clean["torch_accuracy"] >= 0.9 and clean["agreement"] >= 0.98
    for r in rows[1:]:
        assert r["crafted_on"] == "torch" and r["images"] == 60
        assert abs(r["torch_accuracy"] - r["runner_accuracy"]) <= TRANSFER_TOL, r
        assert r["agreement"] >= 0.95
        assert r["max_dist"] <= r["radius"] * (1 + 1e-5)
    pgd = rows[2]
    assert pgd["runner_accuracy"] <= clean["runner_accuracy"] - 0.1  # the attack bites on the deployed model
    assert len(pgd["runner_correct"]) == 60 and pgd["runner_correct"].count("1") == round(60 * pgd["runner_accuracy"])


def test_square_runs_against_the_deployed_runner(deployed):
    qmodel, ort, x, y = deployed[:4]
    wrapped = A.runner_module(ort)
    with torch.no_grad():
        assert np.array_equal(wrapped(torch.from_numpy(x[:5])).numpy(), ort(x[:5]))
    rows = A.run_attacks(qmodel, ort, x, y, ["square"], [0.1], cfg=A.AttackConfig(square_queries=150))
    clean, sq = rows
    assert sq["crafted_on"] == "runner" and sq["max_dist"] <= 0.1 + 1e-6
    assert sq["runner_accuracy"] <= clean["runner_accuracy"] - 0.05
    assert abs(sq["torch_accuracy"] - sq["runner_accuracy"]) <= TRANSFER_TOL


def test_masking_check_flags_the_quantized_cnn_once_its_gradients_are_masked(deployed):
    """The deployed W8A8 CNN behind an input rounding without straight-through gradient: same predictions, ∇ₓ = 0."""
    qmodel, _, x, y = deployed[:4]
    masked = A.gradient_masking_check(RoundInput(qmodel), x[:30], y[:30], 0.1, cfg=A.AttackConfig(square_queries=100),
                                      steps=(5, 10), eps_factors=(0.0, 1.0))
    assert not masked["passed"] and masked["zero_grad_fraction"] == 1.0
    assert masked["square_accuracy"] < masked["pgd_accuracy"] - 0.02


def test_resume_from_a_truncated_log_gives_identical_rows(deployed, tmp_path):
    qmodel, ort, x, y = deployed[:4]
    log = tmp_path / "attacks.jsonl"
    args = (qmodel, ort, x, y, ["fgsm", "pgd"], [0.05, 0.1])
    full = A.run_attacks(*args, seed=3, log=log, batch_size=25)
    lines = log.read_text().splitlines()
    assert len(lines) == 1 + 5  # meta + clean + 2 attacks × 2 eps
    log.write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])  # two rows kept, a third cut mid-line
    resumed = A.run_attacks(*args, seed=3, log=log, batch_size=25)
    assert resumed[:2] == full[:2]  # rows in the log are read back, not recomputed (same timings)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(full)
    assert [json.loads(s)["key"] for s in log.read_text().splitlines()[1:]] == [A.job_key(r["attack"], r["eps"])
                                                                                for r in full]
    with pytest.raises(ResultLogMismatchError, match="seed"):
        A.run_attacks(*args, seed=4, log=log, batch_size=25)


def test_check_attacks_summary(deployed, tmp_path):
    qmodel, ort, x, y = deployed[:4]
    cfg = A.AttackConfig(square_queries=100, apgd_steps=5)
    out = A.check_attacks(qmodel, ort, x[:20], y[:20], ["pgd", "autoattack-apgd", "square"], [2 / 255, 0.1],
                          log=tmp_path / "a.jsonl", batch_size=20, cfg=cfg, masking_images=20)
    rows = {(r["attack"], r["eps"]): r for r in out["rows"]}
    summary = out["summary"]
    w = summary["wcar"]["0.1"]
    assert w["runner"] == min(rows[(a, 0.1)]["runner_accuracy"] for a in ("pgd", "autoattack-apgd", "square"))
    assert w["torch"] == min(rows[(a, 0.1)]["torch_accuracy"] for a in ("pgd", "autoattack-apgd"))
    assert w["union_runner"] <= w["runner"] and set(summary["wcar"]) == {"2/255", "0.1"}
    assert summary["trusted"] and summary["masking"]["passed"] and summary["masking"]["eps"] == 0.1
    assert summary["masking"]["large_eps_accuracy"] <= 0.05  # the honest W8A8 model falls to an unbounded attack
    assert out["meta"]["masking_images"] == 20 and "runner_correct" not in out["rows"][0]
    json.dumps(out)
    again = A.check_attacks(qmodel, ort, x[:20], y[:20], ["pgd", "autoattack-apgd", "square"], [2 / 255, 0.1],
                            log=tmp_path / "a.jsonl", batch_size=20, cfg=cfg, masking_images=20)
    assert again["summary"] == summary  # everything, the masking check included, read back from the log


def test_cli_check_attacks_writes_results(deployed, tmp_path):
    _, _, _, _, ckpt, onnx_path = deployed
    out = tmp_path / "checks"
    cmd = [str(Path(sys.executable).with_name("arq-deploy")), "check", "attacks", str(onnx_path), "--torch-model",
           str(ckpt), "--attacks", "fgsm,square", "--eps", "0.1", "--max", "20", "--square-queries", "50",
           "--masking-images", "20", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert "WCAR" in p.stdout and "gradient-masking check" in p.stdout
    res = json.loads((out / "attacks.json").read_text())
    assert [r["attack"] for r in res["rows"]] == ["clean", "fgsm", "square"]
    assert res["meta"]["onnx_sha256"] and res["meta"]["images"] == 20
    assert (out / "attacks.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out / "attacks.jsonl").read_text().splitlines()) == 1 + 3 + 1  # meta, clean, 2 attacks, masking
    bad = subprocess.run(cmd[:-2] + ["--eps", "-1/255", "--out", str(tmp_path / "bad")], capture_output=True,
                         text=True, env=env)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()
