"""One streaming pass over the data that collects everything slicing needs.

For every sliced layer and every category: the per-sample neuron values' mean and variance (the
Avg, Var and Ens metrics), the Taylor and DeepLIFT contributions, and the neuron-HSIC matrix M of
the layer (``neuslice.cka``), from which the CKA of any neuron subset follows. Memory does not
grow with the number of samples.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import cka
from ._hooks import hooks_at, module_modes
from ._progress import progress as progress_bar
from ._io import atomic_torch_save
from .deeplift import rescale_rule
from .layers import SlicedLayer, find_layers, model_fingerprint
from .stats import ACC, CovarianceAccumulator, MinibatchHSICAccumulator, MomentAccumulator

logger = logging.getLogger(__name__)

__all__ = ["profile", "Profile", "METRICS", "ALL_METRICS"]

METRICS = ("avg", "var", "ens", "taylor", "deeplift")
ALL_METRICS = METRICS + ("taylor_act",)
_FORMAT = "neuslice.profile"
_VERSION = 1


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(ALL_METRICS)}.")
    return metrics


@dataclass
class Profile:
    """Per-layer, per-category statistics of one model on one data set.

    ``tensors`` holds, for each layer ``L``: ``L.count`` (C,), ``L.mean`` / ``L.m2`` (C, d)
    moments of the per-sample neuron value, ``L.taylor`` / ``L.taylor_batches`` and their
    whole-data versions ``L.taylor_all`` / ``L.taylor_all_batches``, ``L.taylor_act``,
    ``L.deeplift`` (sums over samples), and ``L.hsic`` (C, d, d) with ``L.hsic_weight`` (C,).
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
        _check_metrics([metric])
        self._check_category(category)
        if metric not in self.metrics and not (metric == "ens" and {"avg", "var"} <= set(self.metrics)):
            raise ValueError(
                f"metric {metric!r} was not profiled (profiled: {list(self.metrics)}); "
                f"profile again with metrics including {metric!r}.")
        count, mean, m2 = self._t(layer, "count"), self._t(layer, "mean"), self._t(layer, "m2")
        if category is None:
            n = count.sum()
            total_mean = (mean * count.unsqueeze(1)).sum(0) / n.clamp(min=1)
            dev = mean - total_mean
            total_m2 = m2.sum(0) + (dev * dev * count.unsqueeze(1)).sum(0)
            n_, mean_, m2_ = n, total_mean, total_m2
        else:
            n_, mean_, m2_ = count[category], mean[category], m2[category]
        if metric == "avg":
            return mean_
        if metric == "var":
            return m2_ / (n_ - 1).clamp(min=1)
        if metric == "ens":
            return _minmax(self.scores(layer, "avg", category)) + _minmax(
                self.scores(layer, "var", category))
        if metric == "taylor":
            if category is None:
                s, b = self._t(layer, "taylor_all"), self._t(layer, "taylor_all_batches")
            else:
                s, b = self._t(layer, "taylor")[category], self._t(layer, "taylor_batches")[category]
            return s / b.clamp(min=1)
        sums = self._t(layer, metric)  # deeplift, taylor_act: per-sample means
        if category is None:
            return sums.sum(0) / n_.clamp(min=1)
        return sums[category] / n_.clamp(min=1)

    def hsic(self, layer: str, category: int) -> torch.Tensor | None:
        """Neuron-HSIC matrix of ``layer`` on ``category``, or None if it had too few samples."""
        self._check_category(category)
        if float(self._t(layer, "hsic_weight")[category]) <= 0:
            return None
        return self._t(layer, "hsic")[category]

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
                "warnings": self.warnings, "timings": self.timings}
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
        if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
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
            expect = {"count": (c,), "mean": (c, d), "m2": (c, d), "hsic": (c, d, d)}
            for key, shape in expect.items():
                t = tensors.get(f"{layer}.{key}")
                if t is None or tuple(t.shape) != shape:
                    raise ValueError(f"{path} is corrupt: tensor {layer}.{key} is missing or has "
                                     f"the wrong shape.")
        return prof


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    span = hi - lo
    return torch.zeros_like(x) if span <= 0 else (x - lo) / span


# ---- the profiling pass ------------------------------------------------------------------

class _LayerState:
    """Accumulators of one layer."""

    def __init__(self, layer: SlicedLayer, num_classes: int, metrics, device):
        self.layer = layer
        d = layer.num_neurons
        self.moments = MomentAccumulator(num_classes, d, device)
        self.taylor = torch.zeros(num_classes, d, dtype=ACC, device=device)
        self.taylor_batches = torch.zeros(num_classes, dtype=ACC, device=device)
        self.taylor_all = torch.zeros(d, dtype=ACC, device=device)
        self.taylor_all_batches = torch.zeros((), dtype=ACC, device=device)
        self.taylor_act = torch.zeros(num_classes, d, dtype=ACC, device=device)
        self.deeplift = torch.zeros(num_classes, d, dtype=ACC, device=device)
        self.hsic_acc = None
        self.route = None

    def init_hsic(self, positions: int, cfg: "_Config", dtype, device) -> None:
        d = self.layer.num_neurons
        route = cfg.hsic_route
        if route == "auto":
            p = d * positions
            b = cfg.cka_batch
            feature_flops, sample_flops = p * p, d * b * positions + d * d * b
            route = "feature" if (p <= cfg.max_feature_dim and feature_flops <= 4 * sample_flops) \
                else "minibatch"
        self.route = route
        if route == "feature":
            need = cfg.num_classes * (d * positions) ** 2 * 8
            if need > cfg.max_memory_gb * 2**30:
                raise ValueError(
                    f"layer {self.layer.name!r}: the feature-space HSIC route needs "
                    f"{need / 2**30:.1f} GiB ({cfg.num_classes} categories x "
                    f"({d} neurons x {positions} positions)^2 float64), over max_memory_gb="
                    f"{cfg.max_memory_gb}. Use hsic_route='minibatch' or 'auto', or raise "
                    f"max_memory_gb.")
            compute = ACC if dtype == torch.float64 else torch.float32
            self.hsic_acc = CovarianceAccumulator(cfg.num_classes, d * positions, device, compute)
        else:
            fn = lambda a: cka.neuron_hsic(a, "unbiased", backend=cfg.backend)  # noqa: E731
            self.hsic_acc = MinibatchHSICAccumulator(cfg.num_classes, d, cfg.cka_batch, fn, device)

    def hsic_result(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.layer.num_neurons
        if self.route == "feature":
            acc = self.hsic_acc
            acc.finalize()
            n = acc.count.to(ACC)
            cov = acc.comoment / (n - 1).clamp(min=1).view(-1, 1, 1)
            c = cov.shape[0]
            s = cov.shape[1] // d
            m = cov.view(c, d, s, d, s).square().sum(dim=(2, 4))
            weight = torch.where(acc.count >= 2, n, torch.zeros_like(n))
            return m, weight
        self.hsic_acc.finalize()
        return self.hsic_acc.result()


@dataclass
class _Config:
    num_classes: int
    metrics: tuple[str, ...]
    hsic: bool
    hsic_route: str
    cka_batch: int
    max_feature_dim: int
    max_memory_gb: float
    backend: str | None


def _split_batch(batch, num_classes: int, index: int):
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(
            f"the loader must yield (inputs, labels) pairs; batch {index} is "
            f"{type(batch).__name__}. Wrap your data in a TensorDataset(inputs, labels).")
    x, y = batch[0], batch[1]
    if not torch.is_tensor(x) or not torch.is_tensor(y):
        raise TypeError(f"batch {index}: inputs and labels must be tensors, got "
                        f"{type(x).__name__} and {type(y).__name__}.")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1 or \
            y.shape[0] != x.shape[0]:
        raise ValueError(
            f"batch {index}: labels must be a 1-D integer tensor with one class index per input "
            f"(got dtype {y.dtype}, shape {tuple(y.shape)} for {x.shape[0]} inputs).")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"batch {index}: labels must lie in [0, {num_classes}) (num_classes={num_classes}); "
            f"found values in [{int(y.min())}, {int(y.max())}]. Pass the right num_classes or "
            f"remap the labels.")
    return x, y.long()


def _check_logits(logits: torch.Tensor, num_classes: int, metric: str) -> None:
    if logits.dim() != 2 or logits.shape[1] < num_classes:
        raise ValueError(
            f"{metric} needs classification logits of shape (batch, num_classes={num_classes}); "
            f"the model returned shape {tuple(logits.shape)}.")


def _check_finite(layer: SlicedLayer, values: torch.Tensor, what: str) -> None:
    if not torch.isfinite(values).all():
        raise ValueError(
            f"layer {layer.name!r} produced NaN/Inf {what}; check the model's weights and the "
            f"inputs (normalisation, overflow in half precision).")


def _forward_pass(model, layers, states, x, y, cfg: _Config) -> None:
    """Plain forward (and backward for Taylor): moments, HSIC and Taylor statistics."""
    want_grad = "taylor" in cfg.metrics or "taylor_act" in cfg.metrics
    kept: dict[str, dict[str, torch.Tensor]] = {l.name: {} for l in layers}
    points = []

    def keep(layer, key):
        def cb(out):
            kept[layer.name][key] = out
            return out.clone()  # the model gets a copy; ours is never modified in place
        return cb

    for l in layers:
        if want_grad:
            points.append((l.module, None, keep(l, "z")))
            if l.norm_module is not None:
                points.append((l.norm_module, None, keep(l, "u")))
        points.append((l.hook_module, l.call_index, keep(l, "h")))
    with torch.set_grad_enabled(want_grad), hooks_at(model, points):
        if want_grad and x.is_floating_point():
            x = x.detach().requires_grad_(True)
        logits = model(x)
    for l in layers:
        st = states[l.name]
        h = kept[l.name].get("h")
        if h is None:
            raise RuntimeError(f"layer {l.name!r} was not executed by the model's forward pass.")
        a = l.neuron_view(l.apply_post(h.detach().clone() if l.post_ops else h.detach()))
        _check_finite(l, a, "outputs")
        st.moments.update(a.mean(dim=2), y)
        if cfg.hsic:
            if st.hsic_acc is None:
                st.init_hsic(a.shape[2], cfg, a.dtype, a.device)
            if st.route == "feature":
                st.hsic_acc.update(a.reshape(a.shape[0], -1), y)
            else:
                st.hsic_acc.update(a.to(torch.float32 if a.dtype != ACC else ACC), y)
    if not want_grad:
        return
    _check_logits(logits, cfg.num_classes, "Taylor")
    loss = F.cross_entropy(logits, y, reduction="sum")
    targets, owners = [], []
    for l in layers:
        for key, t in kept[l.name].items():
            targets.append(t)
            owners.append((l, key))
    grads = torch.autograd.grad(loss, targets, allow_unused=True)
    per = {}
    for (l, key), t, g in zip(owners, targets, grads):
        g = torch.zeros_like(t) if g is None else g
        per[(l.name, key)] = (l.neuron_view(t.detach()) * l.neuron_view(g)).sum(2).to(ACC)
    c = cfg.num_classes
    n_b = torch.bincount(y, minlength=c).to(ACC)
    present = n_b > 0
    for l in layers:
        st = states[l.name]
        if "taylor" in cfg.metrics:
            t = per[(l.name, "z")] + per.get((l.name, "u"), 0)
            sums = torch.zeros(c, t.shape[1], dtype=ACC, device=t.device).index_add_(0, y, t)
            st.taylor += torch.where(present.unsqueeze(1),
                                     (sums / n_b.clamp(min=1).unsqueeze(1)).square(), 0)
            st.taylor_batches += present.to(ACC)
            st.taylor_all += (t.sum(0) / t.shape[0]).square()
            st.taylor_all_batches += 1
        if "taylor_act" in cfg.metrics:
            st.taylor_act.index_add_(0, y, per[(l.name, "h")].abs())


def _deeplift_pass(model, layers, states, x, y, num_classes: int) -> None:
    """Forward on [inputs; zero baselines] with the rescale rule; one backward for all layers."""
    kept: dict[str, torch.Tensor] = {}

    def keep(layer):
        def cb(out):
            kept[layer.name] = out
            return out.clone()
        return cb

    points = [(l.hook_module, l.call_index, keep(l)) for l in layers]
    both = torch.cat([x, torch.zeros_like(x)]).detach()
    if both.is_floating_point():
        both.requires_grad_(True)
    with torch.enable_grad(), rescale_rule(model), hooks_at(model, points):
        logits = model(both)
    _check_logits(logits, num_classes, "DeepLIFT")
    half = x.shape[0]
    target = logits[:half].gather(1, y.view(-1, 1)).sum()
    hs = [kept[l.name] for l in layers]
    grads = torch.autograd.grad(target, hs, allow_unused=True)
    for l, h, g in zip(layers, hs, grads):
        g = torch.zeros_like(h) if g is None else g
        h = l.neuron_view(h.detach())
        contrib = ((h[:half] - h[half:]) * l.neuron_view(g)[:half]).sum(2).to(ACC)
        _check_finite(l, contrib, "DeepLIFT contributions")
        states[l.name].deeplift.index_add_(0, y, contrib)


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
        hsic: also accumulate the neuron-HSIC matrices that semantic slicing needs.
        hsic_route: ``"feature"`` (exact, biased HSIC over each category's whole data; memory
            ``(d·s)²`` per category, refused above ``max_memory_gb``), ``"minibatch"`` (unbiased HSIC averaged over category
            minibatches of ``cka_batch`` samples; memory ``cka_batch·d·s``) or ``"auto"``.
        backend: backend of the HSIC op (``neuslice.ops``): None/"auto", "cuda", "triton",
            "cpp" or "torch"; the ``NEUSLICE_BACKEND`` environment variable also sets it.
        progress: show a progress bar.

    The model's parameters, buffers, gradients and train/eval modes are left exactly as they
    were (profiling runs in eval mode).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    metrics = _check_metrics(metrics)
    if "ens" in metrics:
        metrics = tuple(dict.fromkeys(metrics + ("avg", "var")))
    if hsic_route not in ("auto", "feature", "minibatch"):
        raise ValueError(f"hsic_route must be 'auto', 'feature' or 'minibatch', got {hsic_route!r}")
    if not isinstance(cka_batch, int) or cka_batch < 4:
        raise ValueError(f"cka_batch must be an int >= 4 (the unbiased HSIC needs 4 samples), "
                         f"got {cka_batch!r}")
    cfg = _Config(num_classes, metrics, hsic, hsic_route, cka_batch, max_feature_dim,
                  max_memory_gb, backend)
    fingerprint = model_fingerprint(model)
    try:
        model_device = next(model.parameters()).device
    except StopIteration:
        model_device = torch.device("cpu")
    device = torch.device(device) if device is not None else model_device
    work_model = model if device == model_device else copy.deepcopy(model).to(device)
    sliced = find_layers(work_model, layers)
    states = {l.name: _LayerState(l, num_classes, metrics, device) for l in sliced}
    timings = {"forward": 0.0, "deeplift": 0.0}
    input_shape = None
    bar = progress_bar(loader, progress, "neuslice.profile")
    start = time.perf_counter()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with module_modes(work_model, train=False):
            for i, batch in enumerate(bar):
                x, y = _split_batch(batch, num_classes, i)
                if x.shape[0] == 0:
                    continue
                x, y = x.to(device), y.to(device)
                if input_shape is None:
                    input_shape = list(x.shape[1:])
                t0 = time.perf_counter()
                _forward_pass(work_model, sliced, states, x, y, cfg)
                t1 = time.perf_counter()
                if "deeplift" in metrics:
                    _deeplift_pass(work_model, sliced, states, x, y, num_classes)
                timings["forward"] += t1 - t0
                timings["deeplift"] += time.perf_counter() - t1
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        if hasattr(bar, "close"):
            bar.close()
    if input_shape is None:
        raise ValueError("the loader yielded no samples; profiling needs data.")
    tensors: dict[str, torch.Tensor] = {}
    warnings: list[str] = []
    routes = {}
    t0 = time.perf_counter()
    for l in sliced:
        st = states[l.name]
        pre = l.name + "."
        tensors[pre + "count"] = st.moments.count.cpu()
        tensors[pre + "mean"] = st.moments.mean.cpu()
        tensors[pre + "m2"] = st.moments.m2.cpu()
        for key in ("taylor", "taylor_batches", "taylor_all", "taylor_all_batches",
                    "taylor_act", "deeplift"):
            tensors[pre + key] = getattr(st, key).cpu()
        d = l.num_neurons
        if hsic:
            m, w = st.hsic_result()
            routes[l.name] = st.route
        else:
            m = torch.zeros(num_classes, d, d, dtype=ACC)
            w = torch.zeros(num_classes, dtype=ACC)
        tensors[pre + "hsic"], tensors[pre + "hsic_weight"] = m.cpu(), w.cpu()
        dead = (st.moments.m2 <= 0) & (st.moments.count.unsqueeze(1) > 1)
        if bool(dead.any()):
            per_cat = dead.sum(1).tolist()
            warnings.append(f"layer {l.name}: constant (dead) neurons per category: {per_cat}")
            logger.info(warnings[-1])
    timings["hsic_finalize"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
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
    return Profile(layers=[l.name for l in sliced],
                   num_neurons={l.name: l.num_neurons for l in sliced},
                   num_classes=num_classes, metrics=metrics, fingerprint=fingerprint,
                   input_shape=input_shape, tensors=tensors, hsic_routes=routes,
                   warnings=warnings, timings=timings)


