"""DeepLIFT (rescale rule) multipliers for every layer in one backward pass.

The baseline (one sample: it is the same for every input) and then the inputs are run through
the model. Every element-wise nonlinear module then passes gradients scaled by ``Δout / Δin``
(input minus baseline) instead of its local derivative, falling back to the local derivative where ``|Δin| < eps`` — the rescale
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

from ..layers import ACT_FUNCTIONS, ACT_METHODS, ACT_TYPES
from .stats import scratch

__all__ = ["rescale_rule", "RESCALE_TYPES", "EPS"]

EPS = 1e-10

RESCALE_TYPES = ACT_TYPES  # element-wise activations: the rescale rule applies


class _Rule:
    """Baseline values of every activation call, and the multipliers of the current batch.

    The baseline is the same for every sample, so it is run once per batch as a batch of one
    (``record``); the inputs then run alone (``apply``). Each activation call registers a hook
    on its autograd node that, while ``active``, replaces the local derivative by the rescale
    multiplier ``Δout / Δin`` (the local derivative where ``|Δin| < EPS``). With ``active``
    False the same graph back-propagates plain gradients, so one forward serves both.
    """

    def __init__(self) -> None:
        self.mode: str | None = None
        self.active = False
        self.base: dict = {}
        self.calls: dict = {}
        self.inside = 0

    def begin(self, mode: str | None) -> None:
        self.mode, self.calls, self.inside = mode, {}, 0

    def key(self, owner) -> tuple:
        i = self.calls.get(owner, 0)
        self.calls[owner] = i + 1
        return owner, i

    def before(self, key, x: torch.Tensor):
        """What ``after`` needs, taken before the call (which may overwrite ``x``)."""
        if self.mode == "record":
            return x.detach().clone()
        base = self.base.get(key)
        if base is None or base[0].shape[1:] != x.shape[1:]:
            raise RuntimeError(
                "DeepLIFT: the model ran a different sequence of activations on the baseline "
                "than on the inputs (data-dependent control flow is not supported)."
            )
        wide = torch.promote_types(x.dtype, torch.float32)  # EPS underflows in float16
        return x.detach().to(wide) - base[0].to(wide)

    def after(self, key, saved: torch.Tensor, out: torch.Tensor) -> None:
        if self.mode == "record":
            self.base[key] = (saved, out.detach().clone())
            return
        node = out.grad_fn
        if node is None:
            return
        d_in = saved
        ratio = out.detach().to(d_in.dtype) - self.base[key][1].to(d_in.dtype)
        # float arithmetic instead of boolean masks (torch.where on a bool mask is many times
        # slower than a multiply on the CPU): ``small`` marks |Δin| < EPS with 1.0
        # |Δin| in reused memory: it outlives this call only where some |Δin| < EPS
        size = torch.abs(d_in, out=scratch("rescale.size", d_in.shape, d_in.dtype, d_in.device))
        if size.numel() == 0 or bool(size.amin() >= EPS):
            small = None
            ratio.div_(d_in)
        else:
            size = size.clone()
            # 1.0 where |Δin| < EPS, else 0.0 (a float difference is 0 only for equal values)
            small = size.sub_(EPS).sign_().clamp_(max=0).neg_()
            ratio.div_(d_in.add_(small))  # a denominator of about 1 where small: finite
            ratio.addcmul_(ratio, small, value=-1.0)  # 0 where small
        del size
        rule = self

        def hook(grad_inputs, grad_outputs):
            gi, go = grad_inputs[0], grad_outputs[0]
            if not rule.active or gi is None or go is None:
                return None
            g = go * ratio
            if small is not None:  # the local derivative where |Δin| < EPS
                g.addcmul_(gi, small)
            return (g.to(gi.dtype),) + tuple(grad_inputs[1:])

        node.register_hook(hook)


_RESCALE_FUNCTIONS = frozenset(ACT_FUNCTIONS) | frozenset(
    getattr(torch.Tensor, name) for name in ACT_METHODS
)
_INPLACE_FUNCTIONS = frozenset(
    [torch.relu_] + [getattr(torch.Tensor, name) for name in ACT_METHODS if name.endswith("_")]
)


class _RescaleFunctions(TorchFunctionMode):
    """Applies the rescale rule to functional element-wise activations (outside modules that
    already get it)."""

    def __init__(self, rule: _Rule) -> None:
        super().__init__()
        self.rule = rule

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = self.rule
        if (
            func not in _RESCALE_FUNCTIONS
            or rule.mode is None
            or rule.inside
            or not args
            or not torch.is_tensor(args[0])
            or args[0].dim() == 0
        ):
            return func(*args, **kwargs)
        key = rule.key("functional")
        saved = rule.before(key, args[0])
        out = func(*args, **kwargs)
        if torch.is_tensor(out) and out.shape == args[0].shape:
            rule.after(key, saved, out)
        return out


@contextmanager
def rescale_rule(model: nn.Module) -> Iterator[_Rule]:
    """Within the block, nonlinear modules of ``model`` can back-propagate DeepLIFT multipliers.

    Yields the rule: ``rule.begin("record")`` then a forward on one baseline sample,
    ``rule.begin("apply")`` then the forward on the inputs; a backward with ``rule.active``
    True gives DeepLIFT multipliers, with it False plain gradients. Values are unchanged.
    Enter it before any hook that replaces module outputs.
    """
    rule = _Rule()
    handles = []
    pending: dict[int, list] = {}

    def pre(module, args):
        if rule.mode is None:
            return
        key = rule.key(id(module))
        pending.setdefault(id(module), []).append((key, rule.before(key, args[0])))
        rule.inside += 1

    def post(module, args, output):
        if rule.mode is None:
            return output
        rule.inside -= 1
        key, saved = pending[id(module)].pop()
        if torch.is_tensor(output) and output.shape[1:] == saved.shape[1:]:
            rule.after(key, saved, output)
        return output

    try:
        for m in model.modules():
            if isinstance(m, RESCALE_TYPES):
                handles.append(m.register_forward_pre_hook(pre))
                handles.append(m.register_forward_hook(post))
        with _RescaleFunctions(rule):
            yield rule
    finally:
        rule.begin(None)
        for h in handles:
            h.remove()
