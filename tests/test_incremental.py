"""Tests for neuslice.incremental: learning tasks one after another with slices (RQ4)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import neuslice
from neuslice.experiments.data import load_digits, load_mnist5k
from neuslice.maintenance.incremental import (
    incremental_run,
    learn_task,
    make_slicer,
    replay_bytes,
    replay_subset,
    slice_bytes,
    split_tasks,
    task_accuracy,
    task_logits,
    union_slice,
)
from neuslice.layers import model_fingerprint
from neuslice.experiments.models import MLP, SmallCNN

AB = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
ABC = [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
TRAIN = dict(epochs=6, lr=3e-3)


@pytest.fixture(autouse=True)
def _quiet():
    # profiling on one task's data warns that the other classes have no samples (expected here)
    logging.getLogger("neuslice.profiling").setLevel(logging.ERROR)
    yield
    logging.getLogger("neuslice.profiling").setLevel(logging.NOTSET)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(in_features=64, hidden=(64, 32), num_classes=10)


def cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(in_channels=1, num_classes=10, width=8)


def semantic(model, dataset, classes):
    prof = neuslice.profile(
        model,
        neuslice.experiments.data.make_loader(dataset, batch_size=128),
        num_classes=10,
        metrics=("taylor",),
        progress=False,
    )
    return neuslice.semantic_slice(prof, "taylor", threshold=0.9, criterion="layer_cka")


# ---- split -------------------------------------------------------------------------------


def test_split_tasks_keeps_global_labels(digits):
    train, _ = digits
    tasks = split_tasks(train, ABC)
    assert [len(t) for t in tasks] and sum(len(t) for t in tasks) == len(train)
    for t, g in zip(tasks, ABC):
        assert set(t.tensors[1].tolist()) == set(g)
        assert t.tensors[0].shape[1:] == train.tensors[0].shape[1:]


def test_make_slicer_semantic_criteria(digits):
    train, _ = digits
    a = split_tasks(train, AB)[0]
    model = mlp()
    learn_task(model, a, AB[0], **TRAIN)
    paper = make_slicer("semantic", value=0.9)(model, a, AB[0])
    assert paper.strategy == "semantic"
    ref = semantic(model, a, AB[0])
    assert all(torch.equal(paper.masks[n], ref.masks[n]) for n in ref.masks)
    cons = make_slicer("semantic", value=0.3, criterion="consumer_r2")(model, a, AB[0])
    assert cons.strategy == "consumer_r2" and cons.threshold == 0.3
    for layer, rows in cons.category_masks.items():
        assert not rows[5:].any(), layer  # absent classes select nothing here either
    with pytest.raises(ValueError, match="criterion"):
        make_slicer("semantic", criterion="cka")


def test_semantic_slice_skips_absent_categories(digits):
    train, _ = digits
    a = split_tasks(train, AB)[0]
    model = mlp()
    learn_task(model, a, AB[0], **TRAIN)
    sl = semantic(model, a, AB[0])
    for layer, rows in sl.category_masks.items():
        assert not rows[5:].any(), layer  # classes 5..9 have no samples: no selection
        assert rows[:5].any(1).all(), layer
        assert torch.equal(rows.any(0), sl.masks[layer])


# ---- the key property: task-A predictions under A's mask are unchanged ---------------------


def _learn_a_then_b(model, tasks, groups):
    learn_task(model, tasks[0], groups[0], **TRAIN)
    sl = semantic(model, tasks[0], groups[0])
    return sl


@pytest.mark.parametrize("build", [mlp, cnn], ids=["mlp", "cnn-bn"])
def test_neusemslice_keeps_task_a_bit_identical(digits, build):
    train, test = digits
    tr, te = split_tasks(train, AB), split_tasks(test, AB)
    model = build()
    sl = _learn_a_then_b(model, tr, AB)
    assert any(int(m.sum()) < m.numel() for m in sl.masks.values()), "nothing left to train"
    before = task_logits(model, te[0], AB[0], sl)
    acc_before = task_accuracy(model, te[0], AB[0], sl)
    full_before = task_logits(model, te[0])
    b_before = task_accuracy(model, te[1], AB[1])
    state_before = copy.deepcopy(model.state_dict())

    learn_task(model, tr[1], AB[1], frozen_slice=sl, protect_classes=AB[0], **TRAIN)

    after = task_logits(model, te[0], AB[0], sl)
    assert torch.equal(before, after)
    assert task_accuracy(model, te[0], AB[0], sl) == acc_before
    assert not torch.equal(full_before, task_logits(model, te[0]))  # the model did change
    assert task_accuracy(model, te[1], AB[1]) > b_before + 0.2  # and learned task B
    # frozen entries and (for the CNN) BN running statistics of critical channels are kept
    state = model.state_dict()
    for l in sl.layers_of(model):
        keep = sl.masks[l.name]
        w = l.name + ".weight"
        assert torch.equal(state[w][keep], state_before[w][keep])
        assert not torch.equal(state[w][~keep], state_before[w][~keep])
        if l.norm_module is not None:
            bn = next(n for n, m in model.named_modules() if m is l.norm_module)
            for stat in ("running_mean", "running_var"):
                k = f"{bn}.{stat}"
                assert torch.equal(state[k][keep], state_before[k][keep])
                assert not torch.equal(state[k][~keep], state_before[k][~keep])
    head = torch.tensor(AB[0])
    assert torch.equal(state["head.weight"][head], state_before["head.weight"][head])
    assert torch.equal(state["head.bias"][head], state_before["head.bias"][head])


@pytest.mark.slow
def test_chain_abc_keeps_a_and_b_exact(digits):
    train, test = digits
    tr, te = split_tasks(train, ABC), split_tasks(test, ABC)
    model = mlp()
    learn_task(model, tr[0], ABC[0], **TRAIN)
    sa = semantic(model, tr[0], ABC[0])
    a0 = task_logits(model, te[0], ABC[0], sa)
    learn_task(model, tr[1], ABC[1], frozen_slice=sa, protect_classes=ABC[0], **TRAIN)
    assert torch.equal(a0, task_logits(model, te[0], ABC[0], sa))
    sb = semantic(model, tr[1], ABC[1])
    sab = union_slice([sa, sb])
    for k in sab.masks:
        assert torch.equal(sab.masks[k], sa.masks[k] | sb.masks[k])
    b0 = task_logits(model, te[1], ABC[1], sab)
    if all(bool(m.all()) for m in sab.masks.values()):
        pytest.skip("A and B slices cover every neuron; nothing left for C")
    learn_task(model, tr[2], ABC[2], frozen_slice=sab, protect_classes=ABC[0] + ABC[1], **TRAIN)
    assert torch.equal(a0, task_logits(model, te[0], ABC[0], sa))
    assert torch.equal(b0, task_logits(model, te[1], ABC[1], sab))


# ---- the experiment driver -----------------------------------------------------------------


@pytest.fixture(scope="module")
def ab_runs(digits):
    logging.getLogger("neuslice.profiling").setLevel(logging.ERROR)
    train, test = digits
    tr, te = split_tasks(train, AB), split_tasks(test, AB)
    out = {
        m: incremental_run(mlp, tr, te, AB, m, **TRAIN)
        for m in (
            "original",
            "retrain",
            "finetune",
            "replay10",
            "neusemslice",
            "neusemslice+replay10",
        )
    }
    logging.getLogger("neuslice.profiling").setLevel(logging.NOTSET)
    return out


@pytest.mark.slow
def test_run_rows(ab_runs):
    for method, rows in ab_runs.items():
        assert [r["task"] for r in rows] == [0, 1, "overall"]
        for r in rows:
            assert 0.0 <= r["task_aware"] <= 1.0 and 0.0 <= r["task_agnostic"] <= 1.0
        assert rows[-1]["n_test"] == rows[0]["n_test"] + rows[1]["n_test"]
    assert ab_runs["original"][1]["learned"] is False
    assert ab_runs["original"][1]["task_agnostic"] == 0.0
    assert ab_runs["original"][0]["task_aware"] > 0.9
    assert all(r["task_aware"] > 0.9 for r in ab_runs["retrain"][:2])


def test_finetune_forgets_neusemslice_does_not(ab_runs):
    ft, ns = ab_runs["finetune"], ab_runs["neusemslice"]
    assert ft[0]["task_aware_at_learning"] > 0.9
    assert ft[0]["task_agnostic"] < 0.2  # catastrophic forgetting
    assert ft[0]["forgetting"] > 0.2
    assert ns[0]["masked"] and ns[0]["forgetting"] == 0.0  # exactly kept
    assert ns[0]["task_aware"] == ns[0]["task_aware_at_learning"]
    assert ns[0]["task_aware"] > ft[0]["task_aware"]
    assert ns[1]["task_aware"] > 0.5
    nr = ab_runs["neusemslice+replay10"]
    assert nr[0]["forgetting"] == 0.0 and nr[0]["task_aware"] == ns[0]["task_aware"]


def test_replay_helps_and_reports_memory(ab_runs, digits):
    rp, ft = ab_runs["replay10"], ab_runs["finetune"]
    assert rp[0]["task_agnostic"] > ft[0]["task_agnostic"] + 0.3
    a = split_tasks(digits[0], AB)[0]
    assert rp[-1]["memory_bytes"] == replay_bytes(a, 0.1)
    assert ab_runs["finetune"][-1]["memory_bytes"] == 0
    ns, nr = ab_runs["neusemslice"][-1], ab_runs["neusemslice+replay10"][-1]
    assert 0 < ns["memory_bytes"] < rp[-1]["memory_bytes"]
    assert nr["memory_bytes"] == ns["memory_bytes"] + rp[-1]["memory_bytes"]


@pytest.mark.slow
def test_run_chain_abc_and_plugged_slicers(digits):
    train, test = digits
    tr, te = split_tasks(train, ABC), split_tasks(test, ABC)
    rows = incremental_run(mlp, tr, te, ABC, "neusemslice", slicer=semantic, **TRAIN)
    assert [r["forgetting"] for r in rows[:3]] == [0.0, 0.0, 0.0]
    assert rows[0]["masked"] and rows[1]["masked"] and not rows[2]["masked"]
    for slicer in (make_slicer("global", value=0.5), make_slicer("categorywise", value=0.3)):
        rows = incremental_run(
            mlp, tr[:2], te[:2], ABC[:2], "neusemslice", slicer=slicer, epochs=2, lr=3e-3
        )
        assert rows[0]["forgetting"] == 0.0
    rows = incremental_run(mlp, tr, te, ABC, "replay5", epochs=2, lr=3e-3)
    assert rows[-1]["memory_bytes"] == replay_bytes(tr[0], 0.05) + replay_bytes(tr[1], 0.05)


# ---- bytes ---------------------------------------------------------------------------------


def test_slice_is_far_smaller_than_a_replay_buffer():
    train, _ = load_mnist5k()
    per_sample = 1 * 28 * 28 * 4 + 8  # float32 image + int64 label
    assert replay_bytes(train, 0.1) == 400 * per_sample
    assert len(replay_subset(train, 0.1)) == 400
    # a real semantic slice of an MNIST MLP, profiled on a subset of the data
    torch.manual_seed(0)
    model = MLP(in_features=784, hidden=(64, 32), num_classes=10)
    small = TensorDataset(train.tensors[0][:600], train.tensors[1][:600])
    learn_task(model, small, list(range(10)), epochs=1)
    sl = semantic(model, small, list(range(10)))
    assert slice_bytes(sl) * 50 < replay_bytes(train, 0.1)
    # the paper's MLP (784-512-256) with per-category masks of all 10 classes: the largest
    # slice JSON it can have (hex masks have a fixed length whatever their content)
    big = MLP()
    masks = {"fc1": torch.ones(512, dtype=torch.bool), "fc2": torch.ones(256, dtype=torch.bool)}
    cat = {k: torch.ones(10, v.numel(), dtype=torch.bool) for k, v in masks.items()}
    worst = neuslice.Slice(
        masks=masks,
        strategy="semantic",
        metric="taylor",
        fingerprint=model_fingerprint(big),
        input_shape=[1, 28, 28],
        category_masks=cat,
        threshold=0.9,
    )
    assert slice_bytes(worst) * 50 < replay_bytes(train, 0.1)
    assert slice_bytes(worst) < replay_bytes(train, 0.1) / 100 * 10  # 1% of the buffer


# ---- bad input -----------------------------------------------------------------------------


def test_bad_inputs(digits):
    train, test = digits
    tr, te = split_tasks(train, AB), split_tasks(test, AB)
    with pytest.raises(ValueError, match="overlap"):
        split_tasks(train, [[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="empty"):
        split_tasks(train, [[0, 1], []])
    with pytest.raises(ValueError, match="empty"):
        split_tasks(train, [])
    with pytest.raises(TypeError, match="ints"):
        split_tasks(train, [[0, 1.5]])
    with pytest.raises(TypeError, match="Dataset"):
        split_tasks([1, 2], AB)
    with pytest.raises(ValueError, match="no samples"):
        split_tasks(train, [[0], [42]])
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            replay_bytes(train, bad)
    with pytest.raises(ValueError, match="unknown method"):
        incremental_run(mlp, tr, te, AB, "distill")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        incremental_run(mlp, tr, te, AB, "replay", replay_fraction=2.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        incremental_run(mlp, tr, te, AB, "neusemslice+replay0")
    with pytest.raises(ValueError, match="overlap"):
        incremental_run(mlp, tr, te, [[0, 1], [1]], "finetune")
    with pytest.raises(ValueError, match="one train and one test set"):
        incremental_run(mlp, tr, te[:1], AB, "finetune")
    with pytest.raises(TypeError, match="model_factory"):
        incremental_run(mlp(), tr, te, AB, "finetune")
    with pytest.raises(ValueError, match="not in the task's classes"):
        learn_task(mlp(), tr[1], AB[0], epochs=1)
    with pytest.raises(TypeError, match="frozen_slice"):
        learn_task(mlp(), tr[0], AB[0], frozen_slice="fc1", epochs=1)
    with pytest.raises(ValueError, match="union_slice"):
        union_slice([])
    with pytest.raises(TypeError, match="Slice"):
        slice_bytes({"fc1": torch.ones(3)})


@pytest.mark.slow
def test_task_batchnorm_keeps_each_task_exact_and_counts_its_bytes(digits):
    """Per-task BatchNorm statistics (re-estimated under the task's mask): task A is still
    exactly what it was after learning it, the statistics are the recalibrated ones, and their
    bytes are counted."""
    from neuslice.maintenance.incremental import task_batchnorm_stats

    train, test = digits
    tr, te = split_tasks(train, ABC), split_tasks(test, ABC)
    kw = dict(slicer=semantic, epochs=2, lr=3e-3)
    plain = incremental_run(cnn, tr, te, ABC, "neusemslice", **kw)
    with_bn = incremental_run(cnn, tr, te, ABC, "neusemslice", task_batchnorm=True, **kw)
    assert [r["forgetting"] for r in with_bn[:3]] == [0.0, 0.0, 0.0]
    n_bn = sum(
        m.running_mean.numel() * 2 * 4 + 8
        for m in cnn().modules()
        if isinstance(m, torch.nn.BatchNorm2d) or isinstance(m, torch.nn.BatchNorm1d)
    )
    assert with_bn[-1]["memory_bytes"] == plain[-1]["memory_bytes"] + 2 * n_bn
    # the model after task A, sliced: its masked accuracy with the recalibrated statistics is
    # the run's task-A accuracy at learning time
    model = cnn()
    learn_task(model, tr[0], ABC[0], seed=0, epochs=2, lr=3e-3)
    sl = semantic(model, tr[0], ABC[0])
    stats = task_batchnorm_stats(model, sl, tr[0])
    fixed = copy.deepcopy(model)
    fixed.load_state_dict({**fixed.state_dict(), **stats})
    assert task_accuracy(fixed, te[0], ABC[0], sl) == with_bn[0]["task_aware_at_learning"]
    assert plain[0]["task_aware_at_learning"] == task_accuracy(model, te[0], ABC[0], sl)


def test_learn_task_takes_the_users_optimizer_and_training_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    data = TensorDataset(torch.randn(32, 6), torch.arange(32) % 2)
    calls = []

    def fit(m, loader, opt, epochs):
        calls.append((type(opt).__name__, epochs))
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        return [0.0]

    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = learn_task(
        model, data, [0, 1], epochs=2, fit=fit, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1)
    )
    assert out == [0.0] and calls == [("SGD", 2)]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="fit must be a callable"):
        learn_task(model, data, [0, 1], fit=3)
