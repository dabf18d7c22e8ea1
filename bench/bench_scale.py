"""End-to-end scale benchmark: synthetic ImageNet-shaped data through VGG-19 and ResNet-50.

Random images with labels from 1,000 categories, sorted by category (the grouped order that
bounds memory), profiled with all metrics and the neuron-HSIC statistics, then semantic slices
of every category. Each configuration runs in a fresh process so that its peak host memory
(VmHWM) is its own. Two sweeps, each doubling one quantity:

* images (categories fixed): time should grow linearly, memory should stay flat;
* categories (``num_classes``; images fixed): per-category scores grow by ~6·C·d float64, the
  HSIC accumulators must not grow.

    python bench/bench_scale.py                              # CPU: reduced (112 px)
    python bench/bench_scale.py --size 224 --images 256 512 1024 --batch 64   # on a GPU

It also prints the up-front memory bound of the full-scale configuration (1,000 classes,
224x224, batch 64) from ``neuslice.estimate_profile_memory``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, save_rows  # noqa: E402

import neuslice  # noqa: E402
from neuslice.experiments import zoo  # noqa: E402

GiB = 2**30


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _batches(n, per_cat, size, batch, device, seed=0):
    """Category-sorted synthetic batches, generated on the fly (never all in memory)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) // per_cat
    for i in range(0, n, batch):
        y = labels[i : i + batch]
        x = torch.randn(y.numel(), 3, size, size, generator=g)
        yield x.to(device), y.to(device)


def run_one(cfg: dict) -> dict:
    """One configuration, in this process."""
    torch.manual_seed(0)
    device = torch.device(cfg["device"])
    model = zoo.build(cfg["model"], cfg["classes"]).to(device).eval()
    opts = dict(
        category_order="grouped",
        cka_batch=cfg["cka_batch"],
        progress=False,
        max_memory_gb=cfg["budget"],
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    prof = neuslice.profile(
        model,
        _batches(cfg["images"], cfg["per_cat"], cfg["size"], cfg["batch"], device),
        cfg["classes"],
        **opts,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    sl = neuslice.semantic_slice(prof, "taylor", 0.95, criterion="layer_cka")
    t2 = time.perf_counter()
    est = neuslice.estimate_profile_memory(
        model,
        torch.zeros(1, 3, cfg["size"], cfg["size"], device=device),
        cfg["classes"],
        category_order="grouped",
        cka_batch=cfg["cka_batch"],
        batch_size=cfg["batch"],
    )
    return {
        **cfg,
        "profile_s": t1 - t0,
        "images_per_s": cfg["images"] / (t1 - t0),
        "slice_all_s": t2 - t1,
        "finish_categories_s": prof.timings.get("hsic_finalize", 0.0),
        "peak_host_gib": _peak_rss() / GiB,
        "peak_device_gib": (
            torch.cuda.max_memory_allocated() / GiB if device.type == "cuda" else 0.0
        ),
        "estimate_gib": est.total / GiB,
        "kept": sum(sl.kept().values()),
        "categories_present": int((prof.counts() > 0).sum()),
    }


def _subprocess(cfg: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=["resnet50", "vgg19"])
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--images", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--classes", type=int, nargs="+", default=[250, 500, 1000])
    ap.add_argument("--per-cat", type=int, default=4, help="images per category")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cka-batch", type=int, default=8)
    ap.add_argument("--budget", type=float, default=20.0, help="max_memory_gb")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    if args.one:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        print(json.dumps(run_one(json.loads(args.one))))
        return
    env = environment()
    print(f"# scale benchmark on {env['device']} (torch {env['torch']}, commit {env['commit']})")
    base = dict(
        size=args.size,
        per_cat=args.per_cat,
        batch=args.batch,
        cka_batch=args.cka_batch,
        budget=args.budget,
        device=args.device,
    )
    rows = []
    header = (
        f"{'model':<9} {'sweep':<10} {'images':>6} {'classes':>7} {'img/s':>7} "
        f"{'profile s':>9} {'finish s':>8} {'slice s':>7} {'host GiB':>8} {'dev GiB':>7} "
        f"{'est GiB':>7}"
    )
    print(header)
    for model in args.models:
        plan = [("images", n, max(args.classes)) for n in args.images] + [
            ("classes", min(args.images), c) for c in args.classes[:-1]
        ]
        for sweep, n, c in plan:
            r = _subprocess({**base, "model": model, "images": n, "classes": c})
            r["sweep"] = sweep
            rows.append(r)
            print(
                f"{model:<9} {sweep:<10} {n:>6} {c:>7} {r['images_per_s']:7.2f} "
                f"{r['profile_s']:9.1f} {r['finish_categories_s']:8.2f} {r['slice_all_s']:7.2f} "
                f"{r['peak_host_gib']:8.2f} {r['peak_device_gib']:7.2f} {r['estimate_gib']:7.2f}",
                flush=True,
            )
        pts = [r for r in rows if r["model"] == model and r["sweep"] == "images"]
        for a, b in zip(pts, pts[1:]):
            print(
                f"  {model}: images x{b['images'] / a['images']:.0f} -> time "
                f"x{b['profile_s'] / a['profile_s']:.2f}, host memory "
                f"x{b['peak_host_gib'] / a['peak_host_gib']:.2f}"
            )
    print("\n# up-front memory bound, full scale (224x224, 1000 classes, batch 64, grouped):")
    for model in args.models:
        m = zoo.build(model, 1000).eval()
        for cka_batch in (128, 32):
            est = neuslice.estimate_profile_memory(
                m,
                torch.zeros(1, 3, 224, 224),
                1000,
                category_order="grouped",
                batch_size=64,
                cka_batch=cka_batch,
            )
            print(f"{model} cka_batch={cka_batch}: {est.table(3)}")
            rows.append(
                {
                    "model": model,
                    "sweep": "bound",
                    "cka_batch": cka_batch,
                    "estimate_gib": est.total / GiB,
                    "parts_gib": {k: v / GiB for k, v in est.parts.items()},
                }
            )
    print("saved", save_rows("scale", rows, env, args.out))


if __name__ == "__main__":
    main()
