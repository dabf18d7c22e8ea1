"""``ProfileConfig``: what a profiling pass computes and how, shared by ``profile`` and
``estimate_profile_memory``; validated on construction."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Callable
from dataclasses import dataclass

import torch

from ..ops import BACKENDS
from .scores import ALL_METRICS, INSERTED_METRICS, METRICS, check_metrics

__all__ = ["ProfileConfig", "PassConfig"]


@dataclass(frozen=True)
class ProfileConfig:
    """Options of a profiling pass (every field has the default ``neuslice.profile`` uses).

    Attributes:
        metrics: contribution metrics to compute, from ``neuslice.ALL_METRICS``; ``"ens"``
            brings ``"avg"`` and ``"var"`` with it.
        hsic: also accumulate the neuron-HSIC statistics that semantic slicing needs.
        hsic_route: ``"feature"`` (exact, biased HSIC over each category's whole data; memory
            ``(d·s)²`` per category), ``"minibatch"`` (unbiased HSIC averaged over category
            minibatches of ``cka_batch`` samples; memory ``cka_batch·d·s``) or ``"auto"``
            (per layer, from its shape).
        cka_batch: samples per minibatch of the minibatch route (at least 4).
        max_feature_dim: ``"auto"`` uses the feature route only up to ``neurons x positions``
            of this size.
        max_memory_gb: budget for the pass (see ``neuslice.runtime.memory``); a larger
            estimate is refused with a ``MemoryBudgetError`` before anything is allocated.
        category_order: ``"any"`` or ``"grouped"`` (the loader yields the data sorted by
            category, e.g. with ``neuslice.runtime.CategoryGroupedSampler``: each category is
            finished as soon as the data moves past it).
        keep_hsic: keep the ``d x d`` HSIC matrices, or only the CKA prefix curves of every
            profiled metric; None: keep them with ``"any"``, not with ``"grouped"``.
        autocast: ``torch.bfloat16`` / ``torch.float16`` runs the model under autocast; the
            statistics are still accumulated in float32/float64.
        backend: backend of the HSIC op (``neuslice.ops``): None/"auto", "cuda", "triton",
            "cpp" or "torch"; the ``NEUSLICE_BACKEND`` environment variable also sets it.
        output_fn: a callable mapping the model's output to the ``(batch, classes)`` logits
            Taylor and DeepLIFT differentiate, for models that return something else: e.g.
            ``lambda out: out["logits"]`` (Hugging Face) or ``lambda out: out[0]`` for
            ``(logits, aux)``. None: the output must be the logits tensor. It changes no
            statistic's meaning, so it is not part of a checkpoint's key.
    """

    metrics: tuple[str, ...] = METRICS
    hsic: bool = True
    hsic_route: str = "auto"
    cka_batch: int = 128
    max_feature_dim: int = 2048
    max_memory_gb: float = 8.0
    category_order: str = "any"
    keep_hsic: bool | None = None
    autocast: torch.dtype | None = None
    backend: str | None = None
    output_fn: Callable[[Any], torch.Tensor] | None = None

    def __post_init__(self):
        if self.metrics is None or (not isinstance(self.metrics, str) and len(self.metrics) == 0):
            raise ValueError(f"metrics must name at least one metric, from {list(ALL_METRICS)}")
        metrics = check_metrics(self.metrics)
        inserted = [m for m in metrics if m in INSERTED_METRICS]
        if inserted:
            raise ValueError(
                f"metric(s) {inserted} are not computed by profiling: compute them "
                f"with neuslice.mutation_scores and insert them into the profile "
                f"with neuslice.add_mutation_scores(profile, scores)."
            )
        if "ens" in metrics:
            metrics = tuple(dict.fromkeys(metrics + ("avg", "var")))
        object.__setattr__(self, "metrics", metrics)
        object.__setattr__(self, "hsic", bool(self.hsic))
        if self.hsic_route not in ("auto", "feature", "minibatch"):
            raise ValueError(
                f"hsic_route must be 'auto', 'feature' or 'minibatch', got {self.hsic_route!r}"
            )
        if _not_int(self.cka_batch) or self.cka_batch < 4:
            raise ValueError(
                f"cka_batch must be an int >= 4 (the unbiased HSIC needs 4 "
                f"samples), got {self.cka_batch!r}"
            )
        if _not_int(self.max_feature_dim) or self.max_feature_dim < 1:
            raise ValueError(
                f"max_feature_dim must be a positive int, got {self.max_feature_dim!r}"
            )
        if (
            isinstance(self.max_memory_gb, bool)
            or not isinstance(self.max_memory_gb, (int, float))
            or not self.max_memory_gb > 0
        ):
            raise ValueError(f"max_memory_gb must be a positive number, got {self.max_memory_gb!r}")
        if self.category_order not in ("any", "grouped"):
            raise ValueError(
                f"category_order must be 'any' or 'grouped' (data sorted by "
                f"category, e.g. with neuslice.runtime.CategoryGroupedSampler), got "
                f"{self.category_order!r}"
            )
        if self.backend not in (None, "auto", *BACKENDS):
            raise ValueError(
                f"backend must be None, 'auto' or one of {list(BACKENDS)}, got {self.backend!r}"
            )
        if self.autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(
                f"autocast must be None, torch.bfloat16 or torch.float16, got {self.autocast!r}"
            )
        if self.output_fn is not None and not callable(self.output_fn):
            raise TypeError(
                f"output_fn must be a callable mapping the model's output to its "
                f"logits (e.g. lambda out: out['logits']) or None, got "
                f"{type(self.output_fn).__name__}"
            )
        if self.keep_hsic is not None:
            object.__setattr__(self, "keep_hsic", bool(self.keep_hsic))

    @classmethod
    def resolve(cls, config: "ProfileConfig | None", **options) -> "ProfileConfig":
        """``config`` (or the defaults) with ``options`` replacing its fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(
                f"unknown profiling option(s) {unknown}; the options are the fields "
                f"of neuslice.ProfileConfig: {sorted(names)}"
            )
        if config is not None and not isinstance(config, ProfileConfig):
            raise TypeError(f"config must be a neuslice.ProfileConfig, got {type(config).__name__}")
        if isinstance(options.get("metrics"), str):
            options["metrics"] = (options["metrics"],)
        elif isinstance(options.get("metrics"), Sequence):
            options["metrics"] = tuple(options["metrics"])
        return dataclasses.replace(config or cls(), **options)


@dataclass(frozen=True)
class PassConfig(ProfileConfig):
    """A ``ProfileConfig`` bound to a number of categories: what one pass runs with."""

    num_classes: int = 1

    def __post_init__(self):
        if _not_int(self.num_classes) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        super().__post_init__()
        if self.keep_hsic is None:  # the default follows the category order
            object.__setattr__(self, "keep_hsic", self.category_order == "any")

    @classmethod
    def bind(cls, config: ProfileConfig, num_classes: int) -> "PassConfig":
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(ProfileConfig)}
        return cls(**fields, num_classes=num_classes)

    def key(self) -> dict:
        """What decides the result (checkpoints and ranks must agree on it)."""
        return {
            "num_classes": self.num_classes,
            "metrics": list(self.metrics),
            "hsic": self.hsic,
            "hsic_route": self.hsic_route,
            "cka_batch": self.cka_batch,
            "max_feature_dim": self.max_feature_dim,
            "category_order": self.category_order,
            "keep_hsic": self.keep_hsic,
            "autocast": str(self.autocast),
        }


def _not_int(v) -> bool:
    return isinstance(v, bool) or not isinstance(v, int)
