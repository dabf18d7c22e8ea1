"""Native-accelerated ops behind the CKA engine, with a pure-PyTorch reference.

``block_gram_norms`` is the one heavy op of semantic slicing: every neuron-HSIC matrix (biased or
unbiased, any route) is it plus O(n·d·s) corrections (``neuslice.cka``). Backends: the CUDA and
C++ code of the extension ``neuslice._C`` (``csrc/``), Triton kernels (``kernels/``) and
PyTorch; see :mod:`neuslice.ops.dispatch`.
"""

from __future__ import annotations

import torch

from . import reference
from .reference import ROUTES
from .dispatch import BACKENDS, ENV_VAR, backend_report, select

__all__ = [
    "block_gram_norms",
    "select",
    "backend_report",
    "BACKENDS",
    "ENV_VAR",
    "reference",
    "ROUTES",
]


def block_gram_norms(
    x: torch.Tensor, route: str = "auto", backend: str | None = None
) -> torch.Tensor:
    """``M[i, j] = Σ_{a,b} (Σ_n x[n,i,a] x[n,j,b])²`` for ``x`` of shape ``(n, d, s)``.

    That is ``tr(G_i G_j)`` for the per-neuron Grams ``G_i = x_i x_iᵀ``: the un-normalised
    neuron-HSIC matrix of already-centred outputs. Accumulates in float32 (float64 for float64
    input; bfloat16/float16 inputs are read as they are). ``route`` picks feature space
    (``n (d s)²`` flops), sample space (``d n² s + d² n²``) or the cheaper (``"auto"``).
    ``backend``: ``None``/``"auto"`` or one of ``cuda``, ``triton``, ``cpp``, ``torch``.
    """
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() != 3 or 0 in x.shape:
        raise ValueError(
            f"x must have shape (n, d, s) with no empty dimension, got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if route == "auto":
        route = reference.block_gram_route(*x.shape)
    return select(x, backend, route).run(x, route)
