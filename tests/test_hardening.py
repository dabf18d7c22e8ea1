"""Issue #14: compiled models, concurrent use, functional activations, coupling of global
reductions, real-world restructure cases, frozen models, non-tensor outputs, files, clipping."""

from __future__ import annotations

import copy
import json
import os
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import neuslice
from neuslice._utils.in_use import exclusive
from neuslice._utils.io import atomic_write
from neuslice._utils.wrappers import unwrap_model
from neuslice.runtime import checkpoint as ckpt

DATA = os.path.join(os.path.dirname(__file__), "data", "v0_1")
tp = pytest.importorskip("torch_pruning")


def _mlp(seed=0, act=nn.ReLU):
    torch.manual_seed(seed)
    return (
        nn.Sequential(nn.Linear(6, 8), act(), nn.Linear(8, 7), act(), nn.Linear(7, 3))
        .double()
        .eval()
    )


def _loader(n=36, shape=(6,), seed=1, bs=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    return DataLoader(TensorDataset(x, torch.arange(n) % 3), batch_size=bs)


def _slice(model, input_shape, pattern=lambda d: torch.arange(d) % 3 != 1):
    masks = {l.name: pattern(l.num_neurons) for l in neuslice.find_layers(model)}
    return neuslice.Slice(
        masks=masks,
        strategy="global",
        metric="avg",
        fingerprint=neuslice.model_fingerprint(model),
        input_shape=list(input_shape),
    )


def _state(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [(p.requires_grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
    )


def _assert_same_state(model, before):
    sd, modes, flags = before
    now = _state(model)
    assert sd.keys() == now[0].keys()
    for k in sd:
        assert torch.equal(sd[k], now[0][k]), k
    assert modes == now[1]
    for (rg, g), (rg2, g2) in zip(flags, now[2]):
        assert rg == rg2 and (g is None) == (g2 is None)
        if g is not None:
            assert torch.equal(g, g2)


def _n(model):
    return sum(p.numel() for p in model.parameters())


def _check_restructure(model, sl, x):
    small, eff = neuslice.restructure(model, sl, x[:2], return_slice=True)
    with torch.no_grad(), neuslice.masked(model, eff):
        ref = model(x)
    torch.testing.assert_close(small(x).detach(), ref)
    return small, eff


# ------------------------------------------------------------------ 1. compiled models
@pytest.mark.parametrize("wrap", ["compile", "dataparallel_compiled", "dataparallel"])
def test_wrapped_model_gives_the_plain_results(wrap):
    model = _mlp()
    if wrap == "dataparallel":
        wrapped = nn.DataParallel(model)
    else:
        wrapped = torch.compile(model, backend="eager")
        if wrap == "dataparallel_compiled":
            wrapped = nn.DataParallel(wrapped)
    assert unwrap_model(wrapped) is model
    loader = _loader()
    x = next(iter(loader))[0]
    with torch.no_grad():
        wrapped(x)  # compiled code exists before anything is hooked
    assert neuslice.model_fingerprint(wrapped) == neuslice.model_fingerprint(model)
    before = _state(model)
    p_plain = neuslice.profile(model, loader, 3, metrics=["avg", "taylor"], progress=False)
    p_wrap = neuslice.profile(wrapped, loader, 3, metrics=["avg", "taylor"], progress=False)
    _assert_same_state(model, before)
    for layer in p_plain.layers:
        for metric in ("avg", "taylor"):
            s = p_wrap.scores(layer, metric)
            assert bool(s.abs().sum() > 0)
            torch.testing.assert_close(s, p_plain.scores(layer, metric))
    sl = neuslice.global_slice(p_plain, "taylor", 0.5)
    with torch.no_grad():
        with neuslice.masked(model, sl):
            ref = model(x)
        with neuslice.masked(wrapped, sl):
            got = wrapped(x)
        full = wrapped(x)  # the compiled path is back after the block
    torch.testing.assert_close(got, ref)
    assert not torch.allclose(full, ref)
    assert sl.compression_rate(wrapped) == sl.compression_rate(model)
    small = neuslice.restructure(wrapped, sl, x[:2])
    assert type(small) is nn.Sequential  # the restructured plain module
    torch.testing.assert_close(small(x).detach(), ref)


def test_masked_optimizer_on_a_compiled_model_freezes_like_on_the_plain_one():
    model = _mlp()
    compiled = torch.compile(model, backend="eager")
    sl = _slice(model, [6])
    x, y = next(iter(_loader()))
    for m in (model, compiled):
        opt = neuslice.MaskedOptimizer(torch.optim.SGD(m.parameters(), lr=0.5), m, sl)
        before = model[0].weight.detach().clone()
        F.cross_entropy(m(x), y).backward()
        opt.step()
        opt.zero_grad()
        frozen = ~sl.masks["0"]
        assert torch.equal(model[0].weight[frozen], before[frozen])
        assert not torch.equal(model[0].weight[~frozen], before[~frozen])
    assert neuslice.trainable_fraction(compiled, sl) == neuslice.trainable_fraction(model, sl)


# ------------------------------------------------------------------ 2. concurrent use
@pytest.mark.parametrize("second", ["profile", "masked", "restructure", "recalibrate"])
def test_a_second_thread_is_refused_while_a_model_is_in_use(second):
    model = _mlp()
    sl = _slice(model, [6])
    loader = _loader()
    before = _state(model)
    entered, release, errors = threading.Event(), threading.Event(), []

    def holder():
        with neuslice.masked(model, sl):
            entered.set()
            release.wait(30)

    def other():
        try:
            if second == "profile":
                neuslice.profile(model, loader, 3, progress=False)
            elif second == "masked":
                with neuslice.masked(torch.compile(model, backend="eager"), sl):
                    pass
            elif second == "restructure":
                neuslice.restructure(model, sl)
            else:
                neuslice.recalibrate_batchnorm(model, sl, loader, progress=False)
        except RuntimeError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=holder)
    t.start()
    assert entered.wait(30)
    t2 = threading.Thread(target=other)
    t2.start()
    t2.join(60)
    release.set()
    t.join(30)
    assert len(errors) == 1 and "neuslice.masked" in errors[0] and "another thread" in errors[0]
    _assert_same_state(model, before)
    # free again once the holder is done; nesting in one thread is allowed
    with neuslice.masked(model, sl), exclusive(model, "test"):
        neuslice.profile(model, loader, 3, metrics=["avg"], hsic=False, progress=False)
    _assert_same_state(model, before)


def test_concurrent_profiles_of_one_model_never_give_a_wrong_result():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    model.train()
    loader = _loader(n=48)
    ref = neuslice.profile(
        copy.deepcopy(model), loader, 3, metrics=["avg", "taylor"], progress=False
    )
    before = _state(model)
    results, refused = [], []

    def run():
        try:
            results.append(
                neuslice.profile(model, loader, 3, metrics=["avg", "taylor"], progress=False)
            )
        except RuntimeError as exc:
            refused.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) + len(refused) == 4 and results
    for p in results:
        for metric in ("avg", "taylor"):
            torch.testing.assert_close(p.scores("0", metric), ref.scores("0", metric))
    _assert_same_state(model, before)


# ---------------------------------------------- 3. functional activations with f(0) != 0
class _FunctionalAct(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act = act
        self.a, self.b, self.c = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.c(self.act(self.b(self.act(self.a(x)))))


@pytest.mark.parametrize(
    "act",
    [
        torch.sigmoid,
        F.sigmoid,
        F.softplus,
        lambda t: F.softplus(t, beta=2.0),
        F.hardsigmoid,
        lambda t: t.sigmoid(),
        lambda t: F.relu(torch.sigmoid(t)),
    ],
)
def test_masking_after_a_functional_activation_equals_removal(act):
    torch.manual_seed(0)
    model = _FunctionalAct(act).double().eval()
    assert all(l.mask_fill == float("-inf") for l in neuslice.find_layers(model))
    x = torch.randn(9, 5, dtype=torch.float64)
    sl = _slice(model, [5])
    _, eff = _check_restructure(model, sl, x)
    assert all(torch.equal(eff.masks[k], sl.masks[k]) for k in sl.masks)
    # the next layer sees exactly 0 from a masked neuron, not act(0)
    seen = {}
    h = model.b.register_forward_hook(lambda _m, i, _o: seen.setdefault("in", i[0].detach()))
    with torch.no_grad(), neuslice.masked(model, sl):
        model(x)
    h.remove()
    assert bool((seen["in"][:, ~sl.masks["a"]] == 0).all())


def test_an_activation_chain_that_cannot_be_masked_exactly_is_reported():
    torch.manual_seed(0)
    model = _FunctionalAct(lambda t: torch.sigmoid(F.relu(t))).double()
    with pytest.warns(RuntimeWarning, match="not the same as removing"):
        layers = neuslice.find_layers(model)
    assert all(l.mask_fill == 0 for l in layers)


# -------------------------------- 4. reported compression rate == what restructure removes
class _Pooled(nn.Module):
    def __init__(self, reduce):
        super().__init__()
        self.reduce = reduce
        self.c1, self.bn = nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.fc = nn.Conv2d(6, 5, 3, padding=1), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        return self.fc(self.reduce(torch.relu(self.c2(h))))


class _Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.up(torch.relu(self.c1(x)))).mean((2, 3)))


@pytest.mark.parametrize(
    "make",
    [
        lambda: _Pooled(lambda h: h.mean((2, 3))),
        lambda: _Pooled(lambda h: torch.amax(h, dim=(2, 3))),
        lambda: _Pooled(lambda h: h.amax((-1, -2), keepdim=True).flatten(1)),
        lambda: _Pooled(lambda h: torch.sum(h, (2, 3))),
        lambda: _Pooled(lambda h: h.mean(dim=[3]).amax(2)),
        _Transposed,
    ],
)
def test_reported_compression_rate_equals_the_removed_fraction(make):
    torch.manual_seed(0)
    model = make().double().eval()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    sl = _slice(model, [2, 6, 6])
    small, eff = _check_restructure(model, sl, x)
    removed = 1 - _n(small) / _n(model)
    assert removed > 0.3
    assert eff.compression_rate(model) == pytest.approx(removed, rel=1e-12, abs=0)


def test_a_reduction_over_the_neuron_axis_stays_coupled():
    model = _Pooled(lambda h: h.mean(1, keepdim=True).flatten(1).repeat(1, 5))
    assert neuslice.find_layers(model)[-1].coupled


# ------------------------------------------------------------------ 5. restructure cases
def test_restructure_with_a_frozen_first_layer_keeps_it_frozen():
    model = _mlp()
    model[0].requires_grad_(False)
    x = torch.randn(5, 6, dtype=torch.float64)
    small, _ = _check_restructure(model, _slice(model, [6]), x)
    assert small[0].weight.shape[0] < 8
    assert [p.requires_grad for p in small.parameters()] == [False, False, True, True, True, True]
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True, True, True]


class _Tied(nn.Module):
    def __init__(self, untouched: bool):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.emb = nn.Linear(3, 3)
        if untouched:  # a tie no removal touches
            self.head2 = nn.Linear(3, 3)
            self.head2.weight = self.emb.weight
        else:
            self.b.weight = self.a.weight

    def forward(self, x):
        out = self.head(torch.relu(self.b(torch.relu(self.a(x)))))
        if hasattr(self, "head2"):
            out = self.head2(self.emb(out))
        return out


def test_restructure_refuses_to_untie_weights_and_keeps_untouched_ties():
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.manual_seed(0)
    model = _Tied(untouched=False).double().eval()
    with pytest.raises(ValueError, match="untie the shared parameters.*a.weight"):
        neuslice.restructure(model, _slice(model, [8]), x[:2])
    torch.manual_seed(0)
    model = _Tied(untouched=True).double().eval()
    sl = _slice(model, [8])
    sl.masks = {k: v for k, v in sl.masks.items() if k in ("a", "b")}
    sl = neuslice.Slice(
        masks=sl.masks, strategy="global", metric="avg", fingerprint=sl.fingerprint, input_shape=[8]
    )
    small, _ = _check_restructure(model, sl, x)
    assert small.head2.weight is small.emb.weight and small.a.weight.shape[0] < 8


def test_restructure_refuses_a_recurrent_consumer_clearly():
    class GRUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.gru, self.head = (
                nn.Linear(5, 6),
                nn.GRU(6, 4, batch_first=True),
                nn.Linear(4, 3),
            )

        def forward(self, x):
            h, _ = self.gru(torch.relu(self.fc(x)))
            return self.head(h[:, -1])

    model = GRUNet().eval()
    sl = _slice(model, [7, 5])
    with pytest.raises(ValueError, match="cannot follow the channels of layer 'fc'.*GRU"):
        neuslice.restructure(model, sl, torch.randn(2, 7, 5))


@pytest.mark.parametrize("keep", [[0, 1, 2, 3, 4, 5], [0, 4], [1, 2, 3, 4, 5, 6, 7]])
@pytest.mark.parametrize("which", ["c1", "g", "both"])
def test_restructure_next_to_a_grouped_convolution_equals_masking(keep, which):
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(2, 8, 3, padding=1)
            self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.c3, self.head = nn.Conv2d(8, 4, 1), nn.Linear(4, 3)

        def forward(self, x):
            h = torch.relu(self.g(torch.relu(self.c1(x))))
            return self.head(torch.relu(self.c3(h)).mean((2, 3)))

    torch.manual_seed(0)
    model = Grouped().double().eval()
    masks = {
        l.name: torch.ones(l.num_neurons, dtype=torch.bool) for l in neuslice.find_layers(model)
    }
    for n in ["c1", "g"] if which == "both" else [which]:
        masks[n] = torch.zeros(8, dtype=torch.bool)
        masks[n][keep] = True
    sl = neuslice.Slice(
        masks=masks,
        strategy="global",
        metric="avg",
        fingerprint=neuslice.model_fingerprint(model),
        input_shape=[2, 6, 6],
    )
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    small, eff = _check_restructure(model, sl, x)
    assert _n(small) == _n(model) and bool(eff.masks["c1"].all() and eff.masks["g"].all())
    assert eff.compression_rate(model) == 0


# ------------------------------------------------------------------ 6. frozen models
class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.fc, self.bn, self.fc2 = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, t):
        h = torch.relu(self.bn(self.fc(self.emb(t).mean(1))))
        return self.head(torch.relu(self.fc2(h)))


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: _Tokens(), torch.randint(0, 20, (30, 5))),
        (lambda: _mlp(), torch.randn(30, 6, dtype=torch.float64)),
    ],
)
def test_a_fully_frozen_model_profiles_like_the_trainable_one(make, x):
    torch.manual_seed(0)
    model = make().double().eval()
    loader = DataLoader(TensorDataset(x, torch.arange(30) % 3), batch_size=10)
    metrics = ["taylor", "taylor_act", "deeplift", "avg"]
    ref = neuslice.profile(model, loader, 3, metrics=metrics, progress=False)
    frozen = copy.deepcopy(model).requires_grad_(False)
    last = list(frozen.parameters())[-1]
    last.grad = torch.ones_like(last)  # a gradient the user left there stays as it was
    before = _state(frozen)
    got = neuslice.profile(frozen, loader, 3, metrics=metrics, progress=False)
    _assert_same_state(frozen, before)
    for layer in ref.layers:
        for metric in metrics:
            s = got.scores(layer, metric)
            assert bool(torch.isfinite(s).all())
            torch.testing.assert_close(s, ref.scores(layer, metric))
        assert bool(got.scores(layer, "taylor").abs().sum() > 0)


# ------------------------------------------------------------------ 7. non-tensor outputs
class _Outputs(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.fc, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        z = self.head(torch.relu(self.fc(x)))
        if self.kind == "dict":
            return {"logits": z, "hidden": x}
        return z, x.sum()


@pytest.mark.parametrize("kind, fn", [("dict", lambda o: o["logits"]), ("tuple", lambda o: o[0])])
def test_output_fn_picks_the_logits(kind, fn):
    torch.manual_seed(0)
    model = _Outputs(kind).double()
    plain = nn.Sequential(model.fc, nn.ReLU(), model.head)
    loader = _loader()
    metrics = ["taylor", "deeplift"]
    with pytest.raises(TypeError, match=f"returned a {kind}.*output_fn"):
        neuslice.profile(model, loader, 3, metrics=metrics, progress=False)
    got = neuslice.profile(model, loader, 3, metrics=metrics, progress=False, output_fn=fn)
    ref = neuslice.profile(plain, loader, 3, metrics=metrics, progress=False)
    for metric in metrics:
        torch.testing.assert_close(got.scores("fc", metric), ref.scores("0", metric))
    with pytest.raises(TypeError, match="output_fn must be a callable"):
        neuslice.profile(model, loader, 3, progress=False, output_fn="logits")
    assert (
        "output_fn"
        not in neuslice.profiling.config.PassConfig.bind(
            neuslice.profiling.config.ProfileConfig(output_fn=fn), 3
        ).key()
    )


# ------------------------------------------------------------------ 8. files
def test_files_of_the_previous_version_still_load():
    assert neuslice.Slice.load(os.path.join(DATA, "slice.json")).layers == ["0", "4"]
    assert neuslice.Profile.load(os.path.join(DATA, "profile.pt")).layers == ["0", "4"]
    assert "checksum" not in ckpt.load(os.path.join(DATA, "run.ckpt"))


def _edit_json(src, dst, edit):
    with open(src) as f:
        d = json.load(f)
    edit(d)
    with open(dst, "w") as f:
        json.dump(d, f)


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda d: d["category_masks"]["0"].__setitem__(0, "f0"), "category_masks"),
        (lambda d: d["masks"].pop("4"), "masks"),
        (
            lambda d: (d["masks"].pop("4"), d["kept"].pop("4"), d["sizes"].pop("4")),
            "category_masks",
        ),
        (_set("input_shape", [1, -8, 8]), "input_shape"),
        (_set("input_shape", "1x8x8"), "input_shape"),
        (_set("threshold", float("nan")), "threshold"),
        (lambda d: d["kept"].__setitem__("0", "3/4"), "kept"),
        (_set("notes", "x"), "notes"),
    ],
)
def test_edited_slice_files_are_refused(tmp_path, edit, field):
    path = tmp_path / "edited.json"
    _edit_json(os.path.join(DATA, "slice.json"), path, edit)  # no checksum: every field checked
    with pytest.raises(ValueError, match=f"edited.json.*'{field}'"):
        neuslice.Slice.load(path)


def test_the_checksum_detects_an_otherwise_valid_edit(tmp_path):
    sl = neuslice.Slice.load(os.path.join(DATA, "slice.json"))
    sl.save(tmp_path / "s.json")
    assert neuslice.Slice.load(tmp_path / "s.json").kept() == sl.kept()
    _edit_json(tmp_path / "s.json", tmp_path / "t.json", _set("fingerprint", "0123456789abcdef"))
    with pytest.raises(ValueError, match="t.json.*'checksum'"):
        neuslice.Slice.load(tmp_path / "t.json")

    prof = neuslice.Profile.load(os.path.join(DATA, "profile.pt"))
    prof.save(tmp_path / "p.pt")
    blob = torch.load(tmp_path / "p.pt", weights_only=True)
    assert "checksum" in blob
    blob["tensors"]["0.mean"][0, 0] += 1.0
    torch.save(blob, tmp_path / "q.pt")
    with pytest.raises(ValueError, match="q.pt.*'checksum'"):
        neuslice.Profile.load(tmp_path / "q.pt")

    payload = {
        k: v
        for k, v in ckpt.load(os.path.join(DATA, "run.ckpt")).items()
        if k not in ("format", "version")
    }
    assert ckpt.save(str(tmp_path / "r.ckpt"), payload)
    blob = torch.load(tmp_path / "r.ckpt", weights_only=True)
    blob["batches"] += 1
    torch.save(blob, tmp_path / "s.ckpt")
    with pytest.raises(ValueError, match="s.ckpt.*'checksum'"):
        ckpt.load(tmp_path / "s.ckpt")


@pytest.mark.parametrize(
    "key, value, field",
    [
        ("0.mean", float("nan"), "0.mean"),
        ("4.m2", float("inf"), "4.m2"),
        ("0.taylor", -1.0, "0.taylor"),
        ("0.count", -3.0, "0.count"),
    ],
)
def test_profiles_with_bad_statistics_are_refused(tmp_path, key, value, field):
    blob = torch.load(os.path.join(DATA, "profile.pt"), weights_only=True)
    t = blob["tensors"][key]
    t.view(-1)[0] = value
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=f"bad.pt.*tensors\\['{field}'\\]"):
        neuslice.Profile.load(tmp_path / "bad.pt")


def test_profile_metadata_is_checked(tmp_path):
    blob = torch.load(os.path.join(DATA, "profile.pt"), weights_only=True)
    meta = json.loads(blob["meta"])
    meta["input_shape"] = [1, 0, 8]
    blob["meta"] = json.dumps(meta)
    torch.save(blob, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="m.pt.*'input_shape'"):
        neuslice.Profile.load(tmp_path / "m.pt")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002, 0o027])
def test_saved_files_follow_the_umask(tmp_path, umask):
    sl = neuslice.Slice.load(os.path.join(DATA, "slice.json"))
    prof = neuslice.Profile.load(os.path.join(DATA, "profile.pt"))
    old = os.umask(umask)
    try:
        existing = tmp_path / "old.json"
        existing.write_text("{}")
        os.chmod(existing, 0o644)
        sl.save(existing)
        sl.save(tmp_path / "new.json")
        prof.save(tmp_path / "p.pt")
        atomic_write(tmp_path / "raw", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    for name in ("old.json", "new.json", "p.pt", "raw"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name


# ------------------------------------------------------------------ 9. clipping
@pytest.mark.parametrize("train", ["critical", "noncritical"])
def test_clip_counts_only_trainable_entries(train):
    model = _mlp()
    sl = _slice(model, [6])
    x, y = next(iter(_loader()))
    opt = neuslice.MaskedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, sl, train=train
    )
    F.cross_entropy(model(x), y).backward()
    raw = [p.grad.clone() for p in model.parameters()]
    # the reference: the same gradients with the frozen entries given no gradient, clipped by
    # torch (a whole frozen tensor: requires_grad=False, so it is left out)
    ref = copy.deepcopy(model)
    plan = {
        id(p): rows
        for p, rows in neuslice.maintenance.masked_optimizer._plan(
            model, sl, train, None
        ).rows.values()
    }
    params = []
    for p, q, g in zip(model.parameters(), ref.parameters(), raw):
        rows = plan[id(p)]
        if not bool(rows.any()):
            q.requires_grad_(False)
            continue
        q.grad = g.clone()
        q.grad[~rows] = 0
        params.append(q)
    full_norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in raw]))
    ref_norm = torch.nn.utils.clip_grad_norm_(params, 0.05)
    norm = opt.clip_grad_norm_(0.05)
    torch.testing.assert_close(norm, ref_norm)
    assert not torch.allclose(norm, full_norm)  # frozen gradients would have counted
    for p, q in zip(model.parameters(), ref.parameters()):
        if q.requires_grad:
            torch.testing.assert_close(p.grad, q.grad)
        else:
            assert p.grad is None
