"""The command line as a user meets it: fast help, one-line errors with exit code 2, no half-written files."""

import json
import subprocess
import sys

import pytest


def test_help_is_fast_and_imports_no_heavy_library():
    code = ("import sys, arq_deploy.app.cli; "
            "print(sorted(m for m in ('torch', 'tvm', 'onnxruntime', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_lists_commands(cli):
    rc, out, _ = cli("--help")
    assert rc == 0
    for cmd in ("export", "compile", "certify", "train", "layers", "demo", "targets"):
        assert cmd in out


def assert_one_line_error(rc, out, err, *fragments):
    assert rc == 2, (rc, out, err)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.mark.parametrize("args,fragments", [
    (["layers", "--model", "resnet21"], ["unknown model", "resnet20"]),
    (["layers", "--model", "resnet20", "--bits", "9"], ["2..8"]),
    (["layers", "--model", "resnet20", "--bits", "W4"], ["cannot read bits"]),
    (["compile", "README.md", "--target", "z80", "--out", "never"], ["z80"]),
    (["export", "--model", "digits_cnn", "--bits", "8", "--data", "/nonexistent/folder", "--out", "never.onnx"],
     ["/nonexistent/folder"]),
    (["certify", "README.md", "--sigma", "0.25", "--out", "never.tsv"], ["README.md"]),
    (["certify", "README.md", "--sigma", "-1", "--out", "never.tsv"], ["sigma"]),
    (["certify", "README.md", "--sigma", "0.25", "--alpha", "1.5", "--out", "never.tsv"], ["alpha"]),
    (["certify", "README.md", "--sigma", "0.25", "--n0", "0", "--out", "never.tsv"], ["n0"]),
])
def test_bad_input_one_line_exit_2(cli, tmp_path, args, fragments):
    rc, out, err = cli(*args, cwd=tmp_path)
    assert_one_line_error(rc, out, err, *fragments)
    assert not any(p.name.startswith("never") for p in tmp_path.iterdir())


def test_policy_with_unknown_layer_and_bad_bits(cli, tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"format": "arq-deploy/policy", "version": 1, "default": None,
                             "layers": {"layer9.conv": [4, 4]}}))
    assert_one_line_error(*cli("layers", "--model", "resnet20", "--policy", p), "layer9.conv")
    p.write_text(json.dumps({"format": "arq-deploy/policy", "version": 1, "default": None,
                             "layers": {"conv1": [1, 4]}}))
    assert_one_line_error(*cli("layers", "--model", "resnet20", "--policy", p), "2..8")


def test_weights_that_do_not_fit(cli, digits_model, tmp_path):
    _, ckpt = digits_model
    assert_one_line_error(*cli("layers", "--model", "resnet20", "--weights", ckpt), "do not fit")


def test_data_in_no_known_format(cli, digits_model, tmp_path):
    _, ckpt = digits_model
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    rc, out, err = cli("export", "--weights", ckpt, "--bits", "8", "--data", tmp_path / "junk", "--out",
                       tmp_path / "m.onnx")
    assert_one_line_error(rc, out, err)
    assert not (tmp_path / "m.onnx").exists()


def test_malformed_onnx_everywhere(cli, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all" * 20)
    assert_one_line_error(*cli("certify", bad, "--sigma", "0.25", "--out", tmp_path / "c.tsv"), "bad.onnx")
    assert_one_line_error(*cli("compile", bad, "--target", "x86", "--out", tmp_path / "art"))
    assert not (tmp_path / "c.tsv").exists() and not (tmp_path / "art").exists()


def test_export_then_certify_from_the_cli(cli, digits_model, tmp_path):
    """A user's path: checkpoint -> export (mixed policy) -> certify with onnxruntime -> resume adds nothing."""
    _, ckpt = digits_model
    rc, out, err = cli("layers", "--weights", ckpt, "--bits", "W4A8")
    assert rc == 0 and "conv1" in out and "BOPs" in out
    pol = tmp_path / "policy.json"
    pol.write_text(json.dumps({"format": "arq-deploy/policy", "version": 1, "default": [6, 6],
                               "layers": {"conv1": [8, 8], "conv3": [2, 8], "linear": [4, 4]}}))
    rc, out, err = cli("export", "--weights", ckpt, "--policy", pol, "--out", tmp_path / "m.onnx")
    assert rc == 0, err
    rep = json.loads((tmp_path / "m.export.json").read_text())
    assert rep["validation"]["top1_agreement"] >= 0.99 and rep["sigma"] == 0.25  # σ taken from the checkpoint
    args = ["certify", tmp_path / "m.onnx", "--sigma", "0.25", "--n0", "20", "--n", "200", "--skip", "60",
            "--out", tmp_path / "c.tsv"]
    rc, out, err = cli(*args)
    assert rc == 0, err
    rows = [l for l in (tmp_path / "c.tsv").read_text().splitlines() if l and not l.startswith(("#", "idx"))]
    assert len(rows) == 9
    summary = json.loads((tmp_path / "c.summary.json").read_text())["summary"]
    certs = check_certificates_match_the_library(rows, tmp_path / "m.onnx", sigma=0.25, n0=20, n=200, alpha=0.001,
                                                 skip=60, seed=0, batch_size=500)
    assert summary["count"] == 9 and summary["acr"] == pytest.approx(sum(c.radius for c in certs if c.correct) / 9)
    assert summary["certified_accuracy"]["0"] == sum(c.correct for c in certs) / 9
    assert f"9 images: ACR {summary['acr']:.3f}" in out
    # the noise-trained digits model certifies most of these 9 images (measured: 7 correct, 2 abstentions, ACR 0.265;
    # the radius is capped at 0.25·Φ⁻¹(0.001^(1/200)) = 0.456 at this N)
    assert sum(c.correct for c in certs) >= 5 and summary["acr"] >= 0.15, summary
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc, out2, err = cli(*args)  # resume: nothing new to do, same result
    assert rc == 0 and out2 == out
    rows2 = [l for l in (tmp_path / "c.tsv").read_text().splitlines() if l and not l.startswith(("#", "idx"))]
    assert rows2 == rows
    # the same log with another σ is refused, and the log is untouched
    args[3] = "0.5"
    assert_one_line_error(*cli(*args))
    assert (tmp_path / "c.tsv").read_text().count("\n") == len(rows) + 2


def check_certificates_match_the_library(rows, model, sigma, n0, n, alpha, skip, seed, batch_size):
    """The CLI's log rows are CERTIFY (Cohen et al.) of the same model, run in process with `Smooth.certify` on the
    same digits test images, per-input seeds `input_seed(seed, idx)` and N: identical, since the noise is seeded.
    Each row also obeys CERTIFY's formulas, checked with scipy directly: p̲_A is the α-quantile of
    Beta(count_A, n − count_A + 1), and the radius is σ·Φ⁻¹(p̲_A) where p̲_A > 1/2 (else an abstention, radius 0)."""
    from scipy.stats import beta, norm

    from arq_deploy.certify.smooth import ABSTAIN, Certificate, Smooth
    from arq_deploy.core.data import load_dataset
    from arq_deploy.runtime.noise import input_seed
    from arq_deploy.targets.backends import open_runner

    certs = [Certificate.from_row(r) for r in rows]
    ds = load_dataset("digits", "test")
    assert [c.idx for c in certs] == list(range(0, len(ds), skip))
    runner, _ = open_runner(model, batch_size=batch_size)
    smooth = Smooth(runner, ds.num_classes, sigma, batch_size=batch_size)
    for c in certs:
        ref = smooth.certify(ds.x([c.idx])[0], n0, n, alpha, seed=input_seed(seed, c.idx),
                             label=int(ds.labels[c.idx]), idx=c.idx)
        assert (c.label, c.prediction, c.count_a, c.pa_lower, c.radius, c.n0, c.n) == \
            (ref.label, ref.prediction, ref.count_a, ref.pa_lower, ref.radius, ref.n0, ref.n), (c, ref)
        want = beta.ppf(alpha, c.count_a, n - c.count_a + 1) if c.count_a else 0.0
        assert c.pa_lower == pytest.approx(want, rel=1e-9, abs=1e-12)
        if c.pa_lower > 0.5:
            assert c.prediction != ABSTAIN and c.radius == pytest.approx(sigma * norm.ppf(c.pa_lower), rel=1e-9)
        else:
            assert c.prediction == ABSTAIN and c.radius == 0.0
    return certs


def test_train_cli_qat(cli, digits_model, tmp_path):
    _, ckpt = digits_model
    rc, out, err = cli("train", "--weights", ckpt, "--bits", "W4A6", "--sigma", "0.25", "--epochs", "1", "--out",
                       tmp_path / "qat.pt")
    assert rc == 0, err
    rc, out, err = cli("export", "--weights", tmp_path / "qat.pt", "--out", tmp_path / "qat.onnx")
    assert rc == 0, err
    rep = json.loads((tmp_path / "qat.export.json").read_text())
    assert rep["policy_summary"] == "W4A6" and rep["validation"]["top1_agreement"] >= 0.99


@pytest.mark.slow  # run by .ci/run (SLOW_TESTS); keeps `make test` near 15 minutes
def test_certify_on_ray_matches_sequential(cli, digits_model, tmp_path):
    _, ckpt = digits_model
    rc, _, err = cli("export", "--weights", ckpt, "--bits", "W4A8", "--out", tmp_path / "m.onnx")
    assert rc == 0, err
    common = ["--sigma", "0.25", "--n0", "20", "--n", "300", "--skip", "90"]
    assert cli("certify", tmp_path / "m.onnx", *common, "--out", tmp_path / "seq.tsv")[0] == 0
    rc, out, err = cli("certify", tmp_path / "m.onnx", *common, "--ray", "local", "--ray-workers", "2",
                       "--out", tmp_path / "ray.tsv")
    assert rc == 0, err

    def rows(p):  # every column but the timing
        lines = [l.split("\t") for l in p.read_text().splitlines() if l and not l.startswith(("#", "idx"))]
        return sorted(l[:5] + l[6:] for l in lines)

    assert len(rows(tmp_path / "seq.tsv")) == 6
    assert rows(tmp_path / "ray.tsv") == rows(tmp_path / "seq.tsv")
    assert_one_line_error(*cli("certify", "--weights", ckpt, *common, "--ray", "local", "--out", tmp_path / "x.tsv"),
                          "MODEL_PATH")


@pytest.mark.slow  # run by .ci/run (SLOW_TESTS); keeps `make test` near 15 minutes
def test_certify_incremental_from_float_log(cli, digits_model, tmp_path):
    """float certify -> quantized IRS from its log: the IRS path is taken, radii shrink by at most the ζ effect,
    and a cache from another model is refused without touching the output."""
    _, ckpt = digits_model
    for bits, name in (("float", "f"), ("8", "q")):
        assert cli("export", "--weights", ckpt, "--bits", bits, "--out", tmp_path / f"{name}.onnx")[0] == 0
    rc, _, err = cli("certify", tmp_path / "f.onnx", "--sigma", "0.25", "--n", "2000", "--skip", "60",
                     "--out", tmp_path / "f.tsv")
    assert rc == 0, err
    rc, out, err = cli("certify", tmp_path / "q.onnx", "--incremental-from", tmp_path / "f.tsv", "--float-model",
                       tmp_path / "f.onnx", "--n-p", "400", "--out", tmp_path / "qi.tsv")
    assert rc == 0, err
    assert "IRS path" in out
    summary = json.loads((tmp_path / "qi.summary.json").read_text())
    assert summary["meta"]["method"] == "irs" and summary["meta"]["n_p"] == 400
    assert summary["meta"]["cost"]["irs_fraction"] > 0.5
    f_acr = json.loads((tmp_path / "f.summary.json").read_text())["summary"]["acr"]
    assert 0 < summary["summary"]["acr"] <= f_acr + 1e-9
    assert summary["meta"]["float_labels"] == str(tmp_path / "f.tsv") + ".labels"
    f_rows = [l.split("\t") for l in (tmp_path / "f.tsv").read_text().splitlines()
              if l and not l.startswith(("#", "idx"))]
    f_certified = sum(r[2] != "-1" for r in f_rows)  # inputs the float model did not abstain on: IRS draws n_p there
    assert f_certified > 0 and summary["meta"]["cost"]["count"] == len(f_rows)
    # the first run computes f's labels on the n_p samples of every input f certified ...
    assert summary["meta"]["cost"]["float_samples_per_input"] == pytest.approx(400 * f_certified / len(f_rows))
    rc, _, err = cli("certify", tmp_path / "q.onnx", "--incremental-from", tmp_path / "f.tsv", "--float-model",
                     tmp_path / "f.onnx", "--n-p", "400", "--out", tmp_path / "qi2.tsv")
    assert rc == 0, err
    again = json.loads((tmp_path / "qi2.summary.json").read_text())
    assert again["meta"]["cost"]["float_samples_per_input"] == 0  # ... a later one runs only f_q, same certificates
    assert again["summary"] == summary["summary"] | {"seconds_per_input": again["summary"]["seconds_per_input"]}
    assert_one_line_error(*cli("certify", tmp_path / "q.onnx", "--incremental-from", tmp_path / "f.tsv",
                               "--float-model", tmp_path / "q.onnx", "--out", tmp_path / "bad.tsv"), "model_sha256")
    assert_one_line_error(*cli("certify", tmp_path / "q.onnx", "--incremental-from", tmp_path / "f.tsv",
                               "--out", tmp_path / "bad.tsv"), "--float-model")
    assert_one_line_error(*cli("certify", tmp_path / "q.onnx", "--incremental-from", tmp_path / "f.tsv",
                               "--float-model", tmp_path / "f.onnx", "--fallback-n", "-1", "--out",
                               tmp_path / "bad.tsv"), "--fallback-n")
    assert not (tmp_path / "bad.tsv").exists()
    # --fallback-n: the fallback CERTIFY's N, recorded in the log's meta; the irs-path rows are the same
    rc, _, err = cli("certify", tmp_path / "q.onnx", "--incremental-from", tmp_path / "f.tsv", "--float-model",
                     tmp_path / "f.onnx", "--n-p", "400", "--fallback-n", "500", "--out", tmp_path / "qf.tsv")
    assert rc == 0, err
    fb = json.loads((tmp_path / "qf.summary.json").read_text())
    assert fb["meta"]["fallback_n"] == 500 and fb["meta"]["cost"]["irs_fraction"] == \
        summary["meta"]["cost"]["irs_fraction"]
