"""Systematic noise (certify/systematic.py): JPEG decoders and qualities, resize pipelines, the resumable run."""

import io
import json

import numpy as np
import pytest
from test_corruptions import _natural_image

from arq_deploy.certify.checks import systematic as S
from arq_deploy.certify.checks.robust_metrics import acc_s
from arq_deploy.core.errors import ArqError, UnknownNameError

X = _natural_image(n=3, seed=5)


def test_registry_names():
    assert S.VARIATIONS[0] == "reference" and len(S.VARIATIONS) == len(set(S.VARIATIONS)) == 1 + 9 + 3 + 15
    for name in ("jpeg-pil-q75", "jpeg-cv2-q50", "jpeg-torchvision-q95", "resize-cv2-nearest", "resize-pil-lanczos",
                 "resize-torchvision-bicubic-noaa", "resize-cv2-area"):
        assert name in S.VARIATIONS


def test_reference_is_exact_even_off_the_8bit_grid():
    x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    assert np.array_equal(S.apply_variation(x, "reference"), x)
    assert np.array_equal(S.apply_variation(X, "reference"), X)


@pytest.mark.parametrize("name", S.VARIATIONS[1:])
def test_each_variation_is_deterministic_and_bounded(name):
    y = S.apply_variation(X, name)
    assert y.shape == X.shape and y.dtype == np.float32 and 0 <= y.min() and y.max() <= 1
    assert np.abs(y * 255 - np.rint(y * 255)).max() < 1e-4
    assert np.array_equal(y, S.apply_variation(X, name))
    assert np.abs(y - X).mean() < 0.08, name  # a systematic change, not a corruption
    g = S.apply_variation(X[:, :1], name)  # grey images too
    assert g.shape == X[:, :1].shape


def test_jpeg_pipeline_is_pillow_encode_then_decode():
    from PIL import Image

    img = np.rint(X[0] * 255).astype(np.uint8).transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=75)
    want = np.array(Image.open(buf)).transpose(2, 0, 1) / np.float32(255)
    assert np.array_equal(S.apply_variation(X[:1], "jpeg-pil-q75")[0], want)
    d = [np.abs(S.apply_variation(X, f"jpeg-pil-q{q}") - X).mean() for q in (95, 75, 50)]
    assert 0 < d[0] < d[1] < d[2]
    assert not np.array_equal(S.apply_variation(X, "jpeg444-pil-q75"), S.apply_variation(X, "jpeg-pil-q75"))


def test_decoders_compared_not_assumed():
    """Whether Pillow, OpenCV and torchvision decode the same bytes identically is measured and reported; the
    jpeg-DECODER rows must agree with that measurement, and any difference must stay within a few levels."""
    report = S.compare_decoders(X)
    print("decoder differences:", json.dumps(report))
    for q in S.QUALITIES:
        for pair, r in report[f"q{q}"].items():
            assert r["max_abs"] <= 8 and 0.0 <= r["frac_differ"] <= 1.0
            a, b = pair.split("-")
            same = np.array_equal(S.apply_variation(X, f"jpeg-{a}-q{q}"), S.apply_variation(X, f"jpeg-{b}-q{q}"))
            assert same == (r["max_abs"] == 0), (q, pair)


def test_resize_round_trips_differ_by_library_and_antialias():
    ys = {n: S.apply_variation(X, n) for n in S.VARIATIONS if n.startswith("resize-")}
    assert not np.array_equal(ys["resize-torchvision-bilinear"], ys["resize-torchvision-bilinear-noaa"])
    assert not np.array_equal(ys["resize-pil-bicubic"], ys["resize-cv2-bicubic"])
    # antialiasing the 3.5× downscale low-passes the image: it moves further from x than the aliased one here
    d = {n: float(np.abs(y - X).mean()) for n, y in ys.items()}
    assert d["resize-torchvision-bilinear"] > d["resize-torchvision-bilinear-noaa"]
    # Pillow's antialiased bilinear equals torchvision's antialiased bilinear within one level (same algorithm)
    assert np.abs(ys["resize-pil-bilinear"] - ys["resize-torchvision-bilinear"]).max() <= 1.01 / 255


def test_bad_inputs():
    with pytest.raises(UnknownNameError, match="known: reference, jpeg-pil-q95"):
        S.apply_variation(X, "jpeg-libjpeg-q75")
    with pytest.raises(ArqError, match=r"\[0, 1\]"):
        S.apply_variation(X * 2, "jpeg-pil-q75")
    bad = X.copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(ArqError, match="NaN or infinite"):
        S.apply_variation(bad, "resize-cv2-area")


def test_run_systematic_resumes_and_matches_by_hand(digits_ort, tmp_path):
    runner, x, y, _ = digits_ort
    names = ["jpeg-pil-q50", "resize-cv2-nearest", "resize-pil-bilinear"]
    log = tmp_path / "systematic.jsonl"
    first = S.run_systematic(runner, x, y, names, log=log, batch_size=50)
    assert [r["variation"] for r in first["rows"]] == ["reference"] + names
    assert first["accuracies"]["reference"] == pytest.approx((runner(x).argmax(1) == y).mean())
    pred = runner(S.apply_variation(x, "resize-cv2-nearest")).argmax(1)
    row = first["rows"][2]
    assert row["correct"] == int((pred == y).sum())
    assert row["mean_abs_diff"] == pytest.approx(np.abs(S.apply_variation(x, "resize-cv2-nearest") - x).mean(),
                                                 rel=1e-5)
    assert first["rows"][0]["mean_abs_diff"] == 0.0
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])
    again = S.run_systematic(runner, x, y, names, log=log, batch_size=50)
    assert again == first and len(log.read_text().splitlines()) == 5
    summary = acc_s(first["accuracies"])
    assert summary["acc_s"] == pytest.approx(np.mean([first["accuracies"][n] for n in names]))
