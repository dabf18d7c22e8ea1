"""neuslice.experiments.zoo: torchvision's builders (and the CIFAR-sized variants), local
weights only, and profile -> slice -> masked -> restructure on torchvision's own ResNet-18/50,
MobileNetV3-Small and VGG-16 (small inputs, few classes, random weights)."""

from __future__ import annotations

import sys

import pytest
import torch
import torchvision
from torch import nn

import neuslice
from neuslice.experiments import zoo
from neuslice.experiments.models import build_model

from conftest import _randomize_bn as randomize_bn
from conftest import assert_same_snapshot, make_loader, max_rel_err, snapshot

# torchvision's parameter counts at 1000 classes.
PARAMS = {
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "vgg16": 138_357_544,
    "vgg19": 143_667_240,
    "mobilenet_v3_small": 2_542_856,
}
# The CIFAR variants at 10 classes (ResNet-18 with a 3x3 stem; VGG-16-BN with a 512-512 head).
CIFAR_PARAMS = {"cifar_resnet18": 11_173_962, "cifar_vgg16": 14_990_922}
TV_CLASS = {
    "resnet18": torchvision.models.ResNet,
    "resnet50": torchvision.models.ResNet,
    "vgg16": torchvision.models.VGG,
    "vgg19": torchvision.models.VGG,
    "mobilenet_v3_small": torchvision.models.MobileNetV3,
}


def _on_meta(name: str, num_classes: int = 1000) -> nn.Module:
    with torch.device("meta"):  # layout only: no memory, no initialisation cost
        return zoo.build(name, num_classes)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    return randomize_bn(model, seed).eval()


# ------------------------------------------------------------------------------------ build
@pytest.mark.parametrize("name", zoo.NAMES)
def test_build_is_torchvisions_builder(name):
    model = _on_meta(name)
    assert type(model) is TV_CLASS[name]
    assert _n_params(model) == PARAMS[name]
    with torch.device("meta"):
        ref = torchvision.models.get_model(name, weights=None, num_classes=7)
    assert {k: tuple(v.shape) for k, v in _on_meta(name, 7).state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()
    }


@pytest.mark.parametrize("name", zoo.CIFAR_NAMES)
def test_cifar_variants(name):
    torch.manual_seed(0)
    model = zoo.build(name, 10).eval()
    assert _n_params(model) == CIFAR_PARAMS[name]
    seen = {}
    last = model.layer4 if name == "cifar_resnet18" else model.features
    last.register_forward_hook(lambda _m, _i, out: seen.__setitem__("last", out.shape))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    if name == "cifar_resnet18":
        assert isinstance(model, torchvision.models.ResNet)
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
        assert isinstance(model.maxpool, nn.Identity)
        assert seen["last"] == (2, 512, 4, 4)  # the ImageNet stem would leave 1x1
    else:
        assert isinstance(model, torchvision.models.VGG)
        assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == 13
        assert [type(m) for m in model.classifier] == [nn.Linear, nn.ReLU, nn.Linear]
        assert seen["last"] == (2, 512, 1, 1)


def test_one_vgg16_for_the_registry_and_the_zoo():
    a, b = build_model("vgg16", in_channels=1, num_classes=7), zoo.cifar_vgg16(1, 7)
    assert type(a) is type(b) is torchvision.models.VGG
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }
    assert a.features[0].in_channels == 1
    assert a.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_build_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown model 'resnet1800'.*resnet18.*cifar_vgg16"):
        zoo.build("resnet1800")
    with pytest.raises(ValueError, match="num_classes"):
        zoo.build("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="num_classes"):
        zoo.build("cifar_resnet18", num_classes=True)
    with pytest.raises(TypeError, match="name must be a string"):
        zoo.build(18)
    with pytest.raises(ValueError, match="in_channels"):
        zoo.cifar_vgg16(in_channels=0)


def test_without_torchvision_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    for call in (lambda: zoo.build("resnet18"), lambda: zoo.cifar_resnet18()):
        with pytest.raises(ImportError, match=r"neuslice\[zoo\]"):
            call()


def test_nothing_is_downloaded(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with torch.device("meta"):
        for name in zoo.NAMES + zoo.CIFAR_NAMES:
            zoo.build(name, 3)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        zoo.build("resnet18", weights="IMAGENET1K_V1")  # a torchvision enum name, not a file


# ---------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "cifar_resnet18"])
def test_weights_file_roundtrip(name, tmp_path):
    torch.manual_seed(0)
    model = _randomize_bn(zoo.build(name, 3), 1)
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)  # a different random initialisation underneath
    loaded = zoo.build(name, 3, weights=path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # a checkpoint wrapper and a DataParallel prefix are unwrapped
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    again = zoo.build(name, 3, weights=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_weights_that_do_not_fit_are_named(tmp_path):
    state = zoo.build("resnet18", 3).state_dict()
    state.pop("layer1.0.bn1.running_mean")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(
        ValueError,
        match=r"missing keys: layer1\.0\.bn1\.running_mean.*"
        r"unexpected keys: extra\.weight",
    ):
        zoo.build("resnet18", 3, weights=state)
    path = tmp_path / "w.pth"
    torch.save(zoo.build("resnet18", 3).state_dict(), path)
    with pytest.raises(ValueError, match=r"fc\.weight \(3, 512\) vs \(10, 512\).*num_classes"):
        zoo.build("resnet18", 10, weights=path)
    with pytest.raises(ValueError, match=r"conv1\.weight \(64, 3, 7, 7\) vs \(64, 3, 3, 3\)"):
        zoo.build("cifar_resnet18", 3, weights=path)  # ImageNet stem into the CIFAR one
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read a state dict"):
        zoo.build("resnet18", 3, weights=tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        zoo.build("resnet18", 3, weights=tmp_path / "missing.pth")


# ------------------------------------------------------------------------- the pipeline
C = 3


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(zoo.build(name, C), 1)


def _data(n: int = 12, size: int = 32):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 3, size, size, generator=g), torch.arange(n) % C


def _check_restructure(model, sl, x):
    before = snapshot(model)
    small, eff = neuslice.restructure(model, sl, x[:2], return_slice=True)
    assert_same_snapshot(before, snapshot(model))  # the user's model is unchanged
    with torch.no_grad():
        with neuslice.masked(model, eff):
            want = model(x)
        got = small(x)
    assert max_rel_err(got, want) < 1e-4
    assert _n_params(small) < _n_params(model)
    assert type(small) is type(model)  # still torchvision's class, slimmer
    for name, mask in eff.masks.items():  # the effective slice only keeps more neurons
        assert bool((mask | ~sl.masks[name]).all()), name
    return small, eff


@pytest.mark.parametrize(
    "name,metric",
    [("resnet18", "taylor"), ("mobilenet_v3_small", "deeplift"), ("cifar_vgg16", "avg")],
)
@pytest.mark.slow
def test_profile_slice_mask_restructure(name, metric):
    model = _model(name)
    x, y = _data()
    before = snapshot(model)
    prof = neuslice.profile(
        model,
        make_loader(x, y, 6),
        C,
        metrics=("avg", "taylor", "deeplift"),
        cka_batch=6,
        progress=False,
    )
    assert_same_snapshot(before, snapshot(model))
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert prof.layers == convs[:-1]  # every conv/linear but the head, in execution order
    for layer in prof.layers:
        for m in ("avg", "taylor", "deeplift"):
            assert torch.isfinite(prof.scores(layer, m)).all(), (layer, m)
    sl = neuslice.semantic_slice(prof, metric, 0.9, criterion="layer_cka")
    rate = sl.compression_rate(model)
    assert 0 < rate < 1, rate
    with torch.no_grad():
        ref = model(x)
        with neuslice.masked(model, sl):
            out = model(x)
        assert not torch.allclose(out, ref) and torch.equal(model(x), ref)
    _check_restructure(model, sl, x)


@pytest.mark.slow
def test_resnet50_profile_slice_restructure():
    model = _model("resnet50")
    x, y = _data(12)
    prof = neuslice.profile(
        model,
        make_loader(x, y, 6),
        C,
        metrics=("avg", "deeplift"),
        hsic_route="minibatch",
        cka_batch=4,
        progress=False,
    )
    assert len(prof.layers) == 53
    sl = neuslice.semantic_slice(prof, "deeplift", 0.9, criterion="layer_cka")
    assert 0 < sl.compression_rate(model) < 1
    _check_restructure(model, sl, x[:4])


@pytest.mark.slow
def test_full_size_vgg16_profile_slice_restructure():
    """torchvision's VGG-16 (134M parameters at 3 classes) end to end at 32x32."""
    model = _model("vgg16")
    x, y = _data(12)
    prof = neuslice.profile(
        model,
        make_loader(x, y, 6),
        C,
        metrics=("avg", "taylor"),
        hsic_route="minibatch",
        cka_batch=4,
        progress=False,
    )
    assert len(prof.layers) == 15  # 13 convs and two hidden Linear layers
    sl = neuslice.semantic_slice(prof, "taylor", 0.95, criterion="layer_cka")
    assert 0 < sl.compression_rate(model) < 1
    _check_restructure(model, sl, x[:4])


# --------------------------------------------------- squeeze-excitation gates (MobileNetV3)
SE = "features.4.block.2"  # expand features.4.block.0.0, depthwise .1.0, SE .2, project .3.0


def test_se_gate_is_read_after_hardsigmoid():
    model = zoo.build("mobilenet_v3_small", C)
    layers = {lay.name: lay for lay in neuslice.find_layers(model)}
    assert layers[f"{SE}.fc1"].hook_name == f"{SE}.activation"
    assert layers[f"{SE}.fc1"].consumers == [(f"{SE}.fc2", 1)]
    # the gate multiplies the depthwise channels: coupled to them, read after the gate
    fc2 = layers[f"{SE}.fc2"]
    assert fc2.hook_name == f"{SE}.scale_activation" and fc2.post_ops == [] and fc2.coupled


def _full_slice(model, off: dict[str, list[int]]) -> neuslice.Slice:
    masks = {
        lay.name: torch.ones(lay.num_neurons, dtype=torch.bool)
        for lay in neuslice.find_layers(model)
    }
    for name, idx in off.items():
        masks[name][idx] = False
    return neuslice.Slice(
        masks=masks,
        strategy="global",
        metric="avg",
        fingerprint=neuslice.model_fingerprint(model),
        input_shape=[3, 32, 32],
    )


@pytest.mark.slow
def test_masked_se_gate_removes_its_channel_and_restructure_agrees():
    model = _model("mobilenet_v3_small")
    x, _ = _data(4)
    se = dict(model.named_modules())[SE]
    got = {}
    handle = se.register_forward_hook(
        lambda _m, _i, out: got.__setitem__("se", out.detach().clone())
    )
    with torch.no_grad():
        model(x)
        ref = got["se"]
        with neuslice.masked(model, _full_slice(model, {f"{SE}.fc2": [5]})):
            model(x)
    handle.remove()
    # a masked gate (0, not hardsigmoid(0) = 0.5) zeroes exactly its channel
    assert bool((got["se"][:, 5] == 0).all()) and bool(ref[:, 5].abs().sum() > 0)
    keep = torch.ones(ref.shape[1], dtype=torch.bool)
    keep[5] = False
    assert torch.equal(got["se"][:, keep], ref[:, keep])

    # the gate alone cannot remove the channel: restructure keeps it (coupled to the convs)
    small, eff = _check_restructure(
        model, _full_slice(model, {f"{SE}.fc2": [5], f"{SE}.fc1": [0]}), x
    )
    assert bool(eff.masks[f"{SE}.fc2"].all())
    assert dict(small.named_modules())[f"{SE}.fc2"].out_channels == 96
    # removed from every coupled layer, the channel goes everywhere, SE included
    group = ["features.4.block.0.0", "features.4.block.1.0", f"{SE}.fc2"]
    small, eff = _check_restructure(model, _full_slice(model, {n: [5, 7] for n in group}), x)
    mods = dict(small.named_modules())
    assert mods[f"{SE}.fc2"].out_channels == mods[f"{SE}.fc1"].in_channels == 94
    assert mods["features.4.block.1.0"].groups == mods["features.4.block.3.0"].in_channels == 94
