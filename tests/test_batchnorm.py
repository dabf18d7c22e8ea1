"""recalibrate_batchnorm: statistics under the mask, caller's model untouched, and the
restructured copy keeps them."""

from __future__ import annotations

import copy

import pytest
import torch

import neuslice
from neuslice.maintenance.batchnorm import recalibrate_batchnorm
from neuslice.slicing import Slice

from conftest import assert_same_snapshot, build, snapshot


def _slice(model, keep=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = {
        l.name: torch.rand(l.num_neurons, generator=g) < keep for l in neuslice.find_layers(model)
    }
    for m in masks.values():
        m[0] = True
    return Slice(
        masks=masks,
        strategy="random",
        metric=None,
        fingerprint=neuslice.model_fingerprint(model),
        input_shape=[2, 6, 6],
    )


def test_statistics_are_those_of_the_masked_inputs():
    model, (x, y), _, _ = build("cnn")
    model.eval()
    sl = _slice(model)
    before = snapshot(model)
    out = recalibrate_batchnorm(model, sl, [(x, y)], progress=False)  # one batch: exact
    assert_same_snapshot(before, snapshot(model))
    assert not out.training
    # reference: each BatchNorm's inputs when the masked network normalises with batch
    # statistics, as it does while the statistics are collected
    probe = copy.deepcopy(model)
    seen = {}
    for n, m in probe.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.train()
            m.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, a[0]))
    with torch.no_grad(), neuslice.masked(probe, sl):
        probe(x)
    for name, inp in seen.items():
        bn = dict(out.named_modules())[name]
        dims = (0, 2, 3)
        torch.testing.assert_close(bn.running_mean, inp.mean(dims), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            bn.running_var, inp.var(dims, unbiased=True), rtol=1e-10, atol=1e-12
        )
    # the second BatchNorm sees zeroed channels of the first block: its statistics changed
    old = dict(model.named_modules())[list(seen)[1]]
    assert not torch.allclose(
        old.running_mean, dict(out.named_modules())[list(seen)[1]].running_mean
    )


def test_restructured_copy_keeps_the_recalibrated_statistics():
    pytest.importorskip("torch_pruning")
    model, (x, y), _, _ = build("cnn")
    model.eval()
    sl = _slice(model)
    out = recalibrate_batchnorm(
        model, sl, [(x[i : i + 9], y[i : i + 9]) for i in range(0, 45, 9)], progress=False
    )
    small, eff = neuslice.restructure(out, sl, x[:2], return_slice=True)
    small.eval()
    with torch.no_grad(), neuslice.masked(out, eff):
        want = out(x)
    with torch.no_grad():
        got = small(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_bad_input():
    model, (x, y), _, _ = build("cnn")
    with pytest.raises(TypeError, match="Slice"):
        recalibrate_batchnorm(model, "slice", [(x, y)], progress=False)
    other = build("mlp")[0]
    with pytest.raises(ValueError, match="different model"):
        recalibrate_batchnorm(model, _slice(other), [(x, y)], progress=False)
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_batchnorm(model, None, [(x[:1], y[:1])], progress=False)
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate_batchnorm(model, None, [(x, y)], num_batches=0, progress=False)


def test_masking_sweep_can_recalibrate():
    from neuslice.experiments.sweep import SweepConfig, accuracy, masking_sweep

    model, (x, y), _, _ = build("cnn")
    model.eval()
    loader = [(x[i : i + 9], y[i : i + 9]) for i in range(0, 45, 9)]
    prof = neuslice.profile(model, loader, 3, progress=False)
    cfg = SweepConfig(metrics=("avg",), ratios=(0.5,), thresholds=(0.95,), random_repeats=1)
    before = snapshot(model)
    _, plain = masking_sweep(model, prof, (x, y), cfg, progress=False)
    _, recal = masking_sweep(
        model, prof, (x, y), cfg, progress=False, recalibrate_with=loader, recalibrate_batches=2
    )
    assert_same_snapshot(before, snapshot(model))
    for a, b in zip(plain, recal):
        sl = (
            neuslice.global_slice(prof, "avg", 0.5)
            if a.strategy == "global"
            else (
                neuslice.categorywise_slice(prof, "avg", 0.5)
                if a.strategy == "categorywise"
                else neuslice.semantic_slice(prof, "avg", 0.95, criterion="layer_cka")
            )
        )
        fixed = recalibrate_batchnorm(model, sl, loader, num_batches=2, progress=False)
        with neuslice.masked(fixed, sl):
            assert b.accuracy == accuracy(fixed, x, y)
        with neuslice.masked(model, sl):
            assert a.accuracy == accuracy(model, x, y)
