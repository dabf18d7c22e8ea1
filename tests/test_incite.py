"""Incite's mutation analysis: neuslice.mutation_scores against the direct definition."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import neuslice
from conftest import fit_briefly
from neuslice.decomposition.clustering import cluster_layer, cluster_units, unit_features
from neuslice.decomposition.incite import reference_mutation_scores

K = 3


class Residual(nn.Module):
    """conv -> BN -> ReLU, a residual block (add of the block input), pooling, two Linears."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4, 12)
        self.head = nn.Linear(12, K)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv0(x)))
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)) + x)
        out = F.adaptive_avg_pool2d(out, 2).flatten(1)
        return self.head(torch.tanh(self.fc(out)))


class Untraceable(Residual):
    def forward(self, x):
        if float(x.sum()) > -1e30:  # data-dependent control flow: torch.fx cannot trace it
            return super().forward(x)
        return x


def mlp(outputs=K):
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(12, 20),
        nn.ReLU(),
        nn.Linear(20, 16),
        nn.ReLU(),
        nn.Linear(16, outputs),
    )


def bn_cnn(outputs=K):
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 9, 10),
        nn.Tanh(),
        nn.Linear(10, outputs),
    )


def _fit(model, x, y, task, steps=60):
    return fit_briefly(model, x, y, task, steps)


def _data(kind, task, n=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *((12,) if kind == "mlp" else (2, 6, 6)), generator=g, dtype=torch.float64)
    flat = x.reshape(n, -1)
    if task == "classification":
        y = flat[:, :K].argmax(1)
    else:
        y = torch.stack([flat[:, 0] + flat[:, 1] ** 2, flat[:, 2].abs(), flat[:, 3] * 2], 1)
    return x, y


def _subject(kind, task, seed=0):
    torch.manual_seed(seed)
    model = {"mlp": mlp, "cnn": bn_cnn, "res": Residual, "untraceable": Untraceable}[kind]()
    x, y = _data("mlp" if kind == "mlp" else "cnn", task, seed=seed)
    model = _fit(model.double(), x, y, task)
    return model, DataLoader(TensorDataset(x, y), batch_size=32)


def _equal(a, b, task):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape
        if task == "classification":  # float64 on tiny models: no argmax near a tie
            assert torch.equal(a[k], b[k]), k
        else:  # scaling outputs vs scaling weights: float64 rounding only
            assert torch.allclose(a[k], b[k], rtol=1e-9, atol=1e-9), k


@pytest.mark.parametrize("kind", ["mlp", "cnn", "res", "untraceable"])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_scores_equal_the_direct_definition(kind, task):
    model, loader = _subject(kind, task)
    ref = reference_mutation_scores(model, loader, task, cluster_size=3)
    total = sum(float(v.sum()) for v in ref.values())
    assert math.isfinite(total) and total > 0  # mutants do move the outputs
    for delta in (True, False):
        got = neuslice.mutation_scores(
            model, loader, task, cluster_size=3, delta=delta, progress=False
        )
        _equal(got, ref, task)
        for name, s in got.items():  # every unit carries its cluster's score
            labels = cluster_units(model, [name], 3)[name]
            for c in range(int(labels.max()) + 1):
                cols = s[:, labels == c]
                assert torch.equal(cols, cols[:, :1].expand_as(cols))


def test_same_arithmetic_reference_and_batching():
    """Against the output-multiplier reference (same arithmetic, one mutant per forward):
    identical, whatever the stacking (tiny budgets split clusters and samples)."""
    model, loader = _subject("res", "classification", seed=1)
    ref = reference_mutation_scores(model, loader, cluster_size=2, how="multiplier")
    for budget in (1e-7, 1e-4, 1.0):
        got = neuslice.mutation_scores(
            model, loader, cluster_size=2, delta=False, max_memory_gb=budget, progress=False
        )
        _equal(got, ref, "classification")


def test_cluster_size_one_is_no_clustering():
    model, loader = _subject("cnn", "classification", seed=2)
    names = [l.name for l in neuslice.find_layers(model)]
    singles = {n: torch.arange(neuslice.find_layers(model, [n])[0].num_neurons) for n in names}
    a = neuslice.mutation_scores(model, loader, cluster_size=1, progress=False)
    b = neuslice.mutation_scores(model, loader, clusters=singles, progress=False)
    c = reference_mutation_scores(model, loader, clusters=singles)
    _equal(a, b, "classification")
    _equal(a, c, "classification")
    assert all(
        torch.equal(cluster_layer(neuslice.find_layers(model, [n])[0].module, 1), singles[n])
        for n in names
    )


def test_ward_clustering_matches_scikit_learn():
    from sklearn.cluster import AgglomerativeClustering

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 25, 3)
    feats = unit_features(conv)
    assert feats.shape == (25, (3 + 1) * 9)
    assert float(feats.min()) == 0.0 and float(feats.max()) == 1.0
    labels = cluster_layer(conv, 10)
    ref = AgglomerativeClustering(n_clusters=3).fit(feats.numpy()).labels_
    assert int(labels.max()) + 1 == 3 and int(labels[0]) == 0
    same = torch.tensor(ref)[:, None] == torch.tensor(ref)[None, :]
    assert torch.equal(labels[:, None] == labels[None, :], same)  # same partition
    assert torch.equal(cluster_layer(nn.Linear(4, 10), 10), torch.zeros(10, dtype=torch.long))


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    )


def _assert_same(model, snap):
    state, modes, flags, grads = snap
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g))


def test_model_untouched():
    model, loader = _subject("res", "classification", seed=3)
    model.train()
    model.bn1.eval()
    model.conv0.weight.requires_grad_(False)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    snap = _snapshot(model)
    neuslice.mutation_scores(model, loader, cluster_size=2, progress=False)
    _assert_same(model, snap)
    with pytest.raises(ValueError):
        neuslice.mutation_scores(model, loader, "regression", progress=False)
    _assert_same(model, snap)


def test_bad_inputs(monkeypatch):
    model, loader = _subject("mlp", "classification")
    for bad in (0, -1):
        with pytest.raises(ValueError, match="cluster_size"):
            neuslice.mutation_scores(model, loader, cluster_size=bad, progress=False)
    with pytest.raises(TypeError, match="cluster_size"):
        neuslice.mutation_scores(model, loader, cluster_size=2.5, progress=False)
    with pytest.raises(ValueError, match="1.0"):
        neuslice.mutation_scores(model, loader, factors=(1.1, 1.0), progress=False)
    with pytest.raises(ValueError, match="finite"):
        neuslice.mutation_scores(model, loader, factors=(float("nan"),), progress=False)
    with pytest.raises(ValueError, match="task"):
        neuslice.mutation_scores(model, loader, task="ranking", progress=False)
    with pytest.raises(ValueError, match="max_memory_gb"):
        neuslice.mutation_scores(model, loader, max_memory_gb=0, progress=False)
    # classification on a model that does not return class logits
    one = nn.Sequential(nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 1)).double()
    with pytest.raises(ValueError, match="class logits"):
        neuslice.mutation_scores(one, loader, progress=False)
    seq = nn.Sequential(nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3), nn.Unflatten(1, (3, 1)))
    with pytest.raises(ValueError, match="class logits"):
        neuslice.mutation_scores(seq.double(), loader, layers=["0"], progress=False)
    # regression targets that do not match the outputs
    x = torch.randn(20, 12, dtype=torch.float64)
    for y in (torch.randn(20, 2), torch.randn(20)):
        bad = DataLoader(TensorDataset(x, y.double()), batch_size=10)
        with pytest.raises(ValueError, match="do not match"):
            neuslice.mutation_scores(model, bad, "regression", progress=False)
    with pytest.raises(TypeError, match="pairs"):
        neuslice.mutation_scores(model, [x], progress=False)
    with pytest.raises(ValueError, match="no samples"):
        neuslice.mutation_scores(model, [], progress=False)
    with pytest.raises(ValueError, match="clusters"):
        neuslice.mutation_scores(model, loader, clusters={"1": torch.zeros(3)}, progress=False)
    # scikit-learn missing: the error names the extra; cluster_size=1 needs no clustering
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(ImportError, match=r"neuslice\[decompose\]"):
        neuslice.mutation_scores(model, loader, cluster_size=3, progress=False)
    assert neuslice.mutation_scores(model, loader, cluster_size=1, progress=False)


def test_mutation_as_a_slicing_metric():
    torch.manual_seed(0)
    model, loader = _subject("mlp", "classification", seed=4)
    scores = neuslice.mutation_scores(model, loader, cluster_size=1, progress=False)
    prof = neuslice.profile(model, loader, K, metrics=("avg",), progress=False)
    with pytest.raises(ValueError, match="mutation"):
        prof.scores("1", "mutation")
    with pytest.raises(ValueError, match="shape"):
        neuslice.add_mutation_scores(prof, {k: v[:2] for k, v in scores.items()})
    assert neuslice.add_mutation_scores(prof, scores) is prof
    assert "mutation" in prof.metrics
    for layer, s in scores.items():
        assert torch.equal(prof.scores(layer, "mutation"), s.sum(0))
        assert torch.equal(prof.scores(layer, "mutation", 1), s[1])
    g = neuslice.global_slice(prof, "mutation", 0.5)
    for layer, s in scores.items():
        order = torch.argsort(s.sum(0), descending=True, stable=True)
        assert torch.equal(
            torch.nonzero(g.masks[layer]).flatten().sort().values,
            order[: math.ceil(0.5 * s.shape[1])].sort().values,
        )
    c = neuslice.categorywise_slice(prof, "mutation", 0.25)
    assert c.category_masks["1"].shape == (K, 20)
    sem = neuslice.semantic_slice(prof, "mutation", 0.9, criterion="layer_cka")
    assert all(int(m.sum()) >= 1 for m in sem.masks.values())


def test_nan_outputs_give_the_same_scores_on_both_paths():
    """A NaN input (hence NaN outputs for that sample) must not break the fast path's check."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    x = torch.randn(8, 4)
    x[3, 0] = float("nan")
    y = torch.randint(0, 3, (8,))
    fast = neuslice.mutation_scores(model, [(x, y)], cluster_size=1, progress=False)
    slow = neuslice.mutation_scores(model, [(x, y)], cluster_size=1, delta=False, progress=False)
    assert fast.keys() == slow.keys()
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], equal_nan=True)
