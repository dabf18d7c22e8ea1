"""estimate_profile_memory vs the measured peak of neuslice.profile (host memory, CPU run).

The measured figure is the peak resident-set growth of this process while ``profile`` runs
(sampled every 5 ms from /proc/self/statm), above the resident set just before the call: what
the pass itself allocates, the quantity the estimate covers (not the Python/torch runtime nor
the data already in memory).

    python bench/bench_memory_estimate.py [--model resnet18] [--size 64] [--classes 10]
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import neuslice
from neuslice.runtime import CategoryGroupedSampler

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    def __enter__(self):
        self.base = rss()
        self.peak = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def build(name: str, classes: int):
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=classes).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18", help="torchvision model name")
    ap.add_argument("--size", type=int, default=64, help="input height and width")
    ap.add_argument("--classes", type=int, default=10, help="categories")
    ap.add_argument("--samples", type=int, default=320, help="synthetic images")
    ap.add_argument("--batch", type=int, default=32, help="batch size")
    ap.add_argument("--order", default="grouped", choices=["any", "grouped"])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--metrics", default=",".join(neuslice.METRICS), help="comma-separated metrics")
    ap.add_argument("--no-hsic", action="store_true", help="profile without HSIC statistics")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.samples, 3, args.size, args.size)
    y = torch.arange(args.samples) % args.classes
    sampler = CategoryGroupedSampler(y) if args.order == "grouped" else None
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch, sampler=sampler)
    opts = dict(
        category_order=args.order, metrics=tuple(args.metrics.split(",")), hsic=not args.no_hsic
    )
    with PeakRSS() as m:  # from before the model exists: the estimate counts the model too
        model = build(args.model, args.classes)
        neuslice.profile(model, loader, args.classes, progress=False, **opts)
    est = neuslice.estimate_profile_memory(
        model, x[:2], args.classes, batch_size=args.batch, **opts
    )
    print(est.table())
    ratio = est.total / m.growth
    print(
        f"\n{args.model} {args.size}px, {args.classes} categories, batch {args.batch}, "
        f"order {args.order}, metrics {args.metrics}, hsic {not args.no_hsic}, "
        f"{args.threads} thread(s)"
    )
    print(
        f"estimate {est.total / 2**30:.3f} GiB | measured peak growth "
        f"{m.growth / 2**30:.3f} GiB | estimate / measured {ratio:.2f}"
    )


if __name__ == "__main__":
    main()
