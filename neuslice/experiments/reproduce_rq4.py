"""Reproduction of the paper's incremental-development experiment (RQ4, Table 7).

Scenarios: ``ab`` (task A = classes 0-4, then B = 5-9) and ``abc`` (A = 0-2, B = 3-5,
C = 6-9) on one shared 10-way model (the paper's MLP, or the BatchNorm SmallCNN for
``cnn-mnist``). Methods, in the paper's order: ``original`` (A only),
``retrain`` (all data), ``replay5/10/100``, ``deeparc`` (after A, train only the layers DeepArc
finds redundant plus the head rows of the new classes), ``global`` and ``categorywise`` slicing
(slices matched in size to the semantic one, task by task), ``neusemslice`` and
``neusemslice+replay10``. Reported per task: task-aware accuracy (union of the earlier tasks'
masks for slice methods, argmax over the task's own classes, as the paper does) and overall
task-agnostic accuracy (no mask, argmax over all learned classes), mean ± std over seeds, plus
the bytes kept besides the model (saved slices vs replay buffers).

For slice methods the task-aware accuracy of an earlier task is that of the *masked* model, so
it includes the cost of masking (recorded right after learning as ``task_aware_at_learning``);
later tasks never change it (``forgetting`` is exactly 0).

Settings (:data:`RQ4_SETTINGS`) also include ``vgg16-cifar10``
(:func:`neuslice.experiments.zoo.cifar_vgg16`) and ``resnet18-cifar10``
(``neuslice.experiments.zoo.build("resnet18", 10)``) on CIFAR-10 files the user provides
(``data_root`` / ``$NEUSLICE_DATA``; never downloaded), on ``device`` (default CUDA when
there). They run this same code; only the table's hyper-parameters differ.

Runtime: ``mlp-mnist``, 3 seeds, both scenarios, 10 epochs took 172 s on a 2-core CPU with
``torch.set_num_threads(1)`` (another job was using the second core); small models run far
slower with several threads on a busy CPU. ``cnn-mnist`` (SmallCNN, width 16), same settings:
894 s with ``neuslice reproduce ... --threads 1`` while another job used one core; with two
threads one training epoch was ~16x slower there.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from .data import make_loader
from ..decomposition.deeparc import deeparc, freeze_except
from ..maintenance.incremental import (
    incremental_run,
    learn_task,
    split_tasks,
    task_accuracy,
    task_accuracy_any,
)
from .models import MLP, SmallCNN
from ..maintenance.masked_optimizer import head_name
from ..profiling.profile import profile
from .plots import Panel, bar_panels, mean_std, seeds_note
from .reproduce import _check_common, _matched_categorywise, _ms, resolve_device, setting_data
from ..slicing import Slice, global_slice, semantic_slice

logger = logging.getLogger(__name__)

__all__ = [
    "RQ4_SETTINGS",
    "RQ4Setting",
    "SCENARIOS",
    "RQ4_METHODS",
    "RQ4Config",
    "run_rq4",
    "format_rq4",
    "plot_rq4",
    "PAPER_RQ4",
]


class RQ4Setting(NamedTuple):
    """Model kind ("mlp" = MLP(hidden), "cnn" = SmallCNN(width), "vgg16" = zoo.cifar_vgg16,
    "resnet18" = zoo.build("resnet18")), dataset (see neuslice.experiments.reproduce.setting_data), default
    epochs per task and the training batch size."""

    model: str
    data: str
    epochs: int = 10
    batch_size: int = 64


RQ4_SETTINGS = {
    "mlp-mnist": RQ4Setting("mlp", "mnist5k"),
    "mlp-digits": RQ4Setting("mlp", "digits"),
    "cnn-mnist": RQ4Setting("cnn", "mnist5k"),
    # CIFAR-10 files on disk, meant for a GPU
    "vgg16-cifar10": RQ4Setting("vgg16", "cifar10", epochs=10, batch_size=128),
    "resnet18-cifar10": RQ4Setting("resnet18", "cifar10", epochs=10, batch_size=128),
}
_MODEL_NAMES = {"mlp": "MLP", "cnn": "SmallCNN", "vgg16": "VGG16", "resnet18": "ResNet"}
SCENARIOS = {"ab": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], "abc": [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]}
#: (method key, label in the table), in the paper's row order.
# The paper's "Retrain" is sequential training on the new task alone (it forgets task A: 0 %),
# i.e. our "finetune"; training on all tasks' data at once is shown as the upper bound.
RQ4_METHODS = (
    ("original", "Original"),
    ("finetune", "Retrain"),
    ("replay5", "Replay 5%"),
    ("replay10", "Replay 10%"),
    ("replay100", "Replay 100%"),
    ("deeparc", "DeepArc"),
    ("global", "Global slicing"),
    ("categorywise", "Category-wise slicing"),
    ("neusemslice", "NeuSemSlice"),
    ("neusemslice+replay10", "NeuSemSlice+Replay 10%"),
    ("retrain", "Joint (all data)"),
)

# Table 7 of the paper (MLP-MNIST): per-task accuracy and their average, in %. The paper gives
# no DeepArc numbers for MLPs and no Original/Replay 100%/DeepArc rows for three tasks.
PAPER_RQ4: dict[str, Any] = {
    "mlp-mnist": {
        "ab": {
            "Original": (98.92, 0.00, 49.46),
            "Retrain": (0.00, 98.50, 49.25),
            "Replay 5%": (87.54, 98.32, 92.93),
            "Replay 10%": (91.86, 98.13, 95.00),
            "Replay 100%": (97.20, 97.48, 97.34),
            "Global slicing": (93.58, 97.75, 95.66),
            "Category-wise slicing": (96.85, 97.44, 97.14),
            "NeuSemSlice": (98.89, 97.20, 98.04),
            "NeuSemSlice+Replay 10%": (98.94, 97.17, 98.05),
        },
        "abc": {
            "Retrain": (0.00, 0.14, 98.11, 32.75),
            "Replay 5%": (91.93, 85.89, 97.96, 91.93),
            "Replay 10%": (94.85, 90.71, 97.88, 94.48),
            "Global slicing": (94.22, 97.54, 97.88, 96.55),
            "Category-wise slicing": (93.55, 98.79, 97.98, 96.77),
            "NeuSemSlice": (98.95, 97.43, 97.93, 98.11),
        },
    }
}


@dataclass(frozen=True)
class RQ4Config:
    setting: str = "mlp-mnist"
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int | None = None  # per task; None: the setting's (RQ4_SETTINGS)
    lr: float = 1e-3
    metric: str = "taylor"
    threshold: float = 0.95  # NeuSemSlice CKA threshold
    scenario: str = "both"  # "ab", "abc" or "both"
    hidden: tuple[int, ...] = (512, 256)  # MLP settings
    width: int = 16  # SmallCNN base width (cnn settings)
    deeparc_threshold: float = 0.99  # DeepArc's own consecutive-layer CKA threshold
    device: str | None = None  # None: CUDA when available, else the CPU
    data_root: str | None = None  # on-disk data (CIFAR-10); None: $NEUSLICE_DATA
    hsic_route: str = "auto"  # profile()'s HSIC route ("minibatch": cheaper, for quick runs)
    task_batchnorm: bool = False  # slice methods: per-task BatchNorm statistics under the mask

    def __post_init__(self):
        if self.scenario not in ("ab", "abc", "both"):
            raise ValueError(f"unknown scenario {self.scenario!r}; choose 'ab', 'abc' or 'both'")
        _check_common(self, RQ4_SETTINGS)
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must lie in (0, 1], got {self.threshold!r}")
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"width must be a positive integer, got {self.width!r}")

    @property
    def scenarios(self) -> list[str]:
        return ["ab", "abc"] if self.scenario == "both" else [self.scenario]


def _slicer(
    kind: str, metric: str, threshold: float, hsic_route: str = "auto"
) -> Callable[..., Slice]:
    """Profile the model on a task's data; slice it semantically (CKA ``threshold``), or with
    a global / category-wise slice of the same total size."""

    def slicer(model: nn.Module, dataset: Dataset, classes: Sequence[int]) -> Slice:
        prof = profile(
            model,
            make_loader(dataset, batch_size=256),
            num_classes=10,
            metrics=(metric,),
            progress=False,
            hsic_route=hsic_route,
        )
        sem = semantic_slice(prof, metric, threshold, criterion="layer_cka")
        if kind == "semantic":
            return sem
        size = sum(sem.kept().values())
        if kind == "global":
            return global_slice(prof, metric, size / sum(sem.sizes().values()))
        return _matched_categorywise(prof, metric, size)

    return slicer


def _deeparc_run(
    factory, train_sets, test_sets, groups, config: RQ4Config, seed: int
) -> list[dict[str, Any]]:
    """DeepArc baseline: learn task A normally; for later tasks train only the layers DeepArc
    (run on task A's data) marks redundant (with their BatchNorm) plus the head rows of the new
    classes; the running statistics of the frozen layers' BatchNorms are kept as well."""
    model = factory()
    kw = dict(
        epochs=config.epochs, lr=config.lr, batch_size=RQ4_SETTINGS[config.setting].batch_size
    )
    learn_task(model, train_sets[0], groups[0], seed=seed, **kw)
    mods = deeparc(
        model, make_loader(train_sets[0], batch_size=256), threshold=config.deeparc_threshold
    )
    at_learning = {0: task_accuracy(model, test_sets[0], groups[0])}
    head = model.get_submodule(head_name(model))
    for t in range(1, len(groups)):
        freeze_except(model, mods.redundant)
        # Frozen layers' BatchNorm statistics would still drift in train mode: keep them.
        frozen_stats = {
            id(m): {k: b.clone() for k, b in m.named_buffers(recurse=False)}
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and not any(p.requires_grad for p in m.parameters())
        }
        new_rows = torch.zeros(head.out_features, dtype=torch.bool)
        new_rows[list(groups[t])] = True
        head.weight.requires_grad_(True)
        head.bias.requires_grad_(True)
        hooks = [
            head.weight.register_hook(lambda g: g * new_rows[:, None].to(g)),
            head.bias.register_hook(lambda g: g * new_rows.to(g)),
        ]
        try:  # frozen parameters get no grad; Adam skips them (fresh optimiser per task)
            learn_task(model, train_sets[t], groups[t], seed=seed + t, **kw)
        finally:
            for h in hooks:
                h.remove()
            for p in model.parameters():
                p.requires_grad_(True)
            with torch.no_grad():
                for m in model.modules():
                    for k, b in frozen_stats.get(id(m), {}).items():
                        getattr(m, k).copy_(b)
        at_learning[t] = task_accuracy(model, test_sets[t], groups[t])
    seen = [c for g in groups for c in g]
    rows, n_total, aware_total, agn_total = [], 0, 0.0, 0.0
    for t, (te, g) in enumerate(zip(test_sets, groups)):
        aware = task_accuracy(model, te, g)
        agn = task_accuracy_any(model, te, seen)
        n = len(te)
        rows.append(
            {
                "method": "deeparc",
                "task": t,
                "classes": list(g),
                "n_test": n,
                "task_aware": aware,
                "task_agnostic": agn,
                "masked": False,
                "learned": True,
                "task_aware_at_learning": at_learning[t],
                "forgetting": at_learning[t] - aware,
            }
        )
        n_total += n
        aware_total += aware * n
        agn_total += agn * n
    rows.append(
        {
            "method": "deeparc",
            "task": "overall",
            "classes": seen,
            "n_test": n_total,
            "task_aware": aware_total / n_total,
            "task_agnostic": agn_total / n_total,
            "memory_bytes": 0,
            "redundant_layers": list(mods.redundant),
        }
    )
    return rows


def run_rq4(config: RQ4Config = RQ4Config(), progress: bool = True) -> list[dict[str, Any]]:
    """Run every method on every scenario and seed; the rows of :func:`incremental_run`
    tagged with ``scenario``, ``seed``, ``label`` and ``model`` (the model's class name)."""
    spec = RQ4_SETTINGS[config.setting]
    device = resolve_device(config.device)
    out: list[dict[str, Any]] = []
    for seed in config.seeds:
        t0 = time.perf_counter()
        train, test = setting_data(spec.data, seed, config.data_root)
        shape = tuple(train.tensors[0].shape[1:])

        def factory(seed=seed, shape=shape):
            torch.manual_seed(seed)
            if spec.model == "cnn":
                model = SmallCNN(shape[0], 10, width=config.width)
            elif spec.model == "vgg16":
                from .zoo import cifar_vgg16

                model = cifar_vgg16(shape[0], 10)
            elif spec.model == "resnet18":
                from .zoo import build

                model = build("resnet18", 10)
            else:
                model = MLP(math.prod(shape), config.hidden, 10)
            return model.to(device)

        model_name = _MODEL_NAMES[spec.model]

        for scenario in config.scenarios:
            groups = SCENARIOS[scenario]
            tr, te = split_tasks(train, groups), split_tasks(test, groups)
            for method, label in RQ4_METHODS:
                if method == "deeparc":
                    rows = _deeparc_run(factory, tr, te, groups, config, seed)
                else:
                    kind = {"global": "global", "categorywise": "categorywise"}.get(
                        method, "semantic"
                    )
                    run_method = "neusemslice" if method in ("global", "categorywise") else method
                    rows = incremental_run(
                        factory,
                        tr,
                        te,
                        groups,
                        run_method,
                        slicer=_slicer(kind, config.metric, config.threshold, config.hsic_route),
                        epochs=config.epochs,
                        lr=config.lr,
                        seed=seed,
                        batch_size=spec.batch_size,
                        device=device,
                        task_batchnorm=config.task_batchnorm,
                    )
                for r in rows:
                    r.update(
                        method=method, label=label, scenario=scenario, seed=seed, model=model_name
                    )
                out.extend(rows)
        if progress:
            logger.warning(
                "rq4 %s seed %d done in %.0fs", config.setting, seed, time.perf_counter() - t0
            )
    return out


def format_rq4(rows: list[dict[str, Any]], setting: str) -> str:
    """One table per scenario: methods × (task-aware accuracy per task, overall task-aware,
    overall task-agnostic, memory bytes), mean±std over seeds (accuracies in %)."""
    paper = PAPER_RQ4.get(setting, {})
    blocks = []
    for scenario in [s for s in SCENARIOS if any(r["scenario"] == s for r in rows)]:
        rs = [r for r in rows if r["scenario"] == scenario]
        n_tasks = len(SCENARIOS[scenario])
        names = "ABC"[:n_tasks]
        seeds = sorted({r["seed"] for r in rs})
        head = (
            f"{'method':<24}"
            + "".join(f"{'aware ' + n + ' %':>14}" for n in names)
            + f"{'aware all %':>14}{'agnostic %':>14}{'memory B':>12}"
            + (f"   | paper: {' '.join(names)} avg" if paper.get(scenario) else "")
        )
        lines = [
            f"RQ4 incremental development, {setting}, scenario "
            f"{'→'.join(names)} ({'+'.join(str(len(g)) for g in SCENARIOS[scenario])} "
            f"classes): mean±std over {len(seeds)} seeds",
            head,
            "-" * len(head),
        ]
        for method, label in RQ4_METHODS:
            mr = [r for r in rs if r["method"] == method]
            if not mr:
                continue
            line = f"{label:<24}"
            for t in range(n_tasks):
                line += f"{_ms([r['task_aware'] for r in mr if r['task'] == t], 100):>14}"
            overall = [r for r in mr if r["task"] == "overall"]
            line += (
                f"{_ms([r['task_aware'] for r in overall], 100):>14}"
                f"{_ms([r['task_agnostic'] for r in overall], 100):>14}"
                f"{statistics.fmean(r['memory_bytes'] for r in overall):>12.0f}"
            )
            if label in paper.get(scenario, {}):
                line += "   | " + " ".join(f"{v:.2f}" for v in paper[scenario][label])
            lines.append(line)
        red = {
            tuple(r.get("redundant_layers", ()))
            for r in rs
            if r["method"] == "deeparc" and r["task"] == "overall"
        }
        if red:
            desc = "; ".join(", ".join(x) if x else "none" for x in sorted(red))
            lines.append(
                f"DeepArc redundant layers (trained for later tasks besides the new "
                f"head rows): {desc}"
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def plot_rq4(rows: list[dict[str, Any]], setting: str, path) -> str:
    """PNG of :func:`run_rq4`'s rows: one panel per scenario; per method (groups) the
    task-aware accuracy of each task and the overall task-agnostic accuracy (bars, mean ± std
    over seeds). Returns ``path``."""
    panels = []
    for scenario in [s for s in SCENARIOS if any(r["scenario"] == s for r in rows)]:
        rs = [r for r in rows if r["scenario"] == scenario]
        names = "ABC"[: len(SCENARIOS[scenario])]
        methods = [(m, label) for m, label in RQ4_METHODS if any(r["method"] == m for r in rs)]
        panel = Panel(
            f"scenario {'→'.join(names)} "
            f"({'+'.join(str(len(g)) for g in SCENARIOS[scenario])} classes)",
            "accuracy %",
            [label for _, label in methods],
            ylim=(0, 102),
        )
        for t, n in enumerate(names):
            stats = [
                mean_std([r["task_aware"] for r in rs if r["method"] == m and r["task"] == t], 100)
                for m, _ in methods
            ]
            panel.series[f"task {n} (task-aware)"] = ([a for a, _ in stats], [b for _, b in stats])
        stats = [
            mean_std(
                [r["task_agnostic"] for r in rs if r["method"] == m and r["task"] == "overall"], 100
            )
            for m, _ in methods
        ]
        panel.series["all tasks, task-agnostic"] = ([a for a, _ in stats], [b for _, b in stats])
        panels.append(panel)
    n = len({r["seed"] for r in rows})
    return bar_panels(
        panels,
        path,
        title=f"RQ4 incremental development, {setting} ({seeds_note(n)})",
        columns=1,
        panel_width=11.0,
        colors={
            "task A (task-aware)": "tab:grey",
            "task B (task-aware)": "tab:blue",
            "task C (task-aware)": "tab:orange",
            "all tasks, task-agnostic": "tab:red",
        },
    )
