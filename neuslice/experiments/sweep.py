"""The paper's masking evaluation (RQ1): compression rate vs accuracy for every strategy.

For each metric, global and category-wise slices at ratios 10%..100% and semantic slices at
thresholds 0.90..0.99 are applied as masks; each point is compared with random slices of the
same per-layer sizes, the floor every strategy must beat.
"""

from __future__ import annotations

import functools

import csv
import logging
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .._utils.progress import progress as progress_bar
from ..maintenance.batchnorm import recalibrate_batchnorm
from ..masking import masked
from ..profiling.profile import METRICS, Profile
from .train import evaluate
from ..slicing import Slice, categorywise_slice, global_slice, random_slice, semantic_slice

logger = logging.getLogger(__name__)

__all__ = [
    "SweepConfig",
    "SweepRow",
    "masking_sweep",
    "area_under_curves",
    "format_table",
    "format_auc_table",
    "plot_sweep",
    "write_csv",
    "accuracy",
]

STRATEGIES = ("global", "categorywise", "semantic")


@dataclass(frozen=True)
class SweepConfig:
    """What the sweep evaluates. Defaults follow the paper's RQ1."""

    metrics: tuple[str, ...] = METRICS
    ratios: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))
    thresholds: tuple[float, ...] = tuple(round(0.90 + 0.01 * i, 2) for i in range(10))
    random_repeats: int = 3
    batch_size: int = 1000

    def __post_init__(self):
        for name in ("ratios", "thresholds"):
            bad = [v for v in getattr(self, name) if not 0 < v <= 1]
            if bad:
                raise ValueError(f"SweepConfig.{name} must lie in (0, 1]; got {bad}")
        if self.random_repeats < 0:
            raise ValueError("SweepConfig.random_repeats must be >= 0")


@dataclass
class SweepRow:
    strategy: str
    metric: str
    setting: float  # ratio (global, category-wise) or threshold (semantic)
    compression_rate: float
    accuracy: float
    random_accuracy: float
    kept: dict = field(default_factory=dict)


def _as_tensors(data) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0]):
        return data
    xs, ys = zip(*[(x, y) for x, y in torch.utils.data.DataLoader(data, batch_size=4096)])
    return torch.cat(xs), torch.cat(ys)


def accuracy(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> float:
    """Top-1 accuracy of ``model`` on ``(inputs, labels)`` in eval mode (modes restored)."""
    return evaluate(model, torch.utils.data.TensorDataset(inputs, labels), batch_size=batch_size)


def masking_sweep(
    model: nn.Module,
    profile: Profile,
    test_data,
    config: SweepConfig = SweepConfig(),
    progress: bool = True,
    recalibrate_with=None,
    recalibrate_batches: int | None = 4,
) -> tuple[float, list[SweepRow]]:
    """Evaluate every (strategy, metric, setting); returns (unmasked accuracy, rows).

    ``recalibrate_with`` (a loader of training batches): evaluate every slice, and its random
    floor, on a copy whose BatchNorm statistics were re-estimated under that slice
    (``neuslice.recalibrate_batchnorm``, first ``recalibrate_batches`` batches).
    """
    x, y = _as_tensors(test_data)
    recal = None if recalibrate_with is None else (recalibrate_with, recalibrate_batches)
    base = accuracy(model, x, y, config.batch_size)
    jobs = []
    for metric in config.metrics:
        for r in config.ratios:
            jobs.append(("global", metric, r))
            jobs.append(("categorywise", metric, r))
        for t in config.thresholds:
            jobs.append(("semantic", metric, t))
    makers = {
        "global": global_slice,
        "categorywise": categorywise_slice,
        "semantic": functools.partial(semantic_slice, criterion="layer_cka"),  # the paper's
    }
    rows = []
    for strategy, metric, setting in progress_bar(jobs, progress, "masking sweep", "slice"):
        sl = makers[strategy](profile, metric, setting)
        rows.append(_evaluate_slice(model, sl, x, y, strategy, metric, setting, config, recal))
    return base, rows


def _masked_accuracy(model, sl: Slice, x, y, batch_size: int, recal) -> float:
    """Accuracy under ``sl``; with ``recal = (loader, batches)`` on a copy whose BatchNorm
    statistics were re-estimated under it."""
    if recal is not None:
        model = recalibrate_batchnorm(model, sl, recal[0], num_batches=recal[1], progress=False)
    with masked(model, sl):
        return accuracy(model, x, y, batch_size)


def _evaluate_slice(
    model, sl: Slice, x, y, strategy, metric, setting, config, recal=None
) -> SweepRow:
    acc = _masked_accuracy(model, sl, x, y, config.batch_size, recal)
    rand = [
        _masked_accuracy(model, random_slice(sl, seed=seed), x, y, config.batch_size, recal)
        for seed in range(config.random_repeats)
    ]
    return SweepRow(
        strategy=strategy,
        metric=metric,
        setting=setting,
        compression_rate=sl.compression_rate(model),
        accuracy=acc,
        random_accuracy=float(np.mean(rand)) if rand else float("nan"),
        kept=sl.kept(),
    )


def _curve(points: list[tuple[float, float]], grid: np.ndarray) -> np.ndarray:
    cr = np.array([p[0] for p in points])
    acc = np.array([p[1] for p in points])
    uniq = np.unique(cr)
    mean_acc = np.array([acc[cr == u].mean() for u in uniq])
    return np.interp(grid, uniq, mean_acc)


def area_under_curves(base_accuracy: float, rows: list[SweepRow]) -> dict[str, dict[str, float]]:
    """Normalised area under each accuracy-vs-compression curve, per metric and strategy.

    Every curve starts at (0, unmasked accuracy); areas are taken over the common compression
    range [0, R] (R = the smallest of the strategies' largest compression rates for that
    metric) and divided by R, so each value is the mean accuracy over that range.
    Keys: ``auc[metric][strategy]``, ``auc[metric]["random:" + strategy]`` and
    ``auc[metric]["range"]``.
    """
    out: dict[str, dict[str, float]] = {}
    for metric in dict.fromkeys(r.metric for r in rows):
        mine = [r for r in rows if r.metric == metric]
        strategies = list(dict.fromkeys(r.strategy for r in mine))
        reach = min(max(r.compression_rate for r in mine if r.strategy == s) for s in strategies)
        res: dict[str, float] = {"range": reach}
        if reach <= 0:
            out[metric] = res
            continue
        grid = np.linspace(0.0, reach, 201)
        for s in strategies:
            pts = [(0.0, base_accuracy)] + [
                (r.compression_rate, r.accuracy) for r in mine if r.strategy == s
            ]
            rnd = [(0.0, base_accuracy)] + [
                (r.compression_rate, r.random_accuracy) for r in mine if r.strategy == s
            ]
            res[s] = float(np.trapezoid(_curve(pts, grid), grid) / reach)
            res["random:" + s] = float(np.trapezoid(_curve(rnd, grid), grid) / reach)
        out[metric] = res
    return out


def format_table(base_accuracy: float, rows: list[SweepRow]) -> str:
    head = f"{'strategy':<13}{'metric':<10}{'setting':>8}{'CR':>9}{'accuracy':>10}{'random':>9}"
    lines = [f"unmasked accuracy: {base_accuracy:.4f}", head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.strategy:<13}{r.metric:<10}{r.setting:>8.2f}"
            f"{100 * r.compression_rate:>8.2f}%{r.accuracy:>10.4f}"
            f"{r.random_accuracy:>9.4f}"
        )
    return "\n".join(lines)


def format_auc_table(auc: dict[str, dict[str, float]]) -> str:
    head = (
        f"{'metric':<10}{'CR range':>9}"
        + "".join(f"{s:>14}" for s in STRATEGIES)
        + f"{'random(sem)':>13}"
    )
    lines = [head, "-" * len(head)]
    for metric, res in auc.items():
        vals = "".join(f"{res.get(s, float('nan')):>14.4f}" for s in STRATEGIES)
        lines.append(
            f"{metric:<10}{100 * res['range']:>8.1f}%{vals}"
            f"{res.get('random:semantic', float('nan')):>13.4f}"
        )
    return "\n".join(lines)


def write_csv(rows: list[SweepRow], path: str | os.PathLike) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "strategy",
                "metric",
                "setting",
                "compression_rate",
                "accuracy",
                "random_accuracy",
                "kept",
            ]
        )
        for r in rows:
            d = asdict(r)
            w.writerow(
                [
                    d["strategy"],
                    d["metric"],
                    d["setting"],
                    d["compression_rate"],
                    d["accuracy"],
                    d["random_accuracy"],
                    " ".join(f"{k}={v}" for k, v in r.kept.items()),
                ]
            )


# strategy -> (label, colour, marker, line style); random floors reuse colour and marker, dotted
_STYLE = {
    "global": ("global", "tab:blue", "o", "-"),
    "categorywise": ("category-wise", "tab:orange", "s", "--"),
    "semantic": ("semantic (NeuSemSlice)", "tab:red", "^", "-"),
}
# log-scale floor of the accuracy drop: drops at or below it (and gains) are drawn on it
_DROP_FLOOR = 1e-3


def plot_sweep(
    base_accuracy: float, rows: list[SweepRow], path: str | os.PathLike, title: str = ""
) -> None:
    """Accuracy vs compression rate, one column per metric (like the paper's Figure 5).

    Top row: accuracy, from just below the lowest point to just above the unmasked accuracy
    (dashed grey, labelled). Bottom row: the accuracy drop (unmasked minus masked) on a log
    scale, where a strategy's small drops and the random floors' large ones are both readable;
    drops below 0.1 percentage point (and gains) sit on the bottom edge. Strategies differ in
    colour, marker and line style (hollow markers and dotted lines: random slices of the same
    per-layer sizes); one legend for the whole figure.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'neuslice[plot]'") from exc
    if not rows:
        raise ValueError("plot_sweep needs at least one SweepRow")
    if not np.isfinite(base_accuracy):
        raise ValueError(f"base_accuracy must be finite, got {base_accuracy!r}")
    metrics = list(dict.fromkeys(r.metric for r in rows))
    fig, axes = plt.subplots(
        2,
        len(metrics),
        figsize=(3.3 * len(metrics) + 0.6, 6.4),
        sharex=True,
        sharey="row",
        squeeze=False,
    )
    finite = [v for r in rows for v in (r.accuracy, r.random_accuracy) if np.isfinite(v)]
    low = min(finite + [base_accuracy])
    pad = 0.04 * (base_accuracy - low) + 0.005
    if not base_accuracy - low > 0:  # every point at the unmasked accuracy
        pad = 0.01
    drops = [base_accuracy - v for v in finite]
    top = max(drops + [_DROP_FLOOR * 10]) * 1.6
    for col, metric in enumerate(metrics):
        ax_acc, ax_drop = axes[0][col], axes[1][col]
        for s in STRATEGIES:
            pts = sorted(
                (r.compression_rate, r.accuracy, r.random_accuracy)
                for r in rows
                if r.metric == metric and r.strategy == s
            )
            if not pts:
                continue
            label, color, marker, ls = _STYLE[s]
            cr = np.array([100 * p[0] for p in pts])
            for k, random in ((1, False), (2, True)):
                acc = np.array([p[k] for p in pts], dtype=float)
                ok = np.isfinite(acc)
                if not ok.any():
                    continue
                style = dict(
                    color=color,
                    marker=marker,
                    ms=4 if random else 5,
                    ls=":" if random else ls,
                    lw=1.0 if random else 1.6,
                    mfc="none" if random else color,
                    alpha=0.7 if random else 0.95,
                    zorder=2 if random else 3,
                )
                ax_acc.plot(cr[ok], acc[ok], **style)
                ax_drop.plot(cr[ok], np.maximum(base_accuracy - acc[ok], _DROP_FLOOR), **style)
        ax_acc.axhline(base_accuracy, color="0.35", lw=1.0, ls=(0, (5, 3)), zorder=1)
        ax_acc.set_title(metric, fontsize=11)
        ax_drop.set_xlabel("compression rate (%)")
        for ax in (ax_acc, ax_drop):
            ax.grid(alpha=0.3, which="major")
        ax_drop.grid(alpha=0.12, which="minor")
    axes[0][0].set_ylim(low - pad, max(finite + [base_accuracy]) + 2.5 * pad)
    axes[0][0].set_ylabel("accuracy (masked)")
    for ax in axes[0]:
        ax.annotate(
            f"unmasked {base_accuracy:.3f}",
            xy=(0.98, base_accuracy),
            xycoords=("axes fraction", "data"),
            xytext=(0, 2),
            textcoords="offset points",
            fontsize=8,
            color="0.25",
            ha="right",
            va="bottom",
        )
    axes[1][0].set_yscale("log")
    axes[1][0].set_ylim(_DROP_FLOOR * 0.8, top)
    ticks = [t for t in (1e-3, 1e-2, 1e-1, 1.0) if t <= top]
    axes[1][0].set_yticks(
        ticks, [f"≤{_DROP_FLOOR:g}" if t == _DROP_FLOOR else f"{t:g}" for t in ticks]
    )
    axes[1][0].set_ylabel("accuracy drop (unmasked − masked)")
    handles = [
        Line2D([], [], color=c, marker=m, ls=ls, lw=1.6, ms=5, label=lab)
        for lab, c, m, ls in _STYLE.values()
    ]
    handles += [
        Line2D(
            [],
            [],
            color=c,
            marker=m,
            ls=":",
            mfc="none",
            ms=4,
            alpha=0.8,
            label=f"random, sizes of {lab.split(' ')[0]}",
        )
        for lab, c, m, _ in _STYLE.values()
    ]
    handles.append(
        Line2D([], [], color="0.35", ls=(0, (5, 3)), label=f"unmasked model ({base_accuracy:.3f})")
    )
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=4,
        fontsize=9,
        frameon=False,
        bbox_to_anchor=(0.5, 0.0),
    )
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
