"""Train only part of a sliced model: an optimizer wrapper that freezes the other neurons.

The paper uses slices for two kinds of maintenance:

* *re-adaptation* (``train="critical"``): only the critical neurons of each sliced layer learn;
* *incremental development* (``train="noncritical"``): the critical neurons are protected and
  everything else learns; ``protect_classes`` additionally keeps the classifier rows of old
  classes fixed while the rows of new classes learn.

A neuron's parameters are its weight row (``Linear``) or filter (``Conv2d``), its bias entry and
its entries in the BatchNorm right after the layer. Rule for every parameter **outside** the
sliced layers' neurons (layers not in the slice, other norms, embeddings, ...):

* ``train="critical"``: frozen, except the classifier head;
* ``train="noncritical"``: trainable;
* the classifier head (the last ``Linear``/``Conv2d`` run in ``forward``) is trainable in both
  modes, except the rows (and bias entries) of ``protect_classes``, which are frozen. If the head
  is itself one of the slice's layers, its slice rule applies too (a row trains only if both
  allow it).

BatchNorm running statistics of frozen channels (a sliced layer's frozen neurons; every channel
of a frozen BatchNorm) are put back at every ``step()``, since a forward pass in train mode
moves them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .._utils.wrappers import unwrap_model
from ..layers import SLICEABLE_TYPES, find_layers
from ..slicing import Slice

__all__ = ["MaskedOptimizer", "trainable_fraction", "head_name", "TRAIN_CHOICES"]

TRAIN_CHOICES = ("critical", "noncritical")


@dataclass
class _Plan:
    """Per parameter: which rows (along dim 0) train; per norm: which channels are frozen."""

    rows: dict[int, tuple[nn.Parameter, torch.Tensor]]  # id(param) -> (param, trainable rows)
    norms: list[tuple[nn.Module, torch.Tensor]]  # (norm with running stats, frozen channels)
    head: str


def _check_train(train: Any) -> str:
    if not isinstance(train, str) or train not in TRAIN_CHOICES:
        raise ValueError(
            f"train must be one of {list(TRAIN_CHOICES)}, got {train!r}: "
            f"'critical' trains the slice's critical neurons (re-adaptation), "
            f"'noncritical' trains the others (incremental development)."
        )
    return train


def head_name(model: nn.Module) -> str:
    """Name of the classifier head: the last Linear/Conv2d executed in ``forward``."""
    model = unwrap_model(model)  # torch.compile / DataParallel: the module inside
    sliceable = [n for n, m in model.named_modules() if isinstance(m, SLICEABLE_TYPES)]
    try:
        body = {l.name for l in find_layers(model)}
    except ValueError:  # the only Linear/Conv2d layer is the head
        body = set()
    candidates = [n for n in sliceable if n not in body]
    if len(candidates) > 1:  # layers never called in forward sort after the head
        try:
            candidates = [l.name for l in find_layers(model, candidates)]
        except ValueError:
            candidates = candidates[-1:]
    return candidates[0]


def _rows(n_rows: int, value: bool) -> torch.Tensor:
    return torch.full((n_rows,), value, dtype=torch.bool)


def _n_rows(p: torch.Tensor) -> int:
    return p.shape[0] if p.dim() > 0 else 1


def _plan(
    model: nn.Module, slice: Slice, train: str, protect_classes: Iterable[int] | None
) -> _Plan:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(slice, Slice):
        raise TypeError(f"slice must be a neuslice.Slice, got {type(slice).__name__}")
    train = _check_train(train)
    model = unwrap_model(model)  # same parameters as the wrapper, plain names
    layers = slice.layers_of(model)  # ValueError when the slice was made for another model
    modules = dict(model.named_modules())
    head = head_name(model)
    head_mod = modules[head]
    n_out = head_mod.out_features if isinstance(head_mod, nn.Linear) else head_mod.out_channels
    protected = _protected(protect_classes, n_out, head)

    explicit: dict[int, torch.Tensor] = {}

    def assign(p: torch.Tensor | None, rows: torch.Tensor) -> None:
        if p is None:
            return
        prev = explicit.get(id(p))
        explicit[id(p)] = rows.clone() if prev is None else prev & rows  # tied: both must allow

    norm_frozen: dict[int, torch.Tensor] = {}
    for l in layers:
        mask = slice.masks[l.name].detach().to(device="cpu", dtype=torch.bool).reshape(-1)
        chosen = mask if train == "critical" else ~mask
        for m in (l.module, l.norm_module):
            if m is not None:
                assign(getattr(m, "weight", None), chosen)
                assign(getattr(m, "bias", None), chosen)
        if l.norm_module is not None:
            norm_frozen[id(l.norm_module)] = ~chosen
    assign(head_mod.weight, ~protected)
    assign(head_mod.bias, ~protected)

    default = train == "noncritical"
    rows = {}
    for p in model.parameters():
        rows[id(p)] = (p, explicit.get(id(p), _rows(_n_rows(p), default)))
    norms = []
    for m in model.modules():
        if isinstance(m, _NormBase) and m.running_mean is not None:
            frozen = norm_frozen.get(id(m), _rows(m.num_features, not default))
            if bool(frozen.any()):
                norms.append((m, frozen))
    return _Plan(rows=rows, norms=norms, head=head)


def class_index(value, where: str) -> int:
    """``value`` as a class index (an int, not a bool); ``TypeError`` naming ``where``."""
    if isinstance(value, bool):
        raise TypeError(f"{where} holds {value!r}; class indices must be ints")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{where} holds {value!r}; class indices must be ints") from None


def _protected(protect_classes: Iterable[int] | None, n_out: int, head: str) -> torch.Tensor:
    protected = _rows(n_out, False)
    if protect_classes is None:
        return protected
    if isinstance(protect_classes, (str, bytes)) or not isinstance(protect_classes, Iterable):
        raise TypeError(
            f"protect_classes must be an iterable of class indices (e.g. [0, 1, 2]) "
            f"or None, got {type(protect_classes).__name__}"
        )
    for c in protect_classes:
        c = class_index(c, "protect_classes")
        if not 0 <= c < n_out:
            raise ValueError(
                f"protect_classes holds class {c}, but the head {head!r} has "
                f"{n_out} outputs; use indices in [0, {n_out})."
            )
        protected[c] = True
    return protected


def trainable_fraction(
    model: nn.Module,
    slice: Slice,
    train: str = "critical",
    protect_classes: Iterable[int] | None = None,
) -> float:
    """Fraction of the model's parameter entries that :class:`MaskedOptimizer` lets train
    (the paper's training parameter ratio, TPR), under the rule in this module's docstring."""
    plan = _plan(model, slice, train, protect_classes)
    total = trainable = 0
    for p, rows in plan.rows.values():
        per_row = p.numel() // _n_rows(p) if p.numel() else 0
        total += p.numel()
        trainable += int(rows.sum()) * per_row
    return trainable / total if total else 0.0


# Optimizers whose update is element-wise: an entry of the new parameter and state depends only
# on the same entry of the old parameter, gradient and state (no norms, factorizations or
# other reductions across entries). The frozen rows of their state may hold anything during the
# inner step, as long as the exact originals are put back afterwards. Mapped to the state keys
# whose square root the step takes: ``sqrt`` of exact zeros (the usual content of frozen rows,
# whose gradient is zero) runs about ten times slower than of other values on CPU, so while the
# step runs those frozen rows hold 1.0 instead.
_ELEMENTWISE: dict[type, tuple[str, ...]] = {
    torch.optim.SGD: (),
    torch.optim.Adam: ("exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.AdamW: ("exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.NAdam: ("exp_avg_sq",),
    torch.optim.RAdam: ("exp_avg_sq",),
    torch.optim.RMSprop: ("square_avg",),
    torch.optim.Adagrad: ("sum",),
}


def _adam_keeps_zero(group: dict[str, Any]) -> bool:
    """Adam's ``exp_avg.lerp_(grad, 1 - beta1)`` leaves +0 at +0 where the gradient is zero,
    unless coupled weight decay adds the parameter to the gradient first (the fused kernel has
    its own arithmetic: not relied on)."""
    if group.get("fused"):
        return False
    return bool(group.get("decoupled_weight_decay")) or bool(group.get("weight_decay", 0) == 0)


# State keys whose frozen rows a step cannot change when they are all +0 and the gradient's
# frozen rows are zero (``step`` zeroes them), given the parameter's group: no restore needed.
_KEEPS_ZERO: dict[type, tuple[tuple[str, ...], Callable[[dict[str, Any]], bool]]] = {
    torch.optim.Adam: (("exp_avg",), _adam_keeps_zero),
    torch.optim.AdamW: (("exp_avg",), _adam_keeps_zero),
}


def _all_positive_zero(rows: torch.Tensor) -> bool:
    return rows.is_floating_point() and bool((rows == 0).all()) and not bool(rows.signbit().any())


def _has_zero_or_subnormal(rows: torch.Tensor) -> bool:
    if not rows.is_floating_point() or rows.numel() == 0:
        return False
    return bool((rows.abs() < torch.finfo(rows.dtype).tiny).any())


def _span(idx: torch.Tensor) -> tuple[int, int] | None:
    """``(start, stop)`` when the sorted row indices ``idx`` are one contiguous range."""
    start, stop = int(idx[0]), int(idx[-1]) + 1
    return (start, stop) if stop - start == idx.numel() else None


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-d view (same memory, same bits) whose rows are ``t``'s rows, in the widest
    element type that tiles them: on CPU ``index_copy_``/``index_fill_`` cost per element, so
    16-byte elements copy several times faster. ``t`` itself when its layout does not allow."""
    if (
        t.device.type != "cpu"
        or t.layout != torch.strided
        or t.dim() == 0
        or t.numel() == 0
        or not t.is_contiguous()
    ):
        return t
    row_bytes = t.numel() // t.shape[0] * t.element_size()
    for dtype in (torch.complex128, torch.float64):
        size = dtype.itemsize
        if t.element_size() < size and row_bytes % size == 0 and t.data_ptr() % size == 0:
            return t.view(t.shape[0], -1).view(dtype)
    return t


_FILL_VALUES: dict[tuple[torch.dtype, torch.dtype, float], complex | float] = {}


def _wide_value(value: float, dtype: torch.dtype, wide: torch.dtype) -> complex | float:
    """The ``wide`` scalar whose bytes are ``value`` in ``dtype``, repeated."""
    key = (dtype, wide, value)
    if key not in _FILL_VALUES:
        n = wide.itemsize // dtype.itemsize
        _FILL_VALUES[key] = torch.full((n,), value, dtype=dtype).view(wide).item()
    return _FILL_VALUES[key]


@dataclass
class _Saved:
    tensor: torch.Tensor  # the state tensor the rows were taken from
    version: int  # its version counter when they were last known to hold ``rows``
    rows: torch.Tensor  # its frozen rows
    fill: bool  # give the frozen rows a harmless value during the step
    zero: bool  # the rows are all +0 (only looked at for the keys in _KEEPS_ZERO)


@dataclass
class _Entry:
    param: nn.Parameter
    idx: torch.Tensor | None  # frozen rows along dim 0; None = the whole tensor is frozen
    span: tuple[int, int] | None = None  # the frozen rows as one range, when they are
    group: dict[str, Any] | None = None  # the parameter's group in the optimizer
    # The frozen values as last restored, valid while the tensor's version counter says nobody
    # wrote to it since (forward/backward never do), so most steps need no snapshot.
    saved: torch.Tensor | None = None
    saved_version: int = -1
    state_saved: dict[str, _Saved] | None = None

    def take(self, t: torch.Tensor) -> torch.Tensor:
        if self.span is not None:
            return t[self.span[0] : self.span[1]].clone()
        return t.index_select(0, self.idx)

    def put(self, t: torch.Tensor, rows: torch.Tensor) -> None:
        """Write ``rows`` (from :meth:`take`) back into the frozen rows of ``t``."""
        if self.span is not None:
            t[self.span[0] : self.span[1]].copy_(rows)
            return
        tw = _wide(t)
        if tw is not t:
            rw = _wide(rows)
            if rw.dtype == tw.dtype:
                tw.index_copy_(0, self.idx, rw)
                return
        t.index_copy_(0, self.idx, rows)

    def fill(self, t: torch.Tensor, value: float) -> None:
        if self.span is not None:
            t[self.span[0] : self.span[1]].fill_(value)
            return
        tw = _wide(t)
        if tw is not t:
            tw.index_fill_(0, self.idx, _wide_value(value, t.dtype, tw.dtype))
        else:
            t.index_fill_(0, self.idx, value)


class MaskedOptimizer:
    """Wrap any ``torch.optim`` optimizer so that only the chosen neurons' parameters change.

    ``train="critical"`` trains the slice's critical neurons, ``"noncritical"`` the others; see
    the module docstring for parameters outside the sliced layers and for ``protect_classes``
    (class indices whose classifier-head rows stay frozen).

    Frozen entries stay bit-identical whatever the optimizer does (momentum, coupled or
    decoupled weight decay, Adam moments, ...): ``step()`` zeroes their gradients (fully frozen
    parameters get ``grad=None``, so most optimizers skip them), snapshots them, runs the
    wrapped optimizer and copies them back. Optimizer-state tensors of partly frozen parameters
    (momentum buffers, moments) keep their frozen rows as they were before the step; on the very
    first step they hold whatever the optimizer computes from a zero gradient. For the
    element-wise optimizers of ``torch.optim`` (SGD, Adam, AdamW, NAdam, RAdam, RMSprop,
    Adagrad; not their subclasses) frozen second-moment rows that hold zeros are given a
    non-zero value while the step runs (CPU ``sqrt`` is slow on zeros) and then restored, and
    Adam's first-moment rows that are +0 are known to stay so and are not copied back; the
    result is bit for bit that of the generic path. BatchNorm running
    statistics of frozen channels are restored at each ``step()`` to their values when the
    wrapper was built (call :meth:`sync` after loading new weights into the model).

    Build the optimizer from ``model.parameters()`` (a subset is fine). For an LR scheduler pass
    ``masked.optimizer``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        slice: Slice,
        train: str = "critical",
        protect_classes: Iterable[int] | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer (e.g. "
                f"torch.optim.SGD(model.parameters(), lr=0.1)), got "
                f"{type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.model = model
        self.slice = slice
        self.train = _check_train(train)
        self.protect_classes = None if protect_classes is None else list(protect_classes)
        self._plan = _plan(model, slice, train, self.protect_classes)
        self._check_params(p for g in optimizer.param_groups for p in g["params"])
        self._signature: tuple[int, ...] = ()
        self._entries: list[_Entry] = []
        self._refresh_entries()
        self._norm_saved: list[tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.sync()

    # ---- setup ---------------------------------------------------------------------------
    def _check_params(self, params: Iterable[torch.Tensor]) -> None:
        params = list(params)
        foreign = [p for p in params if id(p) not in self._plan.rows]
        if foreign:
            raise ValueError(
                f"{len(foreign)} of the optimizer's {len(params)} parameters are not parameters "
                f"of the model, so they cannot be masked by neuron; build the optimizer from "
                f"model.parameters() (e.g. torch.optim.SGD(model.parameters(), lr=0.1))."
            )

    def _group_signature(self) -> tuple[int, ...]:
        return tuple(len(g["params"]) for g in self.optimizer.param_groups)

    def _refresh_entries(self) -> None:
        seen: set[int] = set()
        entries = []
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                _, rows = self._plan.rows[id(p)]
                if bool(rows.all()):
                    continue
                if not bool(rows.any()) or p.dim() == 0:
                    entries.append(_Entry(p, None, group=g))
                else:
                    idx = (~rows).nonzero().reshape(-1)
                    entries.append(_Entry(p, idx.to(p.device), _span(idx), g))
        self._entries = entries
        self._signature = self._group_signature()

    def sync(self) -> None:
        """Take the current running statistics of frozen BatchNorm channels as the values to
        keep (done at construction; call again after loading new weights into the model)."""
        saved = []
        with torch.no_grad():
            for m, frozen in self._plan.norms:
                idx = frozen.nonzero().reshape(-1).to(m.running_mean.device)
                saved.append(
                    (
                        m,
                        idx,
                        m.running_mean.index_select(0, idx),
                        m.running_var.index_select(0, idx),
                    )
                )
        self._norm_saved = saved

    # ---- the step ------------------------------------------------------------------------
    @staticmethod
    def _place(e: _Entry) -> None:
        if e.idx is not None and e.idx.device != e.param.device:  # the model moved since
            e.idx = e.idx.to(e.param.device)

    def _snapshot(self, e: _Entry, fill_keys: tuple[str, ...], zero_keys: tuple[str, ...]) -> None:
        """Frozen values of ``e`` (and of its optimizer state) as they are before the step,
        copied only when something other than this wrapper wrote to them since the last one.
        Frozen rows of the state keys in ``fill_keys`` that hold zeros are marked for
        :meth:`_fill`."""
        p = e.param
        if e.saved is None or e.saved_version != p._version or e.saved.device != p.device:
            e.saved = p.detach().clone() if e.idx is None else e.take(p.detach())
            e.saved_version = p._version
        if e.idx is None:
            return
        old = e.state_saved or {}
        state = {}
        for k, v in self.optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                c = old.get(k)
                if c is None or c.tensor is not v or c.version != v._version:
                    rows = e.take(v)
                    c = _Saved(
                        v,
                        v._version,
                        rows,
                        fill=k in fill_keys and _has_zero_or_subnormal(rows),
                        zero=k in zero_keys and _all_positive_zero(rows),
                    )
                state[k] = c
        e.state_saved = state

    def _fill(self) -> None:
        """Give the marked frozen state rows a value whose square root is fast; the step cannot
        carry it into other rows (element-wise optimizers only) and :meth:`_restore` puts the
        originals back."""
        for e in self._entries:
            if e.state_saved:
                for c in e.state_saved.values():
                    if c.fill:
                        e.fill(c.tensor, 1.0)

    def _restore(self) -> None:
        """Put back the frozen rows of parameters and optimizer state and the frozen
        BatchNorm statistics, and note the version counters that now hold them."""
        zero_keys, keeps_zero = _KEEPS_ZERO.get(type(self.optimizer), ((), None))
        for e in self._entries:
            p = e.param.detach()
            if e.idx is None:
                if p._version != e.saved_version:  # untouched (no grad): nothing to undo
                    p.copy_(e.saved)
                    e.saved_version = p._version
                continue
            e.put(p, e.saved)
            e.saved_version = p._version
            if not e.state_saved:
                continue
            current = self.optimizer.state.get(e.param, {})
            kept = zero_keys if zero_keys and keeps_zero(e.group) else ()
            for k, c in e.state_saved.items():
                t = current.get(k)
                if isinstance(t, torch.Tensor) and t.shape == p.shape:
                    if not (c.zero and k in kept and t is c.tensor):
                        e.put(t, c.rows)
                    c.tensor, c.version = t, t._version
        for m, idx, mean, var in self._norm_saved:
            if m.running_mean is not None:
                dev = m.running_mean.device
                if idx.device != dev:
                    idx, mean, var = idx.to(dev), mean.to(dev), var.to(dev)
                m.running_mean.index_copy_(0, idx, mean)
                m.running_var.index_copy_(0, idx, var)

    def _mask_grads(self) -> None:
        with torch.no_grad():
            for e in self._entries:
                g = e.param.grad
                if g is None:
                    continue
                if e.idx is None:
                    e.param.grad = None
                else:
                    self._place(e)
                    e.fill(g, 0)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of the wrapped optimizer; frozen entries and frozen BN statistics are kept."""
        if self._group_signature() != self._signature:
            self._check_params(p for g in self.optimizer.param_groups for p in g["params"])
            self._refresh_entries()
        self._mask_grads()
        wrapped = None
        if closure is not None:

            def wrapped() -> Any:
                with torch.enable_grad():
                    loss = closure()
                self._mask_grads()
                return loss

        fill_keys = _ELEMENTWISE.get(type(self.optimizer), ())
        zero_keys = _KEEPS_ZERO.get(type(self.optimizer), ((), None))[0]
        with torch.no_grad():
            for e in self._entries:
                self._place(e)
                self._snapshot(e, fill_keys, zero_keys)
        try:
            if fill_keys:
                with torch.no_grad():
                    self._fill()
            return self.optimizer.step() if wrapped is None else self.optimizer.step(wrapped)
        finally:
            with torch.no_grad():
                self._restore()

    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
    ) -> torch.Tensor:
        """Clip the gradients of the trainable entries only; returns their total norm.

        ``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)`` also counts the gradients
        of frozen entries, which :meth:`step` then discards, so the trainable entries are
        scaled down more than when the same entries are frozen with ``requires_grad``. This
        zeroes the frozen entries' gradients first (as ``step`` does), then clips the
        optimizer's parameters: the result equals ``clip_grad_norm_`` on a model whose frozen
        entries get no gradient. Call it between ``backward()`` and :meth:`step`.
        """
        if self._group_signature() != self._signature:
            self._check_params(p for g in self.optimizer.param_groups for p in g["params"])
            self._refresh_entries()
        self._mask_grads()
        params = list(
            {
                id(p): p
                for g in self.optimizer.param_groups
                for p in g["params"]
                if p.grad is not None
            }.values()
        )
        return torch.nn.utils.clip_grad_norm_(
            params, max_norm, norm_type, error_if_nonfinite=error_if_nonfinite
        )

    # ---- delegation ----------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer; its parameters must belong to the model."""
        params = param_group.get("params", []) if isinstance(param_group, dict) else None
        if params is None:
            raise TypeError(
                f"param_group must be a dict with a 'params' entry, got "
                f"{type(param_group).__name__}"
            )
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        self._check_params(params)
        self.optimizer.add_param_group({**param_group, "params": params})
        self._refresh_entries()

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def trainable_fraction(self) -> float:
        """Fraction of the model's parameter entries this wrapper lets train."""
        return trainable_fraction(self.model, self.slice, self.train, self.protect_classes)

    def __repr__(self) -> str:
        protect = "" if not self.protect_classes else f", protect_classes={self.protect_classes}"
        return (
            f"MaskedOptimizer(train={self.train!r}{protect}, "
            f"trainable={self.trainable_fraction():.1%} of parameters, "
            f"optimizer={type(self.optimizer).__name__}, head={self._plan.head!r})"
        )
