"""Whole-model figure: seconds to semantic-slice VGG-16 on 10 categories x N images.

Random VGG-16 (BatchNorm, 32x32 inputs) and synthetic images with 10 labels: one profiling pass
with all five metrics and the neuron-HSIC matrices of all 14 sliced layers, then a semantic
slice per metric at θ = 0.95. On the CPU the default is a reduced run (``--per-class 100``)
whose time is extrapolated linearly to 1,000 images per class (profiling is one streaming pass,
linear in the number of images; slicing does not depend on it).

    python bench/bench_vgg16.py                     # GPU: 10 x 1000 images
    python bench/bench_vgg16.py --per-class 100     # CPU: reduced run + extrapolation
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import neuslice
from neuslice.experiments.zoo import cifar_vgg16

sys.path.insert(0, os.path.dirname(__file__))
from _common import environment, save_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--per-class", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    per_class = args.per_class or (1000 if args.device == "cuda" else 100)
    torch.manual_seed(0)
    model = cifar_vgg16().to(args.device).eval()
    n = 10 * per_class
    x = torch.randn(n, 3, 32, 32)
    y = torch.arange(10).repeat_interleave(per_class)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    env = environment()
    print(json.dumps(env))
    t0 = time.perf_counter()
    prof = neuslice.profile(model, loader, 10, device=args.device, backend=args.backend)
    t_profile = time.perf_counter() - t0
    t0 = time.perf_counter()
    kept = {}
    for metric in neuslice.METRICS:
        sl = neuslice.semantic_slice(prof, metric, 0.95, criterion="layer_cka")
        kept[metric] = sum(sl.kept().values())
    t_slice = time.perf_counter() - t0
    scale = 1000 / per_class
    row = {
        "device": args.device,
        "images": n,
        "profile_s": t_profile,
        "slice_s": t_slice,
        "images_per_s": n / t_profile,
        "timings": prof.timings,
        "routes": prof.hsic_routes,
        "kept_neurons": kept,
        "extrapolated_10x1000_s": t_profile * scale + t_slice,
    }
    print(f"VGG-16, {n} images (10 x {per_class}), all metrics + HSIC on {args.device}")
    print(
        f"  profile: {t_profile:.1f}s ({n / t_profile:.0f} images/s; forward+Taylor "
        f"{prof.timings['forward']:.1f}s, DeepLIFT {prof.timings['deeplift']:.1f}s)"
    )
    print(f"  semantic slices, 5 metrics x 14 layers x 10 categories: {t_slice:.2f}s")
    if per_class != 1000:
        print(f"  extrapolated to 10 x 1000 images: {row['extrapolated_10x1000_s']:.0f}s")
    save_rows(f"vgg16_{args.device}", [row], env, args.out)


if __name__ == "__main__":
    main()
