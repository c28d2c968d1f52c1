"""`arq-deploy predict`: Cohen et al.'s PREDICT of the deployed smoothed classifier on new images.

End to end from the CLI (images of any size and mode, folders, .npy batches) against in-process `Smooth.predict`;
the statistical guarantee P[a wrong, non-abstained answer] <= alpha on a classifier whose smoothed class is known in
closed form, with a mutant PREDICT (no binomial test) that breaks it; and one-line errors that leave no output."""

import json
import math

import numpy as np
import pytest
from scipy.stats import norm

from arq_deploy.app.predict import PredictConfig, load_inputs, predict_stage
from arq_deploy.certify.smooth import ABSTAIN, Smooth
from arq_deploy.runtime.noise import input_seed

SIGMA = 0.25


def _png(path, array, mode):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def _u8(x):
    """float [0, 1] -> uint8 0..255 (what a PNG of the image holds)."""
    return np.round(np.asarray(x) * 255).astype(np.uint8)


def test_predict_cli_matches_smooth_predict(cli, digits, digits_model, tmp_path):
    from PIL import Image

    from arq_deploy.runtime.runners import OrtRunner

    _, test_ds = digits
    _, ckpt = digits_model
    model = tmp_path / "m.onnx"
    rc, out, err = cli("export", "--weights", ckpt, "--bits", "8", "--calib-images", "64", "--validate-images", "100",
                       "--out", model)
    assert rc == 0, out + err
    x, y = test_ds.x(), test_ds.labels

    # inputs: two 8×8 grayscale PNGs, a folder (recursive, sorted; a text file in it is skipped), an RGB PNG of another
    # size and aspect ratio, a float .npy batch and a single uint8 .npy image
    files = [_png(tmp_path / f"d{i}.png", _u8(x[i, 0]), "L") for i in (0, 1)]
    folder = tmp_path / "folder"
    for rel, i in (("b.png", 2), ("a/c.png", 3), ("a/z/d.png", 4)):
        _png(folder / rel, _u8(x[i, 0]), "L")
    (folder / "notes.txt").write_text("not an image")
    digit = np.kron(_u8(x[5, 0]), np.ones((4, 4), np.uint8))  # 32×32, padded to 48×32, coloured
    wide = np.pad(digit, ((0, 0), (8, 8)))
    rgb = _png(tmp_path / "rgb.png", np.stack([wide, wide, wide // 2], axis=-1), "RGB")
    np.save(tmp_path / "batch.npy", x[6:12])
    np.save(tmp_path / "one_u8.npy", _u8(x[12]))
    args = [model, *files, folder, rgb, tmp_path / "batch.npy", tmp_path / "one_u8.npy", "--sigma", SIGMA,
            "--n", 200]

    # the same inputs, preprocessed here independently of the command
    def gray(path):
        return (np.asarray(Image.open(path), np.float32) / 255)[None]

    rgb_expected = Image.open(rgb).convert("L").resize((12, 8), Image.Resampling.BILINEAR).crop((2, 0, 10, 8))
    expected = ([(str(f), gray(f), y[i]) for f, i in zip(files, (0, 1))]
                + [(str(folder / rel), gray(folder / rel), y[i]) for rel, i in (("a/c.png", 3), ("a/z/d.png", 4),
                                                                                ("b.png", 2))]
                + [(str(rgb), (np.asarray(rgb_expected, np.float32) / 255)[None], y[5])]
                + [(f"{tmp_path / 'batch.npy'}#{k}", x[6 + k], y[6 + k]) for k in range(6)]
                + [(str(tmp_path / "one_u8.npy"), _u8(x[12]).astype(np.float32) / 255, y[12])])
    loaded = load_inputs([str(a) for a in args[1:-4]], (1, 8, 8))
    assert [p.name for p in loaded] == [e[0] for e in expected]
    for p, (name, xe, _) in zip(loaded, expected):
        assert p.x.dtype == np.float32 and p.x.shape == (1, 8, 8)
        assert np.array_equal(p.x, xe.astype(np.float32)), name

    rc, out, err = cli("predict", *args, "--out", tmp_path / "p.jsonl")
    assert rc == 0, out + err
    assert "13 inputs" in out
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == len(expected)

    smooth = Smooth(OrtRunner(model), 10, SIGMA, batch_size=500)
    correct = answered = 0
    for i, (row, (name, xe, label)) in enumerate(zip(rows, expected)):
        seed = input_seed(0, i)
        pred = smooth.predict(xe, 200, 0.001, seed=seed)
        counts = np.sort(smooth.sample_counts(xe, 200, seed, "prediction"))[::-1]
        assert row["input"] == name
        assert row["prediction"] == (None if pred == ABSTAIN else pred), (name, row)
        assert row["abstain"] == (pred == ABSTAIN)
        assert row["class"] == (None if pred == ABSTAIN else str(pred))  # no class names in the metadata
        assert row["counts_top2"] == [int(counts[0]), int(counts[1])]
        assert (row["n"], row["alpha"], row["sigma"]) == (200, 0.001, SIGMA)
        assert row["seconds"] > 0
        if pred != ABSTAIN:
            answered += 1
            correct += int(pred == label)
    print(f"{len(rows)} inputs: {answered} answered, {correct} of them correct")
    assert answered >= len(rows) // 2 and correct >= 0.8 * answered, (answered, correct, rows)

    cfg = PredictConfig.load(tmp_path / "p.config.json")
    assert cfg == PredictConfig(model_path=str(model), inputs=tuple(str(a) for a in args[1:-4]),
                                out=str(tmp_path / "p.jsonl"), sigma=SIGMA, n=200)

    # without --out the same lines go to stdout, and nothing else does
    rc, out, err = cli("predict", *args)
    assert rc == 0, out + err
    def drop_seconds(r):
        return {k: v for k, v in r.items() if k != "seconds"}

    assert [drop_seconds(json.loads(line)) for line in out.splitlines()] == [drop_seconds(r) for r in rows]


# ---------------------------------------------------------------------------------------------------- soundness
def _linear_model(path, w, b):
    """A 2-class ONNX model on 1×2×2 inputs: logits (0, w·x − b), so f(x) = 1 iff w·x > b."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.stack([np.zeros(4), w]).astype(np.float32)
    bias = np.array([0.0, -b], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"], axis=1),
         helper.make_node("Gemm", ["f", "w", "b"], ["logits"], transB=1)],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    return path


class NoTestSmooth(Smooth):
    """Mutant PREDICT: the top count's class, always (the binomial test skipped)."""

    def predict(self, x, n, alpha, seed=0):
        return int(np.argsort(-self.sample_counts(x, n, seed, "prediction"), kind="stable")[0])


def test_predict_wrong_answers_are_bounded_by_alpha(tmp_path):
    """g(x) = 1 with p_1 = P[f(x + σε) = 1] = 0.52 (closed form: w·ε ~ N(0, ‖w‖²σ²)): over T runs of PREDICT with
    different seeds, the rate of non-abstained wrong answers (0) stays <= α + 3 sd; the mutant's does not."""
    from arq_deploy.runtime.runners import OrtRunner

    trials, n, alpha, p1 = 2000, 100, 0.1, 0.52
    w = np.full(4, 0.5)  # ‖w‖ = 1
    x = np.full((1, 2, 2), 0.5, np.float32)  # w·x = 1
    b = 1.0 - SIGMA * norm.ppf(p1)  # P[w·(x + σε) > b] = Φ((w·x − b)/σ) = p1
    model = _linear_model(tmp_path / "linear.onnx", w, b)
    np.save(tmp_path / "same.npy", np.repeat(x[None], trials, axis=0))  # input k gets seed input_seed(7, k)
    rows = predict_stage(PredictConfig(model_path=str(model), inputs=(str(tmp_path / "same.npy"),), sigma=SIGMA, n=n,
                                       alpha=alpha, seed=7, out=str(tmp_path / "p.jsonl")))
    assert len(rows) == trials
    preds = np.array([-1 if r["prediction"] is None else r["prediction"] for r in rows])
    bound = alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)

    real_wrong = float(np.mean(preds == 0))
    mutant = NoTestSmooth(OrtRunner(model), 2, SIGMA, batch_size=500)
    mutant_preds = []
    for k, r in enumerate(rows):
        counts = mutant.sample_counts(x, n, input_seed(7, k), "prediction")
        assert r["counts_top2"] == sorted(counts.tolist(), reverse=True)  # the same noise as the command's
        mutant_preds.append(mutant.predict(x, n, alpha, seed=input_seed(7, k)))
    mutant_wrong = float(np.mean(np.array(mutant_preds) == 0))
    print(f"wrong-answer rate: PREDICT {real_wrong:.4f}, mutant {mutant_wrong:.4f}, bound {bound:.4f} "
          f"(abstain {np.mean(preds == -1):.3f}, correct {np.mean(preds == 1):.3f})")
    assert real_wrong <= bound
    assert mutant_wrong > bound
    assert 0.5 < np.mean(preds == -1) < 1 and np.mean(preds == 1) > 0.02  # near the boundary: mostly abstains


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("inputs,extra,fragments", [
    (["notes.txt"], [], ["notes.txt", "cannot decode image"]),
    (["wrong.npy"], [], ["wrong.npy", "shape (3, 5, 5)", "1×2×2"]),
    (["nan.npy"], [], ["nan.npy", "NaN"]),
    (["big.npy"], [], ["big.npy", "[0, 1]"]),
    (["ok.npy"], ["--sigma", "0"], ["sigma", "> 0"]),
    (["ok.npy", "missing.png"], [], ["missing.png", "no such file"]),
    (["ok.npy"], ["--out", "p.txt"], [".jsonl"]),
])
def test_bad_input_is_one_line_and_writes_nothing(cli, tmp_path, inputs, extra, fragments):
    _linear_model(tmp_path / "linear.onnx", np.full(4, 0.5), 1.0)
    (tmp_path / "notes.txt").write_text("hello, not an image\n")
    np.save(tmp_path / "wrong.npy", np.zeros((3, 5, 5), np.float32))
    np.save(tmp_path / "nan.npy", np.full((1, 2, 2), np.nan, np.float32))
    np.save(tmp_path / "big.npy", np.full((2, 1, 2, 2), 2.0, np.float32))
    np.save(tmp_path / "ok.npy", np.full((1, 2, 2), 0.5, np.float32))
    before = sorted(p.name for p in tmp_path.iterdir())
    extra = extra if "--sigma" in extra else ["--sigma", SIGMA, *extra]
    extra = extra if "--out" in extra else [*extra, "--out", "p.jsonl"]
    rc, out, err = cli("predict", "linear.onnx", *inputs, "--n", 50, *extra, cwd=tmp_path)
    assert rc == 2, (rc, out, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no p.jsonl, no config, no temporary file
