"""Bounded memory at many categories: grouped category order, CKA-curve results, the memory
estimate and budget, and autocast."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import neuslice
from neuslice.experiments.data import CategoryGroupedSampler
from neuslice.runtime.memory import MemoryBudgetError

from conftest import assert_same_snapshot, close, make_data, snapshot
from conftest import build as _build

C = 3


def _loader(x, y, batch=7, sampler=None):
    return DataLoader(TensorDataset(x, y), batch_size=batch, sampler=sampler)


def _grouped(x, y, batch=7, **kw):
    return _loader(x, y, batch, CategoryGroupedSampler(y, 1, 0, **kw))


def _close(a, b, tol=1e-10):
    return close(a, b, tol)


def _prof(model, loader, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("num_classes", C)
    return neuslice.profile(model, loader, **kw)


@pytest.mark.parametrize("route", ["feature", "minibatch"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_grouped_order_equals_any_order(kind, route):
    model = build(kind)
    x, y = make_data(50, "vec" if kind == "mlp" else "img", num_classes=C)
    loader = _grouped(x, y, 6)  # the same sorted stream for both
    kw = dict(hsic_route=route, cka_batch=5)
    ref = _prof(model, loader, **kw)
    for keep in (True, False):
        got = _prof(model, loader, category_order="grouped", keep_hsic=keep, **kw)
        assert got.keeps_hsic == keep
        for layer in ref.layers:
            for metric in ("avg", "var", "ens", "taylor", "deeplift"):
                for c in range(C):
                    assert torch.equal(got.scores(layer, metric, c), ref.scores(layer, metric, c))
                    a, b = got.curve(layer, metric, c), ref.curve(layer, metric, c)
                    assert _close(a, b), (layer, metric, c)
        for metric in ("taylor", "avg"):
            for t in (0.9, 0.97):
                sa = neuslice.semantic_slice(got, metric, t, criterion="layer_cka")
                sb = neuslice.semantic_slice(ref, metric, t, criterion="layer_cka")
                assert all(torch.equal(sa.masks[k], sb.masks[k]) for k in sa.masks)


def test_feature_route_is_order_invariant_across_modes():
    """Exact statistics do not depend on the order: shuffled 'any' == sorted 'grouped'."""
    model = build("cnn")
    x, y = make_data(40, "img", num_classes=C)
    ref = _prof(model, _loader(x, y, 7), hsic_route="feature", metrics=("avg", "var", "deeplift"))
    got = _prof(
        model,
        _grouped(x, y, 5, seed=3),
        hsic_route="feature",
        category_order="grouped",
        metrics=("avg", "var", "deeplift"),
    )
    for layer in ref.layers:
        for c in range(C):
            for metric in ("avg", "var", "deeplift"):
                assert _close(got.scores(layer, metric, c), ref.scores(layer, metric, c))
                assert _close(got.curve(layer, metric, c), ref.curve(layer, metric, c), 1e-9)


def test_curve_profile_round_trip_and_errors(tmp_path):
    model = build("mlp")
    x, y = make_data(40, num_classes=C)
    p = _prof(model, _grouped(x, y), category_order="grouped")
    assert not p.keeps_hsic
    with pytest.raises(ValueError, match="keep_hsic"):
        p.hsic(p.layers[0], 0)
    p.save(tmp_path / "p.pt")
    q = neuslice.Profile.load(tmp_path / "p.pt")
    for layer in p.layers:
        assert torch.equal(q.curve(layer, "taylor", 1), p.curve(layer, "taylor", 1))
    a = neuslice.semantic_slice(p, "deeplift", 0.95, criterion="layer_cka")
    b = neuslice.semantic_slice(q, "deeplift", 0.95, criterion="layer_cka")
    assert a.kept() == b.kept()


def test_grouped_order_refuses_unsorted_data():
    model = build("mlp")
    before = snapshot(model)
    x, y = make_data(30, num_classes=C)  # interleaved labels
    with pytest.raises(ValueError, match="sorted by category.*CategoryGroupedSampler"):
        _prof(model, _loader(x, y, 4), category_order="grouped")
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.slow
def test_thousand_categories_grouped_keeps_few_accumulators(monkeypatch):
    """1,000 categories: the grouped pass never holds more than the categories of one batch
    plus one, and gives the same slices as the unbounded 'any' pass."""
    from neuslice.profiling import layer_state as _layer_state

    n_cls, per = 1000, 5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_cls * per, 12, generator=g, dtype=torch.float64) + 0.3
    y = torch.arange(n_cls).repeat_interleave(per)
    model = build("mlp")
    with torch.no_grad():  # a head for 1,000 classes
        model.head = torch.nn.Linear(8, n_cls, dtype=torch.float64)
    peak = [0]
    orig = _layer_state.LayerState.update_hsic

    def spy(self, a, labels):
        orig(self, a, labels)
        peak[0] = max(peak[0], len(self.open))

    monkeypatch.setattr(_layer_state.LayerState, "update_hsic", spy)
    loader = _grouped(x, y, 16, shuffle=False)
    kw = dict(num_classes=n_cls, metrics=("avg", "deeplift"), hsic_route="minibatch", cka_batch=4)
    got = _prof(model, loader, category_order="grouped", **kw)
    assert 1 <= peak[0] <= 16 // per + 2
    ref = _prof(model, loader, **kw)
    for metric in ("avg", "deeplift"):
        a, b = (
            neuslice.semantic_slice(got, metric, 0.9, criterion="layer_cka"),
            neuslice.semantic_slice(ref, metric, 0.9, criterion="layer_cka"),
        )
        for k in a.masks:
            assert torch.equal(a.category_masks[k], b.category_masks[k])


def test_memory_budget_refusal_is_clear_and_harmless():
    model = build("cnn")
    before = snapshot(model)
    x, y = make_data(20, "img", num_classes=C)
    with pytest.raises(MemoryBudgetError, match=r"GiB[\s\S]*max_memory_gb[\s\S]*grouped"):
        _prof(model, _loader(x, y), max_memory_gb=1e-6)
    assert_same_snapshot(before, snapshot(model))


def test_memory_estimate_scaling():
    model = build("cnn")
    x, _ = make_data(2, "img", num_classes=C)
    est = {
        (c, order): neuslice.estimate_profile_memory(model, x, c, category_order=order)
        for c in (100, 200, 400)
        for order in ("any", "grouped")
    }
    any_ = [est[(c, "any")].total for c in (100, 200, 400)]
    assert any_[2] - any_[1] == pytest.approx(2 * (any_[1] - any_[0]))  # linear in C
    grouped = [est[(c, "grouped")] for c in (100, 200, 400)]
    acc = [e.parts["HSIC accumulators"] for e in grouped]
    assert acc[0] == acc[1] == acc[2]  # accumulators do not grow with the categories
    assert grouped[2].total < any_[2] / 3
    assert "largest layers" in grouped[0].table()


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_autocast_stays_close_to_float32(dtype, tol):
    model = build("cnn", dtype=torch.float32)
    x, y = make_data(60, "img", dtype=torch.float32, num_classes=C)
    before = snapshot(model)
    ref = _prof(model, _loader(x, y, 10), hsic_route="feature")
    got = _prof(model, _loader(x, y, 10), hsic_route="feature", autocast=dtype)
    assert_same_snapshot(before, snapshot(model))
    for layer in ref.layers:
        for metric in ("avg", "var", "taylor", "deeplift"):
            a, b = got.scores(layer, metric, None), ref.scores(layer, metric, None)
            rel = float((a - b).norm() / b.norm())
            assert rel < tol * (4 if metric in ("taylor", "deeplift") else 1), (layer, metric, rel)
        for c in range(C):
            ca, cb = got.curve(layer, "avg", c), ref.curve(layer, "avg", c)
            assert float((ca - cb).abs().max()) < tol, (layer, c)


def build(kind, dtype=torch.float64):
    return _build(kind, dtype)[0]


def test_grouped_budget_rechecked_when_a_batch_opens_many_categories():
    """Tiny categories: one batch spans many of them; the plan of 2 open categories is
    re-checked at run time and a budget it no longer fits is refused."""
    from neuslice.layers import find_layers
    from neuslice.runtime.memory import estimate

    n_cls = 40
    model = build("mlp")
    with torch.no_grad():
        model.head = torch.nn.Linear(8, n_cls, dtype=torch.float64)
    x = torch.randn(2 * n_cls, 12, dtype=torch.float64)
    y = torch.arange(n_cls).repeat_interleave(2)
    shapes = [(l.name, l.num_neurons, 1) for l in find_layers(model)]
    kw = dict(hsic_route="feature", category_order="grouped", keep_hsic=False, batch_size=20)
    two, ten = (
        estimate(shapes, n_cls, open_categories=2, **kw),
        estimate(shapes, n_cls, open_categories=10, **kw),
    )
    budget = (two.total + ten.total) / 2 / 2**30
    before = snapshot(model)
    with pytest.raises(MemoryBudgetError, match="10 categories are open at once"):
        _prof(
            model,
            _grouped(x, y, 20, shuffle=False),
            num_classes=n_cls,
            hsic_route="feature",
            category_order="grouped",
            max_memory_gb=budget,
        )
    assert_same_snapshot(before, snapshot(model))
    _prof(
        model,
        _grouped(x, y, 4, shuffle=False),
        num_classes=n_cls,
        hsic_route="feature",
        category_order="grouped",
        max_memory_gb=budget,
    )  # 2 categories per batch: fits
