"""The CIFAR-10 reproduction settings (``vgg16-cifar10``, ``resnet18-cifar10``): a clear, early
error without torchvision, without a data folder or without the files; and both settings end to
end on torchvision's models with a stand-in ``torchvision.datasets.CIFAR10`` that holds a few
random 32x32 images per class (1 seed, 1 epoch, the cheapest options the configs allow). The
real runs want the real files and a GPU (docs/REPRODUCTION.md)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torchvision
from torch.utils.data import Dataset

from neuslice.experiments import data as nsdata
from neuslice.experiments.cli import main

PER_CLASS = {True: 10, False: 4}  # train / test images per class


class _FakeCIFAR10(Dataset):
    """torchvision.datasets.CIFAR10 look-alike: fails like the real one without the files,
    else serves a few learnable random images (class-dependent colour) as tensors."""

    calls: list = []

    def __init__(self, root, train=True, download=False, transform=None):
        assert download is False  # neuslice never downloads
        if not os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
            raise RuntimeError(
                "Dataset not found or corrupted. You can use download=True to download it"
            )
        type(self).calls.append((root, train))
        g = torch.Generator().manual_seed(int(train))
        self.targets = torch.arange(10).repeat_interleave(PER_CLASS[train])
        colour = torch.linspace(-1, 1, 30).reshape(10, 3, 1, 1)
        self.data = (
            torch.randn(len(self.targets), 3, 32, 32, generator=g) * 0.5 + colour[self.targets]
        )

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.data[i], int(self.targets[i])


@pytest.fixture
def fake_cifar10(monkeypatch):
    """torchvision's own datasets module, with a CIFAR10 that holds a few random images."""
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeCIFAR10)
    nsdata._disk_tensors.cache_clear()
    _FakeCIFAR10.calls = []
    yield _FakeCIFAR10
    nsdata._disk_tensors.cache_clear()


@pytest.fixture
def cifar_root(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    return tmp_path


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _no_run(*a, **k):
    raise AssertionError("the run started although the data are missing")


# ------------------------------------------------------------------------ errors, early
@pytest.mark.parametrize(
    "rq, module", [("rq2", "reproduce"), ("rq3", "reproduce_rq3"), ("rq4", "reproduce_rq4")]
)
def test_no_data_root(rq, module, fake_cifar10, monkeypatch, capsys):
    import importlib

    monkeypatch.delenv("NEUSLICE_DATA", raising=False)
    monkeypatch.setattr(
        importlib.import_module(f"neuslice.experiments.{module}"), f"run_{rq}", _no_run
    )
    assert main(["reproduce", rq, "--setting", "vgg16-cifar10", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--data-root" in err and "NEUSLICE_DATA" in err and "cifar-10-batches-py" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_missing_files(fake_cifar10, tmp_path, monkeypatch, capsys):
    import neuslice.experiments.reproduce_rq4 as rq4

    monkeypatch.setattr(rq4, "run_rq4", _no_run)
    monkeypatch.setenv("NEUSLICE_DATA", str(tmp_path))  # exists, but holds no CIFAR-10
    assert main(["reproduce", "rq4", "--setting", "resnet18-cifar10"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "cifar-10-batches-py" in err and "never downloads" in err
    assert "Traceback" not in err
    missing = tmp_path / "nowhere"
    assert (
        main(["reproduce", "rq4", "--setting", "resnet18-cifar10", "--data-root", str(missing)])
        == 2
    )
    assert "nowhere" in capsys.readouterr().err


def test_without_torchvision(cifar_root, monkeypatch, capsys):
    import neuslice.experiments.reproduce as rq2

    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    monkeypatch.setattr(rq2, "run_rq2", _no_run)
    nsdata._disk_tensors.cache_clear()
    assert (
        main(["reproduce", "rq2", "--setting", "vgg16-cifar10", "--data-root", str(cifar_root)])
        == 2
    )
    err = capsys.readouterr().err
    assert "torchvision" in err and "not installed" in err and "Traceback" not in err


def test_bad_device(capsys):
    assert main(["reproduce", "rq2", "--setting", "mlp-digits", "--device", "tpu9"]) == 2
    assert "device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["reproduce", "rq4", "--setting", "mlp-digits", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_settings_tables():
    from neuslice.experiments.reproduce import SETTINGS, RQ2Config
    from neuslice.experiments.reproduce_rq3 import RQ3_EPS, RQ3_SETTINGS, RQ3Config
    from neuslice.experiments.reproduce_rq4 import RQ4_SETTINGS, RQ4Config

    for name in ("vgg16-cifar10", "resnet18-cifar10"):
        assert SETTINGS[name].data == RQ4_SETTINGS[name].data == RQ3_SETTINGS[name][1] == "cifar10"
        assert RQ3_EPS[name] == {"fgsm": 8 / 255, "pgd": 8 / 255}
        assert len(RQ3_SETTINGS[name][2]) == 3  # per-channel normalisation for the attacks
        assert RQ2Config(setting=name).epochs == SETTINGS[name].epochs
        assert RQ3Config(setting=name).epochs == SETTINGS[name].epochs
        assert RQ4Config(setting=name).epochs == RQ4_SETTINGS[name].epochs
    assert RQ2Config().epochs == RQ3Config().epochs == RQ4Config().epochs == 10  # MNIST as before
    with pytest.raises(ValueError, match="pruners"):
        RQ2Config(pruners=("magnitude",))


# --------------------------------------------------------------------- end to end, fake data
@pytest.mark.slow
def test_rq2_vgg16_cifar10(fake_cifar10, cifar_root, tmp_path, monkeypatch, one_thread):
    from neuslice.experiments.reproduce import RQ2Config, format_rq2, run_rq2

    monkeypatch.setenv("NEUSLICE_CACHE", str(tmp_path / "cache"))
    cfg = RQ2Config(
        setting="vgg16-cifar10",
        seeds=(0,),
        epochs=1,
        max_rounds=1,
        finetune_epochs=0,
        pruners=("uniform_plus",),
        device="cpu",
        data_root=str(cifar_root),
        hsic_route="minibatch",
    )
    rows = run_rq2(cfg, progress=False)
    assert set(rows) == {"Unif", "Global+Unif", "Category-wise+Unif", "NeuSemSlice+Unif"}
    for name, r in rows.items():
        assert len(r.cr) == 1 and 0 <= r.ni[0] <= 1 and 0 <= r.ma[0] <= 1
        if name != "Unif":
            assert r.cr[0] > 0  # restructuring removed VGG16 channels before pruning
    assert "NeuSemSlice+Unif" in format_rq2(rows, "vgg16-cifar10")
    (cached,) = (tmp_path / "cache").glob("vgg16-cifar10-seed0-ep1-*.pt")
    assert {train for _, train in fake_cifar10.calls} == {True, False}


@pytest.mark.slow
def test_rq4_resnet18_cifar10(fake_cifar10, cifar_root, tmp_path, monkeypatch, one_thread):
    from neuslice.experiments.reproduce_rq4 import RQ4_METHODS, RQ4Config, format_rq4, run_rq4

    monkeypatch.setenv("NEUSLICE_DATA", str(cifar_root))  # the root from the environment
    cfg = RQ4Config(
        setting="resnet18-cifar10",
        seeds=(0,),
        epochs=1,
        scenario="ab",
        device="cpu",
        hsic_route="minibatch",
    )
    rows = run_rq4(cfg, progress=False)
    assert {r["model"] for r in rows} == {"ResNet"}
    by = {(r["method"], r["task"]): r for r in rows}
    for m, _ in RQ4_METHODS:
        assert [r["task"] for r in rows if r["method"] == m] == [0, 1, "overall"], m
    for m in ("neusemslice", "global", "categorywise"):
        assert by[(m, 0)]["forgetting"] == 0  # task A frozen under its slice
    # replay buffers hold CIFAR images (3x32x32 float32 + an int64 label each)
    assert by[("replay10", "overall")]["memory_bytes"] == 5 * (3 * 32 * 32 * 4 + 8)
    text = format_rq4(rows, "resnet18-cifar10")
    assert "resnet18-cifar10" in text and "paper" not in text


@pytest.mark.slow
def test_rq3_resnet18_cifar10(fake_cifar10, cifar_root, tmp_path, monkeypatch, one_thread):
    from neuslice.experiments.reproduce_rq3 import METHODS, RQ3Config, format_rq3, run_rq3

    monkeypatch.setenv("NEUSLICE_CACHE", str(tmp_path / "cache"))
    cfg = RQ3Config(
        setting="resnet18-cifar10",
        seeds=(0,),
        epochs=1,
        readapt_epochs=1,
        attacks=("pgd",),
        n_adv_train=20,
        n_adv_test=20,
        pgd_steps=2,
        device="cpu",
        data_root=str(cifar_root),
        hsic_route="minibatch",
    )
    rows = run_rq3(cfg, progress=False)
    assert set(rows) == {(m, "pgd") for m in METHODS}
    for r in rows.values():
        assert 0 < r.tpr[0] <= 1 and 0 <= r.ra[0] <= 1 and 0 <= r.raa[0] <= 1
    assert rows[("NeuSemSlice", "pgd")].tpr[0] < 1
    assert "resnet18-cifar10" in format_rq3(rows, "resnet18-cifar10")


def test_cli_passes_data_root_and_device(fake_cifar10, cifar_root, tmp_path, monkeypatch, capsys):
    import neuslice.experiments.reproduce_rq3 as rq3

    seen = {}

    def fake_run(config):
        seen["config"] = config
        return {}

    monkeypatch.chdir(tmp_path)  # the results go to ./neuslice-reproduce/rq3-resnet18-cifar10/
    monkeypatch.setattr(rq3, "run_rq3", fake_run)
    monkeypatch.setattr(rq3, "format_rq3", lambda rows, setting: "table")
    monkeypatch.setattr(rq3, "plot_rq3", lambda rows, setting, path: path)
    assert (
        main(
            [
                "reproduce",
                "rq3",
                "--setting",
                "resnet18-cifar10",
                "--seeds",
                "0",
                "--data-root",
                str(cifar_root),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    cfg = seen["config"]
    assert cfg.data_root == str(cifar_root) and cfg.device == "cpu" and cfg.epochs == 30
    assert cfg.setting == "resnet18-cifar10"
    assert (
        tmp_path / "neuslice-reproduce" / "rq3-resnet18-cifar10" / "rq3_resnet18-cifar10.txt"
    ).read_text() == "table\n"
