"""Tests for the matched-compression evaluation (neuslice.experiments.matched, issue #12)."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import neuslice
from neuslice.experiments import matched as M

torch.set_num_threads(1)
C = 3


def _cnn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 8, 3, padding=1),
            bn1=nn.BatchNorm2d(8),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(8 * 4 * 4, 48),
            relu2=nn.ReLU(),
            head=nn.Linear(48, C),
        )
    ).eval()


def _data(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    x = torch.randn(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    return x, y


def _case(seed):
    model = _cnn(seed)
    x, y = _data(seed=seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    prof = neuslice.profile(model, loader, C, metrics=("taylor",), progress=False)
    return M.Case("tiny", seed, model, prof, (x, y), train_loader=loader, recal_batches=2)


@pytest.fixture(scope="module")
def cases():
    return [_case(s) for s in (0, 1, 2)]


class _Stub:
    def __init__(self, rate):
        self.rate = rate

    def compression_rate(self, model):
        return self.rate


def test_bisect_hits_target_on_continuous_knob():
    for target in (0.1, 0.5, 0.83):
        k, s, r = M.bisect_rate(lambda v: _Stub(1 - v**2), None, target, tol=1e-4)
        assert math.isfinite(r) and abs(r - target) <= 1e-4
        assert math.isclose(k, math.sqrt(1 - target), abs_tol=1e-3)


def test_bisect_unreachable_returns_closest():
    k, s, r = M.bisect_rate(lambda v: _Stub(0.9 if v < 0.5 else 0.2), None, 0.6)
    assert math.isclose(r, 0.9) or math.isclose(r, 0.2)
    k, s, r = M.bisect_rate(lambda v: _Stub(0.3), None, 0.6)  # never reaches: knob's edge
    assert math.isclose(r, 0.3)
    with pytest.raises(ValueError):
        M.bisect_rate(lambda v: _Stub(0.3), None, float("nan"))
    with pytest.raises(ValueError):
        M.bisect_rate(lambda v: _Stub(0.3), None, 0.5, lo=1.0, hi=0.5)


@pytest.mark.parametrize("knob", [M.global_knob(), M.categorywise_knob()])
def test_bisect_hits_target_on_small_model(cases, knob):
    case = cases[0]
    for target in (0.3, 0.5, 0.7):
        k, sl, r = M.bisect_rate(lambda v: knob.make(case, "taylor", v), case.model, target)
        assert math.isfinite(r)
        assert abs(r - target) <= 0.04, (knob.name, target, r)  # granularity of 8+48 neurons
        assert math.isclose(r, sl.compression_rate(case.model))


def test_paired_stats_against_scipy_and_by_hand():
    from scipy import stats

    a, b = [1.0, 2.0, 3.0], [0.0, 0.0, 1.0]
    st = M.paired_stats(a, b)
    assert math.isclose(st["mean_diff"], 5 / 3)
    assert math.isclose(st["sd_diff"], math.sqrt(1 / 3))
    assert math.isclose(st["d"], (5 / 3) / math.sqrt(1 / 3))
    assert math.isclose(st["p"], float(stats.ttest_rel(a, b).pvalue))
    # t = mean / (sd / sqrt(n)) = 5, df = 2 -> two-sided p = 0.037749...
    assert math.isclose(st["p"], 0.0377, abs_tol=5e-4)
    z = M.paired_stats([1.0, 2.0], [0.0, 1.0])  # zero spread: p and d undefined, not 0
    assert math.isnan(z["p"]) and math.isnan(z["d"]) and math.isclose(z["mean_diff"], 1.0)
    # equal differences with a rounding-error spread (0.7 - 0.6 != 0.8 - 0.7 in binary floating
    # point) are no spread either: no p of 0 and no d of 1e15
    r = M.paired_stats([0.7, 0.8], [0.6, 0.7])
    assert math.isnan(r["p"]) and math.isnan(r["d"]) and r["sd_diff"] == 0.0
    with pytest.raises(ValueError):
        M.paired_stats([1.0], [1.0, 2.0])


def test_run_end_to_end(cases, tmp_path):
    crit = [M.paper_semantic(), M.consumer_semantic(samples=16)]
    rows = M.run(
        cases, metrics=("taylor",), targets=(0.5,), criteria=crit, thresholds=(0.9,), progress=False
    )
    strategies = {r.strategy for r in rows}
    assert {
        "global",
        "categorywise",
        "random",
        "global@sizes",
        crit[0].name,
        crit[1].name,
    } <= strategies
    for r in rows:
        assert math.isfinite(r.acc) and 0.0 <= r.acc <= 1.0
        assert math.isfinite(r.acc_plain) and 0.0 <= r.acc_plain <= 1.0
        assert r.reestimated  # the models have BatchNorm
        assert math.isfinite(r.rate)
    for r in rows:  # global@sizes and random keep the criterion's per-layer sizes
        if r.strategy in ("random", "global@sizes"):
            own = [
                q
                for q in rows
                if q.seed == r.seed and q.setting == r.setting and q.strategy == r.criterion
            ]
            assert own and own[0].kept == r.kept
    base = [r for r in rows if r.strategy == "global" and r.setting == "target 50%"]
    assert len(base) == 3 and all(abs(r.rate - 0.5) <= 0.04 for r in base)
    summ = M.summarise(rows)
    rec = [s for s in summ if s["setting"] == "target 50%" and s["criterion"] == crit[1].name][0]
    assert rec["strategies"][crit[1].name]["n"] == 3 and "global" in rec["vs"]
    table = M.format_table(rows)
    assert "global@sizes" in table and "target 50%" in table and "θ=0.9" in table
    assert "plain masking" in M.format_table(rows, "acc_plain")
    path = tmp_path / "matched.png"
    M.plot(rows, path)
    assert path.stat().st_size > 1000


def test_run_rejects_bad_targets(cases):
    with pytest.raises(ValueError):
        M.run(cases[:1], targets=(1.2,), progress=False)
    with pytest.raises(ValueError):
        M.run([], progress=False)
