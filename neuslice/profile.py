"""One streaming pass over the data that collects everything slicing needs.

For every sliced layer and every category: the per-sample neuron values' mean and variance (the
Avg, Var and Ens metrics), the Taylor and DeepLIFT contributions, and the neuron-HSIC matrix M of
the layer (``neuslice.cka``), from which the CKA of any neuron subset follows -- or, to bound
memory at many categories, only the CKA prefix curves semantic slicing reads. Memory does not
grow with the number of samples and is estimated before anything is allocated
(``neuslice.memory``). The pass can be spread over the ranks of ``torch.distributed``
(``neuslice.distributed``), checkpointed and resumed (``neuslice.checkpoint``), and run under
autocast.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import checkpoint as ckpt
from . import cka
from ._hooks import module_modes
from ._io import atomic_torch_save
from ._layer_state import LayerState
from ._passes import deeplift_pass, forward_pass, probe_positions, split_batch, work_dtype
from ._progress import progress as progress_bar
from ._scores import ALL_METRICS, METRICS, check_metrics, ranking, scorable, score
from .distributed import active_reducer
from .layers import find_layers, model_fingerprint
from .memory import GiB, MemoryBudgetError, estimate
from .stats import ACC

logger = logging.getLogger(__name__)

__all__ = ["profile", "Profile", "METRICS", "ALL_METRICS", "estimate_profile_memory"]

_FORMAT = "neuslice.profile"
_VERSION = 2


@dataclass
class Profile:
    """Per-layer, per-category statistics of one model on one data set.

    ``tensors`` holds, for each layer ``L``: ``L.count`` (C,), ``L.mean`` / ``L.m2`` (C, d)
    moments of the per-sample neuron value, ``L.taylor`` / ``L.taylor_batches`` and their
    whole-data versions ``L.taylor_all`` / ``L.taylor_all_batches``, ``L.taylor_act``,
    ``L.deeplift`` (sums over samples), ``L.hsic_weight`` (C,) and either ``L.hsic`` (C, d, d)
    (``keep_hsic=True``) or ``L.curve.<metric>`` (C, d): the CKA of every top-k prefix of the
    neurons ranked by that metric (``keep_hsic=False``, the bounded-memory form).
    """

    layers: list[str]
    num_neurons: dict[str, int]
    num_classes: int
    metrics: tuple[str, ...]
    fingerprint: str
    input_shape: list[int]
    tensors: dict[str, torch.Tensor]
    hsic_routes: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    # ---- queries -------------------------------------------------------------------------
    def _t(self, layer: str, key: str) -> torch.Tensor:
        if layer not in self.num_neurons:
            raise ValueError(f"layer {layer!r} is not in this profile; it has {self.layers}.")
        return self.tensors[f"{layer}.{key}"]

    def counts(self, layer: str | None = None) -> torch.Tensor:
        """Samples seen per category."""
        return self._t(layer or self.layers[0], "count")

    def _check_category(self, category: int | None) -> None:
        if category is not None and not (0 <= int(category) < self.num_classes):
            raise ValueError(f"category must be in [0, {self.num_classes}), got {category}")

    def scores(self, layer: str, metric: str, category: int | None = None) -> torch.Tensor:
        """Contribution score of every neuron of ``layer`` on category ``category`` (or all data)."""
        check_metrics([metric])
        self._check_category(category)
        if metric not in scorable(self.metrics):
            raise ValueError(
                f"metric {metric!r} was not profiled (profiled: {list(self.metrics)}); "
                f"profile again with metrics including {metric!r}.")
        self._t(layer, "count")
        return score(lambda key: self._t(layer, key), metric, category)

    @property
    def keeps_hsic(self) -> bool:
        """True if the full neuron-HSIC matrices were kept (else only CKA prefix curves)."""
        return any(k.endswith(".hsic") for k in self.tensors)

    def hsic(self, layer: str, category: int) -> torch.Tensor | None:
        """Neuron-HSIC matrix of ``layer`` on ``category``, or None if it had too few samples."""
        self._check_category(category)
        if not self.keeps_hsic:
            raise ValueError("this profile kept only the CKA prefix curves (keep_hsic=False), not "
                             "the HSIC matrices; use Profile.curve, or profile again with "
                             "keep_hsic=True.")
        if float(self._t(layer, "hsic_weight")[category]) <= 0:
            return None
        return self._t(layer, "hsic")[category]

    def curve(self, layer: str, metric: str, category: int) -> torch.Tensor | None:
        """CKA with the whole layer of every top-``k`` prefix of the neurons ranked by ``metric``
        on ``category`` (``k = 1..d``), or None if the category had too few samples."""
        self._check_category(category)
        if not self.hsic_routes:
            raise ValueError("this profile has no neuron-HSIC statistics (it was made with "
                             "hsic=False); profile again with hsic=True.")
        order = ranking(self.scores(layer, metric, category))
        if self.keeps_hsic:
            m = self.hsic(layer, category)
            return None if m is None else cka.prefix_curve(m, order)
        if float(self._t(layer, "hsic_weight")[category]) <= 0:
            return None
        key = f"{layer}.curve.{metric}"
        if key not in self.tensors:
            raise ValueError(f"this profile stored no CKA curves for metric {metric!r} (it has "
                             f"{sorted(k.split('.curve.')[1] for k in self.tensors if '.curve.' in k and k.startswith(layer + '.'))}).")
        return self.tensors[key][category]

    def __repr__(self) -> str:
        n = int(self.counts().sum())
        return (f"Profile(layers={self.layers}, num_classes={self.num_classes}, samples={n}, "
                f"metrics={list(self.metrics)})")

    # ---- persistence ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the profile to one file (atomically: a crash never leaves a partial file)."""
        meta = {"format": _FORMAT, "version": _VERSION, "layers": self.layers,
                "num_neurons": self.num_neurons, "num_classes": self.num_classes,
                "metrics": list(self.metrics), "fingerprint": self.fingerprint,
                "input_shape": self.input_shape, "hsic_routes": self.hsic_routes,
                "warnings": self.warnings, "timings": self.timings,
                "keep_hsic": self.keeps_hsic}
        atomic_torch_save({"meta": json.dumps(meta), "tensors": self.tensors}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        """Read a profile written by :meth:`save`; a corrupt file raises ``ValueError``."""
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            meta = json.loads(blob["meta"])
            tensors = blob["tensors"]
            if not isinstance(meta, dict) or not isinstance(tensors, dict):
                raise TypeError("unexpected layout")
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ValueError(
                f"{path} is not a readable neuslice profile (corrupt or truncated file?): "
                f"{type(exc).__name__}: {exc}. Re-run neuslice.profile to recreate it.") from exc
        if meta.get("format") != _FORMAT or meta.get("version") not in (1, _VERSION):
            raise ValueError(f"{path} is not a neuslice profile (format {meta.get('format')!r}, "
                             f"version {meta.get('version')!r}).")
        try:
            prof = cls(layers=meta["layers"], num_neurons=meta["num_neurons"],
                       num_classes=meta["num_classes"], metrics=tuple(meta["metrics"]),
                       fingerprint=meta["fingerprint"], input_shape=meta["input_shape"],
                       tensors=tensors, hsic_routes=meta["hsic_routes"],
                       warnings=meta["warnings"], timings=meta["timings"])
            sizes = [(layer, int(prof.num_neurons[layer])) for layer in prof.layers]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path} is corrupt: its metadata is incomplete "
                             f"({type(exc).__name__}: {exc}).") from exc
        for layer, d in sizes:
            c = prof.num_classes
            expect = {"count": (c,), "mean": (c, d), "m2": (c, d)}
            if meta.get("keep_hsic", True):
                expect["hsic"] = (c, d, d)
            for key, shape in expect.items():
                t = tensors.get(f"{layer}.{key}")
                if t is None or tuple(t.shape) != shape:
                    raise ValueError(f"{path} is corrupt: tensor {layer}.{key} is missing or has "
                                     f"the wrong shape.")
        return prof



# ---- the profiling pass ------------------------------------------------------------------

@dataclass
class _Config:
    num_classes: int
    metrics: tuple[str, ...]
    hsic: bool
    hsic_route: str
    cka_batch: int
    max_feature_dim: int
    backend: str | None
    category_order: str
    keep_hsic: bool
    autocast: torch.dtype | None

    def key(self) -> dict:
        """What decides the result (checkpoints and ranks must agree on it)."""
        out = asdict(self)
        out["metrics"] = list(self.metrics)
        out["autocast"] = str(self.autocast)
        out.pop("backend")
        return out


def _check_args(num_classes, hsic_route, cka_batch, category_order, autocast, checkpoint_every,
                max_memory_gb):
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if hsic_route not in ("auto", "feature", "minibatch"):
        raise ValueError(f"hsic_route must be 'auto', 'feature' or 'minibatch', got {hsic_route!r}")
    if isinstance(cka_batch, bool) or not isinstance(cka_batch, int) or cka_batch < 4:
        raise ValueError(f"cka_batch must be an int >= 4 (the unbiased HSIC needs 4 samples), "
                         f"got {cka_batch!r}")
    if category_order not in ("any", "grouped"):
        raise ValueError(f"category_order must be 'any' or 'grouped' (data sorted by category, "
                         f"e.g. with neuslice.data.CategoryGroupedSampler), got {category_order!r}")
    if autocast not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or \
            checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int (batches), got "
                         f"{checkpoint_every!r}")
    if not (isinstance(max_memory_gb, (int, float)) and max_memory_gb > 0):
        raise ValueError(f"max_memory_gb must be a positive number, got {max_memory_gb!r}")


def _budget_error(est, budget_gb: float, cfg: _Config, why: str = "") -> MemoryBudgetError:
    hints = []
    if cfg.category_order == "any" and cfg.hsic and cfg.num_classes > 2:
        hints.append("category_order='grouped' with the data sorted by category "
                     "(neuslice.data.CategoryGroupedSampler) keeps HSIC accumulators only for the "
                     "categories in progress")
    if cfg.keep_hsic and cfg.hsic:
        hints.append("keep_hsic=False stores CKA prefix curves (d values per metric) instead of "
                     "d x d matrices")
    hints.append("a smaller cka_batch, hsic_route='minibatch', fewer layers, or a larger "
                 "max_memory_gb")
    return MemoryBudgetError(
        f"{why}neuslice.profile would need about {est.total / GiB:.2f} GiB, over "
        f"max_memory_gb={budget_gb}.\n{est.table()}\nTo fit: " + "; ".join(hints) + ".")


class _Run:
    """Progress of one profiling pass: states, finished categories, batches consumed."""

    def __init__(self, states: dict[str, LayerState], cfg: _Config, reducer):
        self.states, self.cfg, self.reducer = states, cfg, reducer
        self.frontier = 0  # grouped: categories < frontier are finished
        self.last_label = -1
        self.planned_open = 2
        self.rounds = 0  # synchronised steps (several ranks, grouped order)
        self.batches = 0
        self.digest = ""

    def _reduce(self, items) -> None:
        """All-reduce the ``(sums, moments, after)`` of ``LayerState.reduce_items``."""
        if self.reducer is not None:
            self.reducer.sum_([t for s, _, _ in items for t in s])
            self.reducer.moments_([m for _, ms, _ in items for m in ms])
            for _, _, after in items:
                if after is not None:
                    after()

    def check_sorted(self, y: torch.Tensor, index: int) -> None:
        """Grouped order: labels never decrease along the stream."""
        prev = self.last_label
        if y.numel() and (bool((y[1:] < y[:-1]).any()) or int(y[0]) < prev):
            raise ValueError(
                f"category_order='grouped' needs the data sorted by category, but the labels "
                f"decrease in batch {index} (previous label {prev}, batch labels start "
                f"{y[:8].tolist()}). Sort the data with neuslice.data.CategoryGroupedSampler or "
                f"use category_order='any'.")
        if y.numel():
            self.last_label = int(y[-1])

    def finish_categories(self, upto: int) -> None:
        """Grouped order: finish every category below ``upto``."""
        for c in range(self.frontier, upto):
            if not self._has_data(c):
                continue
            accs = {n: st.take(c) for n, st in self.states.items()}
            self._reduce([st.reduce_items(accs[n], slice(c, c + 1), whole=False)
                          for n, st in self.states.items()])
            for n, st in self.states.items():
                st.store(accs[n], [c])
        self.frontier = max(self.frontier, upto)

    def _has_data(self, c: int) -> bool:
        """Whether any rank saw category ``c`` (absent categories cost nothing to finish)."""
        st = next(iter(self.states.values()))
        seen = torch.tensor([float(st.moments.count[c] > 0)], dtype=ACC)
        if self.reducer is not None:
            self.reducer.sum_([seen], "checking which categories have data")
        return bool(seen > 0)

    def check_open(self, budget_gb: float, plan) -> None:
        """Grouped order: re-check the budget when a batch opens more categories than planned."""
        n_open = max(len(st.open) for st in self.states.values())
        if n_open > self.planned_open:
            self.planned_open = n_open
            est = plan(n_open)
            if est.total > budget_gb * GiB:
                raise _budget_error(est, budget_gb, self.cfg, f"{n_open} categories are open "
                                    f"at once (a batch spans that many categories); ")

    def sync(self, done: bool) -> bool:
        """Several ranks, grouped order: once per batch, every rank finishes the categories all
        ranks have passed, so the collectives (and checkpoints) happen in the same order on every
        rank. Returns True when every rank has consumed its data."""
        local = self.cfg.num_classes if done else max(self.last_label, 0)
        t = torch.tensor([-float(local), 0.0 if done else 1.0], dtype=ACC)
        self.reducer.max_(t)
        self.finish_categories(int(-t[0]))
        self.rounds += 1
        return float(t[1]) == 0.0

    def finish(self) -> None:
        c = self.cfg.num_classes
        if self.cfg.category_order == "grouped" or not self.cfg.hsic:
            if self.cfg.hsic:
                self.finish_categories(c)
            self._reduce([st.reduce_items(None, None if self.cfg.hsic else slice(0, c), True)
                          for st in self.states.values()])
            return
        for st in self.states.values():
            st.acc.finalize()
        self._reduce([st.reduce_items(st.acc, slice(0, c), True) for st in self.states.values()])
        for st in self.states.values():
            st.store(st.acc, list(range(c)))

    def state_dict(self) -> dict:
        return {"frontier": self.frontier, "last_label": self.last_label, "rounds": self.rounds,
                "batches": self.batches, "digest": self.digest,
                "states": {n: st.state_dict() for n, st in self.states.items()}}

    def load_state_dict(self, blob: dict) -> None:
        self.frontier, self.batches = int(blob["frontier"]), int(blob["batches"])
        self.last_label, self.rounds = int(blob["last_label"]), int(blob["rounds"])
        for n, st in self.states.items():
            st.load_state_dict(blob["states"][n])


def _resume_blob(resume, reducer, rank: int, world: int, synced: bool, expect: dict):
    """The checkpoint to resume from (path, contents), checked against this run."""
    rpath = ckpt.rank_path(resume, rank, world)
    if synced:  # every rank resumes from the same round
        have = ckpt.generations(rpath)
        common = set.intersection(*(set(h) for h in reducer.gather_objects(
            sorted(have), "agreeing on the checkpoint round to resume from")))
        if not common:
            raise ValueError(f"cannot resume from {rpath}: the ranks' checkpoints have no round "
                             f"in common; start without resume=.")
        rpath = have[max(common)]
    blob = ckpt.load(rpath)
    ckpt.check_compatible(blob, expect, rpath)
    return rpath, blob


def _collect(sliced, states, hsic: bool):
    """The Profile's tensors, its warnings and the HSIC routes."""
    tensors: dict[str, torch.Tensor] = {}
    warnings: list[str] = []
    for l in sliced:
        st = states[l.name]
        tensors.update({f"{l.name}.{k}": v for k, v in st.tensors().items()})
        dead = (st.moments.m2 <= 0) & (st.moments.count.unsqueeze(1) > 1)
        if bool(dead.any()):
            warnings.append(f"layer {l.name}: constant (dead) neurons per category: "
                            f"{dead.sum(1).tolist()}")
            logger.info(warnings[-1])
    routes = {l.name: states[l.name].route for l in sliced} if hsic else {}
    counts = states[sliced[0].name].moments.count.tolist()
    need = 2 if all(r == "feature" for r in routes.values()) else 4
    small = [k for k, n in enumerate(counts) if 0 < n < need]  # absent ones: no warning
    if hsic and small:
        warnings.append(f"categories {small} have fewer than {need} samples "
                        f"(counts {[counts[k] for k in small]}): no CKA for them; semantic "
                        f"slicing skips them.")
        logger.warning(warnings[-1])
    absent = [k for k, n in enumerate(counts) if n == 0]
    if absent:  # expected when profiling a subset of the classes (e.g. one task)
        warnings.append(f"categories {absent} have no samples in this data; they get no "
                        f"scores of their own and slicing skips them.")
        logger.info(warnings[-1])
    return tensors, warnings, routes


def _estimate(sliced, positions, cfg: _Config, batch_size: int, open_categories: int = 2):
    return estimate([(l.name, l.num_neurons, positions[l.name]) for l in sliced],
                    cfg.num_classes, hsic=cfg.hsic, hsic_route=cfg.hsic_route,
                    cka_batch=cfg.cka_batch, max_feature_dim=cfg.max_feature_dim,
                    category_order=cfg.category_order, keep_hsic=cfg.keep_hsic,
                    num_metrics=len(scorable(cfg.metrics)), batch_size=batch_size,
                    open_categories=open_categories)


def _layer_shapes(model, sliced, first, reducer, autocast):
    """Positions per layer and the neuron dtype, agreed by all ranks."""
    shapes = None
    if first is not None:
        x = first[0]
        positions, dtype = probe_positions(model, sliced, x, autocast)
        shapes = (positions, str(dtype), list(x.shape[1:]))
    if reducer is not None:
        known = [s for s in reducer.gather_objects(shapes, "exchanging layer shapes") if s]
        if known and any(s != known[0] for s in known):
            raise ValueError(f"ranks disagree on the layers' output shapes or input shape "
                             f"({known}); every rank must feed inputs of the same shape.")
        shapes = known[0] if known else None
    if shapes is None:
        raise ValueError("the loader yielded no samples; profiling needs data.")
    positions, dtype, input_shape = shapes
    return positions, getattr(torch, dtype.split(".")[-1]), input_shape


def _check_ranks_agree(reducer, what: dict) -> None:
    seen = reducer.gather_objects(what)
    for r, other in enumerate(seen):
        if other != seen[0]:
            diff = {k: (seen[0].get(k), other.get(k)) for k in what if seen[0].get(k) != other.get(k)}
            raise ValueError(f"rank {r} profiles with different settings than rank 0: "
                             f"{json.dumps(diff, default=str)}. Every rank must call "
                             f"neuslice.profile with the same model and arguments.")


def profile(
    model: nn.Module,
    loader: Iterable,
    num_classes: int,
    layers: Sequence[str] | None = None,
    metrics: Sequence[str] = METRICS,
    device: torch.device | str | None = None,
    *,
    hsic: bool = True,
    hsic_route: str = "auto",
    cka_batch: int = 128,
    max_feature_dim: int = 2048,
    max_memory_gb: float = 8.0,
    category_order: str = "any",
    keep_hsic: bool | None = None,
    autocast: torch.dtype | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: str | os.PathLike | None = None,
    distributed: bool | None = None,
    backend: str | None = None,
    progress: bool = True,
) -> Profile:
    """Profile ``model`` on ``loader`` (batches of ``(inputs, labels)``) in one streaming pass.

    Args:
        model: any ``nn.Module`` returning class logits ``(batch, num_classes)``.
        loader: iterable of ``(inputs, labels)``; labels are class indices in
            ``[0, num_classes)`` and define the categories.
        layers: names of the ``Linear``/``Conv2d`` layers to slice; default all but the head.
        metrics: contribution metrics to compute, from ``ALL_METRICS``.
        device: where to run; defaults to the model's device. If it differs, a copy of the
            model is moved there and the caller's model is left where it is.
        hsic: also accumulate the neuron-HSIC statistics that semantic slicing needs.
        hsic_route: ``"feature"`` (exact, biased HSIC over each category's whole data; memory
            ``(d·s)²`` per category), ``"minibatch"`` (unbiased HSIC averaged over category
            minibatches of ``cka_batch`` samples; memory ``cka_batch·d·s``) or ``"auto"``.
        max_memory_gb: budget for all accumulators; the estimate (``neuslice.memory``) is made
            from the first batch and a larger one is refused with a ``MemoryBudgetError``.
        category_order: ``"any"`` (default) or ``"grouped"``: the loader yields the data sorted
            by category (``neuslice.data.CategoryGroupedSampler``); each category is finished as
            soon as the data moves past it, so HSIC memory does not grow with the categories.
        keep_hsic: keep the ``d x d`` HSIC matrices (default with ``"any"``) or only the CKA
            prefix curves of every profiled metric (default with ``"grouped"``).
        autocast: ``torch.bfloat16`` / ``torch.float16`` runs the model under autocast; the
            statistics are still accumulated in float32/float64.
        checkpoint: write the state here every ``checkpoint_every`` batches (atomically; a
            failed write warns and keeps the previous file). With several ranks each writes
            ``<checkpoint>.rank<r>-of-<w>``.
        resume: continue from a checkpoint written by an interrupted run with the same model,
            data order and arguments; the result equals an uninterrupted run.
        distributed: combine the statistics of all ranks of ``torch.distributed`` (each rank
            profiles its own shard, e.g. with a ``DistributedSampler``); None: when it is
            initialised with more than one rank. Every rank gets the same ``Profile``.
        backend: backend of the HSIC op (``neuslice.ops``): None/"auto", "cuda", "triton",
            "cpp" or "torch"; the ``NEUSLICE_BACKEND`` environment variable also sets it.
        progress: show a progress bar (rank 0 only).

    The model's parameters, buffers, gradients and train/eval modes are left exactly as they
    were (profiling runs in eval mode).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_args(num_classes, hsic_route, cka_batch, category_order, autocast, checkpoint_every,
                max_memory_gb)
    metrics = check_metrics(metrics)
    if "ens" in metrics:
        metrics = tuple(dict.fromkeys(metrics + ("avg", "var")))
    keep_hsic = (category_order == "any") if keep_hsic is None else bool(keep_hsic)
    cfg = _Config(num_classes, metrics, bool(hsic), hsic_route, cka_batch, max_feature_dim,
                  backend, category_order, keep_hsic, autocast)
    reducer = active_reducer(distributed)
    rank, world = (reducer.rank, reducer.world) if reducer else (0, 1)
    fingerprint = model_fingerprint(model)
    try:
        model_device = next(model.parameters()).device
    except StopIteration:
        model_device = torch.device("cpu")
    device = torch.device(device) if device is not None else model_device
    work_model = model if device == model_device else copy.deepcopy(model).to(device)
    sliced = find_layers(work_model, layers)
    if reducer is not None:
        _check_ranks_agree(reducer, {"fingerprint": fingerprint, "layers": [l.name for l in sliced],
                                     "config": cfg.key(), "resume": resume is not None,
                                     "checkpoint": checkpoint is not None})
    timings = {"forward": 0.0, "deeplift": 0.0}
    bar = progress_bar(loader, progress and rank == 0, "neuslice.profile")
    start = time.perf_counter()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with module_modes(work_model, train=False):
            it = iter(bar)
            pulled = []
            for batch in it:  # find the first non-empty batch for the shapes
                pulled.append(split_batch(batch, num_classes, len(pulled)))
                if pulled[-1][0].shape[0]:
                    break
            first = next((b for b in pulled if b[0].shape[0]), None)
            if first is not None:
                first = (first[0].to(device), first[1])
            positions, feat_dtype, input_shape = _layer_shapes(work_model, sliced, first, reducer,
                                                               autocast)
            batch_size = max([b[0].shape[0] for b in pulled] + [1])

            def plan(open_categories=2):
                return _estimate(sliced, positions, cfg, batch_size, open_categories)
            est = plan()
            if est.total > max_memory_gb * GiB:
                raise _budget_error(est, max_memory_gb, cfg)
            logger.info("%s", est.table())
            feature_dtype = ACC if feat_dtype == ACC else torch.float32
            states = {l.name: LayerState(l, positions[l.name], cfg, device, feature_dtype)
                      for l in sliced}
            run = _Run(states, cfg, reducer)
            expect = None
            if checkpoint is not None or resume is not None:
                expect = {"fingerprint": fingerprint, "weights": ckpt.weights_digest(model),
                          "layers": [l.name for l in sliced], "config": cfg.key(),
                          "positions": positions, "world": [rank, world]}
            synced = reducer is not None and category_order == "grouped" and hsic
            skip, want_digest, rpath = 0, "", None
            if resume is not None:
                rpath, blob = _resume_blob(resume, reducer, rank, world, synced, expect)
                run.load_state_dict(blob)
                skip, want_digest = run.batches, blob["digest"]
                timings.update(blob.get("timings", {}))
            cpath = ckpt.rank_path(checkpoint, rank, world) if checkpoint is not None else None
            digest = ""
            i = -1
            for i, batch in enumerate(itertools.chain(pulled, it)):
                x, y = batch if i < len(pulled) else split_batch(batch, num_classes, i)
                if expect is not None:
                    digest = ckpt.batch_digest(digest, x, y)
                if i < skip:
                    if i == skip - 1 and digest != want_digest:
                        raise ValueError(
                            f"cannot resume from {rpath}: the loader yields different data or a "
                            f"different order than the run that wrote it (digest of the first "
                            f"{skip} batches differs). Use the same dataset, sampler seed and "
                            f"batch size.")
                    continue
                if x.shape[0]:
                    x, y = x.to(device), y.to(device)
                    if category_order == "grouped" and hsic:
                        run.check_sorted(y, i)
                        if not synced:
                            run.finish_categories(int(y[0]))
                    t0 = time.perf_counter()
                    forward_pass(work_model, sliced, states, x, y, cfg)
                    t1 = time.perf_counter()
                    if "deeplift" in metrics:
                        deeplift_pass(work_model, sliced, states, x, y, cfg)
                    if category_order == "grouped" and hsic:
                        run.check_open(max_memory_gb, plan)
                    timings["forward"] += t1 - t0
                    timings["deeplift"] += time.perf_counter() - t1
                run.batches = i + 1
                run.digest = digest
                if synced:
                    run.sync(done=False)
                if cpath is not None and (run.rounds if synced else run.batches) % \
                        checkpoint_every == 0:
                    ckpt.save(cpath, {**expect, **run.state_dict(), "timings": timings},
                              keep_previous=synced)
            if i < skip - 1:
                raise ValueError(f"cannot resume from {rpath}: it has consumed {skip} batches but "
                                 f"the loader yields only {i + 1}. Use the same data and batch size.")
            while synced and not run.sync(done=True):  # keep step with ranks that have more data
                if cpath is not None and run.rounds % checkpoint_every == 0:
                    ckpt.save(cpath, {**expect, **run.state_dict(), "timings": timings},
                              keep_previous=True)
            t0 = time.perf_counter()
            run.finish()
            timings["hsic_finalize"] = time.perf_counter() - t0
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        if hasattr(bar, "close"):
            bar.close()
    timings["total"] = time.perf_counter() - start
    tensors, warnings, routes = _collect(sliced, states, hsic)
    return Profile(layers=[l.name for l in sliced],
                   num_neurons={l.name: l.num_neurons for l in sliced},
                   num_classes=num_classes, metrics=metrics, fingerprint=fingerprint,
                   input_shape=input_shape, tensors=tensors, hsic_routes=routes,
                   warnings=warnings, timings=timings)


def estimate_profile_memory(model: nn.Module, example_inputs: torch.Tensor, num_classes: int,
                            layers: Sequence[str] | None = None, *, batch_size: int = 1,
                            metrics: Sequence[str] = METRICS, hsic: bool = True,
                            hsic_route: str = "auto", cka_batch: int = 128,
                            max_feature_dim: int = 2048, category_order: str = "any",
                            keep_hsic: bool | None = None, autocast: torch.dtype | None = None):
    """The memory estimate ``profile`` would make (``neuslice.memory.MemoryEstimate``) for
    ``model`` on inputs shaped like ``example_inputs`` and batches of ``batch_size``, without
    profiling; the keyword arguments mean what they mean for ``profile``."""
    metrics = check_metrics(metrics)
    keep_hsic = (category_order == "any") if keep_hsic is None else bool(keep_hsic)
    cfg = _Config(num_classes, metrics, bool(hsic), hsic_route, cka_batch, max_feature_dim,
                  None, category_order, keep_hsic, autocast)
    sliced = find_layers(model, layers)
    with module_modes(model, train=False):
        positions, _ = probe_positions(model, sliced, example_inputs, autocast)
    return _estimate(sliced, positions, cfg, batch_size)
