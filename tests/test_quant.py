import numpy as np
import pytest
import torch

from arq_deploy.core.models import build_model
from arq_deploy.core.policy import QuantPolicy
from arq_deploy.export.quantize.layers import extract_layer_specs
from arq_deploy.export.quantize.quant import (
    QuantConv2d,
    QuantLinear,
    calibrate,
    calibration_batches,
    fake_quant,
    fold_batchnorm,
    quant_layers,
    quantize_model,
    weight_qmax,
)


def test_fake_quant_rounds_half_to_even_and_clamps():
    x = torch.tensor([-1.0, 0.0, 0.25, 0.75, 1.25, 10.0])
    y = fake_quant(x, torch.tensor(0.5), torch.tensor(0.0), 0, 3)
    # /0.5 -> -2, 0, .5, 1.5, 2.5, 20 -> round-half-even 0(clamped), 0, 0, 2, 2, 3(clamped)
    assert torch.equal(y, torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.5]))


def test_straight_through_gradient():
    x = torch.tensor([0.3, 0.7, 5.0], requires_grad=True)
    fake_quant(x, torch.tensor(0.2), torch.tensor(0.0), 0, 7).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0]))  # identity inside the range, zero where clamped


@pytest.fixture(scope="module")
def digits_setup():
    from arq_deploy.core.data import load_dataset

    torch.manual_seed(0)
    m = build_model("digits_cnn").eval()
    ds = load_dataset("digits", "train")
    return m, extract_layer_specs(m, (1, 8, 8)), torch.from_numpy(ds.x(np.arange(256)))


def test_bn_folding_preserves_function(digits_setup):
    m, _, x = digits_setup
    for mod in m.modules():  # non-trivial BN statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2)
    f = fold_batchnorm(m)
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in f.modules())
    with torch.no_grad():
        assert torch.allclose(f(x), m(x), atol=1e-4)


@pytest.mark.parametrize("w,a", [(8, 8), (4, 6), (2, 4)])
def test_quantized_layers_ranges(digits_setup, w, a):
    m, specs, x = digits_setup
    q = calibrate(quantize_model(m, QuantPolicy.uniform(w, a), specs), calibration_batches(x, 0.25))
    layers = quant_layers(q)
    assert set(layers) == {s.name for s in specs}
    for name, mod in layers.items():
        assert isinstance(mod, (QuantConv2d, QuantLinear))
        wi = mod.weight_int()
        assert wi.dtype == torch.int8 and int(wi.abs().max()) <= weight_qmax(w)
        assert mod.a_scale > 0 and 0 <= float(mod.a_zero_point) <= 2**a - 1
    # inputs after ReLU are unsigned (zero point 0); the first layer sees signed normalised pixels
    assert float(layers["conv2"].a_zero_point) == 0.0
    assert float(layers["conv1"].a_zero_point) > 0.0


def test_fake_quant_output_matches_integer_arithmetic(digits_setup):
    """The fake-quant conv equals an integer conv of the integer input and weights, rescaled."""
    m, specs, x = digits_setup
    q = calibrate(quantize_model(m, QuantPolicy.uniform(4, 6), specs), calibration_batches(x, 0.0))
    conv = q.get_submodule("conv2")
    xin = torch.relu(torch.randn(4, 16, 8, 8))
    xi = torch.clamp(torch.round(xin / conv.a_scale) + conv.a_zero_point, 0, 63)
    acc = torch.nn.functional.conv2d(xi - conv.a_zero_point, conv.weight_int().float(), None, 1, 1)
    ref = acc * (conv.a_scale * conv.weight_scale()).view(1, -1, 1, 1)
    if conv.bias is not None:
        ref = ref + (conv.bias_int().float() * conv.bias_scale()).view(1, -1, 1, 1)
    with torch.no_grad():
        assert torch.allclose(conv(xin), ref, atol=1e-4)


def test_noisy_calibration_widens_ranges(digits_setup):
    m, specs, x = digits_setup
    clean = calibrate(quantize_model(m, QuantPolicy.uniform(8), specs), calibration_batches(x, 0.0))
    noisy = calibrate(quantize_model(m, QuantPolicy.uniform(8), specs), calibration_batches(x, 0.5))
    assert float(quant_layers(noisy)["conv1"].a_scale) > 1.5 * float(quant_layers(clean)["conv1"].a_scale)


@pytest.mark.shared_data
def test_resnet20_ptq_accuracy_by_bits(models_dir, cifar_dir):
    """Uniform PTQ of the standard ResNet-20: W8A8 keeps float accuracy, accuracy falls with bits."""
    from arq_deploy.core.data import load_dataset
    from arq_deploy.core.models import load_model

    model, _ = load_model("resnet20", models_dir / "resnet20-12fca82f.th")
    specs = extract_layer_specs(model, (3, 32, 32))
    train = torch.from_numpy(load_dataset(str(cifar_dir), "train").x(np.arange(256)))
    test = load_dataset(str(cifar_dir), "test")
    idx = np.arange(0, 1000, 2)
    xt = torch.from_numpy(test.x(idx))
    accs = {}
    for b in (8, 4, 2):
        q = calibrate(quantize_model(model, QuantPolicy.uniform(b), specs), calibration_batches(train, 0.0))
        with torch.no_grad():
            accs[b] = float((q(xt).argmax(1).numpy() == test.labels[idx]).mean())
    with torch.no_grad():
        acc_float = float((model(xt).argmax(1).numpy() == test.labels[idx]).mean())
    assert accs[8] >= acc_float - 0.01
    assert accs[8] > accs[4] > accs[2]
    assert accs[4] > 0.7


def _lattice_layer(scale: float, bits: int = 6):
    """A QuantLinear fed inputs on the lattice 0.05·k, its activation scale set by hand (no calibration)."""
    from arq_deploy.core.policy import LayerBits

    layer = QuantLinear.from_float(torch.nn.Linear(8, 4), LayerBits(8, bits))
    layer.a_scale.fill_(scale)
    layer.a_zero_point.fill_(0.0)
    model = torch.nn.Sequential(layer).eval()
    k = torch.randint(0, 2 * (2**bits - 1), (512, 8), generator=torch.Generator().manual_seed(0))
    return model, layer, [(0.05 * k.float())[i:i + 128] for i in range(0, 512, 128)]


def test_tie_audit_finds_commensurate_scale_and_nudges_it_off():
    """A scale of 0.1 on inputs 0.05·k puts every odd k on a rounding tie (k/2); x/s in float32 and the same
    quotient in float64 (or as 3x/3s) round many of them differently. break_ties moves the scale off the lattice; after it no tie
    is left and both evaluation orders give the same integers. A generic scale is left alone."""
    from arq_deploy.export.quantize.quant import TIE_NUDGE, break_ties, tie_nudges, tie_report

    model, layer, batches = _lattice_layer(0.1)
    row = tie_report(model, batches)["0"]
    assert row["rate"] > 0.3 and row["ties"] > 100, row
    x = torch.cat(batches)

    def orders(s):
        return torch.round(x / s), torch.round(x.double() / s).float(), torch.round((3 * x) / (3 * s))

    a, b, c = orders(float(layer.a_scale))
    assert (a != b).float().mean() > 0.05 and (a != c).float().mean() > 0.05  # the ties split evaluation orders
    assert break_ties(model, batches) == {"0": 1} and tie_nudges(model) == {"0": 1}
    assert float(layer.a_scale) == pytest.approx(0.1 * TIE_NUDGE, rel=1e-7)
    assert tie_report(model, batches)["0"]["ties"] == 0
    a, b, c = orders(float(layer.a_scale))
    assert torch.equal(a, b) and torch.equal(a, c)

    model, layer, batches = _lattice_layer(0.0917)
    assert break_ties(model, batches) == {} and float(layer.a_scale) == pytest.approx(0.0917) and not tie_nudges(model)


def test_calibrated_scales_are_widened_per_layer(digits_setup):
    """Layer i's calibrated scale is (hi - lo)/q_max times its own tie-free widening: distinct factors, so a relation
    between two layers' scales does not survive calibration."""
    from arq_deploy.export.quantize.quantizers import tie_free_widening

    factors = [tie_free_widening(i) for i in range(60)]
    assert all(1.0 < f <= 1.0 + 2.0**-9 for f in factors)
    assert min(abs(a - b) for i, a in enumerate(factors) for b in factors[i + 1:]) > 1e-5
    m, specs, x = digits_setup
    q = calibrate(quantize_model(m, QuantPolicy.uniform(6), specs), calibration_batches(x, 0.25))
    for i, layer in enumerate(quant_layers(q).values()):
        assert layer.calib_index == i
        layer.quantizer.set_act_range(layer, 0.0, 1.0)
        assert float(layer.a_scale) == pytest.approx(tie_free_widening(i) / 63, rel=1e-6)
