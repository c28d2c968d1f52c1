"""Real image data from the command line: an ImageNet-style folder of images of different sizes and modes (and a
.tar.gz of it) goes through `--resize` / `--center-crop` in export (calibration, validation) and certify, the
preprocessing is recorded in the configs and the dataset's name, and mistakes are one line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_data import PHOTOS, encoded, photo, write_images, write_tar

TINY = '''
import torch.nn as nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(nn.functional.adaptive_avg_pool2d(nn.functional.relu(self.conv(x)), 1).flatten(1))


def tiny():
    return Tiny()
'''
EXE = Path(sys.executable).with_name("arq-deploy")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(work dir, photo folder, its .tar.gz, environment): a tiny 3-class user model (3×16×16) and its state dict."""
    import torch

    work = tmp_path_factory.mktemp("imgcli")
    (work / "tinynet.py").write_text(TINY)
    sys.path.insert(0, str(work))
    try:
        import tinynet
    finally:
        sys.path.remove(str(work))
    torch.manual_seed(0)
    torch.save(tinynet.tiny().state_dict(), work / "sd.pt")
    files = {rel: encoded(photo(size, mode, seed=i), "JPEG" if rel.endswith(".jpg") else
                          "BMP" if rel.endswith(".bmp") else "PNG") for i, (rel, (size, mode)) in enumerate(PHOTOS.items())}
    folder = write_images(work / "photos", files)
    tar = write_tar(work / "photos.tar.gz", {f"photos/{k}": v for k, v in files.items()})
    env = {**os.environ, "PYTHONPATH": str(work), "ARQ_CACHE_DIR": str(work / "cache")}
    return work, folder, tar, env


def run(env, *args):
    """The installed `arq-deploy` in a subprocess: (exit code, stdout, stderr)."""
    p = subprocess.run([str(EXE), *map(str, args)], check=False, capture_output=True, text=True, env=env, timeout=300)
    return p.returncode, p.stdout, p.stderr


MODEL = ["--model", "tinynet:tiny", "--input-shape", "3,16,16"]
CERTIFY = ["--sigma", "0.25", "--n0", "10", "--n", "40", "--max", "2", "--batch-size", "40"]


def test_export_and_certify_an_image_folder_with_resize_and_center_crop(setup):
    work, folder, _, env = setup
    out = work / "out"
    rc, stdout, err = run(env, "export", *MODEL, "--weights", work / "sd.pt", "--bits", "8", "--data", folder,
                          "--resize", "20", "--center-crop", "16", "--calib-images", "4", "--validate-images", "4",
                          "--min-agreement", "0", "--out", out / "m.onnx")
    assert rc == 0, stdout + err
    assert "W8A8" in stdout and "on 4 images" in stdout
    cfg = json.loads((out / "m.config.json").read_text())["config"]
    assert cfg["preprocess"] == {"resize": 20, "crop": [16, 16]} and cfg["data"] == str(folder)

    rc, stdout, err = run(env, "certify", out / "m.onnx", "--data", folder, "--resize", "20", "--center-crop", "16",
                          *CERTIFY, "--out", out / "c.tsv")
    assert rc == 0, stdout + err
    assert stdout.startswith("2 images: ACR")
    summary = json.loads((out / "c.summary.json").read_text())
    assert summary["meta"]["data"] == f"imagefolder:{folder} [resize 20, center-crop 16×16]", summary["meta"]
    assert json.loads((out / "c.config.json").read_text())["config"]["preprocess"] == {"resize": 20, "crop": [16, 16]}


def invoke(*args):
    """The CLI in this process (fast): (exit code, stdout, stderr)."""
    from click.testing import CliRunner

    from arq_deploy.app.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture(scope="module")
def onnx_model(setup):
    """The tiny model exported without preprocessing options from the .tar.gz: its images are fitted to 16×16."""
    work, _, tar, env = setup
    out = work / "default"
    rc, stdout, err = run(env, "export", *MODEL, "--weights", work / "sd.pt", "--bits", "8", "--data", tar,
                          "--calib-images", "4", "--validate-images", "4", "--min-agreement", "0",
                          "--out", out / "m.onnx")
    assert rc == 0, stdout + err
    assert json.loads((out / "m.config.json").read_text())["config"]["preprocess"] == {"resize": None, "crop": None}
    return out / "m.onnx"


def test_image_files_default_to_the_models_size(setup, onnx_model, tmp_path, monkeypatch):
    _, _, tar, env = setup
    monkeypatch.setenv("ARQ_CACHE_DIR", env["ARQ_CACHE_DIR"])
    rc, stdout, err = invoke("certify", onnx_model, "--data", tar, *CERTIFY, "--out", tmp_path / "c.tsv")
    assert rc == 0, stdout + err
    meta = json.loads((tmp_path / "c.summary.json").read_text())["meta"]
    assert meta["data"].endswith("[resize 16, center-crop 16×16]"), meta


@pytest.mark.parametrize("case", ["crop_vs_model", "crop_vs_resize", "crop_vs_image", "bad_crop_text", "unreadable"])
def test_preprocessing_mistakes_exit_2_with_one_line_and_write_nothing(setup, onnx_model, tmp_path, monkeypatch, case):
    _, folder, _, env = setup
    monkeypatch.setenv("ARQ_CACHE_DIR", env["ARQ_CACHE_DIR"])
    data, opts = folder, []
    if case == "crop_vs_model":
        opts, want = ["--center-crop", "12"], "data images are (3, 12, 12), the model expects (3, 16, 16)"
    elif case == "crop_vs_resize":
        opts, want = ["--resize", "10", "--center-crop", "16"], "--center-crop 16×16 is larger than --resize 10"
    elif case == "crop_vs_image":
        opts, want = ["--center-crop", "40"], "smaller than --center-crop 40×40"
    elif case == "bad_crop_text":
        opts, want = ["--center-crop", "16,x"], "--center-crop must be N or H,W"
    else:
        data = write_images(tmp_path / "broken", {"a/1.png": (folder / "test/cat/f.png").read_bytes(),
                                                  "b/2.png": b"\x89PNG truncated"})
        want = "2.png: cannot decode image"
    out = tmp_path / "out"
    rc, stdout, err = invoke("certify", onnx_model, "--data", data, *opts, *CERTIFY, "--out", out / "c.tsv")
    assert rc == 2, stdout + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], err
    assert "Traceback" not in err + stdout
    assert not out.exists() or not list(out.iterdir())
