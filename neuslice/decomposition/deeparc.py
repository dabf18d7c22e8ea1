"""DeepArc-style layer-level modularisation (the baseline of Ren et al., ICSE 2023).

DeepArc measures how much each layer changes the representation of the previous one with
minibatch linear CKA (Nguyen, Raghu & Kornblith, 2021) between the outputs of *consecutive*
layers. Adjacent layers whose similarity reaches a threshold (``0.99`` by default) are merged
into one module; inside a module every layer after the first is *redundant* (it barely changes
the representation) and the first one is the module's *critical* layer.

Minibatch CKA: for every minibatch the unbiased HSIC estimates ``HSIC(K, L)``, ``HSIC(K, K)``
and ``HSIC(L, L)`` of the linear Grams of the two layers' flattened outputs are summed over the
loader, and ``CKA = sum HSIC(K, L) / sqrt(sum HSIC(K, K) * sum HSIC(L, L))`` (float64).

For the maintenance baselines :func:`freeze_except` restricts training to chosen layers:
DeepArc's re-adaptation retrains the critical layers of the modules, and its incremental variant
("DeepArc (train only redundant layers)") retrains only :attr:`DeepArcModules.redundant`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .._utils.hooks import hooks_at, module_modes
from .._utils.progress import progress as progress_bar
from ..cka import hsic
from ..layers import SlicedLayer, find_layers
from .._utils.checks import model_device
from .._utils.numerics import no_tf32

__all__ = [
    "DeepArcModules",
    "layer_similarities",
    "modularize",
    "deeparc",
    "freeze_except",
]

_MIN_BATCH = 4  # the unbiased HSIC estimator needs at least 4 samples


@dataclass
class DeepArcModules:
    """Result of :func:`modularize`.

    ``modules``: consecutive layer names merged into modules, in execution order.
    ``similarities``: the consecutive-layer CKA values used, keyed ``(earlier, later)``.
    """

    modules: list[list[str]]
    threshold: float
    similarities: dict[tuple[str, str], float] = field(default_factory=dict)

    @property
    def critical_layers(self) -> list[str]:
        """The first layer of each module."""
        return [m[0] for m in self.modules]

    @property
    def redundant(self) -> list[str]:
        """Every layer of a module except its first (in execution order)."""
        return [name for m in self.modules for name in m[1:]]

    @property
    def layers(self) -> list[str]:
        """All layers, in execution order."""
        return [name for m in self.modules for name in m]


# --------------------------------------------------------------------------- validation
def _check_threshold(threshold: Any) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(
            f"threshold must be a real number in (0, 1], got {threshold!r} "
            f"({type(threshold).__name__})"
        )
    t = float(threshold)
    if not (0.0 < t <= 1.0):  # also rejects nan
        raise ValueError(f"threshold must lie in (0, 1], got {threshold!r}")
    return t


def _check_names(layer_names: Any) -> list[str]:
    if isinstance(layer_names, str) or not isinstance(layer_names, Iterable):
        raise TypeError(
            f"layer_names must be a sequence of layer names, got {type(layer_names).__name__}"
        )
    names = list(layer_names)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"layer_names must hold strings, found {bad[0]!r}")
    if len(names) < 2:
        raise ValueError(
            f"DeepArc needs at least 2 layers to compare consecutive ones, got {names}"
        )
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"layer_names must not repeat names; duplicated: {dup}")
    return names


def _batch_inputs(batch: Any, index: int) -> torch.Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not torch.is_tensor(x):
        raise TypeError(
            f"the loader must yield input tensors or (inputs, labels, ...) tuples; batch {index} "
            f"gives {type(x).__name__}"
        )
    if x.dim() == 0:
        raise ValueError(f"batch {index}: inputs must have a batch dimension, got a 0-dim tensor")
    return x


# --------------------------------------------------------------------------- similarities
def _gram(layer: SlicedLayer, out: torch.Tensor) -> torch.Tensor:
    """float64 linear Gram of the (post-processed, per-sample flattened, centred) output."""
    a = layer.apply_post(out.detach())
    if a.device.type == "mps":  # no float64 there
        a = a.cpu()
    a = a.reshape(a.shape[0], -1).to(torch.float64)
    if not bool(torch.isfinite(a).all()):
        raise ValueError(f"layer {layer.name!r} produced non-finite outputs (nan/inf)")
    a = a - a.mean(dim=0, keepdim=True)  # HSIC_unbiased is shift-invariant; improves accuracy
    return a @ a.T


def layer_similarities(
    model: nn.Module,
    loader: Iterable,
    layers: Sequence[str] | None = None,
    progress: bool = False,
) -> dict[tuple[str, str], float]:
    """Minibatch linear CKA between the outputs of each pair of consecutive sliced layers.

    Args:
        model: the network; run in eval mode under ``torch.no_grad`` (its train/eval flags,
            parameters and buffers are left unchanged).
        loader: iterable of input tensors or ``(inputs, labels, ...)`` tuples. Minibatches with
            fewer than 4 samples (too few for the unbiased HSIC) are skipped with a warning.
        layers: layer names (see :func:`neuslice.layers.find_layers`; ``None``: every
            ``Linear``/``Conv2d`` but the classifier head), at least 2; they are taken in
            execution order. Outputs are read at each layer's hook point (after its
            BatchNorm/activation).
        progress: show a tqdm progress bar.

    Returns:
        ``{(layer_i, layer_{i+1}): cka}`` in execution order; ``nan`` where a layer's summed
        self-HSIC is not positive (e.g. a constant/dead layer).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sliced = find_layers(model, layers)
    if len(sliced) < 2:
        raise ValueError(
            f"DeepArc needs at least 2 layers to compare consecutive ones, got "
            f"{[l.name for l in sliced]}"
        )
    device = model_device(model)

    n = len(sliced)
    self_sum = torch.zeros(n, dtype=torch.float64)
    cross_sum = torch.zeros(n - 1, dtype=torch.float64)
    grams: list[torch.Tensor | None] = [None] * n

    def capture(i: int, layer: SlicedLayer):
        def cb(out: torch.Tensor) -> None:
            if grams[i] is not None:
                raise RuntimeError(
                    f"layer {layer.name!r}'s output was produced more than once in one forward "
                    f"pass; DeepArc needs one output per layer"
                )
            grams[i] = _gram(layer, out)

        return cb

    points = [(l.hook_module, l.call_index, capture(i, l)) for i, l in enumerate(sliced)]
    used = skipped = 0
    bar = progress_bar(loader, progress, "neuslice.deeparc")
    try:
        with no_tf32(), module_modes(model, train=False), torch.no_grad(), hooks_at(model, points):
            for b, batch in enumerate(bar):
                x = _batch_inputs(batch, b)
                if x.shape[0] < _MIN_BATCH:
                    skipped += x.shape[0]
                    continue
                grams[:] = [None] * n
                model(x.to(device))
                missing = [l.name for l, g in zip(sliced, grams) if g is None]
                if missing:
                    raise RuntimeError(
                        f"layer(s) {missing} produced no output during the forward pass"
                    )
                hs = [hsic(g, g, "unbiased").cpu() for g in grams]
                self_sum += torch.stack(hs)
                cross_sum += torch.stack(
                    [hsic(grams[i], grams[i + 1], "unbiased").cpu() for i in range(n - 1)]
                )
                used += 1
    finally:
        grams[:] = [None] * n
        if hasattr(bar, "close"):
            bar.close()
    if used == 0:
        raise ValueError(
            f"the loader yielded no minibatch with at least {_MIN_BATCH} samples; minibatch CKA "
            f"needs batches of >= {_MIN_BATCH} samples"
        )
    if skipped:
        warnings.warn(
            f"layer_similarities skipped {skipped} samples in minibatches smaller than "
            f"{_MIN_BATCH} (too few for the unbiased HSIC)",
            stacklevel=2,
        )
    result: dict[tuple[str, str], float] = {}
    for i in range(n - 1):
        xx, yy = float(self_sum[i]), float(self_sum[i + 1])
        ok = xx > 0 and yy > 0
        result[(sliced[i].name, sliced[i + 1].name)] = (
            float(cross_sum[i]) / math.sqrt(xx * yy) if ok else float("nan")
        )
    return result


# --------------------------------------------------------------------------- modules
def modularize(
    similarities: Mapping[tuple[str, str], float],
    layer_names: Sequence[str],
    threshold: float = 0.99,
) -> DeepArcModules:
    """Group consecutive layers into modules: merge layer ``i+1`` into layer ``i``'s module
    while ``similarities[(layer_i, layer_{i+1})] >= threshold`` (``nan`` never merges).

    ``layer_names`` is the execution order (at least 2 distinct names); every consecutive pair
    must have an entry in ``similarities``. ``threshold`` must lie in ``(0, 1]``.
    """
    threshold = _check_threshold(threshold)
    names = _check_names(layer_names)
    if not isinstance(similarities, Mapping):
        raise TypeError(
            f"similarities must be a mapping {{(layer, next_layer): cka}}, got "
            f"{type(similarities).__name__}"
        )
    used: dict[tuple[str, str], float] = {}
    modules: list[list[str]] = [[names[0]]]
    for a, b in zip(names, names[1:]):
        if (a, b) not in similarities:
            raise ValueError(
                f"similarities has no entry for consecutive layers ({a!r}, {b!r}); compute them "
                f"with layer_similarities(model, loader, layers) for the same layers"
            )
        raw = similarities[(a, b)]
        try:
            s = float(raw)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"similarity of ({a!r}, {b!r}) must be a number, got {raw!r}") from exc
        used[(a, b)] = s
        if s >= threshold:  # nan compares False: a dead layer starts its own module
            modules[-1].append(b)
        else:
            modules.append([b])
    return DeepArcModules(modules=modules, threshold=threshold, similarities=used)


def deeparc(
    model: nn.Module,
    loader: Iterable,
    threshold: float = 0.99,
    layers: Sequence[str] | None = None,
    progress: bool = False,
) -> DeepArcModules:
    """:func:`layer_similarities` followed by :func:`modularize` over the same layers."""
    threshold = _check_threshold(threshold)
    sims = layer_similarities(model, loader, layers=layers, progress=progress)
    pairs = list(sims)
    names = [a for a, _ in pairs] + [pairs[-1][1]]
    return modularize(sims, names, threshold)


# --------------------------------------------------------------------------- maintenance
def freeze_except(model: nn.Module, layer_names: Sequence[str]) -> list[str]:
    """Make only the named layers (and the BatchNorm right after each) trainable.

    Sets ``requires_grad=True`` on their parameters and ``False`` on every other parameter of
    ``model``; returns the names of the trainable parameters in ``model.named_parameters()``
    order. DeepArc's re-adaptation trains the modules' critical layers
    (``freeze_except(model, mods.critical_layers)``); its incremental variant trains only the
    redundant ones (``freeze_except(model, mods.redundant)``). An empty ``layer_names`` freezes
    everything. Unknown or non-``Linear``/``Conv2d`` names raise ``ValueError``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(layer_names, str):
        layer_names = [layer_names]
    names = list(layer_names)
    keep: set[int] = set()
    if names:
        for layer in find_layers(model, names):
            mods = [layer.module] + ([layer.norm_module] if layer.norm_module is not None else [])
            keep.update(id(p) for m in mods for p in m.parameters())
    trainable = []
    for pname, p in model.named_parameters():
        p.requires_grad_(id(p) in keep)
        if id(p) in keep:
            trainable.append(pname)
    return trainable
