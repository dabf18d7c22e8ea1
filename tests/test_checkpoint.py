"""Checkpoint and resume: atomic writes, the same result as an uninterrupted run, refusal of
checkpoints from another model, configuration or data order, and a full disk."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import neuslice
from neuslice.runtime import checkpoint as ckpt

sys.path.insert(0, os.path.dirname(__file__))
from ckpt_worker import C, KW, setup  # noqa: E402

WORKER = Path(__file__).with_name("ckpt_worker.py")


def _interrupted(batches, stop_after):
    for i, b in enumerate(batches):
        if i == stop_after:
            raise KeyboardInterrupt  # a crash part-way through
        yield b


def _same(a: neuslice.Profile, b: neuslice.Profile) -> None:
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k


@pytest.mark.parametrize(
    "options",
    [
        dict(KW),
        dict(hsic_route="feature", progress=False),
        dict(hsic_route="minibatch", cka_batch=5, category_order="grouped", progress=False),
    ],
)
def test_resume_equals_uninterrupted(tmp_path, options):
    model, batches = setup()
    if options.get("category_order") == "grouped":  # sort the stream by category
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        order = torch.argsort(y, stable=True)
        x, y = x[order], y[order]
        batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, len(y), 4)]
    full = neuslice.profile(model, batches, C, **options)
    path = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        neuslice.profile(
            model, _interrupted(batches, 7), C, checkpoint=path, checkpoint_every=3, **options
        )
    assert ckpt.load(path)["batches"] == 6
    resumed = neuslice.profile(
        model, batches, C, resume=path, checkpoint=path, checkpoint_every=3, **options
    )
    _same(resumed, full)


@pytest.mark.slow
def test_killed_process_resumes(tmp_path):
    path = tmp_path / "killed.ckpt"
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(path), "0.3"], env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if path.exists() and ckpt.load(path)["batches"] >= 4:
                break
            assert proc.poll() is None, "the worker ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint appeared")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    done = ckpt.load(path)["batches"]
    model, batches = setup()
    assert 4 <= done < len(batches)
    resumed = neuslice.profile(model, batches, C, resume=path, **KW)
    _same(resumed, neuslice.profile(model, batches, C, **KW))


@pytest.mark.parametrize(
    "change,reason",
    [
        ("weights", "weights differ"),
        ("config", "configuration differs"),
        ("order", "different data or a different order"),
        ("model", "different model architecture"),
        ("short", "yields only"),
    ],
)
def test_resume_refuses_other_runs(tmp_path, change, reason):
    model, batches = setup()
    path = tmp_path / "a.ckpt"
    with pytest.raises(KeyboardInterrupt):
        neuslice.profile(
            model, _interrupted(batches, 5), C, checkpoint=path, checkpoint_every=2, **KW
        )
    kw = dict(KW)
    if change == "weights":
        with torch.no_grad():
            next(model.parameters()).add_(1e-3)
    elif change == "config":
        kw["cka_batch"] = 7
    elif change == "order":
        batches = batches[1:2] + batches[:1] + batches[2:]
    elif change == "model":
        model = setup()[0][:-1]  # drop the head: another architecture
    elif change == "short":
        batches = batches[:2]
    with pytest.raises(ValueError, match=reason):
        neuslice.profile(model, batches, C, resume=path, **kw)


def test_resume_bad_files(tmp_path):
    model, batches = setup()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        neuslice.profile(model, batches, C, resume=tmp_path / "missing.ckpt", **KW)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable neuslice checkpoint"):
        neuslice.profile(model, batches, C, resume=bad, **KW)


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, batches = setup()
    path = tmp_path / "disk.ckpt"
    real_save = torch.save
    calls = [0]

    def save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] >= 2:  # the second checkpoint hits a full disk half-way through
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.warns(RuntimeWarning, match="No space left"):
        got = neuslice.profile(model, batches, C, checkpoint=path, checkpoint_every=4, **KW)
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.load(path)["batches"] == 4  # the previous checkpoint, intact
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    _same(got, neuslice.profile(model, batches, C, **KW))
