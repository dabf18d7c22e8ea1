"""Argument checks and small lookups shared across the package."""

from __future__ import annotations

import numbers

import torch
from torch import nn

__all__ = ["model_device", "check_fraction"]


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
