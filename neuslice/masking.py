"""Run a model with its non-critical neurons zeroed (the paper's masking evaluation)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ._utils.hooks import hooks_at
from ._utils.in_use import exclusive
from ._utils.wrappers import eager_forward, unwrap_model
from .slicing import Slice

__all__ = ["masked"]


@contextmanager
def masked(model: nn.Module, slice: Slice, category: int | None = None) -> Iterator[nn.Module]:
    """Within the block, ``model``'s non-critical neurons output zero.

    Neurons are zeroed where the next layer reads them (after BatchNorm/activation), so the
    result equals removing them. ``category`` applies that category's own mask instead of the
    union. The model's weights are never touched; hooks are removed on exit, even on error.

    A ``torch.compile`` wrapper runs its module eagerly inside the block (compiled code does not
    see the hooks that apply the mask); (Distributed)DataParallel wrappers are seen through.
    Another thread that profiles or masks the same model meanwhile gets a ``RuntimeError``.
    """
    if not isinstance(slice, Slice):
        raise TypeError(f"expected a neuslice.Slice, got {type(slice).__name__}")
    layers = slice.layers_of(model)
    if category is not None:
        if slice.category_masks is None:
            raise ValueError(
                f"a {slice.strategy} slice has no per-category masks; use category=None."
            )
        n = next(iter(slice.category_masks.values())).shape[0]
        if not 0 <= category < n:
            raise ValueError(f"category must be in [0, {n}), got {category}")
    points = []
    for l in layers:
        mask = slice.masks[l.name] if category is None else slice.category_masks[l.name][category]

        def zero(out, _l=l, _mask=mask):
            if _l.mask_fill != 0:  # e.g. before torch.sigmoid: sigmoid(-inf) = 0
                m = _mask.to(device=out.device, dtype=torch.bool).view(_l.mask_shape(out))
                return torch.where(
                    m, out, torch.full((), _l.mask_fill, dtype=out.dtype, device=out.device)
                )
            m = _mask.to(device=out.device, dtype=out.dtype).view(_l.mask_shape(out))
            return out * m

        points.append((l.hook_module, l.call_index, zero))
    with (
        exclusive(model, "neuslice.masked"),
        eager_forward(model),
        hooks_at(unwrap_model(model), points),
    ):
        yield model
