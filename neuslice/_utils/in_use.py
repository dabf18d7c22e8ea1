"""One neuslice operation per model at a time.

Profiling, masking and copying a model install forward hooks and switch train/eval modes for a
while. Two threads doing that on one model at once would see each other's hooks and restore each
other's modes: wrong results and a model left modified. :func:`exclusive` marks a model as in use
by an operation; a second thread that tries to use the same model (or a wrapper of it, see
:mod:`neuslice._utils.wrappers`) meanwhile gets a ``RuntimeError`` naming the operation in
progress -- it is refused at once rather than made to wait, so a forgotten ``masked`` block can
never deadlock another thread. Nesting in one thread (profiling inside ``masked``) is allowed.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .wrappers import unwrap_model

__all__ = ["exclusive"]

_LOCK = threading.Lock()
# model -> [owning thread id, operation name, nesting depth]
_USERS: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


@contextmanager
def exclusive(model: nn.Module, operation: str) -> Iterator[None]:
    """Hold ``model`` for ``operation`` (e.g. ``"neuslice.profile"``) within the block."""
    key = unwrap_model(model)
    me = threading.get_ident()
    with _LOCK:
        entry = _USERS.get(key)
        if entry is not None and entry[0] != me:
            raise RuntimeError(
                f"{operation} cannot use this {type(key).__name__} now: another thread is running "
                f"{entry[1]} on it. neuslice installs hooks and switches train/eval modes while "
                f"it works, so one model serves one operation at a time; give each thread its own "
                f"copy (copy.deepcopy(model)) or wait until {entry[1]} has finished."
            )
        if entry is None:
            _USERS[key] = [me, operation, 1]
        else:
            entry[2] += 1
    try:
        yield
    finally:
        with _LOCK:
            entry = _USERS.get(key)
            if entry is not None:
                entry[2] -= 1
                if entry[2] <= 0:
                    del _USERS[key]
