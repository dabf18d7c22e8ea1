"""Masked accuracy of the SmallCNN on MNIST-5k before and after BatchNorm recalibration.

    python examples/recalibrate_batchnorm.py

Trains (or loads from the cache) the SmallCNN, profiles it, and for semantic Taylor slices at
several thresholds prints the test accuracy under the mask with the original BatchNorm
statistics and with statistics re-estimated under the mask (``neuslice.recalibrate_batchnorm``).
"""

from __future__ import annotations

import torch

import neuslice
from neuslice.experiments.data import make_loader
from neuslice.experiments.train import cached_model, evaluate


def main() -> None:
    torch.manual_seed(0)
    model, train, test = cached_model("cnn", "mnist5k", seed=0)
    model.eval()
    train_loader, test_loader = make_loader(train, 256), make_loader(test, 256)
    prof = neuslice.profile(model, train_loader, 10, progress=False)
    print(f"unmasked test accuracy {evaluate(model, test_loader):.3f}")
    print(f"{'theta':>5} {'compression':>11} {'masked':>7} {'recalibrated':>12}")
    curves = neuslice.consumer_r2_curves(model, prof, train_loader, "taylor", progress=False)
    for theta in (0.2, 0.4, 0.6):  # consumer-R² thresholds (semantic_slice's default criterion)
        sl = curves.slice(theta)
        with neuslice.masked(model, sl):
            plain = evaluate(model, test_loader)
        recal = neuslice.recalibrate_batchnorm(model, sl, train_loader, progress=False)
        with neuslice.masked(recal, sl):
            fixed = evaluate(recal, test_loader)
        print(f"{theta:5.2f} {sl.compression_rate(model):11.1%} {plain:7.3f} {fixed:12.3f}")


if __name__ == "__main__":
    main()
