"""`arq-deploy latency-table` (search/latency.py) and `search --latency-budget-ms` with the table it writes."""

import json
import socket

import pytest

from arq_deploy.core.errors import ArqError, UnknownNameError
from arq_deploy.search.env import LatencyCost, LatencyTable
from arq_deploy.search.latency import PAIRS, check_setup, pair_key


@pytest.fixture(scope="module")
def table(digits_model):
    from arq_deploy.search.latency import measure_table

    lm, _ = digits_model
    return measure_table(lm, "x86", "onnxruntime", repeats=5, warmup=2, sigma=0.25, progress=False)


def test_table_covers_every_layer_and_pair_from_three_measured_variants(table, digits_model):
    from arq_deploy.export.quantize.layers import extract_layer_specs

    lm, _ = digits_model
    names = [s.name for s in extract_layer_specs(lm.model, lm.input_shape)]
    assert list(table.entries) == names and table.target == "x86" and table.model == "digits_cnn"
    d = table.details
    for n in names:
        row, src, variants = table.entries[n], table.source[n], d["variants"][n]
        assert set(row) == {pair_key(w, a) for w, a in PAIRS} and all(v > 0 for v in row.values())
        # every width lives in an 8-bit container: W8A8 (uint8 weights), W<8A8 (int8), A<8 (int8 + Clip)
        assert set(variants) == {"uint8-weights", "int8-weights", "int8-weights+clip"}
        assert variants["uint8-weights"]["pairs"] == ["w8a8"]
        assert variants["int8-weights"]["pairs"] == [f"w{w}a8" for w in range(2, 8)]
        assert len(variants["int8-weights+clip"]["pairs"]) == 7 * 6
        for key, v in src.items():  # each entry is its variant's one measurement
            assert key in variants[v]["pairs"] and row[key] == variants[v]["ms"]
        assert d["float_ms"][n] > 0
    assert d["measured"] == 1 + 4 * len(names) + 4  # overhead, float + 3 variants per layer, 4 end-to-end models
    assert d["layer_input_shapes"]["conv1"] == [1, 8, 8] and d["layer_input_shapes"]["linear"] == [64, 1, 1]
    e2e = d["end_to_end"]
    assert set(e2e) == {"float", "w8a8", "w4a8", "w4a4"}
    for v in e2e.values():
        assert v["measured_ms"] > 0 and v["sum_over_measured"] == pytest.approx(v["sum_of_layers_ms"] / v["measured_ms"])
    assert e2e["w4a4"]["sum_of_layers_ms"] == pytest.approx(sum(r["w4a4"] for r in table.entries.values()))


def test_table_round_trips_and_old_tables_still_load(table, tmp_path):
    from arq_deploy.core.fileio import write_json

    write_json(tmp_path / "t.json", table.to_dict())
    again = LatencyTable.load(tmp_path / "t.json")
    assert again == table and again.source["conv1"]["w8a8"] == "uint8-weights"
    old = {"format": LatencyTable.FORMAT, "version": 1, "target": "x86", "model": "m",
           "layers": {"a": {"w2a2": 0.1}}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    t = LatencyTable.load(tmp_path / "old.json")
    assert t.entries == old["layers"] and t.source == {} and t.details == {}
    assert t.to_dict() == old  # nothing added to a table without variants


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_setups_fail_before_work():
    with pytest.raises(UnknownNameError):
        check_setup("no-such-board")
    with pytest.raises(ArqError, match="qemu.*--remote"):
        check_setup("rpi4")
    with pytest.raises(ArqError, match="--backend tvm"):
        check_setup("x86", "onnxruntime", "127.0.0.1:9090")
    with pytest.raises(ArqError, match="cannot reach a TVM RPC server"):
        check_setup("rpi5", "tvm", f"127.0.0.1:{_closed_port()}")
    assert check_setup("x86")[1] == "onnxruntime"


@pytest.mark.parametrize("args,msg", [
    (["--target", "nosuch"], "nosuch"),
    (["--target", "rpi4"], "--remote"),
    (["--target", "rpi5", "--remote", "127.0.0.1:{port}"], "cannot reach"),
])
def test_cli_errors_are_one_line_and_write_nothing(cli, tmp_path, args, msg):
    out = tmp_path / "t.json"
    args = [a.format(port=_closed_port()) for a in args]
    rc, _, err = cli("latency-table", *args, "--out", out)
    assert rc == 2 and err.startswith("error:") and msg in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_latency_budget_search_end_to_end(cli, table, digits_model, tmp_path):
    from arq_deploy.export.quantize.layers import extract_layer_specs

    lm, ckpt = digits_model
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table.to_dict()))
    cost = LatencyCost(extract_layer_specs(lm.model, lm.input_shape), table, "x86")
    floor, top = cost.total([(2, 2)] * 5), cost.total([(8, 8)] * 5)
    budget = floor + 0.5 * abs(top - floor) + 1e-5  # feasible (noisy timings: W8A8 may even cost less than W2A2)
    out = tmp_path / "run"
    rc, stdout, err = cli("search", "--weights", ckpt, "--data", "digits", "--latency-budget-ms", f"{budget:.6f}",
                          "--target", "x86", "--latency-table", path, "--episodes", "3", "--warmup", "2",
                          "--val-images", "12", "--n", "200", "--n-p", "32", "--calib-images", "32", "--n0", "30",
                          "--out", out)
    assert rc == 0, err
    rows = [json.loads(line) for line in (out / "search.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["cost_unit"] == "ms" and r["cost"] <= budget * (1 + 1e-9) for r in rows)
    for r in rows:  # the logged cost is the table's sum for the logged policy
        assert r["cost"] == pytest.approx(sum(table.entries[n][f"w{w}a{a}"] for n, (w, a) in r["policy"].items()))
    rc, _, err = cli("search", "--weights", ckpt, "--latency-budget-ms", "1", "--target", "rpi4",
                     "--latency-table", path, "--episodes", "1", "--out", tmp_path / "other")
    assert rc == 2 and "measured on target 'x86'" in err, err


@pytest.mark.slow
def test_tvm_backend_table(cli, digits_model, tmp_path):
    """TVM x86 build of every variant (about 2-3 min here): same layout as the onnxruntime table."""
    _, ckpt = digits_model
    out = tmp_path / "tvm.json"
    rc, stdout, err = cli("latency-table", "--weights", ckpt, "--target", "x86", "--backend", "tvm", "--repeats",
                          "10", "--no-end-to-end", "--out", out)
    assert rc == 0, err
    t = LatencyTable.load(out)
    assert t.details["backend"] == "tvm" and t.details["end_to_end"] is None
    assert all(len(set(src.values())) == 3 for src in t.source.values())


def one_conv_net():
    """A first conv (its input has a zero point: the plain integer conv2d), a second one on ReLU outputs wide enough
    for the narrow kernel's int16 chunks to follow the bits, then a Linear."""
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def test_integer_table_tells_the_kernels_apart(tmp_path):
    """--backend tvm-int on the AVX2 target: the variants follow the kernel each pair's integer build runs (narrow
    pairs on vpmaddubsw, with the int16 chunk their bits allow; W8A8 on vpmaddwd), not only the QDQ structure, and
    a variant's label is what a real build of one of its pairs reports."""
    import numpy as np
    import torch

    from arq_deploy.core.artifact import load_artifact
    from arq_deploy.export.pipeline import load
    from arq_deploy.export.qdq import float_onnx, save_onnx
    from arq_deploy.export.quantize.quant import fold_batchnorm
    from arq_deploy.search.latency import _wrap, layer_inputs, measure_table, quantized_layer_graphs, single_layer
    from arq_deploy.targets.backends import compile_onnx

    torch.manual_seed(0)
    lm = load(f"{__name__}:one_conv_net", None, input_shape=(3, 16, 16))
    t = measure_table(lm, "x86-avx2", "tvm-int", repeats=3, warmup=1, sigma=0.25, progress=False, end_to_end=False)
    assert t.details["backend"] == "tvm-int" and t.details["int_kernel"] == "auto"
    conv = t.details["variants"]["2"]
    kernels = {label.split("|")[1].split("/")[0] for label in conv}
    assert kernels == {"vpmaddubsw", "vpmaddwd"}, conv
    src = t.source["2"]
    assert "vpmaddwd" in src["w8a8"] and "vpmaddubsw" in src["w2a2"]
    chunks = {int(label.split("chunk")[1]) for label in conv if "chunk" in label}
    assert len(chunks) >= 2  # narrower pairs keep more words in one int16 sum
    assert int(src["w2a2"].split("chunk")[1]) == max(chunks)  # the narrowest pair gets the longest chunk
    first = t.details["variants"]["0"]
    assert {lab.split("|")[1] for lab in first} == {"int-conv2d"} and len(first) == 3  # structure only
    assert len(t.details["variants"]["6"]) == 3  # the Linear: int matmul at every width
    assert t.details["measured"] == 1 + (1 + 3) + (1 + len(conv)) + (1 + 3)  # overhead; float + variants per layer

    # the plan is what the build runs: compile one pair's layer graph and read its manifest
    folded = fold_batchnorm(lm.model)
    x = layer_inputs(folded, lm.input_shape, ["2"], sigma=0.25)["2"]
    prefix, shape, xin, layer = single_layer(folded.get_submodule("2"), x)
    graphs = quantized_layer_graphs(prefix, layer, xin, float_onnx(_wrap(prefix, layer), shape))
    save_onnx(graphs[(2, 2)][0], tmp_path / "w2a2.onnx")
    art = load_artifact(compile_onnx(tmp_path / "w2a2.onnx", "x86-avx2", tmp_path / "a", batch_size=1, single=False,
                                     integer=True))
    built = art.manifest["compile"]["schedule"]["integer_lowering"]["conv2d_layers"][0]
    assert src["w2a2"].split("|")[1] == f"{built['kernel']}/chunk{built['chunk']}"
    assert np.isfinite(list(t.entries["2"].values())).all()


def test_integer_backend_bad_setups():
    with pytest.raises(ArqError, match="CPU targets only"):
        check_setup("cuda", "tvm-int")
    with pytest.raises(ArqError, match="needs --backend tvm-int"):
        check_setup("x86", "onnxruntime", int_kernel="vpmaddubsw")
    with pytest.raises(ArqError, match="unknown integer kernel"):
        check_setup("x86", "tvm-int", int_kernel="avx9000")
    assert check_setup("x86-avx2", "tvm-int", int_kernel="vpmaddubsw")[1] == "tvm-int"
