"""Profiling time per contribution metric on MNIST-5k (4,000 training images).

Each metric is profiled alone (without the neuron-HSIC matrices), then HSIC alone, then
everything in one pass, side by side in one run; the median of ``--repeats`` runs is shown with
its ratio to the cheapest pass.

    python bench/bench_profile_metrics.py [--model mlp|cnn] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import neuslice
from neuslice.experiments.data import make_loader
from neuslice.experiments.train import cached_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    model, train, _ = cached_model(args.model, "mnist5k", seed=0, epochs=args.epochs)
    loader = make_loader(train, batch_size=args.batch_size)
    configs = [(m, (m,), False) for m in ("avg", "var", "ens", "taylor", "deeplift")]
    configs += [("hsic only", ("avg",), True), ("all metrics + hsic", neuslice.METRICS, True)]
    rows = []
    for name, metrics, hsic in configs:
        neuslice.profile(model, loader, 10, metrics=metrics, hsic=hsic, progress=False)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            neuslice.profile(model, loader, 10, metrics=metrics, hsic=hsic, progress=False)
            times.append(time.perf_counter() - t0)
        rows.append((name, statistics.median(times)))
    floor = min(t for _, t in rows)
    print(
        f"{args.model.upper()} on MNIST-5k ({len(train)} images, batch {args.batch_size}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of "
        f"{args.repeats}"
    )
    print(f"{'pass':<22}{'seconds':>10}{'images/s':>11}{'x cheapest':>12}")
    for name, t in rows:
        print(f"{name:<22}{t:>10.3f}{len(train) / t:>11.0f}{t / floor:>12.2f}")


if __name__ == "__main__":
    main()
