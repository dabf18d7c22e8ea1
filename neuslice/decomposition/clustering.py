"""Ward clustering of a layer's units by their incoming weights (Incite's mutant groups).

Incite does not mutate every unit on its own: per layer, the units are grouped with
scikit-learn's ``AgglomerativeClustering(n_clusters=ceil(n / cluster_size))`` (Ward linkage,
Euclidean distance) and one mutant scales a whole cluster. A unit's features are its incoming
weights followed by its bias (tiled over the kernel positions for a convolution channel), each
feature min-max scaled across the layer's units.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..layers import find_layers

__all__ = ["unit_features", "cluster_layer", "cluster_units", "check_cluster_size"]

INSTALL_HINT = "pip install 'neuslice[decompose]'  (or: pip install scikit-learn)"


def check_cluster_size(cluster_size) -> int:
    if isinstance(cluster_size, bool) or not isinstance(cluster_size, int):
        raise TypeError(
            f"cluster_size must be a positive int (average units per cluster), got {cluster_size!r}"
        )
    if cluster_size < 1:
        raise ValueError(
            f"cluster_size must be >= 1 (1 = every unit is its own cluster), got {cluster_size}"
        )
    return cluster_size


def unit_features(module: nn.Module) -> torch.Tensor:
    """``(units, features)`` float64: each unit's incoming weights and bias, min-max scaled.

    A dense unit has ``in + 1`` features; a convolution channel ``(c_in + 1) * kh * kw`` (its
    filter, then its bias repeated over the kernel positions). A feature constant across the
    units scales to 0 (like scikit-learn's ``MinMaxScaler``).
    """
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"expected an nn.Linear or nn.Conv2d, got {type(module).__name__}")
    w = module.weight.detach().to(device="cpu", dtype=torch.float64)
    n = w.shape[0]
    positions = w[0, 0].numel() if w.dim() > 2 else 1
    bias = module.bias
    b = (
        torch.zeros(n, dtype=torch.float64)
        if bias is None
        else bias.detach().to(device="cpu", dtype=torch.float64)
    )
    feats = torch.cat([w.reshape(n, -1), b.unsqueeze(1).expand(n, positions)], dim=1)
    lo, hi = feats.min(0).values, feats.max(0).values
    span = hi - lo
    return torch.where(
        span > 0, (feats - lo) / torch.where(span > 0, span, 1.0), torch.zeros_like(feats)
    )


def _import_agglomerative():
    try:
        from sklearn.cluster import AgglomerativeClustering
    except ImportError as exc:
        raise ImportError(
            f"Incite's unit clustering needs scikit-learn: {INSTALL_HINT}. "
            f"cluster_size=1 (one mutant group per unit) needs no clustering."
        ) from exc
    return AgglomerativeClustering


def cluster_layer(module: nn.Module, cluster_size: int = 10) -> torch.Tensor:
    """Cluster label (``LongTensor``, one per unit) of ``module``'s units.

    Labels are numbered by first appearance (unit 0 is in cluster 0), so they do not depend on
    scikit-learn's internal numbering. ``ceil(n / cluster_size)`` clusters; ``cluster_size=1``
    puts every unit in its own cluster and needs no scikit-learn; a layer of at most
    ``cluster_size`` units is one cluster.
    """
    cluster_size = check_cluster_size(cluster_size)
    n = module.weight.shape[0]
    k = math.ceil(n / cluster_size)
    if k >= n:
        return torch.arange(n)
    if k == 1:
        return torch.zeros(n, dtype=torch.long)
    agglomerative = _import_agglomerative()
    labels = agglomerative(n_clusters=k).fit(unit_features(module).numpy()).labels_
    first: dict[int, int] = {}
    return torch.tensor([first.setdefault(int(c), len(first)) for c in labels], dtype=torch.long)


def cluster_units(
    model: nn.Module, layers: Sequence[str] | None = None, cluster_size: int = 10
) -> dict[str, torch.Tensor]:
    """Cluster labels of every mutated layer (default: every ``Linear``/``Conv2d`` but the head)."""
    cluster_size = check_cluster_size(cluster_size)
    return {l.name: cluster_layer(l.module, cluster_size) for l in find_layers(model, layers)}
