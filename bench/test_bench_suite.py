"""pytest-benchmark suite: ``pytest bench/test_bench_suite.py --benchmark-only``.

Small, fast configurations of the scripts' comparisons, grouped so that pytest-benchmark's
table shows each baseline beside the route that replaces it.
"""

import os
import sys

import pytest
import torch

from neuslice import cka, ops

pytest.importorskip("pytest_benchmark")
sys.path.insert(0, os.path.dirname(__file__))
from bench_scan import activations  # noqa: E402

X = activations(500, 128)
ORDER = torch.argsort(X.var(0), descending=True)


@pytest.mark.benchmark(group="scan n=500 d=128 step=1")
def test_scan_prefix(benchmark):
    benchmark(lambda: cka.prefix_curve(cka.neuron_hsic(X, route="feature"), ORDER))


@pytest.mark.benchmark(group="scan n=500 d=128 step=1")
def test_scan_naive(benchmark):
    benchmark.pedantic(lambda: cka.naive_curve(X, ORDER, step=1), rounds=2, iterations=1)


CONV = torch.randn(128, 64, 49).relu_()
CONV = CONV - CONV.mean(0)


@pytest.mark.parametrize("backend", ["torch", "cpp", "cuda", "triton"])
@pytest.mark.benchmark(group="block_gram_norms n=128 d=64 s=49")
def test_block_gram_norms(benchmark, backend):
    reasons = ops.BACKENDS[backend].not_supported_reasons(CONV)
    if reasons or (backend == "triton" and CONV.device.type == "cpu"):
        pytest.skip("; ".join(reasons) or "Triton runs on the CPU only in the interpreter")
    benchmark(lambda: ops.block_gram_norms(CONV, backend=backend))
