"""The small training-loop pieces maintenance tasks share: a seeded loader, cross-entropy
epochs with any optimizer, top-1 accuracy. Each task also accepts the user's own loaders and
callables; these are only the defaults."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .checks import model_device
from .hooks import module_modes

logger = logging.getLogger(__name__)

__all__ = ["make_loader", "fit_epochs", "evaluate"]


def make_loader(
    dataset: Dataset, batch_size: int = 128, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """Wrap ``dataset`` in a single-process DataLoader, seeded when shuffled."""
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a torch.utils.data.Dataset, got {type(dataset).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    generator = None
    if shuffle:
        generator = torch.Generator()
        generator.manual_seed(int(seed))
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0
    )


def fit_epochs(
    model: nn.Module,
    loader,
    optimizer,
    epochs: int,
    device: torch.device | None = None,
    progress: bool = False,
    desc: str = "train",
) -> list[float]:
    """Cross-entropy training epochs with ``optimizer`` (any object with ``zero_grad``/``step``);
    returns the mean loss of each epoch. The model is in train mode during, eval mode after."""
    losses: list[float] = []
    model.train()
    try:
        bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress)
        for epoch in bar:
            total, count = 0.0, 0
            for x, y in loader:
                if device is not None:
                    x, y = x.to(device), y.to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(y)
                count += len(y)
            losses.append(total / max(count, 1))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            logger.debug("epoch %d/%d: mean loss %.4f", epoch + 1, epochs, losses[-1])
    finally:
        model.eval()
    return losses


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset_or_loader: Dataset | DataLoader,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on a dataset or loader of ``(x, y)``.

    Runs in eval mode and restores the model's previous train/eval mode.
    ``device=None`` uses the device of the model's parameters (CPU if none);
    a given ``device`` moves the model there.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(dataset_or_loader, DataLoader):
        loader = dataset_or_loader
    else:
        loader = make_loader(dataset_or_loader, batch_size=batch_size)
    if device is None:
        dev = model_device(model)
    else:
        dev = torch.device(device)
        model.to(dev)
    correct, total = 0, 0
    with torch.no_grad(), module_modes(model, train=False):
        for x, y in loader:
            y = y.to(dev)
            correct += (model(x.to(dev)).argmax(dim=1) == y).sum().item()
            total += len(y)
    if total == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    return correct / total
