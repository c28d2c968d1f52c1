import numpy as np
import pytest
import torch

from arq_deploy.core.errors import UnknownNameError, WeightsMismatchError
from arq_deploy.core.models import MODELS, build_model, load_model


@pytest.mark.shared_data
@pytest.mark.parametrize("name,file,min_acc", [("resnet20", "resnet20-12fca82f.th", 0.88),
                                               ("resnet32", "resnet32-d509ac18.th", 0.89),
                                               ("resnet56", "resnet56-4bfd9763.th", 0.89)])
def test_published_checkpoints_load_and_classify(models_dir, cifar_dir, name, file, min_acc):
    from arq_deploy.core.data import load_dataset

    model, meta = load_model(name, models_dir / file)
    ds = load_dataset(str(cifar_dir), "test")
    idx = np.arange(0, 1000, 4)
    with torch.no_grad():
        acc = (model(torch.from_numpy(ds.x(idx))).argmax(1).numpy() == ds.labels[idx]).mean()
    assert acc >= min_acc, acc


@pytest.mark.shared_data
def test_gauss_checkpoint_meta_and_noisy_accuracy(models_dir, cifar_dir):
    from arq_deploy.core.data import load_dataset

    model, meta = load_model("resnet20", models_dir / "resnet20-gauss0.25.pt")
    assert meta["sigma"] == 0.25
    ds = load_dataset(str(cifar_dir), "test")
    x = torch.from_numpy(ds.x(np.arange(200)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        noisy = (model(x + 0.25 * torch.randn(x.shape, generator=g)).argmax(1).numpy() == ds.labels[:200]).mean()
    assert noisy > 0.65  # 76.8% measured on the full 1,000


@pytest.mark.shared_data
def test_wrong_weights_for_architecture(models_dir):
    with pytest.raises(WeightsMismatchError, match="do not fit"):
        load_model("resnet32", models_dir / "resnet20-12fca82f.th")


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "w.pt"
    p.write_bytes(b"definitely not a zip or pickle")
    with pytest.raises(WeightsMismatchError):
        load_model("resnet20", p)
    with pytest.raises(WeightsMismatchError, match="does not exist"):
        load_model("resnet20", tmp_path / "missing.pt")


def test_unknown_model():
    with pytest.raises(UnknownNameError, match="resnet20"):
        build_model("resnet21")
    with pytest.raises(UnknownNameError):
        build_model("no_such_pkg.mod:factory")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zoo_forward_shapes(name):
    info = MODELS[name]
    m = build_model(name).eval()
    with torch.no_grad():
        out = m(torch.rand(2, *info.input_shape))
    assert out.shape == (2, 10)


def test_normalisation_is_first_op_and_not_in_state_dict():
    m = build_model("resnet20").eval()
    assert not any("normalize" in k for k in m.state_dict())
    x = torch.rand(1, 3, 32, 32)
    # the same net fed pre-normalised inputs through an identity Normalize gives the same logits
    m2 = build_model("resnet20", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).eval()
    m2.load_state_dict(m.state_dict())
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(m(x), m2((x - mean) / std), atol=1e-5)


def test_user_factory_and_torch_export_archive(tmp_path):
    m = build_model("torchvision.models:resnet18", num_classes=7)
    assert isinstance(m, torch.nn.Module) and m.fc.out_features == 7
    small = build_model("digits_cnn").eval()
    ep = torch.export.export(small, (torch.rand(2, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    loaded, _ = load_model("", tmp_path / "m.pt2")
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(x), small(x), atol=1e-6)
