"""Tests for neuslice.data, neuslice.models and neuslice.train."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from neuslice.experiments import data as nsdata
from neuslice.experiments import train as nstrain
from neuslice.experiments.data import (
    DATASETS,
    load_dataset,
    load_digits,
    load_mnist5k,
    load_torchvision,
    make_loader,
)
from neuslice.experiments.models import MLP, MODELS, SmallCNN, build_model
from neuslice.experiments.train import cached_model, evaluate, seed_everything, train_classifier


@pytest.fixture(scope="module")
def mnist():
    return load_mnist5k()


@pytest.fixture(scope="module")
def trained_mlp(mnist):
    train, _ = mnist
    seed_everything(0)
    model, losses = train_classifier(MLP(), train, epochs=3, seed=0, progress=False)
    return model, losses


# ----------------------------------------------------------------------------- data


def test_mnist5k_shapes_dtypes_and_stratification(mnist):
    train, test = mnist
    xtr, ytr = train.tensors
    xte, yte = test.tensors
    assert isinstance(train, TensorDataset) and isinstance(test, TensorDataset)
    assert xtr.shape == (4000, 1, 28, 28) and xte.shape == (1000, 1, 28, 28)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert int(ytr.min()) == 0 and int(ytr.max()) == 9
    assert torch.bincount(ytr).tolist() == [400] * 10
    assert torch.bincount(yte).tolist() == [100] * 10
    # normalised: background pixel is (0 - mean) / std, data roughly standardised
    assert xtr.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert xtr.max().item() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-5)
    assert abs(xtr.mean().item()) < 0.1 and abs(xtr.std().item() - 1) < 0.1


def test_mnist5k_split_is_seeded(mnist):
    train0, test0 = mnist
    train0b, _ = load_mnist5k(seed=0)
    train1, test1 = load_mnist5k(seed=1)
    assert torch.equal(train0.tensors[0], train0b.tensors[0])
    assert torch.equal(train0.tensors[1], train0b.tensors[1])
    assert not torch.equal(test0.tensors[0], test1.tensors[0])
    assert torch.bincount(test1.tensors[1]).tolist() == [100] * 10

    # both seeds partition the same 5,000 images
    def image_set(tr, te):
        return torch.unique(torch.cat([tr.tensors[0], te.tensors[0]]).flatten(1), dim=0)

    assert len(train1) + len(test1) == 5000
    assert torch.equal(image_set(train0, test0), image_set(train1, test1))


def test_digits_shapes():
    train, test = load_digits(test_fraction=0.25, seed=3)
    assert len(train) + len(test) == 1797
    assert train.tensors[0].shape[1:] == (1, 8, 8)
    assert train.tensors[0].dtype == torch.float32 and train.tensors[1].dtype == torch.int64
    assert set(test.tensors[1].tolist()) == set(range(10))
    assert len(test) == pytest.approx(0.25 * 1797, abs=10)
    again, _ = load_digits(test_fraction=0.25, seed=3)
    assert torch.equal(again.tensors[0], train.tensors[0])


@pytest.mark.parametrize("frac", [0, 1, -0.1, 1.5])
def test_bad_test_fraction(frac):
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=frac)


def test_digits_missing_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"neuslice\[data\]"):
        load_digits()


def test_make_loader(mnist):
    train, _ = mnist
    loader = make_loader(train, batch_size=100)
    assert isinstance(loader, DataLoader) and loader.num_workers == 0
    x, y = next(iter(loader))
    assert x.shape == (100, 1, 28, 28)
    first = [next(iter(make_loader(train, 64, shuffle=True, seed=s)))[1] for s in (5, 5, 6)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(train, batch_size=0)
    with pytest.raises(TypeError, match="Dataset"):
        make_loader([1, 2, 3])


def test_dataset_registry():
    assert set(DATASETS) == {"mnist5k", "digits"}
    train, _ = load_dataset("digits", seed=1)
    assert train.tensors[0].shape[1:] == (1, 8, 8)
    with pytest.raises(ValueError, match="mnist5k"):
        load_dataset("nope")


def test_load_torchvision_without_torchvision(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(ImportError, match="torchvision"):
        load_torchvision("mnist", tmp_path)


def test_load_torchvision_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="cifar10"):
        load_torchvision("svhn", tmp_path)


@pytest.fixture
def fake_torchvision(monkeypatch):
    """A stand-in torchvision whose datasets report missing files like the real one."""

    class _Missing:
        def __init__(self, root, *args, download=False, **kwargs):
            assert download is False
            raise RuntimeError("Dataset not found. You can use download=True to download it")

    tv = types.ModuleType("torchvision")
    datasets = types.ModuleType("torchvision.datasets")
    transforms = types.ModuleType("torchvision.transforms")
    for cls in ("MNIST", "FashionMNIST", "CIFAR10", "CIFAR100", "ImageNet"):
        setattr(datasets, cls, _Missing)
    for fn in ("Compose", "ToTensor", "Normalize", "Resize", "CenterCrop"):
        setattr(transforms, fn, lambda *a, **k: None)
    tv.datasets, tv.transforms = datasets, transforms
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    monkeypatch.setitem(sys.modules, "torchvision.transforms", transforms)


@pytest.mark.parametrize("name", ["mnist", "FashionMNIST", "cifar10", "cifar100", "imagenet"])
def test_load_torchvision_missing_files(fake_torchvision, tmp_path, name):
    with pytest.raises(FileNotFoundError, match="never downloads") as info:
        load_torchvision(name, tmp_path, train=False)
    assert str(tmp_path) in str(info.value)


def test_load_torchvision_missing_root(fake_torchvision, tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_torchvision("mnist", missing)


# --------------------------------------------------------------------------- models


def test_mlp_structure_and_shapes():
    model = MLP()
    names = [n for n, _ in model.named_children()]
    assert names == ["flatten", "fc1", "relu1", "fc2", "relu2", "head"]
    assert model.fc1.out_features == 512 and model.fc2.out_features == 256
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    small = MLP(in_features=64, hidden=(32,), num_classes=3)
    assert small(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert small.config == {"in_features": 64, "hidden": [32], "num_classes": 3}


def test_cnn_shapes():
    model = SmallCNN()
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert model.conv3.out_channels == 64 and model.head.out_features == 10
    model.eval()
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    assert SmallCNN(in_channels=3, num_classes=5, width=8)(torch.randn(2, 3, 32, 32)).shape == (
        2,
        5,
    )


def test_model_registry_and_bad_args():
    assert isinstance(build_model("mlp", hidden=(16,)), MLP)
    assert isinstance(build_model("cnn", width=4), SmallCNN)
    assert set(MODELS) == {"mlp", "cnn", "vgg16"}
    vgg = build_model("vgg16", num_classes=7)
    assert vgg(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in vgg.modules()) == 13
    with pytest.raises(ValueError, match="mlp"):
        build_model("resnet")
    with pytest.raises(ValueError, match="in_features"):
        MLP(in_features=0)
    with pytest.raises(TypeError, match="hidden"):
        MLP(hidden=512)
    with pytest.raises(ValueError, match="width"):
        SmallCNN(width=-1)


# ---------------------------------------------------------------------------- train


def test_mlp_reaches_accuracy(mnist, trained_mlp):
    _, test = mnist
    model, losses = trained_mlp
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert not model.training
    acc = evaluate(model, test)
    assert acc > 0.85
    assert evaluate(model, make_loader(test, batch_size=77)) == pytest.approx(acc)


def test_evaluate_restores_mode(mnist):
    _, test = mnist
    model = SmallCNN(width=4)
    model.train()
    acc = evaluate(model, test)
    assert 0.0 <= acc <= 1.0 and model.training
    model.eval()
    evaluate(model, test)
    assert not model.training


def test_training_is_deterministic():
    train, _ = load_digits()
    results = []
    for _ in range(2):
        seed_everything(7)
        model, losses = train_classifier(
            MLP(64, (32,)), train, epochs=2, batch_size=64, seed=7, progress=False
        )
        results.append((losses, model.head.weight.detach().clone()))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1])


def test_train_bad_args(mnist):
    train, _ = mnist
    with pytest.raises(TypeError, match="nn.Module"):
        train_classifier("model", train)
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(MLP(), train, epochs=-1)
    with pytest.raises(ValueError, match="lr"):
        train_classifier(MLP(), train, lr=0)


def test_cached_model_round_trip(tmp_path, monkeypatch):
    kw = dict(epochs=2, cache_dir=tmp_path, model_kwargs={"hidden": (32,)}, device="cpu")
    model, train, test = cached_model("mlp", "digits", seed=1, **kw)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1 and "mlp-digits-seed1-ep2" in files[0].name
    assert not list(tmp_path.glob("*.tmp"))
    assert model.config["in_features"] == 64 and not model.training
    acc = evaluate(model, test)
    mtime = files[0].stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("cached model was retrained")

    monkeypatch.setattr(nstrain, "train_classifier", no_training)
    again, _, test2 = cached_model("mlp", "digits", seed=1, **kw)
    assert files[0].stat().st_mtime_ns == mtime
    assert torch.equal(again.fc1.weight, model.fc1.weight)
    assert evaluate(again, test2) == pytest.approx(acc)
    monkeypatch.undo()

    # different seed or constructor args -> a different cache entry
    cached_model("mlp", "digits", seed=2, **kw)
    cached_model("mlp", "digits", seed=1, **{**kw, "model_kwargs": {"hidden": (16,)}})
    assert len(list(tmp_path.glob("*.pt"))) == 3


def test_cached_model_corrupt_file(tmp_path, caplog):
    kw = dict(epochs=3, cache_dir=tmp_path, model_kwargs={"hidden": (32,)}, device="cpu")
    cached_model("mlp", "digits", **kw)
    (path,) = tmp_path.glob("*.pt")
    path.write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="neuslice.experiments.train"):
        model, _, test = cached_model("mlp", "digits", **kw)
    assert "retraining" in caplog.text
    assert path.stat().st_size > 100
    assert evaluate(model, test) > 0.5


def test_cached_model_env_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUSLICE_CACHE", str(tmp_path / "env"))
    assert nstrain.default_cache_dir() == tmp_path / "env"
    with pytest.raises(ValueError, match="cnn"):
        cached_model("transformer", "digits")
    with pytest.raises(ValueError, match="digits"):
        cached_model("mlp", "imagenet-tiny", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="train_kwargs"):
        cached_model("mlp", "digits", cache_dir=tmp_path, train_kwargs={"seed": 3})


def test_cached_cnn_on_digits(tmp_path):
    model, _, test = cached_model(
        "cnn", "digits", epochs=1, cache_dir=tmp_path, model_kwargs={"width": 4}, device="cpu"
    )
    assert model.conv1.in_channels == 1 and not model.training
    assert 0.0 <= evaluate(model, test) <= 1.0


def test_data_module_has_no_torchvision_import():
    assert not hasattr(nsdata, "torchvision")
