"""Incremental development with slices (the paper's RQ4): learn tasks one after another.

A *task* is a group of classes of one shared single-head classifier. After task ``t`` is
learned, the model is sliced on task ``t``'s training data; the next tasks train only the
neurons outside the union of the slices of all earlier tasks (:class:`~neuslice.MaskedOptimizer`
with ``train="noncritical"``), with the classifier rows of earlier classes protected.

Inference rules used throughout:

* **task-aware**: task ``t`` runs with the union of the masks of tasks ``0..t`` applied
  (:func:`neuslice.masked`) and predicts the argmax over its own classes only. Every value this
  masked model computes depends on frozen parameters only (frozen rows include their columns
  for non-critical inputs, which the mask zeroes anyway; BatchNorm running statistics of frozen
  channels are restored by the optimizer wrapper), so these predictions (and the task's logits)
  are bit-identical before and after any later task is learned.
* **task-agnostic**: no mask; argmax over all classes learned so far.

Baselines without slices (``original``, ``retrain``, ``finetune``, ``replay``) use the same two
rules without any mask.
"""

from __future__ import annotations

import functools

import contextlib
import math
import os
import re
import tempfile
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

from .._utils.hooks import module_modes
from .batchnorm import recalibrate_batchnorm
from ..masking import masked
from .masked_optimizer import MaskedOptimizer, head_name, class_index
from ..profiling.profile import profile
from ..slicing import CRITERIA, Slice, categorywise_slice, global_slice, semantic_slice
from .._utils.training import fit_epochs, make_loader
from .._utils.checks import check_fraction, model_device

__all__ = [
    "split_tasks",
    "learn_task",
    "task_logits",
    "task_accuracy",
    "union_slice",
    "make_slicer",
    "incremental_run",
    "slice_bytes",
    "replay_bytes",
    "replay_subset",
    "task_accuracy_any",
    "METHODS",
]

#: Method names accepted by :func:`incremental_run`; ``replay`` and ``neusemslice+replay`` also
#: come with a percentage suffix (``replay5``, ``replay10``, ``replay100``, ...).
METHODS = ("original", "retrain", "finetune", "replay", "neusemslice", "neusemslice+replay")

Slicer = Callable[[nn.Module, Dataset, Sequence[int]], Slice]


# ---- checks ------------------------------------------------------------------------------


def _check_groups(class_groups: Any) -> list[list[int]]:
    if isinstance(class_groups, (str, bytes)) or not isinstance(class_groups, Iterable):
        raise TypeError(
            f"class_groups must be a list of lists of class indices "
            f"(e.g. [[0, 1, 2], [3, 4]]), got {type(class_groups).__name__}"
        )
    groups: list[list[int]] = []
    seen: dict[int, int] = {}
    for t, g in enumerate(class_groups):
        if isinstance(g, (str, bytes)) or not isinstance(g, Iterable):
            raise TypeError(
                f"class group {t} must be a list of class indices, got {type(g).__name__}"
            )
        group = []
        for c in g:
            c = class_index(c, f"class group {t}")
            if c < 0:
                raise ValueError(f"class group {t} holds the negative class index {c}")
            if c in seen:
                raise ValueError(
                    f"class {c} is in group {seen[c]} and group {t}; class groups must not overlap"
                )
            seen[c] = t
            group.append(c)
        if not group:
            raise ValueError(f"class group {t} is empty; every task needs at least one class")
        groups.append(group)
    if not groups:
        raise ValueError("class_groups is empty; give at least one group of classes")
    return groups


def _check_module(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_dataset(dataset: Any, what: str = "dataset") -> None:
    if not isinstance(dataset, Dataset):
        raise TypeError(f"{what} must be a torch.utils.data.Dataset, got {type(dataset).__name__}")


def _labels(dataset: Dataset) -> torch.Tensor:
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        return tensors[1].reshape(-1).long()
    return torch.tensor(
        [int(dataset[i][1]) for i in range(len(dataset))],  # type: ignore
        dtype=torch.long,
    )


def _num_outputs(model: nn.Module) -> int:
    head = dict(model.named_modules())[head_name(model)]
    return head.out_features if isinstance(head, nn.Linear) else head.out_channels


# ---- data --------------------------------------------------------------------------------


def split_tasks(dataset: Dataset, class_groups: list[list[int]]) -> list[TensorDataset]:
    """One ``TensorDataset`` per class group, holding that group's samples in their original
    order. Labels stay global class indices (the model has one head over all classes)."""
    _check_dataset(dataset)
    groups = _check_groups(class_groups)
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        x, y = tensors[0], tensors[1]
    else:
        pairs = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
        if not pairs:
            raise ValueError("dataset is empty")
        x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        y = torch.tensor([int(p[1]) for p in pairs], dtype=torch.long)
    out = []
    for t, g in enumerate(groups):
        keep = torch.isin(y.reshape(-1), torch.tensor(g, dtype=y.dtype))
        if not bool(keep.any()):
            raise ValueError(f"class group {t} ({g}) has no samples in the dataset")
        out.append(TensorDataset(x[keep], y[keep]))
    return out


def _replay_count(n: int, fraction: float) -> int:
    return min(n, max(1, math.ceil(fraction * n)))


def replay_subset(dataset: Dataset, fraction: float, seed: int = 0) -> TensorDataset:
    """A seeded random ``fraction`` of ``dataset`` (at least one sample): a replay buffer."""
    _check_dataset(dataset)
    fraction = check_fraction("replay fraction", fraction)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("cannot take a replay buffer of an empty dataset")
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n, generator=g)[: _replay_count(n, fraction)].sort().values
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        return TensorDataset(tensors[0][idx], tensors[1][idx])
    pairs = [dataset[int(i)] for i in idx]
    return TensorDataset(
        torch.stack([torch.as_tensor(p[0]) for p in pairs]),
        torch.tensor([int(p[1]) for p in pairs], dtype=torch.long),
    )


def _sample_bytes(dataset: Dataset) -> int:
    sample = dataset[0]
    if not isinstance(sample, (tuple, list)) or len(sample) < 2:
        raise ValueError("dataset items must be (input, label) pairs")
    total = 0
    for part in sample[:2]:
        t = torch.as_tensor(part)
        total += t.numel() * t.element_size()
    return total


def replay_bytes(dataset: Dataset, fraction: float) -> int:
    """Bytes a replay buffer of ``fraction`` of ``dataset`` stores: number of samples (as
    :func:`replay_subset` takes them) times the bytes of one input tensor plus its label, in the
    dtypes the dataset holds them (float32 images, int64 labels for the bundled loaders)."""
    _check_dataset(dataset)
    fraction = check_fraction("replay fraction", fraction)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("cannot size a replay buffer of an empty dataset")
    return _replay_count(n, fraction) * _sample_bytes(dataset)


def slice_bytes(slice: Slice) -> int:
    """Size in bytes of ``slice`` saved with :meth:`Slice.save` (JSON, masks as hex bits)."""
    if not isinstance(slice, Slice):
        raise TypeError(f"slice must be a neuslice.Slice, got {type(slice).__name__}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "slice.json")
        slice.save(path)
        return os.path.getsize(path)


# ---- slices ------------------------------------------------------------------------------


def union_slice(slices: Sequence[Slice]) -> Slice:
    """A slice whose critical neurons are those critical in any of ``slices`` (masks OR-ed;
    per-category masks OR-ed too when every slice has them)."""
    slices = list(slices)
    if not slices:
        raise ValueError("union_slice needs at least one slice")
    for s in slices:
        if not isinstance(s, Slice):
            raise TypeError(f"union_slice expects neuslice.Slice objects, got {type(s).__name__}")
    first = slices[0]
    if len(slices) == 1:
        return first
    for s in slices[1:]:
        if s.fingerprint != first.fingerprint or set(s.masks) != set(first.masks):
            raise ValueError("union_slice: the slices belong to different models or layers")
    masks = {k: torch.stack([s.masks[k].bool().cpu() for s in slices]).any(0) for k in first.masks}
    cat = None
    if all(s.category_masks is not None for s in slices):
        cat = {
            k: torch.stack(
                [
                    s.category_masks[k].bool().cpu()  # type: ignore[index]
                    for s in slices
                ]
            ).any(0)
            for k in first.masks
        }
    notes = [n for s in slices for n in s.notes]
    return Slice(
        masks=masks,
        strategy="union",
        metric=first.metric,
        fingerprint=first.fingerprint,
        input_shape=list(first.input_shape),
        category_masks=cat,
        notes=notes + [f"union of {len(slices)} slices"],
    )


def make_slicer(
    strategy: str = "semantic",
    metric: str = "taylor",
    value: float = 0.9,
    batch_size: int = 128,
    criterion: str = "layer_cka",
    **profile_kwargs: Any,
) -> Slicer:
    """A ``slicer(model, dataset, classes) -> Slice`` that profiles ``model`` on ``dataset``
    and slices with ``strategy`` ("semantic": ``threshold=value``; "global" /
    "categorywise": ``ratio=value``). Classes absent from ``dataset`` are skipped.

    ``criterion`` is the semantic criterion (:func:`neuslice.semantic_slice`): the paper's
    ``"layer_cka"`` here by default (the incremental-development results were measured with
    it, at thresholds around 0.9), or ``"consumer_r2"`` (thresholds around 0.05-0.6)."""
    strategies = {
        "semantic": semantic_slice,
        "global": global_slice,
        "categorywise": categorywise_slice,
    }
    if strategy not in strategies:
        raise ValueError(f"strategy must be one of {sorted(strategies)}, got {strategy!r}")
    if not isinstance(metric, str):
        raise TypeError(f"metric must be a metric name such as 'taylor', got {metric!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {list(CRITERIA)}, got {criterion!r}")
    make = strategies[strategy]
    if strategy == "semantic":
        make = functools.partial(semantic_slice, criterion=criterion)
    profile_kwargs.setdefault("progress", False)
    profile_kwargs.setdefault("hsic", strategy == "semantic")

    def slicer(model: nn.Module, dataset: Dataset, classes: Sequence[int]) -> Slice:
        prof = profile(
            model,
            make_loader(dataset, batch_size=batch_size),
            num_classes=_num_outputs(model),
            metrics=(metric,),
            **profile_kwargs,
        )
        if strategy == "semantic" and criterion == "consumer_r2":
            loader = make_loader(dataset, batch_size=batch_size)
            return make(prof, metric, value, model=model, loader=loader, progress=False)
        return make(prof, metric, value)

    slicer.__name__ = f"{strategy}_slicer"
    return slicer


# ---- training and evaluation -------------------------------------------------------------


def learn_task(
    model: nn.Module,
    train_set: Dataset,
    classes: Sequence[int],
    frozen_slice: Slice | None = None,
    protect_classes: Iterable[int] = (),
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
    optimizer: Callable[[Iterable[nn.Parameter]], Any] | None = None,
    fit: Callable[..., Any] | None = None,
) -> list[float]:
    """Train ``model`` in place with Adam and cross-entropy over the full head on
    ``train_set``, whose labels must all be in ``classes``.

    Your own training fits in: ``optimizer(parameters)`` builds the optimizer (default Adam
    with ``lr`` and ``weight_decay``), and ``fit(model, loader, optimizer, epochs)`` runs the
    epochs (default: cross-entropy epochs; returns what ``fit`` returns). The optimizer is
    wrapped in the :class:`MaskedOptimizer` either way.

    With ``frozen_slice`` only its non-critical neurons (and parameters outside its layers)
    learn, and the head rows of ``protect_classes`` stay fixed (:class:`MaskedOptimizer`,
    ``train="noncritical"``). The model trains in train mode on its current device and is left
    in eval mode. Returns the per-epoch mean losses.
    """
    _check_module(model)
    _check_dataset(train_set, "train_set")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number (e.g. 1e-3), got {lr!r}")
    if frozen_slice is not None and not isinstance(frozen_slice, Slice):
        raise TypeError(
            f"frozen_slice must be a neuslice.Slice or None, got {type(frozen_slice).__name__}"
        )
    classes = _check_groups([classes])[0]
    if len(train_set) == 0:  # type: ignore[arg-type]
        raise ValueError("train_set is empty; a task needs training samples")
    extra = sorted(set(_labels(train_set).tolist()) - set(classes))
    if extra:
        raise ValueError(
            f"train_set holds labels {extra} that are not in the task's classes {classes}"
        )
    n_out = _num_outputs(model)
    if max(classes) >= n_out:
        raise ValueError(f"class {max(classes)} does not fit the model's head of {n_out} outputs")
    protect = list(protect_classes)
    if protect and frozen_slice is None:
        raise ValueError("protect_classes needs a frozen_slice (the MaskedOptimizer applies it)")
    for name, f in (("optimizer", optimizer), ("fit", fit)):
        if f is not None and not callable(f):
            raise TypeError(f"{name} must be a callable or None, got {type(f).__name__}")
    dev = model_device(model)
    make = optimizer or (lambda ps: torch.optim.Adam(ps, lr=lr, weight_decay=weight_decay))
    opt: Any = make(model.parameters())
    if frozen_slice is not None:
        opt = MaskedOptimizer(
            opt, model, frozen_slice, train="noncritical", protect_classes=protect
        )
    loader = make_loader(train_set, batch_size=batch_size, shuffle=True, seed=seed)
    if fit is not None:
        return fit(model, loader, opt, epochs)
    return fit_epochs(model, loader, opt, epochs, dev)


@torch.no_grad()
def task_logits(
    model: nn.Module,
    dataset: Dataset,
    classes: Sequence[int] | None = None,
    slice: Slice | None = None,
    batch_size: int = 512,
) -> torch.Tensor:
    """Logits of ``model`` (eval mode, mode restored afterwards) on ``dataset``, restricted to
    the columns ``classes`` (all when None), with ``slice``'s mask applied when given."""
    _check_module(model)
    _check_dataset(dataset)
    dev = model_device(model)
    cols = None if classes is None else torch.tensor(list(classes), dtype=torch.long)
    out = []
    with module_modes(model, train=False):
        ctx = masked(model, slice) if slice is not None else contextlib.nullcontext()
        with ctx:
            for x, _ in make_loader(dataset, batch_size=batch_size):
                z = model(x.to(dev)).cpu()
                out.append(z if cols is None else z.index_select(1, cols))
    if not out:
        raise ValueError("cannot compute logits on an empty dataset")
    return torch.cat(out)


def task_accuracy(
    model: nn.Module, dataset: Dataset, classes: Sequence[int], slice: Slice | None = None
) -> float:
    """Accuracy of the argmax over ``classes`` only (labels must be in ``classes``),
    with ``slice``'s mask applied when given."""
    classes = list(classes)
    z = task_logits(model, dataset, classes, slice)
    pred = torch.tensor(classes, dtype=torch.long)[z.argmax(1)]
    return float((pred == _labels(dataset)).float().mean())


# ---- per-task BatchNorm statistics --------------------------------------------------------


def _norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def task_batchnorm_stats(
    model: nn.Module, slice: Slice, dataset: Dataset, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """BatchNorm running statistics of ``model`` re-estimated on ``dataset`` under ``slice``
    (``neuslice.recalibrate_batchnorm``), as a dict of buffers to restore at inference."""
    fixed = recalibrate_batchnorm(
        model, slice, make_loader(dataset, batch_size=batch_size), progress=False
    )
    return {
        f"{n}.{k}": b.detach().clone()
        for n, m in _norms(fixed)
        for k, b in m.named_buffers(recurse=False)
    }


class _swapped_stats:
    """Within the block, ``model``'s BatchNorm buffers are ``stats`` (restored on exit)."""

    def __init__(self, model: nn.Module, stats: dict[str, torch.Tensor] | None):
        self.model, self.stats, self.saved = model, stats, {}

    def __enter__(self):
        if self.stats:
            bufs = dict(self.model.named_buffers())
            with torch.no_grad():
                for k, v in self.stats.items():
                    self.saved[k] = bufs[k].clone()
                    bufs[k].copy_(v)
        return self.model

    def __exit__(self, *exc):
        bufs = dict(self.model.named_buffers())
        with torch.no_grad():
            for k, v in self.saved.items():
                bufs[k].copy_(v)
        return False


def _stats_bytes(stats: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in stats.values())


# ---- the experiment ----------------------------------------------------------------------


def _parse_method(method: Any, replay_fraction: float) -> tuple[str, float | None]:
    """(base method, replay fraction or None)."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    m = re.fullmatch(r"(neusemslice\+replay|replay)(\d+(?:\.\d+)?)?", method)
    if m:
        base = "neusemslice" if m.group(1).startswith("neusemslice") else "finetune"
        frac = replay_fraction if m.group(2) is None else float(m.group(2)) / 100
        return base, check_fraction("replay fraction", frac)
    if method in ("original", "retrain", "finetune", "neusemslice"):
        return method, None
    raise ValueError(
        f"unknown method {method!r}; choose one of {list(METHODS)} (replay methods "
        f"also as e.g. 'replay5', 'replay10', 'replay100', 'neusemslice+replay10')"
    )


def incremental_run(
    model_factory: Callable[[], nn.Module],
    train_sets: Sequence[Dataset],
    test_sets: Sequence[Dataset],
    class_groups: list[list[int]],
    method: str,
    *,
    slicer: Slicer | None = None,
    replay_fraction: float = 0.1,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    task_batchnorm: bool = False,
) -> list[dict[str, Any]]:
    """Learn the tasks ``class_groups`` in order with ``method`` and evaluate every task.

    Methods: ``original`` (first task only), ``retrain`` (all tasks' data at once, from
    scratch: the upper bound), ``finetune`` (plain sequential training), ``replay``/``replayN``
    (sequential, mixing ``replay_fraction`` or N% of each earlier task's training data into
    later tasks), ``neusemslice`` (after each task, ``slicer(model, task_train_set, classes)``
    slices the model; later tasks train only neurons outside the union of earlier slices, with
    earlier head rows protected) and ``neusemslice+replay``/``neusemslice+replayN`` (both).
    ``slicer`` defaults to ``make_slicer("semantic", "taylor", 0.9)``; pass another to run
    global or category-wise slicing baselines.

    Returns one row per task, then an ``"overall"`` row (sample-weighted over the test sets):
    ``task_aware`` (union of the masks of tasks up to it for slice methods, the last task
    unmasked; argmax over the task's classes), ``task_agnostic`` (no mask; argmax over all
    learned classes), ``task_aware_at_learning`` (the same right after the task was learned,
    None if never learned) and ``forgetting`` (that minus ``task_aware``), and for
    the overall row ``memory_bytes``: bytes kept besides the model (saved slices and/or the
    replay buffers).

    ``task_batchnorm`` (slice methods): after slicing a task, its BatchNorm running statistics
    are re-estimated on its training data under its mask and kept (counted in
    ``memory_bytes``); the task's masked inference uses them. Masking a network with
    BatchNorm otherwise normalises with statistics collected with every neuron active.
    """
    if isinstance(model_factory, nn.Module) or not callable(model_factory):
        raise TypeError(
            f"model_factory must be a callable returning a fresh nn.Module, "
            f"got {type(model_factory).__name__}"
        )
    groups = _check_groups(class_groups)
    base, fraction = _parse_method(method, replay_fraction)
    train_sets, test_sets = list(train_sets), list(test_sets)
    if len(train_sets) != len(groups) or len(test_sets) != len(groups):
        raise ValueError(
            f"need one train and one test set per class group: {len(groups)} "
            f"groups, {len(train_sets)} train sets, {len(test_sets)} test sets"
        )
    for t, (tr, te) in enumerate(zip(train_sets, test_sets)):
        _check_dataset(tr, f"train_sets[{t}]")
        _check_dataset(te, f"test_sets[{t}]")
    if slicer is None:
        slicer = make_slicer()
    elif not callable(slicer):
        raise TypeError(
            f"slicer must be a callable (model, dataset, classes) -> Slice, "
            f"got {type(slicer).__name__}"
        )

    model = model_factory()
    _check_module(model)
    if device is not None:
        model.to(torch.device(device))
    kw = dict(epochs=epochs, lr=lr, batch_size=batch_size)

    slices: list[Slice] = []  # slices[t]: slice of task t (slice methods)
    learned: list[int] = []  # tasks trained so far
    memory = 0
    at_learning: dict[int, float] = {}  # task-aware accuracy right after learning the task
    bn_stats: dict[int, dict[str, torch.Tensor]] = {}  # task_batchnorm: per-task statistics
    if base == "retrain":
        all_classes = [c for g in groups for c in g]
        learn_task(model, ConcatDataset(train_sets), all_classes, seed=seed, **kw)
        learned = list(range(len(groups)))
    else:
        n_tasks = 1 if base == "original" else len(groups)
        for t in range(n_tasks):
            data: Dataset = train_sets[t]
            classes = list(groups[t])
            if fraction is not None and t > 0:
                buffers = [replay_subset(train_sets[s], fraction, seed=seed + s) for s in range(t)]
                data = ConcatDataset([data, *buffers])
                classes = [c for s in range(t + 1) for c in groups[s]]
            frozen = union_slice(slices) if base == "neusemslice" and slices else None
            protect = [c for s in range(t) for c in groups[s]] if frozen is not None else ()
            learn_task(
                model,
                data,
                classes,
                frozen_slice=frozen,
                protect_classes=protect,
                seed=seed + t,
                **kw,
            )
            learned.append(t)
            if base == "neusemslice" and t < len(groups) - 1:
                sl = slicer(model, train_sets[t], list(groups[t]))
                if not isinstance(sl, Slice):
                    raise TypeError(f"slicer must return a neuslice.Slice, got {type(sl).__name__}")
                slices.append(sl)
                if task_batchnorm:
                    bn_stats[t] = task_batchnorm_stats(model, union_slice(slices), train_sets[t])
            mask = (
                union_slice(slices[: t + 1]) if base == "neusemslice" and t < len(slices) else None
            )
            with _swapped_stats(model, bn_stats.get(t)):
                at_learning[t] = task_accuracy(model, test_sets[t], groups[t], mask)
        if base == "neusemslice":
            memory += sum(slice_bytes(s) for s in slices)
            memory += sum(_stats_bytes(st) for st in bn_stats.values())
        if fraction is not None:
            memory += sum(
                replay_bytes(train_sets[s], fraction) for s in range(max(0, len(groups) - 1))
            )

    seen = [c for t in learned for c in groups[t]]
    rows: list[dict[str, Any]] = []
    n_total = aware_total = agnostic_total = 0.0
    for t, (te, g) in enumerate(zip(test_sets, groups)):
        mask = None
        if base == "neusemslice" and t < len(slices):
            mask = union_slice(slices[: t + 1])
        with _swapped_stats(model, bn_stats.get(t)):
            aware = task_accuracy(model, te, g, mask)
        labels = _labels(te)
        # an unlearned task's classes are not among the candidates: every prediction is wrong
        agnostic = task_accuracy_any(model, te, seen, labels)
        n = len(labels)
        before = aware if base == "retrain" else at_learning.get(t)
        rows.append(
            {
                "method": method,
                "task": t,
                "classes": list(g),
                "n_test": n,
                "task_aware": aware,
                "task_agnostic": agnostic,
                "masked": mask is not None,
                "learned": t in learned,
                "task_aware_at_learning": before,
                "forgetting": None if before is None else before - aware,
            }
        )
        n_total += n
        aware_total += aware * n
        agnostic_total += agnostic * n
    rows.append(
        {
            "method": method,
            "task": "overall",
            "classes": [c for g in groups for c in g],
            "n_test": int(n_total),
            "task_aware": aware_total / n_total,
            "task_agnostic": agnostic_total / n_total,
            "memory_bytes": memory,
        }
    )
    return rows


def task_accuracy_any(
    model: nn.Module,
    dataset: Dataset,
    candidates: Sequence[int],
    labels: torch.Tensor | None = None,
) -> float:
    """Mask-free accuracy of the argmax over ``candidates`` (labels outside them count wrong)."""
    candidates = list(candidates)
    labels = _labels(dataset) if labels is None else labels
    z = task_logits(model, dataset, candidates)
    pred = torch.tensor(candidates, dtype=torch.long)[z.argmax(1)]
    return float((pred == labels).float().mean())
