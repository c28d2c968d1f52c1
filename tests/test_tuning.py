"""MetaSchedule tuning with a reusable database (targets/tuning.py) through compile_onnx and the CLI."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from arq_deploy.core.errors import ArqError


def tiny_model(path):
    """x (N×3×8×8) -> Conv 3->8 -> Relu -> GlobalAveragePool -> Flatten -> logits (N×8)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    b = rng.normal(size=8).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["logits"])]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 8])],
                          [nh.from_array(w, "w"), nh.from_array(b, "b")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def _tuning(art):
    compile_info = json.loads((art / "manifest.json").read_text())["compile"]
    return compile_info, compile_info["schedule"]


def _agrees_with_onnxruntime(art, onnx_path):
    from arq_deploy.runtime.runners import OrtRunner
    from arq_deploy.runtime.tvm_runner import TvmRunner

    x = np.random.default_rng(1).random((20, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(TvmRunner(art)(x), OrtRunner(onnx_path)(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("trials", [-1, 2.5, "8"])
def test_bad_trial_counts_are_clear_errors(trials, tmp_path):
    from arq_deploy.targets.backends import compile_onnx

    with pytest.raises(ArqError, match="tune trials must be an integer >= 0"):
        compile_onnx(tiny_model(tmp_path / "m.onnx"), "x86", tmp_path / "art", tune_trials=trials)
    assert not (tmp_path / "art").exists()


def test_cli_negative_trials(cli, tmp_path):
    rc, out, err = cli("compile", tiny_model(tmp_path / "m.onnx"), "--out", tmp_path / "art", "--tune-trials", "-4")
    assert rc == 2
    assert err.strip().splitlines() == ["error: --tune-trials must be an integer >= 0, got -4"]
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("target", ["cuda", "rpi4"])
def test_tuning_only_for_host_cpu_targets(target, tmp_path):
    from arq_deploy.targets.backends import compile_onnx

    with pytest.raises(ArqError, match="host CPU targets only|not installed"):
        compile_onnx(tiny_model(tmp_path / "m.onnx"), target, tmp_path / "art", tune_trials=4)
    assert not (tmp_path / "art").exists()


def test_database_path_that_is_a_file(tmp_path):
    from arq_deploy.targets.backends import compile_onnx

    (tmp_path / "db").write_text("not a directory")
    with pytest.raises(ArqError, match="is a file"):
        compile_onnx(tiny_model(tmp_path / "m.onnx"), "x86", tmp_path / "art", tuning_db=tmp_path / "db",
                     single=False)


def test_empty_database_without_trials_changes_nothing(tmp_path):
    """tuning_db with 0 trials: nothing to apply, no trials run, every function keeps the arq schedule."""
    from arq_deploy.targets.backends import compile_onnx

    onnx_path = tiny_model(tmp_path / "m.onnx")
    art = compile_onnx(onnx_path, "x86", tmp_path / "art", batch_size=4, tuning_db=tmp_path / "db", single=False)
    compile_info, sched = _tuning(art)
    assert compile_info["tuning"] == {"trials": 0, "database": str(tmp_path / "db")}
    rep = sched["tuning"]
    assert rep["tasks"] >= 2 and rep["trials_run"] == 0 and rep["records"] == 0 and rep["reused"] == 0
    assert sched["funcs_tuned"] == 0 and sched["funcs_arq"] >= 2
    _agrees_with_onnxruntime(art, onnx_path)


@pytest.mark.slow
def test_tuning_creates_a_database_that_a_second_build_reuses(tmp_path):
    """A tiny budget tunes every task into the database; the same build again runs no trial and applies them all."""
    from arq_deploy.targets.backends import compile_onnx

    onnx_path, db = tiny_model(tmp_path / "m.onnx"), tmp_path / "db"
    art1 = compile_onnx(onnx_path, "x86", tmp_path / "a1", batch_size=4, tune_trials=6, tuning_db=db, single=False)
    _, s1 = _tuning(art1)
    r1 = s1["tuning"]
    assert r1["tasks"] >= 2 and r1["tuned"] == r1["tasks"] and r1["reused"] == 0
    assert 0 < r1["trials_run"] <= 6 and r1["records"] == r1["trials_run"]
    assert (db / "database_tuning_record.json").stat().st_size > 0
    assert s1["funcs_tuned"] == r1["tasks"]  # every task has a record (the arq baseline at least)
    _agrees_with_onnxruntime(art1, onnx_path)

    records = (db / "database_tuning_record.json").read_text()
    art2 = compile_onnx(onnx_path, "x86", tmp_path / "a2", batch_size=4, tune_trials=6, tuning_db=db, single=False)
    _, s2 = _tuning(art2)
    r2 = s2["tuning"]
    assert r2["trials_run"] == 0 and r2["tuned"] == 0 and r2["reused"] == r1["tasks"]
    assert s2["funcs_tuned"] == r1["tasks"]
    assert (db / "database_tuning_record.json").read_text() == records
    _agrees_with_onnxruntime(art2, onnx_path)
