"""``Profile``: the statistics of one profiling pass, its queries and its file format."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from .. import cka
from .._utils.io import atomic_torch_save, content_digest
from .scores import check_metrics, ranking, scorable, score

__all__ = ["Profile"]

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
                f"profile again with metrics including {metric!r}."
            )
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
            raise ValueError(
                "this profile kept only the CKA prefix curves (keep_hsic=False), not "
                "the HSIC matrices; use Profile.curve, or profile again with "
                "keep_hsic=True."
            )
        if float(self._t(layer, "hsic_weight")[category]) <= 0:
            return None
        return self._t(layer, "hsic")[category]

    def curve(self, layer: str, metric: str, category: int) -> torch.Tensor | None:
        """CKA with the whole layer of every top-``k`` prefix of the neurons ranked by ``metric``
        on ``category`` (``k = 1..d``), or None if the category had too few samples."""
        self._check_category(category)
        if not self.hsic_routes:
            raise ValueError(
                "this profile has no neuron-HSIC statistics (it was made with "
                "hsic=False); profile again with hsic=True."
            )
        order = ranking(self.scores(layer, metric, category))
        if self.keeps_hsic:
            m = self.hsic(layer, category)
            return None if m is None else cka.prefix_curve(m, order)
        if float(self._t(layer, "hsic_weight")[category]) <= 0:
            return None
        key = f"{layer}.curve.{metric}"
        if key not in self.tensors:
            raise ValueError(
                f"this profile stored no CKA curves for metric {metric!r} (it has "
                f"{sorted(k.split('.curve.')[1] for k in self.tensors if '.curve.' in k and k.startswith(layer + '.'))})."
            )
        return self.tensors[key][category]

    def __repr__(self) -> str:
        n = int(self.counts().sum())
        return (
            f"Profile(layers={self.layers}, num_classes={self.num_classes}, samples={n}, "
            f"metrics={list(self.metrics)})"
        )

    # ---- persistence ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the profile to one file (atomically: a crash never leaves a partial file)."""
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "layers": self.layers,
            "num_neurons": self.num_neurons,
            "num_classes": self.num_classes,
            "metrics": list(self.metrics),
            "fingerprint": self.fingerprint,
            "input_shape": self.input_shape,
            "hsic_routes": self.hsic_routes,
            "warnings": self.warnings,
            "timings": self.timings,
            "keep_hsic": self.keeps_hsic,
        }
        text = json.dumps(meta)
        atomic_torch_save(
            {
                "meta": text,
                "tensors": self.tensors,
                "checksum": content_digest([text, self.tensors]),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        """Read a profile written by :meth:`save`. The checksum (absent from files of neuslice
        0.1), the metadata and every statistic (shape, finite values, signs) are checked; an
        edited, corrupt or truncated file raises ``ValueError`` naming the file and the field."""
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
                f"{type(exc).__name__}: {exc}. Re-run neuslice.profile to recreate it."
            ) from exc
        if meta.get("format") != _FORMAT or meta.get("version") not in (1, _VERSION):
            raise ValueError(
                f"{path} is not a neuslice profile (format {meta.get('format')!r}, "
                f"version {meta.get('version')!r})."
            )
        try:
            prof = cls(
                layers=meta["layers"],
                num_neurons=meta["num_neurons"],
                num_classes=meta["num_classes"],
                metrics=tuple(meta["metrics"]),
                fingerprint=meta["fingerprint"],
                input_shape=meta["input_shape"],
                tensors=tensors,
                hsic_routes=meta["hsic_routes"],
                warnings=meta["warnings"],
                timings=meta["timings"],
            )
            sizes = [(layer, int(prof.num_neurons[layer])) for layer in prof.layers]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{path} is corrupt: its metadata is incomplete ({type(exc).__name__}: {exc})."
            ) from exc
        _check_meta(path, prof)
        for layer, d in sizes:
            c = prof.num_classes
            expect = {"count": (c,), "mean": (c, d), "m2": (c, d)}
            if meta.get("keep_hsic", True):
                expect["hsic"] = (c, d, d)
            for key, shape in expect.items():
                t = tensors.get(f"{layer}.{key}")
                if t is None or tuple(t.shape) != shape:
                    raise ValueError(
                        f"{path} is corrupt: tensor {layer}.{key} is missing or has "
                        f"the wrong shape."
                    )
        _check_tensors(path, prof)
        # last, so that a damaged field is named; files of neuslice 0.1 carry no checksum
        if "checksum" in blob and blob["checksum"] != content_digest([blob["meta"], tensors]):
            raise ValueError(
                f"{path} is corrupt: field 'checksum' does not match the content "
                f"(the file was edited or damaged after it was written). Re-run "
                f"neuslice.profile to recreate it."
            )
        return prof


_OPTIONAL_SHAPES = {
    "taylor": "cd",
    "taylor_batches": "c",
    "taylor_act": "cd",
    "deeplift": "cd",
    "taylor_all": "d",
    "taylor_all_batches": "",
    "hsic_weight": "c",
}
_NON_NEGATIVE = (
    "count",
    "m2",
    "taylor",
    "taylor_batches",
    "taylor_act",
    "taylor_all",
    "taylor_all_batches",
    "hsic_weight",
)


def _check_meta(path, prof: "Profile") -> None:
    def bad(field_name, what):
        raise ValueError(f"{path} is corrupt: field {field_name!r} {what}.")

    if (
        not isinstance(prof.layers, list)
        or not prof.layers
        or not all(isinstance(n, str) for n in prof.layers)
        or len(set(prof.layers)) != len(prof.layers)
    ):
        bad("layers", "must be a non-empty list of distinct layer names")
    if not isinstance(prof.num_neurons, dict) or set(prof.num_neurons) != set(prof.layers):
        bad("num_neurons", f"must give the size of every layer of {prof.layers}")
    for v in [prof.num_classes, *prof.num_neurons.values()]:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            bad("num_neurons/num_classes", f"holds {v!r}, not a positive int")
    try:
        check_metrics(list(prof.metrics))
    except (TypeError, ValueError) as exc:
        bad("metrics", f"is invalid ({exc})")
    if not isinstance(prof.fingerprint, str) or not prof.fingerprint:
        bad("fingerprint", "must be a non-empty string")
    shape = prof.input_shape
    if not isinstance(shape, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape
    ):
        bad("input_shape", f"must be a list of positive ints, got {shape!r:.80}")
    if not isinstance(prof.hsic_routes, dict) or not set(prof.hsic_routes) <= set(prof.layers):
        bad("hsic_routes", "must map profiled layers to routes")


def _check_tensors(path, prof: "Profile") -> None:
    c = prof.num_classes
    for key, t in prof.tensors.items():
        layer, _, stat = key.partition(".")
        if layer not in prof.num_neurons or not torch.is_tensor(t):
            raise ValueError(
                f"{path} is corrupt: field tensors[{key!r}] belongs to no layer or is not a tensor."
            )
        d = prof.num_neurons[layer]
        spec = "cd" if stat.startswith("curve.") else _OPTIONAL_SHAPES.get(stat)
        if spec is not None and tuple(t.shape) != tuple(c if s == "c" else d for s in spec):
            raise ValueError(
                f"{path} is corrupt: field tensors[{key!r}] has shape {tuple(t.shape)}."
            )
        if not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32)):
            raise ValueError(f"{path} is corrupt: field tensors[{key!r}] has dtype {t.dtype}.")
        # CKA curves are NaN for categories without enough samples; nothing else may be
        finite = torch.isfinite(t) | (torch.isnan(t) if stat.startswith("curve.") else False)
        if not bool(finite.all()):
            raise ValueError(
                f"{path} is corrupt: field tensors[{key!r}] holds NaN or infinite values."
            )
        if stat in _NON_NEGATIVE and bool((t < 0).any()):
            raise ValueError(f"{path} is corrupt: field tensors[{key!r}] holds negative values.")
