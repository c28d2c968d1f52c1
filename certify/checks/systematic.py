"""Systematic noise (RobustMQ): the same images through different JPEG decoders and resize pipelines.

A deployed model sees images that went through *some* library's JPEG decoder and resizer; each choice changes pixels
a little, deterministically. A variation maps float32 N×C×H×W in [0, 1] (C = 1 or 3) to the same shape on the 8-bit
grid k/255 (every intermediate image is uint8, as a stored or decoded image is):

* ``reference``: the identity, exact (x itself, also for data off the 8-bit grid such as digits' k/16).
* ``jpeg-{pil,cv2,torchvision}-q{95,75,50}``: Pillow encodes the image (baseline JPEG, 4:2:0 chroma subsampling,
  quality q; grey images as one-channel JPEG) and the named library decodes the same bytes (PIL.Image.open,
  cv2.imdecode, torchvision.io.decode_jpeg). `compare_decoders` measures whether the decoders differ: with Pillow
  13.0 / opencv-python 5.0 / torchvision 0.29 (all bundling libjpeg-turbo, ISLOW IDCT, fancy upsampling) they were
  bit-identical on CIFAR-10 and digits at q 95/75/50, so these rows then agree exactly; other builds (a system libjpeg
  on a board, TensorFlow's INTEGER_FAST IDCT) may not.
* ``jpeg444-pil-q{95,75,50}``: Pillow encodes with 4:4:4 (no chroma subsampling), Pillow decodes: an encoder setting
  that does change pixels (mean |Δ| vs 4:2:0 ≈ 2.5-4 levels on CIFAR-10).
* ``resize-{lib}-{interp}``: the image is resized up to round(3.5·H)×round(3.5·W) and back down to H×W, both steps by
  the same library and interpolation (a non-integer factor, so that no nearest/area round trip is trivially exact):
  Pillow {nearest, bilinear, bicubic, area (BOX), lanczos}, OpenCV {nearest, bilinear, bicubic, area, lanczos
  (LANCZOS4)}, torchvision.transforms.v2.functional.resize {nearest, bilinear, bicubic} with antialias on, and
  {bilinear, bicubic}-noaa with antialias off (antialias only changes the downscale).

`run_systematic` reports top-1 accuracy per variation (rows resumable through a JsonlLog);
`arq_deploy.certify.checks.robust_metrics.acc_s` summarises them.
"""

from __future__ import annotations

import io
from typing import Callable, Sequence

import numpy as np

from arq_deploy.certify.checks.corruptions import accuracy_row
from arq_deploy.certify.checks.robust_metrics import (
    RobustnessInputError,
    check_images,
    check_labels,
    data_digest,
    open_log,
)
from arq_deploy.core.errors import UnknownNameError
from arq_deploy.core.progress import progress_bar

QUALITIES = (95, 75, 50)
DECODERS = ("pil", "cv2", "torchvision")
RESIZE_SCALE = 3.5
IMPL_VERSION = 1
_PIL_FILTERS = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "area": "BOX", "lanczos": "LANCZOS"}
_CV2_FLAGS = {"nearest": "INTER_NEAREST", "bilinear": "INTER_LINEAR", "bicubic": "INTER_CUBIC", "area": "INTER_AREA",
              "lanczos": "INTER_LANCZOS4"}
_TV_MODES = {"nearest": ("NEAREST", False), "bilinear": ("BILINEAR", True), "bicubic": ("BICUBIC", True),
             "bilinear-noaa": ("BILINEAR", False), "bicubic-noaa": ("BICUBIC", False)}


# --------------------------------------------------------------------------------------------------- JPEG


def pil_encode(img: np.ndarray, quality: int, subsampling: int = 2) -> bytes:
    """H×W or H×W×3 uint8 -> JPEG bytes (Pillow; subsampling 2 = 4:2:0, 0 = 4:4:4)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=int(quality), subsampling=subsampling)
    return buf.getvalue()


def decode(data: bytes, decoder: str, grey: bool) -> np.ndarray:
    """JPEG bytes -> H×W (grey) or H×W×3 RGB uint8 by `decoder` ('pil', 'cv2' or 'torchvision')."""
    if decoder == "pil":
        from PIL import Image

        return np.array(Image.open(io.BytesIO(data)).convert("L" if grey else "RGB"))
    if decoder == "cv2":
        import cv2

        out = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR)
        return out if grey else np.ascontiguousarray(out[..., ::-1])
    if decoder == "torchvision":
        import warnings

        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        mode = ImageReadMode.GRAY if grey else ImageReadMode.RGB
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs (-> torchcodec); still what we test
            warnings.simplefilter("ignore", DeprecationWarning)
            out = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode).numpy()
        return out[0] if grey else np.ascontiguousarray(out.transpose(1, 2, 0))
    raise UnknownNameError(f"unknown JPEG decoder {decoder!r}; known: {', '.join(DECODERS)}")


def _jpeg(decoder: str, quality: int, subsampling: int = 2) -> Callable[[np.ndarray], np.ndarray]:
    def apply(img: np.ndarray) -> np.ndarray:  # H×W or H×W×3 uint8
        return decode(pil_encode(img, quality, subsampling), decoder, img.ndim == 2)

    return apply


def compare_decoders(images, qualities: Sequence[int] = QUALITIES) -> dict:
    """On the same Pillow-encoded bytes: for each quality and decoder pair, the largest |Δ| in 8-bit levels and the
    fraction of pixel values that differ. {"q75": {"pil-cv2": {"max_abs": 0, "frac_differ": 0.0}, ...}, ...}"""
    imgs = _to_uint8_hwc(check_images(images))
    out = {}
    for q in qualities:
        pairs = {f"{a}-{b}": [0, 0] for i, a in enumerate(DECODERS) for b in DECODERS[i + 1:]}
        size = 0
        for img in imgs:
            data = pil_encode(img, q)
            dec = {d: decode(data, d, img.ndim == 2).astype(np.int16) for d in DECODERS}
            size += dec["pil"].size
            for key, acc in pairs.items():
                a, b = key.split("-")
                diff = np.abs(dec[a] - dec[b])
                acc[0], acc[1] = max(acc[0], int(diff.max())), acc[1] + int((diff > 0).sum())
        out[f"q{q}"] = {k: {"max_abs": m, "frac_differ": n / max(size, 1)} for k, (m, n) in pairs.items()}
    return out


# --------------------------------------------------------------------------------------------------- resize


def _resize_pil(interp: str):
    from PIL import Image

    flt = getattr(Image.Resampling, _PIL_FILTERS[interp])

    def resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
        return np.array(Image.fromarray(img).resize((w, h), resample=flt))

    return resize


def _resize_cv2(interp: str):
    import cv2

    flag = getattr(cv2, _CV2_FLAGS[interp])

    def resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
        return cv2.resize(img, (w, h), interpolation=flag)

    return resize


def _resize_tv(interp: str):
    import torch
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resize as tv_resize

    mode, antialias = _TV_MODES[interp]

    def resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(img[None] if img.ndim == 2 else img.transpose(2, 0, 1)))
        out = tv_resize(t, [h, w], interpolation=getattr(InterpolationMode, mode), antialias=antialias).numpy()
        return out[0] if img.ndim == 2 else np.ascontiguousarray(out.transpose(1, 2, 0))

    return resize


def _round_trip(make_resize, interp: str) -> Callable[[np.ndarray], np.ndarray]:
    def apply(img: np.ndarray) -> np.ndarray:
        resize = make_resize(interp)
        h, w = img.shape[:2]
        big = resize(img, round(RESIZE_SCALE * h), round(RESIZE_SCALE * w))
        return resize(big, h, w)

    return apply


# --------------------------------------------------------------------------------------------------- registry


def _build_registry() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    reg: dict[str, Callable] = {}

    def register(name: str, fn: Callable) -> None:
        if name in reg:
            raise ValueError(f"systematic variation {name!r} registered twice")
        reg[name] = fn

    register("reference", lambda img: img)  # (apply short-cuts it: x is returned unrounded)
    for q in QUALITIES:
        for d in DECODERS:
            register(f"jpeg-{d}-q{q}", _jpeg(d, q))
    for q in QUALITIES:
        register(f"jpeg444-pil-q{q}", _jpeg("pil", q, subsampling=0))
    for lib, make, interps in (("pil", _resize_pil, _PIL_FILTERS), ("cv2", _resize_cv2, _CV2_FLAGS),
                               ("torchvision", _resize_tv, _TV_MODES)):
        for interp in interps:
            register(f"resize-{lib}-{interp}", _round_trip(make, interp))
    return reg


_REGISTRY = _build_registry()
VARIATIONS: tuple[str, ...] = tuple(_REGISTRY)


def check_variation(name: str) -> str:
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown systematic variation {name!r}; known: {', '.join(VARIATIONS)}")
    return name


def _to_uint8_hwc(x: np.ndarray) -> list[np.ndarray]:
    """float32 N×C×H×W -> N uint8 images H×W (C = 1) or H×W×3."""
    u8 = np.rint(x * 255.0).astype(np.uint8)
    return [im[0] if im.shape[0] == 1 else np.ascontiguousarray(im.transpose(1, 2, 0)) for im in u8]


def _apply_checked(x: np.ndarray, name: str) -> np.ndarray:
    if name == "reference":  # exact, also for data off the 8-bit grid
        return x.copy()
    fn = _REGISTRY[name]
    out = np.empty_like(x)
    for i, img in enumerate(_to_uint8_hwc(x)):
        res = np.asarray(fn(img))
        if res.shape != img.shape or res.dtype != np.uint8:
            raise RobustnessInputError(f"variation {name} returned {res.dtype} {res.shape} for a {img.shape} image")
        out[i] = (res[None] if res.ndim == 2 else res.transpose(2, 0, 1)) / np.float32(255.0)
    return out


def apply_variation(images, name: str) -> np.ndarray:
    """float32 N×C×H×W in [0, 1] -> the images through systematic variation `name` (see the module docstring), float32
    N×C×H×W on the 8-bit grid. Deterministic (no randomness)."""
    return _apply_checked(check_images(images), check_variation(name))


# --------------------------------------------------------------------------------------------------- the check


def systematic_settings(x: np.ndarray, labels: np.ndarray) -> dict:
    """What the rows depend on (the result log's meta): the data digest and library versions."""
    import cv2
    import PIL
    import torchvision

    return {"check": "systematic", "images": int(len(x)), "data_sha256": data_digest(x, labels),
            "impl": IMPL_VERSION, "resize_scale": RESIZE_SCALE,
            "versions": {"pillow": PIL.__version__, "opencv": cv2.__version__, "torchvision": torchvision.__version__}}


def run_systematic(runner, x, labels, names: Sequence[str] | None = None, log=None, batch_size: int = 256,
                   progress: bool = False) -> dict:
    """Top-1 accuracy of `runner` on x through each systematic variation (default: all of VARIATIONS; "reference"
    is always evaluated). log: None, a path (JsonlLog with meta `systematic_settings`) or a JsonlLog; each finished
    row is appended (key = the variation name) and a rerun skips rows already there.
    Returns {"rows": [{key, variation, n, correct, accuracy, mean_abs_diff}], "accuracies": {variation: accuracy}};
    mean_abs_diff is mean |x_v − x| in [0, 1] units."""

    names = list(VARIATIONS) if names is None else [check_variation(n) for n in names]
    names = ["reference"] + [n for n in dict.fromkeys(names) if n != "reference"]
    x = check_images(x)
    labels = check_labels(labels, len(x))
    if batch_size < 1:
        raise RobustnessInputError(f"batch size must be >= 1, got {batch_size}")
    log = open_log(log, systematic_settings(x, labels))
    results = {n: log.get(n) for n in names if log is not None and n in log}
    todo = [n for n in names if n not in results]
    with progress_bar("systematic", len(todo) * len(x), progress) as (bar, task):
        for name in todo:
            bar.update(task, info=name)
            diff = [0.0]

            def tf(xb, a, b, name=name, diff=diff):
                xv = _apply_checked(xb, name)
                diff[0] += float(np.abs(xv - xb).sum(dtype=np.float64))
                return xv

            row = {"key": name, "variation": name,
                   **accuracy_row(runner, x, labels, batch_size, tf, lambda k: bar.update(task, advance=k))}
            row["mean_abs_diff"] = diff[0] / max(x.size, 1)
            results[name] = log.append(name, row) if log is not None else row
    rows = [results[n] for n in names]
    return {"rows": rows, "accuracies": {r["variation"]: r["accuracy"] for r in rows}}
