"""One streaming pass over the data that collects everything slicing needs.

For every sliced layer and every category: the per-sample neuron values' mean and variance (the
Avg, Var and Ens metrics), the Taylor and DeepLIFT contributions, and the neuron-HSIC matrix M of
the layer (``neuslice.cka``), from which the CKA of any neuron subset follows -- or, to bound
memory at many categories, only the CKA prefix curves semantic slicing reads. Memory does not
grow with the number of samples and is estimated before anything is allocated
(``neuslice.runtime.memory``). The pass can be spread over the ranks of ``torch.distributed``
(``neuslice.runtime.distributed``), checkpointed and resumed (``neuslice.runtime.checkpoint``),
and run under autocast.

The pass has three steps: :func:`_plan` (check the arguments, find the layers, read the shapes
from the first batch, state the memory bound, set up or resume the state), :func:`_consume`
(the batches: forward and DeepLIFT passes, grouped-order bookkeeping, checkpoints) and
:func:`_finish` (the last reductions and the ``Profile``).
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .._utils.checks import model_device
from .._utils.hooks import module_modes
from .._utils.in_use import exclusive
from .._utils.wrappers import unwrap_model
from .._utils.numerics import accumulation_dtype, no_tf32
from .._utils.progress import progress as progress_bar
from ..layers import SlicedLayer, find_layers, model_fingerprint
from ..runtime import checkpoint as ckpt
from ..runtime.distributed import active_reducer
from ..runtime.memory import GiB
from .config import PassConfig, ProfileConfig
from .layer_state import LayerState
from .pass_state import PassState, resume_blob
from .passes import forward_pass, probe_positions, split_batch
from .planning import (
    budget_error,
    check_ranks_agree,
    collect,
    layer_shapes,
    model_bytes,
    plan_memory,
    probe_batch_bytes,
)
from .result import Profile
from .scores import ALL_METRICS, METRICS
from .stats import scratch_space

logger = logging.getLogger(__name__)

__all__ = [
    "profile",
    "Profile",
    "ProfileConfig",
    "METRICS",
    "ALL_METRICS",
    "estimate_profile_memory",
]


@dataclass
class _Pass:
    """Everything ``_plan`` sets up for ``_consume`` and ``_finish``."""

    model: nn.Module
    sliced: list[SlicedLayer]
    cfg: PassConfig
    device: torch.device
    reducer: object
    rank: int
    world: int
    fingerprint: str
    input_shape: list[int]
    batches: Iterator  # the loader's batches, the ones read while planning first
    read: int  # how many of them were read while planning
    plan: object  # open categories -> MemoryEstimate
    state: PassState | None = None
    expect: dict | None = None  # what a checkpoint must match
    skip: int = 0  # batches a resumed run re-reads without computing
    want_digest: str = ""
    resumed_from: str | None = None
    timings: dict = field(default_factory=lambda: {"forward": 0.0, "deeplift": 0.0})

    @property
    def synced(self) -> bool:
        """Several ranks in grouped order finish categories in lock-step."""
        return self.reducer is not None and self.cfg.category_order == "grouped" and self.cfg.hsic


def _work_model(model: nn.Module, device) -> tuple[nn.Module, torch.device]:
    """The model to run and where: a copy when ``device`` is not the model's own."""
    home = model_device(model)
    device = torch.device(device) if device is not None else home
    return (model if device == home else copy.deepcopy(model).to(device)), device


def _plan(
    model,
    work_model,
    device,
    loader_iter,
    sliced_names,
    cfg: PassConfig,
    reducer,
    checkpoint,
    resume,
) -> _Pass:
    rank, world = (reducer.rank, reducer.world) if reducer else (0, 1)
    fingerprint = model_fingerprint(model)
    sliced = find_layers(work_model, sliced_names)
    if reducer is not None:
        check_ranks_agree(
            reducer,
            {
                "fingerprint": fingerprint,
                "layers": [l.name for l in sliced],
                "config": cfg.key(),
                "resume": resume is not None,
                "checkpoint": checkpoint is not None,
            },
        )
    read = []
    for batch in loader_iter:  # find the first non-empty batch for the shapes
        read.append(split_batch(batch, cfg.num_classes, len(read)))
        if read[-1][0].shape[0]:
            break
    first = next((b for b in read if b[0].shape[0]), None)
    if first is not None:
        first = (first[0].to(device), first[1])
    inplace: dict[str, set[str]] = {}
    positions, feat_dtype, input_shape = layer_shapes(
        work_model, sliced, first, reducer, cfg.autocast, inplace
    )
    batch_size = max([b[0].shape[0] for b in read] + [1])
    weights = model_bytes(work_model) * (1 if work_model is model else 2)
    in_flight = 0
    if first is not None:
        in_flight = (
            probe_batch_bytes(work_model, sliced, first[0], cfg)
            * batch_size
            // max(first[0].shape[0], 1)
        )

    def plan(open_categories=2):
        return plan_memory(sliced, positions, cfg, batch_size, open_categories, weights, in_flight)

    est = plan()
    if est.total > cfg.max_memory_gb * GiB:
        raise budget_error(est, cfg.max_memory_gb, cfg)
    logger.info(
        "estimated memory %.2f GiB of max_memory_gb=%s (the table: DEBUG level, or "
        "neuslice.estimate_profile_memory)",
        est.total / GiB,
        cfg.max_memory_gb,
    )
    logger.debug("%s", est.table())
    states = {
        l.name: LayerState(l, positions[l.name], cfg, device, accumulation_dtype(feat_dtype))
        for l in sliced
    }
    for name, keys in inplace.items():  # copied from the start: no batch runs twice for them
        states[name].copied |= keys
    p = _Pass(
        work_model,
        sliced,
        cfg,
        device,
        reducer,
        rank,
        world,
        fingerprint,
        input_shape,
        itertools.chain(read, loader_iter),
        len(read),
        plan,
    )
    p.state = PassState(states, cfg, reducer)
    if checkpoint is not None or resume is not None:
        p.expect = {
            "fingerprint": fingerprint,
            "weights": ckpt.weights_digest(model),
            "layers": [l.name for l in sliced],
            "config": cfg.key(),
            "positions": positions,
            "world": [rank, world],
        }
    if resume is not None:
        p.resumed_from, blob = resume_blob(resume, reducer, rank, world, p.synced, p.expect)
        p.state.load_state_dict(blob)
        p.skip, p.want_digest = p.state.batches, blob["digest"]
        p.timings.update(blob.get("timings", {}))
    return p


def _consume(p: _Pass, checkpoint, checkpoint_every: int) -> None:
    cfg, run = p.cfg, p.state
    grouped = cfg.category_order == "grouped" and cfg.hsic
    cpath = ckpt.rank_path(checkpoint, p.rank, p.world) if checkpoint is not None else None
    saved = False

    def save():
        ckpt.save(
            cpath, {**p.expect, **run.state_dict(), "timings": p.timings}, keep_previous=p.synced
        )

    digest = ""
    i = -1
    for i, batch in enumerate(p.batches):
        x, y = batch if i < p.read else split_batch(batch, cfg.num_classes, i)
        if p.expect is not None:
            digest = ckpt.batch_digest(digest, x, y)
        if i < p.skip:
            if i == p.skip - 1 and digest != p.want_digest:
                raise ValueError(
                    f"cannot resume from {p.resumed_from}: the loader yields different data or "
                    f"a different order than the run that wrote it (digest of the first "
                    f"{p.skip} batches differs). Use the same dataset, sampler seed and batch "
                    f"size."
                )
            continue
        if x.shape[0]:
            x, y = x.to(p.device), y.to(p.device)
            if grouped:
                run.check_sorted(y, i)
                if not p.synced:
                    run.finish_categories(int(y[0]))
            t0 = time.perf_counter()
            t_dl = forward_pass(p.model, p.sliced, run.states, x, y, cfg)  # DeepLIFT included
            if grouped:
                run.check_open(cfg.max_memory_gb, p.plan)
            p.timings["forward"] += time.perf_counter() - t0 - t_dl
            p.timings["deeplift"] += t_dl
        run.batches = i + 1
        run.digest = digest
        if p.synced:
            run.sync(done=False)
        if cpath is not None and (run.rounds if p.synced else run.batches) % checkpoint_every == 0:
            save()
            saved = True
    if i < p.skip - 1:
        raise ValueError(
            f"cannot resume from {p.resumed_from}: it has consumed {p.skip} batches "
            f"but the loader yields only {i + 1}. Use the same data and batch size."
        )
    while p.synced and not run.sync(done=True):  # keep step with ranks that have more data
        if cpath is not None and run.rounds % checkpoint_every == 0:
            save()
            saved = True
    if cpath is not None and not saved:
        steps = run.rounds if p.synced else run.batches
        logger.warning(
            "checkpoint_every=%d exceeds the %d batches this run saw: no checkpoint "
            "was written to %s. Use checkpoint_every <= %d to have one.",
            checkpoint_every,
            steps,
            cpath,
            max(steps, 1),
        )


def _finish(p: _Pass, start: float) -> Profile:
    t0 = time.perf_counter()
    p.state.finish()
    p.timings["hsic_finalize"] = time.perf_counter() - t0
    p.timings["total"] = time.perf_counter() - start
    tensors, warnings, routes = collect(p.sliced, p.state.states, p.cfg.hsic)
    return Profile(
        layers=[l.name for l in p.sliced],
        num_neurons={l.name: l.num_neurons for l in p.sliced},
        num_classes=p.cfg.num_classes,
        metrics=p.cfg.metrics,
        fingerprint=p.fingerprint,
        input_shape=p.input_shape,
        tensors=tensors,
        hsic_routes=routes,
        warnings=warnings,
        timings=p.timings,
    )


def profile(
    model: nn.Module,
    loader: Iterable,
    num_classes: int,
    layers: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    *,
    config: ProfileConfig | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: str | os.PathLike | None = None,
    distributed: bool | None = None,
    progress: bool = True,
    **options,
) -> Profile:
    """Profile ``model`` on ``loader`` (batches of ``(inputs, labels)``) in one streaming pass.

    Args:
        model: any ``nn.Module`` returning class logits ``(batch, num_classes)``.
        loader: iterable of ``(inputs, labels)``; labels are class indices in
            ``[0, num_classes)`` and define the categories.
        layers: names of the ``Linear``/``Conv2d`` layers to slice; default all but the head.
        metrics: contribution metrics to compute, from ``ALL_METRICS`` (default ``METRICS``).
        device: where to run; defaults to the model's device. If it differs, a copy of the
            model is moved there and the caller's model is left where it is.
        config: a :class:`ProfileConfig`; ``**options`` (its field names: ``hsic``,
            ``hsic_route``, ``cka_batch``, ``max_feature_dim``, ``max_memory_gb``,
            ``category_order``, ``keep_hsic``, ``autocast``, ``backend``) override its fields.
        checkpoint: write the state here every ``checkpoint_every`` batches (atomically; a
            failed write warns and keeps the previous file). With several ranks each writes
            ``<checkpoint>.rank<r>-of-<w>``. A run shorter than ``checkpoint_every`` batches
            writes none and warns.
        resume: continue from a checkpoint written by an interrupted run with the same model,
            data order and arguments; the result equals an uninterrupted run.
        distributed: combine the statistics of all ranks of ``torch.distributed`` (each rank
            profiles its own shard, e.g. with a ``DistributedSampler``); None: when it is
            initialised with more than one rank. Every rank gets the same ``Profile``.
        progress: show a progress bar (rank 0 only).

    The model's parameters, buffers, gradients and train/eval modes are left exactly as they
    were (profiling runs in eval mode). A ``torch.compile`` or (Distributed)DataParallel wrapper
    is seen through: the module inside is profiled, eagerly (same result as the plain model).
    Another thread that profiles or masks the same model meanwhile gets a ``RuntimeError``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)
    if metrics is not None:
        options["metrics"] = metrics
    cfg = PassConfig.bind(ProfileConfig.resolve(config, **options), num_classes)
    if (
        isinstance(checkpoint_every, bool)
        or not isinstance(checkpoint_every, int)
        or checkpoint_every < 1
    ):
        raise ValueError(
            f"checkpoint_every must be a positive int (batches), got {checkpoint_every!r}"
        )
    start = time.perf_counter()
    reducer = active_reducer(distributed)
    work_model, device = _work_model(model, device)
    bar = progress_bar(
        loader, progress and (reducer is None or reducer.rank == 0), "neuslice.profile"
    )
    try:
        with (
            exclusive(model, "neuslice.profile"),
            no_tf32(),
            module_modes(work_model, train=False),
            scratch_space(),
        ):
            p = _plan(
                model, work_model, device, iter(bar), layers, cfg, reducer, checkpoint, resume
            )
            _consume(p, checkpoint, checkpoint_every)
            return _finish(p, start)
    finally:
        if hasattr(bar, "close"):
            bar.close()


def estimate_profile_memory(
    model: nn.Module,
    example_inputs: torch.Tensor,
    num_classes: int,
    layers: Sequence[str] | None = None,
    *,
    batch_size: int = 1,
    config: ProfileConfig | None = None,
    **options,
):
    """The memory estimate ``profile`` would make (``neuslice.runtime.memory.MemoryEstimate``)
    for ``model`` on inputs shaped like ``example_inputs`` and batches of ``batch_size``, without
    profiling; ``config`` and ``**options`` mean what they mean for ``profile``."""
    cfg = PassConfig.bind(ProfileConfig.resolve(config, **options), num_classes)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    model = unwrap_model(model)
    sliced = find_layers(model, layers)
    if (
        not torch.is_tensor(example_inputs)
        or example_inputs.dim() < 1
        or example_inputs.shape[0] < 1
    ):
        raise ValueError("example_inputs must be a tensor holding a batch of at least one input")
    with exclusive(model, "neuslice.estimate_profile_memory"), module_modes(model, train=False):
        positions, _ = probe_positions(model, sliced, example_inputs, cfg.autocast)
        in_flight = (
            probe_batch_bytes(model, sliced, example_inputs, cfg)
            * batch_size
            // example_inputs.shape[0]
        )
    return plan_memory(
        sliced, positions, cfg, batch_size, model_bytes=model_bytes(model), batch_bytes=in_flight
    )
