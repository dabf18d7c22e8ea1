"""Profile the paper's MLP on MNIST-5k with several processes and slice it.

    torchrun --nproc-per-node=2 examples/profile_distributed.py            # 2 ranks, gloo
    torchrun --nproc-per-node=2 examples/profile_distributed.py --grouped  # sorted by category
    python examples/profile_distributed.py                                 # 1 process, same result

Each rank profiles its shard (DistributedSampler, or CategoryGroupedSampler with --grouped);
neuslice.profile all-reduces the statistics, so every rank holds the single-process profile.
Checkpoints go to --checkpoint (one file per rank); rerun with --resume after a crash.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

import neuslice
from neuslice.experiments.data import CategoryGroupedSampler, load_mnist5k
from neuslice.experiments.models import MLP


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--grouped", action="store_true", help="category-grouped order (bounded HSIC memory)"
    )
    ap.add_argument("--checkpoint", default=None, help="checkpoint path (every 5 batches)")
    ap.add_argument("--resume", action="store_true", help="resume from --checkpoint")
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument(
        "--metric",
        default="deeplift",
        help="deeplift/avg/var/ens are sums over samples: identical for any number of "
        "ranks; taylor is defined per batch, so it follows the ranks' batches",
    )
    args = ap.parse_args()
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo", timeout=timedelta(minutes=5))
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(0)
    model = MLP().eval()  # untrained weights are enough to show the mechanics
    train, _ = load_mnist5k()
    labels = train.tensors[1]
    sampler = (
        CategoryGroupedSampler(labels)
        if args.grouped
        else DistributedSampler(train, shuffle=False)
        if distributed
        else None
    )
    loader = DataLoader(train, batch_size=128, sampler=sampler)
    prof = neuslice.profile(
        model,
        loader,
        10,
        category_order="grouped" if args.grouped else "any",
        checkpoint=args.checkpoint,
        checkpoint_every=5,
        resume=args.checkpoint if args.resume else None,
        progress=rank == 0,
    )
    sl = neuslice.semantic_slice(prof, args.metric, args.threshold, criterion="layer_cka")
    if rank == 0:
        n = int(prof.counts().sum())
        print(
            f"profiled {n} images on {dist.get_world_size() if distributed else 1} process(es); "
            f"{sl}; compression rate {sl.compression_rate(model):.1%}"
        )
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
