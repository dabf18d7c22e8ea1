"""Streaming per-category statistics with bounded memory.

Every accumulator takes batches of per-sample values with their category labels and merges
them exactly (Chan et al.'s pairwise update of centred moments), in float64, so that the result
does not depend on how the data was batched and no precision is lost to ``Σxxᵀ − nμμᵀ``.
"""

from __future__ import annotations

import torch

__all__ = ["MomentAccumulator", "CovarianceAccumulator", "MinibatchHSICAccumulator", "merge_moments"]

ACC = torch.float64


def merge_moments(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge (count, mean, sum of squared deviations) of two disjoint sample sets.

    Works element-wise and broadcasts over leading category dimensions; counts may be zero.
    """
    n = n_a + n_b
    safe = torch.where(n > 0, n, torch.ones_like(n)).to(ACC)
    w = (n_b.to(ACC) / safe)
    while w.dim() < mean_a.dim():
        w = w.unsqueeze(-1)
    delta = mean_b - mean_a
    mean = mean_a + delta * w
    cross = (n_a.to(ACC) * n_b.to(ACC) / safe)
    while cross.dim() < m2_a.dim():
        cross = cross.unsqueeze(-1)
    m2 = m2_a + m2_b + delta * delta * cross
    return n, mean, m2


class MomentAccumulator:
    """Per-category count, mean and M2 (sum of squared deviations) of a ``(d,)`` vector."""

    def __init__(self, num_classes: int, dim: int, device=None):
        self.count = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.mean = torch.zeros(num_classes, dim, dtype=ACC, device=device)
        self.m2 = torch.zeros(num_classes, dim, dtype=ACC, device=device)

    def update(self, values: torch.Tensor, labels: torch.Tensor) -> None:
        values = values.to(ACC)
        c = self.count.shape[0]
        n_b = torch.bincount(labels, minlength=c)
        sums = torch.zeros_like(self.mean).index_add_(0, labels, values)
        mean_b = sums / n_b.clamp(min=1).unsqueeze(1).to(ACC)
        dev = values - mean_b[labels]
        m2_b = torch.zeros_like(self.m2).index_add_(0, labels, dev * dev)
        self.count, self.mean, self.m2 = merge_moments(
            self.count, self.mean, self.m2, n_b, mean_b, m2_b)

    def total(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Count, mean and M2 over all categories together (exact merge)."""
        n, mean, m2 = self.count[:1] * 0, self.mean[:1] * 0, self.m2[:1] * 0
        for k in range(self.count.shape[0]):
            n, mean, m2 = merge_moments(n, mean, m2, self.count[k:k + 1], self.mean[k:k + 1],
                                        self.m2[k:k + 1])
        return n[0], mean[0], m2[0]


class CovarianceAccumulator:
    """Per-category mean and co-moment matrix ``Σ (x-μ)(x-μ)ᵀ`` of ``(p,)`` feature vectors.

    The batch co-moment is formed from batch-centred values (matmul in ``compute_dtype``, TF32
    off) and merged into float64 accumulators.
    """

    def __init__(self, num_classes: int, dim: int, device=None, compute_dtype=torch.float32):
        self.count = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.mean = torch.zeros(num_classes, dim, dtype=ACC, device=device)
        self.comoment = torch.zeros(num_classes, dim, dim, dtype=ACC, device=device)
        self.compute_dtype = compute_dtype

    def update(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        for k in torch.unique(labels).tolist():
            x = feats[labels == k]
            n_b = x.shape[0]
            mean_b = x.to(ACC).mean(0)
            xc = (x.to(ACC) - mean_b).to(self.compute_dtype)
            m2_b = (xc.T @ xc).to(ACC)
            n_a = int(self.count[k])
            n = n_a + n_b
            delta = mean_b - self.mean[k]
            self.comoment[k] += m2_b + torch.outer(delta, delta) * (n_a * n_b / n)
            self.mean[k] += delta * (n_b / n)
            self.count[k] = n


class MinibatchHSICAccumulator:
    """Average of unbiased neuron-HSIC matrices over category minibatches of fixed size.

    Samples of each category are buffered until ``batch_size`` of them are there, so the result
    does not depend on how the loader batched the data; memory is bounded by
    ``num_classes * batch_size`` samples. (Nguyen, Raghu & Kornblith 2021.)
    """

    MIN_SAMPLES = 4  # the unbiased estimator needs n >= 4

    def __init__(self, num_classes: int, dim: int, batch_size: int, hsic_fn, device=None):
        if batch_size < self.MIN_SAMPLES:
            raise ValueError(f"cka_batch must be >= {self.MIN_SAMPLES}, got {batch_size}")
        self.batch_size = batch_size
        self.hsic_fn = hsic_fn
        self.buffers: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
        self.buffered = [0] * num_classes
        self.weight = torch.zeros(num_classes, dtype=ACC, device=device)
        self.total = torch.zeros(num_classes, dim, dim, dtype=ACC, device=device)

    def _flush(self, k: int, n: int) -> None:
        data = torch.cat(self.buffers[k])
        chunk, rest = data[:n], data[n:]
        self.buffers[k] = [rest] if rest.shape[0] else []
        self.buffered[k] = rest.shape[0]
        self.total[k] += self.hsic_fn(chunk).to(ACC) * n
        self.weight[k] += n

    def update(self, acts: torch.Tensor, labels: torch.Tensor) -> None:
        for k in torch.unique(labels).tolist():
            x = acts[labels == k]
            self.buffers[k].append(x)
            self.buffered[k] += x.shape[0]
            while self.buffered[k] >= self.batch_size:
                self._flush(k, self.batch_size)

    def finalize(self) -> None:
        """Use the partial last minibatch of each category if it is large enough."""
        for k, n in enumerate(self.buffered):
            if n >= self.MIN_SAMPLES:
                self._flush(k, n)
            self.buffers[k], self.buffered[k] = [], 0

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight.clamp(min=1).view(-1, 1, 1)
        return self.total / w, self.weight
