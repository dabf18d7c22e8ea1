"""Memory a profile will need, stated before anything is allocated.

:func:`neuslice.profile` computes this estimate from the layer shapes of the first batch and
refuses (``MemoryBudgetError``, with the table) when it exceeds ``max_memory_gb``, instead of
being killed half-way. :func:`estimate_profile_memory` gives the same table without profiling.

What grows with what (``C`` categories, a layer of ``d`` neurons over ``s`` positions):

* per-category scores (count, mean, M2, Taylor, DeepLIFT): ``~6·C·d`` float64 -- always;
* HSIC accumulators -- ``category_order="any"``: one per category; ``"grouped"``: only the
  categories in progress (those of the current batch); feature route ``(d·s)²`` float64
  plus a buffer of ``256·d·s`` values per category, minibatch route ``d²`` float64 (none with
  ``"any"`` and ``keep_hsic=True``: the sums accumulate in the result matrices) plus pending
  samples (``cka_batch·d·s`` float32 per category; grouped: ``(cka_batch + batch)·d·s`` in all);
* results: ``keep_hsic=True`` keeps ``C·d²`` float64 HSIC matrices; ``False`` keeps only the
  CKA prefix curves, ``C·d`` float64 per metric -- all semantic slicing needs.

Nothing grows with the number of samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["MemoryEstimate", "MemoryBudgetError", "pick_hsic_route", "estimate"]

GiB = 2**30
_FEATURE_BUFFER = 256  # samples CovarianceAccumulator buffers per category


class MemoryBudgetError(MemoryError):
    """The requested profile would need more memory than the budget allows."""


def pick_hsic_route(
    d: int, positions: int, route: str, cka_batch: int, max_feature_dim: int
) -> str:
    """How a layer's HSIC statistics are accumulated: ``"feature"`` (exact covariance) when
    small, else ``"minibatch"`` (unbiased HSIC per category minibatch)."""
    if route != "auto":
        return route
    p = d * positions
    feature_flops, sample_flops = p * p, d * cka_batch * positions + d * d * cka_batch
    return (
        "feature" if (p <= max_feature_dim and feature_flops <= 4 * sample_flops) else "minibatch"
    )


@dataclass
class MemoryEstimate:
    """Bytes per layer and component; ``total`` is the peak the accumulators need."""

    rows: list[tuple[str, str, int, int, int]] = field(
        default_factory=list
    )  # name, route, d, s, bytes
    parts: dict[str, int] = field(default_factory=dict)  # component -> bytes (all layers)
    num_classes: int = 0
    slots: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def table(self, top: int = 8) -> str:
        lines = [
            f"estimated memory {self.total / GiB:.2f} GiB for {self.num_classes} "
            f"categories ({self.slots} HSIC accumulator slot(s) per layer):"
        ]
        for part, b in sorted(self.parts.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {part:<34} {b / GiB:9.3f} GiB")
        rows = sorted(self.rows, key=lambda r: -r[4])[:top]
        lines.append(
            "  largest layers: "
            + ", ".join(f"{n} ({r}, d={d}, s={s}: {b / GiB:.2f} GiB)" for n, r, d, s, b in rows)
        )
        lines.append(
            "  (covers the statistics, the model and one batch in flight; not the "
            "Python/torch runtime nor the data loader's own memory)"
        )
        return "\n".join(lines)


def estimate(
    layers: list[tuple[str, int, int]],
    num_classes: int,
    *,
    hsic: bool = True,
    hsic_route: str = "auto",
    cka_batch: int = 128,
    max_feature_dim: int = 2048,
    category_order: str = "any",
    keep_hsic: bool = True,
    num_metrics: int = 5,
    batch_size: int = 1,
    open_categories: int = 2,
    model_bytes: int = 0,
    batch_bytes: int = 0,
) -> MemoryEstimate:
    """Estimate for ``layers`` given as ``(name, neurons d, positions s)``.

    With ``category_order="grouped"``, ``open_categories`` HSIC accumulators are planned (2: a
    batch spans at most two categories when every category has at least a batch of samples);
    the profile re-checks the budget if a batch opens more. ``model_bytes`` (parameters and
    buffers) and ``batch_bytes`` (what one batch holds while it is in flight: activations saved
    for backward, the copies of the sliced layers' outputs) are added as measured by the caller.
    """
    c = num_classes
    grouped = category_order != "any"
    slots = min(c, open_categories) if grouped else c
    est = MemoryEstimate(num_classes=c, slots=slots)
    parts = {
        "scores (per category)": 0,
        "HSIC accumulators": 0,
        "HSIC pending samples": 0,
        "HSIC results": 0,
    }
    for name, d, s in layers:
        layer_bytes = 8 * (6 * c * d + 2 * c + d)
        parts["scores (per category)"] += layer_bytes
        route = "-"
        if hsic:
            route = pick_hsic_route(d, s, hsic_route, cka_batch, max_feature_dim)
            p = d * s
            if route == "feature":
                acc, pending = slots * 8 * (p * p + 3 * p), slots * 4 * _FEATURE_BUFFER * p
                finalize = 16 * p * p  # one category's co-moment and its squared blocks
            else:
                # "any" order with keep_hsic: the sums accumulate in the result matrices
                own = grouped or not keep_hsic
                acc, finalize = (slots * 8 * d * d if own else 0), 0
                # grouped: only the oldest open category can hold a leftover (< cka_batch);
                # the others hold samples of the current batch only
                waiting = (cka_batch + batch_size) if grouped else c * cka_batch
                pending = 4 * waiting * p
            result = 8 * c * d * d if keep_hsic else 8 * c * d * num_metrics
            parts["HSIC accumulators"] += acc + finalize
            parts["HSIC pending samples"] += pending
            parts["HSIC results"] += result
            layer_bytes += acc + finalize + pending + result
        est.rows.append((name, route, d, s, layer_bytes))
    parts["model (parameters, buffers)"] = model_bytes
    parts["one batch in flight (activations)"] = batch_bytes
    est.parts = {k: v for k, v in parts.items() if v}
    return est
