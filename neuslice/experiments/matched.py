"""Matched-compression evaluation of slicing strategies (issue #12).

Comparing strategies at their own knobs (a CKA threshold vs a keep ratio) compares models of
different sizes. Here every strategy's knob is bisected to the *same* compression rate
(:meth:`neuslice.Slice.compression_rate`, the fraction of the model's parameters removed):

* ``target`` settings: each strategy is bisected to fixed targets (default 50..90 %);
* ``rate`` settings: a semantic criterion is sliced at a threshold and the baselines are bisected
  to the rate that slice reached.

Beside each semantic slice two controls with the *same per-layer sizes* are evaluated: the
random floor (:func:`neuslice.random_slice`) and the global ranking at those sizes
("global@sizes": whole-data ranking, the semantic slice's number of neurons per layer) -- the
first says whether the ranking matters at all, the second whether the per-category union adds
anything over choosing the per-layer budget.

Models with BatchNorm are evaluated with running statistics re-estimated under each mask
(:func:`neuslice.recalibrate_batchnorm` on a copy; ``acc``); the plain masked accuracy with the
training statistics is reported beside it (``acc_plain``, labelled "plain masking"). Over several
training seeds, each comparison gets the mean ± std, the paired t-test p value
(``scipy.stats.ttest_rel``) and Cohen's d of the paired differences (mean / sd of differences).

Entry points: :func:`run` (rows), :func:`summarise`, :func:`format_table`, :func:`plot`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from neuslice._utils.checks import model_device
import neuslice
from neuslice import Slice

from neuslice.profiling.scores import ranking

__all__ = [
    "Case",
    "Knob",
    "Row",
    "paper_semantic",
    "consumer_semantic",
    "global_knob",
    "categorywise_knob",
    "bisect_rate",
    "global_at_sizes",
    "paired_stats",
    "run",
    "summarise",
    "format_table",
    "plot",
    "DEFAULT_TARGETS",
]

DEFAULT_TARGETS = (0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class Case:
    """One trained model to evaluate: ``name`` groups seeds of the same architecture."""

    name: str
    seed: int
    model: nn.Module
    profile: "neuslice.Profile"
    test: tuple[torch.Tensor, torch.Tensor]
    train_loader: Iterable | None = None  # BN re-estimation and data-driven criteria
    recal_batches: int | None = 4
    batch_size: int = 1000

    @property
    def has_bn(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())


@dataclass
class Knob:
    """A strategy with one knob; compression must not increase as the knob grows."""

    name: str
    make: Callable[[Case, str, float], Slice]
    lo: float = 1e-4
    hi: float = 1.0
    controls: bool = False  # gets the random / global@sizes rows (same per-layer sizes)


@dataclass
class Row:
    model: str
    seed: int
    metric: str
    setting: str  # "target 70%" or "rate of <criterion> θ=0.9"
    target: float  # the compression rate aimed at
    criterion: str  # the semantic criterion this setting belongs to ("" for shared)
    strategy: str
    knob: float | None
    rate: float
    acc: float  # BN re-estimated under the mask (plain masking if no BN)
    acc_plain: float  # plain masking, training statistics
    reestimated: bool
    kept: dict = field(default_factory=dict)

    @property
    def reached(self) -> bool:
        return math.isfinite(self.rate) and abs(self.rate - self.target) <= 0.02


# ---- strategies ------------------------------------------------------------------------


def paper_semantic(name: str = "semantic (layer CKA)") -> Knob:
    """The paper's criterion: :func:`neuslice.semantic_slice` (knob: CKA threshold)."""
    return Knob(
        name,
        lambda case, metric, t: neuslice.semantic_slice(
            case.profile, metric, t, criterion="layer_cka"
        ),
        controls=True,
    )


def consumer_semantic(
    name: str = "semantic (consumer R², default)",
    samples: int = 128,
    after_norm: bool = False,
    centre: str = "category",
    prefix: str = "shared",
) -> Knob:
    """The consumer-R² criterion (:mod:`neuslice.consumer`; ``prefix="shared"`` is
    :func:`neuslice.semantic_slice`'s default); curves cached per case/metric."""
    from neuslice.consumer import consumer_r2_curves

    cache: dict = {}

    def make(case, metric, t):
        key = (id(case), metric)
        if key not in cache:
            cache[key] = consumer_r2_curves(
                case.model,
                case.profile,
                case.train_loader,
                metric,
                samples=samples,
                after_norm=after_norm,
                centre=centre,
                progress=False,
            )
        return cache[key].slice(t, prefix)

    return Knob(name, make, controls=True)


def global_knob() -> Knob:
    return Knob("global", lambda case, metric, r: neuslice.global_slice(case.profile, metric, r))


def categorywise_knob() -> Knob:
    return Knob(
        "categorywise", lambda case, metric, r: neuslice.categorywise_slice(case.profile, metric, r)
    )


def global_at_sizes(profile, metric: str, like: Slice) -> Slice:
    """Whole-data ranking with ``like``'s number of critical neurons per layer."""
    masks = {}
    for layer, m in like.masks.items():
        order = ranking(profile.scores(layer, metric))
        mask = torch.zeros(m.numel(), dtype=torch.bool)
        mask[order[: int(m.sum())].cpu()] = True
        masks[layer] = mask
    return Slice(
        masks=masks,
        strategy="global@sizes",
        metric=metric,
        fingerprint=like.fingerprint,
        input_shape=list(like.input_shape),
        threshold=like.threshold,
        ratio=like.ratio,
    )


# ---- search ----------------------------------------------------------------------------


def bisect_rate(
    make: Callable[[float], Slice],
    model: nn.Module,
    target: float,
    lo: float = 1e-4,
    hi: float = 1.0,
    tol: float = 0.005,
    iters: int = 40,
) -> tuple[float, Slice, float]:
    """Bisect a knob whose slice's compression rate does not increase with it to ``target``.

    Returns ``(knob, slice, rate)`` of the slice whose rate is closest to ``target`` (first
    within ``tol``). When the rate jumps over the target, the closest side is returned -- check
    ``abs(rate - target)``.
    """
    if not (isinstance(target, (int, float)) and math.isfinite(target) and 0 <= target < 1):
        raise ValueError(f"target must be a compression rate in [0, 1), got {target!r}")
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"need finite lo < hi, got {lo!r}, {hi!r}")
    best = None

    def probe(k):
        nonlocal best
        s = make(k)
        r = float(s.compression_rate(model))
        if not math.isfinite(r):
            raise ValueError(f"compression rate is not finite at knob {k}")
        if best is None or abs(r - target) < abs(best[2] - target):
            best = (k, s, r)
        return r

    if probe(hi) >= target or probe(lo) <= target:
        return best
    a, b = lo, hi
    for _ in range(iters):
        mid = 0.5 * (a + b)
        r = probe(mid)
        if abs(r - target) <= tol:
            break
        if r > target:
            a = mid
        else:
            b = mid
    return best


# ---- evaluation --------------------------------------------------------------------------


def _accuracy(model: nn.Module, sl: Slice, x: torch.Tensor, y: torch.Tensor, bs: int) -> float:
    correct = 0
    dev = model_device(model)
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), neuslice.masked(model, sl):
            for i in range(0, len(y), bs):
                pred = model(x[i : i + bs].to(dev)).argmax(1).cpu()
                correct += int((pred == y[i : i + bs].cpu()).sum())
    finally:
        for m, t in training.items():
            m.train(t)
    return correct / len(y)


def _evaluate(case: Case, sl: Slice, reestimate: bool) -> tuple[float, float, bool]:
    x, y = case.test
    plain = _accuracy(case.model, sl, x, y, case.batch_size)
    if not (reestimate and case.has_bn):
        return plain, plain, False
    if case.train_loader is None:
        raise ValueError(
            f"case {case.name}/{case.seed} has BatchNorm but no train_loader to "
            f"re-estimate its statistics (or pass reestimate=False)"
        )
    copy = neuslice.recalibrate_batchnorm(
        case.model, sl, case.train_loader, num_batches=case.recal_batches, progress=False
    )
    return _accuracy(copy, sl, x, y, case.batch_size), plain, True


def run(
    cases: Sequence[Case],
    metrics: Sequence[str] = ("taylor", "deeplift"),
    targets: Sequence[float] = DEFAULT_TARGETS,
    criteria: Sequence[Knob] | None = None,
    baselines: Sequence[Knob] | None = None,
    thresholds: Sequence[float] = (),
    reestimate: bool = True,
    random_repeats: int = 1,
    tol: float = 0.005,
    progress: bool = True,
) -> list[Row]:
    """Evaluate ``criteria`` (semantic knobs) against ``baselines`` at matched compression.

    For every case, metric and target, each criterion and baseline is bisected to the target;
    each criterion's slice also gets its random floor (``random_repeats`` seeds, averaged) and
    global@sizes row. For every criterion threshold in ``thresholds`` the baselines are bisected
    to the rate that criterion's slice reached ("rate" settings).
    """
    from tqdm.auto import tqdm

    if criteria is None:  # the default criterion needs data; the paper's only the profile
        data = all(c.train_loader is not None for c in cases)
        criteria = [consumer_semantic(), paper_semantic()] if data else [paper_semantic()]
    criteria = list(criteria)
    baselines = list(baselines) if baselines is not None else [global_knob(), categorywise_knob()]
    if not cases:
        raise ValueError("no cases to evaluate")
    for t in targets:
        if not (isinstance(t, (int, float)) and 0 < t < 1):
            raise ValueError(f"targets must be compression rates in (0, 1), got {t!r}")
    rows: list[Row] = []

    def emit(case, metric, setting, target, crit, strategy, knob, sl):
        acc, plain, re = _evaluate(case, sl, reestimate)
        rows.append(
            Row(
                case.name,
                case.seed,
                metric,
                setting,
                float(target),
                crit,
                strategy,
                None if knob is None else float(knob),
                float(sl.compression_rate(case.model)),
                acc,
                plain,
                re,
                sl.kept(),
            )
        )

    def controls(case, metric, setting, target, crit, sl):
        accs = [
            _evaluate(case, neuslice.random_slice(sl, seed=s), reestimate)
            for s in range(random_repeats)
        ]
        if accs:
            rate = float(sl.compression_rate(case.model))
            rows.append(
                Row(
                    case.name,
                    case.seed,
                    metric,
                    setting,
                    float(target),
                    crit,
                    "random",
                    None,
                    rate,
                    float(np.mean([a[0] for a in accs])),
                    float(np.mean([a[1] for a in accs])),
                    accs[0][2],
                    sl.kept(),
                )
            )
        emit(
            case,
            metric,
            setting,
            target,
            crit,
            "global@sizes",
            None,
            global_at_sizes(case.profile, metric, sl),
        )

    jobs = [(c, m) for c in cases for m in metrics]
    for case, metric in tqdm(jobs, desc="matched compression", disable=not progress):
        for t in targets:
            setting = f"target {round(100 * t)}%"
            for kb in baselines:
                k, sl, _ = bisect_rate(
                    lambda v: kb.make(case, metric, v), case.model, t, kb.lo, kb.hi, tol
                )
                emit(case, metric, setting, t, "", kb.name, k, sl)
            for kc in criteria:
                k, sl, _ = bisect_rate(
                    lambda v: kc.make(case, metric, v), case.model, t, kc.lo, kc.hi, tol
                )
                emit(case, metric, setting, t, kc.name, kc.name, k, sl)
                if kc.controls:
                    controls(case, metric, setting, t, kc.name, sl)
        for kc in criteria:
            for th in thresholds:
                sl = kc.make(case, metric, th)
                r = float(sl.compression_rate(case.model))
                setting = f"rate of {kc.name} θ={th:g}"
                emit(case, metric, setting, r, kc.name, kc.name, th, sl)
                if kc.controls:
                    controls(case, metric, setting, r, kc.name, sl)
                for kb in baselines:
                    k, bsl, _ = bisect_rate(
                        lambda v: kb.make(case, metric, v),
                        case.model,
                        min(max(r, 0.0), 0.999),
                        kb.lo,
                        kb.hi,
                        tol,
                    )
                    emit(case, metric, setting, r, kc.name, kb.name, k, bsl)
    return rows


# ---- statistics ------------------------------------------------------------------------


def paired_stats(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired comparison of ``a`` vs ``b`` (same seeds): mean difference, its sd, the paired
    t-test p value (``scipy.stats.ttest_rel``; NaN with fewer than 2 pairs or zero spread)
    and Cohen's d of the differences (mean / sd; NaN if sd is 0)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two equal-length 1-d samples, got {a.shape} and {b.shape}")
    diff = a - b
    n = diff.size
    mean = float(diff.mean()) if n else float("nan")
    sd = float(diff.std(ddof=1)) if n > 1 else float("nan")
    # equal differences computed in floating point (0.7 - 0.694 vs 0.9 - 0.894) leave a spread
    # of rounding error; it is no spread, not an effect of size 1e13
    scale = max(1.0, float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
    if math.isfinite(sd) and sd <= 1e-9 * scale:
        sd = 0.0
    p = float("nan")
    if n > 1 and math.isfinite(sd) and sd > 0:
        from scipy import stats

        p = float(stats.ttest_rel(a, b).pvalue)
    d = mean / sd if (math.isfinite(sd) and sd > 0) else float("nan")
    return {"n": n, "mean_diff": mean, "sd_diff": sd, "p": p, "d": d}


def summarise(rows: Sequence[Row], field_: str = "acc") -> list[dict]:
    """One record per (model, metric, setting, criterion): every strategy's mean ± std over
    seeds and the criterion's paired comparison with each other strategy."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.model, r.metric, r.setting), []).append(r)
    out = []
    for (model, metric, setting), rs in groups.items():
        crits = sorted({r.criterion for r in rs if r.criterion and r.strategy == r.criterion})
        shared = [r for r in rs if r.criterion == ""]
        for crit in crits:
            mine = [r for r in rs if r.criterion == crit] + shared
            by: dict[str, dict[int, Row]] = {}
            for r in mine:
                by.setdefault(r.strategy, {})[r.seed] = r
            seeds = sorted(by[crit])
            rec = {
                "model": model,
                "metric": metric,
                "setting": setting,
                "criterion": crit,
                "target": rs[0].target,
                "seeds": seeds,
                "strategies": {},
                "vs": {},
            }
            for s, bys in by.items():
                vals = [getattr(bys[k], field_) for k in seeds if k in bys]
                rates = [bys[k].rate for k in seeds if k in bys]
                rec["strategies"][s] = {
                    "mean": float(np.mean(vals)),
                    "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan"),
                    "rate": float(np.mean(rates)),
                    "n": len(vals),
                }
            for s, bys in by.items():
                if s == crit:
                    continue
                common = [k for k in seeds if k in bys]
                rec["vs"][s] = paired_stats(
                    [getattr(by[crit][k], field_) for k in common],
                    [getattr(bys[k], field_) for k in common],
                )
            rec["reached"] = all(by[crit][k].reached for k in seeds)
            out.append(rec)
    return out


def _fmt(m: float, s: float) -> str:
    if not math.isfinite(m):
        return "n/a"
    return f"{100 * m:.1f}" + (f"±{100 * s:.1f}" if math.isfinite(s) else "")


def _pd(st: dict) -> str:
    p = "n/a" if not math.isfinite(st["p"]) else (f"{st['p']:.3f}" if st["p"] >= 0.001 else "<.001")
    d = "n/a" if not math.isfinite(st["d"]) else f"{st['d']:+.1f}"
    return f"{100 * st['mean_diff']:+.1f} (p {p}, d {d})"


def format_table(rows: Sequence[Row], field_: str = "acc") -> str:
    """Markdown table: per model/metric/setting/criterion, accuracies (mean±std %, seeds),
    compression rate, and Δ (p, d) of the criterion vs global, category-wise, global@sizes and
    random. ``field_="acc_plain"`` tabulates plain masking (training BN statistics)."""
    if field_ != "acc":
        label = "accuracy, plain masking (training BN statistics)"
    elif any(r.reestimated for r in rows):
        label = "accuracy, BN re-estimated under each mask"
    else:
        label = "accuracy, plain masking (no BatchNorm)"
    lines = [
        f"({label}; mean±std over seeds, %; Δ = criterion − other, paired t-test p, "
        f"Cohen's d; * = criterion's rate misses the target by > 2 points)",
        "",
        "| model | metric | setting | criterion | rate | criterion | global | categorywise | "
        "global@sizes | random | Δ global | Δ categorywise | Δ global@sizes | Δ random |",
        "|" + "---|" * 14,
    ]
    for rec in summarise(rows, field_):
        st = rec["strategies"]
        c = st[rec["criterion"]]

        def cell(s):
            return _fmt(st[s]["mean"], st[s]["std"]) if s in st else "-"

        def vs(s):
            return _pd(rec["vs"][s]) if s in rec["vs"] else "-"

        star = "" if rec["reached"] else "*"
        lines.append(
            f"| {rec['model']} | {rec['metric']} | {rec['setting']} | {rec['criterion']} | "
            f"{100 * c['rate']:.1f}{star} | {cell(rec['criterion'])} | {cell('global')} | "
            f"{cell('categorywise')} | {cell('global@sizes')} | {cell('random')} | {vs('global')} | "
            f"{vs('categorywise')} | {vs('global@sizes')} | {vs('random')} |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[Row], path, field_: str = "acc") -> None:
    """Accuracy vs compression at the fixed targets: one panel per (model, metric), one line
    per strategy (mean ± std over seeds), the same colour for a strategy in every panel;
    dashed: random slices with a criterion's per-layer sizes. Written as a PNG (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.setting.startswith("target")]
    if not rows:
        raise ValueError("no target rows to plot")

    def label(r):
        if r.criterion and r.strategy != r.criterion:
            return f"{r.strategy} @ {r.criterion} sizes"
        return r.strategy

    labels = sorted({label(r) for r in rows if r.strategy != "global@sizes"})
    cmap = plt.get_cmap("tab10")
    colour = {lab: cmap(i % 10) for i, lab in enumerate(labels)}
    models = sorted({r.model for r in rows})
    metrics = sorted({r.metric for r in rows})
    ncol = min(3, len(labels))
    legend_h = 0.25 + 0.17 * math.ceil(len(labels) / max(ncol, 1))  # inches under the panels
    height = 3.1 * len(models) + legend_h + 0.15
    fig, axes = plt.subplots(
        len(models),
        len(metrics),
        squeeze=False,
        figsize=(max(4.4 * len(metrics), 7.5), height),
    )
    for i, model in enumerate(models):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            rs = [
                r
                for r in rows
                if r.model == model and r.metric == metric and r.strategy != "global@sizes"
            ]
            for lab in labels:
                pts: dict = {}
                for r in rs:
                    if label(r) == lab:
                        pts.setdefault(r.target, []).append((r.rate, getattr(r, field_)))
                if not pts:
                    continue
                xs = sorted(pts)
                mx = [100 * np.mean([p[0] for p in pts[t]]) for t in xs]
                my = [100 * np.mean([p[1] for p in pts[t]]) for t in xs]
                sy = [100 * np.std([p[1] for p in pts[t]]) for t in xs]
                ax.errorbar(
                    mx,
                    my,
                    yerr=sy,
                    fmt="o" + ("--" if lab.startswith("random") else "-"),
                    ms=3,
                    capsize=2,
                    color=colour[lab],
                    label=lab,
                )
            ax.set_title(f"{model} / {metric}", fontsize=9)
            ax.set_xlabel("compression rate (% of parameters)", fontsize=8)
            ax.set_ylabel("test accuracy (%)", fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
    handles = [
        plt.Line2D(
            [],
            [],
            color=colour[lab],
            marker="o",
            ms=3,
            ls="--" if lab.startswith("random") else "-",
            label=lab,
        )
        for lab in labels
    ]
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7)
    seeds = sorted({r.seed for r in rows})
    has_bn = any(r.reestimated for r in rows)
    note = (
        ("BN statistics re-estimated under each mask" if has_bn else "plain masking (no BN)")
        if field_ == "acc"
        else "plain masking (training BN statistics)"
    )
    fig.suptitle(f"Matched compression, {note}; mean ± std over seeds {seeds}", fontsize=10)
    fig.tight_layout(rect=(0, legend_h / height, 1, 1 - 0.15 / height))
    fig.savefig(path, dpi=110, bbox_inches="tight")  # nothing clipped, whatever the panel count
    plt.close(fig)
