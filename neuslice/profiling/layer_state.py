"""Accumulators of one sliced layer during ``neuslice.profile``, and how they finish.

``category_order="any"`` keeps one HSIC accumulator slot per category for the whole pass;
``"grouped"`` keeps slots only for the categories in progress and finishes each category (its
HSIC matrix, or just its CKA prefix curves) as soon as the data has moved past it.
"""

from __future__ import annotations

import torch

from .. import cka
from .._utils.numerics import accumulation_dtype
from .scores import ranking, score, scorable
from ..layers import SlicedLayer
from ..runtime.memory import pick_hsic_route
from .stats import ACC, CovarianceAccumulator, MinibatchHSICAccumulator, MomentAccumulator

SUM_KEYS = ("taylor", "taylor_batches", "taylor_act", "deeplift")  # per category
WHOLE_KEYS = ("taylor_all", "taylor_all_batches")  # whole data


class LayerState:
    def __init__(self, layer: SlicedLayer, positions: int, cfg, device, feature_dtype):
        self.layer, self.cfg, self.device = layer, cfg, device
        self.positions = positions
        self.feature_dtype = feature_dtype
        c, d = cfg.num_classes, layer.num_neurons
        self.moments = MomentAccumulator(c, d, device)
        z = lambda *shape: torch.zeros(*shape, dtype=ACC, device=device)  # noqa: E731
        self.sums = {
            "taylor": z(c, d),
            "taylor_batches": z(c),
            "taylor_act": z(c, d),
            "deeplift": z(c, d),
            "taylor_all": z(d),
            "taylor_all_batches": z(()),
        }
        self.route = (
            pick_hsic_route(d, positions, cfg.hsic_route, cfg.cka_batch, cfg.max_feature_dim)
            if cfg.hsic
            else None
        )
        self.grouped = cfg.category_order == "grouped"
        self.open: dict[int, object] = {}  # grouped: category -> 1-slot accumulator
        # hook points (z, u, h) whose outputs the model changes in place: the pass copies them
        self.copied: set[str] = set()
        self.hsic_weight = z(c)
        # "any": every category is stored at the end, so the matrices are left unwritten until
        # then (a checkpoint saves zeros for them); the minibatch route accumulates its sums in
        # them and divides them in place at the end
        self.hsic = None
        self._hsic_blank = False
        if cfg.hsic and cfg.keep_hsic:
            if self.grouped:
                self.hsic = z(c, d, d)
            else:
                self.hsic = torch.empty(c, d, d, dtype=ACC, device=device)
                self._hsic_blank = True
        self.acc = self.new_acc(c, self.hsic) if cfg.hsic and not self.grouped else None
        self.curves = (
            {
                m: torch.full((c, d), float("nan"), dtype=ACC, device=device)
                for m in scorable(cfg.metrics)
            }
            if cfg.hsic and not cfg.keep_hsic
            else {}
        )

    # ---- accumulation ------------------------------------------------------------------
    def new_acc(self, slots: int, storage: torch.Tensor | None = None):
        """An HSIC accumulator with ``slots`` categories; the minibatch route keeps its sums in
        ``storage`` (``(slots, d, d)`` float64) if given, the feature route its co-moments when
        each neuron has one position."""
        d = self.layer.num_neurons
        if self.route == "feature":
            return CovarianceAccumulator(
                slots,
                d * self.positions,
                self.device,
                accumulation_dtype(self.feature_dtype),
                storage=storage if self.positions == 1 else None,
            )
        backend = self.cfg.backend
        fn = lambda a, out: cka._neuron_hsic(a, "unbiased", backend=backend, out=out)  # noqa: E731
        return MinibatchHSICAccumulator(
            slots, d, self.cfg.cka_batch, fn, self.device, storage=storage
        )

    def _feed(self, acc, a: torch.Tensor, y: torch.Tensor) -> None:
        if self.route == "feature":
            acc.update(a.reshape(a.shape[0], -1), y)
        else:
            acc.update(a, y)

    def update_hsic(self, a: torch.Tensor, y: torch.Tensor) -> None:
        if not self.grouped:
            self._feed(self.acc, a, y)
            return
        for k in torch.unique(y).tolist():
            if k not in self.open:
                self.open[k] = self.new_acc(1)
            sel = y == k
            self._feed(
                self.open[k], a[sel], torch.zeros(int(sel.sum()), dtype=torch.long, device=y.device)
            )

    # ---- reduction over ranks ------------------------------------------------------------
    def reduce_items(self, acc, rows: slice | None, whole: bool):
        """What to all-reduce: ``(sum tensors, moment triples, after)`` for ``rows`` of the
        per-category statistics (None: none), the whole-data sums if ``whole``, and ``acc``
        (finalized); call ``after()`` once the tensors hold the merged values."""
        sums, moments, after = [], [], None
        if rows is not None:
            m = self.moments
            moments.append((m.count[rows], m.mean[rows], m.m2[rows]))
            sums += [self.sums[k][rows] for k in SUM_KEYS]
        if whole:
            sums += [self.sums[k].view(-1) for k in WHOLE_KEYS]
        if acc is not None:
            acc.finalize()
            if self.route == "feature":
                merged = (acc.count, acc.mean, acc.comoment)
                moments.append(merged)
                after = lambda: acc.set_moments(*merged)  # noqa: E731
            else:
                sums += [acc.total, acc.weight]
        return sums, moments, after

    # ---- results -----------------------------------------------------------------------
    def take(self, category: int):
        """The finished accumulator of ``category`` in grouped mode (empty if it had no data)."""
        acc = self.open.pop(category, None)
        acc = acc if acc is not None else self.new_acc(1)
        if self.route != "feature":  # the feature route finishes a category in block_norms_
            acc.finalize()
        return acc

    def _results(self, acc, outs=None):
        """Per slot: (HSIC matrix, weight), one slot at a time to bound the temporaries; the
        minibatch route writes slot ``k``'s matrix into ``outs[k]`` when given, and, when only
        the CKA curves are kept, yields a positive multiple of it (the curves are scale-free)."""
        d = self.layer.num_neurons
        if self.route == "feature":
            for k in range(acc.count.shape[0]):
                m, n = acc.block_norms_(k, d)
                yield m, (n if int(acc.count[k]) >= 2 else torch.zeros_like(n))
        else:
            acc.finalize()
            for k in range(acc.weight.shape[0]):  # one category at a time: no (C, d, d) temporary
                if self.hsic is None:  # only the CKA curves, which do not depend on the scale
                    yield acc.result_of(k, normalise=False)
                else:
                    yield acc.result_of(k, None if outs is None else outs[k])

    def _hsic_written(self) -> torch.Tensor | None:
        """``self.hsic`` with the categories not yet stored at zero."""
        if self._hsic_blank:
            if getattr(self.acc, "storage", None) is self.hsic:
                return torch.zeros_like(self.hsic)  # it holds the accumulator's sums
            self.hsic.zero_()
            self._hsic_blank = False
        return self.hsic

    def store(self, acc, categories: list[int]) -> None:
        """Turn ``acc`` (one slot per entry of ``categories``) into results."""
        if self._hsic_blank and sorted(categories) != list(range(self.hsic.shape[0])):
            self._hsic_written()
        outs = None if self.hsic is None else [self.hsic[c] for c in categories]
        for c, (m, w) in zip(categories, self._results(acc, outs)):
            self.hsic_weight[c] = w
            if self.hsic is not None:
                if m.data_ptr() != self.hsic[c].data_ptr():
                    self.hsic[c] = m
            elif float(w) > 0:
                metrics = list(self.curves)
                got = cka.prefix_curves(m, [ranking(score(self._get, k, c)) for k in metrics])
                for metric, curve in zip(metrics, got):
                    self.curves[metric][c] = curve
        self._hsic_blank = False

    def _get(self, key: str) -> torch.Tensor:
        if key in ("count", "mean", "m2"):
            return getattr(self.moments, key)
        return self.sums[key]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The layer's part of ``Profile.tensors`` (on the CPU)."""
        out = {"count": self.moments.count, "mean": self.moments.mean, "m2": self.moments.m2}
        out.update(self.sums)
        out["hsic_weight"] = self.hsic_weight
        if self.hsic is not None:
            out["hsic"] = self._hsic_written()
        for metric, curves in self.curves.items():
            out[f"curve.{metric}"] = curves
        return {k: v.cpu() for k, v in out.items()}

    # ---- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict:
        cpu = lambda t: t.cpu() if torch.is_tensor(t) else t  # noqa: E731

        def acc_state(acc):
            st = acc.state_dict()
            return {
                k: ([[cpu(t) for t in b] for b in v] if k == "buffers" else cpu(v))
                for k, v in st.items()
            }

        return {
            "moments": {k: cpu(v) for k, v in self.moments.state_dict().items()},
            "sums": {k: cpu(v) for k, v in self.sums.items()},
            "acc": acc_state(self.acc) if self.acc is not None else None,
            "open": {int(k): acc_state(a) for k, a in self.open.items()},
            "hsic_weight": cpu(self.hsic_weight),
            "hsic": cpu(self._hsic_written()) if self.hsic is not None else None,
            "curves": {k: cpu(v) for k, v in self.curves.items()},
        }

    def load_state_dict(self, st: dict) -> None:
        self.moments.load_state_dict(st["moments"])
        for k, v in st["sums"].items():
            self.sums[k].copy_(v)
        if self.acc is not None:
            self.acc.load_state_dict(st["acc"])
        self.open = {}
        for k, a in st["open"].items():
            self.open[int(k)] = self.new_acc(1)
            self.open[int(k)].load_state_dict(a)
        self.hsic_weight.copy_(st["hsic_weight"])
        if self.hsic is not None:
            self.hsic.copy_(st["hsic"])
            self._hsic_blank = False
        for k, v in st["curves"].items():
            self.curves[k].copy_(v)
