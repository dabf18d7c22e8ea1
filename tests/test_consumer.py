"""Tests for the consumer-R² criterion (neuslice.consumer) and for rankings that put silent
neurons last (issue #12)."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import neuslice
from neuslice.consumer import consumer_r2_curves, consumer_r2_slice, magnitude_ranking

try:
    from neuslice.profiling.scores import ranking
except ImportError:  # older layout
    from neuslice._scores import ranking

C = 3


def _cnn(seed=0):
    torch.manual_seed(seed)
    return (
        nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(2, 6, 3, padding=1),
                bn1=nn.BatchNorm2d(6),
                relu1=nn.ReLU(),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(6, 8, 3, padding=1),
                relu2=nn.ReLU(),
                flatten=nn.Flatten(),
                fc1=nn.Linear(8 * 4 * 4, 12),
                relu3=nn.ReLU(),
                head=nn.Linear(12, C),
            )
        )
        .double()
        .eval()
    )


def _data(n=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    x = torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64) + y.view(-1, 1, 1, 1) * 0.5
    return x, y


def _loader(x, y, bs=16):
    return DataLoader(TensorDataset(x, y), batch_size=bs)


@pytest.fixture(scope="module")
def setup():
    model = _cnn()
    x, y = _data()
    prof = neuslice.profile(model, _loader(x, y), C, metrics=("taylor", "deeplift"), progress=False)
    return model, x, y, prof


def test_curve_matches_explicit_masking(setup):
    """R²(k) equals the centred R² of the consumer output with the layer's other neurons
    zeroed (brute force with neuslice.masked), for every k."""
    model, x, y, prof = setup
    _check_against_masking(
        model, x, y, prof, (("conv1", "conv2"), ("conv2", "fc1"), ("fc1", "head"))
    )


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_curve_follows_the_consumers_padding_mode(mode):
    """A conv consumer that pads by reflection / wrapping / replication, not zeros."""
    model = _cnn()
    model.conv2.padding_mode = mode
    x, y = _data()
    prof = neuslice.profile(model, _loader(x, y), C, metrics=("taylor",), progress=False)
    _check_against_masking(model, x, y, prof, (("conv1", "conv2"),))


def _check_against_masking(model, x, y, prof, pairs):
    cv = consumer_r2_curves(model, prof, _loader(x, y), "taylor", samples=20, progress=False)
    cat = 1
    xc = x[y == cat][:20]
    for layer, consumer in pairs:
        order = cv.order[layer][cat]
        d = order.numel()
        outs = {}
        h = dict(model.named_modules())[consumer].register_forward_hook(
            lambda m, a, o: outs.__setitem__("z", o.detach())
        )
        try:
            with torch.no_grad():
                model(xc)
                z = outs["z"].reshape(len(xc), -1)
                z = z - z.mean(0)
                for k in range(d + 1):
                    mask = torch.zeros(d, dtype=torch.bool)
                    mask[order[:k]] = True
                    masks = {
                        l: torch.ones(prof.num_neurons[l], dtype=torch.bool) for l in prof.layers
                    }
                    masks[layer] = mask
                    sl = neuslice.Slice(
                        masks=masks,
                        strategy="t",
                        metric=None,
                        fingerprint=prof.fingerprint,
                        input_shape=list(prof.input_shape),
                    )
                    with neuslice.masked(model, sl):
                        model(xc)
                    zk = outs["z"].reshape(len(xc), -1)
                    zk = zk - zk.mean(0)
                    expect = 1 - float(((z - zk) ** 2).sum() / (z**2).sum())
                    got = float(cv.r2[layer][cat, k])
                    assert math.isfinite(got)
                    assert math.isclose(got, expect, rel_tol=1e-6, abs_tol=1e-9), (layer, k)
        finally:
            h.remove()


def test_monotone_in_threshold_and_reaches_range(setup):
    model, x, y, prof = setup
    for metric in ("taylor", "deeplift"):
        cv = consumer_r2_curves(model, prof, _loader(x, y), metric, progress=False)
        rates, prev = [], None
        for t in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0):
            sl = cv.slice(t)
            kept = sl.kept()
            if prev is not None:
                assert all(kept[l] >= prev[l] for l in kept), (metric, t, kept, prev)
                # a larger threshold's selection contains the smaller one's, per category
            prev = kept
            r = sl.compression_rate(model)
            assert math.isfinite(r)
            rates.append(r)
        assert max(rates) - min(rates) > 0.4, rates
        assert sl.kept() == {l: prof.num_neurons[l] for l in prof.layers} or all(
            v >= 1 for v in sl.kept().values()
        )


def test_slice_matches_curves_and_reuses_them(setup):
    model, x, y, prof = setup
    cv = consumer_r2_curves(model, prof, _loader(x, y), "taylor", progress=False)
    a = consumer_r2_slice(model, prof, _loader(x, y), "taylor", 0.4, progress=False)
    b = consumer_r2_slice(model, prof, None, "taylor", 0.4, curves=cv)
    assert a.kept() == b.kept()
    assert all(torch.equal(a.masks[l], b.masks[l]) for l in a.masks)
    assert a.strategy == "consumer_r2" and a.threshold == 0.4
    own = cv.slice(0.4, prefix="own")
    for layer in prof.layers:
        minimal = []
        for c in range(C):  # prefix="own": each category's prefix is the minimal one reaching θ
            k = int(own.category_masks[layer][c].sum())
            r2 = cv.r2[layer][c]
            assert float(r2[k]) >= 0.4 - 1e-12
            if k > 0:
                assert not float(r2[:k].max()) >= 0.4
            minimal.append(k)
        # prefix="shared" (default): every category keeps its top-k, k = ceil(mean minimal)
        k = math.ceil(sum(minimal) / len(minimal))
        for c in range(C):
            assert set(a.category_masks[layer][c].nonzero().flatten().tolist()) == set(
                cv.order[layer][c, :k].tolist()
            )
        assert torch.equal(a.masks[layer], a.category_masks[layer].any(0))
        assert int(own.masks[layer].sum()) >= 1
    with pytest.raises(ValueError, match="prefix"):
        cv.slice(0.4, prefix="mean")


def test_model_untouched(setup):
    model, x, y, prof = setup
    model = copy.deepcopy(model)
    model.train()
    model.relu2.eval()  # mixed modes must survive too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    consumer_r2_slice(model, prof, _loader(x, y), "deeplift", 0.5, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert not model._forward_pre_hooks and all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.5", None])
def test_bad_threshold(setup, bad):
    model, x, y, prof = setup
    with pytest.raises(ValueError):
        consumer_r2_slice(model, prof, _loader(x, y), "taylor", bad, progress=False)


def test_bad_inputs(setup):
    model, x, y, prof = setup
    with pytest.raises(ValueError):
        consumer_r2_slice(model, prof, _loader(x, y), "nope", 0.5, progress=False)
    with pytest.raises(ValueError):
        consumer_r2_slice(model, prof, _loader(x, y), "avg", 0.5, progress=False)  # unprofiled
    with pytest.raises(ValueError):
        consumer_r2_slice(model, prof, _loader(x, y), "taylor", 0.5, samples=1, progress=False)
    with pytest.raises(ValueError):  # a profile of another architecture
        other = nn.Sequential(
            OrderedDict(fc1=nn.Linear(4, 3), relu=nn.ReLU(), head=nn.Linear(3, C))
        )
        consumer_r2_slice(other, prof, _loader(x, y), "taylor", 0.5, progress=False)
    with pytest.raises(ValueError):  # a loader without labels
        consumer_r2_slice(model, prof, DataLoader(x, batch_size=8), "taylor", 0.5, progress=False)
    with pytest.raises(ValueError):  # labels out of range
        consumer_r2_slice(model, prof, _loader(x, y + 5), "taylor", 0.5, progress=False)
    with pytest.raises(TypeError):
        consumer_r2_slice(model, "profile", _loader(x, y), "taylor", 0.5, progress=False)
    cv = consumer_r2_curves(model, prof, _loader(x, y), "taylor", progress=False)
    with pytest.raises(ValueError):  # curves of another metric
        consumer_r2_slice(model, prof, None, "deeplift", 0.5, curves=cv)


# ---- rankings: silent neurons last -------------------------------------------------------


def _dead_mlp():
    """fc1 has 8 units: 0-2 always dead (zero weights, bias -5), 3-7 always active; the head
    reads some active units with negative weights, so their DeepLIFT score is negative."""
    torch.manual_seed(0)
    m = nn.Sequential(
        OrderedDict(fc1=nn.Linear(4, 8), relu1=nn.ReLU(), head=nn.Linear(8, C))
    ).double()
    with torch.no_grad():
        m.fc1.weight.copy_(torch.rand(8, 4, dtype=torch.float64) + 0.2)
        m.fc1.bias.fill_(0.5)
        m.fc1.weight[:3] = 0.0
        m.fc1.bias[:3] = -5.0
        m.head.weight.copy_(
            torch.tensor(
                [
                    [1.0, 1.0, 1.0, -2.0, 1.5, -1.0, 0.5, -0.7],
                    [1.0, 1.0, 1.0, -1.0, -2.0, 0.7, 0.4, 0.9],
                    [1.0, 1.0, 1.0, 0.6, -0.5, -1.5, 1.2, -0.3],
                ],
                dtype=torch.float64,
            )
        )
    return m.eval()


@pytest.mark.parametrize("metric", ["avg", "var", "ens", "taylor", "deeplift", "taylor_act"])
def test_ranking_puts_silent_neurons_last(metric):
    model = _dead_mlp()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(60, 4, generator=g, dtype=torch.float64)
    y = torch.arange(60) % C
    prof = neuslice.profile(
        model,
        _loader(x, y, 20),
        C,
        layers=["fc1"],
        metrics=("avg", "var", "taylor", "deeplift", "taylor_act"),
        hsic=False,
        progress=False,
    )
    dead = {0, 1, 2}
    for cat in (None, 0, 1, 2):
        s = prof.scores("fc1", metric, cat)
        assert bool(torch.isfinite(s).all())
        for i in dead:
            assert float(s[i]) == 0.0 or metric == "ens"
        live = [i for i in range(8) if i not in dead]
        assert all(float(s[i].abs()) > 0 for i in live) or metric == "ens"
        for rank in (ranking, magnitude_ranking):
            order = rank(s).tolist()
            assert set(order[-3:]) == dead, (metric, cat, s.tolist(), order)
    if metric == "deeplift":  # the case that motivated the fix: live neurons score below 0
        assert float(prof.scores("fc1", "deeplift", 0).min()) < 0


def test_magnitude_ranking_nan_last_and_stable():
    s = torch.tensor([0.0, -3.0, float("nan"), 2.0, -2.0, 0.0])
    assert magnitude_ranking(s).tolist() == [1, 3, 4, 0, 5, 2]


def test_semantic_slice_default_criterion_is_consumer_r2(setup):
    model, x, y, prof = setup
    a = neuslice.semantic_slice(
        prof, "taylor", 0.5, criterion="consumer_r2", model=model, loader=_loader(x, y)
    )
    b = consumer_r2_slice(model, prof, _loader(x, y), "taylor", 0.5, progress=False)
    assert all(torch.equal(a.masks[l], b.masks[l]) for l in prof.layers)
    default = neuslice.semantic_slice(prof, "taylor", 0.5, model=model, loader=_loader(x, y))
    assert default.strategy == "consumer_r2"
    assert all(torch.equal(default.masks[l], b.masks[l]) for l in prof.layers)
    # profile only: the paper's criterion, with a FutureWarning naming both ways out
    paper = neuslice.semantic_slice(prof, "taylor", 0.5, criterion="layer_cka")
    assert paper.strategy == "semantic"
    with pytest.warns(FutureWarning, match="criterion='layer_cka'") as rec:
        fallback = neuslice.semantic_slice(prof, "taylor", 0.5)
    assert "model=" in str(rec[0].message)
    assert all(torch.equal(fallback.masks[l], paper.masks[l]) for l in prof.layers)
    with pytest.raises(ValueError, match="loader="):  # model without loader: no silent fallback
        neuslice.semantic_slice(prof, "taylor", 0.5, model=model)
    with pytest.raises(ValueError, match="loader="):
        neuslice.semantic_slice(prof, "taylor", 0.5, criterion="consumer_r2")
    with pytest.raises(ValueError, match="step"):
        neuslice.semantic_slice(prof, "taylor", 0.5, 2, model=model, loader=_loader(x, y))
    with pytest.raises(ValueError, match="consumer_r2"):
        neuslice.semantic_slice(prof, "taylor", 0.5, criterion="nope")
