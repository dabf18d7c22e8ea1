"""DeepLIFT (rescale rule) multipliers for every layer in one backward pass.

The model is run once on ``[inputs; baselines]`` stacked along the batch. Every element-wise
nonlinear module then passes gradients scaled by ``Δout / Δin`` (input minus baseline) instead
of its local derivative, falling back to the local derivative where ``|Δin| < eps`` — the rescale
rule of Shrikumar et al. (2017), with the same conventions as captum's ``DeepLift``. The
gradient of the target logit with respect to any intermediate output is then that output's
DeepLIFT multiplier, so the contribution of every neuron of every layer comes from a single
backward pass instead of one attribution call per layer.

Element-wise activations called functionally inside ``forward`` (``F.relu``, ``torch.relu``,
``x.relu()``, ...) get the same rule through a ``TorchFunctionMode``, so a model written with
functional activations is attributed exactly like its twin with ``nn.ReLU`` modules (captum
itself uses plain gradients for those). Max-pooling uses plain gradients.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..layers import ACT_FUNCTIONS, ACT_METHODS

__all__ = ["rescale_rule", "RESCALE_TYPES", "EPS"]

EPS = 1e-10

RESCALE_TYPES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.PReLU,
)


def _rescaled(inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` with the rescale rule as its gradient with respect to ``inp``."""
    half = inp.shape[0] // 2
    with torch.no_grad():
        d_in = inp[:half] - inp[half:]
        d_out = out[:half] - out[half:]
        # in float32 at least: EPS underflows to 0 in float16, and half-precision ratios overflow
        wide = torch.promote_types(d_in.dtype, torch.float32)
        d_in, d_out = d_in.to(wide), d_out.to(wide)
        small = d_in.abs() < EPS
        ratio = torch.where(small, torch.zeros_like(d_out), d_out / torch.where(small, 1, d_in))
        ratio = ratio.to(inp.dtype)
        ratio = torch.cat([ratio, ratio])
        small = torch.cat([small, small])
    linear = inp * ratio
    return torch.where(small, out, linear + (out - linear).detach())


_RESCALE_FUNCTIONS = frozenset(ACT_FUNCTIONS) | frozenset(
    getattr(torch.Tensor, name) for name in ACT_METHODS)
_INPLACE_FUNCTIONS = frozenset([torch.relu_] + [
    getattr(torch.Tensor, name) for name in ACT_METHODS if name.endswith("_")])


class _RescaleFunctions(TorchFunctionMode):
    """Applies the rescale rule to functional element-wise activations."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _RESCALE_FUNCTIONS or not args or not torch.is_tensor(args[0]) \
                or args[0].dim() == 0 or args[0].shape[0] % 2:
            return func(*args, **kwargs)
        inp = args[0]
        inplace = func in _INPLACE_FUNCTIONS or bool(kwargs.get("inplace", False)) or \
            any(a is True for a in args[1:])
        saved = inp.clone() if inplace else inp
        out = func(*args, **kwargs)
        if not torch.is_tensor(out) or out.shape != saved.shape:
            return out
        return _rescaled(saved, out)


@contextmanager
def rescale_rule(model: nn.Module) -> Iterator[None]:
    """Within the block, nonlinear modules of ``model`` back-propagate DeepLIFT multipliers.

    Forward batches must be ``[inputs; baselines]`` of equal halves. Values are unchanged.
    """
    handles = []
    saved: dict[int, torch.Tensor] = {}

    def pre(module, args):
        x = args[0]
        # An in-place module overwrites its input: keep the original.
        saved[id(module)] = x.clone() if getattr(module, "inplace", False) else x

    def post(module, args, output):
        inp = saved.pop(id(module))
        if inp.shape != output.shape or inp.shape[0] % 2:
            return output
        return _rescaled(inp, output)

    try:
        for m in model.modules():
            if isinstance(m, RESCALE_TYPES):
                handles.append(m.register_forward_pre_hook(pre))
                handles.append(m.register_forward_hook(post))
        with _RescaleFunctions():
            yield
    finally:
        for h in handles:
            h.remove()
