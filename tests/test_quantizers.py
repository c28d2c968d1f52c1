"""Quantization methods (export/quantize/quantizers.py): grids, gradients, QDQ export agreement, checkpoint round trip, TVM."""

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from arq_deploy.core.errors import ArqError, UnknownNameError
from arq_deploy.core.policy import LayerBits, QuantPolicy
from arq_deploy.export.quantize.layers import extract_layer_specs
from arq_deploy.export.quantize.quant import (
    QuantConv2d,
    QuantLinear,
    calibrate,
    calibration_batches,
    model_quantizer,
    quant_layers,
    quantize_model,
    weight_qmax,
)
from arq_deploy.export.quantize.quantizers import get_quantizer, lsq_grad_scale, quantizer_names, register_quantizer

METHODS = ["percentile", "minmax", "pwlq", "dorefa", "pact", "lsq"]
QAT = ("dorefa", "pact", "lsq")


def qat_steps(qmodel, x, y, steps: int, seed: int = 0, lr: float = 0.01, sigma: float = 0.25):
    """A few SGD steps on CE(f(x + σ·ε), y), batches of 64 (the loop of pipeline.train, shortened)."""
    opt = torch.optim.SGD(qmodel.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    qmodel.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        xb = x[idx] + sigma * torch.randn(x[idx].shape, generator=g)
        loss = F.cross_entropy(qmodel(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qmodel.eval()


@pytest.fixture(scope="module")
def small():
    """An untrained digits CNN (seeded), its layer specs and 128 training images."""
    from arq_deploy.core.data import load_dataset
    from arq_deploy.core.models import build_model

    torch.manual_seed(0)
    m = build_model("digits_cnn").eval()
    ds = load_dataset("digits", "train")
    return m, extract_layer_specs(m, (1, 8, 8)), torch.from_numpy(ds.x(np.arange(128))), ds


def _quantized(small, method, bits, a_bits=None):
    m, specs, x, _ = small
    return calibrate(quantize_model(m, QuantPolicy.uniform(bits, a_bits or bits), specs, method=method),
                     calibration_batches(x, 0.25))


# ------------------------------------------------------------------------------------------------ registry
def test_registry_and_unknown_names(small, digits, digits_model, tmp_path):
    assert quantizer_names() == METHODS
    with pytest.raises(UnknownNameError, match="unknown quantizer 'nope'; known: percentile, minmax, pwlq"):
        get_quantizer("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_quantizer("lsq")(type("Again", (), {}))
    m, specs, _, _ = small
    with pytest.raises(UnknownNameError, match="known: .*lsq"):
        quantize_model(m, QuantPolicy.uniform(4), specs, method="LSQ")
    from arq_deploy.export.pipeline import export_and_validate

    with pytest.raises(UnknownNameError):
        export_and_validate(digits_model[0], QuantPolicy.uniform(8), *digits, tmp_path / "x.onnx", method="bogus")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ grids
@pytest.mark.parametrize("method", METHODS)
def test_levels_per_channel_and_pieces_equal_fake_quant(small, method):
    """Each integer piece has at most 2^b - 1 levels per output channel inside [-Q, Q], and Σ W_q·s_w is the
    fake-quant weight the torch model computes with (so the export holds the same numbers)."""
    for bits in (2, 4, 6, 8):
        q = _quantized(small, method, bits, a_bits=8)
        for name, mod in quant_layers(q).items():
            assert mod.method == method
            pieces = mod.weight_pieces()
            assert len(pieces) == (2 if method == "pwlq" else 1)
            total = torch.zeros_like(mod.weight)
            for wq, s in pieces:
                assert wq.dtype == torch.int8 and int(wq.abs().max()) <= weight_qmax(bits)
                assert max(len(torch.unique(row)) for row in wq.reshape(len(wq), -1)) <= 2**bits - 1
                assert s.shape == (mod.weight.shape[0],) and bool((s > 0).all())
                total += wq.float() * s.reshape(-1, *[1] * (wq.dim() - 1))
            with torch.no_grad():
                assert torch.allclose(total, mod.qweight(), rtol=1e-6, atol=1e-7), (method, bits, name)
        assert model_quantizer(q) == method


def test_pact_keeps_asymmetric_quantizer_for_signed_inputs(small):
    layers = quant_layers(_quantized(small, "pact", 4))
    assert not bool(layers["conv1"].pact_on) and float(layers["conv1"].a_zero_point) > 0  # after Normalize
    for name in ("conv2", "conv3", "conv4", "linear"):
        mod = layers[name]
        assert bool(mod.pact_on) and mod.act_qparams() == (pytest.approx(float(mod.pact_alpha.detach()) / 15), 0)


def _gauss_conv(bits, method):
    conv = nn.Conv2d(64, 32, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    return QuantConv2d.from_float(conv, LayerBits(bits, 8), method)


def test_pwlq_lower_weight_mse_than_uniform():
    """4-bit PWLQ on Gaussian weights: below the paper's bound (9/16 of b-bit min-max uniform, Lemma 2) and below
    the MSE-clipped uniform grid."""
    err = {}
    for method in ("pwlq", "minmax", "percentile"):
        mod = _gauss_conv(4, method)
        with torch.no_grad():
            err[method] = float(((mod.qweight() - mod.weight) ** 2).mean())
    assert err["pwlq"] < 9 / 16 * err["minmax"]
    assert err["pwlq"] < 0.5 * err["percentile"] < err["minmax"]
    ratio = _gauss_conv(4, "pwlq").pwlq_ratio
    assert bool(((ratio > 0) & (ratio <= 0.5)).all())  # breakpoint p in (0, m/2]


# ------------------------------------------------------------------------------------------------ gradients
def _lsq_linear(bits=4):
    torch.manual_seed(1)
    q = QuantLinear.from_float(nn.Linear(16, 4), LayerBits(bits, bits), "lsq")
    q.start_calibration()
    q(torch.relu(torch.randn(32, 16)))
    q.finish_calibration(99.0)
    return q


def _lsq_step_grad(v, s, z, qmin, qmax):
    """LSQ (Esser et al., eq. 3): ∂v̂/∂s = round(v/s) - v/s where qmin < v/s + z < qmax, else the bound (q - z)."""
    u = v / s
    inside = (u + z > qmin) & (u + z < qmax)
    return torch.where(inside, torch.round(u) - u, torch.clamp(u + z, qmin, qmax) - z)


def test_lsq_step_gradients_follow_the_formula():
    q = _lsq_linear(4)
    with torch.no_grad():
        q.lsq_w_step.mul_(0.6)  # make some weights clip
    q.qweight().sum().backward()
    w, s = q.weight.detach(), q.lsq_w_step.detach()
    expect = _lsq_step_grad(w, s[:, None], 0, -7, 7).sum(dim=1) * lsq_grad_scale(64, 7)  # N_W = 4·16 weights
    assert lsq_grad_scale(64, 7) == pytest.approx(1 / np.sqrt(64 * 7))
    assert torch.allclose(q.lsq_w_step.grad, expect, atol=1e-6) and bool((q.lsq_w_step.grad != 0).any())
    assert float(q.a_zero_point) == 0
    x = torch.relu(torch.randn(8, 16)) * 2
    q.qinput(x).sum().backward()
    sa = q.lsq_a_step.detach()
    expect_a = _lsq_step_grad(x, sa, 0, 0, 15).sum() / np.sqrt(16 * 15)
    assert float(q.lsq_a_step.grad) == pytest.approx(float(expect_a), rel=1e-5, abs=1e-6)
    assert bool((x > 15 * sa).any())  # the clamped branch is exercised


def test_pact_alpha_gradient_counts_clipped_inputs():
    torch.manual_seed(2)
    q = QuantLinear.from_float(nn.Linear(16, 4), LayerBits(4, 4), "pact")
    q.start_calibration()
    q(torch.relu(torch.randn(32, 16)))
    q.finish_calibration(99.0)
    with torch.no_grad():
        q.pact_alpha.fill_(1.2)  # α/(α/15) is exactly 15.0 here, where a clamp would pass no gradient
    x = (torch.randn(8, 16) * 2).requires_grad_()
    q.qinput(x).sum().backward()
    assert float(q.pact_alpha.grad) == float((x >= 1.2).sum()) > 0  # ∂ŷ/∂α = 1 where x ≥ α
    assert torch.equal(x.grad, ((x >= 0) & (x < 1.2)).float())  # straight through inside [0, α)
    assert q.act_qparams() == (pytest.approx(1.2 / 15), 0) and float(q.a_scale) == pytest.approx(1.2 / 15)


@pytest.mark.parametrize("method", ["pact", "lsq"])
def test_learnable_parameters_get_gradients_and_move(small, method):
    q = _quantized(small, method, 4)
    names = {"pact": ["pact_alpha"], "lsq": ["lsq_w_step", "lsq_a_step"]}[method]
    layers = {n: m for n, m in quant_layers(q).items() if method != "pact" or bool(m.pact_on)}
    before = {(n, p): getattr(m, p).detach().clone() for n, m in layers.items() for p in names}
    _, _, x, ds = small
    q.train()
    xn = x[:64] + 0.5 * torch.randn(x[:64].shape, generator=torch.Generator().manual_seed(0))  # beyond α (σ 0.25)
    F.cross_entropy(q(xn), torch.from_numpy(ds.labels[:64].astype(np.int64))).backward()
    for (n, p) in before:
        assert getattr(layers[n], p).grad is not None and bool((getattr(layers[n], p).grad != 0).any()), (n, p)
    qat_steps(q, x, torch.from_numpy(ds.labels[:128].astype(np.int64)), steps=3)
    for (n, p), v in before.items():
        assert not torch.equal(getattr(layers[n], p).detach(), v), (n, p)


def test_lsq_8bit_steps_stay_stable_in_qat(digits, digits_model):
    """At 8 bits a weight outside the grid adds 127·∂L/∂ŵ to its step's gradient; with LSQ's layer-level scaling
    the steps stay positive and bounded over 20 SGD steps (lr 0.01, momentum 0.9). (Per-channel scaling sent a step
    to -166x its start here; a step can still grow ~20x when a clipped weight keeps pushing it: LSQ's own kick.)"""
    from arq_deploy.export.pipeline import quantize_calibrated

    (train_ds, _), (lm, _) = digits, digits_model
    qm, _ = quantize_calibrated(lm, QuantPolicy.uniform(8), train_ds.x(np.arange(256)), 0.25, method="lsq")
    start = {n: m.lsq_w_step.detach().clone() for n, m in quant_layers(qm).items()}
    qat_steps(qm, torch.from_numpy(train_ds.x()), torch.from_numpy(train_ds.labels.astype(np.int64)), steps=20)
    # the grid uses |step| (the symmetric grid of -s is that of s): what must not happen is |step| collapsing to ~0
    ratios = torch.cat([m.lsq_w_step.detach().abs() / start[n].abs() for n, m in quant_layers(qm).items()])
    # (measured: 0.25–3.8× its start; a collapse takes |step| orders of magnitude down)
    assert 0.1 < float(ratios.min()) and float(ratios.max()) < 50, (float(ratios.min()), float(ratios.max()))


# ------------------------------------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def exports(digits, digits_model, tmp_path_factory):
    """Per method and bits (8, 4): calibrated (σ = 0.25) on 256 digits, 6 QAT steps for dorefa/pact/lsq, QDQ
    export; the torch model and the onnxruntime session compared on the 540 test images (clean and noisy)."""
    import copy

    from arq_deploy.export.pipeline import quantize_calibrated
    from arq_deploy.export.qdq import check, float_onnx, insert_qdq
    from arq_deploy.export.quantize.quant import break_ties, calibration_batches
    from arq_deploy.export.validate import compare_runners
    from arq_deploy.runtime.runners import OrtRunner, TorchRunner

    (train_ds, test_ds), (lm, _) = digits, digits_model
    out = tmp_path_factory.mktemp("quantizers")
    calib = train_ds.x(np.arange(256))
    x, y = torch.from_numpy(train_ds.x()), torch.from_numpy(train_ds.labels.astype(np.int64))
    # export_qdq is float_onnx + insert_qdq; the float graph (BN folded, names kept) is the same for every
    # method, and insert_qdq replaces every quantized layer's weight and bias, so one float export serves all.
    base = float_onnx(quantize_calibrated(lm, QuantPolicy.uniform(8), calib, 0.25)[0], lm.input_shape)
    res = {}
    for method in METHODS:
        for bits in (8, 4):
            qm, _ = quantize_calibrated(lm, QuantPolicy.uniform(bits), calib, 0.25, method=method)
            if method in QAT:
                qat_steps(qm, x, y, steps=6, seed=bits)
                # as export_and_validate does for a trained checkpoint (LSQ's 4-bit steps drift onto a lattice here)
                break_ties(qm, calibration_batches(torch.from_numpy(calib), 0.25))
            model = copy.deepcopy(base)
            insert_qdq(model, qm)
            check(model)
            path = out / f"{method}{bits}.onnx"
            onnx.save(model, str(path))
            agree = compare_runners(TorchRunner(qm, lm.input_shape, lm.num_classes), OrtRunner(path),
                                    test_ds.x(), test_ds.labels, sigma=0.25)
            res[method, bits] = path, agree
    return res


@pytest.mark.parametrize("method", METHODS)
def test_export_agrees_with_torch(exports, method):
    for bits in (8, 4):
        path, a = exports[method, bits]
        assert a.images == 540
        assert a.top1_agreement >= 0.99 and a.noisy_top1_agreement >= 0.99, (method, bits, a)
        assert a.accuracy_candidate > 0.85, (method, bits, a)
        if bits == 4:  # below 8 bits nothing is fused: the same float arithmetic, up to the summation order, which
            # can move an activation that lies on a rounding boundary by one step (seen once, PWLQ on AVX-512 hosts)
            assert a.mean_abs_logit_diff < 1e-3 and a.max_abs_logit_diff < 0.1, (method, a)
        nodes = onnx.load(str(path)).graph.node
        adds = [n for n in nodes if n.op_type == "Add" and n.name.endswith("/weight_add1")]
        assert len(adds) == (5 if method == "pwlq" else 0)


def test_pwlq_graph_two_grids_feed_the_weight(exports):
    from onnx import numpy_helper

    model = onnx.load(str(exports["pwlq", 4][0]))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and n.input[1] == "conv2.weight_sum")
    add = next(n for n in model.graph.node if n.output[0] == conv.input[1])
    assert list(add.input) == ["conv2.weight_dq", "conv2.weight_tail_dq"]
    c, t = inits["conv2.weight_q"], inits["conv2.weight_tail_q"]
    assert c.dtype == t.dtype == np.int8 and np.abs(c).max() <= 7 and np.abs(t).max() <= 7
    assert np.all((t == 0) | (np.abs(c) == 7))  # a tail weight sits at ±p = ±Q·s_c plus its tail offset
    assert "conv2.weight" not in inits


def test_tvm_runs_pwlq_export_like_onnxruntime(exports, digits, tmp_path):
    from arq_deploy.runtime.runners import OrtRunner
    from arq_deploy.runtime.tvm_runner import TvmRunner
    from arq_deploy.targets.backends import compile_onnx

    path = exports["pwlq", 4][0]
    art = compile_onnx(path, "x86", tmp_path / "pwlq", batch_size=64, single=False)
    x = digits[1].x(np.arange(200))
    a, b = TvmRunner(art)(x), OrtRunner(path)(x)
    assert float((a.argmax(1) == b.argmax(1)).mean()) >= 0.99
    assert np.abs(a - b).max() < 1e-3


# ------------------------------------------------------------------------------------------------ round trip
def test_qat_checkpoint_rebuilds_with_its_method(digits, digits_model, tmp_path):
    """A QAT checkpoint (policy + "quantizer": "lsq") loads back as the same LSQ model; its export records the
    quantizer (CLI, in process), and a different --quantizer is refused with one line."""
    from click.testing import CliRunner

    from arq_deploy.app.cli import main
    from arq_deploy.export.pipeline import load, quantize_calibrated, save_checkpoint

    (train_ds, test_ds), (lm, _) = digits, digits_model
    specs = extract_layer_specs(lm.model, lm.input_shape)
    policy = QuantPolicy.for_layers([s.name for s in specs], [(8, 8), (4, 4), (4, 6), (6, 4), (8, 8)])
    qm, _ = quantize_calibrated(lm, policy, train_ds.x(np.arange(256)), 0.25, method="lsq")
    qat_steps(qm, torch.from_numpy(train_ds.x()), torch.from_numpy(train_ds.labels.astype(np.int64)), steps=4)
    ckpt = tmp_path / "lsq.pt"
    save_checkpoint(ckpt, qm, lm, 0.25, 1, policy=policy.resolve(specs),
                    training={"mode": "gaussian", "quantizer": "lsq"})
    back = load(None, str(ckpt))
    assert back.meta["quantizer"] == "lsq" and model_quantizer(back.model) == "lsq"
    for name, mod in quant_layers(back.model).items():
        orig = quant_layers(qm)[name]
        want = policy.layers[name]
        assert (mod.w_bits, mod.a_bits) == (orig.w_bits, orig.a_bits) == (want.w_bits, want.a_bits)
        assert torch.equal(mod.lsq_w_step, orig.lsq_w_step) and mod.act_qparams() == orig.act_qparams()
    x = torch.from_numpy(test_ds.x(np.arange(100)))
    with torch.no_grad():
        assert torch.equal(back.model(x), qm(x))

    out = tmp_path / "lsq.onnx"
    res = CliRunner().invoke(main, ["export", "--weights", str(ckpt), "--data", "digits", "--validate-images", "200",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "lsq" in res.output
    from arq_deploy.export.qdq import load_onnx, read_metadata

    assert read_metadata(load_onnx(out))["quantizer"] == "lsq"
    report = json.loads(out.with_suffix(".export.json").read_text())
    assert report["quantizer"] == "lsq" and report["validation"]["top1_agreement"] >= 0.99

    res = CliRunner().invoke(main, ["export", "--weights", str(ckpt), "--data", "digits", "--quantizer", "pact",
                                    "--out", str(tmp_path / "no.onnx")])
    assert res.exit_code == 2 and "error: the checkpoint was trained with quantizer 'lsq'" in res.stderr
    assert not (tmp_path / "no.onnx").exists()
    with pytest.raises(ArqError):
        from arq_deploy.export.pipeline import export_and_validate

        export_and_validate(back, None, train_ds, test_ds, tmp_path / "no2.onnx", method="minmax")
