"""Tests for neuslice.cka (linear HSIC/CKA, neuron-HSIC matrix, prefix curves)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import neuslice.cka as cka_mod
import neuslice.ops.reference as ops_reference
from neuslice.cka import (
    gram,
    hsic,
    linear_cka,
    minimal_prefix,
    naive_curve,
    neuron_hsic,
    prefix_curve,
)

TOL = 1e-10
N, D = 37, 13
SPATIAL = (3, 5)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _acts(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Correlated, non-zero-mean activations so centring and cross terms matter."""
    g = _gen(seed)
    d = shape[1]
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    mixed = torch.einsum("nd...,de->ne...", base, mix)
    offset = torch.randn((1,) + tuple(shape[1:]), generator=g, dtype=torch.float64) * 3.0
    return mixed + 0.5 * base + offset


def _rel_close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(1.0, float(b.abs().max()))
    err = float((a - b).abs().max())
    assert err <= tol * scale, f"max abs err {err:.3e} > {tol:.0e} * {scale:.3e}"


def _neuron_grams(acts: torch.Tensor) -> list[torch.Tensor]:
    n, d = acts.shape[0], acts.shape[1]
    return [gram(acts[:, i].reshape(n, -1)) for i in range(d)]


SHAPES = [(N, D), (N, D) + SPATIAL]


# --------------------------------------------------------------------------- gram / hsic
def test_gram_flattens_trailing_dims() -> None:
    X = torch.randn(7, 2, 3, generator=_gen(0), dtype=torch.float64)
    F = X.reshape(7, 6)
    _rel_close(gram(X), F @ F.T)
    v = torch.arange(5, dtype=torch.float64)
    _rel_close(gram(v), torch.outer(v, v))


def test_biased_hsic_matches_definition() -> None:
    g = _gen(1)
    n = 11
    X = torch.randn(n, 4, generator=g, dtype=torch.float64)
    Y = torch.randn(n, 6, generator=g, dtype=torch.float64)
    K, L = gram(X), gram(Y)
    H = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    expected = torch.trace(K @ H @ L @ H) / (n - 1) ** 2
    _rel_close(hsic(K, L), expected)
    assert hsic(K, L).dim() == 0


def _unbiased_hsic_loop(K: np.ndarray, L: np.ndarray) -> float:
    """U-statistic over ordered 4-tuples of distinct indices (independent of the closed form)."""
    n = K.shape[0]
    total = 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2.0 * K[i, j] * L[i, q]
    return total / (n * (n - 1) * (n - 2) * (n - 3))


@pytest.mark.parametrize("n", [4, 7])
def test_unbiased_hsic_matches_u_statistic_loop(n: int) -> None:
    g = _gen(2 + n)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64) + 1.0
    Y = X[:, :2] + 0.3 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    K, L = gram(X), gram(Y)
    expected = _unbiased_hsic_loop(K.numpy(), L.numpy())
    got = float(hsic(K, L, "unbiased"))
    assert abs(got - expected) <= TOL * max(1.0, abs(expected)), (got, expected)


def test_hsic_errors() -> None:
    K = torch.eye(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="estimator"):
        hsic(K, K, "debiased")
    with pytest.raises(ValueError, match="square"):
        hsic(torch.ones(5, 4), K)
    with pytest.raises(ValueError, match="same shape"):
        hsic(K, torch.eye(6))
    with pytest.raises(ValueError, match="n >= 4"):
        hsic(torch.eye(3), torch.eye(3), "unbiased")
    with pytest.raises(ValueError, match="n >= 2"):
        hsic(torch.eye(1), torch.eye(1))
    with pytest.raises(TypeError, match="real"):
        hsic(K.to(torch.complex128), K)


# --------------------------------------------------------------------------- linear_cka
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_linear_cka_self_and_invariances(estimator: str) -> None:
    g = _gen(3)
    X = torch.randn(N, 6, generator=g, dtype=torch.float64) + 2.0
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    Y = torch.randn(N, 4, 2, generator=g, dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    out = linear_cka(X, X, estimator)
    assert isinstance(out, torch.Tensor) and out.dim() == 0 and out.dtype == torch.float64
    _rel_close(out, one)
    _rel_close(linear_cka(X, X @ Q, estimator), one)
    _rel_close(linear_cka(X, 7.5 * X - 3.0, estimator), one)
    base = linear_cka(X, Y, estimator)
    assert float(base) < 0.9
    _rel_close(linear_cka(3.0 * X @ Q, Y, estimator), base)
    _rel_close(linear_cka(Y, X, estimator), base)


@pytest.mark.parametrize("p", [3, 60])  # feature-space (p << n) and Gram (p >> n) routes
def test_linear_cka_matches_gram_definition(p: int) -> None:
    g = _gen(4 + p)
    X = torch.randn(N, p, generator=g, dtype=torch.float64)
    Y = X[:, :2] @ torch.randn(2, 5, generator=g, dtype=torch.float64)
    Y = Y + torch.randn(N, 5, generator=g, dtype=torch.float64)
    K, L = gram(X), gram(Y)
    for est in ("biased", "unbiased"):
        expected = hsic(K, L, est) / torch.sqrt(hsic(K, K, est) * hsic(L, L, est))
        _rel_close(linear_cka(X, Y, est), expected)


def test_linear_cka_constant_is_nan() -> None:
    X = torch.full((9, 3), 0.1, dtype=torch.float64)
    Y = torch.randn(9, 2, generator=_gen(5), dtype=torch.float64)
    assert math.isnan(float(linear_cka(X, Y)))
    assert math.isnan(float(linear_cka(Y, X, "unbiased")))
    assert not math.isnan(float(linear_cka(Y, Y)))


def test_linear_cka_errors() -> None:
    X = torch.randn(5, 2)
    with pytest.raises(ValueError, match="same number of samples"):
        linear_cka(X, torch.randn(6, 2))
    with pytest.raises(ValueError, match="estimator"):
        linear_cka(X, X, estimator="nope")
    with pytest.raises(ValueError, match="n >= 4"):
        linear_cka(X[:3], X[:3], "unbiased")
    with pytest.raises(ValueError, match="no features"):
        linear_cka(torch.randn(5, 0), X)


# --------------------------------------------------------------------------- neuron_hsic
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_neuron_hsic_matches_direct_grams(shape: tuple[int, ...], estimator: str) -> None:
    acts = _acts(shape, seed=10 + len(shape))
    M = neuron_hsic(acts, estimator)
    assert M.shape == (D, D) and M.dtype == torch.float64
    G = _neuron_grams(acts)
    expected = torch.stack([torch.stack([hsic(Gi, Gj, estimator) for Gj in G]) for Gi in G])
    _rel_close(M, expected)
    _rel_close(M, M.T, tol=0.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_neuron_hsic_routes_agree(shape: tuple[int, ...]) -> None:
    acts = _acts(shape, seed=20 + len(shape))
    Mf = neuron_hsic(acts, route="feature")
    Ms = neuron_hsic(acts, route="sample")
    _rel_close(Mf, Ms)
    _rel_close(neuron_hsic(acts, route="auto"), Ms)
    # bilinearity: total sum is the layer self-HSIC
    K = gram(acts)
    _rel_close(Ms.sum(), hsic(K, K))


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_neuron_hsic_chunked_equals_unchunked(
    monkeypatch: pytest.MonkeyPatch, estimator: str
) -> None:
    acts = _acts((N, D) + SPATIAL, seed=30)
    ref = neuron_hsic(acts, estimator, route="sample")
    ref_f = neuron_hsic(acts, route="feature")
    monkeypatch.setattr(ops_reference, "_BLOCK_ELEMS", 3 * N * N)  # 3-neuron chunks, 5 blocks
    _rel_close(neuron_hsic(acts, estimator, route="sample"), ref)
    monkeypatch.setattr(ops_reference, "_BLOCK_ELEMS", 2 * 15 * 15 * D)
    _rel_close(neuron_hsic(acts, route="feature"), ref_f)


def test_neuron_hsic_float32_dtype_and_accuracy() -> None:
    acts = _acts((N, D), seed=40)
    M32 = neuron_hsic(acts.float())
    assert M32.dtype == torch.float32
    M64 = neuron_hsic(acts)
    _rel_close(M32, M64, tol=1e-4)


def test_neuron_hsic_errors() -> None:
    acts = torch.randn(6, 3)
    with pytest.raises(ValueError, match="route must be"):
        neuron_hsic(acts, route="fast")
    with pytest.raises(ValueError, match="estimator"):
        neuron_hsic(acts, "bias")
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        neuron_hsic(torch.randn(6))
    with pytest.raises(ValueError, match="n >= 4"):
        neuron_hsic(acts[:3], "unbiased")
    with pytest.raises(ValueError, match="no neurons"):
        neuron_hsic(torch.randn(6, 0))
    with pytest.raises(ValueError, match="spatial"):
        neuron_hsic(torch.randn(6, 2, 0))


# --------------------------------------------------------------------------- curves
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_prefix_curve_matches_naive(shape: tuple[int, ...], estimator: str) -> None:
    acts = _acts(shape, seed=50 + len(shape))
    order = torch.randperm(D, generator=_gen(51))
    M = neuron_hsic(acts, estimator)
    curve = prefix_curve(M, order)
    assert curve.shape == (D,) and curve.dtype == torch.float64
    sizes, ref = naive_curve(acts, order, step=1, estimator=estimator)
    assert sizes.tolist() == list(range(1, D + 1))
    _rel_close(curve, ref)
    _rel_close(curve[-1], torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_prefix_curve_partial_order_and_step(estimator: str) -> None:
    acts = _acts((N, D) + SPATIAL, seed=60)
    order = [11, 0, 7, 3, 12, 5, 9]  # k = 7 < d
    M = neuron_hsic(acts, estimator)
    curve = prefix_curve(M, order)
    assert curve.shape == (7,)
    sizes, ref = naive_curve(acts, order, step=3, estimator=estimator)
    assert sizes.tolist() == [3, 6, 7]
    _rel_close(curve[sizes - 1], ref)
    assert float(curve[-1]) < 1.0
    # the same neurons in a different order end at the same CKA
    _rel_close(prefix_curve(M, list(reversed(order)))[-1], curve[-1])


def test_naive_curve_step_larger_than_order() -> None:
    acts = _acts((N, D), seed=61)
    sizes, ref = naive_curve(acts, [2, 4, 6], step=10)
    assert sizes.tolist() == [3]
    _rel_close(ref, prefix_curve(neuron_hsic(acts), [2, 4, 6])[-1:])


def test_prefix_curve_float32_input() -> None:
    acts = _acts((N, D), seed=62)
    order = list(range(D))
    c32 = prefix_curve(neuron_hsic(acts).float(), order)
    assert c32.dtype == torch.float32
    _rel_close(c32, prefix_curve(neuron_hsic(acts), order), tol=1e-6)


def test_dead_neurons_give_nan_prefixes() -> None:
    acts = _acts((N, 5), seed=63)
    acts[:, 1] = 0.7  # constant (dead) neurons
    acts[:, 3] = -2.0
    M = neuron_hsic(acts)
    assert float(M[1].abs().max()) == 0.0 and float(M[:, 3].abs().max()) == 0.0
    curve = prefix_curve(M, [1, 3, 0, 2, 4])
    assert math.isnan(float(curve[0])) and math.isnan(float(curve[1]))
    assert not torch.isnan(curve[2:]).any()
    _rel_close(curve[-1], torch.tensor(1.0, dtype=torch.float64))
    _, ref = naive_curve(acts, [1, 3, 0, 2, 4])
    assert torch.equal(torch.isnan(ref), torch.isnan(curve))
    _rel_close(ref[2:], curve[2:])
    # a fully dead layer is all-nan
    assert torch.isnan(prefix_curve(torch.zeros(3, 3), [0, 1])).all()


@pytest.mark.parametrize(
    "order, exc, match",
    [
        ([0, 2, 2], ValueError, "duplicated"),
        ([0, 13], ValueError, "outside"),
        ([-1, 0], ValueError, "outside"),
        ([], ValueError, "empty"),
        (list(range(14)), ValueError, "only d=13"),
        ([0, 1.5], TypeError, "integer"),
        (torch.tensor([0.0, 1.0]), TypeError, "integer"),
        (torch.tensor([[0, 1]]), ValueError, "1-D"),
        ("012", TypeError, "string"),
        (5, TypeError, "sequence"),
    ],
)
def test_bad_order_errors(order: object, exc: type, match: str) -> None:
    M = torch.eye(D, dtype=torch.float64)
    with pytest.raises(exc, match=match):
        prefix_curve(M, order)
    with pytest.raises(exc, match=match):
        naive_curve(torch.randn(6, D, dtype=torch.float64), order)


def test_order_accepts_numpy_and_tensor() -> None:
    M = neuron_hsic(_acts((N, D), seed=64))
    ref = prefix_curve(M, [4, 1, 2])
    _rel_close(prefix_curve(M, np.array([4, 1, 2])), ref)
    _rel_close(prefix_curve(M, torch.tensor([4, 1, 2], dtype=torch.int32)), ref)
    _rel_close(prefix_curve(M, (np.int64(4), 1, 2)), ref)


def test_curve_input_errors() -> None:
    with pytest.raises(ValueError, match="square"):
        prefix_curve(torch.ones(3, 4), [0])
    with pytest.raises(ValueError, match="step must be >= 1"):
        naive_curve(torch.randn(6, 3), [0, 1], step=0)
    with pytest.raises(TypeError, match="step"):
        naive_curve(torch.randn(6, 3), [0, 1], step=1.0)
    with pytest.raises(ValueError, match="n >= 4"):
        naive_curve(torch.randn(3, 3), [0, 1], estimator="unbiased")


# --------------------------------------------------------------------------- minimal_prefix
def test_minimal_prefix_basic_and_edges() -> None:
    c = torch.tensor([0.2, 0.5, 0.9, 0.95, 1.0], dtype=torch.float64)
    assert minimal_prefix(c, 0.9) == 3
    assert minimal_prefix(c, 0.91) == 4
    assert minimal_prefix(c, 0.0) == 1
    assert minimal_prefix(c, 1.5) == 5  # never reached -> len(curve)
    assert minimal_prefix([0.1, 0.3], 0.2) == 2
    # round-off just below the threshold still counts; a real shortfall does not
    assert minimal_prefix(torch.tensor([0.5, 0.9 - 1e-15, 1.0], dtype=torch.float64), 0.9) == 2
    assert minimal_prefix(torch.tensor([0.9 - 1e-9, 0.95], dtype=torch.float64), 0.9) == 2
    # nan never satisfies
    nan = float("nan")
    assert minimal_prefix(torch.tensor([nan, nan, 0.99, 1.0]), 0.95) == 3
    assert minimal_prefix(torch.tensor([nan, nan]), 0.5) == 2
    assert minimal_prefix(torch.tensor([nan, 0.6, 0.7]), 0.5) == 2
    # non-monotone curves: first crossing wins
    assert minimal_prefix([0.1, 0.97, 0.8, 0.99], 0.95) == 2


def test_minimal_prefix_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        minimal_prefix(torch.tensor([]), 0.5)
    with pytest.raises(ValueError, match="1-D"):
        minimal_prefix(torch.ones(2, 2), 0.5)
    with pytest.raises(ValueError, match="finite"):
        minimal_prefix([0.5], float("nan"))
    with pytest.raises(TypeError, match="threshold"):
        minimal_prefix([0.5], "0.5")


def test_public_names() -> None:
    for name in (
        "gram",
        "hsic",
        "linear_cka",
        "neuron_hsic",
        "prefix_curve",
        "naive_curve",
        "minimal_prefix",
    ):
        assert name in cka_mod.__all__ and callable(getattr(cka_mod, name))


def test_auto_route_picks_cheaper(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setenv("NEUSLICE_BACKEND", "torch")  # spy on the reference route choice
    real = ops_reference.block_gram_norms
    monkeypatch.setattr(
        ops_reference, "block_gram_norms", lambda x, route: calls.append(route) or real(x, route)
    )
    neuron_hsic(torch.randn(200, 4, dtype=torch.float64))  # n >> d*s -> feature
    neuron_hsic(torch.randn(6, 4, 8, 8, dtype=torch.float64))  # d*s >> n -> sample
    neuron_hsic(torch.randn(200, 4, dtype=torch.float64), "unbiased")  # unbiased, too
    assert calls == ["feature", "sample", "feature"]


@pytest.mark.parametrize("shape", SHAPES)
def test_unbiased_routes_agree(shape: tuple[int, ...]) -> None:
    acts = _acts(shape, seed=60 + len(shape))
    _rel_close(
        neuron_hsic(acts, "unbiased", route="feature"),
        neuron_hsic(acts, "unbiased", route="sample"),
    )
