"""Mixed precision: profile under autocast (bfloat16, float16) against float32, side by side.

The SmallCNN trained on MNIST-5k (cached by ``neuslice.experiments.train.cached_model``), profiled on the
4,000 training images with all metrics and the neuron-HSIC statistics; prints, per precision,
the profiling time, the worst relative error (over layers, whole-data scores) of each metric's
scores, the largest deviation of the CKA prefix curves, and how many neurons the θ=0.95 semantic
slices (Taylor, DeepLIFT) differ by.

    python bench/bench_autocast.py
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, save_rows  # noqa: E402

import neuslice  # noqa: E402
from neuslice.experiments.data import make_loader  # noqa: E402
from neuslice.experiments.train import cached_model  # noqa: E402


def main() -> None:
    env = environment()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, train, _ = cached_model("cnn", "mnist5k", seed=0, device=device)
    loader = make_loader(train, 256)
    print(
        f"# autocast vs float32 on {env['device']} (torch {env['torch']}), SmallCNN, "
        f"{len(train)} MNIST-5k images"
    )
    runs = {}
    for name, dtype in (
        ("float32", None),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
    ):
        t = time.perf_counter()
        runs[name] = neuslice.profile(model, loader, 10, autocast=dtype, progress=False)
        runs[name].timings["wall"] = time.perf_counter() - t
    ref = runs["float32"]
    print(
        f"{'precision':<9} {'time s':>7} "
        + " ".join(f"{m:>9}" for m in neuslice.METRICS)
        + f" {'curve dev':>9} {'slice diff':>10}"
    )
    rows = []
    for name, prof in runs.items():
        errs = {}
        for metric in neuslice.METRICS:
            errs[metric] = max(
                float(
                    (prof.scores(l, metric) - ref.scores(l, metric)).norm()
                    / ref.scores(l, metric).norm()
                )
                for l in ref.layers
            )
        dev = max(
            float((prof.curve(l, "taylor", c) - ref.curve(l, "taylor", c)).abs().max())
            for l in ref.layers
            for c in range(10)
        )
        diff = 0
        for metric in ("taylor", "deeplift"):
            a, b = (
                neuslice.semantic_slice(prof, metric, 0.95, criterion="layer_cka"),
                neuslice.semantic_slice(ref, metric, 0.95, criterion="layer_cka"),
            )
            diff += sum(int((a.masks[k] ^ b.masks[k]).sum()) for k in a.masks)
        rows.append(
            {
                "precision": name,
                "seconds": prof.timings["wall"],
                "rel_err": errs,
                "curve_dev": dev,
                "slice_diff_neurons": diff,
            }
        )
        print(
            f"{name:<9} {prof.timings['wall']:7.2f} "
            + " ".join(f"{errs[m]:9.2e}" for m in neuslice.METRICS)
            + f" {dev:9.2e} {diff:10d}"
        )
    print(
        "saved",
        save_rows("autocast", rows, env, os.path.join(os.path.dirname(__file__), "results")),
    )


if __name__ == "__main__":
    main()
