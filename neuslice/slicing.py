"""Slicing strategies (global, category-wise, semantic) and the ``Slice`` they return."""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import cka
from ._utils.io import atomic_write, content_digest
from ._utils.wrappers import unwrap_model
from .layers import SlicedLayer, find_layers, model_fingerprint
from .profiling.scores import ranking
from .profiling.profile import Profile
from ._utils.checks import check_fraction

__all__ = [
    "Slice",
    "global_slice",
    "categorywise_slice",
    "semantic_slice",
    "random_slice",
    "CRITERIA",
]

_FORMAT = "neuslice.slice"
_VERSION = 1


def _encode(mask: torch.Tensor) -> str:
    return np.packbits(mask.cpu().numpy().astype(np.uint8)).tobytes().hex()


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _decode(text: str, size: int) -> torch.Tensor:
    if not isinstance(text, str):
        raise TypeError(f"a mask must be a hex string, got {type(text).__name__}")
    if len(text) != 2 * ((size + 7) // 8):
        raise ValueError(
            f"a mask of {size} neurons needs {2 * ((size + 7) // 8)} hex digits, got {len(text)}"
        )
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
        model = unwrap_model(model)
        fp = model_fingerprint(model)
        if fp != self.fingerprint:
            raise ValueError(
                f"this slice was made for a different model (fingerprint {self.fingerprint}, "
                f"model has {fp}: other layer names, shapes or module types). Profile and "
                f"slice this model instead."
            )
        layers = find_layers(model, self.layers)
        for l in layers:
            if l.num_neurons != self.masks[l.name].numel():
                raise ValueError(
                    f"layer {l.name!r} has {l.num_neurons} neurons but the slice's mask has "
                    f"{self.masks[l.name].numel()}."
                )
        return layers

    def compression_rate(self, model: nn.Module) -> float:
        """Fraction of the model's parameters that removing the non-critical neurons removes.

        Removing a neuron removes its weights, bias and per-channel norm/PReLU entries, and the
        weights that consume it in the next layers. Neurons whose outputs reach a join (a
        residual add, a concatenation) are coupled to other layers and are not counted here.
        """
        model = unwrap_model(model)
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
                out_units = (
                    m.out_channels if isinstance(m, nn.ConvTranspose2d) else m.weight.shape[0]
                )
                rows = kept_rows.get(consumer, out_units)
                removed += r * width * rows
        total = sum(p.numel() for p in model.parameters())
        return removed / total if total else 0.0

    # ---- persistence ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "strategy": self.strategy,
            "metric": self.metric,
            "ratio": self.ratio,
            "threshold": self.threshold,
            "fingerprint": self.fingerprint,
            "input_shape": self.input_shape,
            "kept": {k: f"{v}/{self.sizes()[k]}" for k, v in self.kept().items()},
            "sizes": self.sizes(),
            "masks": {k: _encode(m) for k, m in self.masks.items()},
            "category_masks": None
            if self.category_masks is None
            else {k: [_encode(row) for row in m] for k, m in self.category_masks.items()},
            "notes": self.notes,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write a small JSON file (masks as hex bit strings, a ``checksum`` of the content);
        atomic, with the permissions the umask gives a new file."""
        path = os.fspath(path)
        d = json.loads(json.dumps(self.to_dict()))  # fails before any file is touched
        d["checksum"] = content_digest(d)
        text = json.dumps(d, indent=1).encode()
        atomic_write(path, lambda f: f.write(text))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Slice":
        """Read a slice written by :meth:`save`. Every field is checked (and the checksum, which
        files of neuslice 0.1 lack); an edited, corrupt or truncated file raises ``ValueError``
        naming the file and the field."""
        try:
            with open(path) as f:
                d = json.load(f)
            return cls._from_file_dict(d)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ValueError(
                f"{path} is not a valid neuslice slice file (edited, corrupt or "
                f"truncated?): {type(exc).__name__}: {exc}"
            ) from exc

    @classmethod
    def _from_file_dict(cls, d) -> "Slice":
        if not isinstance(d, dict):
            raise ValueError(f"the file holds a JSON {type(d).__name__}, not an object")
        if d.get("format") != _FORMAT or d.get("version") != _VERSION:
            raise ValueError(
                f"field 'format'/'version': {d.get('format')!r} version "
                f"{d.get('version')!r}, expected {_FORMAT!r} version {_VERSION}"
            )
        missing = [
            k
            for k in (
                "strategy",
                "metric",
                "ratio",
                "threshold",
                "fingerprint",
                "input_shape",
                "kept",
                "sizes",
                "masks",
                "category_masks",
                "notes",
            )
            if k not in d
        ]
        if missing:
            raise ValueError(f"field(s) {missing} missing")
        sizes, masks_hex, kept = d["sizes"], d["masks"], d["kept"]
        for name, v in (("sizes", sizes), ("masks", masks_hex), ("kept", kept)):
            if not isinstance(v, dict) or not v:
                raise ValueError(f"field {name!r} must be a non-empty object, got {v!r:.80}")
        if not all(_pos_int(v) for v in sizes.values()):
            raise ValueError(f"field 'sizes' must map layers to positive ints, got {sizes!r:.200}")
        for name, v in (("masks", masks_hex), ("kept", kept)):
            if set(v) != set(sizes):
                raise ValueError(
                    f"field {name!r} has layers {sorted(v)} but 'sizes' has "
                    f"{sorted(sizes)} (a layer is missing)"
                )
        masks = {}
        for k, v in masks_hex.items():
            try:
                masks[k] = _decode(v, sizes[k])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"field 'masks', layer {k!r}: {exc}") from exc
        for k, v in kept.items():
            parts = v.split("/") if isinstance(v, str) else []
            if (
                len(parts) != 2
                or not parts[0].isdigit()
                or parts[1] != str(sizes[k])
                or int(parts[0]) != int(masks[k].sum())
            ):
                raise ValueError(
                    f"field 'kept', layer {k!r}: {v!r} does not match its mask "
                    f"({int(masks[k].sum())}/{sizes[k]})"
                )
        cat = None
        if d["category_masks"] is not None:
            rows_hex = d["category_masks"]
            if not isinstance(rows_hex, dict) or set(rows_hex) != set(sizes):
                raise ValueError(
                    f"field 'category_masks' must hold every layer of 'sizes' ({sorted(sizes)})"
                )
            cat = {}
            for k, rows in rows_hex.items():
                if not isinstance(rows, list) or not rows:
                    raise ValueError(f"field 'category_masks', layer {k!r}: not a list of rows")
                try:
                    cat[k] = torch.stack([_decode(r, sizes[k]) for r in rows])
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"field 'category_masks', layer {k!r}: {exc}") from exc
                if not torch.equal(cat[k].any(0), masks[k]):
                    raise ValueError(
                        f"field 'category_masks', layer {k!r}: the union of the "
                        f"category masks is not the layer's mask"
                    )
            if len({m.shape[0] for m in cat.values()}) != 1:
                raise ValueError(
                    "field 'category_masks': layers have different numbers of categories"
                )
        shape = d["input_shape"]
        if not isinstance(shape, list) or not all(_pos_int(v) for v in shape):
            raise ValueError(
                f"field 'input_shape' must be a list of positive ints, got {shape!r:.80}"
            )
        for name in ("strategy", "fingerprint"):
            if not isinstance(d[name], str) or not d[name]:
                raise ValueError(f"field {name!r} must be a non-empty string, got {d[name]!r:.80}")
        if d["metric"] is not None and not isinstance(d["metric"], str):
            raise ValueError(f"field 'metric' must be a string or null, got {d['metric']!r:.80}")
        for name in ("ratio", "threshold"):
            v = d[name]
            if v is not None and (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or not 0 <= v <= 1
            ):
                raise ValueError(f"field {name!r} must be null or a number in [0, 1], got {v!r}")
        notes = d["notes"]
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise ValueError("field 'notes' must be a list of strings")
        # last, so that a damaged field is named; files of neuslice 0.1 carry no checksum
        if "checksum" in d and d["checksum"] != content_digest(
            {k: v for k, v in d.items() if k != "checksum"}
        ):
            raise ValueError(
                "field 'checksum' does not match the content: the file was edited "
                "or damaged after it was written"
            )
        return cls(
            masks=masks,
            strategy=d["strategy"],
            metric=d["metric"],
            fingerprint=d["fingerprint"],
            input_shape=shape,
            category_masks=cat,
            ratio=d["ratio"],
            threshold=d["threshold"],
            notes=notes,
        )


# ---- strategies ------------------------------------------------------------------------


def _check_profile(profile) -> None:
    if not isinstance(profile, Profile):
        raise TypeError(f"expected a neuslice.Profile, got {type(profile).__name__}")


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = ranking(scores)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order[:k].cpu()] = True
    return mask


def _make(
    profile: Profile, strategy, metric, masks, cat=None, ratio=None, threshold=None, notes=()
):
    return Slice(
        masks=masks,
        strategy=strategy,
        metric=metric,
        fingerprint=profile.fingerprint,
        input_shape=list(profile.input_shape),
        category_masks=cat,
        ratio=ratio,
        threshold=threshold,
        notes=list(notes),
    )


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


CRITERIA = ("consumer_r2", "layer_cka")
"""Semantic-slicing criteria; the first is :func:`semantic_slice`'s default."""


def semantic_slice(
    profile: Profile,
    metric: str,
    threshold: float,
    step: int = 1,
    *,
    criterion: str | None = None,
    model: nn.Module | None = None,
    loader=None,
    progress: bool = True,
) -> Slice:
    """Per layer and category, the smallest top-scored prefix of neurons that keeps the layer's
    meaning at level ``threshold``; the union over categories is the semantic slice.

    Criteria (``criterion=``):

    * ``"consumer_r2"`` (the default): the prefix must explain ``threshold`` of the consumer
      layers' centred pre-activation variance on the category's inputs
      (:func:`neuslice.consumer.consumer_r2_slice`). It does not starve convolutional layers
      and reaches every compression rate (``docs/REPRODUCTION.md``, "Does semantic slicing
      win?"). It runs the model's consumer layers, so it needs ``model`` and ``loader``
      (batches of ``(inputs, labels)``); ``step`` must be 1. Its thresholds lie lower than
      the paper's: 0.05-0.6 gave 50-90 % compression on the nets measured. To slice at many
      thresholds, compute :func:`neuslice.consumer_r2_curves` once and call ``.slice(θ)``.
    * ``"layer_cka"``: the paper's Eq. 4 -- linear CKA of the prefix with the whole layer
      reaches ``threshold``. Needs only the profile (made with ``hsic=True``); ``step`` rounds
      each prefix up to a multiple of ``step`` neurons like the paper's scan. The reproduction
      commands use it.

    Called without ``model``/``loader`` and without ``criterion``, the profile alone cannot
    serve the default, so the paper's criterion is used and a ``FutureWarning`` says so (pass
    ``criterion="layer_cka"`` to keep it silently). Categories without enough samples are
    skipped (noted in ``Slice.notes``).
    """
    if criterion is None:
        if model is not None or loader is not None:
            criterion = "consumer_r2"
        else:
            warnings.warn(
                "semantic_slice's default criterion is 'consumer_r2', which runs the model's "
                "consumer layers: pass model=... and loader=... to use it. Without them the "
                "paper's criterion is used; pass criterion='layer_cka' to choose it explicitly "
                "and silence this warning.",
                FutureWarning,
                stacklevel=2,
            )
            criterion = "layer_cka"
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {list(CRITERIA)}, got {criterion!r}")
    if criterion == "consumer_r2":
        if model is None or loader is None:
            raise ValueError(
                "criterion='consumer_r2' runs the model's consumer layers on each "
                "category's inputs: pass model=... and loader=... (or criterion='layer_cka' "
                "for the paper's criterion, which needs only the profile)"
            )
        if step != 1:
            raise ValueError(
                "step is a scan increment of the paper's criterion; with "
                "criterion='consumer_r2' leave it at 1"
            )
        from .consumer import consumer_r2_slice

        return consumer_r2_slice(model, profile, loader, metric, threshold, progress=progress)
    _check_profile(profile)
    threshold = check_fraction("threshold", threshold)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be a positive int, got {step!r}")
    if not profile.hsic_routes:
        raise ValueError(
            "this profile has no neuron-HSIC matrices (it was made with hsic=False); "
            "semantic slicing needs them: profile again with hsic=True."
        )
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
    return Slice(
        masks=masks,
        strategy="random",
        metric=None,
        fingerprint=like.fingerprint,
        input_shape=list(like.input_shape),
        ratio=like.ratio,
        threshold=like.threshold,
    )
