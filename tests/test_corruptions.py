"""Natural corruptions (certify/corruptions.py): each of the 19 pinned on a fixed seeded 32×32 image against its
reference definition (ImageNet-C constants recomputed here), seeding, errors, the resumable run on a real
onnxruntime model, and the robustness metrics (certify/robust_metrics.py) on hand-computed values."""

import io
import json

import numpy as np
import pytest

from arq_deploy.certify.checks import corruptions as C
from arq_deploy.certify.checks import robust_metrics as M
from arq_deploy.core.errors import ArqError, UnknownNameError

SEEDED = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur", "snow",
          "frost", "fog", "spatter", "elastic_transform")


def _natural_image(size=32, n=2, seed=0):
    """float32 n×3×size×size on the 8-bit grid: smooth colour gradients, a bright disc, a dark bar and mild texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    imgs = []
    for _ in range(n):
        a = rng.uniform(0.2, 0.8, 3)
        base = np.stack([a[0] * xx + 0.2 * yy, a[1] * (1 - xx) * yy + 0.1, a[2] * (1 - yy) + 0.1 * xx])
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.12, 0.25)
        base[:, (xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0.7, 0.95, (3, 1))
        base[:, int(0.75 * size):int(0.85 * size), 2:-2] *= 0.3
        base += rng.normal(0, 0.03, base.shape)
        imgs.append(np.clip(base, 0, 1))
    return (np.rint(np.array(imgs) * 255) / 255).astype(np.float32)


X = _natural_image()
X12 = _natural_image(n=12, seed=1)


def _ref_rng(name, sev, i=0, seed=0):
    return np.random.RandomState(C.image_seed(seed, name, sev, i))


def _hwc(x):
    return np.rint(x * 255).astype(np.uint8).transpose(1, 2, 0)


def _back(f):
    """float H×W×3 in [0, 255] -> C×H×W float32 on the 8-bit grid."""
    return (np.clip(np.rint(f), 0, 255).transpose(2, 0, 1) / 255).astype(np.float32)


# ------------------------------------------------------------------------------------- reference formulas (exact)


@pytest.mark.parametrize("sev", [1, 3, 5])
def test_pointwise_noises_match_imagenet_c(sev):
    u = X[0].transpose(1, 2, 0).astype(np.float64)
    g = [.08, .12, 0.18, 0.26, 0.38][sev - 1]
    want = _back(np.clip(u + _ref_rng("gaussian_noise", sev).normal(size=u.shape, scale=g), 0, 1) * 255)
    assert np.array_equal(C.corrupt(X[:1], "gaussian_noise", sev)[0], want)
    s = [60, 25, 12, 5, 3][sev - 1]
    want = _back(np.clip(_ref_rng("shot_noise", sev).poisson(u * s) / s, 0, 1) * 255)
    assert np.array_equal(C.corrupt(X[:1], "shot_noise", sev)[0], want)
    k = [.15, .2, 0.35, 0.45, 0.6][sev - 1]
    want = _back(np.clip(u + u * _ref_rng("speckle_noise", sev).normal(size=u.shape, scale=k), 0, 1) * 255)
    assert np.array_equal(C.corrupt(X[:1], "speckle_noise", sev)[0], want)


@pytest.mark.parametrize("sev", [1, 2, 3, 4, 5])
def test_impulse_noise_is_salt_and_pepper_at_the_imagenet_c_amount(sev):
    amount = [.03, .06, .09, 0.17, 0.27][sev - 1]
    x = np.full((8, 3, 32, 32), 128 / 255, np.float32)
    y = C.corrupt(x, "impulse_noise", sev, seed=3)
    salt, pepper = (y == 1.0).mean(), (y == 0.0).mean()
    assert set(np.unique(y)) <= {0.0, np.float32(128 / 255), 1.0}
    assert salt + pepper == pytest.approx(amount, abs=0.012)
    assert salt == pytest.approx(pepper, abs=0.012)


@pytest.mark.parametrize("sev", [1, 2, 3, 4, 5])
def test_contrast_jpeg_pixelate_match_imagenet_c(sev):
    from PIL import Image

    u = X[0].transpose(1, 2, 0).astype(np.float64)
    c = [0.4, .3, .2, .1, .05][sev - 1]
    mean = u.mean(axis=(0, 1), keepdims=True)
    assert np.array_equal(C.corrupt(X[:1], "contrast", sev)[0], _back(np.clip((u - mean) * c + mean, 0, 1) * 255))
    buf = io.BytesIO()
    Image.fromarray(_hwc(X[0])).save(buf, "JPEG", quality=[25, 18, 15, 10, 7][sev - 1])
    assert np.array_equal(C.corrupt(X[:1], "jpeg_compression", sev)[0], _back(np.array(Image.open(buf), float)))
    f = [0.6, 0.5, 0.4, 0.3, 0.25][sev - 1]
    small = Image.fromarray(_hwc(X[0])).resize((int(32 * f), int(32 * f)), Image.BOX).resize((32, 32), Image.BOX)
    assert np.array_equal(C.corrupt(X[:1], "pixelate", sev)[0], _back(np.array(small, float)))


@pytest.mark.parametrize("sev", [1, 3, 5])
def test_brightness_saturate_match_the_skimage_hsv_reference(sev):
    """ImageNet-C's reference uses skimage's HSV; corrupt_tta uses OpenCV's: equal within one 8-bit level."""
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(X[0].transpose(1, 2, 0).astype(np.float64))
    b = hsv.copy()
    b[..., 2] = np.clip(b[..., 2] + [.1, .2, .3, .4, .5][sev - 1], 0, 1)
    got = C.corrupt(X[:1], "brightness", sev)[0]
    assert np.abs(got - _back(np.clip(hsv2rgb(b), 0, 1) * 255)).max() <= 1.01 / 255
    s = hsv.copy()
    k, add = [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)][sev - 1]
    s[..., 1] = np.clip(s[..., 1] * k + add, 0, 1)
    got = C.corrupt(X[:1], "saturate", sev)[0]
    assert np.abs(got - _back(np.clip(hsv2rgb(s), 0, 1) * 255)).max() <= 1.01 / 255


@pytest.mark.parametrize("sev", [1, 5])
def test_gaussian_blur_matches_scipy_gaussian_filter(sev):
    from scipy.ndimage import gaussian_filter

    sigma = [1, 2, 3, 4, 6][sev - 1]
    u = X[0].transpose(1, 2, 0).astype(np.float64)
    want = _back(np.clip(gaussian_filter(u, sigma=(sigma, sigma, 0), mode="nearest", truncate=4.0), 0, 1) * 255)
    assert np.abs(C.corrupt(X[:1], "gaussian_blur", sev)[0] - want).max() <= 1.01 / 255


def test_frost_equals_corrupt_tta_and_elastic_equals_it_at_224():
    import corrupt_tta

    img = _hwc(X[0])
    for sev in (1, 4):
        np.random.seed(11)
        want = corrupt_tta.frost(img, sev)
        np.random.seed(11)
        assert np.array_equal(C._frost(img, sev), want)
    big = np.random.default_rng(2).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    for sev in (2, 3):
        np.random.seed(5)
        want = corrupt_tta.elastic_transform(big, sev)
        np.random.seed(5)
        assert np.array_equal(C._elastic_transform(big, sev), want)
    np.random.seed(5)
    assert not np.array_equal(C._elastic_transform(img, 1), corrupt_tta.elastic_transform(img, 1))


def test_motion_blur_uses_sigma_so_severities_2_to_4_differ():
    k = C.motion_kernel(15, 5, 0.0)
    assert k.shape == (61, 61) and k.sum() == pytest.approx(1.0)
    row = k[30]
    assert np.all(row[:30] == 0) and row[30] == row.max() and np.all(np.diff(row[30:]) <= 0)  # one-sided, decaying
    outs = [C.corrupt(X, "motion_blur", s, seed=4) for s in (2, 3, 4)]
    assert not np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[1], outs[2])
    d = [np.abs(o - X).mean() for o in outs]
    assert d[0] < d[1] < d[2]  # a longer σ blurs more


# ------------------------------------------------------------------------------------- every corruption


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_every_corruption_seeded_shaped_and_severity_dependent(name):
    state = np.random.get_state()
    outs = [C.corrupt(X, name, s, seed=7) for s in range(1, 6)]
    assert np.array_equal(np.random.get_state()[1], state[1])  # no global RNG leak
    for y in outs:
        assert y.shape == X.shape and y.dtype == np.float32 and 0 <= y.min() and y.max() <= 1
        assert np.abs(y * 255 - np.rint(y * 255)).max() < 1e-4  # on the 8-bit grid
    assert np.array_equal(outs[2], C.corrupt(X, name, 3, seed=7))
    assert all(not np.array_equal(outs[i], outs[j]) for i in range(5) for j in range(i + 1, 5)), name
    assert all(np.abs(y - X).mean() > 0 for y in outs)
    # an image's corruption does not depend on the batch it is in
    assert np.array_equal(C.corrupt(X[1:], name, 3, seed=7, ids=[1])[0], outs[2][1])
    if name in SEEDED:
        assert not np.array_equal(C.corrupt(X, name, 3, seed=8), outs[2])


MONOTONE = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur", "zoom_blur",
            "gaussian_blur", "contrast", "brightness", "jpeg_compression", "motion_blur", "spatter")
# not pixelate: at 32×32 its block sizes 19, 16, 12, 9, 8 px alias differently (16 divides 32), so mean |Δ| is not
# monotone although the resolution falls; not saturate (severities 1-2 desaturate, 3-5 saturate), nor the random
# textures (frost, fog, snow), nor elastic (severities 1-2 are smooth global warps, 3-5 local jitter).


@pytest.mark.parametrize("name", MONOTONE)
def test_degradation_grows_with_severity(name):
    """Mean |x_c − x| over 12 images (the random ones are monotone in expectation, not per draw)."""
    d = [np.abs(C.corrupt(X12, name, s, seed=1) - X12).mean() for s in range(1, 6)]
    assert all(b >= a - 1e-6 for a, b in zip(d, d[1:])), (name, d)
    assert d[-1] > d[0]


def test_grey_images_round_trip_with_one_channel():
    g = X[:, :1]
    for name in ("gaussian_noise", "contrast", "saturate", "spatter", "glass_blur"):
        y = C.corrupt(g, name, 4, seed=0)
        assert y.shape == g.shape
    y = C.corrupt(g, "gaussian_noise", 2, seed=0)
    want = np.clip(g[0, 0].astype(np.float64) + _ref_rng("gaussian_noise", 2).normal(size=(32, 32, 3), scale=.12)
                   [..., 0], 0, 1)
    assert np.array_equal(y[0, 0], (np.rint(want * 255) / 255).astype(np.float32))  # channel 0, full noise std
    assert np.array_equal(C.corrupt(g, "contrast", 2)[:, 0], C.corrupt(np.repeat(g, 3, 1), "contrast", 2)[:, 0])


def test_bad_inputs_are_clear_errors():
    with pytest.raises(UnknownNameError, match="known: gaussian_noise, shot_noise"):
        C.corrupt(X, "rain", 1)
    for sev in (0, 6, True, 2.0):
        with pytest.raises(ArqError, match="severity must be an integer in 1..5"):
            C.corrupt(X, "fog", sev)
    bad = X.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ArqError, match="NaN"):
        C.corrupt(bad, "fog", 1)
    with pytest.raises(ArqError, match=r"\[0, 1\]"):
        C.corrupt(X * 255, "fog", 1)
    with pytest.raises(ArqError, match="N×C×H×W"):
        C.corrupt(X[0], "fog", 1)
    with pytest.raises(ArqError, match="severity"):
        C.run_corruptions(lambda x: np.zeros((len(x), 2)), X, [0, 1], ["fog"], [7])


# ------------------------------------------------------------------------------------- run on a real model


def test_run_corruptions_resumes_after_a_truncated_log(digits_ort, tmp_path):
    runner, x, y, idx = digits_ort
    names, sevs = ["gaussian_noise", "contrast", "pixelate"], [1, 5]
    log = tmp_path / "corruptions.jsonl"
    first = C.run_corruptions(runner, x, y, names, sevs, seed=3, log=log, batch_size=40, ids=idx)
    lines = log.read_text().splitlines()
    assert len(lines) == 1 + 1 + 6 and json.loads(lines[0])["meta"]["check"] == "corruptions"
    # the clean row and one corrupted row, checked by hand
    assert first["clean"]["accuracy"] == pytest.approx((runner(x).argmax(1) == y).mean())
    pred = runner(C.corrupt(x, "contrast", 5, seed=3, ids=idx)).argmax(1)
    row = next(r for r in first["rows"] if r["key"] == "contrast/s5")
    assert row["correct"] == int((pred == y).sum()) and row["n"] == len(x)
    assert first["clean"]["accuracy"] > 0.8 and row["accuracy"] < first["clean"]["accuracy"]
    # cut the log to 4 whole rows plus half a row, as a crash would leave it
    log.write_text("\n".join(lines[:5]) + "\n" + lines[5][: len(lines[5]) // 2])
    again = C.run_corruptions(runner, x, y, names, sevs, seed=3, log=log, batch_size=40, ids=idx)
    assert again == first
    assert len(log.read_text().splitlines()) == 8
    with pytest.raises(ArqError, match="other settings"):
        C.run_corruptions(runner, x, y, names, sevs, seed=4, log=log, ids=idx)


# ------------------------------------------------------------------------------------- metrics


def _rows(table):
    return [{"corruption": c, "severity": s, "accuracy": a} for c, v in table.items() for s, a in v.items()]


def test_mce_relative_mce_and_mnr_by_hand():
    model = _rows({"a": {1: 0.8, 2: 0.6}, "b": {1: 0.5, 2: 0.5}})
    ref = _rows({"a": {1: 0.9, 2: 0.7}, "b": {1: 0.75, 2: 0.25}})
    # CE_a = (0.2 + 0.4) / (0.1 + 0.3) = 1.5; CE_b = (0.5 + 0.5) / (0.25 + 0.75) = 1.0
    assert M.corruption_errors(model, ref) == pytest.approx({"a": 1.5, "b": 1.0})
    assert M.mce(model, ref) == pytest.approx(1.25)
    # clean 0.9 / ref 0.95: rel_a = (0.1 + 0.3) / (0.05 + 0.25) = 4/3; rel_b = (0.4 + 0.4) / (0.2 + 0.7) = 8/9
    assert M.relative_mce(model, ref, 0.9, 0.95) == pytest.approx((4 / 3 + 8 / 9) / 2)
    # mNR = mean of (0.9 - a) / 0.9 over (0.8, 0.6, 0.5, 0.5) = (0.1 + 0.3 + 0.4 + 0.4) / 3.6
    assert M.mnr(model, 0.9) == pytest.approx(1.2 / 3.6)
    assert M.mce(model, ref, names=["a"]) == pytest.approx(1.5)
    with pytest.raises(ArqError, match="reference results lack"):
        M.mce(model, _rows({"a": {1: 0.9, 2: 0.7}}))


def test_acc_s_and_wcar_by_hand(tmp_path):
    s = M.acc_s({"reference": 0.9, "jpeg-pil-q75": 0.8, "resize-cv2-nearest": 0.6})
    assert s["acc_s"] == pytest.approx(0.7) and s["acc_drop"] == pytest.approx(0.2)
    assert s["worst"] == "resize-cv2-nearest" and s["worst_drop"] == pytest.approx(0.3)
    assert M.wcar({"fgsm": 0.4, "pgd": 0.25, "square": 0.3}) == 0.25
    with pytest.raises(ArqError):
        M.wcar({})
    with pytest.raises(ArqError, match="reference"):
        M.acc_s({"jpeg-pil-q75": 0.8})


def test_heatmap_png_is_written_atomically(tmp_path):
    rows = _rows({"fog": {1: 0.9, 3: 0.5}, "snow": {1: 0.7, 3: 0.2}})
    out = tmp_path / "h" / "corruptions.png"
    M.plot_heatmap(rows, out, clean_acc=0.95)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 2000
    assert [p.name for p in out.parent.iterdir()] == ["corruptions.png"]
    with pytest.raises(ArqError, match="no corruption results"):
        M.plot_heatmap([], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()
