"""A new user's own network and image folder through the whole CLI: train → export → compile → certify → predict →
report, with no traceback, and bad input refused in one line.

The network is the kind users bring (a module:factory with a state dict): a convolution subclass with "same"
padding, BatchNorm, ReLU6, Hardswish, a depthwise convolution, a squeeze-and-excitation block and a Linear head. The
data is an ImageNet-style folder ROOT/{train,test}/<class>/<image> of images of different sizes and modes (RGB,
grayscale, RGBA, palette), preprocessed by --resize/--center-crop in every stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

USER_MODULE = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


class SameConv(nn.Conv2d):
    def __init__(self, cin, cout, k, **kw):
        super().__init__(cin, cout, k, padding="same", **kw)


class SE(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class Net(nn.Module):
    def __init__(self, num_classes=4):
        super().__init__()
        self.stem, self.bn1 = SameConv(3, 16, 3, bias=False), nn.BatchNorm2d(16)
        self.dw, self.bn2 = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.pw, self.bn3 = nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.se = SE(32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu6(self.bn1(self.stem(x)))
        x = F.hardswish(self.bn2(self.dw(x)))
        x = self.se(F.relu(self.bn3(self.pw(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def net(num_classes=4):
    return Net(num_classes)
'''

CLASSES = ("red", "green", "blue", "gray")
SIZES = ((40, 48), (64, 36), (33, 33), (50, 70), (36, 36))
MODES = ("RGB", "L", "RGBA", "P", "RGB")


def _image(cls: int, i: int, rng):
    """A class-coloured image with texture, in one of several sizes and modes."""
    from PIL import Image

    w, h = SIZES[i % len(SIZES)]
    base = np.array([[200, 40, 40], [40, 190, 60], [50, 60, 210], [128, 128, 128]][cls], np.float32)
    img = base + rng.normal(0, 25, (h, w, 3))
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    mode = MODES[i % len(MODES)]
    if cls == 3 and mode != "RGB":
        mode = "L"  # a gray class stays gray in any mode
    return img.convert(mode) if mode != "RGB" else img


@pytest.fixture(scope="module")
def user_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    (root / "usernet.py").write_text(USER_MODULE)
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 6)):
        for c, name in enumerate(CLASSES):
            d = root / "images" / split / name
            d.mkdir(parents=True)
            for i in range(n):
                _image(c, i, rng).save(d / f"{i}.png")
    env = {**os.environ, "PYTHONPATH": str(root)}
    exe = Path(sys.executable).with_name("arq-deploy")

    def run(*args, timeout=900):
        p = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout,
                           check=False)
        assert "Traceback" not in p.stderr, p.stderr
        return p

    return root, run


PRE = ("--resize", "36", "--center-crop", "32")


def test_user_model_and_image_folder_through_every_stage(user_setup):
    root, run = user_setup
    data, run_dir = root / "images", root / "run"
    run_dir.mkdir()
    model = ("--model", "usernet:net", "--input-shape", "3,32,32")
    p = run("train", *model, "--data", data, *PRE, "--sigma", "0.12", "--epochs", "12", "--lr", "0.05",
            "--batch-size", "16", "--out", run_dir / "net.pt")
    assert p.returncode == 0, p.stderr
    p = run("export", *model, "--weights", run_dir / "net.pt", "--bits", "8", "--data", data, *PRE,
            "--calib-images", "64", "--validate-images", "24", "--min-agreement", "0.9",
            "--out", run_dir / "net.w8a8.onnx")
    assert p.returncode == 0, p.stderr
    exp = json.loads((run_dir / "net.w8a8.export.json").read_text())
    assert exp["validation"]["top1_agreement"] >= 0.9 and exp["float_layers"] == {}
    assert exp["validation"]["accuracy_reference"] >= 0.75, exp["validation"]  # it learned from the folder
    # the quantized layers: every Conv2d (the subclass and the SE's included) and the Linear head
    assert len(exp["layers"]) == 6, exp["layers"]

    p = run("compile", run_dir / "net.w8a8.onnx", "--target", "x86", "--integer", "--batch-size", "50",
            "--out", run_dir / "x86-w8a8")
    assert p.returncode == 0, p.stderr

    p = run("certify", run_dir / "x86-w8a8", "--data", data, *PRE, "--sigma", "0.12", "--n0", "32", "--n", "400",
            "--alpha", "0.01", "--max", "8", "--batch-size", "50", "--out", run_dir / "certify.tsv")
    assert p.returncode == 0, p.stderr
    rows = [r.split("\t") for r in (run_dir / "certify.tsv").read_text().splitlines() if not r.startswith("#")]
    assert rows[0][:4] == ["idx", "label", "predict", "radius"] and len(rows) == 1 + 8
    assert sum(r[4] == "1" for r in rows[1:]) >= 6  # the smoothed integer build classifies the folder's test images
    summary = json.loads((run_dir / "certify.summary.json").read_text())
    assert "ACR" in p.stdout and summary["summary"]["count"] == 8 and "[resize 36, center-crop" in summary["meta"]["data"]

    test_dir = data / "test"
    p = run("predict", run_dir / "x86-w8a8", test_dir / "red", test_dir / "gray" / "0.png", *PRE, "--sigma", "0.12",
            "--n", "200", "--alpha", "0.01", "--batch-size", "50", "--out", run_dir / "predict.jsonl")
    assert p.returncode == 0, p.stderr
    preds = [json.loads(line) for line in (run_dir / "predict.jsonl").read_text().splitlines()]
    assert len(preds) == 6 + 1
    answered = [r for r in preds if not r.get("abstain")]
    assert answered, preds
    # the export stored the folder's class names, so the answers are names
    assert sum(r["class"] == ("gray" if r["input"].endswith("gray/0.png") else "red") for r in answered) \
        >= 0.75 * len(answered), preds

    p = run("report", run_dir)
    assert p.returncode == 0, p.stderr
    html = (run_dir / "report.html").read_text()
    assert "usernet:net" in html or "net.w8a8" in html


def test_bad_user_input_is_one_line(user_setup, tmp_path):
    root, run = user_setup
    model = ("--model", "usernet:net", "--input-shape", "3,32,32")
    # a crop larger than the resized image
    p = run("train", *model, "--data", root / "images", "--resize", "24", "--center-crop", "32", "--epochs", "1",
            "--out", tmp_path / "x.pt")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "x.pt").exists()
    # an unreadable image in the folder
    bad = tmp_path / "bad" / "train" / "a"
    bad.mkdir(parents=True)
    (bad / "0.png").write_bytes(b"not a png")
    (tmp_path / "bad" / "test" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "test" / "a" / "0.png").write_bytes(b"not a png")
    p = run("train", *model, "--data", tmp_path / "bad", "--epochs", "1", "--out", tmp_path / "y.pt")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "0.png" in p.stderr, p.stderr
    assert not (tmp_path / "y.pt").exists()
