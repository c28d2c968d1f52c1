"""Natural corruptions (ImageNet-C, Hendrycks & Dietterich 2019) at severities 1-5, seeded, and their accuracy check.

`corrupt(images, name, severity, seed)` maps float32 N×C×H×W pixels in [0, 1] (C = 1 or 3) to corrupted images of the
same shape, dtype and range. Per image: x -> uint8 H×W×3 (round(255·x); a grey image is repeated to 3 channels) ->
the corruption (corrupt_tta 0.1.7, the ImageNet-C definitions ported to numpy 2, which return floats in [0, 255]) ->
clip to [0, 255] and round to uint8 levels (ImageNet-C stores 8-bit images) -> /255. A grey image comes back as one
channel: channel 0 for the per-channel-independent noises (gaussian/shot/impulse/speckle: the mean of 3 independent
draws would cut the noise std by √3), the channel mean for all others (their colour effects: saturate, spatter,
frost, snow).

Randomness: corrupt_tta draws from numpy's *global* RandomState. Image i (identifier `ids[i]`, default its position)
gets the RandomState seed `image_seed(seed, name, severity, ids[i])` (blake2b of the four), set just before its call;
the global state is saved before and restored after, so callers see no change (not thread-safe: do not corrupt from
two threads at once). Same (seed, name, severity, id) -> the same image, whatever the batch it is in.

Where this module does not call corrupt_tta's function as is (tests pin each against it or its reference formula):
* impulse_noise: corrupt_tta calls skimage's random_noise without an rng, which then draws from fresh OS entropy (never
  reproducible); we call random_noise with the same constants and a Generator seeded from the global RandomState.
* motion_blur: corrupt_tta's OpenCV kernel ignores the σ of ImageNet-C's ImageMagick motion blur, so severities 2, 3
  and 4 (radius 15, σ 5/8/12) give the *same* image. We use ImageMagick's kernel: one-sided, taps i = 0..2r along the
  angle with weights ∝ exp(−i²/2σ²) (same constants, same uniform(−45°, 45°) angle draw).
* elastic_transform: ImageNet-C's constants are 224·k (pixels of a 224×224 image); corrupt_tta applies them to any
  size, which at 32×32 makes severities 1-2 a ±22 px affine jitter (mean |Δ| 53/255, above severity 5's 32/255). We
  read 224 as the image side: constants min(H, W)·k (the CIFAR-10-C convention); identical to corrupt_tta at 224×224.
* frost: corrupt_tta re-reads its texture PNG on every call (≈ 28 ms/image); we cache the decoded textures and make
  the same random draws (bit-identical output, tested).
All other corruptions call corrupt_tta's function. Their constants are ImageNet-C's (224×224 images), not
CIFAR-10-C's: on 32×32 images the blurs (defocus radius up to 10 px, motion up to 20 px, gaussian σ up to 6) and frost
(a 32×32 crop of a full-size texture) are much harsher than on ImageNet.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from typing import Callable, Sequence

import numpy as np

from arq_deploy.certify.checks.robust_metrics import (
    RobustnessInputError,
    check_images,
    check_labels,
    data_digest,
    open_log,
)
from arq_deploy.core.errors import UnknownNameError
from arq_deploy.core.progress import progress_bar

STANDARD = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
            "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression")
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
CORRUPTIONS = STANDARD + EXTRA
SEVERITIES = (1, 2, 3, 4, 5)
GREY_FIRST_CHANNEL = frozenset({"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"})
IMPL_VERSION = 1  # bump when an output changes; pinned in the result log's meta

_IMPULSE = (0.03, 0.06, 0.09, 0.17, 0.27)
_MOTION = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))  # ImageMagick radius, sigma
_FROST = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))
_ELASTIC = ((2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02), (0.07, 0.01, 0.02), (0.12, 0.01, 0.02))  # × side


# --------------------------------------------------------------------------------------------------- our variants


def _impulse_noise(x: np.ndarray, severity: int) -> np.ndarray:
    from skimage.util import random_noise

    rng = np.random.default_rng(np.random.randint(0, 2**32, dtype=np.uint64))
    return np.clip(random_noise(x / 255.0, mode="s&p", amount=_IMPULSE[severity - 1], rng=rng), 0, 1) * 255


def motion_kernel(radius: int, sigma: float, angle_deg: float) -> np.ndarray:
    """ImageMagick's motion-blur kernel as a (4r+1)² correlation kernel: weight ∝ exp(−i²/2σ²) at offset
    round(i·(cos θ, −sin θ)) from the centre, i = 0..2r, normalised to sum 1."""
    taps = np.arange(2 * radius + 1)
    w = np.exp(-(taps.astype(np.float64) ** 2) / (2.0 * sigma**2))
    t = np.deg2rad(angle_deg)
    dx, dy = np.rint(taps * np.cos(t)).astype(int), np.rint(-taps * np.sin(t)).astype(int)
    k = np.zeros((4 * radius + 1, 4 * radius + 1))
    np.add.at(k, (2 * radius + dy, 2 * radius + dx), w)
    return k / k.sum()


def _motion_blur(x: np.ndarray, severity: int) -> np.ndarray:
    import cv2

    radius, sigma = _MOTION[severity - 1]
    img = np.asarray(x) / 255.0
    k = motion_kernel(radius, sigma, np.random.uniform(-45, 45))
    return np.clip(cv2.filter2D(img, -1, k, borderType=cv2.BORDER_REPLICATE), 0, 1) * 255


@functools.lru_cache(maxsize=6)
def _frost_texture(idx: int) -> np.ndarray:
    import corrupt_tta
    import cv2

    ext = "png" if idx <= 3 else "jpg"
    path = os.path.join(os.path.dirname(corrupt_tta.__file__), "assets", "frost", f"frost{idx}.{ext}")
    img = cv2.imread(path)
    if img is None:
        raise RobustnessInputError(f"corrupt_tta's frost texture {path} is missing: reinstall corrupt-tta==0.1.7")
    img.setflags(write=False)
    return img


def _frost(x: np.ndarray, severity: int) -> np.ndarray:
    import cv2

    a, b = _FROST[severity - 1]
    tex = _frost_texture(np.random.randint(1, 7))
    h, w = np.asarray(x).shape[:2]
    fh, fw = tex.shape[:2]
    if fh < h or fw < w:
        scale = max(h / fh, w / fw)
        tex = cv2.resize(tex, (int(np.ceil(fw * scale)), int(np.ceil(fh * scale))), interpolation=cv2.INTER_LINEAR)
        fh, fw = tex.shape[:2]
    top = np.random.randint(0, max(1, fh - h + 1))
    left = np.random.randint(0, max(1, fw - w + 1))
    crop = tex[top:top + h, left:left + w][..., [2, 1, 0]]
    return np.clip(a * np.array(x) + b * crop, 0, 255)


def _elastic_transform(x: np.ndarray, severity: int) -> np.ndarray:
    import cv2
    from scipy.ndimage import map_coordinates
    from skimage.filters import gaussian

    img = np.array(x, dtype=np.float32) / 255.0
    h, w = img.shape[:2]
    side = min(h, w)
    alpha, sigma, jitter = (side * k for k in _ELASTIC[severity - 1])
    centre = np.float32((h, w)) // 2
    half = min((h, w)) // 3
    src = np.float32([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    dst = src + np.random.uniform(-jitter, jitter, size=src.shape).astype(np.float32)
    img = cv2.warpAffine(img, cv2.getAffineTransform(src, dst), (w, h), borderMode=cv2.BORDER_REFLECT_101)

    def field():
        return (gaussian(np.random.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3)
                * alpha).astype(np.float32)

    dx, dy = field(), field()
    cols, rows = np.meshgrid(np.arange(w), np.arange(h))
    coords = np.reshape(rows + dy, (-1, 1)), np.reshape(cols + dx, (-1, 1))
    out = np.zeros_like(img)
    for ch in range(img.shape[2]):
        out[..., ch] = map_coordinates(img[..., ch], coords, order=1, mode="reflect").reshape((h, w))
    return np.clip(out, 0, 1) * 255


_OURS: dict[str, Callable] = {"impulse_noise": _impulse_noise, "motion_blur": _motion_blur, "frost": _frost,
                              "elastic_transform": _elastic_transform}


@functools.lru_cache(maxsize=1)
def _functions() -> dict[str, Callable]:
    import corrupt_tta

    funcs = {name: _OURS.get(name) or corrupt_tta.corruption_dict[name] for name in CORRUPTIONS}
    return funcs


# --------------------------------------------------------------------------------------------------- corrupt


def check_name(name: str) -> str:
    if name not in CORRUPTIONS:
        raise UnknownNameError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    return name


def check_severity(severity) -> int:
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise RobustnessInputError(f"corruption severity must be an integer in 1..5, got {severity!r}")
    return int(severity)


def image_seed(seed: int, name: str, severity: int, image_id: int) -> int:
    """The RandomState seed (< 2³²) of one image: blake2b of 'seed/name/severity/id'."""
    key = f"{int(seed)}/{name}/{int(severity)}/{int(image_id)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")


@contextlib.contextmanager
def _saved_global_rng():
    state = np.random.get_state()
    try:
        yield
    finally:
        np.random.set_state(state)


def _to_hwc_uint8(img: np.ndarray) -> np.ndarray:
    """C×H×W float [0,1] -> H×W×3 uint8 (grey repeated)."""
    u8 = np.rint(img * 255.0).astype(np.uint8).transpose(1, 2, 0)
    return np.repeat(u8, 3, axis=2) if u8.shape[2] == 1 else u8


def _from_hwc(out: np.ndarray, name: str, channels: int) -> np.ndarray:
    """H×W×3 corruption output (float or uint8, ~[0,255]) -> C×H×W float32 on the 8-bit grid of [0,1]."""
    u8 = np.clip(np.rint(np.asarray(out, np.float64)), 0, 255)
    if channels == 1:
        u8 = u8[..., :1] if name in GREY_FIRST_CHANNEL else np.rint(u8.mean(axis=2, keepdims=True))
    return (u8.transpose(2, 0, 1) / 255.0).astype(np.float32)


def _corrupt_checked(x: np.ndarray, name: str, severity: int, seed: int, ids: np.ndarray) -> np.ndarray:
    fn = _functions()[name]
    out = np.empty_like(x)
    with _saved_global_rng():
        for i in range(len(x)):
            np.random.seed(image_seed(seed, name, severity, ids[i]))
            out[i] = _from_hwc(fn(_to_hwc_uint8(x[i]), severity), name, x.shape[1])
    return out


def _check_ids(ids, n: int) -> np.ndarray:
    if ids is None:
        return np.arange(n)
    ids = np.asarray(ids)
    if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
        raise RobustnessInputError(f"ids must be {n} integers (one per image), got {ids.dtype} of shape {ids.shape}")
    return ids


def corrupt(images, name: str, severity: int, seed: int = 0, ids: Sequence[int] | None = None) -> np.ndarray:
    """float32 N×C×H×W in [0,1] (C = 1 or 3) -> the same images under corruption `name` at `severity` (1..5), float32
    N×C×H×W on the 8-bit grid k/255. Image i is seeded by (seed, name, severity, ids[i]) (default ids = 0..N-1)."""
    name, severity = check_name(name), check_severity(severity)
    x = check_images(images)
    return _corrupt_checked(x, name, severity, int(seed), _check_ids(ids, len(x)))


# --------------------------------------------------------------------------------------------------- the check


def corruption_settings(x: np.ndarray, labels: np.ndarray, seed: int, ids=None) -> dict:
    """What the rows of a corruption run depend on (the result log's meta): data digest, seed, ids, versions."""
    import corrupt_tta

    ids = _check_ids(ids, len(x))
    id_digest = hashlib.sha256(np.ascontiguousarray(ids, np.int64).tobytes()).hexdigest()[:16]
    return {"check": "corruptions", "images": int(len(x)), "data_sha256": data_digest(x, labels), "seed": int(seed),
            "ids_sha256": id_digest, "corrupt_tta": corrupt_tta.__version__, "impl": IMPL_VERSION}


def row_key(name: str, severity: int) -> str:
    return f"{name}/s{int(severity)}"


def accuracy_row(runner, x, labels, batch_size, transform, advance) -> dict:
    """Top-1 accuracy of runner on transform(x[a:b], a, b) over batches: {n, correct, accuracy}."""
    correct = 0
    for a in range(0, len(x), batch_size):
        b = min(a + batch_size, len(x))
        pred = np.asarray(runner(transform(x[a:b], a, b))).argmax(axis=1)
        correct += int((pred == labels[a:b]).sum())
        advance(b - a)
    return {"n": int(len(x)), "correct": correct, "accuracy": correct / len(x) if len(x) else float("nan")}


def run_corruptions(runner, x, labels, names: Sequence[str] | None = None, severities: Sequence[int] = SEVERITIES,
                    seed: int = 0, log=None, batch_size: int = 256, progress: bool = False,
                    ids: Sequence[int] | None = None) -> dict:
    """Top-1 accuracy of `runner` (x -> logits N×K) on clean x and on every (corruption, severity).

    x: float32 N×C×H×W in [0, 1]; labels: N ints; names: default all 19 (CORRUPTIONS); severities ⊂ 1..5.
    log: None, a path (a JsonlLog with meta `corruption_settings(...)`) or a JsonlLog: each finished row is appended
    (key "clean" or "NAME/sS") and a rerun skips the rows already there (a half-written last line is dropped).
    Returns {"clean": row, "rows": [row per (name, severity), names outer]}; a row holds corruption, severity
    (0 for clean), n, correct, accuracy."""
    names = list(CORRUPTIONS) if names is None else [check_name(n) for n in names]
    severities = sorted({check_severity(s) for s in severities})
    x = check_images(x)
    labels, ids = check_labels(labels, len(x)), _check_ids(ids, len(x))
    if batch_size < 1:
        raise RobustnessInputError(f"batch size must be >= 1, got {batch_size}")
    log = open_log(log, corruption_settings(x, labels, seed, ids))
    jobs = [("clean", "clean", 0)] + [(row_key(n, s), n, s) for n in names for s in severities]
    results = {key: log.get(key) for key, _, _ in jobs if log is not None and key in log}
    todo = [job for job in jobs if job[0] not in results]

    with progress_bar("corruptions", len(todo) * len(x), progress) as (bar, task):
        for key, n, s in todo:
            bar.update(task, info=key)
            tf = (lambda xb, a, b: xb) if s == 0 else (
                lambda xb, a, b, n=n, s=s: _corrupt_checked(xb, n, s, int(seed), ids[a:b]))
            row = {"key": key, "corruption": n, "severity": s,
                   **accuracy_row(runner, x, labels, batch_size, tf, lambda k: bar.update(task, advance=k))}
            results[key] = log.append(key, row) if log is not None else row
    return {"clean": results["clean"], "rows": [results[row_key(n, s)] for n in names for s in severities]}
