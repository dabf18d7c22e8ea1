"""Tests for neuslice.profile: metric definitions, neuron-HSIC, streaming, persistence, errors,
and that profiling leaves the model exactly as it was."""

from __future__ import annotations

import copy
import json
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

import neuslice
from neuslice import cka
from neuslice.profiling.profile import Profile

from conftest import (
    IN_FEATURES as IN,
    NUM_CLASSES,
    assert_same_snapshot,
    build,
    close,
    captum_deeplift,
    direct_taylor,
    make_data,
    make_loader,
    make_mlp,
    max_rel_err,
    outputs_of,
    per_sample,
    snapshot,
)

C = NUM_CLASSES


def run(model, loader, **kw):
    kw.setdefault("progress", False)
    return neuslice.profile(model, loader, C, **kw)


def category_acts(model, out_modules, x, y):
    """{layer: [acts of category c, ...]} in data order (full neuron outputs)."""
    outs = outputs_of(model, list(out_modules.values()), x)
    return {l: [outs[m][y == c] for c in range(C)] for l, m in out_modules.items()}


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def profiled(request):
    """A float64 model, its data and its profile (batch size 7, exact feature-route HSIC)."""
    model, (x, y), outs, params = build(request.param)
    loader = make_loader(x, y, 7)
    prof = run(model, loader, metrics=neuslice.ALL_METRICS, hsic_route="feature")
    return model, x, y, outs, params, loader, prof


# ------------------------------------------------------------------------ metric definitions
def test_layers_default_to_all_but_head(profiled):
    model, x, y, outs, *_, prof = profiled
    assert prof.layers == list(outs)
    assert prof.num_neurons == {l: dict(model.named_modules())[l].weight.shape[0] for l in outs}
    assert prof.counts().tolist() == torch.bincount(y, minlength=C).tolist()
    assert prof.input_shape == list(x.shape[1:])


def test_avg_var_ens_match_direct(profiled):
    model, x, y, outs, _, _, prof = profiled
    outputs = outputs_of(model, list(outs.values()), x)
    for layer, mod in outs.items():
        v = per_sample(outputs[mod])
        for c in [None] + list(range(C)):
            vc = v if c is None else v[y == c]
            avg, var = vc.mean(0), vc.var(0, unbiased=True)
            assert max_rel_err(prof.scores(layer, "avg", c), avg) < 1e-10
            assert max_rel_err(prof.scores(layer, "var", c), var) < 1e-10
            mm = lambda t: (t - t.min()) / (t.max() - t.min())  # noqa: E731
            assert max_rel_err(prof.scores(layer, "ens", c), mm(avg) + mm(var)) < 1e-10


def test_taylor_matches_parameter_gradients(profiled):
    model, x, y, outs, params, loader, prof = profiled
    per_cat, whole = direct_taylor(model, loader, params, C)
    for layer in outs:
        for c in range(C):
            ref = per_cat[layer][c]
            assert ref.abs().max() > 0
            assert max_rel_err(prof.scores(layer, "taylor", c), ref) < 1e-9, (layer, c)
        assert max_rel_err(prof.scores(layer, "taylor", None), whole[layer]) < 1e-9


def test_taylor_depends_on_minibatching_like_the_definition(profiled):
    """Taylor is a mean of squared per-batch means: a different batching changes it, and the
    direct computation with that batching follows."""
    model, x, y, outs, params, _, prof = profiled
    loader = make_loader(x, y, 11)
    other = run(model, loader, metrics=("taylor",), hsic=False)
    per_cat, _ = direct_taylor(model, loader, params, C)
    layer = next(iter(outs))
    assert max_rel_err(other.scores(layer, "taylor", 1), per_cat[layer][1]) < 1e-9
    assert max_rel_err(other.scores(layer, "taylor", 1), prof.scores(layer, "taylor", 1)) > 1e-3


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_deeplift_matches_captum_float32(kind):
    model, (x, y), outs, _ = build(kind, dtype=torch.float32, seed=1)
    prof = run(model, make_loader(x, y, 8), metrics=("deeplift",), hsic=False)
    ref = captum_deeplift(model, outs, x, y, C)
    n_c = torch.bincount(y, minlength=C).double()
    for layer in outs:
        assert ref[layer].abs().max() > 0
        for c in range(C):
            err = max_rel_err(prof.scores(layer, "deeplift", c), ref[layer][c])
            assert err <= 1e-4, (layer, c, err)
        whole = (ref[layer] * n_c.unsqueeze(1)).sum(0) / n_c.sum()
        assert max_rel_err(prof.scores(layer, "deeplift"), whole) <= 1e-4


def test_taylor_act_definition(profiled):
    """taylor_act: per-sample |sum_positions h * dCE/dh| averaged over the category."""
    model, x, y, outs, _, _, prof = profiled
    mods = dict(model.named_modules())
    m = model
    got = {}
    handles = [
        mods[o].register_forward_hook(
            lambda _m, _i, out, _l=l: (got.__setitem__(_l, out), out.retain_grad())[0]
        )
        for l, o in outs.items()
    ]
    try:
        model.eval()
        loss = nn.functional.cross_entropy(m(x), y, reduction="sum")
        loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    for layer in outs:
        h = got[layer]
        t = (h * h.grad).reshape(h.shape[0], h.shape[1], -1).sum(2).abs()
        for c in range(C):
            assert max_rel_err(prof.scores(layer, "taylor_act", c), t[y == c].mean(0)) < 1e-9


# ----------------------------------------------------------------------------- neuron HSIC
def test_feature_route_is_exact_biased_hsic(profiled):
    model, x, y, outs, _, _, prof = profiled
    acts = category_acts(model, outs, x, y)
    for layer in outs:
        assert prof.hsic_routes[layer] == "feature"
        for c in range(C):
            ref = cka.neuron_hsic(acts[layer][c], "biased")
            assert max_rel_err(prof.hsic(layer, c), ref) < 1e-10


def _chunked_unbiased(a: torch.Tensor, size: int) -> torch.Tensor:
    total, weight = 0, 0
    for s in range(0, a.shape[0], size):
        chunk = a[s : s + size]
        if chunk.shape[0] >= 4:
            total = total + cka.neuron_hsic(chunk, "unbiased") * chunk.shape[0]
            weight += chunk.shape[0]
    return total / weight


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_minibatch_route_chunks_independent_of_loader_batch(kind):
    model, _, outs, _ = build(kind)
    # 47 samples: categories of 16, 16, 15 -> with cka_batch=6 the chunks are 6,6,4 (the
    # partial chunk of 4 counts) and 6,6,3 (the chunk of 3 is dropped).
    x, y = make_data(47, "vec" if kind == "mlp" else "img")
    assert sorted(torch.bincount(y).tolist()) == [15, 16, 16]
    acts = category_acts(model, outs, x, y)
    profs = [
        run(model, make_loader(x, y, bs), metrics=("avg",), hsic_route="minibatch", cka_batch=6)
        for bs in (5, 7, 47)
    ]
    for layer in outs:
        for c in range(C):
            ref = _chunked_unbiased(acts[layer][c], 6)
            for p in profs:
                assert p.hsic_routes[layer] == "minibatch"
                assert max_rel_err(p.hsic(layer, c), ref) < 1e-10, (layer, c)
            wrong = _chunked_unbiased(acts[layer][c][:12], 6)  # partial chunk left out
            if acts[layer][c].shape[0] == 16:
                assert max_rel_err(profs[0].hsic(layer, c), wrong) > 1e-6


def test_auto_route_picks_feature_for_small_layers_and_minibatch_for_large():
    model, (x, y), outs, _ = build("cnn")
    loader = make_loader(x, y, 9)
    small = run(model, loader, metrics=("avg",))
    assert set(small.hsic_routes.values()) <= {"feature", "minibatch"}
    assert small.hsic_routes["fc1"] == "feature"
    big = run(model, loader, metrics=("avg",), max_feature_dim=4, cka_batch=4)
    assert big.hsic_routes["conv1"] == "minibatch"
    assert big.hsic(next(iter(outs)), 0) is not None


# ------------------------------------------------------------------- streaming == one batch
@pytest.mark.parametrize("route", ["feature", "minibatch"])
def test_streaming_equals_single_full_batch(route):
    for kind in ("mlp", "cnn"):
        model, (x, y), outs, _ = build(kind, seed=2)
        metrics = ("avg", "var", "ens", "deeplift", "taylor_act")
        kw = dict(metrics=metrics, hsic_route=route, cka_batch=5)
        a = run(model, make_loader(x, y, 7), **kw)
        b = run(model, make_loader(x, y, len(y)), **kw)
        for layer in outs:
            for m in metrics:
                for c in [None] + list(range(C)):
                    sa, sb = a.scores(layer, m, c), b.scores(layer, m, c)
                    assert close(sa, sb, 1e-10), (
                        kind,
                        layer,
                        m,
                        c,
                    )
            for c in range(C):
                assert max_rel_err(a.hsic(layer, c), b.hsic(layer, c)) < 1e-10


def test_profiling_ignores_train_mode_and_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(12, 10),
            bn=nn.BatchNorm1d(10),
            relu1=nn.ReLU(),
            drop=nn.Dropout(0.5),
            fc2=nn.Linear(10, 8),
            relu2=nn.ReLU(),
            head=nn.Linear(8, C),
        )
    ).double()
    x, y = make_data(45)
    loader = make_loader(x, y, 7)
    model.train()
    a = run(model, loader, metrics=("avg", "taylor", "deeplift"))
    model.eval()
    b = run(model, loader, metrics=("avg", "taylor", "deeplift"))
    for layer in ("fc1", "fc2"):
        for m in ("avg", "taylor", "deeplift"):
            assert torch.equal(a.scores(layer, m, 0), b.scores(layer, m, 0))


# --------------------------------------------------------------------------- persistence
def test_save_load_round_trip(profiled, tmp_path):
    *_, prof = profiled
    path = tmp_path / "p.neuslice"
    prof.save(path)
    back = Profile.load(path)
    for f in (
        "layers",
        "num_neurons",
        "num_classes",
        "metrics",
        "fingerprint",
        "input_shape",
        "hsic_routes",
        "warnings",
    ):
        assert getattr(back, f) == getattr(prof, f), f
    assert back.tensors.keys() == prof.tensors.keys()
    for k in prof.tensors:
        assert torch.equal(back.tensors[k], prof.tensors[k]), k
    layer = prof.layers[0]
    assert torch.equal(back.scores(layer, "ens", 1), prof.scores(layer, "ens", 1))
    assert not [p for p in tmp_path.iterdir() if p.name != "p.neuslice"]  # no temp files left


def test_corrupt_profile_files(profiled, tmp_path):
    *_, prof = profiled
    good = tmp_path / "good.pt"
    prof.save(good)
    data = good.read_bytes()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x13not a profile\xff" * 50)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    other = tmp_path / "other.pt"
    torch.save({"meta": '{"format": "something"}', "tensors": {}}, other)
    for p in (garbage, trunc, empty):
        with pytest.raises(ValueError, match="not a readable neuslice profile"):
            Profile.load(p)
    with pytest.raises(ValueError, match="not a neuslice profile"):
        Profile.load(other)
    with pytest.raises(FileNotFoundError):
        Profile.load(tmp_path / "missing.pt")


def test_load_rejects_wrong_tensor_shapes(profiled, tmp_path):
    *_, prof = profiled
    good = tmp_path / "good.pt"
    prof.save(good)
    blob = torch.load(good, weights_only=True)
    layer = prof.layers[0]
    blob["tensors"][f"{layer}.hsic"] = blob["tensors"][f"{layer}.hsic"][:, :1]
    torch.save(blob, good)
    with pytest.raises(ValueError, match="corrupt"):
        Profile.load(good)


# ------------------------------------------------------------------------------ bad input
class _OnlyInputs:
    def __init__(self, x):
        self.x = x

    def __iter__(self):
        yield self.x[:5]


def _bad_cases(x, y):
    float_y = y.double()
    big = y.clone()
    big[3] = C
    neg = y.clone()
    neg[0] = -1
    return {
        "unknown_layer": (
            dict(loader=make_loader(x, y), layers=["nope"]),
            ValueError,
            r"unknown layer name.*nope",
        ),
        "not_sliceable": (
            dict(loader=make_loader(x, y), layers=["relu1"]),
            ValueError,
            "not nn.Linear/nn.Conv2d",
        ),
        "only_inputs": (dict(loader=_OnlyInputs(x)), TypeError, r"\(inputs, labels\)"),
        "only_inputs_dataset": (
            dict(
                loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=5)
            ),
            TypeError,
            r"\(inputs, labels\)",
        ),
        "label_too_big": (dict(loader=make_loader(x, big)), ValueError, r"\[0, 3\)"),
        "label_negative": (dict(loader=make_loader(x, neg)), ValueError, r"\[0, 3\)"),
        "float_labels": (dict(loader=make_loader(x, float_y)), ValueError, "integer"),
        "unknown_metric": (
            dict(loader=make_loader(x, y), metrics=("avg", "bogus")),
            ValueError,
            "unknown metric.*bogus",
        ),
        "empty_loader": (dict(loader=[]), ValueError, "no samples"),
        "bad_route": (dict(loader=make_loader(x, y), hsic_route="exact"), ValueError, "hsic_route"),
        "bad_cka_batch": (dict(loader=make_loader(x, y), cka_batch=3), ValueError, "cka_batch"),
    }


@pytest.mark.parametrize("case", list(_bad_cases(*make_data(20))))
def test_bad_input_raises_and_leaves_model_unchanged(case):
    x, y = make_data(20)
    kw, exc, match = _bad_cases(x, y)[case]
    model = make_mlp()
    model.train()
    before = snapshot(model)
    loader = kw.pop("loader")
    with pytest.raises(exc, match=match):
        neuslice.profile(model, loader, C, progress=False, **kw)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("nc", [0, -1, 2.0, True])
def test_bad_num_classes(nc):
    x, y = make_data(20)
    with pytest.raises(ValueError, match="num_classes"):
        neuslice.profile(make_mlp(), make_loader(x, y), nc, progress=False)


def test_not_a_model():
    x, y = make_data(20)
    with pytest.raises(TypeError, match="nn.Module"):
        neuslice.profile(lambda t: t, make_loader(x, y), C, progress=False)


@pytest.mark.parametrize("layer", ["fc1", "fc2"])
def test_nan_activation_names_the_layer(layer):
    x, y = make_data(20)
    model = make_mlp()
    with torch.no_grad():
        getattr(model, layer).weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"layer '{layer}'.*NaN"):
        neuslice.profile(model, make_loader(x, y), C, progress=False)
    assert_same_snapshot(before, snapshot(model))


def test_inf_input_raises():
    x, y = make_data(20)
    x[12, 0] = float("inf")
    with pytest.raises(ValueError, match="layer 'fc1'.*NaN/Inf"):
        neuslice.profile(make_mlp(), make_loader(x, y), C, progress=False)


def test_scores_and_hsic_queries_validate(profiled):
    *_, prof = profiled
    layer = prof.layers[0]
    with pytest.raises(ValueError, match="unknown metric"):
        prof.scores(layer, "bogus")
    with pytest.raises(ValueError, match="not in this profile"):
        prof.scores("nope", "avg")
    for c in (-1, C):
        with pytest.raises(ValueError, match="category"):
            prof.scores(layer, "avg", c)
        with pytest.raises(ValueError, match="category"):
            prof.hsic(layer, c)
    model, (x, y), *_ = build("mlp")
    only_avg = run(model, make_loader(x, y), metrics=("avg",), hsic=False)
    with pytest.raises(ValueError, match="not profiled"):
        only_avg.scores("fc1", "taylor")
    with pytest.raises(ValueError, match="not profiled"):
        only_avg.scores("fc1", "ens")


# ----------------------------------------------------------------- small / dead categories
@pytest.mark.parametrize("route,small", [("minibatch", 3), ("feature", 1)])
def test_small_category_is_warned_not_fatal(route, small):
    x, y = make_data(40)
    y = y.clone()
    idx = (y == 2).nonzero().flatten()
    y[idx[small:]] = 0  # category 2 keeps `small` samples
    prof = run(make_mlp(), make_loader(x, y, 7), hsic_route=route, cka_batch=8)
    assert prof.counts()[2] == small
    assert any("categories [2]" in w for w in prof.warnings), prof.warnings
    for layer in prof.layers:
        assert prof.hsic(layer, 2) is None
        assert prof.hsic(layer, 0) is not None
        for m in neuslice.METRICS:
            for c in (None, 2):
                assert torch.isfinite(prof.scores(layer, m, c)).all(), (layer, m, c)
    sl = neuslice.semantic_slice(prof, "avg", 0.9, criterion="layer_cka")
    assert any("[2]" in n and "skipped" in n for n in sl.notes), sl.notes
    assert not sl.category_masks["fc1"][2].any()


def test_absent_category_is_harmless():
    x, y = make_data(40)
    y = torch.where(y == 2, torch.zeros_like(y), y)
    prof = run(make_mlp(), make_loader(x, y, 7))
    assert prof.counts()[2] == 0
    for layer in prof.layers:
        for m in neuslice.METRICS:
            assert torch.isfinite(prof.scores(layer, m, 2)).all()
            assert torch.isfinite(prof.scores(layer, m)).all()
    assert any("[2]" in w for w in prof.warnings)


def test_dead_neurons_are_warned_and_finite():
    x, y = make_data(40)
    model = make_mlp()
    with torch.no_grad():
        model.fc1.weight[:3] = 0
        model.fc1.bias[:3] = 0
    prof = run(model, make_loader(x, y, 7))
    assert any("fc1" in w and "dead" in w for w in prof.warnings), prof.warnings
    for m in neuslice.METRICS:
        for c in (None, 0, 1, 2):
            s = prof.scores("fc1", m, c)
            assert torch.isfinite(s).all(), (m, c)
            if m in ("avg", "var", "taylor", "deeplift"):
                assert (s[:3] == 0).all(), (m, c)
    for c in range(C):
        assert torch.isfinite(prof.hsic("fc1", c)).all()
        assert (prof.hsic("fc1", c)[:3] == 0).all()


# -------------------------------------------------------------- the model is left untouched
def _state_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(2, 4, 3, padding=1),
            bn1=nn.BatchNorm2d(4),
            relu1=nn.ReLU(),
            drop1=nn.Dropout2d(0.3),
            conv2=nn.Conv2d(4, 5, 3, stride=2, padding=1),
            bn2=nn.BatchNorm2d(5),
            relu2=nn.ReLU(inplace=True),
            flatten=nn.Flatten(),
            fc1=nn.Linear(45, 6),
            bn3=nn.BatchNorm1d(6),
            relu3=nn.ReLU(),
            drop2=nn.Dropout(0.5),
            head=nn.Linear(6, C),
        )
    ).double()
    model.train()
    model.bn2.eval()  # some modules individually in eval mode
    model.drop2.eval()
    model.conv1.weight.grad = torch.randn_like(model.conv1.weight)  # an existing grad
    model.fc1.bias.requires_grad_(False)  # a frozen parameter
    with torch.no_grad():
        model.bn1.running_mean.add_(0.1)
    return model


class _NaNAt:
    """Batches of the loader; batch `at` carries a NaN input."""

    def __init__(self, x, y, at):
        self.x, self.y, self.at = x, y, at

    def __iter__(self):
        for i, s in enumerate(range(0, len(self.y), 6)):
            xb = self.x[s : s + 6].clone()
            if i == self.at:
                xb[0, 0, 0, 0] = float("nan")
            yield xb, self.y[s : s + 6]


class _Explode:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        yield self.x[:6], self.y[:6]
        yield self.x[6:12], self.y[6:12]
        raise RuntimeError("disk on fire")


@pytest.mark.parametrize("outcome", ["success", "nan_in_batch_3", "loader_error"])
def test_profile_leaves_model_exactly_as_it_was(outcome):
    model = _state_model()
    x, y = make_data(30, "img")
    before = snapshot(model)
    if outcome == "success":
        prof = neuslice.profile(model, make_loader(x, y, 6), C, progress=False)
        assert prof.layers == ["conv1", "conv2", "fc1"]
    elif outcome == "nan_in_batch_3":
        with pytest.raises(ValueError, match="layer 'conv1'"):
            neuslice.profile(model, _NaNAt(x, y, 3), C, progress=False)
    else:
        with pytest.raises(RuntimeError, match="disk on fire"):
            neuslice.profile(model, _Explode(x, y), C, progress=False)
    assert_same_snapshot(before, snapshot(model))
    # no hooks left behind
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


def test_profile_with_device_argument_uses_model_in_place_semantics():
    model, (x, y), *_ = build("mlp")
    a = run(model, make_loader(x, y), device="cpu", metrics=("avg",), hsic=False)
    b = run(model, make_loader(x, y), metrics=("avg",), hsic=False)
    assert torch.equal(a.scores("fc1", "avg"), b.scores("fc1", "avg"))
    assert math.isclose(float(a.counts().sum()), len(y))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_any_integer_label_dtype(dtype):
    model, (x, y), *_ = build("mlp")
    a = run(model, make_loader(x, y, 7))
    b = run(model, make_loader(x, y.to(dtype), 7))
    for layer in a.layers:
        for m in neuslice.METRICS:
            assert torch.equal(a.scores(layer, m, 1), b.scores(layer, m, 1)), m
        assert torch.equal(a.hsic(layer, 1), b.hsic(layer, 1))


@pytest.mark.parametrize("metric", ["taylor", "deeplift"])
def test_too_few_logits_is_a_clear_error(metric):
    x, y = make_data(20)
    model = make_mlp(num_classes=2)  # labels go up to 2
    before = snapshot(model)
    with pytest.raises(ValueError, match="logits of shape"):
        neuslice.profile(model, make_loader(x, y), C, metrics=(metric,), progress=False)
    assert_same_snapshot(before, snapshot(model))


def test_load_rejects_incomplete_metadata(profiled, tmp_path):
    *_, prof = profiled
    good = tmp_path / "good.pt"
    prof.save(good)
    blob = torch.load(good, weights_only=True)
    meta = json.loads(blob["meta"])
    for broken in (
        {k: v for k, v in meta.items() if k != "layers"},
        {**meta, "num_neurons": {}},
        [1, 2],
    ):
        p = tmp_path / "broken.pt"
        torch.save({"meta": json.dumps(broken), "tensors": blob["tensors"]}, p)
        with pytest.raises(ValueError, match="corrupt|not a readable"):
            Profile.load(p)
    p = tmp_path / "no_tensors.pt"
    torch.save({"meta": blob["meta"], "tensors": [1]}, p)
    with pytest.raises(ValueError, match="not a readable"):
        Profile.load(p)


def test_progress_bar_and_repr(capsys):
    model, (x, y), *_ = build("mlp")
    prof = neuslice.profile(model, make_loader(x, y), C, metrics=("avg",), progress=True)
    assert "samples=45" in repr(prof)


def test_swapped_submodule_is_profiled_not_the_old_one():
    """A submodule replaced by one of the same type and shape (same fingerprint) between two
    calls must be the one profiled and masked."""
    x, y = make_data(30)
    model = make_mlp()
    run(model, make_loader(x, y), metrics=("taylor", "avg"))
    model.fc1 = nn.Linear(IN, 10).double()
    model.relu1 = nn.ReLU()
    again = run(model, make_loader(x, y), metrics=("taylor", "avg"))
    fresh = run(copy.deepcopy(model), make_loader(x, y), metrics=("taylor", "avg"))
    for m in ("taylor", "avg"):
        assert torch.equal(again.scores("fc1", m), fresh.scores("fc1", m))
    sl = neuslice.global_slice(again, "avg", 0.3)
    model.eval()
    ref = model(x)
    with neuslice.masked(model, sl):
        assert not torch.equal(model(x), ref)


def test_profile_tensors_are_plain_data():
    """No statistic carries an autograd graph (e.g. the DeepLIFT baseline's outputs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    loader = [(torch.randn(16, 4), torch.arange(16) % 2)]
    prof = neuslice.profile(model, loader, 2, metrics=neuslice.ALL_METRICS, progress=False)
    assert [k for k, t in prof.tensors.items() if t.requires_grad] == []


@pytest.mark.parametrize(
    "bad", [dict(metrics=None), dict(metrics=()), dict(backend="bogus"), dict(cka_batch=2)]
)
def test_profile_config_refuses_bad_fields(bad):
    with pytest.raises((ValueError, TypeError)):
        neuslice.ProfileConfig(**bad)


@pytest.mark.parametrize("batch_size", [0, -5, 2.5, True])
def test_memory_estimate_refuses_a_bad_batch_size(batch_size):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        neuslice.estimate_profile_memory(model, torch.randn(2, 4), 2, batch_size=batch_size)


# -------------------------------------------- outputs the model changes in place (no copies)
class _Residual(nn.Module):
    """conv -> bn -> relu -> conv -> bn, ``+=`` the input, relu; ``inplace`` picks in-place
    (``ReLU(inplace=True)``, ``out += x``) or out-of-place versions of the same computation."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 16, C)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.inplace:
            out += x
        else:
            out = out + x
        out = self.relu(out)
        return self.head(out.flatten(1))


@pytest.mark.parametrize("probed", [True, False])
def test_outputs_changed_in_place_are_copied(probed, monkeypatch):
    """Found by the one-sample probe before the pass, or else (``probed=False``) on the first
    batch, which then runs again: the results equal the out-of-place model's either way."""
    if not probed:
        from neuslice.profiling import planning, profile as profile_mod

        monkeypatch.setattr(profile_mod, "layer_shapes", lambda *a: planning.layer_shapes(*a[:5]))
    torch.manual_seed(0)
    plain = _Residual(inplace=False).double().eval()
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    inplace = copy.deepcopy(plain)
    inplace.inplace, inplace.relu.inplace = True, True
    x = torch.randn(40, 3, 4, 4, dtype=torch.float64)
    y = torch.arange(40) % C
    loader = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]
    kw = dict(metrics=neuslice.ALL_METRICS, cka_batch=4)
    want = run(plain, loader, **kw)
    got = run(inplace, loader, **kw)
    assert set(got.tensors) == set(want.tensors)
    for k, v in want.tensors.items():
        assert torch.equal(got.tensors[k], v), k
