"""The native extension neuslice._C against the float64 PyTorch reference.

Skipped as a whole when the extension is not built; the CUDA tests also need a GPU and an
extension compiled with CUDA kernels.
"""

import pytest
import torch

_C = pytest.importorskip("neuslice._C", reason="native extension neuslice._C not built")

from conftest import max_rel_err  # noqa: E402
from neuslice import ops  # noqa: E402
from neuslice.ops import reference  # noqa: E402

op = torch.ops.neuslice.block_gram_norms
ROUTES = ("feature", "sample")
AWKWARD = [(37, 13, 1), (123, 5, 7), (20, 33, 3), (9, 17, 1), (50, 3, 49)]
# Shapes that reach the tiling paths: row blocks + mirror for s == 1, several feature tiles,
# covariance rows split within a neuron (s > 256), tiled V V^T in the sample route (d > 128).
TILED = [(10, 530, 1), (16, 70, 5), (6, 3, 300), (12, 150, 2)]

with_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _C.WITH_CUDA),
    reason="needs a GPU and an extension built with CUDA",
)


def _x(shape, seed, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _rel_err(got, want):
    return max_rel_err(got, want)


def test_module_flag_and_op_registered():
    assert isinstance(_C.WITH_CUDA, bool)
    assert hasattr(torch.ops.neuslice, "block_gram_norms")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("shape", AWKWARD + TILED)
def test_float32_and_float64_match_reference(shape, route):
    x = _x(shape, seed=sum(shape))
    want = reference.block_gram_norms(x, "feature")
    got64 = op(x, route)
    assert got64.dtype == torch.float64 and got64.shape == (shape[1], shape[1])
    assert _rel_err(got64, want) <= 1e-10
    for got in (op(x.float(), route), ops.block_gram_norms(x.float(), route, backend="cpp")):
        assert got.dtype == torch.float32
        assert _rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("shape", AWKWARD)
def test_half_inputs_accumulate_in_float32(shape, route, dtype):
    xh = _x(shape, seed=7 + sum(shape), dtype=dtype)
    exact = reference.block_gram_norms(xh.double(), "feature")  # of the rounded inputs
    got = op(xh, route)
    assert got.dtype == torch.float32
    torch_err = (reference.block_gram_norms(xh, route).double() - exact).abs().max().item()
    our_err = (got.double() - exact).abs().max().item()
    assert our_err <= 2 * torch_err + 1e-6 * exact.abs().max().item()


@pytest.mark.parametrize("route", ROUTES)
def test_non_contiguous_input_through_dispatcher(route):
    x = _x((7, 30, 4), seed=3).permute(2, 1, 0)  # (4, 30, 7) view, not contiguous
    assert not x.is_contiguous()
    want = reference.block_gram_norms(x.contiguous(), route)
    got = ops.block_gram_norms(x, route, backend="cpp")
    assert _rel_err(got, want) <= 1e-10
    assert _rel_err(op(x, route), want) <= 1e-10  # the op itself also accepts strided input


def test_several_threads_give_the_same_values():
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for shape in TILED + [(30, 40, 9)]:
            x = _x(shape, seed=11)
            want = reference.block_gram_norms(x, "feature")
            for route in ROUTES:
                assert _rel_err(op(x, route), want) <= 1e-10
    finally:
        torch.set_num_threads(old)


def test_result_does_not_require_grad():
    x = _x((6, 4, 2), seed=1).requires_grad_()
    got = op(x, "feature")
    assert not got.requires_grad
    assert _rel_err(got, reference.block_gram_norms(x.detach(), "feature")) <= 1e-10


def test_bad_arguments_raise():
    with pytest.raises(RuntimeError, match="route"):
        op(torch.randn(5, 3, 2), "diagonal")
    with pytest.raises(RuntimeError, match=r"\(n, d, s\)"):
        op(torch.randn(5, 3), "feature")
    with pytest.raises(RuntimeError, match="floating"):
        op(torch.ones(5, 3, 2, dtype=torch.int64), "feature")


def test_meta_impl_shape_and_dtype():
    assert op(torch.empty(5, 3, 2, device="meta"), "feature").shape == (3, 3)
    out = op(torch.empty(5, 4, 2, device="meta", dtype=torch.bfloat16), "sample")
    assert out.device.type == "meta" and out.shape == (4, 4) and out.dtype == torch.float32
    assert (
        op(torch.empty(2, 6, 1, device="meta", dtype=torch.float64), "feature").dtype
        == torch.float64
    )


def test_torch_compile_fullgraph():
    try:
        import torch._dynamo  # noqa: F401
        import torch._inductor  # noqa: F401
    except Exception as exc:  # pragma: no cover - platform without inductor
        pytest.skip(f"torch.compile unavailable ({exc})")

    def f(x):
        return torch.ops.neuslice.block_gram_norms(x * 2.0, "feature") + 1.0

    x = _x((11, 5, 3), seed=5, dtype=torch.float32)
    try:
        compiled = torch.compile(f, fullgraph=True, backend="inductor")
        got = compiled(x)
    except Exception as exc:
        if "compiler" in str(exc).lower() and "not found" in str(exc).lower():
            pytest.skip(f"no C++ compiler for inductor ({exc})")
        raise
    assert torch.allclose(got, f(x), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------- CUDA
@with_cuda
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("shape", AWKWARD + [(64, 130, 3), (33, 65, 1)])
def test_cuda_matches_reference(shape, route):
    x = _x(shape, seed=sum(shape))
    want = reference.block_gram_norms(x, "feature")
    assert _rel_err(op(x.cuda(), route), want) <= 1e-10
    got = op(x.float().cuda(), route)
    assert got.dtype == torch.float32 and got.is_cuda
    assert _rel_err(got, want) <= 1e-4
    assert _rel_err(ops.block_gram_norms(x.float().cuda(), route, backend="cuda"), want) <= 1e-4


@with_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("shape", AWKWARD)
def test_cuda_half_inputs(shape, route, dtype):
    xh = _x(shape, seed=3 + sum(shape), dtype=dtype)
    exact = reference.block_gram_norms(xh.double(), "feature")
    torch_err = (reference.block_gram_norms(xh, route).double() - exact).abs().max().item()
    got = op(xh.cuda(), route)
    assert got.dtype == torch.float32
    our_err = (got.double().cpu() - exact).abs().max().item()
    assert our_err <= 2 * torch_err + 1e-6 * exact.abs().max().item()
