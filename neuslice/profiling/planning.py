"""Before the pass: layer shapes agreed by all ranks, the memory plan and its budget error, the
check that ranks profile alike; after it: the Profile's tensors and warnings."""

from __future__ import annotations

import itertools
import json
import logging

import torch
from torch import nn

from .._utils.hooks import hooks_at

from ..runtime.memory import GiB, MemoryBudgetError, estimate
from .config import PassConfig
from .passes import autocast_ctx, model_logits, probe_positions
from .scores import scorable

logger = logging.getLogger(__name__)

__all__ = [
    "budget_error",
    "plan_memory",
    "model_bytes",
    "probe_batch_bytes",
    "layer_shapes",
    "check_ranks_agree",
    "collect",
]


def budget_error(est, budget_gb: float, cfg: PassConfig, why: str = "") -> MemoryBudgetError:
    hints = []
    if cfg.category_order == "any" and cfg.hsic and cfg.num_classes > 2:
        hints.append(
            "category_order='grouped' with the data sorted by category "
            "(neuslice.runtime.CategoryGroupedSampler) keeps HSIC accumulators only for the "
            "categories in progress"
        )
    if cfg.keep_hsic and cfg.hsic:
        hints.append(
            "keep_hsic=False stores CKA prefix curves (d values per metric) instead of "
            "d x d matrices"
        )
    hints.append(
        "a smaller cka_batch, hsic_route='minibatch', fewer layers, or a larger max_memory_gb"
    )
    return MemoryBudgetError(
        f"{why}neuslice.profile would need about {est.total / GiB:.2f} GiB, over "
        f"max_memory_gb={budget_gb}.\n{est.table()}\nTo fit: " + "; ".join(hints) + "."
    )


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared tensors counted once)."""
    seen = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr())


def probe_batch_bytes(model: nn.Module, sliced, x: torch.Tensor, cfg: PassConfig) -> int:
    """Bytes one batch like ``x`` holds while in flight, measured by one forward: the tensors
    autograd saves for the backward pass (Taylor and DeepLIFT differentiate), the pass's copies
    of every sliced layer's outputs, and the logits (DeepLIFT reuses the same graph and adds a
    baseline of one sample)."""
    params = {_storage_key(t) for t in itertools.chain(model.parameters(), model.buffers())}
    saved: dict = {}
    outs: list[int] = [0]

    def pack(t):
        key = _storage_key(t)
        if key not in params:
            saved[key] = t.untyped_storage().nbytes()
        return t

    def keep(out):
        outs[0] += out.numel() * out.element_size()  # the pass's copy of the output
        return out

    want_grad = bool({"taylor", "taylor_act", "deeplift"} & set(cfg.metrics))
    points = [(l.hook_module, l.call_index, keep) for l in sliced]
    with (
        torch.set_grad_enabled(want_grad),
        hooks_at(model, points),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        xx = x.detach().requires_grad_(want_grad) if x.is_floating_point() else x
        with autocast_ctx(x.device, cfg.autocast):
            logits = model(xx)
    total = sum(saved.values()) + outs[0] + _tensor_bytes(model_logits(logits, cfg))
    return total


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_memory(
    sliced,
    positions,
    cfg: PassConfig,
    batch_size: int,
    open_categories: int = 2,
    model_bytes: int = 0,
    batch_bytes: int = 0,
):
    return estimate(
        [(l.name, l.num_neurons, positions[l.name]) for l in sliced],
        cfg.num_classes,
        hsic=cfg.hsic,
        hsic_route=cfg.hsic_route,
        cka_batch=cfg.cka_batch,
        max_feature_dim=cfg.max_feature_dim,
        category_order=cfg.category_order,
        keep_hsic=cfg.keep_hsic,
        num_metrics=len(scorable(cfg.metrics)),
        batch_size=batch_size,
        open_categories=open_categories,
        model_bytes=model_bytes,
        batch_bytes=batch_bytes,
    )


def layer_shapes(model, sliced, first, reducer, autocast, inplace=None):
    """Positions per layer and the neuron dtype, agreed by all ranks (``inplace``: see
    ``probe_positions``; this rank's own)."""
    shapes = None
    if first is not None:
        x = first[0]
        positions, dtype = probe_positions(model, sliced, x, autocast, inplace)
        shapes = (positions, str(dtype), list(x.shape[1:]))
    if reducer is not None:
        known = [s for s in reducer.gather_objects(shapes, "exchanging layer shapes") if s]
        if known and any(s != known[0] for s in known):
            raise ValueError(
                f"ranks disagree on the layers' output shapes or input shape "
                f"({known}); every rank must feed inputs of the same shape."
            )
        shapes = known[0] if known else None
    if shapes is None:
        raise ValueError("the loader yielded no samples; profiling needs data.")
    positions, dtype, input_shape = shapes
    return positions, getattr(torch, dtype.split(".")[-1]), input_shape


def check_ranks_agree(reducer, what: dict) -> None:
    seen = reducer.gather_objects(what)
    for r, other in enumerate(seen):
        if other != seen[0]:
            diff = {
                k: (seen[0].get(k), other.get(k)) for k in what if seen[0].get(k) != other.get(k)
            }
            raise ValueError(
                f"rank {r} profiles with different settings than rank 0: "
                f"{json.dumps(diff, default=str)}. Every rank must call "
                f"neuslice.profile with the same model and arguments."
            )


def collect(sliced, states, hsic: bool):
    """The Profile's tensors, its warnings and the HSIC routes."""
    tensors: dict[str, torch.Tensor] = {}
    warnings: list[str] = []
    for l in sliced:
        st = states[l.name]
        tensors.update({f"{l.name}.{k}": v for k, v in st.tensors().items()})
        dead = (st.moments.m2 <= 0) & (st.moments.count.unsqueeze(1) > 1)
        if bool(dead.any()):
            warnings.append(
                f"layer {l.name}: constant (dead) neurons per category: {dead.sum(1).tolist()}"
            )
            logger.info(warnings[-1])
    routes = {l.name: states[l.name].route for l in sliced} if hsic else {}
    counts = states[sliced[0].name].moments.count.tolist()
    need = 2 if all(r == "feature" for r in routes.values()) else 4
    small = [k for k, n in enumerate(counts) if 0 < n < need]  # absent ones: no warning
    if hsic and small:
        warnings.append(
            f"categories {small} have fewer than {need} samples "
            f"(counts {[counts[k] for k in small]}): no CKA for them; semantic "
            f"slicing skips them."
        )
        logger.warning(warnings[-1])
    absent = [k for k, n in enumerate(counts) if n == 0]
    if absent:  # expected when profiling a subset of the classes (e.g. one task)
        warnings.append(
            f"categories {absent} have no samples in this data; they get no "
            f"scores of their own and slicing skips them."
        )
        logger.info(warnings[-1])
    return tensors, warnings, routes
