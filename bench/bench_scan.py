"""The semantic scan: prefix-sum route vs the paper's step-by-step recomputation.

For each (n, d, step) the script times, side by side in one run and on the same activations:

* ``floor``  — one covariance matmul ``XᵀX`` (the least any exact route must do);
* ``prefix`` — build the neuron-HSIC matrix ``M`` and take the CKA of every prefix
  (``neuron_hsic`` + ``prefix_curve``), then the minimal prefix for θ = 0.90 … 0.99;
* ``naive``  — ``naive_curve`` (a fresh Gram and CKA per step, as in the paper).

and checks that both routes select the same prefix for every θ. When the full naive scan would
exceed ``--budget`` seconds, it is timed on a sample of steps and extrapolated with its exact
cost model (step k costs a + b·k), and the selected prefixes are verified at the steps around
each crossing (marked ``extrap``/``spot``). Activations are ReLU features of a random low-rank
model, float64 (so that threshold crossings are decided exactly).

    python bench/bench_scan.py                     # the full grid
    python bench/bench_scan.py --n 1000 --d 512    # the headline point
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from neuslice import cka

sys.path.insert(0, os.path.dirname(__file__))
from _common import environment, save_rows  # noqa: E402

THRESHOLDS = tuple(round(0.90 + 0.01 * i, 2) for i in range(10))


@dataclass(frozen=True)
class Config:
    n: int
    d: int
    step: int


@dataclass
class Row:
    n: int
    d: int
    step: int
    floor_s: float
    prefix_s: float
    naive_s: float
    naive_mode: str
    speedup: float
    prefix_over_floor: float
    same_prefix: bool


def activations(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rank = max(4, d // 8)
    z = torch.randn(n, rank, generator=g, dtype=torch.float64)
    w = torch.randn(rank, d, generator=g, dtype=torch.float64)
    decay = torch.logspace(0, -2, d, dtype=torch.float64)  # neurons of decreasing strength
    return torch.relu(z @ w * decay + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64))


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def prefixes(curve: torch.Tensor, step: int, d: int) -> list[int]:
    """Selected prefix per θ on a curve sampled every ``step`` neurons (+ the last)."""
    return [cka.minimal_prefix(curve, t) for t in THRESHOLDS]


def run(cfg: Config, budget: float, repeats: int) -> Row:
    x = activations(cfg.n, cfg.d)
    order = torch.argsort(x.var(0), descending=True)
    xc = x - x.mean(0)
    floor = median_time(lambda: xc.T @ xc, repeats)

    def prefix_route():
        m = cka.neuron_hsic(x, route="feature")
        return cka.prefix_curve(m, order)

    prefix_s = median_time(prefix_route, repeats)
    full = prefix_route()
    sizes = list(range(cfg.step, cfg.d + 1, cfg.step))
    if sizes[-1] != cfg.d:
        sizes.append(cfg.d)
    sampled = full[torch.tensor(sizes) - 1]
    want = [sizes[i - 1] for i in prefixes(sampled, cfg.step, cfg.d)]

    # cost of the naive scan: one Gram of the whole layer, then step k costs about a + b*k
    t_all = median_time(lambda: xc @ xc.T, 1)
    probe = sorted({sizes[0], sizes[len(sizes) // 2], sizes[-1]})
    per_step = {}
    for k in probe:
        t0 = time.perf_counter()
        cka.naive_curve(x, order[:k], step=k)  # the whole-layer Gram + the step at k
        per_step[k] = time.perf_counter() - t0 - t_all
    ks = list(per_step)
    b = (per_step[ks[-1]] - per_step[ks[0]]) / max(1, ks[-1] - ks[0])
    a = per_step[ks[0]] - b * ks[0]
    estimate = t_all + sum(max(a + b * k, 0.0) for k in sizes)
    if estimate <= budget:
        t0 = time.perf_counter()
        got_sizes, naive = cka.naive_curve(x, order, step=cfg.step)
        naive_s = time.perf_counter() - t0
        got = [int(got_sizes[i - 1]) for i in prefixes(naive, cfg.step, cfg.d)]
        same = got == want and torch.allclose(naive, sampled, atol=1e-10, rtol=0)
        mode = "full"
    else:
        naive_s = estimate
        same = True
        for k_sel in want:  # verify each crossing: CKA(k) >= θ and CKA(k - step) < θ
            i = sizes.index(k_sel)
            ks_check = [sizes[i]] + ([sizes[i - 1]] if i > 0 else [])
            for k in ks_check:
                _, v = cka.naive_curve(x, order[:k], step=k)
                same &= abs(float(v[-1]) - float(full[k - 1])) < 1e-10
        mode = "extrap/spot"
    return Row(
        cfg.n,
        cfg.d,
        cfg.step,
        floor,
        prefix_s,
        naive_s,
        mode,
        naive_s / prefix_s,
        prefix_s / floor,
        bool(same),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=[500, 1000, 5000])
    ap.add_argument("--d", type=int, nargs="*", default=[64, 256, 512, 2048])
    ap.add_argument("--budget", type=float, default=60.0, help="max seconds per full naive scan")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    env = environment()
    print(json.dumps(env))
    head = (
        f"{'n':>5} {'d':>5} {'step':>4} {'floor s':>9} {'prefix s':>9} {'naive s':>10} "
        f"{'naive':>11} {'naive/prefix':>12} {'prefix/floor':>12} {'same':>5}"
    )
    print(head)
    rows = []
    for n in args.n:
        for d in args.d:
            for step in sorted({1, max(1, math.ceil(d / 100))}):
                r = run(Config(n, d, step), args.budget, args.repeats)
                rows.append(r)
                print(
                    f"{r.n:>5} {r.d:>5} {r.step:>4} {r.floor_s:>9.4f} {r.prefix_s:>9.4f} "
                    f"{r.naive_s:>10.2f} {r.naive_mode:>11} {r.speedup:>12.0f} "
                    f"{r.prefix_over_floor:>12.2f} {str(r.same_prefix):>5}",
                    flush=True,
                )
                if not r.same_prefix:
                    raise SystemExit(f"selected prefixes differ for {r}")
    save_rows("scan", [asdict(r) for r in rows], env, args.out)


if __name__ == "__main__":
    main()
