"""Forward hooks at given (module, call index) points, installed and removed as one unit."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

# callback(output) -> replacement output or None
Callback = Callable[[torch.Tensor], "torch.Tensor | None"]


@contextmanager
def hooks_at(
    model: nn.Module, points: list[tuple[nn.Module, int | None, Callback]]
) -> Iterator[None]:
    """Call ``callback(output)`` after ``module``'s ``call_index``-th call in each forward pass.

    ``call_index=None`` means every call. Calls are counted from the start of each forward pass
    of ``model``. A callback may return a tensor to replace the module's output.
    """
    by_module: dict[int, tuple[nn.Module, list]] = {}
    for module, index, cb in points:
        by_module.setdefault(id(module), (module, []))[1].append((index, cb))
    counters: dict[int, int] = {}
    handles = []

    def reset(_module, _args):
        counters.clear()

    def make_hook(key: int, entries: list):
        def hook(_module, _inputs, output):
            i = counters.get(key, 0)
            counters[key] = i + 1
            for index, cb in entries:
                if index is None or index == i:
                    new = cb(output)
                    if new is not None:
                        output = new
            return output

        return hook

    try:
        handles.append(model.register_forward_pre_hook(reset))
        for key, (module, entries) in by_module.items():
            handles.append(module.register_forward_hook(make_hook(key, entries)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def module_modes(model: nn.Module, train: bool = False) -> Iterator[None]:
    """Temporarily set every module's train/eval flag; restore each one exactly afterwards."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.train(train)
        yield
    finally:
        for m, flag in saved:
            m.training = flag
