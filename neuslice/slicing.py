"""Slicing strategies (global, category-wise, semantic) and the ``Slice`` they return."""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import cka
from ._utils.io import atomic_write
from .layers import SlicedLayer, find_layers, model_fingerprint
from .profiling.scores import ranking
from .profiling.profile import Profile
from ._utils.checks import check_fraction

__all__ = ["Slice", "global_slice", "categorywise_slice", "semantic_slice", "random_slice"]

_FORMAT = "neuslice.slice"
_VERSION = 1


def _encode(mask: torch.Tensor) -> str:
    return np.packbits(mask.cpu().numpy().astype(np.uint8)).tobytes().hex()


def _decode(text: str, size: int) -> torch.Tensor:
    if len(text) != 2 * ((size + 7) // 8):
        raise ValueError(f"a mask of {size} neurons needs {2 * ((size + 7) // 8)} hex digits, "
                         f"got {len(text)}")
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8), count=size)
    return torch.from_numpy(bits.astype(bool))


@dataclass
class Slice:
    """The critical neurons of a model: ``masks[layer]`` is a bool tensor, True = critical.

    ``category_masks[layer]`` (categories x neurons) holds the per-category selections whose
    union is ``masks`` (None for global and random slices).
    """

    masks: dict[str, torch.Tensor]
    strategy: str
    metric: str | None
    fingerprint: str
    input_shape: list[int]
    category_masks: dict[str, torch.Tensor] | None = None
    ratio: float | None = None
    threshold: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        return list(self.masks)

    def kept(self) -> dict[str, int]:
        """Critical neurons per layer."""
        return {k: int(m.sum()) for k, m in self.masks.items()}

    def sizes(self) -> dict[str, int]:
        return {k: int(m.numel()) for k, m in self.masks.items()}

    def __repr__(self) -> str:
        setting = f"ratio={self.ratio}" if self.ratio is not None else f"threshold={self.threshold}"
        kept = ", ".join(f"{k}: {v}/{self.sizes()[k]}" for k, v in self.kept().items())
        return f"Slice({self.strategy}, metric={self.metric}, {setting}, kept={{{kept}}})"

    # ---- fitting a model -----------------------------------------------------------------
    def layers_of(self, model: nn.Module) -> list[SlicedLayer]:
        """The model's sliced layers; ``ValueError`` if this slice does not belong to it."""
        fp = model_fingerprint(model)
        if fp != self.fingerprint:
            raise ValueError(
                f"this slice was made for a different model (fingerprint {self.fingerprint}, "
                f"model has {fp}: other layer names, shapes or module types). Profile and "
                f"slice this model instead.")
        layers = find_layers(model, self.layers)
        for l in layers:
            if l.num_neurons != self.masks[l.name].numel():
                raise ValueError(
                    f"layer {l.name!r} has {l.num_neurons} neurons but the slice's mask has "
                    f"{self.masks[l.name].numel()}.")
        return layers

    def compression_rate(self, model: nn.Module) -> float:
        """Fraction of the model's parameters that removing the non-critical neurons removes.

        Removing a neuron removes its weights, bias and per-channel norm/PReLU entries, and the
        weights that consume it in the next layers. Neurons whose outputs reach a join (a
        residual add, a concatenation) are coupled to other layers and are not counted here.
        """
        layers = self.layers_of(model)
        modules = dict(model.named_modules())
        kept_rows = {l.name: int(self.masks[l.name].sum()) for l in layers if not l.coupled}
        removed = 0
        for l in layers:
            if l.coupled:
                continue
            r = l.num_neurons - kept_rows[l.name]
            removed += r * (l.own_params_per_neuron + l.pass_params_per_neuron)
            for consumer, width in l.consumers:
                m = modules[consumer]
                rows = kept_rows.get(consumer, m.weight.shape[0])
                removed += r * width * rows
        total = sum(p.numel() for p in model.parameters())
        return removed / total if total else 0.0

    # ---- persistence ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": _FORMAT, "version": _VERSION, "strategy": self.strategy,
            "metric": self.metric, "ratio": self.ratio, "threshold": self.threshold,
            "fingerprint": self.fingerprint, "input_shape": self.input_shape,
            "kept": {k: f"{v}/{self.sizes()[k]}" for k, v in self.kept().items()},
            "sizes": self.sizes(),
            "masks": {k: _encode(m) for k, m in self.masks.items()},
            "category_masks": None if self.category_masks is None else {
                k: [_encode(row) for row in m] for k, m in self.category_masks.items()},
            "notes": self.notes,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write a small JSON file (masks as hex bit strings); atomic."""
        path = os.fspath(path)
        text = json.dumps(self.to_dict(), indent=1).encode()  # fails before any file is touched
        atomic_write(path, lambda f: f.write(text))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Slice":
        """Read a slice written by :meth:`save`; a corrupt file raises ``ValueError``."""
        try:
            with open(path) as f:
                d = json.load(f)
            if d.get("format") != _FORMAT or d.get("version") != _VERSION:
                raise ValueError(f"format {d.get('format')!r} version {d.get('version')!r}")
            sizes = d["sizes"]
            masks = {k: _decode(v, sizes[k]) for k, v in d["masks"].items()}
            cat = None
            if d["category_masks"] is not None:
                cat = {k: torch.stack([_decode(r, sizes[k]) for r in rows])
                       for k, rows in d["category_masks"].items()}
            for k, v in d["kept"].items():
                if int(v.split("/")[0]) != int(masks[k].sum()):
                    raise ValueError(f"mask of layer {k} does not match its recorded count")
            return cls(masks=masks, strategy=d["strategy"], metric=d["metric"],
                       fingerprint=d["fingerprint"], input_shape=d["input_shape"],
                       category_masks=cat, ratio=d["ratio"], threshold=d["threshold"],
                       notes=d["notes"])
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ValueError(f"{path} is not a valid neuslice slice file (corrupt or truncated?): "
                             f"{type(exc).__name__}: {exc}") from exc


# ---- strategies ------------------------------------------------------------------------

def _check_profile(profile) -> None:
    if not isinstance(profile, Profile):
        raise TypeError(f"expected a neuslice.Profile, got {type(profile).__name__}")


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.argsort(scores, descending=True, stable=True)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order[:k].cpu()] = True
    return mask


def _make(profile: Profile, strategy, metric, masks, cat=None, ratio=None, threshold=None,
          notes=()):
    return Slice(masks=masks, strategy=strategy, metric=metric,
                 fingerprint=profile.fingerprint, input_shape=list(profile.input_shape),
                 category_masks=cat, ratio=ratio, threshold=threshold, notes=list(notes))


def global_slice(profile: Profile, metric: str, ratio: float) -> Slice:
    """Top ``ratio`` of each layer's neurons ranked by ``metric`` on the whole data set."""
    _check_profile(profile)
    ratio = check_fraction("ratio", ratio)
    masks = {}
    for layer in profile.layers:
        d = profile.num_neurons[layer]
        masks[layer] = _top(profile.scores(layer, metric), math.ceil(ratio * d))
    return _make(profile, "global", metric, masks, ratio=ratio)


def _present(profile: Profile) -> list[int]:
    return [k for k, n in enumerate(profile.counts().tolist()) if n > 0]


def categorywise_slice(profile: Profile, metric: str, ratio: float) -> Slice:
    """Top ``ratio`` of each layer's neurons per category; the union over categories."""
    _check_profile(profile)
    ratio = check_fraction("ratio", ratio)
    masks, cat = {}, {}
    for layer in profile.layers:
        d = profile.num_neurons[layer]
        rows = torch.zeros(profile.num_classes, d, dtype=torch.bool)
        for c in _present(profile):
            rows[c] = _top(profile.scores(layer, metric, c), math.ceil(ratio * d))
        cat[layer], masks[layer] = rows, rows.any(0)
    return _make(profile, "categorywise", metric, masks, cat, ratio=ratio)


def semantic_slice(profile: Profile, metric: str, threshold: float, step: int = 1) -> Slice:
    """Per layer and category, the smallest top-scored prefix whose CKA with the layer reaches
    ``threshold``; the union over categories (the paper's Eq. 4).

    ``step`` rounds each prefix up to a multiple of ``step`` neurons, like the paper's scan
    with increment ``step``. Categories without enough samples for CKA are skipped (noted).
    """
    _check_profile(profile)
    threshold = check_fraction("threshold", threshold)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be a positive int, got {step!r}")
    if not profile.hsic_routes:
        raise ValueError("this profile has no neuron-HSIC matrices (it was made with hsic=False); "
                         "semantic slicing needs them: profile again with hsic=True.")
    masks, cat, notes = {}, {}, []
    for layer in profile.layers:
        d = profile.num_neurons[layer]
        rows = torch.zeros(profile.num_classes, d, dtype=torch.bool)
        skipped, flat = [], []
        for c in _present(profile):
            curve = profile.curve(layer, metric, c)
            if curve is None:
                skipped.append(c)
                continue
            if not bool(torch.isfinite(curve).any()):
                flat.append(c)
                continue
            order = ranking(profile.scores(layer, metric, c))
            k = min(d, math.ceil(cka.minimal_prefix(curve, threshold) / step) * step)
            rows[c, order[:k].cpu()] = True
        if skipped:
            notes.append(f"{layer}: categories {skipped} skipped (too few samples for CKA)")
        if flat:
            notes.append(f"{layer}: categories {flat} skipped (layer output constant)")
        cat[layer], masks[layer] = rows, rows.any(0)
    return _make(profile, "semantic", metric, masks, cat, threshold=threshold, notes=notes)


def random_slice(like: Slice, seed: int = 0) -> Slice:
    """A random slice with the same number of critical neurons per layer as ``like``."""
    if not isinstance(like, Slice):
        raise TypeError(f"random_slice expects a neuslice.Slice, got {type(like).__name__}")
    rng = random.Random(seed)
    masks = {}
    for layer, m in like.masks.items():
        keep = rng.sample(range(m.numel()), int(m.sum()))
        r = torch.zeros(m.numel(), dtype=torch.bool)
        r[keep] = True
        masks[layer] = r
    return Slice(masks=masks, strategy="random", metric=None, fingerprint=like.fingerprint,
                 input_shape=list(like.input_shape), ratio=like.ratio, threshold=like.threshold)
