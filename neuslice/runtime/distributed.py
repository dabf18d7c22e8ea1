"""Reducing profiling statistics over the ranks of ``torch.distributed`` (gloo, nccl, ...).

Every statistic of :func:`neuslice.profile` is a sum or a set of centred moments, so each rank
profiles its own shard of the data and the ranks combine their accumulators exactly:

* sums: one flat ``all_reduce`` per dtype and device;
* moments ``(n, mean, M)`` (``M`` a vector of squared deviations or a co-moment matrix):
  ``μ = Σ nᵣ μᵣ / Σ nᵣ`` and ``M = Σ [Mᵣ + nᵣ (μᵣ-μ)(μᵣ-μ)ᵀ]`` -- two all-reduces, no gather,
  so memory does not grow with the number of ranks.

A rank that dies or stops answering makes the collectives on the other ranks fail after the
process group's timeout (``init_process_group(timeout=...)``); that failure is re-raised as a
:class:`DistributedProfileError` saying which step failed, instead of a hang or a bare backend
error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Reducer", "DistributedProfileError", "active_reducer"]


class DistributedProfileError(RuntimeError):
    """A collective operation of the distributed profile failed (a rank died or timed out)."""


def active_reducer(distributed: bool | None, group=None) -> "Reducer | None":
    """A :class:`Reducer` when profiling should combine ranks, else None.

    ``distributed=None`` means: when ``torch.distributed`` is initialised with more than one
    rank. ``True`` insists on it (clear error if it is not initialised).
    """
    import torch.distributed as dist

    ready = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = ready and dist.get_world_size(group) > 1
    if not distributed:
        return None
    if not ready:
        raise RuntimeError(
            "distributed=True but torch.distributed is not initialised: launch with torchrun "
            "and call torch.distributed.init_process_group('gloo' or 'nccl') before profiling."
        )
    return Reducer(group)


class Reducer:
    """Exact reductions of accumulators across the ranks of a process group."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        backend = dist.get_backend(group)
        # nccl only reduces CUDA tensors; gloo reduces CPU ones (and CUDA ones by copying)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if backend == "nccl"
            else torch.device("cpu")
        )

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # backend errors differ between gloo/nccl/versions
            raise DistributedProfileError(
                f"neuslice.profile on rank {self.rank} of {self.world}: {what} failed -- another "
                f"rank probably died, raised an error or is more than the process group's timeout "
                f"behind (set it with init_process_group(timeout=...)). Backend error: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def gather_objects(self, obj, what: str = "exchanging the configuration") -> list:
        out = [None] * self.world
        self._call(what, self.dist.all_gather_object, out, obj, group=self.group)
        return out

    def sum_(self, tensors: Sequence[torch.Tensor], what: str = "summing statistics") -> None:
        """In-place all-reduce (sum) of every tensor, one flat buffer per dtype."""
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault(t.dtype, []).append(t)
        for dtype, ts in groups.items():
            flat = torch.cat([t.reshape(-1).to(self.device) for t in ts])
            self._call(what, self.dist.all_reduce, flat, group=self.group)
            offset = 0
            for t in ts:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n

    def max_(self, t: torch.Tensor, what: str = "agreeing on progress") -> torch.Tensor:
        """Element-wise maximum over ranks (in place)."""
        flat = t.reshape(-1).to(self.device)
        self._call(what, self.dist.all_reduce, flat, op=self.dist.ReduceOp.MAX, group=self.group)
        t.copy_(flat.view_as(t))
        return t

    def moments_(
        self,
        items: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        what: str = "merging moments",
    ) -> None:
        """In-place merge of ``(count, mean, M)`` triples over ranks.

        ``count`` has shape ``(k,)``; ``mean`` ``(k, p)``; ``M`` ``(k, p)`` (squared
        deviations) or ``(k, p, p)`` (co-moments). Counts may be zero.
        """

        def col(t, like):  # (k,) -> broadcastable against ``like``
            return t.view(-1, *([1] * (like.dim() - 1)))

        counts = [n.to(torch.float64) for n, _, _ in items]
        totals = [n.clone() for n in counts]
        weighted = [mean * col(n, mean) for n, (_, mean, _) in zip(counts, items)]
        self.sum_(totals + weighted, what)
        means = [w / col(tot.clamp(min=1), w) for w, tot in zip(weighted, totals)]
        for n, mu, (_, mean, m2) in zip(counts, means, items):
            dev = mean - mu
            corr = dev.unsqueeze(-1) * dev.unsqueeze(-2) if m2.dim() == 3 else dev * dev
            m2.add_(corr * col(n, m2))
        self.sum_([m2 for _, _, m2 in items], what)
        for (n, mean, _), tot, mu in zip(items, totals, means):
            n.copy_(tot.to(n.dtype))
            mean.copy_(mu)
