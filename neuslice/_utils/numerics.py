"""Numerical conventions shared by every accumulation: dtypes and TF32."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["accumulation_dtype", "no_tf32"]


def accumulation_dtype(t: torch.Tensor | torch.dtype) -> torch.dtype:
    """float64 stays float64; every other type (bf16/fp16 under autocast included) -> float32."""
    dtype = t if isinstance(t, torch.dtype) else t.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """CUDA matmuls in full float32 inside the block (HSIC sums cancel badly under TF32)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
