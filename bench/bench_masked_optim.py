"""Cost of a MaskedOptimizer step against the bare optimizer, side by side.

One training iteration (forward, backward, step) of the paper's MLP (784-512-256-10) and of the
SmallCNN on MNIST-shaped batches, with a semantic-size slice (half of each layer critical), for
SGD (momentum, weight decay) and AdamW, ``train="critical"`` and ``"noncritical"``. Bare and
masked iterations alternate in one loop so machine noise hits both alike; medians are reported.

    python bench/bench_masked_optim.py [--batch 128] [--iters 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, save_rows  # noqa: E402

import neuslice  # noqa: E402
from neuslice.experiments.models import MLP, SmallCNN  # noqa: E402
from neuslice.slicing import Slice  # noqa: E402

OPTS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=5e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2),
}


def half_slice(model) -> Slice:
    layers = neuslice.find_layers(model)
    g = torch.Generator().manual_seed(0)
    masks = {
        l.name: torch.randperm(l.num_neurons, generator=g) < l.num_neurons // 2 for l in layers
    }
    return Slice(
        masks=masks,
        strategy="random",
        metric=None,
        fingerprint=neuslice.model_fingerprint(model),
        input_shape=[1, 28, 28],
    )


def step_time(model, opt, x, y) -> float:
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    env = environment()
    print(
        f"# MaskedOptimizer step overhead on {env['device']} (torch {env['torch']}, "
        f"{env['threads']} threads, batch {args.batch}, median of {args.iters})"
    )
    print(
        f"{'model':<6} {'optimizer':<6} {'train':<12} {'bare ms':>8} {'masked ms':>9} {'ratio':>6}"
    )
    rows = []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    for name, build in (("mlp", MLP), ("cnn", SmallCNN)):
        for opt_name, make in OPTS.items():
            for train in ("critical", "noncritical"):
                torch.manual_seed(0)
                bare_model, masked_model = build(), build()
                masked_model.load_state_dict(bare_model.state_dict())
                sl = half_slice(masked_model)
                bare = make(bare_model.parameters())
                masked = neuslice.MaskedOptimizer(
                    make(masked_model.parameters()), masked_model, sl, train=train
                )
                for _ in range(5):  # warm-up
                    step_time(bare_model, bare, x, y)
                    step_time(masked_model, masked, x, y)
                tb, tm = [], []
                for _ in range(args.iters):
                    tb.append(step_time(bare_model, bare, x, y))
                    tm.append(step_time(masked_model, masked, x, y))
                b, m = statistics.median(tb), statistics.median(tm)
                rows.append(
                    {
                        "model": name,
                        "optimizer": opt_name,
                        "train": train,
                        "bare_ms": b * 1e3,
                        "masked_ms": m * 1e3,
                        "ratio": m / b,
                    }
                )
                print(
                    f"{name:<6} {opt_name:<6} {train:<12} {b * 1e3:8.2f} {m * 1e3:9.2f} "
                    f"{m / b:6.2f}",
                    flush=True,
                )
    print("saved", save_rows("masked_optim", rows, env, args.out))


if __name__ == "__main__":
    main()
