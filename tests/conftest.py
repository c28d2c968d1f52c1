import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ARQ_SHARED_DATA", ROOT.parent / "shared" / "data"))
CIFAR = SHARED / "cifar10" / "cifar-10-batches-py"
MODELS = SHARED / "models"
# the mixed 2/4/6/8-bit ResNet-20 acceptance policy, shared by the acceptance, integer-lowering and ARM tests
R20_MIXED_POLICY = {"format": "arq-deploy/policy", "version": 1, "default": [6, 6],
                    "layers": {"conv1": [8, 8], "layer1.0.conv1": [4, 4], "layer1.1.conv2": [2, 8],
                               "layer2.0.conv1": [4, 6], "layer2.2.conv2": [2, 6], "layer3.0.conv1": [4, 8],
                               "layer3.1.conv1": [6, 4], "linear": [8, 8]}}


def need_shared(path: Path):
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/data)")
    return path


@pytest.fixture(scope="session")
def cifar_dir():
    return need_shared(CIFAR)


@pytest.fixture(scope="session")
def models_dir():
    return need_shared(MODELS)


@pytest.fixture(scope="session")
def digits():
    from arq_deploy.core.data import load_dataset

    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="session")
def digits_model(digits, tmp_path_factory):
    """A digits CNN trained briefly with σ=0.25 noise, and its checkpoint path."""
    import torch

    from arq_deploy.export.pipeline import load, save_checkpoint, train

    train_ds, _ = digits
    torch.manual_seed(0)  # the random init: the same model whichever tests ran first
    lm = load("digits_cnn", None)
    model, hist = train(lm, train_ds, 0.25, epochs=6, lr=0.05, batch_size=64, progress=False)
    lm.model = model
    path = tmp_path_factory.mktemp("digits") / "digits_cnn.pt"
    save_checkpoint(path, model, lm, 0.25, 6, history=hist)
    return lm, path


@pytest.fixture(scope="session")
def cli():
    """Run the installed CLI in a subprocess: returns (returncode, stdout, stderr)."""
    import subprocess

    exe = Path(sys.executable).with_name("arq-deploy")

    def run(*args, cwd=None, timeout=600):
        p = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)
        return p.returncode, p.stdout, p.stderr

    return run


@pytest.fixture(scope="session")
def digits_ort(digits, digits_model, tmp_path_factory):
    """The digits model's W8A8 export on onnxruntime and every 6th test image: (runner, x, labels, indices)."""
    import numpy as np

    from arq_deploy.core.policy import QuantPolicy
    from arq_deploy.export.pipeline import export_and_validate
    from arq_deploy.runtime.runners import OrtRunner

    train_ds, test_ds = digits
    lm, _ = digits_model
    path = tmp_path_factory.mktemp("corr") / "w8a8.onnx"
    export_and_validate(lm, QuantPolicy.uniform(8), train_ds, test_ds, path, sigma=0.25, calib_images=128,
                        validate_images=200)
    idx = np.arange(0, len(test_ds), 6)
    return OrtRunner(path, batch_size=32), test_ds.x(idx), test_ds.labels[idx], idx
