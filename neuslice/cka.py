"""Linear-kernel HSIC / CKA and neuron-level CKA curves.

Notation: activations ``acts`` have shape ``(n, d)`` or ``(n, d, *spatial)``
(``n`` samples, ``d`` neurons).  Neuron ``i``'s output ``A_i`` is ``(n, s)`` with
``s = prod(spatial)`` and its Gram matrix is ``G_i = A_i A_i^T``.  The Gram
matrix of a neuron set ``S`` is ``K_S = sum_{i in S} G_i``.

Because HSIC is bilinear in its two Gram arguments, every CKA value between a
neuron subset and the whole layer follows from the ``d x d`` *neuron-HSIC
matrix* ``M_ij = HSIC(G_i, G_j)`` (see :func:`neuron_hsic`), which lets
:func:`prefix_curve` evaluate all prefixes of a neuron ordering in ``O(d^2)``.
:func:`naive_curve` is the from-scratch reference.

Numerical conventions
---------------------
* Computation happens in the (floating) input dtype; integer/bool inputs are
  cast to ``torch.get_default_dtype()``.
* Features are centred before Grams are formed (shift by the first sample,
  then subtract the mean).  Both HSIC estimators are invariant to this in
  exact arithmetic, but it makes constant features exactly zero, so a dead
  representation yields an HSIC of exactly ``0``.
* A CKA whose denominator is not positive (constant representation, or a
  negative unbiased self-HSIC) is reported as ``nan`` rather than raising:
  callers scanning many layers/neurons can skip dead ones.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch

from . import ops
from .ops import ROUTES

__all__ = [
    "ESTIMATORS",
    "ROUTES",
    "gram",
    "hsic",
    "linear_cka",
    "neuron_hsic",
    "prefix_curve",
    "prefix_curves",
    "naive_curve",
    "minimal_prefix",
]

ESTIMATORS: tuple[str, ...] = ("biased", "unbiased")

# Largest number of elements an intermediate block may hold in neuron_hsic
# (2**25 float64 elements = 256 MiB).  Larger problems are processed in chunks.

# Positions per block in prefix_curve's self-HSIC (the matmul vs gather trade-off).
_PREFIX_BLOCK: int = 64
# Largest number of entries prefix_curves gathers at once (2**22 float64 = 32 MiB).
_GATHER_ELEMS: int = 2**22

# Relative tolerance used by minimal_prefix.
_THRESHOLD_RTOL: float = 1e-12


# --------------------------------------------------------------------------- helpers
def _as_float(x: Any, name: str) -> torch.Tensor:
    """Return ``x`` as a real floating tensor (casting ints/bools to the default dtype)."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(
                f"{name} must be a torch.Tensor or array-like of numbers, got {type(x).__name__}"
            ) from exc
    if x.is_complex():
        raise TypeError(f"{name} must be real-valued, got complex dtype {x.dtype}")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    return x


def _check_estimator(estimator: Any) -> str:
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return estimator


def _min_samples(estimator: str) -> int:
    return 2 if estimator == "biased" else 4


def _check_n(n: int, estimator: str, what: str) -> None:
    need = _min_samples(estimator)
    if n < need:
        raise ValueError(
            f"{what} has n={n} samples but the {estimator} HSIC estimator needs n >= {need}; "
            "pass more samples"
            + (" or use estimator='biased'" if estimator == "unbiased" and n >= 2 else "")
        )


def _centre(x: torch.Tensor) -> torch.Tensor:
    """Centre along dim 0; constant columns become exactly zero."""
    x = x - x[:1]
    return x - x.mean(dim=0, keepdim=True)


def _flat_features(x: torch.Tensor, name: str) -> torch.Tensor:
    """(n, ...) -> (n, p); a 1-D input is one feature per sample."""
    if x.dim() == 0:
        raise ValueError(f"{name} must have shape (n, ...) with n samples, got a 0-dim tensor")
    x = x.reshape(x.shape[0], -1)
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no features (shape {tuple(x.shape)}); need at least one")
    return x


def _cka_from_hsic(xy: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
    """xy / sqrt(xx yy), nan where xx <= 0 or yy <= 0."""
    ok = (xx > 0) & (yy > 0)
    denom = torch.sqrt(torch.where(ok, xx * yy, torch.ones_like(xx)))
    return torch.where(ok, xy / denom, torch.full_like(xy, float("nan")))


def _as_order(order: Any, d: int) -> torch.Tensor:
    """Validate a sequence of distinct neuron indices in [0, d) -> 1-D int64 tensor (CPU)."""
    if isinstance(order, torch.Tensor):
        if order.dtype == torch.bool or order.is_floating_point() or order.is_complex():
            raise TypeError(f"order must hold integer indices, got a tensor of dtype {order.dtype}")
        idx = order.detach().to(device="cpu", dtype=torch.long)
    else:
        if isinstance(order, (str, bytes)):
            raise TypeError("order must be a 1-D sequence or tensor of ints, got a string")
        if hasattr(order, "__array__") and not isinstance(order, (list, tuple)):
            return _as_order(torch.as_tensor(order), d)
        try:
            seq = list(order)
        except TypeError as exc:
            raise TypeError(
                f"order must be a 1-D sequence or tensor of ints, got {type(order).__name__}"
            ) from exc
        vals = []
        for v in seq:
            try:
                if isinstance(v, bool):
                    raise TypeError
                vals.append(operator.index(v))
            except TypeError as exc:
                raise TypeError(
                    f"order must contain integer neuron indices, found {v!r} ({type(v).__name__})"
                ) from exc
        idx = torch.tensor(vals, dtype=torch.long)
    if idx.dim() != 1:
        raise ValueError(f"order must be 1-D, got shape {tuple(idx.shape)}")
    k = idx.numel()
    if k == 0:
        raise ValueError("order is empty; pass at least one neuron index")
    if k > d:
        raise ValueError(f"order has {k} entries but there are only d={d} neurons")
    bad = (idx < 0) | (idx >= d)
    if bool(bad.any()):
        first = int(idx[bad][0])
        raise ValueError(
            f"order contains index {first} outside [0, {d}); indices must be in [0, d) "
            "(negative indices are not wrapped)"
        )
    if torch.unique(idx).numel() != k:
        vals, counts = torch.unique(idx, return_counts=True)
        dup = vals[counts > 1].tolist()
        raise ValueError(f"order must not repeat indices; duplicated: {dup}")
    return idx


def _neuron_outputs(acts: Any, estimator: str) -> torch.Tensor:
    """Validate activations and return them as (n, d, s)."""
    acts = _as_float(acts, "acts")
    if acts.dim() < 2:
        raise ValueError(
            f"acts must have shape (n, d) or (n, d, *spatial), got shape {tuple(acts.shape)}"
        )
    n, d = acts.shape[0], acts.shape[1]
    if d == 0:
        raise ValueError(f"acts has no neurons (shape {tuple(acts.shape)})")
    s = math.prod(acts.shape[2:])
    if s == 0:
        raise ValueError(f"acts has an empty spatial extent (shape {tuple(acts.shape)})")
    _check_n(n, estimator, "acts")
    return acts.reshape(n, d, s)


# --------------------------------------------------------------------------- public API
def gram(X: Any) -> torch.Tensor:
    """Linear Gram matrix ``X X^T`` of ``X`` with shape ``(n, ...)`` (trailing dims flattened).

    A 1-D ``X`` is treated as ``n`` samples of one feature.  Returns ``(n, n)``.
    """
    X = _flat_features(_as_float(X, "X"), "X")
    return X @ X.T


def hsic(K: Any, L: Any, estimator: str = "biased") -> torch.Tensor:
    """HSIC between two ``(n, n)`` kernel (Gram) matrices; returns a 0-dim tensor.

    * ``"biased"``: ``tr(K H L H) / (n-1)^2`` with ``H = I - 11^T/n`` (needs ``n >= 2``).
    * ``"unbiased"``: Song et al. (2012) estimator on the zero-diagonal matrices
      (needs ``n >= 4``).
    """
    estimator = _check_estimator(estimator)
    K = _as_float(K, "K")
    L = _as_float(L, "L")
    for name, M in (("K", K), ("L", L)):
        if M.dim() != 2 or M.shape[0] != M.shape[1]:
            raise ValueError(f"{name} must be a square (n, n) matrix, got shape {tuple(M.shape)}")
    if K.shape != L.shape:
        raise ValueError(
            f"K and L must have the same shape (same samples), got {tuple(K.shape)} and "
            f"{tuple(L.shape)}"
        )
    dtype = torch.promote_types(K.dtype, L.dtype)
    K, L = K.to(dtype), L.to(dtype)
    n = K.shape[0]
    _check_n(n, estimator, "K")
    if estimator == "biased":
        Kc = K - K.mean(dim=0, keepdim=True)
        Kc = Kc - Kc.mean(dim=1, keepdim=True)
        # tr(HKH L) = sum_ij (HKH)_ij L_ji
        return (Kc * L.T).sum() / (n - 1) ** 2
    Kt = K.clone()
    Lt = L.clone()
    Kt.diagonal().zero_()
    Lt.diagonal().zero_()
    tr = (Kt * Lt.T).sum()
    sums = Kt.sum() * Lt.sum() / ((n - 1) * (n - 2))
    cross = (Kt.sum(dim=0) * Lt.sum(dim=1)).sum() * (2.0 / (n - 2))
    return (tr + sums - cross) / (n * (n - 3))


def linear_cka(X: Any, Y: Any, estimator: str = "biased") -> torch.Tensor:
    """Linear CKA between features ``X`` ``(n, p, ...)`` and ``Y`` ``(n, q, ...)``.

    Returns a 0-dim tensor (dtype: promotion of the inputs' dtypes).  If either
    representation is constant (self-HSIC ``<= 0``, also possible for a noisy
    unbiased estimate) the result is ``nan``.  The biased estimator uses the
    feature-space identity ``||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``
    when it is cheaper than forming ``n x n`` Grams.
    """
    estimator = _check_estimator(estimator)
    X = _flat_features(_as_float(X, "X"), "X")
    Y = _flat_features(_as_float(Y, "Y"), "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X and Y must have the same number of samples (dim 0), got {X.shape[0]} and "
            f"{Y.shape[0]}"
        )
    dtype = torch.promote_types(X.dtype, Y.dtype)
    X, Y = X.to(dtype), Y.to(dtype)
    n, p = X.shape
    q = Y.shape[1]
    _check_n(n, estimator, "X")
    Xc, Yc = _centre(X), _centre(Y)
    if estimator == "biased" and n * (p * p + q * q + p * q) <= n * n * (p + q) + n * n:
        xy = (Xc.T @ Yc).square().sum()
        xx = (Xc.T @ Xc).square().sum()
        yy = (Yc.T @ Yc).square().sum()
        return _cka_from_hsic(xy, xx, yy)
    K, L = Xc @ Xc.T, Yc @ Yc.T
    return _cka_from_hsic(hsic(K, L, estimator), hsic(K, K, estimator), hsic(L, L, estimator))


def neuron_hsic(
    acts: Any, estimator: str = "biased", route: str = "auto", backend: str | None = None
) -> torch.Tensor:
    """Neuron-HSIC matrix ``M_ij = HSIC(G_i, G_j)`` of shape ``(d, d)`` (symmetric).

    ``acts``: ``(n, d)`` or ``(n, d, *spatial)``. With centred outputs ``A``, both estimators
    follow from ``B = tr(G_i G_j)`` (:func:`neuslice.ops.block_gram_norms`, the heavy part,
    natively accelerated) and the Gram diagonals ``D_ip = ‖A_i[p]‖²``:
    biased ``M = B / (n-1)²``; unbiased
    ``M = [B - DDᵀ + ttᵀ/((n-1)(n-2)) - 2/(n-2)·DDᵀ] / (n(n-3))``
    with ``t = -D·1`` (the zero-diagonal Grams of centred outputs have row sums ``-D``).

    ``route``: ``"feature"`` (block norms of the ``(d·s)²`` covariance, cost ``n (d s)²``),
    ``"sample"`` (inner products of per-neuron ``n x n`` Grams, cost ``d n² s + d² n²``) or
    ``"auto"`` (the cheaper). ``backend``: see :mod:`neuslice.ops.dispatch`.
    """
    return _neuron_hsic(acts, estimator, route, backend)


def _neuron_hsic(
    acts: Any,
    estimator: str = "biased",
    route: str = "auto",
    backend: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`neuron_hsic`, written into ``out`` (a ``(d, d)`` tensor of any floating dtype,
    e.g. float64 result memory) if given: the symmetrisation then makes the one pass over it."""
    estimator = _check_estimator(estimator)
    if not isinstance(route, str) or route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    A = _neuron_outputs(acts, estimator)
    n = A.shape[0]
    if A.dtype in (torch.float16, torch.bfloat16):
        A = A.float()  # centring needs float32 at least
    Ac = _centre(A)
    M = ops.block_gram_norms(Ac, route, backend).to(Ac.dtype)
    if estimator == "biased":
        scale = 1.0 / (n - 1) ** 2
    else:
        D = Ac.square().sum(dim=2).T  # (d, n) Gram diagonals
        t = -D.sum(dim=1)
        M.addmm_(D, D.T, alpha=-(1.0 + 2.0 / (n - 2)))
        M.addr_(t, t, alpha=1.0 / ((n - 1) * (n - 2)))
        scale = 1.0 / (n * (n - 3))
    return _symmetrize_(M, 0.5 * scale, out)  # exactly symmetric


_SYM_TILE: int = 256  # tile side of the in-place symmetrisation of large matrices


def _symmetrize_(M: torch.Tensor, factor: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(M + Mᵀ) · factor`` (computed in ``M``'s dtype), written into ``out`` if given, else in
    place for large ``M`` (tile by tile: no second d x d matrix); the same values either way, as
    ``M_ij + M_ji`` is the same sum as ``M_ji + M_ij``."""
    d = M.shape[0]
    if out is None and d <= 2 * _SYM_TILE:
        return (M + M.T).mul_(factor)
    dst = M if out is None else out
    b = _SYM_TILE
    for i in range(0, d, b):
        for j in range(i, d, b):
            a = M[i : i + b, j : j + b] + M[j : j + b, i : i + b].T
            a.mul_(factor)
            dst[i : i + b, j : j + b] = a
            if j != i:
                dst[j : j + b, i : i + b] = a.T
    return dst


def prefix_curve(M: Any, order: Any) -> torch.Tensor:
    """CKA of every prefix of ``order`` against the whole layer, from the neuron-HSIC matrix.

    ``c[k-1] = CKA(K_{order[:k]}, K_all)`` for ``k = 1..len(order)``, computed in
    ``O(d^2)`` with cumulative sums (in float64; result cast back to ``M``'s
    dtype).  ``order`` holds distinct indices in ``[0, d)``; it may be shorter
    than ``d``.  Entries whose prefix self-HSIC or the layer self-HSIC is
    ``<= 0`` (dead neurons, negative unbiased estimates) are ``nan``.
    """
    M = _as_float(M, "M")
    if M.dim() != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(
            f"M must be a square (d, d) neuron-HSIC matrix, got shape {tuple(M.shape)}"
        )
    d = M.shape[0]
    if d == 0:
        raise ValueError("M is empty (d=0); need at least one neuron")
    return prefix_curves(M, [order])[0]


def prefix_curves(M: Any, orders: list) -> list[torch.Tensor]:
    """:func:`prefix_curve` for several orders of the same layer at once (one pass over ``M``
    serves them all: the curves of every metric of a category cost little more than one)."""
    M = _as_float(M, "M")
    if M.dim() != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(
            f"M must be a square (d, d) neuron-HSIC matrix, got shape {tuple(M.shape)}"
        )
    d = M.shape[0]
    if d == 0:
        raise ValueError("M is empty (d=0); need at least one neuron")
    # float64 is cheap here (O(d^2)); MPS has no float64, so fall back to the CPU there
    work = torch.device("cpu") if M.device.type == "mps" else M.device
    idxs = [_as_order(order, d).to(work) for order in orders]
    M64 = M.to(device=work, dtype=torch.float64)
    row = M64.sum(dim=1)
    b = _PREFIX_BLOCK
    # HSIC(K_S, K_S) of the prefix of length k adds, for its k-th neuron j, twice its entries
    # with the earlier neurons plus its own; one cumulative sum then gives every prefix. The
    # entries with earlier neurons are split by blocks of _PREFIX_BLOCK positions: those in
    # earlier blocks come from one matmul with the block indicators of every order (M @ E, a
    # cumulative sum over blocks), those in its own block from a gather of the (b x b) diagonal
    # blocks -- no d x d permuted copy (a strided gather of d^2 entries was ~10x slower at
    # d = 2048). All orders are handled together, padded to a whole number of blocks.
    lens = [idx.numel() for idx in idxs]
    n_o, k_max = len(idxs), max(lens)
    nb = (k_max + b - 1) // b
    width = b if nb > 1 else k_max
    length = nb * width
    pad = torch.zeros(n_o, length, dtype=torch.long, device=work)
    for o, idx in enumerate(idxs):
        pad[o, : idx.numel()] = idx
    pos = torch.arange(length, device=work)
    blk = pos // width
    earlier = torch.zeros(n_o, length, dtype=torch.float64, device=work)
    if nb > 1:
        valid = pos.unsqueeze(0) < torch.tensor(lens, device=work).unsqueeze(1)
        col = (torch.arange(n_o, device=work).unsqueeze(1) * nb + blk.unsqueeze(0))[valid]
        E = torch.zeros(d, n_o * nb, dtype=torch.float64, device=work)
        E[pad[valid], col] = 1.0
        Fc = torch.cumsum((M64 @ E).view(d, n_o, nb), dim=2)  # sum of M_ij over blocks <= B
        prev = Fc[pad, torch.arange(n_o, device=work).unsqueeze(1), (blk - 1).clamp(min=0)]
        earlier = torch.where(blk >= 1, prev, earlier)
    # own block: the strict upper triangles of the diagonal blocks, a bounded number at a time
    blocks = pad.view(n_o * nb, width)
    step = max(1, _GATHER_ELEMS // (width * width))
    own = earlier.view(n_o * nb, width)
    flat_m = M64.contiguous().view(-1)
    for s0 in range(0, n_o * nb, step):
        ib = blocks[s0 : s0 + step]
        flat = (ib.unsqueeze(2) * d + ib.unsqueeze(1)).view(-1)  # entries (ib_p, ib_q)
        sub = flat_m.index_select(0, flat).view(ib.shape[0], width, width)
        own[s0 : s0 + step] += sub.triu_(1).sum(1)
    self_ = torch.cumsum(earlier.mul_(2).add_(M64.diagonal()[pad]), dim=1)
    cross = torch.cumsum(row[pad], dim=1)
    total = row.sum().expand_as(self_)
    curves = _cka_from_hsic(cross, self_, total).to(device=M.device, dtype=M.dtype)
    return [curves[o, :k] for o, k in enumerate(lens)]


def naive_curve(
    acts: Any, order: Any, step: int = 1, estimator: str = "biased"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference prefix-CKA curve recomputing every Gram matrix from scratch.

    For ``k = step, 2*step, ...`` (plus ``len(order)`` at the end) computes
    ``CKA(K_{order[:k]}, K_all)`` with :func:`hsic`.  Returns ``(sizes, curve)``:
    ``sizes`` is an int64 tensor of prefix lengths and ``curve`` matches
    ``prefix_curve(M, order)[sizes - 1]``.  ``nan`` conventions as in
    :func:`prefix_curve`.
    """
    estimator = _check_estimator(estimator)
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be a positive int, got {step!r} ({type(step).__name__})")
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    A = _neuron_outputs(acts, estimator)
    n, d, _ = A.shape
    idx = _as_order(order, d).to(A.device)
    k_max = idx.numel()
    sizes = list(range(step, k_max + 1, step))
    if not sizes or sizes[-1] != k_max:
        sizes.append(k_max)
    Ac = _centre(A)
    full = Ac.reshape(n, -1)
    K_all = full @ full.T
    h_all = hsic(K_all, K_all, estimator)
    vals = []
    for k in sizes:
        sub = Ac[:, idx[:k]].reshape(n, -1)
        K_S = sub @ sub.T
        vals.append(_cka_from_hsic(hsic(K_S, K_all, estimator), hsic(K_S, K_S, estimator), h_all))
    return torch.tensor(sizes, dtype=torch.long), torch.stack(vals)


def minimal_prefix(curve: Any, threshold: float) -> int:
    """Smallest ``k`` (1-based) with ``curve[k-1] >= threshold``; ``len(curve)`` if none.

    A relative tolerance of ``1e-12 * |threshold|`` absorbs round-off, so values
    a hair below the threshold still count.  ``nan`` entries never qualify.
    """
    c = _as_float(curve, "curve")
    if c.dim() != 1:
        raise ValueError(f"curve must be 1-D, got shape {tuple(c.shape)}")
    if c.numel() == 0:
        raise ValueError("curve is empty; it must contain at least one value")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        if isinstance(threshold, torch.Tensor) and threshold.numel() == 1:
            threshold = float(threshold)
        else:
            raise TypeError(f"threshold must be a real number, got {type(threshold).__name__}")
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    target = threshold - _THRESHOLD_RTOL * abs(threshold)
    hits = torch.nonzero(c.to(torch.float64) >= target).flatten()  # nan compares False
    return int(hits[0]) + 1 if hits.numel() else int(c.numel())
