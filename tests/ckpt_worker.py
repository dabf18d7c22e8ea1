"""Worker for tests/test_checkpoint.py: profiles slowly with a checkpoint every batch, so the
test can kill it part-way."""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import build, make_data  # noqa: E402

import neuslice  # noqa: E402

C, N, BATCH = 3, 60, 4
KW = dict(hsic_route="minibatch", cka_batch=6, progress=False)


def setup():
    model = build("cnn")[0]
    x, y = make_data(N, "img", num_classes=C)
    return model, [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N, BATCH)]


def slow(batches, delay):
    for b in batches:
        time.sleep(delay)
        yield b


if __name__ == "__main__":
    torch.set_num_threads(1)
    model, batches = setup()
    neuslice.profile(
        model,
        slow(batches, float(sys.argv[2])),
        C,
        checkpoint=sys.argv[1],
        checkpoint_every=1,
        **KW,
    )
