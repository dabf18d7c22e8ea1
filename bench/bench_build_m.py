"""Building the neuron-HSIC matrix: every live backend vs the PyTorch reference.

Layer shapes of VGG-16 and ResNet-50 at CIFAR (32x32) and ImageNet (224x224) resolution, one
category minibatch of ``--n`` samples each. For every backend that can run on the device:
median time, achieved FLOP/s and its fraction of the device's measured float32 matmul rate
(TF32 off), peak extra memory, and the error against a float64 reference.

    python bench/bench_build_m.py                  # CPU: torch (+ cpp if the extension is built)
    python bench/bench_build_m.py --device cuda    # GPU: cuda, triton, torch
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from neuslice import ops
from neuslice.ops import reference

sys.path.insert(0, os.path.dirname(__file__))
from _common import environment, save_rows  # noqa: E402


@dataclass(frozen=True)
class Shape:
    model: str
    layer: str
    d: int
    hw: int  # spatial side; s = hw * hw

    @property
    def s(self) -> int:
        return self.hw * self.hw


SHAPES = (
    Shape("vgg16-cifar", "conv1_2", 64, 32),
    Shape("vgg16-cifar", "conv3_3", 256, 8),
    Shape("vgg16-cifar", "conv5_3", 512, 2),
    Shape("vgg16-cifar", "fc", 512, 1),
    Shape("resnet50-cifar", "layer1", 256, 32),
    Shape("resnet50-cifar", "layer4", 2048, 4),
    Shape("vgg16-imagenet", "conv3_3", 256, 56),
    Shape("vgg16-imagenet", "conv5_3", 512, 14),
    Shape("vgg16-imagenet", "fc7", 4096, 1),
    Shape("resnet50-imagenet", "layer3", 1024, 14),
    Shape("resnet50-imagenet", "layer4", 2048, 7),
)


def flops(n: int, d: int, s: int, route: str) -> float:
    if route == "feature":
        return 2.0 * n * (d * s) ** 2
    return 2.0 * d * n * n * s + 2.0 * d * d * n * n


def matmul_rate(device: str) -> float:
    size = 4096 if device == "cuda" else 2048
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.backends.cuda.matmul.allow_tf32 = False
    t = timed(lambda: a @ b, device, 5)
    return 2.0 * size**3 / t


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


_CPU_PEAK = """
import sys, torch
from neuslice import ops
def hwm():  # peak resident size of this process image (ru_maxrss would include the parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
n, d, s, route, backend, dtype = sys.argv[1:]
x = torch.randn(int(n), int(d), int(s), dtype=getattr(torch, dtype)).relu_()
x.sub_(x.float().mean(0).to(x.dtype))  # in place: the input is the largest allocation so far
before = hwm()
ops.block_gram_norms(x, route, backend=backend)
print(hwm() - before)
"""


def peak_extra_memory(fn, device: str, cpu_args: list[str]) -> int | None:
    """Peak memory the op needs beyond its input: the CUDA allocator's peak, or on the CPU the
    growth of the peak resident size of a fresh process that runs the op once."""
    if device != "cuda":
        out = subprocess.run(
            [sys.executable, "-c", _CPU_PEAK, *cpu_args], capture_output=True, text=True
        )
        return int(out.stdout.strip()) if out.returncode == 0 else None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=128, help="samples per category minibatch")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--models", nargs="*", default=None, help="e.g. vgg16-cifar")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    dev, dtype = args.device, getattr(torch, args.dtype)
    env = environment()
    rate = matmul_rate(dev)
    env["matmul_gflops_fp32"] = rate / 1e9
    print(json.dumps(env))
    print(
        f"{'model':<18}{'layer':<9}{'d':>5}{'s':>6}{'route':>8}{'backend':>8}{'ms':>10}"
        f"{'GFLOP/s':>9}{'%mm':>6}{'x torch':>8}{'MiB':>8}{'rel err':>10}"
    )
    rows = []
    for shape in SHAPES:
        if args.models and shape.model not in args.models:
            continue
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(args.n, shape.d, shape.s, device=dev, generator=g).relu_()
        x = (x - x.mean(0)).to(dtype)
        route = reference.block_gram_route(args.n, shape.d, shape.s)
        want = reference.block_gram_norms(x.double(), route)
        base_t = None
        for name in ("torch", "cpp", "cuda", "triton"):
            b = ops.BACKENDS[name]
            if b.not_supported_reasons(x):
                continue
            if name == "triton" and dev == "cpu":
                continue  # the CPU interpreter is for correctness only
            fn = lambda x=x, name=name: ops.block_gram_norms(x, route, backend=name)  # noqa: E731
            t = timed(fn, dev, args.repeats)
            mem = peak_extra_memory(
                fn, dev, [str(args.n), str(shape.d), str(shape.s), route, name, args.dtype]
            )
            got = fn().double()
            err = float((got - want).abs().max() / want.abs().max())
            base_t = base_t or t
            f = flops(args.n, shape.d, shape.s, route)
            row = dict(
                asdict(shape),
                s=shape.s,
                n=args.n,
                route=route,
                backend=name,
                seconds=t,
                gflops=f / t / 1e9,
                fraction_of_matmul=f / t / rate,
                speedup_vs_torch=base_t / t,
                peak_mib=None if mem is None else mem / 2**20,
                rel_err=err,
                dtype=args.dtype,
            )
            rows.append(row)
            print(
                f"{shape.model:<18}{shape.layer:<9}{shape.d:>5}{shape.s:>6}{route:>8}{name:>8}"
                f"{1e3 * t:>10.2f}{row['gflops']:>9.1f}{100 * row['fraction_of_matmul']:>5.0f}%"
                f"{row['speedup_vs_torch']:>8.2f}"
                f"{'-' if mem is None else format(mem / 2**20, '.1f'):>8}{err:>10.1e}",
                flush=True,
            )
        del x, want
    save_rows(f"build_m_{dev}", rows, env, args.out)


if __name__ == "__main__":
    main()
