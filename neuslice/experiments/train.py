"""Seeding, training, evaluation and an on-disk cache of trained reference models."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from .._utils.io import atomic_torch_save
from .._utils.training import evaluate, fit_epochs, make_loader
from .data import load_dataset
from .models import MODELS, build_model

logger = logging.getLogger(__name__)

__all__ = [
    "seed_everything",
    "fit_epochs",
    "train_classifier",
    "evaluate",
    "default_cache_dir",
    "cached_model",
]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and CUDA)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_module(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def train_classifier(
    model: nn.Module,
    train_set: Dataset,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[nn.Module, list[float]]:
    """Train ``model`` in place with Adam and cross-entropy on ``(x, y)`` batches.

    Shuffling is seeded by ``seed`` (global RNGs are not touched; seed them with
    :func:`seed_everything` before building the model for reproducible init).
    ``device=None`` picks CUDA when available. Returns the model, moved to
    ``device`` and left in eval mode, and the per-epoch mean training losses.
    """
    _check_module(model)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive (e.g. 1e-3), got {lr!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    loader = make_loader(train_set, batch_size=batch_size, shuffle=True, seed=seed)
    if len(train_set) == 0:  # type: ignore[arg-type]
        raise ValueError("train_set is empty; pass a dataset with at least one sample")
    dev = _resolve_device(device)
    model.to(dev)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses = fit_epochs(model, loader, optimiser, epochs, dev, progress=progress)
    model.eval()
    return model, losses


def default_cache_dir() -> Path:
    """``$NEUSLICE_CACHE`` if set, else ``~/.cache/neuslice``."""
    env = os.environ.get("NEUSLICE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "neuslice"


def _infer_model_kwargs(name: str, sample: torch.Tensor, num_classes: int) -> dict[str, Any]:
    params = inspect.signature(MODELS[name]).parameters
    inferred: dict[str, Any] = {}
    if "in_features" in params:
        inferred["in_features"] = int(sample.numel())
    if "in_channels" in params:
        inferred["in_channels"] = int(sample.shape[0])
    if "num_classes" in params:
        inferred["num_classes"] = num_classes
    return inferred


def _num_classes(dataset: Dataset) -> int:
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        return int(tensors[1].max().item()) + 1
    return int(max(int(dataset[i][1]) for i in range(len(dataset)))) + 1  # type: ignore[arg-type]


def cached_model(
    name: str,
    dataset_name: str,
    seed: int = 0,
    epochs: int = 5,
    cache_dir: str | os.PathLike | None = None,
    *,
    model_kwargs: dict[str, Any] | None = None,
    dataset_kwargs: dict[str, Any] | None = None,
    train_kwargs: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> tuple[nn.Module, Dataset, Dataset]:
    """Return a trained registered model, training it only if no cached copy exists.

    The dataset comes from :func:`neuslice.experiments.data.load_dataset` (its split seed is
    set by ``dataset_kwargs``, not by ``seed``). ``in_features``/``in_channels``
    and ``num_classes`` are inferred from the data unless given in
    ``model_kwargs``. ``seed`` seeds model init and shuffling (via :func:`seed_everything`, so global RNGs are reseeded). The state_dict is
    cached under ``cache_dir`` (default :func:`default_cache_dir`), keyed by
    model name, dataset, seed, epochs and a hash of the model, dataset and
    training arguments; it is written atomically. An unreadable cache file is
    retrained over with a warning. Returns ``(model, train_set, test_set)``
    with the model in eval mode on ``device`` (CUDA if available when None).
    """
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    train_kwargs = dict(train_kwargs or {})
    reserved = {"seed", "epochs", "device", "progress"} & set(train_kwargs)
    if reserved:
        raise ValueError(
            f"train_kwargs must not contain {sorted(reserved)}; "
            "pass them as cached_model arguments instead"
        )
    train_set, test_set = load_dataset(dataset_name, **(dataset_kwargs or {}))
    resolved = _infer_model_kwargs(name, train_set[0][0], _num_classes(train_set))
    resolved.update(model_kwargs or {})

    key_src = json.dumps(
        {
            "model": resolved,
            "dataset": dataset_kwargs or {},
            "train": train_kwargs,
        },
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / f"{name}-{dataset_name}-seed{seed}-ep{epochs}-{digest}.pt"

    seed_everything(seed)
    model = build_model(name, **resolved)
    dev = _resolve_device(device)
    if path.exists():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(payload["state_dict"])
            logger.info("loaded cached %s/%s model from %s", name, dataset_name, path)
            return model.to(dev).eval(), train_set, test_set
        except Exception as exc:  # corrupt, truncated or incompatible file
            reason = (str(exc).splitlines() or [""])[0][:200]
            logger.warning(
                "cache file %s is unreadable (%s: %s); retraining",
                path,
                type(exc).__name__,
                reason,
            )
            seed_everything(seed)
            model = build_model(name, **resolved)

    logger.info("training %s on %s (seed %d, %d epochs)", name, dataset_name, seed, epochs)
    model, losses = train_classifier(
        model, train_set, epochs=epochs, seed=seed, device=dev, progress=progress, **train_kwargs
    )
    root.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"state_dict": state, "config": resolved, "losses": losses}, path)
    logger.info("cached trained model at %s", path)
    return model, train_set, test_set
