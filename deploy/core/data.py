"""Datasets for calibration, evaluation, training and certification.

`load_dataset(spec, split)` understands four kinds of `spec`:

* ``"digits"``: scikit-learn's 8×8 digits, float32 N×1×8×8 in [0, 1], stratified 70/30 train/test split;
* a folder in the CIFAR-10 python-batch format (``batches.meta``, ``data_batch_N``, ``test_batch``);
* an image folder ``ROOT/<class>/<image>`` or ``ROOT/{train,test}/<class>/<image>`` (uint8 N×3×H×W, RGB);
* a ``.tar`` / ``.tar.gz`` / ``.tgz`` of such an image folder, read in memory and cached as ``.npz`` under
  ``$ARQ_CACHE_DIR/datasets`` (default ``~/.cache/arq-deploy/datasets``), keyed by the archive and the preprocessing.

Image files of any mode are converted to RGB with PIL (grayscale, palette, RGBA: alpha dropped, CMYK; as torchvision's
image-folder loader does); 16-bit and float images are refused. `preprocess` (`Preprocess`: --resize N, shorter side
to N, then --center-crop H,W, with torchvision's transforms) brings images of different sizes to one size; given
nothing, image files are fitted to `model_size` (H, W) when the caller knows it (`Preprocess.for_model`), and mixed
sizes without either are one error naming --resize/--center-crop. CIFAR-10 batches go through `preprocess` only when
it is given; 'digits' takes none.

Every user mistake (missing path, unknown format, broken file) raises `DataFormatError` with one line.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import lzma
import os
import pickle
import re
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from arq_deploy.core.config import Preprocess
from arq_deploy.core.errors import DataFormatError
from arq_deploy.core.fileio import atomic_path

SPLITS = ("train", "test")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"})
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
EXPECTED = (
    "expected 'digits', a CIFAR-10 python-batch folder (batches.meta, data_batch_N, test_batch), "
    "an image folder ROOT/<class>/<image> or ROOT/{train,test}/<class>/<image>, or a .tar/.tar.gz/.tgz of one"
)
SIZE_HINT = "; for image data, --resize N and --center-crop H,W bring the images to the model's H×W"
_CACHE_VERSION = 2
_POOL_MIN_IMAGES = 2048  # below this, decode serially
_CHUNK = 256  # images per decoding task
_MAX_WORKERS = 8


@dataclass(frozen=True, eq=False)
class Dataset:
    """An in-memory labelled image set: images N×C×H×W (uint8 0..255 or float32 in [0,1]), labels int64 N."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype not in (np.uint8, np.float32):
            raise ValueError(f"images must be uint8/float32 N×C×H×W, got {self.images.dtype} {self.images.shape}")
        if self.labels.dtype != np.int64 or self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must be int64 of shape ({len(self.images)},), got {self.labels.dtype} "
                             f"{self.labels.shape}")
        if not isinstance(self.classes, tuple):
            raise ValueError("classes must be a tuple of class names")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """C, H, W of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def x(self, idx=None) -> np.ndarray:
        """Fresh float32 n×C×H×W in [0, 1] for `idx` (int array, bool mask, slice, int, or None = all)."""
        sel = self.images if idx is None else self.images[_as_index(idx)]
        if sel.dtype == np.uint8:
            return np.divide(sel, np.float32(255.0), dtype=np.float32)
        return np.array(sel, dtype=np.float32, copy=True)

    def subset(self, idx) -> Dataset:
        """The images and labels at `idx` (as for `x`) as a new Dataset with the same name and classes."""
        idx = _as_index(idx)
        return Dataset(self.name, self.images[idx], self.labels[idx], self.classes)


def _as_index(idx):
    """A single int becomes a one-element index so that indexing keeps the N axis."""
    return [idx] if isinstance(idx, (int, np.integer)) else idx


# ---------------------------------------------------------------------------------------------- entry points


def dataset_format(spec: str) -> str:
    """'digits' | 'cifar10-python' | 'imagefolder' | 'imagefolder-tar' for `spec`; DataFormatError otherwise."""
    spec = os.fspath(spec)
    if spec == "digits":
        return "digits"
    if not spec.strip():
        raise DataFormatError(f"empty dataset name; {EXPECTED}")
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataFormatError(f"dataset {spec!r}: no such file or folder; {EXPECTED}")
    if path.is_dir():
        return _folder_format(path)
    if path.name.lower().endswith(TAR_SUFFIXES):
        return "imagefolder-tar"
    raise DataFormatError(f"{path}: unknown file type; {EXPECTED}")


def load_dataset(spec: str, split: str = "test", preprocess: Preprocess | None = None,
                 model_size: tuple[int, int] | None = None) -> Dataset:
    """Load `split` ('train' or 'test') of the dataset named by `spec` (see the module docstring), its images put
    through `preprocess`; image files given no preprocessing are fitted to `model_size` (H, W) when it is known."""
    if split not in SPLITS:
        raise DataFormatError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    fmt = dataset_format(spec)
    pre = preprocess or Preprocess()
    if fmt == "digits":
        if pre.given:
            raise DataFormatError("'digits' are fixed 8×8 arrays: --resize/--center-crop apply to image data (an "
                                  "image folder, an archive of one, CIFAR-10 batches)")
        return _load_digits(split)
    if fmt != "cifar10-python":
        pre = pre.or_model(tuple(model_size) if model_size else None)
    path = Path(os.fspath(spec)).expanduser().resolve()
    loader = {"cifar10-python": _load_cifar_python, "imagefolder": _load_image_dir, "imagefolder-tar": _load_image_tar}
    ds = loader[fmt](path, split, pre)
    return ds if not pre.given else Dataset(f"{ds.name} [{pre.describe()}]", ds.images, ds.labels, ds.classes)


def image_size(input_shape) -> tuple[int, int] | None:
    """(H, W) of a model's C×H×W input shape, None where H or W is not a fixed positive integer."""
    try:
        h, w = (int(v) for v in tuple(input_shape)[-2:])
    except (TypeError, ValueError):
        return None
    return (h, w) if h > 0 and w > 0 and len(tuple(input_shape)) >= 2 else None


def _folder_format(path: Path) -> str:
    if (path / "batches.meta").is_file():
        return "cifar10-python"
    if _list_dir_images(path):
        return "imagefolder"
    exts = " ".join(sorted(IMAGE_EXTENSIONS))
    raise DataFormatError(f"{path}: folder holds no images ({exts}) and no CIFAR-10 batches.meta; {EXPECTED}")


# ---------------------------------------------------------------------------------------------- digits


def _load_digits(split: str) -> Dataset:
    """scikit-learn digits as float32 N×1×8×8 in [0,1]; test = a fixed stratified 30%."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    y = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.3, random_state=0, stratify=y)
    idx = np.sort(train_idx if split == "train" else test_idx)
    images = (bunch.images[idx] / 16.0).astype(np.float32)[:, None, :, :]
    return Dataset("digits", images, y[idx], tuple(str(d) for d in range(10)))


# ---------------------------------------------------------------------------------------------- CIFAR-10 python


_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
_SCALAR = np.float64(0).__reduce__()[0]
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: no other global can be called."""

    def find_class(self, module: str, name: str):
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch") from None


def _unpickle(path: Path):
    """The object in the CIFAR-10 batch pickle at `path` (python-2 strings kept as bytes)."""
    try:
        with open(path, "rb") as f:
            return _BatchUnpickler(f, encoding="bytes").load()
    except Exception as e:  # any failure here is a broken user file
        raise DataFormatError(f"{path}: not a CIFAR-10 python batch pickle ({_one_line(e)})") from None


def _field(obj, key: str, path: Path):
    """obj[b'key'] (or obj['key']) of a batch dict, else DataFormatError."""
    if isinstance(obj, dict):
        for k in (key.encode(), key):
            if k in obj:
                return obj[k]
    raise DataFormatError(f"{path}: not a CIFAR-10 batch: expected a dict with key {key!r}")


def _cifar_classes(folder: Path) -> tuple[str, ...]:
    path = folder / "batches.meta"
    names = _field(_unpickle(path), "label_names", path)
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataFormatError(f"{path}: label_names must be a non-empty list of class names")
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)


def _cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 N×3×32×32, int64 N) of one batch file: rows are 1024 R, 1024 G, 1024 B bytes, row-major."""
    d = _unpickle(path)
    data, labels = _field(d, "data", path), np.asarray(_field(d, "labels", path))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise DataFormatError(f"{path}: 'data' must be a uint8 N×3072 array")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer) or len(data) == 0:
        raise DataFormatError(f"{path}: 'labels' must be {len(data)} integers, one per row of 'data' (N>0)")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataFormatError(f"{path}: labels must lie in 0..{num_classes - 1} (batches.meta names {num_classes})")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar_split_files(folder: Path) -> dict[str, list[Path]]:
    """{'train': data_batch_N in numeric order, 'test': [test_batch]}, only the splits present."""
    numbered = [(int(m.group(1)), p) for p in folder.iterdir() if (m := re.fullmatch(r"data_batch_(\d+)", p.name))]
    files = {"train": [p for _, p in sorted(numbered)], "test": [p for p in [folder / "test_batch"] if p.is_file()]}
    return {k: v for k, v in files.items() if v}


def _load_cifar_python(folder: Path, split: str, pre: Preprocess) -> Dataset:
    files = _cifar_split_files(folder)
    if split not in files:
        have = ", ".join(files) or "none (no data_batch_N or test_batch files)"
        raise DataFormatError(f"{folder}: CIFAR-10 folder has no {split!r} split; available: {have}")
    classes = _cifar_classes(folder)
    parts = [_cifar_batch(p, len(classes)) for p in files[split]]
    images = np.concatenate([p[0] for p in parts])
    if pre.given:
        images = _decode_all([(f"{folder}[{i}]", a.transpose(1, 2, 0)) for i, a in enumerate(images)], pre)
    return Dataset("cifar10-python", images, np.concatenate([p[1] for p in parts]), classes)


# ---------------------------------------------------------------------------------------------- image folders


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _list_dir_images(root: Path, max_depth: int = 4) -> list[str]:
    """Relative posix paths of image files at most `max_depth` levels below `root` (hidden entries skipped)."""
    found: list[str] = []

    def walk(folder: Path, prefix: str, depth: int) -> None:
        for entry in os.scandir(folder):
            if entry.name.startswith("."):
                continue
            if entry.is_dir() and depth < max_depth:
                walk(Path(entry.path), f"{prefix}{entry.name}/", depth + 1)
            elif entry.is_file() and _is_image_name(entry.name):
                found.append(prefix + entry.name)

    try:
        walk(root, "", 1)
    except OSError as e:
        raise DataFormatError(f"{root}: cannot read folder ({_one_line(e)})") from None
    return found


def _strip_wrapper(entries: list[tuple[str, tuple[str, ...]]]) -> list[tuple[str, tuple[str, ...]]]:
    """Drop up to two single enclosing folders (e.g. 'mydata/') when no image sits at a layout depth."""
    for _ in range(2):
        at_layout_depth = any(len(q) == 2 or (len(q) == 3 and q[0] in SPLITS) for _, q in entries)
        tops = {q[0] for _, q in entries}
        if at_layout_depth or len(tops) != 1 or any(len(q) < 3 for _, q in entries):
            break
        entries = [(p, q[1:]) for p, q in entries]
    return entries


def _select_split(paths: list[str], split: str, where: str) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """From relative image paths pick `split`: (paths sorted by (class, file), int64 labels, classes).

    Layouts: <class>/<file>, or {train,test}/<class>/<file> (classes are the union over both splits).
    """
    entries = _strip_wrapper([(p, tuple(p.split("/"))) for p in paths])
    splits = sorted({q[0] for _, q in entries if len(q) == 3 and q[0] in SPLITS})
    if splits and split not in splits:
        raise DataFormatError(f"{where}: no {split!r} split folder; available: {', '.join(splits)}")
    if splits:
        pool = [(p, q[1:]) for p, q in entries if len(q) == 3 and q[0] in SPLITS]
        chosen = [(p, q[1:]) for p, q in entries if len(q) == 3 and q[0] == split]
    else:
        pool = chosen = [(p, q) for p, q in entries if len(q) == 2]
    if not chosen:
        raise DataFormatError(f"{where}: no images in the layout ROOT/<class>/<image>; {EXPECTED}")
    classes = tuple(sorted({q[0] for _, q in pool}))
    index = {c: i for i, c in enumerate(classes)}
    chosen = sorted(chosen, key=lambda e: e[1])
    return [p for p, _ in chosen], np.array([index[q[0]] for _, q in chosen], dtype=np.int64), classes


def _load_image_dir(root: Path, split: str, pre: Preprocess) -> Dataset:
    paths, labels, classes = _select_split(_list_dir_images(root), split, str(root))
    images = _decode_all([(str(root / p), str(root / p)) for p in paths], pre)
    return Dataset(f"imagefolder:{root}", images, labels, classes)


# ---------------------------------------------------------------------------------------------- tar archives


def _safe_member_name(member: tarfile.TarInfo) -> str | None:
    """The normalised name of a regular image member, or None to skip it (links, absolute, '..', hidden)."""
    if not member.isfile():
        return None
    path = PurePosixPath(member.name)
    parts = [p for p in path.parts if p not in ("", ".")]
    if path.is_absolute() or ".." in parts or not parts or any(p.startswith(".") for p in parts):
        return None
    return "/".join(parts) if _is_image_name(parts[-1]) else None


def _read_tar_images(path: Path) -> dict[str, bytes]:
    """{member name: bytes} of the safe image members of the tar at `path`, read in memory, never extracted."""
    blobs: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r|*") as tf:  # one sequential pass, no seeking
            for member in tf:
                name = _safe_member_name(member)
                if name is not None:
                    blobs[name] = tf.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
        raise DataFormatError(f"{path}: corrupt or unreadable tar archive ({_one_line(e)})") from None
    return blobs


def _load_image_tar(path: Path, split: str, pre: Preprocess) -> Dataset:
    cache = _cache_file(path, split, pre)
    hit = _cache_load(cache)
    if hit is None:
        blobs = _read_tar_images(path)
        if not blobs:
            raise DataFormatError(f"{path}: archive holds no images; {EXPECTED}")
        names, labels, classes = _select_split(list(blobs), split, str(path))
        hit = _decode_all([(f"{path}:{n}", blobs[n]) for n in names], pre), labels, classes
        _cache_save(cache, *hit)
    return Dataset(f"imagefolder:{path}", *hit)


# ---------------------------------------------------------------------------------------------- decoding


_HIGH_DEPTH_MODES = ("I", "F")  # PIL modes I, I;16*, F: 16/32-bit values that convert("RGB") would clip
_AS_IS = Preprocess()  # no preprocessing


def _decode_one(name: str, source: bytes | str | np.ndarray, pre: Preprocess = _AS_IS) -> np.ndarray:
    """Decode one image (bytes, a file path, or a uint8 H×W×3 array) to RGB uint8 H×W×3, put through `pre`."""
    from PIL import Image

    try:
        if isinstance(source, np.ndarray):
            im = Image.fromarray(source)
        else:
            im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        with im:
            if im.mode.split(";")[0] in _HIGH_DEPTH_MODES:
                raise DataFormatError(f"{name}: a {im.mode} image (16-bit or float values) cannot be read as 8-bit "
                                      f"RGB; save it as an 8-bit image (L, RGB, RGBA, P, CMYK, ...)")
            rgb = im.convert("RGB")
    except DataFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files; all are the user's data
        raise DataFormatError(f"{name}: cannot decode image ({_one_line(e)})") from None
    return np.asarray(preprocess_image(rgb, pre, name))


def preprocess_image(im, pre: Preprocess, name: str = "image"):
    """A PIL image put through `pre` with torchvision's own functional transforms: Resize(N) (shorter side to N,
    bilinear, antialiased), then CenterCrop(H, W); a crop larger than the (resized) image is a DataFormatError."""
    if not pre.given:
        return im
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    if pre.resize is not None:
        im = F.resize(im, [pre.resize], interpolation=InterpolationMode.BILINEAR, antialias=True)
    if pre.crop is not None:
        (h, w), (iw, ih) = pre.crop, im.size
        if h > ih or w > iw:
            after = f" after --resize {pre.resize}" if pre.resize is not None else ""
            raise DataFormatError(f"{name}: image is {iw}×{ih}{after}, smaller than --center-crop {h}×{w} (H×W): "
                                  f"give a smaller --center-crop, or --resize N with N >= {max(h, w)}")
        im = F.center_crop(im, [h, w])
    return im


def _decode_chunk(items: list[tuple[str, bytes | str | np.ndarray]], pre: Preprocess) -> list[np.ndarray]:
    return [_decode_one(name, source, pre) for name, source in items]


def _decode_all(items: list[tuple[str, bytes | str | np.ndarray]], pre: Preprocess = _AS_IS) -> np.ndarray:
    """Decode (name, bytes / path / H×W×3 array) items through `pre` to uint8 N×3×H×W; all must then share the
    first image's size."""
    if pre.given:
        import torchvision.transforms.v2  # noqa: F401 - imported once here, not racing in the decoding threads
    arrays = [a for chunk in _decode_chunks(items, pre) for a in chunk]
    first = arrays[0].shape
    out = np.empty((len(arrays), 3, first[0], first[1]), dtype=np.uint8)
    for i, ((name, _), a) in enumerate(zip(items, arrays)):
        if a.shape != first:
            after = f" after {pre.describe()}" if pre.given else ""
            raise DataFormatError(f"{name}: image is {a.shape[1]}×{a.shape[0]} but {items[0][0]} is "
                                  f"{first[1]}×{first[0]}{after}; all images must have the same size: give "
                                  f"--center-crop N (or H,W), with --resize N to scale them first")
        out[i] = a.transpose(2, 0, 1)
    return out


def _decode_chunks(items: list[tuple[str, bytes | str | np.ndarray]], pre: Preprocess) -> list[list[np.ndarray]]:
    """Decode in a thread pool (PIL releases the GIL while decoding) for big sets; results in item order."""
    workers = _decode_workers(len(items))
    if workers < 2:
        return [_decode_chunk(items, pre)]
    chunks = [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]
    with ThreadPoolExecutor(workers, thread_name_prefix="arq-decode") as pool:
        return list(pool.map(_decode_chunk, chunks, [pre] * len(chunks)))


def _decode_workers(n_images: int) -> int:
    """Decoding threads: $ARQ_DATA_WORKERS if set (0 or 1 = serial), else up to 8 CPUs for big sets."""
    env = os.environ.get("ARQ_DATA_WORKERS", "").strip()
    if env and not env.isdigit():
        raise DataFormatError(f"ARQ_DATA_WORKERS={env!r}: expected a non-negative integer")
    if env:
        return int(env)
    return min(_MAX_WORKERS, os.cpu_count() or 1) if n_images >= _POOL_MIN_IMAGES else 1


# ---------------------------------------------------------------------------------------------- cache


def _cache_dir() -> Path:
    root = os.environ.get("ARQ_CACHE_DIR")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "arq-deploy") / "datasets"


def _cache_file(path: Path, split: str, pre: Preprocess) -> Path:
    """Cache file keyed by sha256 of (resolved path, size, mtime, split, preprocessing, cache version)."""
    st = path.stat()
    key = f"{_CACHE_VERSION}\0{path}\0{st.st_size}\0{st.st_mtime_ns}\0{split}\0{pre.resize}\0{pre.crop}"
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name)[:64]
    return _cache_dir() / f"{stem}-{split}-{digest}.npz"


def _cache_load(file: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]] | None:
    """(images, labels, classes) from a cache file, or None when it is absent or unusable."""
    try:
        with np.load(file, allow_pickle=False) as z:
            images, labels, classes = z["images"], z["labels"], tuple(str(c) for c in z["classes"])
    except Exception:  # missing, truncated or foreign file: rebuild it
        return None
    ok = images.ndim == 4 and images.dtype == np.uint8 and labels.dtype == np.int64
    ok = ok and labels.shape == (len(images),) and len(images) > 0
    return (images, labels, classes) if ok else None


def _cache_save(file: Path, images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> None:
    """Write the cache atomically; a cache that cannot be written is silently skipped."""
    try:
        with atomic_path(file) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels, classes=np.array(classes, dtype=str))
    except OSError:
        pass


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
