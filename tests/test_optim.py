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


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)
    )


def make_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
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
