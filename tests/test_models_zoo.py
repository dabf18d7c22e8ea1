"""Model kinds profile and masked must handle: in-place ReLU, one ReLU module reused, functional
activations, a residual block, untraceable models, torchvision's resnet18."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torchvision
from torch import nn

import neuslice
from neuslice.slicing import Slice

from conftest import (
    NUM_CLASSES,
    TinyResNet,
    _lift_bias,
    _randomize_bn,
    captum_deeplift,
    make_data,
    close,
    make_loader,
    make_twin_pair,
    max_rel_err,
    outputs_of,
    per_sample,
)

C = NUM_CLASSES
KINDS = [
    "inplace_mlp",
    "inplace_leaky_mlp",
    "inplace_cnn",
    "reused_mlp",
    "reused_cnn",
    "functional_cnn",
    "functional_nobn",
]


def _data_for(kind):
    return make_data(45, "vec" if kind.endswith("mlp") else "img")


def _profile(model, x, y, **kw):
    kw.setdefault("progress", False)
    return neuslice.profile(model, make_loader(x, y, 7), C, **kw)


def _close(a, b, tol=1e-6):
    return close(a, b, tol)


@pytest.mark.parametrize("route", ["feature", "minibatch"])
@pytest.mark.parametrize("kind", KINDS)
def test_variant_profiles_like_its_plain_twin(kind, route):
    var, twin, outs = make_twin_pair(kind)
    x, y = _data_for(kind)
    kw = dict(metrics=neuslice.ALL_METRICS, hsic_route=route, cka_batch=6)
    pv, pt = _profile(var, x, y, **kw), _profile(twin, x, y, **kw)
    assert pv.layers == pt.layers == list(outs)
    for layer in outs:
        for metric in ("avg", "var", "ens", "taylor", "deeplift", "taylor_act"):
            for c in (None, 0, 1, 2):
                a, b = pv.scores(layer, metric, c), pt.scores(layer, metric, c)
                assert b.abs().max() > 0, (layer, metric, c)
                assert _close(a, b), (kind, layer, metric, c, float((a - b).abs().max()))
        for c in range(C):
            assert _close(pv.hsic(layer, c), pt.hsic(layer, c)), (kind, layer, c)
    # and the twin's neuron outputs are what was profiled
    outputs = outputs_of(twin, list(outs.values()), x)
    for layer, mod in outs.items():
        assert _close(pv.scores(layer, "avg"), per_sample(outputs[mod]).mean(0), 1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_variant_masked_like_its_plain_twin(kind):
    var, twin, outs = make_twin_pair(kind)
    x, y = _data_for(kind)
    prof = _profile(var, x, y, metrics=("avg", "taylor"))
    var.eval()
    twin.eval()
    ref = var(x)
    for sl in (
        neuslice.global_slice(prof, "taylor", 0.4),
        neuslice.semantic_slice(prof, "avg", 0.8, criterion="layer_cka"),
    ):
        twin_sl = Slice(
            masks=sl.masks,
            strategy=sl.strategy,
            metric=sl.metric,
            fingerprint=neuslice.model_fingerprint(twin),
            input_shape=[],
        )
        with neuslice.masked(var, sl):
            got = var(x)
        with neuslice.masked(twin, twin_sl):
            want = twin(x)
        assert torch.allclose(got, want, rtol=0, atol=1e-12), kind
        assert not torch.allclose(got, ref)
        assert torch.equal(var(x), ref)
        assert sl.compression_rate(var) == pytest.approx(twin_sl.compression_rate(twin))


def test_reused_relu_call_indices():
    var, _, _ = make_twin_pair("reused_cnn")
    layers = neuslice.find_layers(var)
    assert [(l.name, l.hook_name, l.call_index) for l in layers] == [
        ("conv1", "act", 0),
        ("conv2", "act", 1),
        ("fc1", "act", 2),
    ]
    assert [l.consumers for l in layers] == [[("conv2", 9)], [("fc1", 9)], [("head", 1)]]


# ---------------------------------------------------------------------------- residual net
@pytest.fixture(scope="module")
def resnet_setup():
    torch.manual_seed(7)
    model = _lift_bias(_randomize_bn(TinyResNet(), 7), 0.05).double()
    x, y = make_data(45, "img")
    prof = _profile(model, x, y, metrics=neuslice.METRICS)
    return model, x, y, prof


RES_OUT = {"stem": "relu0", "conv1": "relu1", "conv2": "bn2"}


def test_residual_profile_values(resnet_setup):
    model, x, y, prof = resnet_setup
    assert prof.layers == list(RES_OUT)
    outputs = outputs_of(model, list(RES_OUT.values()), x)
    for layer, mod in RES_OUT.items():
        v = per_sample(outputs[mod])
        for c in range(C):
            assert max_rel_err(prof.scores(layer, "avg", c), v[y == c].mean(0)) < 1e-10
            assert max_rel_err(prof.scores(layer, "var", c), v[y == c].var(0)) < 1e-10
            assert torch.isfinite(prof.hsic(layer, c)).all()
        for m in neuslice.METRICS:
            assert torch.isfinite(prof.scores(layer, m)).all()


def test_residual_deeplift_matches_captum():
    torch.manual_seed(8)
    model = _lift_bias(_randomize_bn(TinyResNet(), 8), 0.05).float()
    x, y = make_data(30, "img", dtype=torch.float32)
    prof = _profile(model, x, y, metrics=("deeplift",), hsic=False)
    ref = captum_deeplift(model, {"conv1": "relu1", "conv2": "bn2", "stem": "relu0"}, x, y, C)
    for layer, r in ref.items():
        for c in range(C):
            assert max_rel_err(prof.scores(layer, "deeplift", c), r[c]) <= 1e-4, (layer, c)


def test_residual_masked_equals_zeroed_batchnorm(resnet_setup):
    model, x, y, prof = resnet_setup
    model.eval()
    ref = model(x)
    for sl in (
        neuslice.global_slice(prof, "avg", 0.5),
        neuslice.semantic_slice(prof, "deeplift", 0.7, criterion="layer_cka"),
    ):
        manual = copy.deepcopy(model)
        with torch.no_grad():
            for layer, bn in (("stem", manual.bn0), ("conv1", manual.bn1), ("conv2", manual.bn2)):
                bn.weight[~sl.masks[layer]] = 0
                bn.bias[~sl.masks[layer]] = 0
        with neuslice.masked(model, sl):
            got = model(x)
        assert torch.allclose(got, manual(x), rtol=0, atol=1e-12)
        assert not torch.allclose(got, ref)
        assert torch.equal(model(x), ref)
        assert 0 <= sl.compression_rate(model) < 1


# ------------------------------------------------------------------------- untraceable model
class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 6)
        self.head = nn.Linear(6, C)

    def forward(self, x):
        h = self.fc1(x)
        if h.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace this
            h = torch.relu(h)
        return self.head(h)


def test_untraceable_model_falls_back_to_layer_outputs(caplog):
    torch.manual_seed(0)
    model = _Untraceable().double()
    x, y = make_data(30)
    with caplog.at_level(logging.WARNING, logger="neuslice.layers"):
        prof = _profile(model, x, y, metrics=("avg",))
    assert any("could not trace" in r.message for r in caplog.records)
    z = model.fc1(x).detach()
    assert max_rel_err(prof.scores("fc1", "avg", 1), z[y == 1].mean(0)) < 1e-10
    sl = neuslice.global_slice(prof, "avg", 0.5)
    with neuslice.masked(model, sl):
        got = model(x)
    manual = copy.deepcopy(model)
    with torch.no_grad():
        manual.fc1.weight[~sl.masks["fc1"]] = 0
        manual.fc1.bias[~sl.masks["fc1"]] = 0
    assert torch.allclose(got, manual(x), atol=1e-12)


# -------------------------------------------------------------------------- torchvision zoo
@pytest.mark.slow
def test_resnet18_smoke():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=C)
    x = torch.randn(8, 3, 32, 32)
    y = torch.arange(8) % C
    loader = make_loader(x, y, 4)
    prof = neuslice.profile(model, loader, C, hsic_route="minibatch", cka_batch=4, progress=False)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert prof.layers == convs
    for layer in prof.layers:
        for m in neuslice.METRICS:
            assert torch.isfinite(prof.scores(layer, m)).all()
    sl = neuslice.global_slice(prof, "taylor", 0.5)
    model.eval()
    ref = model(x)
    with neuslice.masked(model, sl):
        out = model(x)
    assert out.shape == ref.shape and not torch.allclose(out, ref)
    assert torch.equal(model(x), ref)
    assert 0 < sl.compression_rate(model) < 1
