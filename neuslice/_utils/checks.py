"""Argument checks and small lookups shared across the package."""

from __future__ import annotations

import numbers

import torch
from torch import nn

__all__ = ["model_device", "check_fraction", "batch_pair"]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a stateless model."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def check_fraction(name: str, value, *, open_low: bool = True) -> float:
    """``value`` as a float in (0, 1] (or [0, 1] with ``open_low=False``), else a ValueError."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    v = float(value) if ok else float("nan")
    if not ok or not ((0 < v) if open_low else (0 <= v)) or not v <= 1:
        interval = "(0, 1]" if open_low else "[0, 1]"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return v


def batch_pair(batch, index: int, what: str = "targets") -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of a loader's batch ``index``, both tensors with one target row
    per input; a TypeError/ValueError saying how to fix the loader otherwise."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(
            f"the loader must yield (inputs, {what}) pairs; batch {index} is "
            f"{type(batch).__name__}. Wrap your data in a "
            f"TensorDataset(inputs, {what})."
        )
    x, y = batch[0], batch[1]
    if not torch.is_tensor(x) or not torch.is_tensor(y):
        raise TypeError(
            f"batch {index}: inputs and {what} must be tensors, got "
            f"{type(x).__name__} and {type(y).__name__}."
        )
    if x.dim() == 0 or y.dim() == 0 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"batch {index}: inputs {tuple(x.shape)} and {what} "
            f"{tuple(y.shape)} must have the same batch size."
        )
    return x, y
