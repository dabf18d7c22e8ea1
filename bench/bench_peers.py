"""The CKA scan as a user would write it today with a public CKA library, vs neuslice.

For each prefix of the contribution order, call ``ckatorch.cka_base(X[:, prefix], X)`` (linear
kernel, biased) — one library call per step — and compare with neuslice's prefix route
(``neuron_hsic`` + ``prefix_curve``) on the same activations: time, ratio, and the largest
difference between the two curves. Scans longer than ``--budget`` seconds are timed on a sample
of steps and extrapolated (marked ``extrap``).

    pip install ckatorch && python bench/bench_peers.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from neuslice import cka

sys.path.insert(0, os.path.dirname(__file__))
from _common import environment, save_rows  # noqa: E402
from bench_scan import activations, median_time  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=[1000])
    ap.add_argument("--d", type=int, nargs="*", default=[64, 256, 512])
    ap.add_argument("--budget", type=float, default=60.0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    try:
        from ckatorch import cka_base
    except ImportError:
        raise SystemExit("this benchmark needs ckatorch: pip install ckatorch")
    env = environment()
    print(json.dumps(env))
    print(
        f"{'n':>5} {'d':>5} {'step':>4} {'neuslice s':>11} {'ckatorch s':>11} {'mode':>7} "
        f"{'ratio':>8} {'max |diff|':>11}"
    )
    rows = []
    for n in args.n:
        for d in args.d:
            x = activations(n, d).float()
            order = torch.argsort(x.var(0), descending=True)
            for step in sorted({1, max(1, math.ceil(d / 100))}):
                sizes = list(range(step, d + 1, step))
                if sizes[-1] != d:
                    sizes.append(d)
                ours_s = median_time(
                    lambda: cka.prefix_curve(cka.neuron_hsic(x, route="feature"), order), 3
                )
                ours = cka.prefix_curve(cka.neuron_hsic(x.double(), route="feature"), order)[
                    torch.tensor(sizes) - 1
                ]
                probe = sizes[:: max(1, len(sizes) // 8)]
                t0 = time.perf_counter()
                theirs = {k: float(cka_base(x[:, order[:k]], x)) for k in probe}
                probe_s = time.perf_counter() - t0
                estimate = probe_s * len(sizes) / len(probe)
                mode = "extrap"
                if estimate <= args.budget:
                    t0 = time.perf_counter()
                    theirs = {k: float(cka_base(x[:, order[:k]], x)) for k in sizes}
                    estimate, mode = time.perf_counter() - t0, "full"
                diff = max(abs(theirs[k] - float(ours[sizes.index(k)])) for k in theirs)
                row = {
                    "n": n,
                    "d": d,
                    "step": step,
                    "neuslice_s": ours_s,
                    "ckatorch_s": estimate,
                    "mode": mode,
                    "ratio": estimate / ours_s,
                    "max_abs_diff": diff,
                }
                rows.append(row)
                print(
                    f"{n:>5} {d:>5} {step:>4} {ours_s:>11.4f} {estimate:>11.2f} {mode:>7} "
                    f"{row['ratio']:>8.0f} {diff:>11.2e}",
                    flush=True,
                )
    save_rows("peers", rows, env, args.out)


if __name__ == "__main__":
    main()
