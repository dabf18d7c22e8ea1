"""Pure-PyTorch reference of the native ops: always available, the oracle of their tests."""

from __future__ import annotations

import torch

from .._utils.numerics import accumulation_dtype

__all__ = ["block_gram_norms", "block_gram_route", "ROUTES"]

ROUTES = ("auto", "feature", "sample")  # ways to compute block_gram_norms
_BLOCK_ELEMS = 2**25  # bound on the elements of any temporary


def block_gram_route(n: int, d: int, s: int) -> str:
    """The cheaper way to compute ``block_gram_norms`` by flop count."""
    feature = n * (d * s) ** 2
    sample = d * n * n * s + d * d * n * n
    return "feature" if feature <= sample else "sample"


def block_gram_norms(x: torch.Tensor, route: str = "auto") -> torch.Tensor:
    """``M[i, j] = Σ_{a,b} (Σ_n x[n,i,a] x[n,j,b])² = tr(G_i G_j)`` with ``G_i = x_i x_iᵀ``.

    ``x``: ``(n, d, s)``. No centring, no normalisation. ``route="feature"`` reduces blocks of
    ``xᵀx`` (cost ``n (d s)²``); ``"sample"`` takes inner products of the per-neuron ``n x n``
    Grams (cost ``d n² s + d² n²``). Returns ``(d, d)`` in the accumulation dtype.
    """
    n, d, s = x.shape
    x = x.to(accumulation_dtype(x))
    if route == "auto":
        route = block_gram_route(n, d, s)
    m = x.new_empty((d, d))
    if route == "feature":
        flat = x.reshape(n, d * s)
        if s == 1:  # dense layer: M is the elementwise square of the covariance
            return (flat.T @ flat).square_()
        chunk = max(1, _BLOCK_ELEMS // max(1, s * s * d))
        for a0 in range(0, d, chunk):
            a1 = min(d, a0 + chunk)
            c = flat[:, a0 * s : a1 * s].T @ flat
            m[a0:a1] = c.reshape(a1 - a0, s, d, s).square().sum(dim=(1, 3))
        return m
    if route != "sample":
        raise ValueError(f"route must be 'auto', 'feature' or 'sample', got {route!r}")
    # the Grams are symmetric: <G_i, G_j> = Σ_a G_i[a,a] G_j[a,a] + 2 Σ_{a<b} G_i[a,b] G_j[a,b],
    # so each is packed as its diagonal and upper triangle (half the flops of all n² entries),
    # the factor 2 going to one side only (exact)
    per_neuron = x.permute(1, 0, 2)  # (d, n, s)
    chunk = max(1, _BLOCK_ELEMS // (n * n))
    blocks = [(a0, min(d, a0 + chunk)) for a0 in range(0, d, chunk)]
    iu = torch.triu_indices(n, n, 1, device=x.device)

    def grams(a0: int, a1: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = per_neuron[a0:a1]
        g = a @ a.transpose(1, 2)
        diag, upper = g.diagonal(dim1=1, dim2=2), g[:, iu[0], iu[1]]
        return torch.cat([diag, upper], 1), torch.cat([diag, upper * 2], 1)

    if len(blocks) == 1:
        va, wa = grams(0, d)
        return torch.mm(va, wa.T, out=m)
    for bi, (a0, a1) in enumerate(blocks):
        va, wa = grams(a0, a1)
        m[a0:a1, a0:a1] = va @ wa.T
        for b0, b1 in blocks[bi + 1 :]:
            blk = va @ grams(b0, b1)[1].T
            m[a0:a1, b0:b1] = blk
            m[b0:b1, a0:a1] = blk.T
    return m
