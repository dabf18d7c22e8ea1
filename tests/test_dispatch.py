"""Backend dispatch of the native ops: fallbacks, explicit choices, error messages."""

import pytest
import torch

from neuslice import ops
from neuslice.ops import dispatch, reference


def test_auto_on_cpu_matches_reference_routes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(29, 11, 3, generator=g, dtype=torch.float64)
    want = reference.block_gram_norms(x, "feature")
    for route in ("auto", "feature", "sample"):
        got = ops.block_gram_norms(x, route)
        assert torch.allclose(got, want, rtol=1e-12, atol=0), route


def test_explicit_torch_backend_and_env_var(monkeypatch):
    x = torch.randn(8, 3, 2)
    assert dispatch.select(x, "torch").name == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.select(x).name == "torch"


def test_explicit_backend_that_cannot_run_fails_loudly(monkeypatch):
    x = torch.randn(8, 3, 2)  # a CPU tensor: the CUDA backend can never take it
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run this input.*runs on"):
        ops.block_gram_norms(x, backend="cuda")
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        ops.block_gram_norms(x)


def test_unknown_backend_names_the_choices(monkeypatch):
    x = torch.randn(8, 3, 2)
    with pytest.raises(ValueError, match="unknown backend 'fast'.*torch"):
        ops.block_gram_norms(x, backend="fast")
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="NEUSLICE_BACKEND"):
        ops.block_gram_norms(x)


def test_auto_skips_backends_that_are_off_by_default(monkeypatch):
    x = torch.randn(8, 3, 2)
    fake = dispatch.Backend("cpp", ("cpu",), (torch.float32,), {"cpu": False}, "slower")
    monkeypatch.setitem(dispatch.BACKENDS, "cpp", fake)
    monkeypatch.setattr(dispatch.Backend, "load_error", lambda self: None)
    assert dispatch.select(x).name == "torch"
    on = dispatch.Backend("cpp", ("cpu",), (torch.float32,), {"cpu": True})
    monkeypatch.setitem(dispatch.BACKENDS, "cpp", on)
    assert dispatch.select(x).name == "cpp"
    assert dispatch.select(x.double()).name == "torch"  # dtype not supported -> next one
    dense = dispatch.Backend("cpp", ("cpu",), (torch.float32,), {"cpu": True}, auto_min_positions=2)
    monkeypatch.setitem(dispatch.BACKENDS, "cpp", dense)
    assert dispatch.select(x).name == "cpp"  # s = 2
    assert dispatch.select(torch.randn(8, 3, 1)).name == "torch"  # dense: not automatic
    assert dispatch.select(torch.randn(8, 3, 1), "cpp").name == "cpp"  # explicit still works


@pytest.mark.parametrize(
    "bad, err, match",
    [
        (torch.randn(4, 3), ValueError, r"\(n, d, s\)"),
        (torch.randn(0, 3, 2), ValueError, "empty"),
        (torch.ones(4, 3, 2, dtype=torch.long), TypeError, "floating-point"),
        ([[1.0]], TypeError, "tensor"),
    ],
)
def test_bad_inputs(bad, err, match):
    with pytest.raises(err, match=match):
        ops.block_gram_norms(bad)


def test_bad_route():
    with pytest.raises(ValueError, match="route"):
        ops.block_gram_norms(torch.randn(4, 3, 2), route="fast")


def test_backend_report_covers_every_backend():
    rows = ops.backend_report("cpu")
    assert [r[0] for r in rows] == list(dispatch.PRIORITY)
    torch_row = rows[-1]
    assert torch_row[1] is True and "automatically" in torch_row[2]
    cuda_row = rows[0]
    assert cuda_row[1] is False and cuda_row[2]  # says why
