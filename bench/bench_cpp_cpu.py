"""C++ extension vs PyTorch reference for ``block_gram_norms`` on the CPU.

Side by side, same input, warmed-up median wall time of ``neuslice.ops.reference`` and of
``torch.ops.neuslice.block_gram_norms`` (the ``cpp`` backend), for dense layers (s = 1) and conv
layers (both routes), with the speed-up and the relative difference of the two results.

    python bench/bench_cpp_cpu.py [--threads N] [--dtype float32|float64] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from neuslice.ops import reference

DENSE = [(1000, d, 1, "feature") for d in (256, 512, 2048)]
CONV = [
    (128, d, s, route) for d in (64, 128, 256) for s in (49, 196) for route in ("feature", "sample")
]


def median_time(fn, budget: float) -> tuple[float, int]:
    """Median seconds of ``fn()`` after one warm-up call; 3..15 repetitions within ``budget``."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    reps = int(min(15, max(3, budget / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timing per cell")
    ap.add_argument("--quick", action="store_true", help="skip the largest shapes")
    args = ap.parse_args()
    try:
        import neuslice._C  # noqa: F401  registers torch.ops.neuslice
    except ImportError as exc:
        sys.exit(f"neuslice._C is not built ({exc}); pip install --no-build-isolation -e .")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    op = torch.ops.neuslice.block_gram_norms
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.dtype}"
    )
    print(
        f"{'n':>5} {'d':>5} {'s':>4} {'route':>8} {'torch ms':>10} {'cpp ms':>10} "
        f"{'speed-up':>9} {'rel diff':>9}"
    )
    shapes = DENSE + CONV
    if args.quick:
        shapes = [sh for sh in shapes if sh[0] * (sh[1] * sh[2]) ** 2 < 5e10]
    g = torch.Generator().manual_seed(0)
    for n, d, s, route in shapes:
        x = torch.randn(n, d, s, generator=g, dtype=dtype)
        ref = reference.block_gram_norms(x, route)
        out = op(x, route)
        diff = ((out - ref).abs().max() / ref.abs().max()).item()
        t_ref, _ = median_time(lambda: reference.block_gram_norms(x, route), args.budget)
        t_cpp, _ = median_time(lambda: op(x, route), args.budget)
        print(
            f"{n:>5} {d:>5} {s:>4} {route:>8} {t_ref * 1e3:>10.2f} {t_cpp * 1e3:>10.2f} "
            f"{t_ref / t_cpp:>8.2f}x {diff:>9.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
