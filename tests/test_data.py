"""Tests of arq_deploy.core.data: digits, CIFAR-10 python batches, image folders and tar archives."""

from __future__ import annotations

import io
import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arq_deploy.core.data import Dataset, dataset_format, load_dataset
from arq_deploy.core.errors import DataFormatError

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
CIFAR_PY = CIFAR / "cifar-10-batches-py"
JPEG_TEST = CIFAR / "cifar10-jpeg-test.tar.gz"
JPEG_TRAIN = CIFAR / "cifar10-jpeg-train.tar.gz"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def shared(path: Path):
    """Mark a test as needing shared data at `path`, skipping it when absent."""

    def deco(fn):
        fn = pytest.mark.skipif(not path.exists(), reason=f"{path} not present")(fn)
        return pytest.mark.shared_data(fn)

    return deco


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """Every test gets its own dataset cache, never ~/.cache."""
    d = tmp_path / "cache"
    monkeypatch.setenv("ARQ_CACHE_DIR", str(d))
    return d / "datasets"


def png_bytes(size=(4, 3), rgb=(10, 20, 30), fmt="PNG") -> bytes:
    """An image of `size` (W, H) filled with `rgb`, encoded as `fmt`."""
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format=fmt)
    return buf.getvalue()


def write_images(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def write_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------------------------------------- digits


def test_digits_shapes_dtype_range():
    for split, n in (("train", 1257), ("test", 540)):
        ds = load_dataset("digits", split)
        assert dataset_format("digits") == "digits"
        assert len(ds) == n and ds.images.shape == (n, 1, 8, 8) and ds.images.dtype == np.float32
        assert ds.labels.dtype == np.int64 and set(ds.labels.tolist()) == set(range(10))
        assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10 and ds.classes == tuple("0123456789")
        assert 0.0 <= ds.images.min() and ds.images.max() == 1.0


def test_digits_splits_disjoint_complete_deterministic():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797
    rows_train = {r.tobytes() for r in train.images}
    rows_test = {r.tobytes() for r in test.images}
    assert len(rows_train) == len(train) and len(rows_test) == len(test)
    assert not rows_train & rows_test
    again = load_dataset("digits", "test")
    np.testing.assert_array_equal(again.images, test.images)
    np.testing.assert_array_equal(again.labels, test.labels)
    # stratified: every class is about 30% test
    frac = np.bincount(test.labels, minlength=10) / (np.bincount(test.labels) + np.bincount(train.labels))
    assert np.all(np.abs(frac - 0.3) < 0.02)


def test_dataset_x_and_subset():
    ds = Dataset("t", np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2) * 10,
                 np.array([1, 0], dtype=np.int64), ("a", "b"))
    x = ds.x()
    assert x.dtype == np.float32 and x.shape == (2, 3, 2, 2)
    np.testing.assert_allclose(x, ds.images / 255.0, rtol=1e-6)
    assert ds.x(1).shape == (1, 3, 2, 2) and ds.x(np.array([1])).shape == (1, 3, 2, 2)
    assert ds.x(slice(0, 1)).shape == (1, 3, 2, 2)
    sub = ds.subset(np.array([1]))
    assert len(sub) == 1 and sub.labels.tolist() == [0] and sub.classes == ds.classes and sub.name == "t"
    digits = load_dataset("digits")
    xd = digits.x([0, 1])
    xd[:] = -1.0  # a fresh array: the dataset is unchanged
    assert digits.images.min() >= 0.0
    with pytest.raises(ValueError):
        Dataset("bad", np.zeros((2, 3, 4, 4), np.uint8), np.zeros(3, np.int64), ("a",))


# ---------------------------------------------------------------------------------------------- CIFAR-10 python


@shared(CIFAR_PY)
def test_cifar_python_shared():
    assert dataset_format(str(CIFAR_PY)) == "cifar10-python"
    test, train = load_dataset(str(CIFAR_PY), "test"), load_dataset(str(CIFAR_PY), "train")
    assert len(test) == 1000 and len(train) == 4000
    assert test.images.shape == (1000, 3, 32, 32) and test.images.dtype == np.uint8
    assert test.classes == CIFAR_CLASSES and train.classes == CIFAR_CLASSES
    with open(CIFAR_PY / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert test.labels[0] == raw[b"labels"][0]
    assert test.labels.tolist() == list(raw[b"labels"])
    np.testing.assert_array_equal(test.images[0, 0].ravel(), raw[b"data"][0, :1024])  # R plane first
    np.testing.assert_array_equal(test.images[0, 2].ravel(), raw[b"data"][0, 2048:])


def write_cifar(folder: Path, batches: dict[str, tuple[np.ndarray, list[int]]], names=(b"a", b"b")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": list(names)}, protocol=2))
    for name, (data, labels) in batches.items():
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels}, protocol=2))
    return folder


def test_cifar_python_synthetic_batch_order(tmp_path):
    rows = lambda v, n: np.full((n, 3072), v, np.uint8)  # noqa: E731
    folder = write_cifar(tmp_path / "c", {"data_batch_10": (rows(10, 1), [1]), "data_batch_2": (rows(2, 2), [0, 1]),
                                          "data_batch_1": (rows(1, 1), [0])})
    train = load_dataset(str(folder), "train")
    assert train.images[:, 0, 0, 0].tolist() == [1, 2, 2, 10]  # numeric, not lexical, batch order
    assert train.labels.tolist() == [0, 0, 1, 1] and train.classes == ("a", "b")
    with pytest.raises(DataFormatError, match="available: train"):
        load_dataset(str(folder), "test")


class _Evil:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (str(self.target),))


@pytest.mark.parametrize("case", ["shape", "labels", "garbage", "global", "meta"])
def test_cifar_python_bad_structure(tmp_path, case):
    good = (np.zeros((2, 3072), np.uint8), [0, 1])
    folder = write_cifar(tmp_path / "c", {"test_batch": good})
    bad = {"shape": {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
           "labels": {b"data": good[0], b"labels": [0, 5]},
           "global": {b"data": _Evil(tmp_path / "pwned"), b"labels": [0, 1]}}
    if case == "garbage":
        (folder / "test_batch").write_bytes(b"not a pickle at all")
    elif case == "meta":
        (folder / "batches.meta").write_bytes(pickle.dumps({b"other": 1}))
    else:
        (folder / "test_batch").write_bytes(pickle.dumps(bad[case], protocol=2))
    with pytest.raises(DataFormatError) as err:
        load_dataset(str(folder), "test")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------------------- JPEG tar (real)


@shared(JPEG_TEST)
def test_jpeg_test_tar_and_cache(cache_dir, monkeypatch):
    assert dataset_format(str(JPEG_TEST)) == "imagefolder-tar"
    ds = load_dataset(str(JPEG_TEST), "test")
    assert ds.images.shape == (10000, 3, 32, 32) and ds.images.dtype == np.uint8
    assert ds.classes == CIFAR_CLASSES
    assert np.bincount(ds.labels).tolist() == [1000] * 10
    assert np.all(np.diff(ds.labels) >= 0)  # sorted by class
    (cache_file,) = cache_dir.glob("*.npz")
    again = load_dataset(str(JPEG_TEST), "test")
    np.testing.assert_array_equal(again.images, ds.images)
    np.testing.assert_array_equal(again.labels, ds.labels)
    assert again.classes == ds.classes
    # the second load is served from the cache, not decoded again: a pixel changed in the cache file comes back
    marked = ds.images.copy()
    marked[17, 1, 2, 3] ^= 0xFF
    np.savez(cache_file, images=marked, labels=ds.labels, classes=np.array(ds.classes, dtype=str))
    np.testing.assert_array_equal(load_dataset(str(JPEG_TEST), "test").images, marked)
    with pytest.raises(DataFormatError, match="available: test"):
        load_dataset(str(JPEG_TEST), "train")
    # a serial decode (no pool, fresh cache) gives the same pixels
    monkeypatch.setenv("ARQ_DATA_WORKERS", "1")
    monkeypatch.setenv("ARQ_CACHE_DIR", str(cache_dir.parent / "serial"))
    np.testing.assert_array_equal(load_dataset(str(JPEG_TEST)).images, ds.images)
    if CIFAR_PY.exists():
        check_jpeg_matches_lossless(ds)


def check_jpeg_matches_lossless(jpeg: Dataset) -> None:
    """The k-th JPEG of class c is the k-th lossless test image of class c (up to JPEG loss)."""
    lossless = load_dataset(str(CIFAR_PY), "test")
    seen = np.zeros(10, int)
    for i in range(50):
        c = lossless.labels[i]
        j = c * 1000 + seen[c]
        seen[c] += 1
        diff = np.abs(jpeg.images[j].astype(int) - lossless.images[i]).mean()
        assert diff < 15, (i, diff)


@pytest.mark.slow
@shared(JPEG_TRAIN)
def test_jpeg_train_tar():
    ds = load_dataset(str(JPEG_TRAIN), "train")
    assert ds.images.shape == (50000, 3, 32, 32)
    assert np.bincount(ds.labels).tolist() == [5000] * 10


# ---------------------------------------------------------------------------------------------- synthetic folders


def test_image_folder_flat(tmp_path):
    root = write_images(tmp_path / "imgs", {
        "dog/b.png": png_bytes(rgb=(1, 2, 3)), "dog/a.png": png_bytes(rgb=(4, 5, 6)),
        "cat/z.PNG": png_bytes(rgb=(7, 8, 9)), "cat/notes.txt": b"ignored", "cat/.hidden.png": b"ignored",
        "cat/y.bmp": png_bytes(rgb=(10, 11, 12), fmt="BMP"), "empty/readme.md": b"no images"})
    assert dataset_format(str(root)) == "imagefolder"
    ds = load_dataset(str(root), "train")
    assert ds.name == f"imagefolder:{root.resolve()}"
    assert ds.classes == ("cat", "dog") and ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.images.shape == (4, 3, 3, 4) and ds.images.dtype == np.uint8
    # order (class, file name): cat/y.bmp, cat/z.PNG, dog/a.png, dog/b.png; channels R, G, B
    assert ds.images[:, :, 0, 0].tolist() == [[10, 11, 12], [7, 8, 9], [4, 5, 6], [1, 2, 3]]
    np.testing.assert_array_equal(load_dataset(str(root), "test").images, ds.images)  # one set serves both


def test_image_folder_split_layout(tmp_path):
    root = write_images(tmp_path / "d", {"train/a/1.png": png_bytes(), "train/b/1.png": png_bytes(),
                                         "train/b/2.png": png_bytes(), "test/b/1.png": png_bytes(rgb=(9, 9, 9))})
    train, test = load_dataset(str(root), "train"), load_dataset(str(root), "test")
    assert len(train) == 3 and train.labels.tolist() == [0, 1, 1]
    assert test.classes == ("a", "b") and test.labels.tolist() == [1]  # class indices shared across splits
    assert test.images[0, :, 0, 0].tolist() == [9, 9, 9]
    only_train = write_images(tmp_path / "t", {"train/a/1.png": png_bytes()})
    with pytest.raises(DataFormatError, match="available: train"):
        load_dataset(str(only_train), "test")


def test_grayscale_and_jpeg_become_rgb(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (5, 5), 128).save(buf, format="JPEG")
    root = write_images(tmp_path / "g", {"x/1.jpeg": buf.getvalue(), "x/2.ppm": png_bytes((5, 5), fmt="PPM")})
    ds = load_dataset(str(root))
    assert ds.images.shape == (2, 3, 5, 5) and abs(int(ds.images[0, 1, 2, 2]) - 128) <= 2


def test_tar_in_memory_ignores_unsafe_members(tmp_path, monkeypatch):
    files = {"cifar/test/a/1.png": png_bytes(rgb=(1, 1, 1)), "cifar/test/b/1.png": png_bytes(rgb=(2, 2, 2)),
             "../evil.png": png_bytes(), "/abs/evil.png": png_bytes(), "cifar/test/a/../../../evil2.png": png_bytes()}
    work = tmp_path / "work"
    work.mkdir()
    tar = write_tar(work / "set.tgz", files)
    monkeypatch.chdir(work)  # a naive extraction of '../evil.png' would land in tmp_path
    before = set(tmp_path.rglob("*"))
    assert dataset_format(str(tar)) == "imagefolder-tar"
    ds = load_dataset(str(tar), "test")
    assert len(ds) == 2 and ds.classes == ("a", "b") and ds.images[:, 0, 0, 0].tolist() == [1, 2]
    after = {p for p in tmp_path.rglob("*") if "cache" not in p.relative_to(tmp_path).parts}
    assert after == before  # nothing extracted anywhere


def test_tar_plain_and_cache_invalidation(tmp_path, cache_dir):
    tar = write_tar(tmp_path / "s.tar", {"a/1.png": png_bytes(), "b/1.png": png_bytes()}, mode="w")
    assert len(load_dataset(str(tar))) == 2
    assert len(list(cache_dir.glob("*.npz"))) == 1
    write_tar(tar, {"a/1.png": png_bytes(), "b/1.png": png_bytes(), "b/2.png": png_bytes()}, mode="w")
    os.utime(tar, ns=(1, 1))  # new size and mtime: a new cache key
    assert len(load_dataset(str(tar))) == 3
    for f in cache_dir.glob("*.npz"):
        f.write_bytes(b"corrupt cache")  # an unusable cache is rebuilt, not an error
    assert len(load_dataset(str(tar))) == 3


def test_mixed_sizes_names_first_differing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ARQ_DATA_WORKERS", "4")  # errors must also surface from decoding threads
    root = write_images(tmp_path / "m", {"a/1.png": png_bytes((4, 4)), "a/2.png": png_bytes((4, 4)),
                                         "b/1.png": png_bytes((5, 4)), "b/2.png": png_bytes((6, 4))})
    with pytest.raises(DataFormatError, match=r"b/1\.png.*same size"):
        load_dataset(str(root))
    tar = write_tar(tmp_path / "m.tar.gz", {"a/1.png": png_bytes((4, 4)), "b/1.png": png_bytes((4, 5))})
    with pytest.raises(DataFormatError, match=r"b/1\.png"):
        load_dataset(str(tar))


@pytest.mark.parametrize("case", ["missing", "empty_dir", "no_images", "unknown_file", "corrupt_tar",
                                  "truncated_tar", "tar_no_images", "bad_image", "bad_split", "flat_images"])
def test_user_mistakes_raise_one_line(tmp_path, case):
    spec = tmp_path / case
    if case == "empty_dir":
        spec.mkdir()
    elif case == "no_images":
        write_images(spec, {"a/readme.txt": b"x", "b/data.csv": b"1,2"})
    elif case == "unknown_file":
        spec = tmp_path / "data.zip"
        spec.write_bytes(b"PK\x03\x04 not really")
    elif case == "corrupt_tar":
        spec = tmp_path / "x.tar.gz"
        spec.write_bytes(b"\x1f\x8b garbage " * 50)
    elif case == "truncated_tar":
        whole = write_tar(tmp_path / "w.tar.gz", {f"a/{i}.png": os.urandom(3000) for i in range(5)}).read_bytes()
        spec = tmp_path / "t.tar.gz"
        spec.write_bytes(whole[: len(whole) // 2])
    elif case == "tar_no_images":
        spec = write_tar(tmp_path / "n.tar", {"a/readme.txt": b"x"}, mode="w")
    elif case == "bad_image":
        write_images(spec, {"a/1.png": png_bytes(), "a/2.png": b"definitely not a png"})
    elif case == "flat_images":
        write_images(spec, {"1.png": png_bytes(), "2.png": png_bytes()})
    split = "valid" if case == "bad_split" else "test"
    spec = "digits" if case == "bad_split" else str(spec)
    with pytest.raises(DataFormatError) as err:
        load_dataset(spec, split)
    msg = str(err.value)
    assert msg and "\n" not in msg
    if case == "bad_image":
        assert "2.png" in msg
    if case in ("missing", "unknown_file", "empty_dir", "no_images"):
        assert "expected" in msg
        with pytest.raises(DataFormatError):
            dataset_format(spec)


# ---------------------------------------------------------------------------------------------- preprocessing


def photo(size, mode="RGB", seed=0) -> Image.Image:
    """A random-texture image of `size` (W, H) in `mode` (textures make a wrong resize or crop show)."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "RGBA":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)))
        return rgba
    return rgb.convert(mode)


def encoded(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


# an ImageNet-style folder: two splits, three classes, every image of another size and mode
PHOTOS = {
    "train/cat/a.png": ((40, 30), "RGB"), "train/cat/b.png": ((31, 45), "L"), "train/dog/c.png": ((50, 50), "RGBA"),
    "train/dog/d.png": ((36, 28), "P"), "train/owl/e.jpg": ((44, 33), "CMYK"), "test/cat/f.png": ((28, 40), "LA"),
    "test/dog/g.jpg": ((60, 35), "RGB"), "test/owl/h.png": ((33, 33), "RGBA"), "test/owl/i.bmp": ((29, 52), "L"),
}


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    files = {rel: encoded(photo(size, mode, seed=i), "JPEG" if rel.endswith(".jpg") else
                          "BMP" if rel.endswith(".bmp") else "PNG")
             for i, (rel, (size, mode)) in enumerate(PHOTOS.items())}
    return write_images(tmp_path / "photos", files)


def torchvision_reference(path: Path, resize: int | None, crop) -> np.ndarray:
    """What torchvision's own (v1) Resize(int) + CenterCrop give for the image file, as uint8 3×H×W."""
    from torchvision import transforms

    steps = ([transforms.Resize(resize)] if resize else []) + ([transforms.CenterCrop(crop)] if crop else [])
    with Image.open(path) as im:
        out = transforms.Compose(steps)(im.convert("RGB"))
    return np.asarray(out).transpose(2, 0, 1)


@pytest.mark.parametrize("resize, crop", [(24, (24, 24)), (20, (16, 12)), (None, (20, 20))])
def test_resize_center_crop_equals_torchvision(photo_folder, resize, crop):
    from arq_deploy.core.config import Preprocess

    for split in ("train", "test"):
        ds = load_dataset(str(photo_folder), split, Preprocess(resize=resize, crop=crop))
        rels = sorted(r for r in PHOTOS if r.startswith(split + "/"))
        assert ds.images.shape == (len(rels), 3, *crop) and ds.images.dtype == np.uint8
        assert ds.classes == ("cat", "dog", "owl")
        assert ds.labels.tolist() == [("cat", "dog", "owl").index(r.split("/")[1]) for r in rels]
        for img, rel in zip(ds.images, rels):
            assert np.array_equal(img, torchvision_reference(photo_folder / rel, resize, crop)), rel
        assert ds.name.endswith(f"[{Preprocess(resize=resize, crop=crop).describe()}]")


def test_modes_become_rgb_as_pil_converts_them(photo_folder):
    from arq_deploy.core.config import Preprocess

    ds = load_dataset(str(photo_folder), "test", Preprocess(crop=(20, 20)))
    gray = ds.images[list(ds.labels).index(2) + 1]  # test/owl/i.bmp, grayscale: R = G = B
    assert np.array_equal(gray[0], gray[1]) and np.array_equal(gray[1], gray[2]) and gray.std() > 10
    with Image.open(photo_folder / "test/owl/h.png") as im:  # RGBA: the alpha channel is dropped, colours kept
        assert im.mode == "RGBA"
        rgb = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    top, left = (33 - 20) // 2, (33 - 20) // 2
    assert np.array_equal(ds.images[list(ds.labels).index(2)], rgb[:, top:top + 20, left:left + 20])


def test_tar_matches_folder_and_caches_per_preprocessing(photo_folder, tmp_path, cache_dir, monkeypatch):
    from arq_deploy.core import data
    from arq_deploy.core.config import Preprocess

    files = {f"photos/{rel}": (photo_folder / rel).read_bytes() for rel in PHOTOS}
    tar = write_tar(tmp_path / "photos.tar.gz", files)
    a, b = Preprocess(resize=20, crop=(16, 16)), Preprocess(resize=24, crop=(24, 24))
    for pre in (a, b):
        from_tar, from_dir = load_dataset(str(tar), "train", pre), load_dataset(str(photo_folder), "train", pre)
        assert np.array_equal(from_tar.images, from_dir.images)
        assert from_tar.labels.tolist() == from_dir.labels.tolist()
    assert len(list(cache_dir.glob("*.npz"))) == 2  # one cache file per preprocessing, never a reused array

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again: the cache was not used")

    monkeypatch.setattr(data, "_decode_all", no_decoding)
    assert load_dataset(str(tar), "train", a).images.shape[2:] == (16, 16)
    assert load_dataset(str(tar), "train", b).images.shape[2:] == (24, 24)


def test_model_size_is_the_default_for_image_files(photo_folder, tmp_path):
    from arq_deploy.core.config import Preprocess

    fitted = load_dataset(str(photo_folder), "test", model_size=(16, 16))
    explicit = load_dataset(str(photo_folder), "test", Preprocess(resize=16, crop=(16, 16)))
    assert fitted.images.shape[1:] == (3, 16, 16) and np.array_equal(fitted.images, explicit.images)
    assert fitted.name == explicit.name and "[resize 16, center-crop 16×16]" in fitted.name
    wide = load_dataset(str(photo_folder), "test", model_size=(12, 20))  # H×W: shorter side to max(H, W) = 20
    assert wide.images.shape[1:] == (3, 12, 20)
    assert np.array_equal(wide.images[0], torchvision_reference(photo_folder / "test/cat/f.png", 20, (12, 20)))
    given = load_dataset(str(photo_folder), "test", Preprocess(resize=30, crop=(24, 24)), model_size=(16, 16))
    assert given.images.shape[2:] == (24, 24)  # what the user gives wins; the stage then reports the mismatch
    same = write_images(tmp_path / "same", {"a/1.png": encoded(photo((16, 16))), "b/1.png": encoded(photo((16, 16)))})
    assert np.array_equal(load_dataset(str(same), model_size=(16, 16)).images[0],
                          np.asarray(photo((16, 16))).transpose(2, 0, 1))  # already the model's size: unchanged


def test_mixed_sizes_without_preprocessing_name_the_options(photo_folder):
    with pytest.raises(DataFormatError) as err:
        load_dataset(str(photo_folder), "test")
    msg = str(err.value)
    assert "\n" not in msg and "--center-crop" in msg and "--resize" in msg and "same size" in msg


def test_cifar_batches_take_preprocessing_only_when_given(tmp_path):
    from arq_deploy.core.config import Preprocess

    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    folder = write_cifar(tmp_path / "c", {"test_batch": (rows, [0, 1, 1])})
    assert load_dataset(str(folder), model_size=(16, 16)).images.shape == (3, 3, 32, 32)  # arrays as stored
    ds = load_dataset(str(folder), "test", Preprocess(resize=40, crop=(36, 36)))
    assert ds.images.shape == (3, 3, 36, 36)
    from torchvision import transforms

    image = Image.fromarray(rows[1].reshape(3, 32, 32).transpose(1, 2, 0))
    want = transforms.CenterCrop(36)(transforms.Resize(40)(image))
    assert np.array_equal(ds.images[1], np.asarray(want).transpose(2, 0, 1))


@pytest.mark.parametrize("case", ["crop_larger_than_image", "crop_larger_than_resize", "bad_crop", "sixteen_bit",
                                  "unreadable", "digits"])
def test_preprocessing_mistakes_are_one_line(photo_folder, case):
    from arq_deploy.core.config import ConfigError, Preprocess

    spec, pre, want = str(photo_folder), None, DataFormatError
    if case == "crop_larger_than_image":
        pre, match = Preprocess(crop=(30, 30)), r"test/cat/f\.png: image is 28×40, smaller than --center-crop 30×30"
    elif case == "crop_larger_than_resize":
        want, match = ConfigError, r"--center-crop 32×32 is larger than --resize 24"
    elif case == "bad_crop":
        want, match = ConfigError, r"--center-crop must be N or H,W"
    elif case == "sixteen_bit":
        Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(photo_folder / "test/dog/deep.png")
        pre, match = Preprocess(resize=20, crop=(20, 20)), r"deep\.png: a I;16\w* image \(16-bit"
    elif case == "unreadable":
        (photo_folder / "test/dog/broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        pre, match = Preprocess(resize=20, crop=(20, 20)), r"broken\.jpg: cannot decode image"
    else:
        spec, pre, match = "digits", Preprocess(resize=16), r"'digits' are fixed 8×8 arrays"
    with pytest.raises(want) as err:
        if case == "crop_larger_than_resize":
            Preprocess(resize=24, crop=(32, 32))
        elif case == "bad_crop":
            Preprocess(crop=(0, 5))
        load_dataset(spec, "test", pre)
    msg = str(err.value)
    assert "\n" not in msg and re.search(match, msg), msg
