"""Tests for neuslice.optim: MaskedOptimizer keeps frozen neurons bit-identical."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import neuslice
from neuslice.maintenance.masked_optimizer import MaskedOptimizer, trainable_fraction

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5, weight_decay=1e-2),
}


def make_mlp(sizes=(8, 16, 12), seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    a, b, c = sizes
    return nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c), nn.ReLU(), nn.Linear(c, 4))


def make_cnn(widths=(6, 8), seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    a, b = widths
    return nn.Sequential(
        nn.Conv2d(2, a, 3, padding=1),
        nn.BatchNorm2d(a),
        nn.ReLU(),
        nn.Conv2d(a, b, 3, padding=1),
        nn.BatchNorm2d(b),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(b, 4),
    )


SHAPES = {"mlp": [8], "cnn": [2, 5, 5]}
BUILD = {"mlp": make_mlp, "cnn": make_cnn}


def random_slice(model: nn.Module, input_shape: list[int], seed: int = 1) -> neuslice.Slice:
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for l in neuslice.find_layers(model):
        m = torch.rand(l.num_neurons, generator=g) < 0.5
        m[0], m[-1] = True, False  # both kinds present
        masks[l.name] = m
    return neuslice.Slice(
        masks=masks,
        strategy="global",
        metric="avg",
        fingerprint=neuslice.model_fingerprint(model),
        input_shape=input_shape,
    )


def run_steps(model: nn.Module, opt, kind: str, steps: int = 5) -> None:
    model.train()
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(6, *SHAPES[kind], generator=g) * 2 + 0.5
        y = torch.randint(0, 4, (6,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def frozen_rows(sl, layer: str, train: str) -> torch.Tensor:
    crit = sl.masks[layer]
    return ~crit if train == "critical" else crit


def check(before: nn.Module, after: nn.Module, sl, train: str, protect=()) -> None:
    mods_b, mods_a = dict(before.named_modules()), dict(after.named_modules())
    for l in neuslice.find_layers(after):
        fr = frozen_rows(sl, l.name, train)
        names = [l.name] + ([l.norm_name] if l.norm_name else [])
        for n in names:
            for attr in ("weight", "bias", "running_mean", "running_var"):
                a, b = getattr(mods_a[n], attr, None), getattr(mods_b[n], attr, None)
                if a is None:
                    continue
                assert torch.equal(a[fr], b[fr]), f"{n}.{attr} frozen rows moved ({train})"
                if attr in ("weight", "bias"):
                    assert not torch.equal(a[~fr], b[~fr]), f"{n}.{attr} did not train"
    head = [n for n, m in after.named_modules() if isinstance(m, nn.Linear)][-1]
    keep = torch.zeros(4, dtype=torch.bool)
    keep[list(protect)] = True
    for attr in ("weight", "bias"):
        a, b = getattr(mods_a[head], attr), getattr(mods_b[head], attr)
        assert torch.equal(a[keep], b[keep])
        assert not torch.equal(a[~keep], b[~keep]), "head rows did not train"


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("train", ["critical", "noncritical"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_frozen_entries_bit_identical(kind, train, opt_name):
    model = BUILD[kind]()
    sl = random_slice(model, SHAPES[kind])
    before = copy.deepcopy(model)
    opt = MaskedOptimizer(OPTIMIZERS[opt_name](model.parameters()), model, sl, train=train)
    run_steps(model, opt, kind)
    check(before, model, sl, train)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_protect_classes(kind):
    model = BUILD[kind]()
    sl = random_slice(model, SHAPES[kind])
    before = copy.deepcopy(model)
    opt = MaskedOptimizer(
        OPTIMIZERS["adamw"](model.parameters()),
        model,
        sl,
        train="noncritical",
        protect_classes=[0, 2],
    )
    run_steps(model, opt, kind)
    check(before, model, sl, "noncritical", protect=[0, 2])


def test_non_sliced_layers_follow_rule():
    model = make_mlp()
    g = torch.Generator().manual_seed(3)
    sl = neuslice.Slice(
        masks={"2": torch.rand(12, generator=g) < 0.5},
        strategy="global",
        metric="avg",
        fingerprint=neuslice.model_fingerprint(model),
        input_shape=[8],
    )
    for train, moves in (("critical", False), ("noncritical", True)):
        m = make_mlp()
        before = copy.deepcopy(m)
        opt = MaskedOptimizer(OPTIMIZERS["sgd"](m.parameters()), m, sl, train=train)
        run_steps(m, opt, "mlp")
        assert torch.equal(m[0].weight, before[0].weight) != moves
        assert not torch.equal(m[4].weight, before[4].weight)  # head trains in both modes


def test_closure_and_state_dict_round_trip():
    model = make_cnn()
    sl = random_slice(model, SHAPES["cnn"])
    before = copy.deepcopy(model)
    opt = MaskedOptimizer(OPTIMIZERS["sgd"](model.parameters()), model, sl)
    run_steps(model, opt, "cnn", steps=2)
    x, y = torch.randn(4, 2, 5, 5), torch.tensor([0, 1, 2, 3])

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    assert torch.isfinite(opt.step(closure))
    check(before, model, sl, "critical")
    sd = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    opt2 = MaskedOptimizer(OPTIMIZERS["sgd"](twin.parameters()), twin, sl)
    opt2.load_state_dict(sd)
    for k, v in opt2.state_dict()["state"].items():
        for name, t in v.items():
            assert torch.equal(t, sd["state"][k][name])
    run_steps(model, opt, "cnn", steps=1)
    run_steps(twin, opt2, "cnn", steps=1)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert opt.param_groups is opt.optimizer.param_groups
    assert "MaskedOptimizer(train='critical'" in repr(opt)


def test_construction_does_not_modify_model():
    model = make_cnn()
    sd = copy.deepcopy(model.state_dict())
    MaskedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model,
        random_slice(model, SHAPES["cnn"]),
        train="noncritical",
        protect_classes=[1],
    )
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])


def test_add_param_group():
    model = make_mlp()
    sl = random_slice(model, SHAPES["mlp"])
    before = copy.deepcopy(model)
    params = list(model.parameters())
    opt = MaskedOptimizer(torch.optim.SGD(params[:2], lr=0.1, weight_decay=0.1), model, sl)
    opt.add_param_group({"params": params[2:]})
    run_steps(model, opt, "mlp")
    check(before, model, sl, "critical")
    with pytest.raises(ValueError, match="not parameters of the model"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_bad_inputs():
    model = make_mlp()
    sl = random_slice(model, SHAPES["mlp"])
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="critical"):
        MaskedOptimizer(sgd, model, sl, train="all")
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        MaskedOptimizer(sgd, model, sl, protect_classes=[4])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        MaskedOptimizer(sgd, model, sl, protect_classes=[-1])
    with pytest.raises(TypeError):
        MaskedOptimizer(sgd, model, sl, protect_classes=3)
    with pytest.raises(TypeError):
        MaskedOptimizer(sgd, model, sl, protect_classes=["a"])
    other = make_cnn()
    with pytest.raises(ValueError, match="different model"):
        MaskedOptimizer(torch.optim.SGD(other.parameters(), lr=0.1), other, sl)
    foreign = torch.optim.SGD(list(model.parameters()) + [nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(ValueError, match="1 of the optimizer's 7 parameters"):
        MaskedOptimizer(foreign, model, sl)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        MaskedOptimizer(object(), model, sl)
    with pytest.raises(TypeError, match="Slice"):
        MaskedOptimizer(sgd, model, {"0": torch.ones(16, dtype=torch.bool)})
    with pytest.raises(ValueError, match="critical"):
        trainable_fraction(model, sl, train="frozen")


def test_trainable_fraction_hand_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    masks = {
        "0": torch.tensor([1, 0, 1, 0], dtype=torch.bool),
        "2": torch.tensor([1, 1, 0, 0, 0], dtype=torch.bool),
    }
    sl = neuslice.Slice(
        masks=masks,
        strategy="global",
        metric="avg",
        fingerprint=neuslice.model_fingerprint(model),
        input_shape=[3],
    )
    total = 4 * 4 + 5 * 5 + 2 * 6
    assert trainable_fraction(model, sl, "critical") == (2 * 4 + 2 * 5 + 2 * 6) / total
    assert trainable_fraction(model, sl, "noncritical") == (2 * 4 + 3 * 5 + 2 * 6) / total
    assert trainable_fraction(model, sl, "noncritical", [1]) == (2 * 4 + 3 * 5 + 6) / total
    opt = MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, sl)
    assert opt.trainable_fraction() == (2 * 4 + 2 * 5 + 2 * 6) / total


# ---- element-wise fast path ------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _awkward(kind: str) -> nn.Module:
    return make_mlp((7, 13, 9), seed=3) if kind == "mlp" else make_cnn((5, 7), seed=3)


AWKWARD_SHAPES = {"mlp": [7], "cnn": [2, 5, 5]}

FAST_CONFIGS = {
    "sgd-nesterov": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)),
    "sgd-plain": (torch.optim.SGD, dict(lr=0.1)),
    "sgd-foreach": (torch.optim.SGD, dict(lr=0.1, momentum=0.5, dampening=0.1, foreach=True)),
    "adam-coupled": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2)),
    "adam-amsgrad-max": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True, maximize=True)),
    "adam-foreach": (torch.optim.Adam, dict(lr=1e-2, foreach=True, weight_decay=0.1)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-1)),
    "adamw-foreach-max": (
        torch.optim.AdamW,
        dict(lr=1e-2, weight_decay=1e-1, foreach=True, maximize=True),
    ),
    "adamw-amsgrad": (torch.optim.AdamW, dict(lr=1e-2, amsgrad=True, foreach=False)),
    "adamw-fused": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-1, fused=True)),
    "nadam": (torch.optim.NAdam, dict(lr=1e-2, weight_decay=1e-2)),
    "radam": (torch.optim.RAdam, dict(lr=1e-2, decoupled_weight_decay=True, weight_decay=0.1)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=1e-2, momentum=0.5, centered=True)),
    "adagrad": (torch.optim.Adagrad, dict(lr=1e-1, weight_decay=1e-2)),
}


def _generic(cls: type) -> type:
    """A subclass: not on the element-wise allowlist, so MaskedOptimizer takes the generic path."""
    return type(f"Generic{cls.__name__}", (cls,), {})


def _make(cls, kw, params):
    try:
        return cls(params, **kw)
    except (RuntimeError, ValueError) as err:  # e.g. fused not built for this device
        pytest.skip(f"{cls.__name__}({kw}) unavailable here: {err}")


def _train(model, opt, kind, steps, seed=11, closure=False):
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, *AWKWARD_SHAPES[kind], generator=g) * 2
        y = torch.randint(0, 4, (5,), generator=g)
        opt.zero_grad()

        def loss_fn():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if closure:
            opt.step(loss_fn)
        else:
            loss_fn()
            opt.step()


def _assert_same(model_a, opt_a, model_b, opt_b):
    for (n, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert _same_bits(a, b), n
    pa, pb = list(model_a.parameters()), list(model_b.parameters())
    for a, b in zip(pa, pb):
        sa, sb = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert _same_bits(sa[k], sb[k]), k


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("train", ["critical", "noncritical"])
@pytest.mark.parametrize("config", list(FAST_CONFIGS))
def test_fast_path_equals_generic_path_bit_for_bit(kind, train, config):
    cls, kw = FAST_CONFIGS[config]
    models, opts = [], []
    for c in (cls, _generic(cls)):
        model = _awkward(kind)
        sl = random_slice(model, AWKWARD_SHAPES[kind], seed=5)
        protect = [0, 1] if train == "noncritical" else [2]  # a contiguous frozen range
        opt = MaskedOptimizer(
            _make(c, kw, model.parameters()), model, sl, train=train, protect_classes=protect
        )
        _train(model, opt, kind, steps=4)
        _train(model, opt, kind, steps=2, seed=12, closure=True)
        models.append(model)
        opts.append(opt)
    _assert_same(models[0], opts[0], models[1], opts[1])


@pytest.mark.parametrize(
    "config",
    ["adamw", "adamw-fused", "adam-coupled", "adam-amsgrad-max", "rmsprop", "sgd-nesterov"],
)
def test_fast_path_from_loaded_state(config):
    """Frozen state rows loaded from unmasked training, some tensors all +0 or all -0, some
    with a few zero rows: the fast path still matches the generic one and keeps them."""
    cls, kw = FAST_CONFIGS[config]
    src = _awkward("mlp")
    pre = cls(src.parameters(), **kw)
    _train(src, pre, "mlp", steps=3)
    with torch.no_grad():
        for j, st in enumerate(pre.state.values()):
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    if j % 3 == 0:
                        v.fill_(0.0)
                    elif j % 3 == 1:
                        v.fill_(-0.0)
                    else:
                        v[::3] = 0.0
                        v[1::5] = -0.0
    sd = copy.deepcopy(pre.state_dict())
    models, opts, frozen_state = [], [], []
    for c in (cls, _generic(cls)):
        model = copy.deepcopy(src)
        sl = random_slice(model, AWKWARD_SHAPES["mlp"], seed=2)
        opt = MaskedOptimizer(c(model.parameters(), **kw), model, sl)
        opt.load_state_dict(copy.deepcopy(sd))
        before = {
            (i, k): v.clone()
            for i, p in enumerate(model.parameters())
            for k, v in opt.state[p].items()
            if isinstance(v, torch.Tensor)
        }
        _train(model, opt, "mlp", steps=3)
        models.append(model)
        opts.append(opt)
        frozen_state.append(before)
    _assert_same(models[0], opts[0], models[1], opts[1])
    model, opt, before = models[0], opts[0], frozen_state[0]
    rows = {id(p): r for p, r in opt._plan.rows.values()}
    for i, p in enumerate(model.parameters()):
        fr = ~rows[id(p)]
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                assert _same_bits(v[fr], before[(i, k)][fr]), (i, k)


@pytest.mark.parametrize("config", ["adamw", "adam-amsgrad-max", "rmsprop", "adagrad"])
def test_frozen_state_rows_unchanged_across_steps(config):
    cls, kw = FAST_CONFIGS[config]
    model = _awkward("cnn")
    sl = random_slice(model, AWKWARD_SHAPES["cnn"], seed=4)
    params = list(model.parameters())
    opt = MaskedOptimizer(cls(params[:4], **kw), model, sl, train="noncritical")
    _train(model, opt, "cnn", steps=1)
    opt.add_param_group({"params": params[4:]})
    _train(model, opt, "cnn", steps=1)
    rows = {id(p): r for p, r in opt._plan.rows.values()}
    snap = {
        (id(p), k): v[~rows[id(p)]].clone()
        for p in params
        for k, v in opt.state[p].items()
        if isinstance(v, torch.Tensor) and v.shape == p.shape
    }
    frozen_params = [p.detach()[~rows[id(p)]].clone() for p in params]
    _train(model, opt, "cnn", steps=4, seed=3)
    for p, old in zip(params, frozen_params):
        assert _same_bits(p.detach()[~rows[id(p)]], old)
    for (pid, k), old in snap.items():
        p = next(q for q in params if id(q) == pid)
        assert _same_bits(opt.state[p][k][~rows[pid]], old), k


def test_failed_step_leaves_frozen_state_as_it_was():
    model = _awkward("mlp")
    sl = random_slice(model, AWKWARD_SHAPES["mlp"])
    opt = MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, sl)
    _train(model, opt, "mlp", steps=2)
    state = copy.deepcopy(opt.state_dict())
    params = copy.deepcopy(model.state_dict())

    def closure():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    for k, v in model.state_dict().items():
        assert _same_bits(v, params[k]), k
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            assert _same_bits(v, state["state"][i][k]), (i, k)


@pytest.mark.parametrize(
    "dtype, shape",
    [
        (torch.float32, (9, 8)),
        (torch.float32, (6, 2, 3)),
        (torch.float32, (5, 3)),
        (torch.float16, (7, 4)),
        (torch.bfloat16, (4, 2, 2, 2)),
        (torch.float64, (5,)),
    ],
)
def test_row_copies_and_fills_are_bit_exact(dtype, shape):
    from neuslice.maintenance.masked_optimizer import _Entry, _span

    g = torch.Generator().manual_seed(0)
    n_bytes = torch.Size(shape).numel() * dtype.itemsize
    raw = torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, generator=g)  # NaN payloads, -0
    t = raw.view(dtype).reshape(shape)
    for idx in (torch.tensor([0, 2, 3]), torch.tensor([1, 2, 3])):
        e = _Entry(nn.Parameter(torch.empty(0)), idx, _span(idx))
        rows = e.take(t)
        other = torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, generator=g)
        u = other.view(dtype).reshape(shape).clone()
        e.put(u, rows)
        assert _same_bits(u[idx], t[idx])
        keep = torch.ones(shape[0], dtype=torch.bool)
        keep[idx] = False
        assert _same_bits(u[keep], other.view(dtype).reshape(shape)[keep])
        for value in (0.0, 1.0):
            w = u.clone()
            e.fill(w, value)
            assert _same_bits(w[idx], torch.full_like(w[idx], value))
            assert _same_bits(w[keep], u[keep])
