"""Contribution scores from accumulated statistics (shared by ``Profile`` and the live pass)."""

from __future__ import annotations

from typing import Callable

import torch

METRICS = ("avg", "var", "ens", "taylor", "deeplift")
ALL_METRICS = METRICS + ("taylor_act",)
# Not computed by profile(): inserted afterwards (neuslice.add_mutation_scores).
INSERTED_METRICS = ("mutation",)


def check_metrics(metrics) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in ALL_METRICS + INSERTED_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(ALL_METRICS)}.")
    return metrics


def scorable(metrics: tuple[str, ...]) -> tuple[str, ...]:
    """Metrics a profile with ``metrics`` can score (Ens follows from Avg and Var)."""
    extra = ("ens",) if {"avg", "var"} <= set(metrics) and "ens" not in metrics else ()
    return tuple(metrics) + extra


def minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    span = hi - lo
    return torch.zeros_like(x) if span <= 0 else (x - lo) / span


def score(get: Callable[[str], torch.Tensor], metric: str, category: int | None) -> torch.Tensor:
    """Score of every neuron on ``category`` (None: all data) from the tensors ``get(key)``:
    ``count``, ``mean``, ``m2``, ``taylor(_batches)``, ``taylor_all(_batches)``, ``deeplift``,
    ``taylor_act``."""
    if metric in INSERTED_METRICS:  # (categories, neurons); all data: the sum over categories
        try:
            s = get(metric)
        except KeyError:
            raise ValueError(
                f"this profile holds no {metric!r} scores; insert them with "
                f"neuslice.add_mutation_scores(profile, scores)."
            ) from None
        return s.sum(0) if category is None else s[category]
    count, mean, m2 = get("count"), get("mean"), get("m2")
    if category is None:
        n = count.sum()
        total_mean = (mean * count.unsqueeze(1)).sum(0) / n.clamp(min=1)
        dev = mean - total_mean
        n_, mean_, m2_ = n, total_mean, m2.sum(0) + (dev * dev * count.unsqueeze(1)).sum(0)
    else:
        n_, mean_, m2_ = count[category], mean[category], m2[category]
    if metric == "avg":
        return mean_
    if metric == "var":
        return m2_ / (n_ - 1).clamp(min=1)
    if metric == "ens":
        return minmax(score(get, "avg", category)) + minmax(score(get, "var", category))
    if metric == "taylor":
        if category is None:
            s, b = get("taylor_all"), get("taylor_all_batches")
        else:
            s, b = get("taylor")[category], get("taylor_batches")[category]
        return s / b.clamp(min=1)
    sums = get(metric)  # deeplift, taylor_act: per-sample means
    if category is None:
        return sums.sum(0) / n_.clamp(min=1)
    return sums[category] / n_.clamp(min=1)


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Neurons by decreasing |score| (ties: lower index first; NaN last) -- the order slices use.

    Magnitude, not the signed value: a silent neuron (score exactly 0) must rank after every
    live one, and DeepLIFT's signed mean put dead neurons ahead of live neurons with negative
    scores. For the non-negative metrics (var, taylor, taylor_act, ens; avg after a ReLU) the
    order is unchanged.
    """
    mag = scores.abs()
    mag = torch.where(torch.isnan(mag), torch.full_like(mag, -1.0), mag)
    return torch.argsort(mag, descending=True, stable=True)
