"""`arq-deploy predict`: the deployed smoothed classifier's answer for new inputs (Cohen et al.'s PREDICT, with
abstention), one JSON line per input.

    cfg = PredictConfig(model_path="m.onnx", inputs=("cat.png", "more/", "batch.npy"), sigma=0.25, out="p.jsonl")
    rows = predict_stage(cfg)   # p.jsonl (one line per input) and p.config.json beside it

Inputs are image files (any format PIL reads, any size and mode), folders of images (searched recursively, files
sorted by path) and `.npy` arrays (one C×H×W image or a batch N×C×H×W; float in [0, 1], or uint8 0..255 scaled by
1/255). Images are converted to the model's channels (PIL `convert` to "L" or "RGB") and then preprocessed exactly as
datasets are (`arq_deploy.core.data.preprocess_image`): with `cfg.preprocess` (--resize N, --center-crop H,W) when
given, else fitted to the model's H×W (`Preprocess.for_model`: shorter side to max(H, W) with torchvision's bilinear
Resize, then the center H×W). Input i of the expanded list (folders expanded, batch rows counted one by one)
gets the noise seed `input_seed(seed, i)`, so a result can be reproduced with `Smooth.predict` alone.

Everything is read and checked before anything is written; the JSON lines are written atomically, so a failed run
leaves no output file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from arq_deploy.certify.smooth import ABSTAIN, Smooth
from arq_deploy.core.config import (
    BACKENDS,
    ConfigError,
    Preprocess,
    StageConfig,
    _address,
    _choice,
    _positive_int,
    _require,
)
from arq_deploy.core.data import IMAGE_EXTENSIONS, _decode_one, _list_dir_images, _one_line, preprocess_image
from arq_deploy.core.errors import ArqError, DataFormatError
from arq_deploy.core.fileio import write_text
from arq_deploy.core.validation import check_alpha, check_count, check_seed, check_sigma
from arq_deploy.runtime.noise import input_seed
from arq_deploy.targets.backends import open_runner

NPY_SUFFIX = ".npy"
OUT_SUFFIX = ".jsonl"
_MAX_FOLDER_DEPTH = 32
_CLASS_NAME_KEYS = ("classes", "class_names")  # arq.* metadata keys that may hold the class names


# ---------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class PredictConfig(StageConfig):
    """PREDICT (with abstention) of the smoothed classifier of a deployed model on new inputs, on a target."""

    STAGE: ClassVar[str] = "predict"
    model_path: str  # an .onnx file or a compiled artifact directory
    inputs: tuple[str, ...]
    out: str | None = None  # a .jsonl file; None: the JSON lines go to stdout
    target: str | None = None
    backend: str = "auto"
    remote: str | None = None
    sigma: float | None = None  # required: the noise level the model was trained for
    n: int = 1000
    alpha: float = 0.001
    seed: int = 0
    batch_size: int = 500
    preprocess: Preprocess = field(default_factory=Preprocess)  # --resize / --center-crop; none: fit to the model

    def __post_init__(self):
        _require(bool(self.model_path), "give MODEL_PATH: an .onnx file or a compiled artifact directory")
        _require(isinstance(self.inputs, (tuple, list)) and len(self.inputs) > 0,
                 "give at least one input: an image file, a folder of images or a .npy array")
        object.__setattr__(self, "model_path", str(self.model_path))
        object.__setattr__(self, "inputs", tuple(str(p) for p in self.inputs))
        if self.out is not None:
            object.__setattr__(self, "out", str(self.out))
            _require(Path(self.out).suffix == OUT_SUFFIX, f"--out must be a {OUT_SUFFIX} file, got {self.out!r}")
        _choice("--backend", self.backend, tuple(b for b in BACKENDS if b != "torch"))
        _address("--remote", self.remote)
        if self.sigma is None:
            raise ConfigError("give --sigma (the noise level the model was trained for)")
        check_sigma(self.sigma)
        check_count("--n", self.n)
        check_alpha(self.alpha)
        check_seed(self.seed)
        _positive_int("--batch-size", self.batch_size)

    @property
    def config_path(self) -> Path | None:
        """OUT with suffix .config.json; None when the lines go to stdout."""
        return None if self.out is None else Path(self.out).with_suffix(".config.json")


# ---------------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class PredictInput:
    """One input image, preprocessed to the model's float32 C×H×W in [0, 1]; `name` is what the output calls it."""

    name: str
    x: np.ndarray


def load_inputs(paths, input_shape: tuple[int, int, int], preprocess: Preprocess | None = None) -> list[PredictInput]:
    """Expand and load every input (see the module doc) in order; one DataFormatError line naming the first bad file.
    Image files go through `preprocess`, by default the fit to the model's H×W."""
    shape = tuple(int(d) for d in input_shape)
    pre = (preprocess or Preprocess()).or_model(shape[1:])
    out: list[PredictInput] = []
    for given in paths:
        p = Path(given)
        if p.is_dir():
            rel = sorted(_list_dir_images(p, max_depth=_MAX_FOLDER_DEPTH))
            if not rel:
                raise DataFormatError(f"{given}: folder holds no images ({' '.join(sorted(IMAGE_EXTENSIONS))})")
            out += [PredictInput(str(p / r), load_image(p / r, shape, pre)) for r in rel]
        elif not p.exists():
            raise DataFormatError(f"{given}: no such file or folder")
        elif p.suffix.lower() == NPY_SUFFIX:
            out += load_npy(p, shape)
        else:
            out.append(PredictInput(str(given), load_image(p, shape, pre)))
    return out


def load_image(path: str | os.PathLike, input_shape: tuple[int, int, int], preprocess: Preprocess | None = None
               ) -> np.ndarray:
    """An image file as float32 C×H×W in [0, 1]: converted to "L" (C = 1) or "RGB" (C = 3), then put through
    `preprocess` (default: the fit to the model's H×W, `Preprocess.for_model`), which must give H×W."""
    from PIL import Image

    c, h, w = input_shape
    if c not in (1, 3):
        raise DataFormatError(f"{path}: the model takes {c}-channel inputs; an image file gives 1 (L) or 3 (RGB) "
                              f"channels: give its inputs as .npy arrays of shape {c}×{h}×{w}")
    try:
        rgb = _decode_one(str(path), str(path))  # uint8 H×W×3, any mode converted to RGB
    except DataFormatError as e:
        raise DataFormatError(f"{e} (expected an image: {' '.join(sorted(IMAGE_EXTENSIONS))}, or a .npy array)") \
            from None
    im = Image.fromarray(rgb)
    if c == 1:
        im = im.convert("L")
    pre = (preprocess or Preprocess()).or_model((h, w))
    im = preprocess_image(im, pre, str(path))
    if im.size != (w, h):
        raise DataFormatError(f"{path}: image is {im.size[0]}×{im.size[1]} after {pre.describe()}, the model takes "
                              f"{w}×{h} (W×H): give --center-crop {h},{w}")
    a = np.asarray(im, dtype=np.float32) / np.float32(255.0)
    return np.ascontiguousarray(a[None] if c == 1 else a.transpose(2, 0, 1))


def load_npy(path: Path, input_shape: tuple[int, ...]) -> list[PredictInput]:
    """A .npy of one C×H×W image (named PATH) or a batch N×C×H×W (rows named PATH#k); float in [0, 1] or uint8."""
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - not a .npy, truncated, pickled objects: all are the user's file
        raise DataFormatError(f"{path}: cannot read as a .npy array ({_one_line(e)})") from None
    c, h, w = shape = tuple(input_shape)
    one, batch = a.shape == shape, a.ndim == 4 and a.shape[1:] == shape and a.shape[0] > 0
    if not (one or batch):
        raise DataFormatError(f"{path}: array of shape {a.shape}, the model takes one image "
                              f"{c}×{h}×{w} or a batch N×{c}×{h}×{w}")
    if a.dtype == np.uint8:
        x = a.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise DataFormatError(f"{path}: array contains NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise DataFormatError(f"{path}: values lie in [{lo:g}, {hi:g}]; expected floats in [0, 1] "
                                  f"(or uint8 0..255)")
        x = a.astype(np.float32)
    else:
        raise DataFormatError(f"{path}: array of dtype {a.dtype}; expected floats in [0, 1] or uint8 0..255")
    if x.ndim == 3:
        return [PredictInput(str(path), np.ascontiguousarray(x))]
    return [PredictInput(f"{path}#{k}", np.ascontiguousarray(x[k])) for k in range(len(x))]


# ---------------------------------------------------------------------------------------------------- the model
def model_metadata(model_path: str | os.PathLike) -> dict:
    """The model's arq.* metadata: an artifact's manifest, or the ONNX file's metadata_props ({} when unreadable)."""
    p = Path(model_path)
    if p.is_dir():
        from arq_deploy.core.artifact import load_artifact

        return dict(load_artifact(p).arq)
    try:
        import onnx

        from arq_deploy.core.artifact import onnx_arq_metadata

        return onnx_arq_metadata(onnx.load(str(p), load_external_data=False))
    except Exception:  # noqa: BLE001 - the runner has loaded it already; the metadata only names classes
        return {}


def class_names(meta: dict, num_classes: int) -> tuple[str, ...]:
    """Names from the metadata ('classes' or 'class_names', a list of num_classes strings), else '0', '1', ..."""
    for key in _CLASS_NAME_KEYS:
        names = meta.get(key)
        if isinstance(names, list) and len(names) == num_classes and all(isinstance(s, str) for s in names):
            return tuple(names)
    return tuple(str(i) for i in range(num_classes))


# ---------------------------------------------------------------------------------------------------- the stage
def predict_stage(cfg: PredictConfig, emit: Callable[[dict], None] | None = None) -> list[dict]:
    """PREDICT each input (see the module doc); returns one dict per input and writes them as JSON lines to cfg.out
    (atomically, with the config beside it). `emit` is called with each dict as soon as it is ready."""
    if cfg.out is not None and Path(cfg.out).is_dir():
        raise ArqError(f"--out {cfg.out} is a folder: give a {OUT_SUFFIX} file")
    runner, _ = open_runner(cfg.model_path, cfg.target, cfg.remote, cfg.backend, cfg.batch_size)
    try:
        meta = model_metadata(cfg.model_path)
        num_classes = int(getattr(runner, "num_classes", -1))
        if num_classes < 1:
            num_classes = int(meta.get("num_classes", -1))
        if num_classes < 2:
            raise ArqError(f"{cfg.model_path}: cannot tell the number of classes (the output's last dimension is not "
                           f"fixed and the metadata has no num_classes)")
        names = class_names(meta, num_classes)
        inputs = load_inputs(cfg.inputs, tuple(runner.input_shape), cfg.preprocess)
        smooth = Smooth(runner, num_classes, cfg.sigma, batch_size=cfg.batch_size)
        rows = []
        for i, inp in enumerate(inputs):
            start = time.perf_counter()
            pred, counts = smooth.predict_with_counts(inp.x, cfg.n, cfg.alpha, seed=input_seed(cfg.seed, i))
            top2 = sorted((int(c) for c in counts), reverse=True)[:2]
            abstain = pred == ABSTAIN
            row = {"input": inp.name, "prediction": None if abstain else int(pred),
                   "class": None if abstain else names[pred], "abstain": abstain, "counts_top2": top2,
                   "n": cfg.n, "alpha": cfg.alpha, "sigma": cfg.sigma,
                   "seconds": round(time.perf_counter() - start, 6)}
            rows.append(row)
            if emit is not None:
                emit(row)
    finally:
        if hasattr(runner, "close"):  # a qemu worker or an RPC session ends with the run
            runner.close()
    if cfg.out is not None:
        cfg.save(cfg.config_path)
        write_text(cfg.out, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def summary_line(rows: list[dict]) -> str:
    """'N inputs: K predicted, A abstained (R s/input)'."""
    abstained = sum(r["abstain"] for r in rows)
    secs = sum(r["seconds"] for r in rows) / max(len(rows), 1)
    return f"{len(rows)} inputs: {len(rows) - abstained} predicted, {abstained} abstained ({secs:.3f} s/input)"
