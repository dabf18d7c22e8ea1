"""What lets a profiling pass run at scale: the memory estimate and budget, the reduction over
``torch.distributed`` ranks, checkpoints, and the category-grouped sampler."""

from .memory import MemoryBudgetError, MemoryEstimate
from .sampler import CategoryGroupedSampler

__all__ = ["CategoryGroupedSampler", "MemoryBudgetError", "MemoryEstimate"]
