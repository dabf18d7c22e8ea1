"""Tests for the slicing strategies, the Slice object (persistence, compression rate) and
neuslice.masked."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import neuslice
from neuslice import cka
from neuslice.slicing import Slice

from conftest import (
    MLP_OUT,
    NUM_CLASSES,
    TinyResNet,
    build,
    make_cnn,
    make_data,
    make_loader,
    make_mlp,
    outputs_of,
)

C = NUM_CLASSES


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def setup(request):
    """float64 model, data, neuron-output modules and a feature-route profile."""
    model, (x, y), outs, _ = build(request.param, seed=4)
    prof = neuslice.profile(model, make_loader(x, y, 7), C, hsic_route="feature", progress=False)
    return model, x, y, outs, prof


@pytest.fixture(scope="module")
def mlp_setup():
    model, (x, y), outs, _ = build("mlp", seed=4)
    prof = neuslice.profile(model, make_loader(x, y, 7), C, hsic_route="feature", progress=False)
    return model, x, y, outs, prof


def _order(scores: torch.Tensor) -> torch.Tensor:
    """The reference order: decreasing magnitude (silent neurons last), ties by index."""
    keyed = sorted(range(scores.numel()), key=lambda i: (-abs(float(scores[i])), i))
    return torch.tensor(keyed, dtype=torch.long)


# ------------------------------------------------------------------------------ strategies
@pytest.mark.parametrize("metric", ["avg", "var", "ens", "taylor", "deeplift"])
def test_semantic_slice_is_minimal_prefix_brute_force(setup, metric):
    model, x, y, outs, prof = setup
    outputs = outputs_of(model, list(outs.values()), x)
    for threshold in (0.3, 0.7, 0.9, 0.97):
        sl = neuslice.semantic_slice(prof, metric, threshold, criterion="layer_cka")
        assert sl.strategy == "semantic" and sl.metric == metric and sl.threshold == threshold
        for layer, mod in outs.items():
            d = prof.num_neurons[layer]
            for c in range(C):
                acts = outputs[mod][y == c]
                order = _order(prof.scores(layer, metric, c))
                # brute force: CKA of each prefix against the whole layer, from scratch
                curve = torch.stack(
                    [cka.linear_cka(acts[:, order[:k]], acts) for k in range(1, d + 1)]
                )
                sizes, naive = cka.naive_curve(acts, order)
                assert torch.allclose(curve, naive, atol=1e-10, equal_nan=True)
                hits = (curve >= threshold).nonzero().flatten()
                k = int(hits[0]) + 1 if hits.numel() else d
                expect = torch.zeros(d, dtype=torch.bool)
                expect[order[:k]] = True
                got = sl.category_masks[layer][c]
                assert torch.equal(got, expect), (layer, c, threshold, int(got.sum()), k)
                # minimal: one neuron fewer does not reach the threshold
                if k > 1:
                    assert not bool(curve[k - 2] >= threshold)
            assert torch.equal(sl.masks[layer], sl.category_masks[layer].any(0))


def test_semantic_slice_threshold_monotone_and_step(mlp_setup):
    *_, prof = mlp_setup
    prev = None
    for thr in (0.2, 0.5, 0.8, 0.95, 1.0):
        sl = neuslice.semantic_slice(prof, "taylor", thr, criterion="layer_cka")
        if prev is not None:
            for layer in prof.layers:
                assert bool((sl.category_masks[layer] | ~prev.category_masks[layer]).all())
        prev = sl
    base = neuslice.semantic_slice(prof, "avg", 0.8, criterion="layer_cka")
    stepped = neuslice.semantic_slice(prof, "avg", 0.8, step=3, criterion="layer_cka")
    for layer in prof.layers:
        d = prof.num_neurons[layer]
        for c in range(C):
            k = int(base.category_masks[layer][c].sum())
            ks = int(stepped.category_masks[layer][c].sum())
            assert ks == min(d, math.ceil(k / 3) * 3)
            # same ranking, longer prefix: the stepped mask contains the plain one
            assert bool((stepped.category_masks[layer][c] | ~base.category_masks[layer][c]).all())


@pytest.mark.parametrize("ratio", [0.01, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("metric", ["avg", "taylor", "deeplift"])
def test_global_and_categorywise_topk(setup, ratio, metric):
    *_, prof = setup
    g = neuslice.global_slice(prof, metric, ratio)
    cw = neuslice.categorywise_slice(prof, metric, ratio)
    assert g.category_masks is None and g.ratio == ratio and g.strategy == "global"
    for layer in prof.layers:
        d = prof.num_neurons[layer]
        k = math.ceil(ratio * d)
        s = prof.scores(layer, metric)
        assert int(g.masks[layer].sum()) == k
        # every selected neuron scores at least as high as every unselected one
        if k < d:
            assert s[g.masks[layer]].abs().min() >= s[~g.masks[layer]].abs().max()
        assert torch.equal(
            g.masks[layer], torch.zeros(d, dtype=torch.bool).index_fill_(0, _order(s)[:k], True)
        )
        rows = cw.category_masks[layer]
        assert rows.shape == (C, d)
        for c in range(C):
            assert int(rows[c].sum()) == k
            sc = prof.scores(layer, metric, c)
            assert torch.equal(
                rows[c], torch.zeros(d, dtype=torch.bool).index_fill_(0, _order(sc)[:k], True)
            )
        assert torch.equal(cw.masks[layer], rows.any(0))


def test_random_slice_matches_counts(mlp_setup):
    *_, prof = mlp_setup
    like = neuslice.semantic_slice(prof, "avg", 0.9, criterion="layer_cka")
    r1 = neuslice.random_slice(like, seed=1)
    r1b = neuslice.random_slice(like, seed=1)
    r2 = neuslice.random_slice(like, seed=2)
    assert r1.kept() == like.kept() == r2.kept()
    assert r1.fingerprint == like.fingerprint and r1.strategy == "random"
    assert r1.category_masks is None
    for layer in like.layers:
        assert torch.equal(r1.masks[layer], r1b.masks[layer])
    assert any(not torch.equal(r1.masks[l], r2.masks[l]) for l in like.layers)


@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.2, float("nan"), float("inf"), "0.5", None, True])
def test_bad_threshold_and_ratio(mlp_setup, bad):
    *_, prof = mlp_setup
    with pytest.raises(ValueError, match="threshold must be a number in \\(0, 1\\]"):
        neuslice.semantic_slice(prof, "avg", bad, criterion="layer_cka")
    with pytest.raises(ValueError, match="ratio must be a number in \\(0, 1\\]"):
        neuslice.global_slice(prof, "avg", bad)
    with pytest.raises(ValueError, match="ratio must be a number in \\(0, 1\\]"):
        neuslice.categorywise_slice(prof, "avg", bad)


def test_strategy_argument_errors(mlp_setup):
    model, *_, prof = mlp_setup
    with pytest.raises(ValueError, match="unknown metric"):
        neuslice.semantic_slice(prof, "nope", 0.9, criterion="layer_cka")
    with pytest.raises(ValueError, match="unknown metric"):
        neuslice.global_slice(prof, "nope", 0.5)
    with pytest.raises(TypeError, match="Profile"):
        neuslice.semantic_slice(model, "avg", 0.9, criterion="layer_cka")
    for step in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="step"):
            neuslice.semantic_slice(prof, "avg", 0.9, step=step, criterion="layer_cka")


def test_dead_layer_and_dead_neurons_give_notes_not_nan():
    x, y = make_data(40)
    model = make_mlp()
    with torch.no_grad():
        model.fc1.weight[:4] = 0
        model.fc1.bias[:4] = 0.5  # dead (constant) but non-zero neurons
        model.fc2.weight.zero_()  # whole layer constant
    prof = neuslice.profile(model, make_loader(x, y, 7), C, progress=False)
    assert any("fc1" in w for w in prof.warnings) and any("fc2" in w for w in prof.warnings)
    for metric in neuslice.METRICS:
        sl = neuslice.semantic_slice(prof, metric, 0.95, criterion="layer_cka")
        assert any("fc2" in n and "constant" in n for n in sl.notes), sl.notes
        assert not sl.masks["fc2"].any()
        assert sl.masks["fc1"].any()
        # dead neurons add nothing to the centred Gram matrix: ranked last (zero variance),
        # they are never needed to reach the threshold
        if metric == "var":
            assert not sl.masks["fc1"][:4].any()
        assert neuslice.global_slice(prof, metric, 0.5).kept()["fc2"] == 4
        cw = neuslice.categorywise_slice(prof, metric, 0.5)
        assert cw.category_masks["fc2"].sum(1).tolist() == [4] * C


# ----------------------------------------------------------------------------- persistence
def _big_slice():
    g = torch.Generator().manual_seed(0)
    sizes = {"fc1": 512, "fc2": 256}
    cat = {k: torch.rand(10, d, generator=g) < 0.3 for k, d in sizes.items()}
    return Slice(
        masks={k: v.any(0) for k, v in cat.items()},
        strategy="semantic",
        metric="taylor",
        fingerprint="0123456789abcdef",
        input_shape=[1, 28, 28],
        category_masks=cat,
        threshold=0.95,
        notes=["fc2: categories [9] skipped"],
    )


def _assert_same_slice(a: Slice, b: Slice):
    for f in ("strategy", "metric", "fingerprint", "input_shape", "ratio", "threshold", "notes"):
        assert getattr(a, f) == getattr(b, f), f
    assert a.layers == b.layers
    for k in a.layers:
        assert a.masks[k].dtype == b.masks[k].dtype == torch.bool
        assert torch.equal(a.masks[k], b.masks[k])
    if a.category_masks is None:
        assert b.category_masks is None
    else:
        assert a.category_masks.keys() == b.category_masks.keys()
        for k in a.category_masks:
            assert torch.equal(a.category_masks[k], b.category_masks[k])


def test_slice_round_trip_and_size(tmp_path):
    sl = _big_slice()
    path = tmp_path / "s.json"
    sl.save(path)
    size = path.stat().st_size
    assert 500 < size < 8_000, size
    _assert_same_slice(sl, Slice.load(path))
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_real_slices_round_trip(mlp_setup, tmp_path):
    model, *_, prof = mlp_setup
    sem = neuslice.semantic_slice(prof, "taylor", 0.9, criterion="layer_cka")
    for i, sl in enumerate(
        [
            sem,
            neuslice.global_slice(prof, "avg", 0.4),
            neuslice.categorywise_slice(prof, "var", 0.4),
            neuslice.random_slice(sem, 3),
        ]
    ):
        p = tmp_path / f"{i}.json"
        sl.save(p)
        back = Slice.load(p)
        _assert_same_slice(sl, back)
        assert back.compression_rate(model) == sl.compression_rate(model)


def test_corrupt_slice_files(tmp_path):
    good = tmp_path / "good.json"
    _big_slice().save(good)
    text = good.read_text()
    cases = {
        "garbage": b"\x00\xff\xfe garbage \x81" * 20,
        "truncated": text[: len(text) // 2].encode(),
        "empty": b"",
        "not_a_dict": b"[1, 2, 3]",
    }
    d = json.loads(text)
    d["format"] = "other"
    cases["wrong_format"] = json.dumps(d).encode()
    d = json.loads(text)
    d["masks"]["fc1"] = d["masks"]["fc1"][:-8]  # fewer bits than recorded
    cases["short_mask"] = json.dumps(d).encode()
    d = json.loads(text)
    d["kept"]["fc2"] = "3/256"
    cases["wrong_count"] = json.dumps(d).encode()
    d = json.loads(text)
    d["masks"]["fc1"] = "zz" + d["masks"]["fc1"][2:]
    cases["bad_hex"] = json.dumps(d).encode()
    for name, data in cases.items():
        p = tmp_path / f"{name}.json"
        p.write_bytes(data)
        with pytest.raises(ValueError, match="not a valid neuslice slice file"):
            Slice.load(p)
    with pytest.raises(FileNotFoundError):
        Slice.load(tmp_path / "missing.json")


# ------------------------------------------------------------------------ compression rate
def _hand_rate(
    model: nn.Module,
    plan: dict[str, tuple[str, ...]],
    keep: dict[str, torch.Tensor],
    cols_per_neuron: dict[str, int],
) -> float:
    """Mark every removed parameter entry once; ``plan[layer] = (own modules..., consumer)``."""
    mods = dict(model.named_modules())
    removed = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    for layer, (*own, consumer) in plan.items():
        gone = ~keep[layer]
        for name in own:
            for pn in ("weight", "bias"):
                if getattr(mods[name], pn, None) is not None:
                    removed[f"{name}.{pn}"][gone] = True
        w = cols_per_neuron[layer]
        cols = gone.repeat_interleave(w)
        removed[f"{consumer}.weight"][:, cols] = True
    total = sum(p.numel() for p in model.parameters())
    return sum(int(r.sum()) for r in removed.values()) / total


def _slice_for(model, keep, strategy="global"):
    return Slice(
        masks=keep,
        strategy=strategy,
        metric="avg",
        fingerprint=neuslice.model_fingerprint(model),
        input_shape=[],
    )


def test_compression_rate_mlp_hand_count():
    model = make_mlp(hidden=(10, 8))
    plan = {"fc1": ("fc1", "fc2"), "fc2": ("fc2", "head")}
    g = torch.Generator().manual_seed(0)
    for trial in range(6):
        keep = {"fc1": torch.rand(10, generator=g) < 0.5, "fc2": torch.rand(8, generator=g) < 0.5}
        sl = _slice_for(model, keep)
        expect = _hand_rate(model, plan, keep, {"fc1": 1, "fc2": 1})
        assert math.isclose(sl.compression_rate(model), expect, rel_tol=1e-12), trial
    # nothing removed; everything removed
    full = _slice_for(
        model, {"fc1": torch.ones(10, dtype=torch.bool), "fc2": torch.ones(8, dtype=torch.bool)}
    )
    assert full.compression_rate(model) == 0.0
    none = {"fc1": torch.zeros(10, dtype=torch.bool), "fc2": torch.zeros(8, dtype=torch.bool)}
    # every fc1/fc2 entry and all head weights go; only the head bias stays
    total = sum(p.numel() for p in model.parameters())
    assert math.isclose(
        _slice_for(model, none).compression_rate(model), (total - C) / total, rel_tol=1e-12
    )
    # a slice of fc1 only: fc2 keeps its rows, so all its columns of removed neurons go
    only = Slice(
        masks={"fc1": none["fc1"]},
        strategy="global",
        metric="avg",
        fingerprint=full.fingerprint,
        input_shape=[],
    )
    assert math.isclose(only.compression_rate(model), (10 * 13 + 8 * 10) / total)


def test_compression_rate_cnn_hand_count():
    model = make_cnn()
    plan = {
        "conv1": ("conv1", "bn1", "conv2"),
        "conv2": ("conv2", "bn2", "fc1"),
        "fc1": ("fc1", "head"),
    }
    g = torch.Generator().manual_seed(1)
    for trial in range(4):
        keep = {
            "conv1": torch.rand(4, generator=g) < 0.6,
            "conv2": torch.rand(5, generator=g) < 0.6,
            "fc1": torch.rand(6, generator=g) < 0.6,
        }
        # conv1 -> conv2: one removed input channel removes a 3x3 slice of each kept filter
        removed = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
        for layer, (*own, consumer) in plan.items():
            gone = ~keep[layer]
            for name in own:
                removed[f"{name}.weight"][gone] = True
                removed[f"{name}.bias"][gone] = True
            w = removed[f"{consumer}.weight"]
            if w.dim() == 4:
                w[:, gone] = True
            else:
                w[:, gone.repeat_interleave(w.shape[1] // gone.numel())] = True
        expect = sum(int(r.sum()) for r in removed.values()) / sum(
            p.numel() for p in model.parameters()
        )
        assert math.isclose(
            _slice_for(model, keep).compression_rate(model), expect, rel_tol=1e-12
        ), trial


def test_compression_rate_residual_skips_coupled_layers():
    model = TinyResNet()
    layers = {l.name: l for l in neuslice.find_layers(model)}
    assert layers["stem"].coupled and layers["conv2"].coupled and not layers["conv1"].coupled
    keep = {
        "stem": torch.tensor([True, False, True, False]),
        "conv1": torch.tensor([False, True, True, False]),
        "conv2": torch.tensor([False, False, True, True]),
    }
    total = sum(p.numel() for p in model.parameters())
    # only conv1's 2 removed channels count: own 2*9*4+1 +bn1 2, and conv2 input slices 4*9
    expect = 2 * (4 * 9 + 1 + 2 + 4 * 9) / total
    assert math.isclose(_slice_for(model, keep).compression_rate(model), expect)


def test_slice_on_other_model_is_rejected(mlp_setup):
    model, x, *_, prof = mlp_setup
    sl = neuslice.global_slice(prof, "avg", 0.5)
    others = [make_mlp(hidden=(10, 9)), make_cnn(), make_mlp(hidden=(10, 8), num_classes=4)]
    for other in others:
        before = copy.deepcopy(other.state_dict())
        with pytest.raises(ValueError, match="different model"):
            sl.compression_rate(other)
        with pytest.raises(ValueError, match="different model"):
            with neuslice.masked(other, sl):
                pass
        for k, v in other.state_dict().items():
            assert torch.equal(v, before[k])
        assert all(not m._forward_hooks for m in other.modules())
    # same architecture, other weights: accepted
    same = make_mlp(seed=9)
    assert sl.compression_rate(same) == sl.compression_rate(model)


# ---------------------------------------------------------------------------------- masked
def _zeroed_copy(model, keep: dict[str, torch.Tensor], zero_at: dict[str, str]):
    """Copy of the model whose non-critical neurons are removed by zeroing parameters."""
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for layer, mask in keep.items():
            target = mods[zero_at[layer]]
            target.weight[~mask] = 0
            target.bias[~mask] = 0
    return m


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_masked_equals_manually_zeroed_model(kind):
    model, (x, y), outs, _ = build(kind, seed=5)
    prof = neuslice.profile(model, make_loader(x, y, 9), C, progress=False)
    # where zeroing parameters removes the neuron: the Linear row (ReLU(0)=0) or the BN
    zero_at = {"fc1": "fc1", "fc2": "fc2", "conv1": "bn1", "conv2": "bn2"}
    model.eval()
    ref = model(x)
    for sl in (
        neuslice.global_slice(prof, "avg", 0.5),
        neuslice.semantic_slice(prof, "taylor", 0.8, criterion="layer_cka"),
    ):
        assert any(int(m.sum()) < m.numel() for m in sl.masks.values())
        manual = _zeroed_copy(model, sl.masks, zero_at).eval()
        with neuslice.masked(model, sl) as mm:
            assert mm is model
            got = model(x)
        assert torch.allclose(got, manual(x), rtol=0, atol=1e-12)
        assert not torch.allclose(got, ref)
        assert torch.equal(model(x), ref)  # hooks gone
        for c in range(C):
            cm = {l: sl.category_masks[l][c] for l in sl.layers} if sl.category_masks else None
            if cm is None:
                with pytest.raises(ValueError, match="category"):
                    with neuslice.masked(model, sl, category=c):
                        pass
                continue
            with neuslice.masked(model, sl, category=c):
                got_c = model(x)
            assert torch.allclose(got_c, _zeroed_copy(model, cm, zero_at).eval()(x), atol=1e-12)
        if sl.category_masks is not None:
            with pytest.raises(ValueError, match="category"):
                with neuslice.masked(model, sl, category=C):
                    pass


def test_masked_removes_hooks_on_exception():
    model, (x, y), *_ = build("cnn", seed=6)
    model.eval()
    prof = neuslice.profile(model, make_loader(x, y, 9), C, progress=False)
    sl = neuslice.global_slice(prof, "avg", 0.3)
    ref = model(x)
    hooks_before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    with pytest.raises(KeyError, match="boom"):
        with neuslice.masked(model, sl):
            assert not torch.equal(model(x), ref)
            raise KeyError("boom")
    assert torch.equal(model(x), ref)
    assert hooks_before == [
        (len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()
    ]
    with pytest.raises(TypeError, match="Slice"):
        with neuslice.masked(model, {"conv1": torch.ones(4, dtype=torch.bool)}):
            pass


def test_masked_keeps_gradients_flowing_and_weights_untouched(mlp_setup):
    model, x, y, outs, prof = mlp_setup
    sl = neuslice.global_slice(prof, "avg", 0.5)
    state = copy.deepcopy(model.state_dict())
    with neuslice.masked(model, sl):
        out = model(x)
        acts = outputs_of(model, list(MLP_OUT.values()), x)
    for layer, mod in MLP_OUT.items():
        assert (acts[mod][:, ~sl.masks[layer]] == 0).all()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    out.sum().backward()
    assert model.fc1.weight.grad is not None
    assert (model.fc1.weight.grad[~sl.masks["fc1"]] == 0).all()
    model.zero_grad(set_to_none=True)


def test_semantic_slice_needs_hsic():
    model, (x, y), *_ = build("mlp")
    prof = neuslice.profile(model, make_loader(x, y), C, hsic=False, progress=False)
    with pytest.raises(ValueError, match="hsic=False"):
        neuslice.semantic_slice(prof, "avg", 0.9, criterion="layer_cka")
    assert neuslice.global_slice(prof, "avg", 0.5).kept() == {"fc1": 5, "fc2": 4}


def test_random_slice_rejects_non_slices():
    with pytest.raises(TypeError, match="expects a neuslice.Slice"):
        neuslice.random_slice({"fc1": torch.ones(3, dtype=torch.bool)})


def test_short_mask_with_zero_tail_is_rejected(tmp_path):
    keep = {"fc1": torch.zeros(64, dtype=torch.bool)}
    keep["fc1"][:3] = True
    sl = Slice(masks=keep, strategy="global", metric="avg", fingerprint="x", input_shape=[])
    p = tmp_path / "s.json"
    sl.save(p)
    d = json.loads(p.read_text())
    d["masks"]["fc1"] = d["masks"]["fc1"][:2]  # dropped bytes were all zero
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="hex digits"):
        Slice.load(p)
