"""Tests for neuslice.readapt: attacks, adversarial datasets and masked re-adaptation."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import neuslice
from neuslice.experiments.data import DIGITS_MEAN, DIGITS_STD, load_digits
from neuslice.experiments.models import MLP
from neuslice.maintenance.masked_optimizer import trainable_fraction
from neuslice.maintenance.readapt import (
    NormalizedModel,
    ReadaptResult,
    adversarial_dataset,
    denormalize,
    evaluate_readaptation,
    make_attack,
    normalize,
    readapt,
)
from neuslice.experiments.train import evaluate, seed_everything, train_classifier

pytest.importorskip("torchattacks")

NORM = {"mean": DIGITS_MEAN, "std": DIGITS_STD}
READAPT_EPS = 0.1  # weaker PGD for re-adaptation: leaves room for RA to improve and be measured


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


@pytest.fixture(scope="module")
def trained(digits):
    """64-32-16-10 MLP, 3 epochs: about 0.90 clean test accuracy."""
    train_set, test_set = digits
    seed_everything(0)
    model = MLP(in_features=64, hidden=(32, 16), num_classes=10)
    train_classifier(model, train_set, epochs=3, lr=1e-2, progress=False)
    return model


@pytest.fixture(scope="module")
def adv_sets(trained, digits):
    """PGD (eps 0.1) adversarial train/test sets made against the trained model."""
    train_set, test_set = digits
    attack = make_attack(trained, "pgd", eps=READAPT_EPS, **NORM)
    return adversarial_dataset(trained, train_set, attack), adversarial_dataset(
        trained, test_set, attack
    )


def half_slice(model: nn.Module, seed: int = 1) -> neuslice.Slice:
    """A random slice with exactly half of each layer's neurons critical."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for layer in neuslice.find_layers(model):
        mask = torch.zeros(layer.num_neurons, dtype=torch.bool)
        mask[torch.randperm(layer.num_neurons, generator=g)[: layer.num_neurons // 2]] = True
        masks[layer.name] = mask
    return neuslice.Slice(
        masks=masks,
        strategy="random",
        metric=None,
        fingerprint=neuslice.model_fingerprint(model),
        input_shape=[1, 8, 8],
    )


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(now[k], v), f"{k} changed"


# --------------------------------------------------------------------------------- attacks
@pytest.mark.parametrize("kind", ["fgsm", "pgd"])
def test_attack_lowers_accuracy_and_stays_in_budget(trained, digits, kind):
    _, test_set = digits
    clean_acc = evaluate(trained, test_set)
    assert clean_acc > 0.85  # measured 0.903
    attack = make_attack(trained, kind, **NORM)  # defaults: FGSM eps 0.2, PGD eps 0.3
    before = state(trained)
    grads = [None if p.grad is None else p.grad.clone() for p in trained.parameters()]
    trained.train()  # the attack must run in eval mode and restore the flag
    rng = torch.get_rng_state()
    attack(*(t[:8] for t in test_set.tensors))
    assert torch.equal(torch.get_rng_state(), rng)  # PGD's random start uses a private stream
    adv = adversarial_dataset(trained, test_set, attack)
    assert trained.training and all(m.training for m in trained.modules())
    trained.eval()
    assert_state_equal(trained, before)
    for p, g in zip(trained.parameters(), grads):  # parameter gradients untouched
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)

    adv_acc = evaluate(trained, adv)
    # measured: FGSM 0.103, PGD 0.000 (from 0.903 clean)
    assert adv_acc < clean_acc - 0.5, (kind, clean_acc, adv_acc)
    x, y = test_set.tensors
    assert torch.equal(adv.tensors[1], y) and adv.tensors[0].shape == x.shape
    pix, pix_adv = denormalize(x, **NORM), denormalize(adv.tensors[0], **NORM)
    assert float((pix_adv - pix).abs().max()) <= attack.eps + 1e-5
    assert float(pix_adv.min()) >= -1e-5 and float(pix_adv.max()) <= 1 + 1e-5


def test_attack_restores_mixed_modes_and_is_reproducible(trained, digits):
    _, test_set = digits
    x, y = test_set.tensors[0][:32], test_set.tensors[1][:32]
    trained.train()
    trained.head.eval()
    try:
        a1 = make_attack(trained, "pgd", seed=3, **NORM)(x, y)
        assert trained.training and not trained.head.training
    finally:
        trained.eval()
    a2 = make_attack(trained, "pgd", seed=3, **NORM)(x, y)
    assert torch.equal(a1, a2)


def test_normalized_model_and_per_channel_stats():
    x = torch.rand(4, 3, 2, 2)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    z = normalize(x, mean, std)
    assert torch.allclose(z[:, 1], (x[:, 1] - 0.2) / 0.25)
    assert torch.allclose(denormalize(z, mean, std), x, atol=1e-6)
    inner = nn.Flatten()
    assert torch.allclose(NormalizedModel(inner, mean, std)(x), inner(z))
    with pytest.raises(ValueError, match="per-channel"):
        normalize(torch.rand(4, 2, 2, 2), mean, std)


# ---------------------------------------------------------------------------- re-adaptation
def test_readapt_critical_slice_improves_ra_and_freezes_the_rest(trained, digits, adv_sets):
    train_set, test_set = digits
    adv_train, adv_test = adv_sets
    sl = half_slice(trained)
    before = state(trained)
    ra_before = evaluate(trained, adv_test)  # measured 0.487
    adapted = readapt(trained, sl, train_set, adv_train, epochs=3, lr=1e-2)
    assert adapted is not trained and not adapted.training
    assert_state_equal(trained, before)  # the original is untouched

    factory = lambda m: make_attack(m, "pgd", eps=READAPT_EPS, **NORM)  # noqa: E731
    res = evaluate_readaptation(trained, adapted, sl, test_set, adv_test, factory)
    assert isinstance(res, ReadaptResult) and res.method == "random"
    # measured: RA 0.696 vs 0.487 before, RAA 0.616, clean 0.930
    assert res.ra > ra_before + 0.1, (ra_before, res)
    assert res.raa > ra_before  # new attacks on the adapted model hurt less than before
    assert res.clean_accuracy > 0.85
    assert res.tpr == trainable_fraction(trained, sl, "critical")
    assert 0 < res.tpr < 1

    old, new = trained.state_dict(), adapted.state_dict()
    for layer, mask in sl.masks.items():  # critical mode: non-critical rows frozen
        for p in ("weight", "bias"):
            key = f"{layer}.{p}"
            assert torch.equal(new[key][~mask], old[key][~mask]), f"{key} frozen rows moved"
            assert not torch.equal(new[key][mask], old[key][mask]), f"{key} did not train"
    assert not torch.equal(new["head.weight"], old["head.weight"])  # the head trains


def test_readapt_noncritical_freezes_critical_rows(trained, digits, adv_sets):
    train_set, _ = digits
    adv_train, _ = adv_sets
    sl = half_slice(trained, seed=2)
    adapted = readapt(trained, sl, train_set, adv_train, epochs=1, train="noncritical")
    old, new = trained.state_dict(), adapted.state_dict()
    for layer, mask in sl.masks.items():
        assert torch.equal(new[f"{layer}.weight"][mask], old[f"{layer}.weight"][mask])
        assert not torch.equal(new[f"{layer}.weight"][~mask], old[f"{layer}.weight"][~mask])


def test_full_training_tpr_one_and_seeded(trained, digits, adv_sets):
    train_set, test_set = digits
    adv_train, adv_test = adv_sets
    a1 = readapt(trained, None, train_set, adv_train, epochs=1, seed=5)
    a2 = readapt(trained, None, train_set, adv_train, epochs=1, seed=5)
    old = trained.state_dict()
    for k, v in a1.state_dict().items():
        assert torch.equal(v, a2.state_dict()[k])  # same seed, same result
        assert not torch.equal(v, old[k]), f"{k} did not train"
    factory = lambda m: make_attack(m, "fgsm", eps=READAPT_EPS, **NORM)  # noqa: E731
    res = evaluate_readaptation(trained, a1, None, test_set, adv_test, factory)
    assert res.tpr == 1.0 and res.method == "full"


def test_readapt_takes_the_users_optimizer(trained, digits, adv_sets):
    train_set, _ = digits
    adv_train, _ = adv_sets
    made = []

    def sgd(params):
        made.append(torch.optim.SGD(params, lr=0.05))
        return made[-1]

    a = readapt(trained, half_slice(trained), train_set, adv_train, epochs=1, optimizer=sgd)
    assert len(made) == 1 and made[0].state_dict()["param_groups"][0]["lr"] == 0.05
    assert any(not torch.equal(v, trained.state_dict()[k]) for k, v in a.state_dict().items())
    with pytest.raises(TypeError, match="optimizer must be a callable"):
        readapt(trained, None, train_set, adv_train, epochs=1, optimizer="sgd")


# ------------------------------------------------------------------------------ bad inputs
def test_bad_attack_arguments(trained):
    with pytest.raises(ValueError, match="unknown attack kind"):
        make_attack(trained, "cw")
    for eps in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="eps"):
            make_attack(trained, "fgsm", eps=eps)
    with pytest.raises(TypeError, match="eps"):
        make_attack(trained, "fgsm", eps="0.1")
    with pytest.raises(ValueError, match="alpha"):
        make_attack(trained, "pgd", alpha=0.0)
    with pytest.raises(ValueError, match="steps"):
        make_attack(trained, "pgd", steps=0)
    with pytest.raises(ValueError, match="both mean and std"):
        make_attack(trained, "pgd", mean=DIGITS_MEAN)
    with pytest.raises(ValueError, match="std must be positive"):
        make_attack(trained, "pgd", mean=0.5, std=0.0)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        make_attack("model", "pgd")


def test_missing_torchattacks_names_install_command(trained, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    with pytest.raises(ImportError, match=r"pip install \"neuslice\[readapt\]\""):
        make_attack(trained, "fgsm")


def test_bad_readapt_inputs(trained, digits, adv_sets):
    train_set, test_set = digits
    adv_train, adv_test = adv_sets
    sl = half_slice(trained)
    with pytest.raises(ValueError, match="train must be one of"):
        readapt(trained, sl, train_set, adv_train, train="all")
    short = TensorDataset(*(t[:-1] for t in adv_train.tensors))
    with pytest.raises(ValueError, match="adversarial version"):
        readapt(trained, sl, train_set, short)
    x, y = adv_train.tensors
    shuffled = TensorDataset(x, y.roll(1))  # same length, misaligned labels
    with pytest.raises(ValueError, match="labels differ"):
        readapt(trained, sl, train_set, shuffled, epochs=1)
    with pytest.raises(TypeError, match="Slice or None"):
        readapt(trained, {"fc1": None}, train_set, adv_train)
    with pytest.raises(ValueError, match="lr"):
        readapt(trained, None, train_set, adv_train, lr=0)
    with pytest.raises(ValueError, match="epochs"):
        readapt(trained, None, train_set, adv_train, epochs=-1)
    other = MLP(in_features=64, hidden=(8,), num_classes=10)
    with pytest.raises(ValueError, match="different model"):
        adversarial_dataset(other, test_set, make_attack(trained, "fgsm", **NORM))
    with pytest.raises(TypeError, match="callable"):
        adversarial_dataset(trained, test_set, "fgsm")
    with pytest.raises(ValueError, match="architecture"):
        evaluate_readaptation(trained, other, None, test_set, adv_test, make_attack)
    with pytest.raises(TypeError, match="attack_factory"):
        evaluate_readaptation(trained, copy.deepcopy(trained), None, test_set, adv_test, None)
    with pytest.raises(ValueError, match="adv_test"):
        evaluate_readaptation(trained, copy.deepcopy(trained), None, test_set, short, make_attack)
