"""Tests for neuslice.deeparc (DeepArc layer-level modularisation baseline)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from neuslice.cka import hsic
from neuslice.decomposition.deeparc import (
    DeepArcModules,
    deeparc,
    freeze_except,
    layer_similarities,
    modularize,
)


def _isometry_model(seed: int = 0) -> nn.Sequential:
    """Layer '2' is an orthogonal map (no bias, no activation) of layer '0''s ReLU output."""
    torch.manual_seed(seed)
    iso = nn.Linear(6, 6, bias=False)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    with torch.no_grad():
        iso.weight.copy_(q.float())
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), iso, nn.Linear(6, 3))


def _relu_model(seed: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def _conv_model(seed: int = 2) -> nn.Sequential:
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    )
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
    return m


def _loader(n: int = 40, batch: int = 10, shape=(8,), seed: int = 3, labels: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    ds = TensorDataset(x, torch.zeros(n, dtype=torch.long)) if labels else TensorDataset(x)
    return DataLoader(ds, batch_size=batch, shuffle=False)


# ----------------------------------------------------------------------- similarities
def test_isometry_similarity_is_one():
    sims = layer_similarities(_isometry_model(), _loader())
    assert list(sims) == [("0", "2")]
    assert sims[("0", "2")] > 0.999
    assert sims[("0", "2")] == pytest.approx(1.0, abs=1e-6)


def test_random_relu_layers_less_similar():
    sims = layer_similarities(_relu_model(), _loader())
    assert list(sims) == [("0", "2"), ("2", "4")]
    for v in sims.values():
        assert math.isfinite(v) and v < 0.999


def _reference(model: nn.Sequential, loader, idx: list[int]) -> dict:
    """Sum of per-minibatch unbiased HSICs of uncentred linear Grams, from a manual forward."""
    n = len(idx)
    xy = [0.0] * (n - 1)
    xx = [0.0] * n
    with torch.no_grad():
        for x, _ in loader:
            outs, h = {}, x
            for j, m in enumerate(model):
                h = m(h)
                outs[j] = h
            grams = [
                outs[i + 1].reshape(len(x), -1).double()
                @ outs[i + 1].reshape(len(x), -1).double().T
                for i in idx
            ]  # after ReLU
            for k in range(n):
                xx[k] += float(hsic(grams[k], grams[k], "unbiased"))
            for k in range(n - 1):
                xy[k] += float(hsic(grams[k], grams[k + 1], "unbiased"))
    return {
        (str(idx[k]), str(idx[k + 1])): xy[k] / math.sqrt(xx[k] * xx[k + 1]) for k in range(n - 1)
    }


def test_matches_direct_minibatch_computation():
    model = _relu_model()
    loader = _loader(n=36, batch=9)
    got = layer_similarities(model, loader)
    ref = _reference(model, loader, [0, 2, 4])
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12)
    # minibatch CKA differs from a single full-batch estimate
    one = layer_similarities(model, _loader(n=36, batch=36))
    assert one[("0", "2")] != pytest.approx(got[("0", "2")], rel=1e-9)


def test_small_batches_skipped_and_plain_tensor_batches():
    model = _relu_model()
    x = torch.randn(23, 8, generator=torch.Generator().manual_seed(5))
    batches = [x[:10], x[10:20], x[20:]]  # last batch has 3 < 4 samples
    with pytest.warns(UserWarning, match="skipped 3 samples"):
        got = layer_similarities(model, batches)
    ref = layer_similarities(model, [x[:10], x[10:20]])
    assert got == ref
    with pytest.raises(ValueError, match="no minibatch"):
        layer_similarities(model, [x[:3]])
    with pytest.raises(ValueError, match="no minibatch"):
        layer_similarities(model, [])


def test_model_unchanged_conv_bn():
    model = _conv_model()
    model.train()
    model[1].eval()  # mixed modes must be restored exactly
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    sims = layer_similarities(model, _loader(n=16, batch=8, shape=(2, 5, 5)))
    assert list(sims) == [("0", "3")]
    assert 0 < sims[("0", "3")] <= 1 + 1e-9
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(p.grad is None for p in model.parameters())


def test_deeparc_end_to_end():
    mods = deeparc(_isometry_model(), _loader(), threshold=0.99)
    assert isinstance(mods, DeepArcModules)
    assert mods.modules == [["0", "2"]]
    assert mods.redundant == ["2"] and mods.critical_layers == ["0"]
    mods = deeparc(_relu_model(), _loader(), layers=["0", "2", "4"])
    assert mods.modules == [["0"], ["2"], ["4"]] and mods.redundant == []


# ----------------------------------------------------------------------- modularize
def test_modularize_grouping_and_edges():
    names = ["a", "b", "c", "d", "e"]
    sims = {("a", "b"): 0.995, ("b", "c"): 0.99, ("c", "d"): 0.5, ("d", "e"): 0.9999}
    m = modularize(sims, names)
    assert m.modules == [["a", "b", "c"], ["d", "e"]]  # equality counts as similar
    assert m.redundant == ["b", "c", "e"]
    assert m.critical_layers == ["a", "d"]
    assert m.layers == names
    m = modularize(sims, names, threshold=0.9999)
    assert m.modules == [["a"], ["b"], ["c"], ["d", "e"]]
    m = modularize(sims, names, threshold=1.0)
    assert m.modules == [[n] for n in names] and m.redundant == []
    m = modularize(sims, names, threshold=1e-9)
    assert m.modules == [names]
    # nan (dead layer) never merges; tensors are accepted as values
    m = modularize({("a", "b"): float("nan"), ("b", "c"): torch.tensor(0.999)}, ["a", "b", "c"])
    assert m.modules == [["a"], ["b", "c"]]
    assert m.similarities[("b", "c")] == pytest.approx(0.999)


@pytest.mark.parametrize("threshold", [0, 0.0, -0.1, 1.0001, float("nan"), float("inf")])
def test_bad_threshold_value(threshold):
    with pytest.raises(ValueError, match="threshold"):
        modularize({("a", "b"): 1.0}, ["a", "b"], threshold=threshold)


@pytest.mark.parametrize("threshold", ["0.9", None, True])
def test_bad_threshold_type(threshold):
    with pytest.raises(TypeError, match="threshold"):
        modularize({("a", "b"): 1.0}, ["a", "b"], threshold=threshold)


def test_modularize_bad_inputs():
    with pytest.raises(ValueError, match="at least 2"):
        modularize({}, ["a"])
    with pytest.raises(ValueError, match="duplicated"):
        modularize({("a", "a"): 1.0}, ["a", "a"])
    with pytest.raises(ValueError, match=r"no entry .*'b', 'c'"):
        modularize({("a", "b"): 1.0}, ["a", "b", "c"])
    with pytest.raises(TypeError, match="must be a number"):
        modularize({("a", "b"): "x"}, ["a", "b"])
    with pytest.raises(TypeError, match="layer_names"):
        modularize({}, "ab")
    with pytest.raises(TypeError, match="mapping"):
        modularize([(("a", "b"), 1.0)], ["a", "b"])


def test_layer_similarities_bad_inputs():
    model = _relu_model()
    with pytest.raises(ValueError, match="at least 2"):
        layer_similarities(model, _loader(), layers=["0"])
    with pytest.raises(ValueError, match="unknown layer"):
        layer_similarities(model, _loader(), layers=["0", "nope"])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        layer_similarities("model", _loader())
    with pytest.raises(TypeError, match="loader must yield"):
        layer_similarities(model, [["not a tensor"]])
    with pytest.raises(ValueError, match="threshold"):
        deeparc(model, _loader(), threshold=2.0)


# ----------------------------------------------------------------------- freeze_except
def test_freeze_except():
    model = _conv_model()
    trainable = freeze_except(model, ["3"])
    assert trainable == ["3.weight", "3.bias", "4.weight", "4.bias"]  # conv + its BatchNorm
    for name, p in model.named_parameters():
        assert p.requires_grad == (name in trainable)
    # re-enables previously frozen layers; an empty list freezes all
    assert freeze_except(model, ["0", "3"]) == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "3.weight",
        "3.bias",
        "4.weight",
        "4.bias",
    ]
    assert freeze_except(model, []) == []
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="unknown layer"):
        freeze_except(model, ["nope"])
