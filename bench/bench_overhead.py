"""Profiling overhead against one plain training epoch (issue 15), side by side in one run.

For each model, the same batches (a list in memory, so no loader cost differs) go through:

* ``plain``: one epoch of forward + cross-entropy backward (train mode, parameter gradients, no
  optimizer step) on a copy of the model;
* ``neuslice.profile`` with ``avg``, ``taylor``, ``deeplift`` alone (no HSIC), ``avg + HSIC``
  and all five metrics + HSIC (``category_order="any"``, the defaults otherwise).

Repetitions are interleaved (one round runs every configuration once) so that machine noise hits
them alike; the table shows the plain epoch's median seconds and each configuration's median
time divided by it. ``--finish`` also times finishing one category of ResNet-50 (CKA prefix
curves of every metric over its 53 layers, ``LayerState.store``) from a random neuron-HSIC
matrix per layer.

    python bench/bench_overhead.py [--quick] [--repeats 3] [--models mlp cnn ...]
    python bench/bench_overhead.py --device cuda --size 224 --models vgg16 resnet50
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, save_rows  # noqa: E402

import neuslice  # noqa: E402
from neuslice.experiments.models import MLP, SmallCNN, build_model  # noqa: E402

# name -> (builder, input shape, inputs, batch, quick inputs)
MODELS = {
    "mlp": (lambda: MLP(), (1, 28, 28), 4000, 256, 1024),
    "cnn": (lambda: SmallCNN(), (1, 28, 28), 2000, 128, 512),
    "vgg16": (lambda: build_model("vgg16", num_classes=10), (3, 32, 32), 200, 50, 100),
    "resnet18": (lambda: _tv("resnet18"), (3, 64, 64), 100, 25, 50),
    "resnet50": (lambda: _tv("resnet50"), (3, 64, 64), 100, 25, 50),
}
CONFIGS = {
    "avg": dict(metrics=("avg",), hsic=False),
    "taylor": dict(metrics=("taylor",), hsic=False),
    "deeplift": dict(metrics=("deeplift",), hsic=False),
    "avg+hsic": dict(metrics=("avg",), hsic=True, max_memory_gb=32.0),
    "all5+hsic": dict(metrics=neuslice.METRICS, hsic=True, max_memory_gb=32.0),
}


def _tv(name: str):
    import torchvision

    return getattr(torchvision.models, name)(weights=None, num_classes=10)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_epoch(model, batches, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    sync(device)
    return time.perf_counter() - t0


def profile_epoch(model, batches, device, options) -> float:
    sync(device)
    t0 = time.perf_counter()
    neuslice.profile(model, batches, 10, progress=False, **options)
    sync(device)
    return time.perf_counter() - t0


def make_batches(shape, n, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.arange(n) % 10
    return [(x[i : i + batch].to(device), y[i : i + batch].to(device)) for i in range(0, n, batch)]


def finish_time(repeats: int) -> float:
    """Median seconds to finish one category of ResNet-50: ``LayerState.store`` (prefix curves of
    every scorable metric) for each of its sliced layers, from random PSD HSIC matrices."""
    from neuslice.layers import find_layers
    from neuslice.profiling.config import PassConfig, ProfileConfig
    from neuslice.profiling.layer_state import LayerState

    model = _tv("resnet50")
    cfg = PassConfig.bind(
        ProfileConfig(
            metrics=neuslice.ALL_METRICS, category_order="grouped", hsic_route="minibatch"
        ),
        10,
    )
    g = torch.Generator().manual_seed(0)
    states = []
    for layer in find_layers(model):
        d = layer.num_neurons
        st = LayerState(layer, 49, cfg, torch.device("cpu"), torch.float32)
        st.moments.update(torch.randn(16, d, generator=g).abs(), torch.zeros(16, dtype=torch.long))
        for k in ("taylor", "deeplift", "taylor_act"):
            st.sums[k][0] = torch.rand(d, generator=g, dtype=torch.float64)
        st.sums["taylor_batches"][0] = 1
        acc = st.new_acc(1)
        a = torch.randn(d, 32, generator=g, dtype=torch.float64)
        acc.total[0] = a @ a.T
        acc.weight[0] = 128
        states.append((st, acc))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for st, acc in states:
            st.store(acc, [0])
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(states)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer inputs, 2 repeats")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--size",
        type=int,
        default=None,
        help="input side for the vgg16/resnet models (default: 32 / 64)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-finish", action="store_true", help="skip the ResNet-50 finish timing")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick and args.repeats == 3 else args.repeats
    device = torch.device(args.device)
    env = environment()
    print(
        f"# profiling overhead vs one plain forward+backward epoch on {env['device']} "
        f"(torch {env['torch']}, {env['threads']} threads, commit {env['commit']}, "
        f"median of {repeats}{', quick' if args.quick else ''})"
    )
    cols = "".join(f"{c:>11}" for c in args.configs)
    print(f"{'model':<10}{'inputs':>7}{'batch':>6}{'plain s':>9}{cols}")
    rows = []
    for name in args.models:
        build, shape, n, batch, n_quick = MODELS[name]
        if args.size and len(shape) == 3 and shape[0] == 3:
            shape = (3, args.size, args.size)
        n = n_quick if args.quick else n
        torch.manual_seed(0)
        model = build().to(device).eval()
        trainer = copy.deepcopy(model).train()
        batches = make_batches(shape, n, batch, device)
        runs = {c: [] for c in ["plain", *args.configs]}
        for r in range(repeats + 1):  # round 0 warms up
            for c in runs:
                t = (
                    plain_epoch(trainer, batches, device)
                    if c == "plain"
                    else profile_epoch(model, batches, device, CONFIGS[c])
                )
                if r:
                    runs[c].append(t)
        med = {c: statistics.median(v) for c, v in runs.items()}
        row = {
            "model": name,
            "inputs": n,
            "batch": batch,
            "shape": list(shape),
            "plain_s": med["plain"],
            **{f"{c}_x": med[c] / med["plain"] for c in args.configs},
            "raw": runs,
        }
        rows.append(row)
        ratios = "".join(f"{med[c] / med['plain']:>10.2f}x" for c in args.configs)
        print(f"{name:<10}{n:>7}{batch:>6}{med['plain']:>9.3f}{ratios}", flush=True)
    if not args.no_finish:
        t, n_layers = finish_time(max(repeats, 3))
        print(
            f"finishing one category of ResNet-50 ({n_layers} layers, curves of "
            f"{len(neuslice.ALL_METRICS)} metrics): {t:.3f} s"
        )
        rows.append({"finish_resnet50_s": t, "layers": n_layers})
    print("saved", save_rows("overhead" + ("_quick" if args.quick else ""), rows, env, args.out))


if __name__ == "__main__":
    main()
