"""Files written before the package reorganisation (tests/data/v0_1, made by neuslice 0.1.0 with
the flat layout) still load and resume; checkpoint misuse is explained."""

from __future__ import annotations

import logging
import pathlib
import shutil

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import neuslice
from neuslice.runtime import checkpoint as ckpt

DATA = pathlib.Path(__file__).parent / "data" / "v0_1"


def _model_and_loader():
    # the model and data tests/data/v0_1 was written with
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )
    x = torch.randn(24, 1, 8, 8)
    y = torch.arange(24) % 3
    model.load_state_dict(torch.load(DATA / "model.pt", weights_only=True))
    return model, DataLoader(TensorDataset(x, y), batch_size=8)


def test_old_profile_and_slice_load_and_agree_with_a_new_run():
    model, loader = _model_and_loader()
    old = neuslice.Profile.load(DATA / "profile.pt")
    new = neuslice.profile(model, loader, 3, progress=False)
    assert old.layers == new.layers and old.num_neurons == new.num_neurons
    for key, t in new.tensors.items():
        # float32 products accumulated in float64: agree to float32 precision, on any BLAS
        torch.testing.assert_close(old.tensors[key], t, rtol=1e-4, atol=1e-6, equal_nan=True)
    sl = neuslice.Slice.load(DATA / "slice.json")
    again = neuslice.semantic_slice(new, "taylor", 0.9, criterion="layer_cka")
    assert {k: v.tolist() for k, v in sl.masks.items()} == {
        k: v.tolist() for k, v in again.masks.items()
    }
    assert abs(sl.compression_rate(model) - again.compression_rate(model)) < 1e-12


def test_old_checkpoint_resumes(tmp_path):
    model, loader = _model_and_loader()
    shutil.copy(DATA / "run.ckpt", tmp_path / "run.ckpt")
    resumed = neuslice.profile(model, loader, 3, resume=tmp_path / "run.ckpt", progress=False)
    plain = neuslice.profile(model, loader, 3, progress=False)
    for key, t in plain.tensors.items():
        # the checkpoint's statistics were computed by the old code: float32 precision
        torch.testing.assert_close(resumed.tensors[key], t, rtol=1e-4, atol=1e-6, equal_nan=True)


def test_checkpoint_every_beyond_the_run_warns(tmp_path, caplog):
    model, loader = _model_and_loader()
    with caplog.at_level(logging.WARNING, logger="neuslice.profiling"):
        neuslice.profile(
            model, loader, 3, checkpoint=tmp_path / "c.ckpt", checkpoint_every=500, progress=False
        )
    assert "checkpoint_every=500 exceeds the 3 batches" in caplog.text
    assert not (tmp_path / "c.ckpt").exists()


def test_resume_with_another_world_size_names_the_rank_files(tmp_path):
    model, loader = _model_and_loader()
    for r in range(2):
        shutil.copy(DATA / "run.ckpt", ckpt.rank_path(tmp_path / "p.ckpt", r, 2))
    with pytest.raises(
        FileNotFoundError,
        match=r"p\.ckpt\.rank0-of-2.*p\.ckpt\.rank1-of-2.*"
        r"launch 2 process",
    ):
        neuslice.profile(model, loader, 3, resume=tmp_path / "p.ckpt", progress=False)
