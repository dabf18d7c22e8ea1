"""Streaming per-category statistics with bounded memory.

Every accumulator takes batches of per-sample values with their category labels and merges
them exactly (Chan et al.'s pairwise update of centred moments), in float64, so that the result
does not depend on how the data was batched and no precision is lost to ``Σxxᵀ − nμμᵀ``.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch

__all__ = [
    "MomentAccumulator",
    "CovarianceAccumulator",
    "MinibatchHSICAccumulator",
    "merge_moments",
]


class _Stateful:
    """``state_dict`` / ``load_state_dict`` over the attributes named in ``_STATE``."""

    _STATE: tuple[str, ...] = ()

    def state_dict(self) -> dict:
        out = {}
        for key in self._STATE:
            v = getattr(self, key)
            out[key] = (
                [list(b) for b in v]
                if key == "buffers"
                else (list(v) if isinstance(v, list) else v)
            )
        return out

    def load_state_dict(self, state: dict) -> None:
        for key in self._STATE:
            if key not in state:  # handled by the subclass
                continue
            cur, new = getattr(self, key), state[key]
            if torch.is_tensor(cur):
                if not torch.is_tensor(new) or new.shape != cur.shape or new.dtype != cur.dtype:
                    raise ValueError(
                        f"state entry {key!r} does not fit this accumulator "
                        f"(expected {cur.dtype} {tuple(cur.shape)})."
                    )
                new = new.to(cur.device)
            elif key == "buffers":
                new = [[t.to(self.device) for t in b] for b in new]
            else:
                new = list(new)
            setattr(self, key, new)


ACC = torch.float64

_local = threading.local()


@contextlib.contextmanager
def scratch_space() -> Iterator[None]:
    """Within the block (of this thread), :func:`scratch` reuses its buffers across calls: no
    fresh allocation (and first-touch page faults) for each temporary of each batch. They are
    released at the end of the outermost block."""
    outer = getattr(_local, "buffers", None)
    if outer is None:
        _local.buffers = {}
    try:
        yield
    finally:
        if outer is None:
            _local.buffers = None


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised ``shape`` tensor: inside :func:`scratch_space` and on the CPU, a view of
    a buffer kept under ``name`` (valid until the next call with that name); else a fresh one
    (an accelerator's caching allocator already reuses freed memory without page faults)."""
    buffers = getattr(_local, "buffers", None)
    device = torch.device(device if device is not None else "cpu")
    if buffers is None or device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    key = (name, dtype, device)
    n = math.prod(shape)
    buf = buffers.get(key)
    if buf is None or buf.numel() < n:
        buf = buffers[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def by_category(values: torch.Tensor, labels: torch.Tensor):
    """``(category, a copy of its rows of values)`` for each category present, in increasing
    order, each category's rows in their order in the batch (one stable sort of the labels
    instead of a mask per category; separate copies, so no buffer holds on to the batch)."""
    cats, counts = torch.unique(labels, return_counts=True)
    if cats.numel() == 1:
        return [(int(cats[0]), values.clone())]
    order = torch.argsort(labels, stable=True).split(counts.tolist())
    return [(k, values.index_select(0, idx)) for k, idx in zip(cats.tolist(), order)]


def merge_moments(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge (count, mean, sum of squared deviations) of two disjoint sample sets.

    Works element-wise and broadcasts over leading category dimensions; counts may be zero.
    """
    n = n_a + n_b
    safe = torch.where(n > 0, n, torch.ones_like(n)).to(ACC)
    w = n_b.to(ACC) / safe
    while w.dim() < mean_a.dim():
        w = w.unsqueeze(-1)
    delta = mean_b - mean_a
    mean = mean_a + delta * w
    cross = n_a.to(ACC) * n_b.to(ACC) / safe
    while cross.dim() < m2_a.dim():
        cross = cross.unsqueeze(-1)
    m2 = m2_a + m2_b + delta * delta * cross
    return n, mean, m2


class MomentAccumulator(_Stateful):
    """Per-category count, mean and M2 (sum of squared deviations) of a ``(d,)`` vector."""

    _STATE = ("count", "mean", "m2")

    def __init__(self, num_classes: int, dim: int, device=None):
        self.count = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.mean = torch.zeros(num_classes, dim, dtype=ACC, device=device)
        self.m2 = torch.zeros(num_classes, dim, dtype=ACC, device=device)

    def update(self, values: torch.Tensor, labels: torch.Tensor) -> None:
        if values.dtype != ACC:  # widened in reused memory
            values = scratch("moments.values", values.shape, ACC, values.device).copy_(values)
        # only the categories present in the batch are touched: O(batch·d), not O(C·d)
        cats, inv, n_b = torch.unique(labels, return_inverse=True, return_counts=True)
        sums = torch.zeros(
            cats.numel(), values.shape[1], dtype=ACC, device=values.device
        ).index_add_(0, inv, values)
        mean_b = sums / n_b.unsqueeze(1).to(ACC)
        dev = torch.index_select(  # -(x - mean): the same squares
            mean_b, 0, inv, out=scratch("moments.dev", values.shape, ACC, values.device)
        ).sub_(values)
        m2_b = torch.zeros_like(sums).index_add_(0, inv, dev.mul_(dev))
        n, mean, m2 = merge_moments(
            self.count[cats], self.mean[cats], self.m2[cats], n_b, mean_b, m2_b
        )
        self.count[cats], self.mean[cats], self.m2[cats] = n, mean, m2

    def total(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Count, mean and M2 over all categories together (exact merge)."""
        n, mean, m2 = self.count[:1] * 0, self.mean[:1] * 0, self.m2[:1] * 0
        for k in range(self.count.shape[0]):
            n, mean, m2 = merge_moments(
                n, mean, m2, self.count[k : k + 1], self.mean[k : k + 1], self.m2[k : k + 1]
            )
        return n[0], mean[0], m2[0]


class CovarianceAccumulator(_Stateful):
    """Per-category mean and co-moment matrix ``Σ (x-μ)(x-μ)ᵀ`` of ``(p,)`` feature vectors.

    Samples are buffered per category (``buffer_size`` of them) so that each ``p x p`` update
    serves many samples, then added as sums of values shifted by the category's first sample
    (the shifted-data algorithm: with the shift near the mean nothing cancels badly), with the
    matmul in ``compute_dtype`` (TF32 off) and the sums in float64. A category that never
    filled its buffer is finished from its samples instead (:meth:`block_norms_`): centred and
    reduced in float64, with no ``p x p`` co-moment at all when that is cheaper.
    """

    _STATE = ("count", "shift", "s1", "buffers", "buffered")  # and s2 (state_dict)

    def __init__(
        self,
        num_classes: int,
        dim: int,
        device=None,
        compute_dtype=torch.float32,
        buffer_size: int = 256,
        storage: torch.Tensor | None = None,
    ):
        self.device = device
        # (C, p, p) float64 memory the co-moments may live in (the caller's results: the block
        # norms of a category with one position per neuron are computed in place there)
        self._storage = storage
        self.count = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.shift = torch.zeros(num_classes, dim, dtype=ACC, device=device)
        self.s1 = torch.zeros(num_classes, dim, dtype=ACC, device=device)
        # per category (p, p), allocated when the category first flushes
        self._s2: list[torch.Tensor | None] = [None] * num_classes
        self.compute_dtype = compute_dtype
        self.buffer_size = buffer_size
        self.buffers: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
        self.buffered = [0] * num_classes

    def update(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        for k, x in by_category(feats, labels):
            self.buffers[k].append(x)
            self.buffered[k] += x.shape[0]
            if self.buffered[k] >= self.buffer_size:
                self._flush(k)

    def _flush(self, k: int) -> None:
        parts = self.buffers[k]
        if not parts:
            return
        self.buffers[k], self.buffered[k] = [], 0
        n, p = sum(t.shape[0] for t in parts), self.s1.shape[1]
        dev = self.s1.device
        if self.count[k] == 0:
            self.shift[k] = parts[0][0]
        # the shifted values in float64, in reused memory
        d = scratch("cov.shifted", (n, p), ACC, dev)
        i = 0
        for t in parts:
            d[i : i + t.shape[0]].copy_(t)
            i += t.shape[0]
        d.sub_(self.shift[k])
        self.s1[k] += d.sum(0)
        if self.compute_dtype != ACC:
            d = scratch("cov.low", (n, p), self.compute_dtype, dev).copy_(d)
        s2 = self._s2[k]
        if s2 is None:
            # the caller's memory when given (p x p float64 per category), else a fresh tensor
            s2 = self._s2[k] = (
                self._storage[k]
                if self._storage is not None
                else torch.empty(p, p, dtype=ACC, device=dev)
            )
            if self.compute_dtype == ACC:
                torch.mm(d.T, d, out=s2)
            else:
                s2.copy_(torch.mm(d.T, d, out=scratch("cov.product", (p, p), d.dtype, dev)))
        elif self.compute_dtype == ACC:
            s2.addmm_(d.T, d)
        else:  # the product in compute_dtype, widened in reused memory, added into the sums
            prod = torch.mm(d.T, d, out=scratch("cov.product", (p, p), d.dtype, dev))
            s2.add_(scratch("cov.wide", (p, p), ACC, dev).copy_(prod))
        self.count[k] += n

    def finalize(self) -> None:
        for k in range(len(self.buffers)):
            self._flush(k)

    @property
    def storage(self) -> torch.Tensor | None:
        """The memory the co-moments may live in (None: their own)."""
        return self._storage

    @property
    def mean(self) -> torch.Tensor:
        return self.shift + self.s1 / self.count.clamp(min=1).unsqueeze(1).to(ACC)

    @property
    def s2(self) -> torch.Tensor:
        """``Σ (x-shift)(x-shift)ᵀ`` per category, ``(C, p, p)`` (zeros where none flushed)."""
        p = self.s1.shape[1]
        return torch.stack(
            [
                t if t is not None else torch.zeros(p, p, dtype=ACC, device=self.s1.device)
                for t in self._s2
            ]
        )

    @property
    def comoment(self) -> torch.Tensor:
        """``Σ (x-μ)(x-μ)ᵀ`` per category (call :meth:`finalize` first)."""
        n = self.count.clamp(min=1).to(ACC).view(-1, 1, 1)
        return self.s2 - self.s1.unsqueeze(2) * self.s1.unsqueeze(1) / n

    @staticmethod
    def samples_cheaper(n: int, d: int, s: int) -> bool:
        """Whether ``n`` samples of ``d`` neurons x ``s`` positions give the block norms faster
        from the samples (per-neuron ``n x n`` Grams, ``d n² (s + d)`` flops) than from the
        ``p x p`` co-moment (``n p²`` flops plus a few passes over ``p²`` float64 values); for
        ``s = 1`` both are ``Xᵀ X``, without the co-moment's rounding to float32."""
        p = d * s
        return s == 1 or d * n * n * (s + d) <= p * p * (n + 200)

    def _block_norms_from_samples(self, k: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`block_norms_` of a category whose samples are all still buffered: exact
        float64 centring, then the block norms of the centred samples (no co-moment)."""
        from .. import ops

        x = torch.cat(self.buffers[k]).to(ACC)
        self.buffers[k], self.buffered[k] = [], 0
        n = x.shape[0]
        self.count[k] += n
        x = x - x[:1]
        x -= x.mean(dim=0, keepdim=True)
        s = x.shape[1] // d
        m = ops.block_gram_norms(x.view(n, d, s), "feature" if s == 1 else "sample")
        m = (m + m.T).mul_(0.5 / max(n - 1, 1) ** 2)  # exactly symmetric
        return m, self.count[k].to(ACC)

    def block_norms_(self, k: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, n)`` of category ``k``: ``M[i, j]`` = squared Frobenius norm of the ``(i, j)``
        block (``d`` blocks of ``p / d`` positions) of the covariance; consumes the category's
        statistics (its co-moment in place; nothing may read ``k`` afterwards). A category whose
        samples are all still buffered and few is computed from them directly."""
        p = self.s1.shape[1]
        s = p // d
        if (
            self._s2[k] is None
            and int(self.count[k]) == 0
            and self.buffered[k] > 0
            and self.samples_cheaper(self.buffered[k], d, s)
        ):
            return self._block_norms_from_samples(k, d)
        self._flush(k)
        n = self.count[k].to(ACC)
        cm = self._s2[k]
        if cm is None:  # no sample: an all-zero covariance
            return torch.zeros(d, d, dtype=ACC, device=self.s1.device), n
        self._s2[k] = None
        cm.addr_(self.s1[k], self.s1[k], alpha=-1.0 / max(float(n), 1.0))  # in place: no p x p temp
        m = cm.square_() if s == 1 else cm.view(d, s, d, s).square_().sum(dim=(1, 3))
        return m.div_((n - 1).clamp(min=1).square()), n

    def set_moments(self, count: torch.Tensor, mean: torch.Tensor, comoment: torch.Tensor) -> None:
        """Replace the (finalized) statistics by merged ones, e.g. after an all-reduce."""
        self.count, self.shift = count.clone(), mean.clone()
        self.s1 = torch.zeros_like(self.s1)
        self._s2 = [t.clone() for t in comoment]

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["s2"] = None if all(t is None for t in self._s2) else self.s2
        return out

    def load_state_dict(self, state: dict) -> None:
        s2 = state.get("s2")
        c, p = self.s1.shape
        if s2 is not None and (
            not torch.is_tensor(s2) or tuple(s2.shape) != (c, p, p) or s2.dtype != ACC
        ):
            raise ValueError(
                f"state entry 's2' does not fit this accumulator (expected {ACC} {(c, p, p)})."
            )
        super().load_state_dict({k: v for k, v in state.items() if k != "s2"})
        self._s2 = (
            [None] * c
            if s2 is None
            else [t.to(self.s1.device) if int(n) > 0 else None for t, n in zip(s2, self.count)]
        )


class MinibatchHSICAccumulator(_Stateful):
    """Average of unbiased neuron-HSIC matrices over category minibatches of fixed size.

    Samples of each category are buffered until ``batch_size`` of them are there, so the result
    does not depend on how the loader batched the data; memory is bounded by
    ``num_classes * batch_size`` samples. (Nguyen, Raghu & Kornblith 2021.) ``hsic_fn(x, out)``
    returns the HSIC matrix of the samples ``x``, written into ``out`` (float64) if it can.
    """

    MIN_SAMPLES = 4  # the unbiased estimator needs n >= 4
    _STATE = ("buffers", "buffered", "weight", "total")

    def __init__(
        self,
        num_classes: int,
        dim: int,
        batch_size: int,
        hsic_fn,
        device=None,
        storage: torch.Tensor | None = None,
    ):
        self.device = device
        if batch_size < self.MIN_SAMPLES:
            raise ValueError(f"cka_batch must be >= {self.MIN_SAMPLES}, got {batch_size}")
        self.batch_size = batch_size
        self.hsic_fn = hsic_fn
        self.dim = dim
        self.buffers: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
        self.buffered = [0] * num_classes
        self.weight = torch.zeros(num_classes, dtype=ACC, device=device)
        # per category Σ n·HSIC, (d, d), allocated at its first minibatch (None: zeros); once
        # ``total`` is read, views of that (C, d, d) tensor
        self._total: list[torch.Tensor | None] = [None] * num_classes
        self._dense: torch.Tensor | None = None
        # categories whose sum holds a single minibatch's HSIC, not yet multiplied by its size
        # (``weight``): most categories of a small data set never need the multiply and divide
        self._unscaled = [False] * num_classes
        # (C, d, d) float64 memory the sums may live in (the caller's results, divided in place
        # by ``result_of(k, out=storage[k])``)
        self._storage = storage

    @property
    def storage(self) -> torch.Tensor | None:
        """The memory the sums may live in (None: their own)."""
        return self._storage

    def _scale(self, k: int) -> None:
        if self._unscaled[k]:
            self._total[k].mul_(self.weight[k])
            self._unscaled[k] = False

    @property
    def total(self) -> torch.Tensor:
        """``(C, d, d)`` sums of ``n·HSIC`` per category (zeros where none flushed)."""
        for k in range(len(self._total)):
            self._scale(k)
        if self._dense is None:
            dense = torch.zeros(
                len(self._total), self.dim, self.dim, dtype=ACC, device=self.weight.device
            )
            for k, t in enumerate(self._total):
                if t is not None:
                    dense[k] = t
            self.total = dense
        return self._dense

    @total.setter
    def total(self, value: torch.Tensor) -> None:
        self._dense = value
        self._total = list(value.unbind(0))
        self._unscaled = [False] * len(self._total)

    def _flush(self, k: int, n: int) -> None:
        data = torch.cat(self.buffers[k])
        chunk, rest = data[:n], data[n:]
        self.buffers[k] = [rest] if rest.shape[0] else []
        self.buffered[k] = rest.shape[0]
        if self._total[k] is None:  # the HSIC itself, in float64 (the result memory if given)
            out = (
                self._storage[k]
                if self._storage is not None and self._dense is None
                else torch.empty(self.dim, self.dim, dtype=ACC, device=self.weight.device)
            )
            m = self.hsic_fn(chunk, out)
            self._total[k] = m if m.data_ptr() == out.data_ptr() else out.copy_(m)
            self._unscaled[k] = True
        else:
            self._scale(k)
            self._total[k].add_(self.hsic_fn(chunk, None), alpha=n)
        self.weight[k] += n

    def update(self, acts: torch.Tensor, labels: torch.Tensor) -> None:
        for k, x in by_category(acts, labels):
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

    def result_of(self, k: int, out: torch.Tensor | None = None, normalise: bool = True):
        """``result()`` of category ``k`` alone (the matrix written into ``out`` if given);
        ``normalise=False``: a positive multiple of it, as it is held (enough for scale-free
        uses such as CKA curves)."""
        t, w = self._total[k], self.weight[k]
        if t is not None and not normalise and out is None:
            return t, w
        if t is None:
            if out is None:
                return torch.zeros(self.dim, self.dim, dtype=ACC, device=w.device), w
            return out.zero_(), w
        if self._unscaled[k]:
            return (t if out is None or out.data_ptr() == t.data_ptr() else out.copy_(t)), w
        return torch.div(t, w.clamp(min=1), out=out), w
