"""Triton ``block_gram_norms`` kernels against the float64 PyTorch reference.

Without CUDA the kernels run under the Triton CPU interpreter (set before triton is imported);
shapes are small and awkward (masks, several tiles, several sample chunks) to keep that quick.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import neuslice.ops  # noqa: E402
from conftest import max_abs_err  # noqa: E402
from neuslice.ops import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROUTES = ("feature", "sample")
# (n, d, s): s = 1, n over one sample chunk, d over one tile (mirroring), n < 16, large s.
SHAPES = [(37, 13, 1), (123, 5, 7), (20, 33, 3), (9, 17, 1), (6, 70, 2), (50, 3, 49)]
SMALL = [(37, 13, 1), (123, 5, 7), (6, 70, 2), (21, 9, 11)]


@pytest.fixture(scope="module")
def bg():
    from neuslice.kernels import block_gram

    return block_gram


def _randn(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) + 0.2).to(dtype).to(DEVICE)


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return max_abs_err(got, want)


def _scale(want: torch.Tensor) -> float:
    return float(want.double().abs().max())


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_matches_float64_reference(bg, shape, route):
    x = _randn(shape, seed=sum(shape))
    got = bg.block_gram_norms(x, route)
    want = reference.block_gram_norms(x.double(), route)
    assert got.dtype == torch.float32 and got.shape == (shape[1], shape[1])
    assert got.device == x.device
    assert _err(got, want) <= 1e-4 * _scale(want)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "shape, dtype",
    [(s, torch.bfloat16) for s in SHAPES] + [(s, torch.float16) for s in SMALL],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)[6:],
)
def test_half_inputs_accumulate_in_float32(bg, shape, route, dtype):
    x = _randn(shape, seed=7 + sum(shape), dtype=dtype)
    got = bg.block_gram_norms(x, route)
    want = reference.block_gram_norms(x.double(), route)  # exact for the rounded inputs
    torch_fp32 = reference.block_gram_norms(x.float(), route)
    scale = _scale(want)
    assert got.dtype == torch.float32
    assert _err(got, want) <= 1e-2 * scale
    assert _err(got, want) <= 2 * _err(torch_fp32, want) + 1e-6 * scale


@pytest.mark.parametrize("route", ROUTES)
def test_accumulate_into_adds_scaled(bg, route):
    x = _randn((29, 19, 3), seed=11)
    out = _randn((19, 19), seed=12)
    start = out.clone()
    res = bg.accumulate_into(out, x, route, scale=0.5)
    assert res is out
    want = start.double() + 0.5 * reference.block_gram_norms(x.double(), route).to(DEVICE)
    assert _err(out, want) <= 1e-4 * _scale(want)
    bg.accumulate_into(out, x, route)  # default scale 1
    want = want + reference.block_gram_norms(x.double(), route).to(DEVICE)
    assert _err(out, want) <= 1e-4 * _scale(want)


@pytest.mark.parametrize("route", ROUTES)
def test_non_contiguous_input(bg, route):
    base = _randn((4, 31, 22), seed=5)  # (s, n, d) storage
    x = base.permute(1, 2, 0)  # (n, d, s) view with no unit stride on s
    assert not x.is_contiguous()
    got = bg.block_gram_norms(x, route)
    want = reference.block_gram_norms(x.double(), route)
    assert _err(got, want) <= 1e-4 * _scale(want)


def test_rejects_bad_input(bg):
    x = _randn((5, 3, 2), seed=1)
    with pytest.raises(TypeError):
        bg.block_gram_norms(x.double(), "feature")
    with pytest.raises(ValueError):
        bg.block_gram_norms(x, "auto")
    with pytest.raises(ValueError):
        bg.block_gram_norms(x[0], "feature")
    with pytest.raises(ValueError):
        bg.accumulate_into(torch.zeros(4, 4, device=DEVICE), x, "feature")
    with pytest.raises(ValueError):
        bg.accumulate_into(torch.zeros(3, 3, dtype=torch.float64, device=DEVICE), x, "sample")


@pytest.mark.parametrize("route", ["auto", *ROUTES])
def test_dispatcher_runs_triton(route):
    x = _randn((24, 10, 5), seed=3)
    assert neuslice.ops.select(x, "triton").name == "triton"
    got = neuslice.ops.block_gram_norms(x, route=route, backend="triton")
    want = reference.block_gram_norms(x.double(), "feature")
    assert got.dtype == torch.float32
    assert _err(got, want) <= 1e-4 * _scale(want)
