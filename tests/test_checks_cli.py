"""`arq-deploy check corruptions|systematic|attacks` and `arq-deploy report`, end to end on the digits W8A8 export and
its compiled x86 TVM artifact: the deployed model's numbers agree with the same check run on the paired torch model.

Stated tolerances (the W8A8 export agrees with torch on 100% of clean digits test images):
  corruptions / systematic: |accuracy(deployed) - accuracy(torch)| <= 0.02 per row;
  attacks: transferred white-box accuracy within 0.05 of torch's.
"""

import json
import shutil
from pathlib import Path

import pytest

CORR = "gaussian_noise,impulse_noise,glass_blur,fog"


@pytest.fixture(scope="module")
def exported(digits_model, cli, tmp_path_factory):
    """W8A8 and float exports of the digits model (each with its paired NAME.qmodel.pt)."""
    _, ckpt = digits_model
    d = tmp_path_factory.mktemp("checks")
    for bits, name in (("8", "w8a8"), ("float", "float")):
        rc, out, err = cli("export", "--weights", ckpt, "--data", "digits", "--bits", bits, "--out", d / f"{name}.onnx")
        assert rc == 0, err
    return d


def test_export_writes_the_paired_torch_model(exported):
    import torch

    from arq_deploy.core.data import load_dataset
    from arq_deploy.core.fileio import sha256_file
    from arq_deploy.export.pipeline import load
    from arq_deploy.runtime.runners import OrtRunner, TorchRunner

    ck = torch.load(exported / "w8a8.qmodel.pt", weights_only=True)
    assert ck["onnx_sha256"] == sha256_file(exported / "w8a8.onnx")
    rep = json.loads((exported / "w8a8.export.json").read_text())
    assert rep["policy_summary"] == "W8A8" and rep["torch_model"] == str(exported / "w8a8.qmodel.pt")
    assert ck["policy"]["layers"] and all(list(b) == [8, 8] for b in ck["policy"]["layers"].values()), ck["policy"]
    # the checkpoint is the deployed model: rebuilt from it, the fake-quant torch model predicts what the ONNX
    # export predicts on onnxruntime (the white-box attacks' gradients are taken from it)
    lm = load(None, str(exported / "w8a8.qmodel.pt"))
    x = load_dataset("digits", "test").x()
    torch_pred = TorchRunner(lm.model, lm.input_shape, lm.num_classes)(x).argmax(1)
    ort_pred = OrtRunner(exported / "w8a8.onnx")(x).argmax(1)
    assert (torch_pred == ort_pred).mean() >= 0.99


def test_check_corruptions_on_the_onnx_export_agrees_with_torch_and_resumes(exported, cli, tmp_path):
    out = tmp_path / "corr"
    args = ("check", "corruptions", exported / "w8a8.onnx", "--data", "digits", "--max", "120", "--corruptions", CORR,
            "--severities", "1,3,5", "--reference", exported / "float.onnx", "--compare-torch", "--out", out)
    rc, stdout, err = cli(*args)
    assert rc == 0, err
    res = json.loads((out / "corruptions.json").read_text())
    assert len(res["rows"]) == 12 and res["meta"]["images"] == 120
    s = res["summary"]
    assert 0.8 < s["clean_accuracy"] <= 1.0
    assert s["mean_corruption_accuracy"] < s["clean_accuracy"]
    assert 0.5 < s["mce"] < 2.0
    # the summary follows from the rows: mNR = mean (A_0 - A_cs) / A_0; mCE = mean_c Σ_s E_cs / Σ_s E_ref_cs with
    # E = 1 - accuracy and the float reference's rows (logged beside them)
    accs = {(r["corruption"], r["severity"]): r["accuracy"] for r in res["rows"]}
    a0 = s["clean_accuracy"]
    assert s["mnr"] == pytest.approx(sum((a0 - a) / a0 for a in accs.values()) / len(accs), abs=1e-12)
    assert s["mean_corruption_accuracy"] == pytest.approx(sum(accs.values()) / len(accs), abs=1e-12)
    ref_rows = [json.loads(l) for l in (out / "corruptions-reference.jsonl").read_text().splitlines()[1:]]
    ref = {(r["corruption"], r["severity"]): r["accuracy"] for r in ref_rows if r["severity"] > 0}
    assert ref.keys() == accs.keys()
    ce = [sum(1 - accs[c, k] for k in (1, 3, 5)) / sum(1 - ref[c, k] for k in (1, 3, 5)) for c in CORR.split(",")]
    assert s["mce"] == pytest.approx(sum(ce) / len(ce), abs=1e-12)
    assert res["torch"]["max_abs_accuracy_diff"] <= 0.02
    assert (out / "corruptions.png").stat().st_size > 1000
    by = {(r["corruption"], r["severity"]): r["accuracy"] for r in res["rows"]}
    assert by[("gaussian_noise", 5)] <= by[("gaussian_noise", 1)]
    lines = (out / "corruptions.jsonl").read_text().splitlines()
    rc, _, err = cli(*args)  # a rerun reads every row back: nothing recomputed, nothing appended
    assert rc == 0, err
    assert (out / "corruptions.jsonl").read_text().splitlines() == lines
    assert json.loads((out / "corruptions.json").read_text())["rows"] == res["rows"]


@pytest.mark.slow  # run by .ci/run (SLOW_TESTS); keeps `make test` near 15 minutes
def test_check_systematic_and_attacks_then_report(exported, cli, tmp_path):
    run = tmp_path / "run"
    rc, _, err = cli("check", "systematic", exported / "w8a8.onnx", "--data", "digits", "--max", "120", "--variations",
                     "jpeg-pil-q50,jpeg-cv2-q50,resize-cv2-nearest,resize-pil-bilinear", "--compare-torch",
                     "--out", run / "systematic")
    assert rc == 0, err
    sysres = json.loads((run / "systematic" / "systematic.json").read_text())
    assert sysres["torch"]["max_abs_accuracy_diff"] <= 0.02
    check_systematic_numbers(sysres, exported / "w8a8.onnx")

    rc, stdout, err = cli("check", "attacks", exported / "w8a8.onnx", "--data", "digits", "--max", "60", "--attacks",
                          "fgsm,pgd,square", "--eps", "0.05,0.1", "--steps", "10", "--square-queries", "200",
                          "--masking-images", "60", "--out", run / "attacks")
    assert rc == 0, err
    att = json.loads((run / "attacks" / "attacks.json").read_text())
    s = att["summary"]
    assert s["trusted"], s["masking"]
    assert s["max_transfer_gap"] <= 0.05
    assert max(s["wcar"].values(), key=lambda e: e["eps"])["runner"] < s["clean"]["runner_accuracy"]
    assert "WCAR" in stdout and "passed" in stdout

    rc, stdout, err = cli("report", run)
    assert rc == 0, err
    html = (run / "report.html").read_text()
    assert "Systematic noise" in html and "Adversarial attacks" in html
    assert html.count("data:image/png;base64,") == 2


def check_systematic_numbers(sysres, onnx_path):
    """The systematic check's numbers, recomputed in process on the same seeded subset of 120 digits test images:
    the identity "reference" row is the runner's clean accuracy, a variation row is the accuracy on the images through
    that variation, and ACC_s (RobustMQ) is the mean of the non-reference rows, its drop reference - ACC_s."""
    import numpy as np

    from arq_deploy.certify.checks.systematic import apply_variation
    from arq_deploy.core.data import load_dataset
    from arq_deploy.export.pipeline import pick
    from arq_deploy.runtime.runners import OrtRunner

    names = ["reference", "jpeg-pil-q50", "jpeg-cv2-q50", "resize-cv2-nearest", "resize-pil-bilinear"]
    rows = {r["variation"]: r for r in sysres["rows"]}
    assert list(rows) == names and sysres["meta"]["images"] == 120 and sysres["meta"]["seed"] == 0
    ds = load_dataset("digits", "test")
    idx = pick(len(ds), 120, 0)
    x, labels = ds.x(idx), ds.labels[idx]
    runner = OrtRunner(onnx_path)
    for name in ("reference", "resize-cv2-nearest", "jpeg-pil-q50"):
        acc = float((runner(apply_variation(x, name)).argmax(1) == labels).mean())
        assert rows[name]["n"] == 120 and rows[name]["accuracy"] == pytest.approx(acc, abs=1e-12), name
    assert rows["reference"]["mean_abs_diff"] == 0.0 and rows["resize-cv2-nearest"]["mean_abs_diff"] > 0
    for r in rows.values():
        assert r["accuracy"] == pytest.approx(r["correct"] / r["n"])
    s = sysres["summary"]
    var = {k: r["accuracy"] for k, r in rows.items() if k != "reference"}
    assert s["reference_accuracy"] == rows["reference"]["accuracy"] > 0.8
    assert s["acc_s"] == pytest.approx(float(np.mean(list(var.values()))), abs=1e-12)
    assert s["acc_drop"] == pytest.approx(s["reference_accuracy"] - s["acc_s"], abs=1e-12)
    assert s["worst_accuracy"] == min(var.values()) == var[s["worst"]]


@pytest.mark.timeout(900)
def test_check_runs_on_a_compiled_x86_artifact_and_refuses_a_tampered_one(exported, cli, tmp_path):
    art = tmp_path / "art"
    rc, _, err = cli("compile", exported / "w8a8.onnx", "--target", "x86", "--batch-size", "64", "--out", art)
    assert rc == 0, err
    assert (art / "model.qmodel.pt").is_file()  # compile carries the paired torch model along (hashed)
    rc, _, err = cli("check", "corruptions", art, "--target", "x86", "--data", "digits", "--max", "120",
                     "--corruptions", "gaussian_noise,fog", "--severities", "2", "--compare-torch", "--out", tmp_path / "c")
    assert rc == 0, err
    res = json.loads((tmp_path / "c" / "corruptions.json").read_text())
    assert res["meta"]["backend"].startswith("tvm")
    assert res["torch"]["max_abs_accuracy_diff"] <= 0.02

    bad = tmp_path / "bad"
    shutil.copytree(art, bad)
    with open(bad / "model.qmodel.pt", "ab") as f:
        f.write(b"x")
    rc, _, err = cli("check", "systematic", bad, "--data", "digits", "--out", tmp_path / "b")
    assert rc == 2 and err.startswith("error:") and "Traceback" not in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args, words", [
    (("corruptions", "--corruptions", "snowstorm"), "unknown corruption"),
    (("corruptions", "--severities", "0-6"), "1..5"),
    (("attacks", "--eps", "-2/255"), ">= 0"),
    (("attacks", "--attacks", "cw"), "unknown attack"),
    (("systematic", "--variations", "resize-foo"), "unknown systematic"),
    (("corruptions", "--target", "rpi4"), "rpi4"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(exported, cli, tmp_path, args, words):
    out = tmp_path / "o"
    rc, _, err = cli("check", args[0], exported / "w8a8.onnx", *args[1:], "--data", "digits", "--out", out)
    assert rc == 2, err
    assert err.startswith("error:") and words in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_attacks_refuse_a_torch_model_from_another_export(exported, cli, tmp_path):
    other = tmp_path / "other.onnx"
    shutil.copy(exported / "float.onnx", other)
    shutil.copy(exported / "w8a8.qmodel.pt", other.with_suffix(".qmodel.pt"))
    rc, _, err = cli("check", "attacks", other, "--data", "digits", "--max", "10", "--out", tmp_path / "a")
    assert rc == 2 and "another ONNX model" in err
    assert not Path(tmp_path / "a" / "attacks.json").exists()
