"""Incite mutation analysis: neuslice.mutation_scores vs the artifact's way, side by side.

The artifact's way (``reference_mutation_scores(how="weights")``): a copy of the model, each
mutant's incoming weights and bias scaled in place, one full forward over the whole training
set per mutant. neuslice's way: one clean forward per batch, then the mutants stacked along the
batch, running only the part of the network downstream of the mutated layer, with the mutated
layer's consumers updated by a low-rank delta (``delta=True``) or run in full
(``delta=False``). Same clusters for both (Ward, cluster size 10), factors (1.1, 0.9, 0).

Subjects: the paper's MLP (784-512-256-10) and a LeNet-5-style CNN (tanh) trained briefly on
MNIST-5k (4,000 training images), float32, one thread.

    python bench/bench_mutation.py [--epochs 3] [--batch 500] [--samples 4000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, save_rows  # noqa: E402

from neuslice.decomposition.clustering import cluster_units  # noqa: E402
from neuslice.decomposition.incite import mutation_scores, reference_mutation_scores  # noqa: E402
from neuslice.experiments.data import load_mnist5k, make_loader  # noqa: E402
from neuslice.experiments.models import MLP  # noqa: E402
from neuslice.experiments.reproduce_incite import LeNet5  # noqa: E402
from neuslice.experiments.train import seed_everything, train_classifier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="runs of each route, alternating; the fastest is reported (the "
        "machine is shared: noise only ever adds time)",
    )
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, _ = load_mnist5k()
    subset = torch.utils.data.Subset(train, range(min(args.samples, len(train))))
    loader = make_loader(subset, batch_size=args.batch)
    rows = []
    for name, build in (("mlp", MLP), ("lenet5", LeNet5)):
        seed_everything(0)
        model, _ = train_classifier(
            build(), train, epochs=args.epochs, seed=0, device="cpu", progress=False
        )
        clusters = cluster_units(model, cluster_size=10)
        mutants = 3 * sum(int(c.max()) + 1 for c in clusters.values())
        times: dict[str, float] = {}
        scores = {}
        runs = {"reference": lambda: reference_mutation_scores(model, loader, clusters=clusters)}
        for delta in (False, True):
            runs[f"neuslice delta={delta}"] = lambda d=delta: mutation_scores(
                model, loader, clusters=clusters, delta=d, progress=False
            )
        for _ in range(args.repeats):
            for key, fn in runs.items():
                t0 = time.perf_counter()
                scores[key] = fn()
                times[key] = min(times.get(key, float("inf")), time.perf_counter() - t0)
        for key in times:
            if key == "reference":
                continue
            diff = max(
                float((scores[key][k] - scores["reference"][k]).abs().max()) for k in clusters
            )
            differing = sum(
                int((scores[key][k] != scores["reference"][k]).any(0).sum()) for k in clusters
            )
            total = sum(float(scores["reference"][k].sum()) for k in clusters)
            rows.append(
                {
                    "model": name,
                    "samples": len(subset),
                    "mutants": mutants,
                    "method": key,
                    "reference_s": round(times["reference"], 3),
                    "neuslice_s": round(times[key], 3),
                    "speedup": round(times["reference"] / times[key], 2),
                    "max_score_diff": diff,
                    "units_differing": differing,
                    "reference_score_total": total,
                }
            )
    print(
        f"{'model':8} {'mutants':>7} {'method':22} {'reference s':>11} {'neuslice s':>10} "
        f"{'speed-up':>8} {'max |Δscore|':>12} {'units ≠':>7} {'Σ ref score':>11}"
    )
    for r in rows:
        print(
            f"{r['model']:8} {r['mutants']:>7} {r['method']:22} {r['reference_s']:>11.2f} "
            f"{r['neuslice_s']:>10.2f} {r['speedup']:>7.1f}x {r['max_score_diff']:>12g} "
            f"{r['units_differing']:>7} {r['reference_score_total']:>11.0f}"
        )
    env = environment()
    print(
        f"# {env['device']}, torch {env['torch']}, {env['threads']} thread(s), "
        f"{len(subset)} samples, batch {args.batch}"
    )
    print("saved", save_rows("bench_mutation", rows, env, args.out))


if __name__ == "__main__":
    main()
