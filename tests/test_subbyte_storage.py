"""Sub-byte weight storage (core/weights.py, targets/external_weights.py): integer builds keep their weights out of
the library, bit-packed in weights.bin at the bits each tensor's values need.

Packing: lossless round trips for every bit width 1..8 in int8/uint8/int16/int32 containers, packed words read at
their fields' width, edge values. Builds: ResNet-20 W8A8 and W4A4 integer builds give the same logits as the same
build with the weights inside the library (the earlier behaviour), W4's packed weights take about half of W8's,
a tampered weights file is refused, `arq-deploy compile` prints the sizes next to the BOPs, and an aarch64 build
runs under qemu (skipped without `make aarch64-env`).
"""

import json
import shutil

import numpy as np
import pytest

from arq_deploy.core.errors import ArtifactIntegrityError
from arq_deploy.core.weights import (
    DTYPES,
    bit_width,
    pack_tensor,
    pack_tensors,
    packed_size,
    unpack_tensor,
    unpack_tensors,
)

BATCH = 8


# ---------------------------------------------------------------------------------------------------------------
# Packing

def _round_trip(a: np.ndarray) -> dict:
    rec, data = pack_tensor(a)
    back = unpack_tensor(rec, data)
    assert back.dtype == a.dtype and back.shape == a.shape and np.array_equal(back, a), rec
    assert rec["nbytes"] == len(data)
    return rec


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "int32"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_round_trip_at_every_bit_width(dtype, bits):
    """Seeded random tensors whose values span exactly 2^bits levels (signed or not, at any offset the container
    allows) round-trip, and take `bits` bits per value (rounded up to a byte per tensor)."""
    rng = np.random.default_rng(1000 * bits + DTYPES.index(dtype))
    info = np.iinfo(dtype)
    for trial in range(6):
        shape = tuple(int(d) for d in rng.integers(1, 9, size=int(rng.integers(1, 5))))
        lo_min, lo_max = int(info.min), int(info.max) - (2**bits - 1)
        lo = [lo_min, lo_max, -(2 ** (bits - 1)) if info.min < 0 else 0, int(rng.integers(lo_min, lo_max + 1))][
            trial % 4]
        a = rng.integers(lo, lo + 2**bits, size=shape, dtype=np.int64)
        a.reshape(-1)[:2] = [lo, lo + 2**bits - 1][: a.size]  # both ends of the range present (when room)
        a = a.astype(dtype)
        rec = _round_trip(a)
        span = int(a.max()) - int(a.min())
        assert rec["bits"] <= bit_width(span) and rec["nbytes"] <= packed_size(a.size, bits)


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64"])
def test_edge_values_round_trip(dtype):
    info = np.iinfo(dtype)
    edges = np.array([info.min, info.max, 0, 1, info.max - 1, info.min + 1], dtype)
    _round_trip(edges)
    _round_trip(np.full((3, 4), info.min, dtype))  # constant: 0 bits
    assert pack_tensor(np.full((3, 4), info.max, dtype))[0]["bits"] == 0
    _round_trip(np.zeros((0, 5), dtype))  # empty
    rng = np.random.default_rng(7)
    full = rng.integers(info.min, int(info.max) + 1, size=1000, dtype=np.int64 if dtype != "uint32" else np.uint64)
    _round_trip(full.astype(dtype))  # the whole range: the container's width (or a narrower view, never wider)


@pytest.mark.parametrize("bits", range(1, 9))
def test_packed_int32_words_are_stored_at_their_fields_bits(bits):
    """The dot-product kernels' weights: four int8 weights of `bits` bits in each int32 word are stored as bytes at
    `bits` bits (not 32); two int16 fields (vpmaddwd's words) at the int16 fields' bits."""
    rng = np.random.default_rng(bits)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    w = rng.integers(lo, hi + 1, size=(16, 8, 3, 3, 4)).astype(np.int8)
    words = w.view(np.int32).reshape(16, 8, 3, 3)
    rec = _round_trip(words)
    assert rec["view"] == "int8" or bits == 8  # at 8 bits the whole words pack as small
    assert rec["nbytes"] == packed_size(w.size, bits), rec
    halves = rng.integers(lo, hi + 1, size=(16, 8, 2)).astype(np.int16).view(np.int32)
    rec = _round_trip(halves)
    assert rec["nbytes"] <= packed_size(halves.size * 2, bits) + 1, rec


def test_large_tensor_spans_several_chunks():
    rng = np.random.default_rng(3)
    a = rng.integers(-4, 4, size=(1 << 20) + 13).astype(np.int8)
    assert _round_trip(a)["nbytes"] == packed_size(a.size, 3)


def test_an_index_that_does_not_fit_the_file_is_refused():
    rng = np.random.default_rng(5)
    named = [("w0", rng.integers(-8, 8, (4, 4)).astype(np.int8)), ("w1", np.arange(40, dtype=np.int32))]
    data, index = pack_tensors(named)
    assert [np.array_equal(a, b) for a, b in zip(unpack_tensors(data, index), [a for _, a in named])] == [True] * 2
    assert index["packed_bytes"] == len(data) < index["container_bytes"]
    with pytest.raises(ArtifactIntegrityError):
        unpack_tensors(data[:-1], index)
    bad = json.loads(json.dumps(index))
    bad["tensors"][1]["start"] += 1
    with pytest.raises(ArtifactIntegrityError):
        unpack_tensors(data, bad)
    with pytest.raises(ValueError, match="float32"):
        pack_tensor(np.zeros(3, np.float32))


# ---------------------------------------------------------------------------------------------------------------
# Builds

@pytest.fixture(scope="module")
def r20(models_dir, cifar_dir, tmp_path_factory):
    """ResNet-20 exported at W8A8 and W4A4 (small calibration), and 24 test images."""
    from arq_deploy.core.data import load_dataset
    from arq_deploy.core.policy import QuantPolicy
    from arq_deploy.export.pipeline import export_and_validate, load

    lm = load("resnet20", str(models_dir / "resnet20-12fca82f.th"))
    train, test = load_dataset(str(cifar_dir), "train"), load_dataset(str(cifar_dir), "test")
    d = tmp_path_factory.mktemp("subbyte")
    for b in (8, 4):
        export_and_validate(lm, QuantPolicy.uniform(b), train, test, d / f"w{b}a{b}.onnx", calib_images=64,
                            validate_images=20, min_agreement=0.5)
    return d, test.x()[:3 * BATCH]


@pytest.fixture(scope="module")
def r20_builds(r20):
    """{name: artifact}: W8A8 and W4A4 integer x86 builds with packed weights (W4A4 with its batch-1 library), and
    W4A4 with its weights inside the libraries."""
    from arq_deploy.targets.backends import compile_onnx

    d, _ = r20
    return {"w8": compile_onnx(d / "w8a8.onnx", "x86", d / "w8", batch_size=BATCH, integer=True, single=False),
            "w4": compile_onnx(d / "w4a4.onnx", "x86", d / "w4", batch_size=BATCH, integer=True),
            "w4-embedded": compile_onnx(d / "w4a4.onnx", "x86", d / "w4-emb", batch_size=BATCH, integer=True,
                                        external_weights=False)}


def _manifest(art) -> dict:
    return json.loads((art / "manifest.json").read_text())


@pytest.mark.shared_data
def test_packed_build_gives_the_embedded_builds_logits(r20, r20_builds):
    """The same logits, bit for bit, from the batch library and from the batch-1 library (single images), as the
    build whose library holds its weights; and its libraries are smaller by about the weights' container bytes."""
    from arq_deploy.runtime.tvm_runner import TvmRunner

    _, x = r20
    packed, embedded = TvmRunner(r20_builds["w4"], single_max=2), TvmRunner(r20_builds["w4-embedded"], single_max=2)
    y = packed(x)
    assert np.array_equal(y, embedded(x))
    assert np.array_equal(packed(x[:2]), embedded(x[:2])) and np.array_equal(packed(x[:2]), y[:2])
    assert len(np.unique(y.argmax(1))) > 2
    m, e = _manifest(r20_builds["w4"]), _manifest(r20_builds["w4-embedded"])
    assert m["format_version"] == 2 and e["format_version"] == 1 and "weights" not in e
    assert m["compile"]["schedule"]["external_weights"] == len(m["weights"]["tensors"]) >= 19
    assert "weights.bin" in m["files"] and "weights.bin" not in e["files"]
    saved = e["storage"]["library_bytes"]["model.so"] - m["storage"]["library_bytes"]["model.so"]
    assert saved >= 0.9 * m["weights"]["container_bytes"], (saved, m["weights"])
    assert m["storage"]["runtime_bytes"] < e["storage"]["runtime_bytes"]


@pytest.mark.shared_data
def test_w4_weights_take_about_half_of_w8(r20_builds):
    w8, w4 = (_manifest(r20_builds[k]) for k in ("w8", "w4"))
    for m, bits in ((w8, 8), (w4, 4)):
        st = m["storage"]
        assert st["weights_packed_bytes"] == m["weights"]["packed_bytes"] == (r20_builds["w8" if bits == 8 else "w4"]
                                                                              / "weights.bin").stat().st_size
        assert st["artifact_bytes"] == sum((r20_builds["w8" if bits == 8 else "w4"] / f).stat().st_size
                                           for f in m["files"])
        convs = [t for t in m["weights"]["tensors"] if len(t["shape"]) >= 4 and t["shape"][0] > 1]
        # at most `bits` bits per 8-bit weight field (int8 weights, or int32 words of four on the x86 kernels)
        assert len(convs) == 19 and all(t["nbytes"] <= packed_size(np.prod(t["shape"]) * np.dtype(t["dtype"]).itemsize,
                                                                   bits) for t in convs), convs
    assert w8["weights"]["container_bytes"] == w4["weights"]["container_bytes"]  # the same containers
    ratio = w4["weights"]["packed_bytes"] / w8["weights"]["packed_bytes"]
    assert 0.45 <= ratio <= 0.56, ratio


@pytest.mark.shared_data
def test_a_tampered_weights_file_is_refused(r20_builds, tmp_path):
    from arq_deploy.core.artifact import load_artifact
    from arq_deploy.core.weights import read_artifact_weights
    from arq_deploy.runtime.tvm_runner import TvmRunner

    art = tmp_path / "art"
    shutil.copytree(r20_builds["w4"], art)
    ok = load_artifact(art)
    data = bytearray((art / "weights.bin").read_bytes())
    data[len(data) // 2] ^= 0x10
    (art / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match="weights.bin"):
        load_artifact(art)
    with pytest.raises(ArtifactIntegrityError, match="weights.bin"):
        read_artifact_weights(ok)  # changed after it was verified
    with pytest.raises(ArtifactIntegrityError, match="weights.bin"):
        TvmRunner(art)
    (art / "weights.bin").unlink()
    with pytest.raises(ArtifactIntegrityError, match="weights.bin"):
        load_artifact(art)
    m = _manifest(r20_builds["w4"])
    del m["weights"]  # a version-2 manifest that lost its index: refused, never run without weights
    shutil.copy(r20_builds["w4"] / "weights.bin", art / "weights.bin")
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactIntegrityError, match="weights"):
        load_artifact(art)


def test_cli_compile_prints_the_sizes(cli, tmp_path):
    """`arq-deploy compile --integer` prints the artifact's and the weights' sizes (packed and at 8 bits or more)."""
    import onnx
    from test_int_lowering import qdq_graph

    model, _ = qdq_graph("conv", out_q=False, relu=True, w_u8=False, w_max=7, seed=2)
    g = model.graph
    g.input[0].name = g.node[0].input[0] = "input"
    for d in g.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_value = 16
    g.node.extend([onnx.helper.make_node("GlobalAveragePool", ["y"], ["p"]),
                   onnx.helper.make_node("Flatten", ["p"], ["logits"])])
    del g.output[:]
    g.output.append(onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 16]))
    onnx.save(model, str(tmp_path / "m.onnx"))
    rc, out, err = cli("compile", tmp_path / "m.onnx", "--integer", "--batch-size", "4", "--out", tmp_path / "art")
    assert rc == 0, err
    m = _manifest(tmp_path / "art")
    conv = next(t for t in m["weights"]["tensors"] if len(t["shape"]) >= 4 and t["shape"][0] == 16)
    assert conv["bits"] == 4  # weights in [-7, 7]
    st = m["storage"]
    assert f"artifact {st['artifact_bytes'] / 1000:,.1f} kB" in out, out
    assert f"weights {st['weights_packed_bytes'] / 1000:,.1f} kB packed" in out, out


@pytest.mark.shared_data
def test_aarch64_build_with_packed_weights_under_qemu(r20, tmp_path):
    """The W4A4 ResNet-20 integer build for rpi4 (NEON smlal kernels, int16/int8 weights) under qemu-user gives the
    logits of the same build with its weights inside the library."""
    from arq_deploy.core.errors import ArqError
    from arq_deploy.runtime.qemu import QemuEnvError, QemuRunner, QemuWorker, find_env
    from arq_deploy.targets.backends import compile_onnx
    from arq_deploy.targets.registry import get_target
    from arq_deploy.targets.tvm_frontend import require_cross_compiler

    try:
        require_cross_compiler(get_target("rpi4"))
        env = find_env()
    except (ArqError, QemuEnvError) as e:
        pytest.skip(str(e))
    d, x = r20
    arts = {k: compile_onnx(d / "w4a4.onnx", "rpi4", tmp_path / k, batch_size=BATCH, integer=True, single=False,
                            external_weights=k == "packed") for k in ("packed", "embedded")}
    m = _manifest(arts["packed"])
    assert m["weights"]["packed_bytes"] < 0.6 * m["weights"]["container_bytes"], m["weights"]
    with QemuWorker(env) as w:
        ys = {k: QemuRunner(a, worker=w)(x[:BATCH]) for k, a in arts.items()}
    assert np.array_equal(ys["packed"], ys["embedded"])
