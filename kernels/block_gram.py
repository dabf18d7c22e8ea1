"""Triton kernels for ``block_gram_norms``: ``M[i, j] = Σ_{a,b} (Σ_n x[n,i,a] x[n,j,b])²``.

Two routes, as in :mod:`neuslice.ops.reference`:

* ``"feature"``: one fused kernel. Each program owns a ``(BLOCK_D, BLOCK_D)`` tile ``(I, J)`` of
  ``M`` (only ``I <= J``; the tile is mirrored on store). For every pair of positions ``(a, b)``
  it builds the covariance tile ``x[:, I, a]ᵀ x[:, J, b]`` over chunks of samples, squares it
  and adds it to the ``M`` tile. The ``(d·s) x (d·s)`` covariance never reaches memory.
* ``"sample"``: stage 1 writes the per-neuron Grams ``G[i] = x[:, i, :] x[:, i, :]ᵀ``
  (``d x n x n``, float32; only the upper tiles are computed and mirrored), stage 2 takes
  ``M = V Vᵀ`` with ``V = G.reshape(d, n²)`` (upper tiles, mirrored).

Inputs are float32, float16 or bfloat16, read as they are; every dot accumulates in float32
with ``input_precision="ieee"`` (no TF32 for float32 operands). Any strides are accepted.
Under the CPU interpreter (``TRITON_INTERPRET=1``) bfloat16 tiles are upcast to float32 before
``tl.dot``: the interpreter stores bfloat16 as raw ``uint16`` and would multiply the bit
patterns. The upcast is exact (products of bfloat16 values are exact in float32).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["block_gram_norms", "accumulate_into", "ROUTES", "DTYPES"]

ROUTES = ("feature", "sample")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _store_symmetric(
    out_ptr, tile, ti, tj, d, so0, so1, scale, ACCUMULATE: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Write (or add) ``scale * tile`` at block ``(ti, tj)`` of ``out`` and its transpose at
    ``(tj, ti)``; diagonal blocks are written once."""
    offs_i = (ti * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    offs_j = (tj * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    mask = (offs_i[:, None] < d) & (offs_j[None, :] < d)
    val = tile * scale
    ptr = out_ptr + offs_i[:, None] * so0 + offs_j[None, :] * so1
    ptr_t = out_ptr + offs_j[None, :] * so0 + offs_i[:, None] * so1  # out[j, i] <- tile[i, j]
    if ACCUMULATE:
        tl.store(ptr, tl.load(ptr, mask=mask) + val, mask=mask)
        if ti != tj:
            tl.store(ptr_t, tl.load(ptr_t, mask=mask) + val, mask=mask)
    else:
        tl.store(ptr, val, mask=mask)
        if ti != tj:
            tl.store(ptr_t, val, mask=mask)


@triton.jit
def _feature_kernel(
    x_ptr,
    out_ptr,
    n,
    d,
    s,
    sxn,
    sxd,
    sxs,
    so0,
    so1,
    scale,
    ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Fused feature route: tile ``(I, J)`` of ``M``; grid ``(T, T)``, ``T = cdiv(d, BLOCK_D)``."""
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    if ti > tj:  # lower tiles come from the mirror of the upper ones
        return
    offs_i = ti * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = tj * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_i = offs_i < d
    mask_j = offs_j < d
    rows = tl.arange(0, BLOCK_N)
    m_tile = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for a in range(0, s):
        base_i = x_ptr + a * sxs + offs_i[None, :] * sxd  # (1, BLOCK_D) columns of x[:, I, a]
        # Two-level sum (over b, then over a) keeps the float32 rounding error ~ 2s, not s²,
        # terms deep.
        row = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        for b in range(0, s):
            base_j = x_ptr + b * sxs + offs_j[None, :] * sxd
            cov = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
            for n0 in range(0, n, BLOCK_N):
                r = n0 + rows
                roff = r.to(tl.int64)[:, None] * sxn
                mask_r = r[:, None] < n
                xi = tl.load(base_i + roff, mask=mask_r & mask_i[None, :], other=0.0)
                xj = tl.load(base_j + roff, mask=mask_r & mask_j[None, :], other=0.0)
                if UPCAST:
                    xi = xi.to(tl.float32)
                    xj = xj.to(tl.float32)
                cov = tl.dot(tl.trans(xi), xj, acc=cov, input_precision="ieee")
            row += cov * cov
        m_tile += row
    _store_symmetric(out_ptr, m_tile, ti, tj, d, so0, so1, scale, ACCUMULATE, BLOCK_D)


@triton.jit
def _gram_kernel(
    x_ptr,
    g_ptr,
    n,
    s,
    sxn,
    sxd,
    sxs,
    UPCAST: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Sample route, stage 1: tile ``(P, Q)`` of ``G[i] = x_i x_iᵀ``; grid ``(T, T, d)``."""
    tp = tl.program_id(0)
    tq = tl.program_id(1)
    if tp > tq:
        return
    i = tl.program_id(2).to(tl.int64)
    offs_p = tp * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tq * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_S)
    base = x_ptr + i * sxd
    ptr_p = base + offs_p.to(tl.int64)[:, None] * sxn
    ptr_q = base + offs_q.to(tl.int64)[:, None] * sxn
    acc = tl.zeros((BLOCK_P, BLOCK_P), dtype=tl.float32)
    for a0 in range(0, s, BLOCK_S):
        c = a0 + cols
        mask_c = c[None, :] < s
        xp = tl.load(ptr_p + c[None, :] * sxs, mask=(offs_p[:, None] < n) & mask_c, other=0.0)
        xq = tl.load(ptr_q + c[None, :] * sxs, mask=(offs_q[:, None] < n) & mask_c, other=0.0)
        if UPCAST:
            xp = xp.to(tl.float32)
            xq = xq.to(tl.float32)
        acc = tl.dot(xp, tl.trans(xq), acc=acc, input_precision="ieee")
    # G[i] is an (n, n) symmetric matrix: reuse the mirrored store (plain write, scale 1).
    _store_symmetric(g_ptr + i * n * n, acc, tp, tq, n, n, 1, 1.0, False, BLOCK_P)


@triton.jit
def _vvt_kernel(
    v_ptr,
    out_ptr,
    d,
    k,
    svd,
    so0,
    so1,
    scale,
    ACCUMULATE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Sample route, stage 2: tile ``(I, J)`` of ``V Vᵀ`` for a row-major ``V`` of ``(d, k)``."""
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    if ti > tj:
        return
    offs_i = ti * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = tj * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_K)
    ptr_i = v_ptr + offs_i.to(tl.int64)[:, None] * svd
    ptr_j = v_ptr + offs_j.to(tl.int64)[:, None] * svd
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        c = (k0 + cols).to(tl.int64)
        mask_c = c[None, :] < k
        vi = tl.load(ptr_i + c[None, :], mask=(offs_i[:, None] < d) & mask_c, other=0.0)
        vj = tl.load(ptr_j + c[None, :], mask=(offs_j[:, None] < d) & mask_c, other=0.0)
        acc = tl.dot(vi, tl.trans(vj), acc=acc, input_precision="ieee")
    _store_symmetric(out_ptr, acc, ti, tj, d, so0, so1, scale, ACCUMULATE, BLOCK_D)


def _interpreted() -> bool:
    """Whether the kernels were built for the CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return not isinstance(_feature_kernel, triton.runtime.JITFunction)


def _block(size: int, cap: int) -> int:
    """Power-of-two block covering ``size``, within ``[16, cap]`` (``tl.dot`` needs >= 16)."""
    return max(16, min(cap, triton.next_power_of_2(size)))


def _check(x: torch.Tensor, route: str) -> None:
    if not torch.is_tensor(x) or x.dim() != 3 or 0 in x.shape:
        raise ValueError(
            f"x must be a tensor of shape (n, d, s) with no empty dimension, got "
            f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}"
        )
    if x.dtype not in DTYPES:
        raise TypeError(
            f"triton block_gram_norms supports {[str(t) for t in DTYPES]}, got {x.dtype}"
        )
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES} (resolve 'auto' first), got {route!r}")


def _on_device(x: torch.Tensor):
    """Launch on ``x``'s GPU (not the current one) when ``x`` is on CUDA."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _launch(out: torch.Tensor, x: torch.Tensor, route: str, scale: float, accumulate: bool):
    n, d, s = x.shape
    upcast = x.dtype == torch.bfloat16 and _interpreted()
    blk_d = _block(d, 64)
    warps = 8 if blk_d == 64 else 4  # the feature kernel holds three (BLOCK_D, BLOCK_D) fp32 tiles
    grid = (triton.cdiv(d, blk_d), triton.cdiv(d, blk_d))
    if route == "feature":
        _feature_kernel[grid](
            x,
            out,
            n,
            d,
            s,
            *x.stride(),
            *out.stride(),
            float(scale),
            ACCUMULATE=accumulate,
            UPCAST=upcast,
            BLOCK_D=blk_d,
            BLOCK_N=_block(n, 64),
            num_warps=warps,
        )
        return
    blk_p = _block(n, 64)
    g = torch.empty((d, n, n), device=x.device, dtype=torch.float32)
    tp = triton.cdiv(n, blk_p)
    _gram_kernel[(tp, tp, d)](
        x, g, n, s, *x.stride(), UPCAST=upcast, BLOCK_P=blk_p, BLOCK_S=_block(s, 64)
    )
    _vvt_kernel[grid](
        g,
        out,
        d,
        n * n,
        n * n,
        *out.stride(),
        float(scale),
        ACCUMULATE=accumulate,
        BLOCK_D=blk_d,
        BLOCK_K=_block(n * n, 64),
        num_warps=warps,
    )


def block_gram_norms(x: torch.Tensor, route: str) -> torch.Tensor:
    """``(d, d)`` float32 ``M[i, j] = tr(G_i G_j)`` of ``x`` ``(n, d, s)`` by ``route``
    (``"feature"`` or ``"sample"``)."""
    _check(x, route)
    d = x.shape[1]
    out = torch.empty((d, d), device=x.device, dtype=torch.float32)
    with _on_device(x):
        _launch(out, x, route, 1.0, accumulate=False)
    return out


def accumulate_into(
    out: torch.Tensor, x: torch.Tensor, route: str, scale: float = 1.0
) -> torch.Tensor:
    """``out += scale * block_gram_norms(x, route)`` in the kernel epilogue (no ``(d, d)``
    temporary); ``out`` is a float32 ``(d, d)`` tensor on ``x``'s device. Returns ``out``."""
    _check(x, route)
    d = x.shape[1]
    if not torch.is_tensor(out) or out.shape != (d, d) or out.dtype != torch.float32:
        raise ValueError(
            f"out must be a float32 tensor of shape ({d}, {d}), got "
            f"{getattr(out, 'dtype', None)} {tuple(getattr(out, 'shape', ()))}"
        )
    if out.device != x.device:
        raise ValueError(f"out is on {out.device}, x on {x.device}")
    with _on_device(x):
        _launch(out, x, route, scale, accumulate=True)
    return out
