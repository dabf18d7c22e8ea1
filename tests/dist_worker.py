"""Worker for tests/test_distributed.py, launched with torchrun (or plain processes with the
torch.distributed environment variables set)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import build, make_data  # noqa: E402

import neuslice  # noqa: E402
from neuslice.experiments.data import CategoryGroupedSampler  # noqa: E402

N, BATCH, C = 48, 5, 3


def data():
    model = build("cnn")[0]
    x, y = make_data(N, "img", num_classes=C)
    return model, TensorDataset(x, y), y


def profile_all(out: Path, rank: int) -> None:
    model, ds, y = data()
    sampler = DistributedSampler(ds, shuffle=False)
    loader = DataLoader(ds, batch_size=BATCH, sampler=sampler)
    for route in ("feature", "minibatch"):
        p = neuslice.profile(model, loader, C, hsic_route=route, cka_batch=5, progress=False)
        p.save(out / f"{route}.rank{rank}.pt")
    grouped = CategoryGroupedSampler(y, shuffle=True, seed=1)
    p = neuslice.profile(
        model,
        DataLoader(ds, batch_size=BATCH, sampler=grouped),
        C,
        hsic_route="feature",
        category_order="grouped",
        progress=False,
    )
    p.save(out / f"grouped.rank{rank}.pt")
    torch.save({"any": list(sampler), "grouped": list(grouped)}, out / f"indices.rank{rank}.pt")


def die(out: Path, rank: int, stall: bool = False) -> None:
    model, ds, _ = data()
    loader = DataLoader(ds, batch_size=BATCH, sampler=DistributedSampler(ds, shuffle=False))

    def failing():
        for i, batch in enumerate(loader):
            if i == 1:
                if stall:  # alive but stuck (a hung data loader, a deadlocked worker...)
                    time.sleep(3600)
                raise RuntimeError("simulated failure on rank 1")
            yield batch

    start = time.monotonic()
    try:
        neuslice.profile(model, failing() if rank == 1 else loader, C, progress=False)
        (out / f"rank{rank}.txt").write_text("finished")
    except Exception as exc:
        (out / f"rank{rank}.txt").write_text(
            f"{type(exc).__name__}\n{time.monotonic() - start:.1f}\n{exc}"
        )
        if rank == 1:
            os._exit(1)  # die like a crashed worker: no clean shutdown


def grouped_checkpoint(out: Path, rank: int, resume: bool) -> None:
    """Grouped order with a checkpoint every round; crash part-way, or resume."""
    model, ds, y = data()
    loader = DataLoader(
        ds, batch_size=BATCH, sampler=CategoryGroupedSampler(y, shuffle=True, seed=1)
    )

    def crash_at(k):
        for i, batch in enumerate(loader):
            if i == k:
                raise RuntimeError("simulated crash")
            yield batch

    kw = dict(
        hsic_route="feature",
        category_order="grouped",
        progress=False,
        checkpoint=out / "g.ckpt",
        checkpoint_every=1,
    )
    if resume:
        p = neuslice.profile(model, loader, C, resume=out / "g.ckpt", **kw)
        p.save(out / f"gresumed.rank{rank}.pt")
        return
    try:
        neuslice.profile(model, crash_at(3 + rank), C, **kw)
    except Exception as exc:
        (out / f"crash{rank}.txt").write_text(type(exc).__name__)
        os._exit(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["profile", "die", "stall", "gcrash", "gresume"])
    ap.add_argument("out")
    ap.add_argument("--timeout", type=float, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    out = Path(args.out)
    rank = dist.get_rank()
    if args.mode == "profile":
        profile_all(out, rank)
    elif args.mode in ("gcrash", "gresume"):
        grouped_checkpoint(out, rank, resume=args.mode == "gresume")
    else:
        die(out, rank, stall=args.mode == "stall")
    if args.mode in ("profile", "gresume"):
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
