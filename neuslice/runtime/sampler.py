"""``CategoryGroupedSampler``: data sorted by category (and sharded by rank) for the
grouped-order profiling pass."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

__all__ = ["CategoryGroupedSampler"]


class CategoryGroupedSampler(Sampler[int]):
    """Dataset indices sorted by category, for ``profile(..., category_order="grouped")``.

    Categories come in increasing order; within a category the order is shuffled (seeded,
    changed by :meth:`set_epoch`) or kept. With several ranks, the ``j``-th sample of every
    category goes to rank ``j % num_replicas``, so each rank's shard is itself grouped and
    every rank sees every category (like ``DistributedSampler``, but without padding: shards
    may differ in length by at most one sample per category).

    Args:
        labels: the class index of every dataset item (a 1-D integer tensor or sequence).
        num_replicas, rank: the process group's size and this rank; default: from
            ``torch.distributed`` when initialised, else 1 and 0.
    """

    def __init__(
        self,
        labels,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ):
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be a 1-D integer sequence, got dtype {labels.dtype}, "
                f"shape {tuple(labels.shape)}"
            )
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError("labels must be non-negative class indices")
        if num_replicas is None or rank is None:
            import torch.distributed as dist

            ready = dist.is_available() and dist.is_initialized()
            num_replicas = (
                num_replicas
                if num_replicas is not None
                else (dist.get_world_size() if ready else 1)
            )
            rank = rank if rank is not None else (dist.get_rank() if ready else 0)
        if not (
            isinstance(num_replicas, int)
            and num_replicas >= 1
            and isinstance(rank, int)
            and 0 <= rank < num_replicas
        ):
            raise ValueError(
                f"need num_replicas >= 1 and 0 <= rank < num_replicas, got "
                f"{num_replicas} and {rank}"
            )
        self.labels = labels.long()
        self.num_replicas, self.rank = num_replicas, rank
        self.shuffle, self.seed, self.epoch = shuffle, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _indices(self) -> list[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        out: list[int] = []
        for c in torch.unique(self.labels).tolist():
            idx = torch.nonzero(self.labels == c).flatten()
            if self.shuffle:
                idx = idx[torch.randperm(idx.numel(), generator=g)]
            out += idx[self.rank :: self.num_replicas].tolist()
        return out

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        counts = torch.bincount(self.labels) if self.labels.numel() else torch.zeros(0)
        return int(
            sum(
                (int(n) - self.rank + self.num_replicas - 1) // self.num_replicas
                for n in counts.tolist()
                if n > self.rank
            )
        )
