"""neuslice.zoo: torchvision-layout ImageNet builders, and profile -> slice -> masked ->
restructure on them (small inputs, few classes, random weights)."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import neuslice
from neuslice.experiments import zoo

from conftest import _randomize_bn as randomize_bn
from conftest import assert_same_snapshot, make_loader, max_rel_err, snapshot

# torchvision's parameter counts at 1000 classes, and its number of state-dict entries.
PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "vgg16": 138_357_544,
          "vgg19": 143_667_240, "mobilenet_v3_small": 2_542_856}
STATE_ENTRIES = {"resnet18": 122, "resnet50": 320, "vgg16": 32, "vgg19": 38,
                 "mobilenet_v3_small": 244}
# Entries of torchvision's state dicts (name -> shape), at 1000 classes.
SPOT = {
    "resnet18": {"conv1.weight": (64, 3, 7, 7), "layer1.0.conv1.weight": (64, 64, 3, 3),
                 "layer2.0.downsample.0.weight": (128, 64, 1, 1),
                 "layer2.0.downsample.1.running_var": (128,), "layer4.1.bn2.bias": (512,),
                 "fc.weight": (1000, 512)},
    "resnet50": {"layer1.0.conv3.weight": (256, 64, 1, 1),
                 "layer1.0.downsample.0.weight": (256, 64, 1, 1),
                 "layer3.5.conv2.weight": (256, 256, 3, 3), "layer4.2.bn3.weight": (2048,),
                 "fc.weight": (1000, 2048)},
    "vgg16": {"features.0.weight": (64, 3, 3, 3), "features.28.weight": (512, 512, 3, 3),
              "classifier.0.weight": (4096, 25088), "classifier.3.weight": (4096, 4096),
              "classifier.6.bias": (1000,)},
    "vgg19": {"features.34.weight": (512, 512, 3, 3), "classifier.0.weight": (4096, 25088),
              "classifier.6.weight": (1000, 4096)},
    "mobilenet_v3_small": {
        "features.0.0.weight": (16, 3, 3, 3), "features.0.1.running_mean": (16,),
        "features.1.block.0.0.weight": (16, 1, 3, 3),
        "features.1.block.1.fc1.weight": (8, 16, 1, 1), "features.1.block.1.fc2.bias": (16,),
        "features.1.block.2.0.weight": (16, 16, 1, 1), "features.2.block.1.0.weight": (72, 1, 3, 3),
        "features.4.block.2.fc1.weight": (24, 96, 1, 1),
        "features.7.block.2.fc1.weight": (32, 120, 1, 1),
        "features.8.block.2.fc1.weight": (40, 144, 1, 1),
        "features.11.block.3.0.weight": (96, 576, 1, 1), "features.12.0.weight": (576, 96, 1, 1),
        "classifier.0.weight": (1024, 576), "classifier.3.weight": (1000, 1024)},
}


def _on_meta(name: str, **kw) -> nn.Module:
    with torch.device("meta"):  # layout only: no memory, no initialisation cost
        return zoo.build(name, source="neuslice", **kw)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    return randomize_bn(model, seed).eval()


def _import_torchvision():
    try:
        return pytest.importorskip("torchvision")
    except (RuntimeError, OSError) as exc:  # installed, but built for another torch
        pytest.skip(f"torchvision cannot be imported: {exc}")


# ------------------------------------------------------------------------------ layout facts
@pytest.mark.parametrize("name", zoo.NAMES)
def test_parameter_counts_and_names_are_torchvisions(name):
    model = _on_meta(name)
    assert _n_params(model) == PARAMS[name]
    state = model.state_dict()
    assert len(state) == STATE_ENTRIES[name]
    for key, shape in SPOT[name].items():
        assert tuple(state[key].shape) == shape, key


@pytest.mark.parametrize("name", zoo.NAMES)
def test_forward_shapes_small_inputs(name):
    torch.manual_seed(0)
    model = zoo.build(name, num_classes=10, source="neuslice").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    if name.startswith("resnet") or name.startswith("mobilenet"):
        with torch.no_grad():
            assert model(torch.randn(1, 3, 64, 48)).shape == (1, 10)


def test_vgg_layout_and_small_config():
    model = _on_meta("vgg16")
    convs = [n for n, m in model.features.named_children() if isinstance(m, nn.Conv2d)]
    assert convs == ["0", "2", "5", "7", "10", "12", "14", "17", "19", "21", "24", "26", "28"]
    assert [type(m).__name__ for m in model.classifier] == [
        "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert model.avgpool.output_size == (7, 7)
    small = zoo.VGG([4, "M", 8], num_classes=3, hidden=6, pool_size=2)
    assert small.classifier[0].in_features == 8 * 2 * 2
    assert small(torch.randn(1, 3, 8, 8)).shape == (1, 3)


# ----------------------------------------------------------------------------------- build
def test_build_rejects_bad_arguments():
    with pytest.raises(ValueError, match="resnet18.*mobilenet_v3_small"):
        zoo.build("resnet34")
    with pytest.raises(ValueError, match="source"):
        zoo.build("resnet18", source="timm")
    with pytest.raises(ValueError, match="num_classes"):
        zoo.build("resnet18", num_classes=0)
    assert zoo.NAMES == ("resnet18", "resnet50", "vgg16", "vgg19", "mobilenet_v3_small")


def test_source_selection(monkeypatch):
    assert isinstance(zoo.build("resnet18", 4, source="neuslice"), zoo.ResNet)
    calls = []

    def fake_builder(weights=None, num_classes=1000):
        calls.append((weights, num_classes))
        return nn.Linear(2, num_classes)

    fake = types.SimpleNamespace(models=types.SimpleNamespace(resnet18=fake_builder))
    monkeypatch.setattr(zoo, "_torchvision", lambda: fake)
    assert isinstance(zoo.build("resnet18", 4), nn.Linear)  # auto prefers torchvision
    assert isinstance(zoo.build("resnet18", 4, source="torchvision"), nn.Linear)
    assert isinstance(zoo.build("resnet18", 4, source="neuslice"), zoo.ResNet)
    assert calls == [(None, 4), (None, 4)]

    def old_builder(pretrained=False, num_classes=1000):  # torchvision < 0.13
        return nn.Linear(2, num_classes)

    fake.models.resnet18 = old_builder
    assert zoo.build("resnet18", 5).out_features == 5

    monkeypatch.setattr(zoo, "_torchvision", lambda: None)
    assert isinstance(zoo.build("mobilenet_v3_small", 4), zoo.MobileNetV3)
    with pytest.raises(ImportError, match="source='neuslice'"):
        zoo.build("resnet18", source="torchvision")


def test_weights_file_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = _randomize_bn(zoo.build("mobilenet_v3_small", 3, source="neuslice"), 1)
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    x = torch.randn(2, 3, 32, 32)
    loaded = zoo.build("mobilenet_v3_small", 3, weights=path, source="neuslice").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # a checkpoint wrapper and a DataParallel prefix are unwrapped
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    again = zoo.build("mobilenet_v3_small", 3, weights=str(path), source="neuslice").eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_weights_that_do_not_fit_are_named(tmp_path):
    state = zoo.build("resnet18", 3, source="neuslice").state_dict()
    state.pop("layer1.0.bn1.running_mean")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys: layer1\.0\.bn1\.running_mean.*"
                                         r"unexpected keys: extra\.weight"):
        zoo.build("resnet18", 3, weights=state, source="neuslice")
    path = tmp_path / "w.pth"
    torch.save(zoo.build("resnet18", 3, source="neuslice").state_dict(), path)
    with pytest.raises(ValueError, match=r"fc\.weight \(3, 512\) vs \(10, 512\).*num_classes"):
        zoo.build("resnet18", 10, weights=path, source="neuslice")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read a state dict"):
        zoo.build("resnet18", 3, weights=tmp_path / "junk.pth", source="neuslice")


# ------------------------------------------------------------------------- the pipeline
C = 3


def _small_vgg() -> nn.Module:
    return zoo.VGG([16, 16, "M", 32, "M", 32, "M"], num_classes=C, hidden=48, pool_size=2)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = _small_vgg() if name == "vgg_small" else zoo.build(name, C, source="neuslice")
    return _randomize_bn(model, 1)


def _data(n: int = 18):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % C


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
    for name, mask in eff.masks.items():  # the effective slice only keeps more neurons
        assert bool((mask | ~sl.masks[name]).all()), name
    return small, eff


@pytest.mark.parametrize("name,metric", [("resnet18", "taylor"),
                                         ("mobilenet_v3_small", "deeplift"),
                                         ("vgg_small", "avg")])
def test_profile_slice_mask_restructure(name, metric):
    model = _model(name)
    x, y = _data()
    before = snapshot(model)
    prof = neuslice.profile(model, make_loader(x, y, 6), C, metrics=("avg", "taylor", "deeplift"),
                            cka_batch=6, progress=False)
    assert_same_snapshot(before, snapshot(model))
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert prof.layers == convs[:-1]  # every conv/linear but the head, in execution order
    for layer in prof.layers:
        for m in ("avg", "taylor", "deeplift"):
            assert torch.isfinite(prof.scores(layer, m)).all(), (layer, m)
    sl = neuslice.semantic_slice(prof, metric, 0.9)
    assert 0 < sl.compression_rate(model) < 1
    with torch.no_grad():
        ref = model(x)
        with neuslice.masked(model, sl):
            out = model(x)
        assert not torch.allclose(out, ref) and torch.equal(model(x), ref)
    _check_restructure(model, sl, x)


def test_resnet50_profile_slice_restructure():
    model = _model("resnet50")
    x, y = _data(8)
    prof = neuslice.profile(model, make_loader(x, y, 4), C, metrics=("avg", "deeplift"),
                            hsic_route="minibatch", cka_batch=4, progress=False)
    assert len(prof.layers) == 53
    _check_restructure(model, neuslice.semantic_slice(prof, "deeplift", 0.9), x[:4])


# --------------------------------------------------- squeeze-excitation gates (MobileNetV3)
SE = "features.4.block.2"  # expand features.4.block.0.0, depthwise .1.0, SE .2, project .3.0


def test_se_gate_is_read_after_hardsigmoid():
    layers = {l.name: l for l in neuslice.find_layers(zoo.mobilenet_v3_small(C))}
    assert layers[f"{SE}.fc1"].hook_name == f"{SE}.activation"
    assert layers[f"{SE}.fc1"].consumers == [(f"{SE}.fc2", 1)]
    # the gate multiplies the depthwise channels: coupled to them, read after the gate
    fc2 = layers[f"{SE}.fc2"]
    assert fc2.hook_name == f"{SE}.scale_activation" and fc2.post_ops == [] and fc2.coupled


def _full_slice(model, off: dict[str, list[int]]) -> neuslice.Slice:
    masks = {l.name: torch.ones(l.num_neurons, dtype=torch.bool)
             for l in neuslice.find_layers(model)}
    for name, idx in off.items():
        masks[name][idx] = False
    return neuslice.Slice(masks=masks, strategy="global", metric="avg",
                          fingerprint=neuslice.model_fingerprint(model), input_shape=[3, 32, 32])


def test_masked_se_gate_removes_its_channel_and_restructure_agrees():
    model = _model("mobilenet_v3_small")
    x, _ = _data(4)
    se = dict(model.named_modules())[SE]
    got = {}
    handle = se.register_forward_hook(
        lambda _m, _i, out: got.__setitem__("se", out.detach().clone()))
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
        model, _full_slice(model, {f"{SE}.fc2": [5], f"{SE}.fc1": [0]}), x)
    assert bool(eff.masks[f"{SE}.fc2"].all())
    assert dict(small.named_modules())[f"{SE}.fc2"].out_channels == 96
    # removed from every coupled layer, the channel goes everywhere, SE included
    group = ["features.4.block.0.0", "features.4.block.1.0", f"{SE}.fc2"]
    small, eff = _check_restructure(model, _full_slice(model, {n: [5, 7] for n in group}), x)
    mods = dict(small.named_modules())
    assert mods[f"{SE}.fc2"].out_channels == mods[f"{SE}.fc1"].in_channels == 94
    assert mods["features.4.block.1.0"].groups == mods["features.4.block.3.0"].in_channels == 94


# --------------------------------------------------------------- against real torchvision
@pytest.mark.parametrize("name", zoo.NAMES)
def test_same_state_dict_layout_as_torchvision(name):
    tv = _import_torchvision()
    with torch.device("meta"):
        theirs = zoo.build(name, source="torchvision").state_dict()
    ours = _on_meta(name).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == \
        {k: tuple(v.shape) for k, v in theirs.items()}
    assert tv is not None


@pytest.mark.parametrize("name", zoo.NAMES)
def test_torchvision_weights_give_the_same_outputs(name, tmp_path):
    _import_torchvision()
    torch.manual_seed(0)
    theirs = _randomize_bn(zoo.build(name, 10, source="torchvision"), 3)
    path = tmp_path / f"{name}.pth"
    torch.save(theirs.state_dict(), path)
    ours = zoo.build(name, 10, weights=path, source="neuslice").eval()
    assert type(ours).__module__ == zoo.__name__
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["vgg16", "vgg19"])
def test_full_size_vgg_profile_slice_restructure(name):
    """The full-size VGGs (134M/140M parameters at 3 classes) end to end at 32x32."""
    torch.manual_seed(0)
    model = zoo.build(name, 3, source="neuslice").eval()
    before = snapshot(model)
    x, y = torch.randn(24, 3, 32, 32), torch.arange(3).repeat(8)
    prof = neuslice.profile(model, [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)], 3,
                            metrics=("avg", "taylor"), hsic_route="minibatch", cka_batch=4,
                            progress=False)
    assert_same_snapshot(before, snapshot(model))
    _check_restructure(model, neuslice.semantic_slice(prof, "taylor", 0.95), x)
