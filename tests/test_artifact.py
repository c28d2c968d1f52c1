"""Artifact directories: manifest contents, hash verification, tampering and missing files."""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from arq_deploy.core.artifact import MANIFEST, hash_files, load_artifact, write_manifest
from arq_deploy.core.errors import ArtifactIntegrityError
from arq_deploy.core.policy import QuantPolicy
from arq_deploy.runtime.runners import OrtRunner

BATCH, SHAPE, K = 4, (3, 8, 8), 5


def tiny_model() -> onnx.ModelProto:
    """Conv 3->4 (3×3, pad 1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm 4->5, with arq.* metadata."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "conv.weight"),
             numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "conv.bias"),
             numpy_helper.from_array(rng.normal(size=(K, 4)).astype(np.float32), "fc.weight"),
             numpy_helper.from_array(rng.normal(size=K).astype(np.float32), "fc.bias")]
    nodes = [helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], transB=1)]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *SHAPE])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", K])
    m = helper.make_model(helper.make_graph(nodes, "tiny", [x], [y], inits),
                          opset_imports=[helper.make_opsetid("", 17)],
                          ir_version=10)  # onnx 1.23 defaults to IR 14, which onnxruntime 1.31 cannot load
    for k, v in {"policy": QuantPolicy.for_layers(["conv"], [(4, 8)]).to_json(), "sigma": "0.5", "num_classes": str(K),
                 "mean": "[0.5, 0.5, 0.5]", "std": "[0.25, 0.25, 0.25]", "bops": "1000", "bops_fraction": "0.015",
                 "model": "tiny"}.items():
        m.metadata_props.add(key=f"arq.{k}", value=v)
    onnx.checker.check_model(m)
    return m


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from arq_deploy.targets.backends import compile_onnx

    d = tmp_path_factory.mktemp("art")
    onnx.save(tiny_model(), str(d / "tiny.onnx"))
    return d / "tiny.onnx", compile_onnx(d / "tiny.onnx", "x86", d / "artifact", batch_size=BATCH)


@pytest.fixture
def art_copy(built, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(built[1], dst)
    return dst


def test_load_artifact_and_properties(built):
    src, path = built
    art = load_artifact(path)
    assert art.path == path and art.target_name == "x86"
    assert art.input_shape == SHAPE and art.batch_size == BATCH and art.num_classes == K
    assert art.library_path.is_file() and art.onnx_path.read_bytes() == src.read_bytes()
    assert art.policy == QuantPolicy.for_layers(["conv"], [(4, 8)]) and art.sigma == 0.5 and art.bops == 1000
    assert art.mean == [0.5] * 3 and art.std == [0.25] * 3 and art.arq["model"] == "tiny"
    assert art.arq["bops_fraction"] == 0.015 and art.arq["num_classes"] == K
    m = art.manifest
    assert m["format_version"] == 1 and m["created"].endswith("+00:00")
    assert m["files"] == hash_files(path) and set(m["files"]) == {"model.so", "model_b1.so", "model.onnx"}
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.onnx", "model.so", "model_b1.so"]


def test_runner_on_artifact_matches_onnxruntime(built):
    from arq_deploy.runtime.tvm_runner import TvmRunner

    src, path = built
    x = np.random.default_rng(1).random((11, *SHAPE), dtype=np.float32)
    got, ref = TvmRunner(path)(x), OrtRunner(src)(x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["model.so", "model_b1.so", "model.onnx"])
def test_tampered_file_is_named(art_copy, name):
    f = art_copy / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match=name.replace(".", r"\.")):
        load_artifact(art_copy)


def test_runner_refuses_tampered_library(art_copy):
    from arq_deploy.runtime.tvm_runner import TvmRunner

    with open(art_copy / "model.so", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactIntegrityError, match="model.so"):
        TvmRunner(art_copy)


def test_runner_rechecks_the_library_it_loads(art_copy):
    """A library changed between load_artifact and loading is caught (the runner hashes the bytes it loads)."""
    from arq_deploy.runtime.tvm_runner import TvmRunner

    art = load_artifact(art_copy)
    with open(art_copy / "model_b1.so", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactIntegrityError, match="model_b1.so changed"):
        TvmRunner(art)


def test_rebuilt_artifact_runs_the_new_library(built, tmp_path):
    """dlopen hands back an already-loaded library for the same path: a runner must still run the rebuilt one."""
    from arq_deploy.runtime.tvm_runner import TvmRunner
    from arq_deploy.targets.backends import compile_onnx

    src, _ = built
    other = tiny_model()
    w = other.graph.initializer[2]
    w.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(w), w.name))
    onnx.save(other, str(tmp_path / "other.onnx"))
    out = tmp_path / "art"
    x = np.random.default_rng(2).random((BATCH + 1, *SHAPE), dtype=np.float32)
    compile_onnx(src, "x86", out, batch_size=BATCH)
    first = TvmRunner(out)(x)
    compile_onnx(tmp_path / "other.onnx", "x86", out, batch_size=BATCH)
    second = TvmRunner(out)(x)
    np.testing.assert_allclose(first, OrtRunner(src)(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(second, OrtRunner(tmp_path / "other.onnx")(x), rtol=1e-4, atol=1e-4)
    assert np.abs(first - second).max() > 0.1


def test_missing_or_invalid_manifest(art_copy, tmp_path):
    with pytest.raises(ArtifactIntegrityError, match="does not exist"):
        load_artifact(tmp_path / "nowhere")
    text = (art_copy / MANIFEST).read_text()
    (art_copy / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactIntegrityError, match="not valid JSON"):
        load_artifact(art_copy)
    (art_copy / MANIFEST).write_text(json.dumps({"format": "arq-artifact", "format_version": 1, "files": {}}))
    with pytest.raises(ArtifactIntegrityError, match="files"):
        load_artifact(art_copy)
    (art_copy / MANIFEST).unlink()
    with pytest.raises(ArtifactIntegrityError, match="no manifest.json"):
        load_artifact(art_copy)


def test_missing_listed_file(art_copy):
    (art_copy / "model.onnx").unlink()
    with pytest.raises(ArtifactIntegrityError, match="model.onnx .*missing"):
        load_artifact(art_copy)


def test_manifest_may_not_point_outside(art_copy):
    m = json.loads((art_copy / MANIFEST).read_text())
    outside = art_copy.parent / "outside.bin"
    outside.write_bytes(b"x")
    m["files"]["../outside.bin"] = hash_files(art_copy.parent)["outside.bin"]
    (art_copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactIntegrityError, match="outside"):
        load_artifact(art_copy)


def test_write_manifest_hashes_every_file(tmp_path):
    d = tmp_path / "a"
    (d / "sub").mkdir(parents=True)
    (d / "model.so").write_bytes(b"lib")
    (d / "sub" / "extra.txt").write_text("x")
    onnx.save(tiny_model(), str(d / "model.onnx"))
    info = {"target": {"name": "x86", "tvm_target": {"kind": "llvm"}},
            "input": {"name": "input", "shape": [BATCH, *SHAPE]}, "batch_size": BATCH, "note": "kept"}
    m = write_manifest(d, info)
    assert set(m["files"]) == {"model.so", "model.onnx", "sub/extra.txt"} and m["note"] == "kept"
    assert m["input"]["dtype"] == "float32" and m["input"]["range"] == [0.0, 1.0]
    assert m["arq"]["sigma"] == 0.5 and m["tools"]["onnx"] == onnx.__version__
    art = load_artifact(d)
    assert art.manifest == json.loads((d / MANIFEST).read_text())
    (d / "sub" / "extra.txt").write_text("y")
    with pytest.raises(ArtifactIntegrityError, match="sub/extra.txt"):
        load_artifact(d)
