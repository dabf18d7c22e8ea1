"""The per-category finish of ``neuslice.profile``: block norms of the feature route from the
buffered samples or from the co-moment, the minibatch route's sums, prefix curves of several
orders at once, the packed sample route of the reference op and its dispatch."""

from __future__ import annotations

import copy

import pytest
import torch

from neuslice import cka, ops
from neuslice.ops import dispatch, reference
from neuslice.profiling.stats import CovarianceAccumulator, MinibatchHSICAccumulator


def _block_norms_ref(x: torch.Tensor, d: int) -> torch.Tensor:
    """Biased neuron-HSIC of the samples ``x`` ``(n, d·s)``, all in float64."""
    x = x.double()
    return cka.neuron_hsic(x.view(x.shape[0], d, -1), "biased")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("d,s,n", [(7, 3, 5), (13, 5, 11), (6, 1, 9), (17, 2, 29), (1, 4, 3)])
def test_feature_block_norms_from_samples_and_from_comoment(d, s, n):
    """Few buffered samples: exact float64 from the samples; flushed (float32 products added
    into float64 sums): within float32 rounding of the float64 reference."""
    g = torch.Generator().manual_seed(d * 100 + n)
    x = (torch.randn(n, d * s, generator=g) * 3 + 5).float()  # offset: centring matters
    y = torch.zeros(n, dtype=torch.long)
    ref = _block_norms_ref(x, d)

    few = CovarianceAccumulator(1, d * s)
    few.update(x, y)
    direct = few.samples_cheaper(n, d, s)
    assert direct == ((d, s, n) != (17, 2, 29))  # 29 samples of 34 features: the co-moment
    m, cnt = few.block_norms_(0, d)
    assert int(cnt) == n and int(few.count[0]) == n
    assert m.dtype == torch.float64
    if direct:
        assert torch.equal(m, m.T) and _rel(m, ref) < 1e-12

    # buffer of 4: the samples are flushed into the co-moment as they come
    flushed = CovarianceAccumulator(1, d * s, buffer_size=4)
    for part in x.split(3):
        flushed.update(part, y[: part.shape[0]])
    m2, cnt2 = flushed.block_norms_(0, d)
    assert int(cnt2) == n
    # float32 products of O(1)-scaled centred values: relative error ~ p · 2^-24 at worst
    assert _rel(m2, ref) < 1e-5


def test_feature_block_norms_of_an_empty_category_are_zero():
    acc = CovarianceAccumulator(2, 6)
    acc.update(torch.randn(3, 6), torch.zeros(3, dtype=torch.long))
    m, n = acc.block_norms_(1, 3)
    assert int(n) == 0 and not m.any()


def test_feature_finish_after_checkpoint_of_buffered_samples():
    x = torch.randn(8, 12)
    y = torch.tensor([0, 1] * 4)
    a = CovarianceAccumulator(2, 12)
    a.update(x, y)
    b = CovarianceAccumulator(2, 12)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as from a file: no shared tensors
    for k in range(2):
        ma, _ = a.block_norms_(k, 4)
        mb, _ = b.block_norms_(k, 4)
        assert torch.equal(ma, mb)


def _hsic32(a, out=None):
    return cka._neuron_hsic(a, "unbiased", out=out)


@pytest.mark.parametrize("storage", [False, True])
def test_minibatch_sums_single_and_several_minibatches(storage):
    """One minibatch: the HSIC itself; several: their size-weighted mean; ``total`` is always
    the sum of ``n·HSIC``, also after a state round trip."""
    g = torch.Generator().manual_seed(1)
    d = 5
    x = torch.randn(23, d, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0] * 6 + [1] * 17)
    store = torch.empty(2, d, d, dtype=torch.float64) if storage else None
    acc = MinibatchHSICAccumulator(2, d, 8, _hsic32, storage=store)
    acc.update(x, y)
    acc.finalize()
    a0, a1 = x[:6], x[6:]
    ref0 = cka.neuron_hsic(a0, "unbiased")
    ref1 = cka.neuron_hsic(a1[:8], "unbiased") * 8 + cka.neuron_hsic(a1[8:16], "unbiased") * 8
    ref1 = ref1 / 16  # the last sample of category 1 is too few for a minibatch
    m0, w0 = acc.result_of(0)
    m1, w1 = acc.result_of(1)
    assert float(w0) == 6 and float(w1) == 16
    assert _rel(m0, ref0) < 1e-12 and _rel(m1, ref1) < 1e-12
    scaled0, _ = acc.result_of(0, normalise=False)
    assert _rel(scaled0 / scaled0.abs().max(), ref0 / ref0.abs().max()) < 1e-12
    total = acc.state_dict()["total"]
    assert _rel(total[0], ref0 * 6) < 1e-12 and _rel(total[1], ref1 * 16) < 1e-12
    again = MinibatchHSICAccumulator(2, d, 8, _hsic32)
    again.load_state_dict(acc.state_dict())
    assert _rel(again.result_of(0)[0], ref0) < 1e-12


def test_minibatch_sums_continue_after_a_single_minibatch():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 4, 2, generator=g, dtype=torch.float64)
    y = torch.zeros(12, dtype=torch.long)
    acc = MinibatchHSICAccumulator(1, 4, 6, _hsic32)
    acc.update(x[:6], y[:6])  # one minibatch, held unscaled
    acc.update(x[6:], y[6:])  # a second one
    ref = (cka.neuron_hsic(x[:6], "unbiased") + cka.neuron_hsic(x[6:], "unbiased")) / 2
    assert _rel(acc.result_of(0)[0], ref) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_neuron_hsic_into_float64_memory(dtype):
    g = torch.Generator().manual_seed(3)
    for d in (5, 300, 700):  # small, and tiled symmetrisation
        a = torch.randn(9, d, 2, generator=g, dtype=dtype)
        out = torch.full((d, d), float("nan"), dtype=torch.float64)
        got = cka._neuron_hsic(a, "unbiased", out=out)
        assert got.data_ptr() == out.data_ptr() and torch.equal(out, out.T)
        assert torch.equal(out, cka.neuron_hsic(a, "unbiased").double())


def _prefix_ref(M: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    P = M.double()[idx][:, idx]
    self_ = P.cumsum(0).cumsum(1).diagonal()
    cross = M.double()[idx].sum(1).cumsum(0)
    return cross / torch.sqrt(self_ * M.double().sum())


@pytest.mark.parametrize("gather", [None, 300])
def test_prefix_curves_of_orders_of_different_lengths(monkeypatch, gather):
    if gather is not None:  # several gathers of the diagonal blocks
        monkeypatch.setattr(cka, "_GATHER_ELEMS", gather)
    g = torch.Generator().manual_seed(4)
    d = 150  # more than two blocks of positions
    a = torch.randn(d, 40, generator=g, dtype=torch.float64)
    M = a @ a.T
    orders = [torch.randperm(d, generator=g)[:k] for k in (150, 70, 1, 64, 65, 129)]
    got = cka.prefix_curves(M, orders)
    for idx, c in zip(orders, got):
        assert c.shape == (idx.numel(),)
        assert _rel(c, _prefix_ref(M, idx)) < 1e-12
        assert torch.equal(c, cka.prefix_curve(M, idx))


@pytest.mark.parametrize("n,d,s", [(3, 5, 4), (9, 17, 3), (16, 8, 7), (33, 6, 2)])
def test_packed_sample_route_matches_feature_route(n, d, s):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, s, generator=g, dtype=torch.float64)
    want = reference.block_gram_norms(x, "feature")
    got = reference.block_gram_norms(x, "sample")
    assert _rel(got, want) < 1e-12


def test_sample_route_of_few_samples_dispatches_to_torch():
    cpp = dispatch.BACKENDS["cpp"]
    if cpp.not_supported_reasons(torch.randn(4, 2, 2)):
        pytest.skip("C++ extension not available")
    few, many = torch.randn(16, 8, 4), torch.randn(17, 8, 4)
    assert dispatch.select(few, route="sample").name == "torch"
    assert dispatch.select(few, route="feature").name == "cpp"
    assert dispatch.select(many, route="sample").name == "cpp"
    assert dispatch.select(few).name == "cpp"  # route unknown: as before
    auto, native = (ops.block_gram_norms(few, "sample", b) for b in (None, "cpp"))
    assert _rel(auto, native) < 1e-5  # float32 sums in another order


def test_memory_estimate_of_minibatch_sums_kept_in_the_results():
    from neuslice.runtime.memory import estimate

    layers = [("big", 300, 49)]  # the minibatch route
    kw = dict(hsic_route="minibatch", cka_batch=8)
    kept = estimate(layers, 10, category_order="any", keep_hsic=True, **kw)
    assert kept.parts.get("HSIC accumulators", 0) == 0  # the sums live in the results
    assert kept.parts["HSIC results"] == 8 * 10 * 300 * 300
    curves = estimate(layers, 10, category_order="any", keep_hsic=False, **kw)
    assert curves.parts["HSIC accumulators"] == 8 * 10 * 300 * 300
    grouped = estimate(layers, 10, category_order="grouped", keep_hsic=False, **kw)
    assert grouped.parts["HSIC accumulators"] == 8 * 2 * 300 * 300
