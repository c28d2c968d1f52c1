import json

import pytest

from arq_deploy.core.errors import PolicyError
from arq_deploy.core.models import build_model
from arq_deploy.core.policy import LayerBits, QuantPolicy, parse_bits
from arq_deploy.export.quantize.layers import LayerSpec, extract_layer_specs, total_macs


@pytest.fixture(scope="module")
def r20_specs():
    return extract_layer_specs(build_model("resnet20"), (3, 32, 32))


def resnet20_macs_by_hand() -> int:
    """Independent count: 3×3 convs, 'same' padding, stage sizes 32/16/8 with 16/32/64 channels, linear 64->10."""
    conv = lambda hw, cin, cout: hw * hw * cin * cout * 9  # noqa: E731
    macs = conv(32, 3, 16) + 6 * conv(32, 16, 16)
    macs += conv(16, 16, 32) + 5 * conv(16, 32, 32)
    macs += conv(8, 32, 64) + 5 * conv(8, 64, 64)
    return macs + 64 * 10


def test_resnet20_macs_match_independent_count(r20_specs):
    assert len(r20_specs) == 20
    assert total_macs(r20_specs) == resnet20_macs_by_hand()
    assert 40.5e6 < total_macs(r20_specs) < 40.7e6


@pytest.mark.parametrize("w,a", [(8, 8), (4, 4), (2, 8), (6, 4)])
def test_uniform_bops_is_macs_times_bits(r20_specs, w, a):
    pol = QuantPolicy.uniform(w, a)
    assert pol.bops(r20_specs) == resnet20_macs_by_hand() * w * a
    assert pol.bops_fraction(r20_specs) == pytest.approx(w * a / 1024)


def test_mixed_bops_and_float_layers(r20_specs):
    names = [s.name for s in r20_specs]
    pol = QuantPolicy(layers={names[0]: LayerBits(8, 8), names[1]: LayerBits(2, 4)})
    expected = r20_specs[0].macs * 64 + r20_specs[1].macs * 8 + sum(s.macs for s in r20_specs[2:]) * 1024
    assert pol.bops(r20_specs) == expected
    assert pol.bits(names[5]) is None


def test_json_round_trip(tmp_path, r20_specs):
    names = [s.name for s in r20_specs]
    pol = QuantPolicy.for_layers(names, [(2 + i % 7, 8 - i % 7) for i in range(len(names))])
    assert QuantPolicy.from_json(pol.to_json()) == pol
    pol.save(tmp_path / "p.json")
    assert QuantPolicy.load(tmp_path / "p.json") == pol
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["format"] == "arq-deploy/policy" and d["version"] == 1 and d["layers"]["conv1"] == [2, 8]
    assert QuantPolicy.from_dict(QuantPolicy.uniform(4, 6).to_dict()).default == LayerBits(4, 6)


def test_layer_spec_round_trip(r20_specs):
    for s in r20_specs[:3]:
        assert LayerSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s


@pytest.mark.parametrize("bits", [1, 9, 16, 32, 0, -3])
def test_bits_outside_2_to_8_rejected(bits):
    with pytest.raises(PolicyError, match="2..8"):
        LayerBits(bits, 8)
    with pytest.raises(PolicyError):
        QuantPolicy.from_dict({"format": "arq-deploy/policy", "version": 1, "default": None,
                               "layers": {"conv1": [8, bits]}})


def test_unknown_layer_rejected(r20_specs):
    pol = QuantPolicy(layers={"layer9.0.conv1": LayerBits(4, 4)})
    with pytest.raises(PolicyError, match="layer9.0.conv1"):
        pol.validate(r20_specs)


@pytest.mark.parametrize("text", ["{", "[]", '{"format": "other"}', '{"format": "arq-deploy/policy", "version": 7}'])
def test_malformed_policy_files(text):
    with pytest.raises(PolicyError):
        QuantPolicy.from_json(text)


def test_parse_bits():
    assert parse_bits("8") == QuantPolicy.uniform(8, 8)
    assert parse_bits("W4A8") == QuantPolicy.uniform(4, 8)
    assert parse_bits("2,6") == QuantPolicy.uniform(2, 6)
    assert parse_bits("float") == QuantPolicy() and parse_bits("float").describe() == "float"
    with pytest.raises(PolicyError):
        parse_bits("eight")


def test_mobilenet_depthwise_layers_found():
    specs = extract_layer_specs(build_model("mobilenetv2"), (3, 32, 32))
    dw = [s for s in specs if s.kind == "dwconv"]
    assert len(dw) == 17
    assert all(s.groups == s.in_channels == s.out_channels for s in dw)
    s = dw[0]
    assert s.macs == s.out_size[0] * s.out_size[1] * s.out_channels * 9
