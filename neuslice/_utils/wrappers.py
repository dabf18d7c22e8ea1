"""See through the wrappers users put around a model: ``torch.compile`` and (Distributed)DataParallel.

neuslice works by forward hooks on the model's submodules and by reading its structure. Code
compiled by ``torch.compile`` does not run hooks added after compilation, so every entry point
(profile, masked, restructure, MaskedOptimizer, slices) works on the module inside the wrapper:
``OptimizedModule._orig_mod`` and ``DataParallel.module`` / ``DistributedDataParallel.module``
share their parameters with the wrapper, so the results are those of the plain model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eager_forward", "is_compiled", "unwrap_model"]


def _optimized_module_type():
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except (ImportError, AttributeError):  # torch without dynamo
        return None
    return OptimizedModule


def is_compiled(model: nn.Module) -> bool:
    """True for the wrapper ``torch.compile(model)`` returns."""
    t = _optimized_module_type()
    return t is not None and isinstance(model, t)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside any nesting of ``torch.compile`` and (Distributed)DataParallel
    wrappers; ``model`` itself when it is not wrapped."""
    seen = 0
    while seen < 16:
        seen += 1
        if is_compiled(model):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            break
    return model


@contextmanager
def eager_forward(model: nn.Module) -> Iterator[None]:
    """Within the block, calling a ``torch.compile`` wrapper (at any nesting) runs the module
    inside it eagerly, so that forward hooks on its submodules take effect; restored on exit."""
    saved = []
    m = model
    for _ in range(16):
        if is_compiled(m):
            saved.append((m, m.__dict__.get("forward")))
            m.__dict__["forward"] = m._orig_mod.__call__
            m = m._orig_mod
        elif isinstance(m, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            m = m.module
        else:
            break
    try:
        yield
    finally:
        for m, fwd in reversed(saved):
            if fwd is None:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = fwd
