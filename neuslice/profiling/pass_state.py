"""The state of one profiling pass as it streams: layer states, finished categories (grouped
order), batches consumed, the rank reductions, and what a checkpoint stores of it."""

from __future__ import annotations

import torch

from ..runtime import checkpoint as ckpt
from ..runtime.memory import GiB
from .config import PassConfig
from .layer_state import LayerState
from .planning import budget_error
from .stats import ACC

__all__ = ["PassState", "resume_blob"]


class PassState:
    """Progress of one profiling pass: states, finished categories, batches consumed."""

    def __init__(self, states: dict[str, LayerState], cfg: PassConfig, reducer):
        self.states, self.cfg, self.reducer = states, cfg, reducer
        self.frontier = 0  # grouped: categories < frontier are finished
        self.last_label = -1
        self.planned_open = 2
        self.rounds = 0  # synchronised steps (several ranks, grouped order)
        self.batches = 0
        self.digest = ""

    def _reduce(self, items) -> None:
        """All-reduce the ``(sums, moments, after)`` of ``LayerState.reduce_items``."""
        if self.reducer is not None:
            self.reducer.sum_([t for s, _, _ in items for t in s])
            self.reducer.moments_([m for _, ms, _ in items for m in ms])
            for _, _, after in items:
                if after is not None:
                    after()

    def check_sorted(self, y: torch.Tensor, index: int) -> None:
        """Grouped order: labels never decrease along the stream."""
        prev = self.last_label
        if y.numel() and (bool((y[1:] < y[:-1]).any()) or int(y[0]) < prev):
            raise ValueError(
                f"category_order='grouped' needs the data sorted by category, but the labels "
                f"decrease in batch {index} (previous label {prev}, batch labels start "
                f"{y[:8].tolist()}). Sort the data with neuslice.runtime.CategoryGroupedSampler or "
                f"use category_order='any'."
            )
        if y.numel():
            self.last_label = int(y[-1])

    def finish_categories(self, upto: int) -> None:
        """Grouped order: finish every category below ``upto``."""
        for c in range(self.frontier, upto):
            if not self._has_data(c):
                continue
            accs = {n: st.take(c) for n, st in self.states.items()}
            if self.reducer is not None:
                self._reduce(
                    [
                        st.reduce_items(accs[n], slice(c, c + 1), whole=False)
                        for n, st in self.states.items()
                    ]
                )
            for n, st in self.states.items():
                st.store(accs[n], [c])
        self.frontier = max(self.frontier, upto)

    def _has_data(self, c: int) -> bool:
        """Whether any rank saw category ``c`` (absent categories cost nothing to finish)."""
        st = next(iter(self.states.values()))
        seen = torch.tensor([float(st.moments.count[c] > 0)], dtype=ACC)
        if self.reducer is not None:
            self.reducer.sum_([seen], "checking which categories have data")
        return bool(seen > 0)

    def check_open(self, budget_gb: float, plan) -> None:
        """Grouped order: re-check the budget when a batch opens more categories than planned."""
        n_open = max(len(st.open) for st in self.states.values())
        if n_open > self.planned_open:
            self.planned_open = n_open
            est = plan(n_open)
            if est.total > budget_gb * GiB:
                raise budget_error(
                    est,
                    budget_gb,
                    self.cfg,
                    f"{n_open} categories are open at once (a batch spans that many categories); ",
                )

    def sync(self, done: bool) -> bool:
        """Several ranks, grouped order: once per batch, every rank finishes the categories all
        ranks have passed, so the collectives (and checkpoints) happen in the same order on every
        rank. Returns True when every rank has consumed its data."""
        local = self.cfg.num_classes if done else max(self.last_label, 0)
        t = torch.tensor([-float(local), 0.0 if done else 1.0], dtype=ACC)
        self.reducer.max_(t)
        self.finish_categories(int(-t[0]))
        self.rounds += 1
        return float(t[1]) == 0.0

    def finish(self) -> None:
        c = self.cfg.num_classes
        if self.cfg.category_order == "grouped" or not self.cfg.hsic:
            if self.cfg.hsic:
                self.finish_categories(c)
            if self.reducer is not None:
                self._reduce(
                    [
                        st.reduce_items(None, None if self.cfg.hsic else slice(0, c), True)
                        for st in self.states.values()
                    ]
                )
            return
        if self.reducer is not None:
            for st in self.states.values():
                st.acc.finalize()
            self._reduce(
                [st.reduce_items(st.acc, slice(0, c), True) for st in self.states.values()]
            )
        for st in self.states.values():
            st.store(st.acc, list(range(c)))

    def state_dict(self) -> dict:
        return {
            "frontier": self.frontier,
            "last_label": self.last_label,
            "rounds": self.rounds,
            "batches": self.batches,
            "digest": self.digest,
            "states": {n: st.state_dict() for n, st in self.states.items()},
        }

    def load_state_dict(self, blob: dict) -> None:
        self.frontier, self.batches = int(blob["frontier"]), int(blob["batches"])
        self.last_label, self.rounds = int(blob["last_label"]), int(blob["rounds"])
        for n, st in self.states.items():
            st.load_state_dict(blob["states"][n])


def resume_blob(resume, reducer, rank: int, world: int, synced: bool, expect: dict):
    """The checkpoint to resume from (path, contents), checked against this run."""
    rpath = ckpt.rank_path(resume, rank, world)
    if synced:  # every rank resumes from the same round
        have = ckpt.generations(rpath)
        common = set.intersection(
            *(
                set(h)
                for h in reducer.gather_objects(
                    sorted(have), "agreeing on the checkpoint round to resume from"
                )
            )
        )
        if not common:
            raise ValueError(
                f"cannot resume from {rpath}: the ranks' checkpoints have no round "
                f"in common; start without resume=."
            )
        rpath = have[max(common)]
    blob = ckpt.load(rpath)
    ckpt.check_compatible(blob, expect, rpath)
    return rpath, blob
