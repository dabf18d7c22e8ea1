"""Layer-wise sparsity allocations (global / LAMP / Uniform+ / ERK) and iterative pruning."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neuslice.maintenance.pruning import (
    METHODS,
    PruneReport,
    compression_rate,
    iterative_prune,
    prune_weights,
    remove_reparametrization,
    sparsity,
)


def _set(layer: nn.Module, values) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(values, dtype=torch.float32).view_as(layer.weight))
    return layer


def _mask(layer: nn.Module) -> torch.Tensor:
    return layer.weight_mask.detach().clone()


def _kept(model: nn.Module) -> int:
    return sum(
        int(m.weight_mask.sum()) if hasattr(m, "weight_mask") else m.weight.numel()
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    )


def _mlp(sizes, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    mods = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        mods += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*mods[:-1])


def _cnn(seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 3),
    )


# ------------------------------------------------------------------------- global vs LAMP
def _crafted() -> nn.Sequential:
    # layer A: one small weight next to big ones; layer B: many similar small weights
    a = _set(nn.Linear(2, 2, bias=False), [1.5, 10.0, -10.0, 10.0])
    b = _set(nn.Linear(2, 2), [0.9, -1.0, 1.1, 1.2])
    return nn.Sequential(a, b)


def test_global_prunes_smallest_magnitudes():
    model = _crafted()
    out = prune_weights(model, "global", 0.25)  # 2 of 8 weights
    assert torch.equal(_mask(model[0]), torch.ones(2, 2))
    assert torch.equal(_mask(model[1]), torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert out == {"0": 0.0, "1": 0.5}
    assert model[1].bias.detach().ne(0).all()  # biases untouched


def test_lamp_differs_from_global():
    # LAMP scores: A: 2.25/302.25 ~ 0.0074, 100/300, 100/200, 1; B: 0.81/4.46 ~ 0.18, 1/3.65, ...
    model = _crafted()
    out = prune_weights(model, "lamp", 0.25)
    assert torch.equal(_mask(model[0]), torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    assert torch.equal(_mask(model[1]), torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    assert out == {"0": 0.25, "1": 0.25}
    assert model[0].weight[0, 0] == 0 and model[1].weight[0, 0] == 0


def test_lamp_scores_match_formula():
    # pruning k weights with LAMP == removing the k smallest direct-formula scores
    model = _mlp([5, 7, 4], seed=3)
    scores, where = [], []
    for li, layer in enumerate([model[0], model[2]]):
        w = layer.weight.detach().flatten().double()
        sq = w.pow(2)
        for i in range(w.numel()):
            denom = sq[sq >= sq[i]].sum()
            scores.append(float(sq[i] / denom))
            where.append((li, i))
    order = sorted(range(len(scores)), key=lambda j: scores[j])
    n = 35 + 28
    k = n - round(0.6 * n)
    expected = {where[j] for j in order[:k]}
    prune_weights(model, "lamp", 0.4)
    got = {
        (li, i)
        for li, layer in enumerate([model[0], model[2]])
        for i in (layer.weight_mask.flatten() == 0).nonzero().flatten().tolist()
    }
    assert got == expected


# -------------------------------------------------------------------------------- Uniform+
def test_uniform_plus_first_dense_last_capped():
    model = _mlp([2, 4, 16, 16, 2])  # 8, 64, 256, 32 weights -> 360
    out = prune_weights(model, "uniform_plus", 0.9)  # keep 36
    lin = [m for m in model if isinstance(m, nn.Linear)]
    kept = [int(m.weight_mask.sum()) for m in lin]
    # first dense (8); last capped at 80% sparsity (ceil(0.2*32) = 7); the 21 left are shared
    # at a common density 21/320: 4.2 and 16.8 -> 4 and 17 (largest remainder)
    assert kept == [8, 4, 17, 7]
    assert out["0"] == 0.0 and out["6"] == pytest.approx(1 - 7 / 32) and out["6"] <= 0.8
    # within a layer the smallest magnitudes go
    w = lin[1].weight.detach().abs().flatten()
    m = lin[1].weight_mask.flatten().bool()
    assert w[m].min() >= w[~m].max()


def test_uniform_plus_no_cap_needed_is_uniform():
    model = _mlp([2, 4, 16, 16, 2])
    prune_weights(model, "uniform_plus", 0.5)  # keep 180: first 8, others 172/352 each
    lin = [m for m in model if isinstance(m, nn.Linear)]
    dens = [float(m.weight_mask.mean()) for m in lin]
    assert dens[0] == 1.0
    for d in dens[1:]:
        assert d == pytest.approx(172 / 352, abs=1 / 32)
    assert _kept(model) == 180


# ------------------------------------------------------------------------------------- ERK
def _erk_reference(shapes, keep_total):
    """Direct ERK: density_l = eps * sum(dims)/prod(dims); layers > 1 made dense, repeat."""
    raw = [sum(s) / math.prod(s) for s in shapes]
    n = [math.prod(s) for s in shapes]
    dense: set[int] = set()
    while True:
        free = [i for i in range(len(shapes)) if i not in dense]
        eps = (keep_total - sum(n[i] for i in dense)) / sum(raw[i] * n[i] for i in free)
        over = {i for i in free if eps * raw[i] > 1}
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense |= over


def test_erk_densities_without_redistribution():
    model = _mlp([20, 30, 10])  # (30,20) and (10,30): raw 50/600, 40/300
    prune_weights(model, "erk", 0.7)
    lin = [model[0], model[2]]
    total = 900
    ref = _erk_reference([(30, 20), (10, 30)], round(0.3 * total))
    assert all(d < 1 for d in ref)
    for m, d in zip(lin, ref):
        assert int(m.weight_mask.sum()) == pytest.approx(d * m.weight.numel(), abs=1)
    assert _kept(model) == round(0.3 * total)


def test_erk_dense_layer_redistribution():
    model = _cnn()  # conv (2,1,3,3)=18 raw 0.5; (64,32) raw 96/2048; (3,64) raw 67/192
    shapes = [(2, 1, 3, 3), (64, 32), (3, 64)]
    total = 18 + 2048 + 192
    keep = round(0.6 * total)
    out = prune_weights(model, "erk", 0.4)
    ref = _erk_reference(shapes, keep)
    # without redistribution the conv would get density > 1
    naive_eps = keep / sum(sum(s) for s in shapes)
    assert naive_eps * 0.5 > 1 and ref[0] == 1.0
    layers = [model[0], model[4], model[6]]
    for m, d in zip(layers, ref):
        assert int(m.weight_mask.sum()) == pytest.approx(d * m.weight.numel(), abs=1)
    assert out["0"] == 0.0
    assert _kept(model) == keep
    assert isinstance(model[1], nn.BatchNorm2d) and not hasattr(model[1], "weight_mask")


# ------------------------------------------------------------------ rounds, masks, metrics
@pytest.mark.parametrize("method", METHODS)
def test_rounds_compound(method):
    model = _cnn(seed=1)
    total = 18 + 2048 + 192
    expected = total
    for _ in range(3):
        prune_weights(model, method, 0.2)
        expected = math.floor(0.8 * expected + 0.5)
        assert _kept(model) == expected
    assert sparsity(model) == pytest.approx(1 - 0.8**3, abs=2e-3)


@pytest.mark.parametrize("method", METHODS)
def test_masks_persist_across_rounds(method):
    model = _mlp([6, 8, 8, 3], seed=2)
    lin = [m for m in model if isinstance(m, nn.Linear)]
    prune_weights(model, method, 0.3)
    before = [_mask(m) for m in lin]
    with torch.no_grad():  # "fine-tuning" that would make pruned weights the largest ones
        for m, mk in zip(lin, before):
            m.weight_orig.add_((1 - mk) * 100.0)
    prune_weights(model, method, 0.3)
    for m, mk in zip(lin, before):
        now = _mask(m)
        assert torch.all(now <= mk)  # pruned stays pruned
        model(torch.randn(1, 6))  # refresh weight via the forward pre-hook
        assert torch.all(m.weight[mk == 0] == 0)


def test_sparsity_compression_and_remove():
    model = _crafted()
    prune_weights(model, "global", 0.25)
    assert sparsity(model) == 0.25
    n_params = 4 + 4 + 2
    assert compression_rate(model) == pytest.approx(2 / n_params)
    remove_reparametrization(model)
    assert not hasattr(model[1], "weight_mask") and isinstance(model[1].weight, nn.Parameter)
    assert sparsity(model) == 0.25 and compression_rate(model) == pytest.approx(0.2)


def test_layers_argument_restricts_pruning():
    model = _mlp([6, 8, 8, 3])
    out = prune_weights(model, "global", 0.5, layers=["2", model[4]])
    assert set(out) == {"2", "4"}
    assert not hasattr(model[0], "weight_mask")
    assert _kept(model) == 48 + round(0.5 * (64 + 24))


# ------------------------------------------------------------------------ iterative pruning
def test_iterative_prune_stops_and_reverts():
    model = _cnn()
    calls = {"finetune": 0}

    def finetune(m):
        calls["finetune"] += 1
        with torch.no_grad():
            m[6].bias.add_(1.0)

    states = {}

    def evaluate(m):
        acc = 1.0 - sparsity(m)
        states[calls["finetune"]] = {k: v.clone() for k, v in m.state_dict().items()}
        return acc

    params_before = {id(p) for p in model.parameters()}
    report = iterative_prune(model, "global", evaluate, finetune, amount=0.2, tolerance=0.5)
    # accuracies 1 - s: 0.8, 0.64, 0.512, 0.41 (< 0.5 -> round 4 reverted)
    assert isinstance(report, PruneReport)
    assert report.rounds == 3 and calls["finetune"] == 4
    assert report.original_accuracy == 1.0
    assert report.accuracy == pytest.approx(0.512, abs=2e-3)
    assert [h[0] for h in report.history] == [0, 1, 2, 3, 4]
    assert report.history[-1][2] < 0.5
    assert sparsity(model) == pytest.approx(1 - report.accuracy)
    n_params = sum(p.numel() for p in model.parameters())
    assert report.compression_rate == pytest.approx(sparsity(model) * 2258 / n_params)
    for k, v in model.state_dict().items():  # exactly the state after round 3
        assert torch.equal(v, states[3][k]), k
    assert {id(p) for p in model.parameters()} == params_before
    x = torch.randn(2, 1, 6, 6)
    assert torch.all(model[4].weight[model[4].weight_mask == 0] == 0)
    model(x)


def test_iterative_prune_reverts_first_round_to_dense():
    model = _mlp([4, 5, 2])
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    report = iterative_prune(model, "lamp", lambda m: 1.0 - sparsity(m), None, tolerance=0.0)
    assert report.rounds == 0 and report.compression_rate == 0.0 and report.accuracy == 1.0
    assert not hasattr(model[0], "weight_mask")
    assert set(model.state_dict()) == set(ref)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k])


def test_iterative_prune_max_rounds():
    model = _mlp([4, 5, 2])
    report = iterative_prune(model, "erk", lambda m: 0.9, lambda m: None, amount=0.1, max_rounds=3)
    assert report.rounds == 3 and report.accuracy == 0.9 and len(report.history) == 4
    assert _kept(model) == math.floor(
        0.9 * math.floor(0.9 * math.floor(0.9 * 30 + 0.5) + 0.5) + 0.5
    )


# ------------------------------------------------------------------------------- bad input
def test_bad_inputs():
    model = _mlp([4, 5, 2])
    with pytest.raises(ValueError, match="global, lamp, uniform_plus, erk"):
        prune_weights(model, "random", 0.2)
    with pytest.raises(TypeError):
        prune_weights(model, 3, 0.2)
    for bad in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            prune_weights(model, "global", bad)
    with pytest.raises(TypeError):
        prune_weights(model, "global", "0.2")
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        prune_weights(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), "global", 0.2)
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        sparsity(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="no submodule"):
        prune_weights(model, "global", 0.2, layers=["nope"])
    with pytest.raises(TypeError, match="only nn.Linear"):
        prune_weights(model, "global", 0.2, layers=["1"])
    with pytest.raises(TypeError):
        prune_weights("model", "global", 0.2)
    with pytest.raises(ValueError, match="unknown pruning method"):
        iterative_prune(model, "magnitude", lambda m: 1.0, None)
    with pytest.raises(TypeError):
        iterative_prune(model, "global", 1.0, None)
    with pytest.raises(ValueError):
        iterative_prune(model, "global", lambda m: 1.0, None, tolerance=-1)
    with pytest.raises(TypeError):
        iterative_prune(model, "global", lambda m: "high", None)
    assert not hasattr(model[0], "weight_mask")  # nothing was pruned by the failing calls
