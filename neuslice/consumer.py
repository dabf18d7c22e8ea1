"""Consumer-R² slicing: a semantic criterion that does not starve convolutional layers.

The paper's criterion (:func:`neuslice.semantic_slice`) keeps, per layer and category, the
smallest top-scored prefix of neurons whose linear CKA with the whole layer reaches θ. On conv
layers that CKA saturates with a handful of channels (the flattened maps of a few channels
already reproduce the sample-similarity structure), so conv layers are cut far too deep.

This module measures what a neuron set *does downstream* instead. For layer ``l`` and category
``c`` the neurons are ranked by ``|score|`` on ``c`` (a silent neuron, score 0, comes last; a
neuron with a large negative DeepLIFT contribution counts as much as a positive one). The
prefix size is the smallest ``k`` for which the **consumer's pre-activation** -- the output of
the Linear/Conv layer(s) that read ``l`` -- computed with only the top-``k`` neurons of ``l``
kept explains at least θ of the variance of the unmasked pre-activation, both centred over the
category's samples::

    R²(k) = 1 - ‖(Z - Z̄) - (Z_k - Z̄_k)‖² / ‖Z - Z̄‖²

(the consumer's bias and the mean shift of the zeroed neurons drop out with the centring, and a
following BatchNorm re-centres anyway). Because the consumer is linear in its input,
``Z - Z_k`` is the sum of the dropped neurons' individual contributions, so the whole curve
``R²(0..d)`` comes from one pass over the neurons and the minimal prefix for *any* θ is a search
on it: :func:`consumer_r2_curves` computes the curves once, :meth:`ConsumerCurves.slice` slices
at any threshold for free (bisection of θ to a target compression rate costs nothing more).

How many neurons each category keeps (``prefix=``): by default (``"shared"``) every category
keeps the same number ``k_l`` of *its own* top-ranked neurons in layer ``l``, where ``k_l`` is
the mean over categories of their minimal prefix sizes -- the criterion sets each layer's size,
each category's ranking chooses the neurons, and the slice is the union over categories.
``prefix="own"`` keeps each category's own minimal prefix (the paper's per-category rule). With
its own prefixes, a category whose R² rises slowly takes many neurons and one whose R² rises
fast very few; at the same per-layer sizes that lost 1-14 points against category-wise slicing
(MLP, no-BatchNorm CNN), and the shared size removed the loss.

Why it needs the model and data (a profile is not enough): the criterion runs the consumer
layers' weights on the category's actual inputs. Only ``samples`` inputs per category (default
128) are used, one forward pass per category.

Measured (issue #12, MNIST-5k, five nets, 3 training seeds, matched compression 50..90 %, BN
statistics re-estimated under each mask; ``docs/REPRODUCTION.md``, "Does semantic slicing
win?"): the threshold reaches every rate from 50 to 90 % on every net tried; the shared-prefix
slice is at least as accurate as global and category-wise slicing (0.5-point slack, >= 4 of 5
targets, mean difference >= 0) on most net/metric pairs, where the paper's criterion met that
rule on two; the exceptions are listed there with their numbers.

Scope: a layer whose consumers are Linear layers (reading the layer's units directly, or its
channels flattened channel-major) or Conv2d layers (groups=1). A layer whose output reaches a
join (residual add, concatenation: ``SlicedLayer.coupled``) has no single consumer; its neurons
are all kept and a note says so (:meth:`Slice.compression_rate` does not count such neurons
either, so masking and restructuring stay consistent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._utils.checks import model_device
from .layers import find_layers, model_fingerprint
from .slicing import Slice, _make

try:  # package layout after the reorganisation
    from .profiling.profile import Profile
except ImportError:  # pragma: no cover - older layout
    from .profile import Profile

__all__ = [
    "consumer_r2_slice",
    "consumer_r2_curves",
    "ConsumerCurves",
    "magnitude_ranking",
    "PREFIXES",
]

PREFIXES = ("shared", "own")
"""How each category's prefix is sized: the layer's shared mean (default) or its own."""


def magnitude_ranking(scores: torch.Tensor) -> torch.Tensor:
    """Neurons by decreasing ``|score|`` (ties: lower index first; NaN last)."""
    mag = scores.detach().abs().to(torch.float64)
    mag = torch.where(torch.isnan(mag), torch.full_like(mag, -1.0), mag)
    return torch.argsort(mag, descending=True, stable=True)


@dataclass
class ConsumerCurves:
    """``R²(k)`` of every layer and category (``k = 0..d``) and the neuron order it refers to.

    ``r2[layer]`` is a ``(categories, d + 1)`` float64 tensor (NaN rows: category skipped);
    ``order[layer]`` the matching ``(categories, d)`` neuron orders; ``keep_all`` the layers
    whose neurons are all kept (no single consumer).
    """

    profile: Profile
    metric: str
    samples: int
    r2: dict[str, torch.Tensor]
    order: dict[str, torch.Tensor]
    keep_all: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def prefix_sizes(self, threshold: float) -> dict[str, torch.Tensor]:
        """Minimal prefix size per layer and category (``-1``: category skipped)."""
        threshold = _check_threshold(threshold)
        out = {}
        for layer, r2 in self.r2.items():
            ok = torch.isfinite(r2) & (r2 >= threshold - 1e-12)
            any_ok = ok.any(1)
            k = torch.where(
                any_ok, ok.float().argmax(1), torch.full_like(any_ok, -1, dtype=torch.long)
            )
            out[layer] = k
        return out

    def slice(self, threshold: float, prefix: str = "shared") -> Slice:
        """The consumer-R² slice at ``threshold`` (in (0, 1]; larger keeps more neurons).

        ``prefix="shared"`` (default): in each layer every category keeps the same number
        ``k`` of its own top-ranked neurons, ``k`` = the mean over categories of their minimal
        prefix sizes (rounded up); ``prefix="own"``: each category keeps its own minimal
        prefix. Either way the slice is the union over categories.
        """
        if prefix not in PREFIXES:
            raise ValueError(f"prefix must be one of {list(PREFIXES)}, got {prefix!r}")
        sizes = self.prefix_sizes(threshold)
        p = self.profile
        masks, cat = {}, {}
        for layer in p.layers:
            d = p.num_neurons[layer]
            rows = torch.zeros(p.num_classes, d, dtype=torch.bool)
            if layer in self.keep_all:
                rows[:] = True
            else:
                ks = sizes[layer]
                if prefix == "shared":
                    present = ks >= 0
                    mean = ks[present].double().mean().item() if bool(present.any()) else 0.0
                    shared = min(d, math.ceil(mean - 1e-9))
                    ks = torch.where(present, torch.full_like(ks, shared), ks)
                for c, k in enumerate(ks.tolist()):
                    if k > 0:
                        rows[c, self.order[layer][c, :k]] = True
            cat[layer], masks[layer] = rows, rows.any(0)
        return _make(
            p, "consumer_r2", self.metric, masks, cat, threshold=float(threshold), notes=self.notes
        )


def _check_threshold(threshold) -> float:
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or math.isnan(threshold)
        or not 0 < threshold <= 1
    ):
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    return float(threshold)


def _gather(loader: Iterable, categories: list[int], samples: int, num_classes: int):
    """Up to ``samples`` inputs of each category, from the first batches of ``loader``."""
    got: dict[int, list[torch.Tensor]] = {c: [] for c in categories}
    have = {c: 0 for c in categories}
    for i, batch in enumerate(loader):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(f"batch {i}: expected (inputs, labels), got {type(batch).__name__}")
        x, y = batch[0], batch[1]
        if not torch.is_tensor(x) or not torch.is_tensor(y):
            raise ValueError(f"batch {i}: inputs and labels must be tensors")
        y = y.reshape(-1).long().cpu()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(
                f"batch {i}: labels must be in [0, {num_classes}), got "
                f"[{int(y.min())}, {int(y.max())}]"
            )
        for c in categories:
            need = samples - have[c]
            if need > 0:
                idx = (y == c).nonzero().flatten()[:need]
                if idx.numel():
                    got[c].append(x[idx])
                    have[c] += int(idx.numel())
        if all(v >= samples for v in have.values()):
            break
    return {c: torch.cat(v) for c, v in got.items() if v}


def _neuron_inputs(m: nn.Module, x: torch.Tensor, d: int) -> torch.Tensor:
    """Consumer input as ``(n, d, ...)``: neuron i's part of what ``m`` reads."""
    if isinstance(m, nn.Linear):
        x = x.reshape(-1, m.in_features)
        return x.reshape(x.shape[0], d, m.in_features // d)
    return x  # conv: (n, d, H, W)


def _contributions(
    m: nn.Module,
    xs: torch.Tensor,
    idx: torch.Tensor,
    d: int,
    scale: torch.Tensor | None,
    centre: bool = True,
) -> torch.Tensor:
    """Contribution of each neuron in ``idx`` to ``m``'s output: ``(len(idx), n, -1)``, centred
    over the samples unless ``centre=False`` (inputs already centred elsewhere)."""
    w = m.weight.detach()
    if isinstance(m, nn.Linear):
        wi = w.reshape(w.shape[0], d, -1)[:, idx]  # (out, b, w)
        out = torch.einsum("nbw,obw->bno", xs[:, idx], wi)
    else:
        b = idx.numel()
        wi = w[:, idx].transpose(0, 1).reshape(b * w.shape[0], 1, *w.shape[2:])
        x, padding = xs[:, idx], m.padding
        if m.padding_mode != "zeros":  # reflect / replicate / circular: pad as the layer does
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
            padding = 0
        out = F.conv2d(x, wi, None, m.stride, padding, m.dilation, groups=b)
        out = out.reshape(out.shape[0], b, w.shape[0], -1).transpose(0, 1)  # (b, n, out, s)
    if scale is not None:
        out = out * scale.view(1, 1, -1, *([1] * (out.dim() - 3)))
    out = out.reshape(out.shape[0], out.shape[1], -1)
    return out - out.mean(1, keepdim=True) if centre else out


def _norm_scale(model: nn.Module, consumer: str) -> torch.Tensor | None:
    """Per-output-channel scale of the eval-mode BatchNorm right after ``consumer``, if any."""
    try:
        (cl,) = find_layers(model, [consumer])
    except ValueError:
        return None
    bn = cl.norm_module
    if bn is None or not getattr(bn, "track_running_stats", False) or bn.running_var is None:
        return None
    s = 1.0 / torch.sqrt(bn.running_var.detach() + bn.eps)
    if bn.affine:
        s = s * bn.weight.detach()
    return s


def _curve(parts, order: torch.Tensor, chunk: int, centre: bool = True) -> torch.Tensor:
    """R²(k), k = 0..d, of the consumers ``parts`` = [(module, inputs (n, d, ...), scale)]."""
    d = order.numel()
    err = torch.zeros(d + 1, dtype=torch.float64)
    total = 0.0
    for m, xs, scale in parts:
        acc = None
        # walk the neurons from the last-ranked one: acc = sum of dropped contributions
        rev = order.flip(0)
        for start in range(0, d, chunk):
            idx = rev[start : start + chunk].to(xs.device)
            con = _contributions(m, xs, idx, d, scale, centre)
            for j in range(con.shape[0]):
                acc = con[j].clone() if acc is None else acc + con[j]
                err[d - start - j - 1] += float(acc.double().pow(2).sum())
        total += float(acc.double().pow(2).sum()) if acc is not None else 0.0
    if not total > 0:
        return torch.full((d + 1,), float("nan"), dtype=torch.float64)
    r2 = 1.0 - err / total
    r2[d] = 1.0
    return r2


def consumer_r2_curves(
    model: nn.Module,
    profile: Profile,
    loader: Iterable,
    metric: str,
    *,
    samples: int = 128,
    after_norm: bool = False,
    centre: str = "category",
    chunk: int = 16,
    progress: bool = True,
) -> ConsumerCurves:
    """Compute the consumer-R² curves of every profiled layer and category (see module doc).

    Args:
        model: the profiled model (its fingerprint must match ``profile``); only read, never
            modified: parameters, buffers and every module's train/eval mode are left as they
            were (the forward passes run in eval mode under ``no_grad``).
        profile: its :class:`neuslice.Profile` (gives the layers, categories and scores).
        loader: batches of ``(inputs, labels)``; the first ``samples`` inputs of each category
            are used.
        metric: contribution metric used for the ranking (by ``|score|`` per category).
        samples: inputs per category (>= 2).
        after_norm: measure the consumer after its BatchNorm (each output channel weighted by
            the norm's eval-mode scale) instead of its raw pre-activation.
        centre: ``"category"`` centres the consumer output over the category's samples;
            ``"global"`` over all gathered samples (every category's), so the category's mean
            offset from the other categories -- the class signal -- must be explained too
            (one extra forward pass per category).
        chunk: neurons whose contributions are computed at once (memory vs speed).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(profile, Profile):
        raise TypeError(f"profile must be a neuslice.Profile, got {type(profile).__name__}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ValueError(f"samples must be an int >= 2, got {samples!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    if centre not in ("category", "global"):
        raise ValueError(f"centre must be 'category' or 'global', got {centre!r}")
    fp = model_fingerprint(model)
    if fp != profile.fingerprint:
        raise ValueError(
            f"the profile was made for a different model (fingerprint "
            f"{profile.fingerprint}, model has {fp}); profile this model first."
        )
    profile.scores(profile.layers[0], metric)  # unknown / unprofiled metric -> ValueError
    layers = find_layers(model, profile.layers)
    modules = dict(model.named_modules())
    cats = [c for c, n in enumerate(profile.counts().tolist()) if n > 0]
    keep_all, notes = [], []
    consumers: dict[str, list[str]] = {}
    for l in layers:
        if l.coupled or not l.consumers:
            keep_all.append(l.name)
            notes.append(
                f"{l.name}: output reaches a join (or has no Linear/Conv consumer); "
                f"all neurons kept"
            )
        else:
            consumers[l.name] = [name for name, _ in l.consumers]
    needed = sorted({c for v in consumers.values() for c in v})
    data = _gather(loader, cats, samples, profile.num_classes)
    missing = [c for c in cats if c not in data or data[c].shape[0] < 2]
    if len(missing) == len(cats):
        raise ValueError(
            "the loader gave fewer than 2 samples of every profiled category; the "
            "consumer-R² criterion needs each category's inputs."
        )
    if missing:
        notes.append(f"categories {missing} skipped (fewer than 2 samples in the loader)")
    dev = model_device(model)
    scales = {c: _norm_scale(model, c) if after_norm else None for c in needed}
    r2 = {
        l: torch.full(
            (profile.num_classes, profile.num_neurons[l] + 1), float("nan"), dtype=torch.float64
        )
        for l in profile.layers
    }
    order = {
        l: torch.zeros(profile.num_classes, profile.num_neurons[l], dtype=torch.long)
        for l in profile.layers
    }
    modes = {m: m.training for m in model.modules()}
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def grab(name):
        def hook(_m, args):
            if name not in captured:
                captured[name] = args[0].detach()

        return hook

    try:
        model.eval()
        for name in needed:
            handles.append(modules[name].register_forward_pre_hook(grab(name)))
        todo = [c for c in cats if c not in missing]
        means: dict[str, torch.Tensor] = {}
        if centre == "global":  # first pass: mean consumer input over all gathered samples
            with torch.no_grad():
                count = 0
                for c in todo:
                    captured.clear()
                    model(data[c].to(dev))
                    for name in needed:
                        s = captured[name].double().sum(0)
                        means[name] = s if name not in means else means[name] + s
                    count += data[c].shape[0]
            means = {k: (v / count).to(captured[k].dtype) for k, v in means.items()}
        bar = tqdm(todo, desc=f"consumer R² ({metric})", unit="category", disable=not progress)
        with torch.no_grad():
            for c in bar:
                captured.clear()
                model(data[c].to(dev))
                for name in means:
                    captured[name] = captured[name] - means[name]
                for l in layers:
                    if l.name in keep_all:
                        continue
                    d = l.num_neurons
                    o = magnitude_ranking(profile.scores(l.name, metric, c).cpu())
                    order[l.name][c] = o
                    parts = []
                    for cname in consumers[l.name]:
                        if cname not in captured:
                            raise ValueError(
                                f"consumer {cname!r} of layer {l.name!r} did not "
                                f"run in the forward pass"
                            )
                        m = modules[cname]
                        parts.append((m, _neuron_inputs(m, captured[cname], d), scales[cname]))
                    r2[l.name][c] = _curve(parts, o, chunk, centre == "category")
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.train(t)
    flat = [
        l for l in profile.layers if l not in keep_all and not bool(torch.isfinite(r2[l]).any())
    ]
    if flat:
        notes.append(f"layers {flat}: consumer input constant on every category; nothing kept")
    return ConsumerCurves(
        profile=profile,
        metric=metric,
        samples=samples,
        r2=r2,
        order=order,
        keep_all=keep_all,
        notes=notes,
    )


def consumer_r2_slice(
    model: nn.Module,
    profile: Profile,
    loader: Iterable,
    metric: str,
    threshold: float,
    *,
    samples: int = 128,
    after_norm: bool = False,
    centre: str = "category",
    curves: ConsumerCurves | None = None,
    progress: bool = True,
    prefix: str = "shared",
) -> Slice:
    """Semantic slice by the consumer-R² criterion (module doc): per layer and category, the
    smallest ``|score|``-ranked prefix whose kept neurons explain ≥ ``threshold`` of the
    consumer's centred pre-activation variance on that category; the union over categories.

    Pass ``curves`` (from :func:`consumer_r2_curves`) to slice again at another threshold
    without running the model. The model is never modified (see :func:`consumer_r2_curves`).
    """
    threshold = _check_threshold(threshold)
    if curves is None:
        curves = consumer_r2_curves(
            model,
            profile,
            loader,
            metric,
            samples=samples,
            after_norm=after_norm,
            centre=centre,
            progress=progress,
        )
    elif not isinstance(curves, ConsumerCurves):
        raise TypeError(f"curves must be a ConsumerCurves, got {type(curves).__name__}")
    elif curves.metric != metric or curves.profile is not profile:
        raise ValueError("curves were computed for another profile or metric")
    return curves.slice(threshold, prefix)
