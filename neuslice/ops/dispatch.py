"""Backend selection for the native ops: CUDA extension -> Triton -> C++ -> PyTorch.

Each backend says why it cannot run a given input (``not_supported_reasons``). Automatic choice
walks the priority list and quietly takes the first backend that can run the input *and* is on
by default (a native path is on by default only where a benchmark showed it at least as fast as
the PyTorch route on that device); it always ends in PyTorch. An explicit choice — the
``backend=`` keyword or the ``NEUSLICE_BACKEND`` environment variable — fails loudly with the
reasons when that backend cannot run the input.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

from . import reference

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "Backend", "select", "backend_report", "ENV_VAR"]

ENV_VAR = "NEUSLICE_BACKEND"
PRIORITY = ("cuda", "triton", "cpp", "torch")


@functools.lru_cache(maxsize=None)
def _load_extension():
    """The compiled ``neuslice._C`` (registers ``torch.ops.neuslice.*``), or the import error."""
    try:
        from .. import _C  # noqa: F401

        return torch.ops.neuslice, None
    except Exception as exc:  # missing, or built against another torch
        return None, f"extension neuslice._C not importable ({type(exc).__name__}: {exc})"


@functools.lru_cache(maxsize=None)
def _load_triton():
    try:
        from ..kernels import block_gram as mod  # imports triton

        return mod, None
    except Exception as exc:
        return None, f"triton not importable ({type(exc).__name__}: {exc})"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Backend:
    """One implementation of the ops, with what it supports."""

    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    default_on: dict  # device type -> bool: dispatched to automatically there
    why_off: str = ""
    auto_min_positions: int = 1  # automatic choice only for inputs with s >= this
    auto_min_samples: int = 1  # ... and, on the sample route, n >= this

    def load_error(self) -> str | None:
        if self.name == "torch":
            return None
        if self.name == "triton":
            return _load_triton()[1]
        ext, err = _load_extension()
        if err:
            return err
        if not hasattr(ext, "block_gram_norms"):
            return "extension has no block_gram_norms op"
        if self.name == "cuda" and not _extension_has_cuda():
            return "extension was built without CUDA kernels"
        return None

    def devices_now(self) -> tuple[str, ...]:
        if self.name == "triton" and _interpreting():
            return ("cpu",)
        return self.devices

    def not_supported_reasons(self, x: torch.Tensor) -> list[str]:
        reasons = []
        err = self.load_error()
        if err:
            reasons.append(err)
        if x.device.type not in self.devices_now():
            reasons.append(f"runs on {list(self.devices_now())}, input is on {x.device.type}")
        if x.dtype not in self.dtypes:
            reasons.append(f"supports {[str(t) for t in self.dtypes]}, input is {x.dtype}")
        if self.name != "torch" and x.requires_grad:
            reasons.append("input requires grad and the native op has no derivative")
        if self.name == "cuda" and x.device.type == "cuda":
            major, _ = torch.cuda.get_device_capability(x.device)
            if major < 7:
                reasons.append("needs compute capability >= 7.0")
        return reasons

    def run(self, x: torch.Tensor, route: str) -> torch.Tensor:
        if self.name == "torch":
            return reference.block_gram_norms(x, route)
        if self.name == "triton":
            return _load_triton()[0].block_gram_norms(x, route)
        ext = _load_extension()[0]
        return ext.block_gram_norms(x.contiguous(), route)


@functools.lru_cache(maxsize=None)
def _extension_has_cuda() -> bool:
    ext, err = _load_extension()
    if err is not None:
        return False
    try:
        from .. import _C

        return bool(getattr(_C, "WITH_CUDA", False))
    except Exception:
        return False


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS: dict[str, Backend] = {
    "cuda": Backend(
        "cuda",
        ("cuda",),
        _FLOATS,
        {"cuda": False},
        "not yet benchmarked against cuBLAS on a GPU (bench/bench_build_m.py)",
    ),
    "triton": Backend(
        "triton",
        ("cuda",),
        _FLOATS,
        {"cuda": False, "cpu": False},
        "not yet benchmarked against cuBLAS on a GPU; on the CPU only the "
        "(slow) interpreter exists",
    ),
    # Dense layers (s = 1) are one BLAS matmul either way: measured 0.7-1.0x there, so the
    # automatic choice keeps them on the PyTorch route (bench/RESULTS.md). So are the sample
    # route's few-sample inputs (n <= 16: the packed Grams are one thin BLAS matmul), where the
    # PyTorch route measured 1.0-1.7x faster (1 thread, d = 256-2048).
    "cpp": Backend(
        "cpp",
        ("cpu",),
        _FLOATS + (torch.float64,),
        {"cpu": True},
        auto_min_positions=2,
        auto_min_samples=17,
    ),
    "torch": Backend(
        "torch",
        ("cpu", "cuda", "mps", "xpu"),
        _FLOATS + (torch.float64,),
        {"cpu": True, "cuda": True, "mps": True, "xpu": True},
    ),
}


def select(x: torch.Tensor, backend: str | None = None, route: str | None = None) -> Backend:
    """The backend to run ``x`` with (on ``route``, if known); explicit choices raise
    ``RuntimeError`` with reasons."""
    choice = backend or os.environ.get(ENV_VAR) or "auto"
    if choice != "auto":
        if choice not in BACKENDS:
            raise ValueError(
                f"unknown backend {choice!r} (from "
                f"{'backend=' if backend else ENV_VAR}); choose from "
                f"{['auto', *PRIORITY]}"
            )
        b = BACKENDS[choice]
        reasons = b.not_supported_reasons(x)
        if reasons:
            raise RuntimeError(
                f"backend {choice!r} cannot run this input: "
                + "; ".join(reasons)
                + ". Use backend='auto' to fall back automatically."
            )
        return b
    for name in PRIORITY:
        b = BACKENDS[name]
        if (
            b.default_on.get(x.device.type, False)
            and x.shape[-1] >= b.auto_min_positions
            and (route != "sample" or x.shape[0] >= b.auto_min_samples)
            and not b.not_supported_reasons(x)
        ):
            return b
    if x.dtype not in BACKENDS["torch"].dtypes:
        raise TypeError(f"no backend supports dtype {x.dtype}; use a floating-point tensor")
    return BACKENDS["torch"]


def backend_report(device: str = "cpu") -> list[tuple[str, bool, str]]:
    """``(backend, live, why)`` for every backend on ``device`` (for ``neuslice.info``)."""
    probe = torch.empty(4, 2, 1, device=device)
    rows = []
    for name in PRIORITY:
        b = BACKENDS[name]
        reasons = b.not_supported_reasons(probe)
        if reasons:
            rows.append((name, False, "; ".join(reasons)))
        elif not b.default_on.get(probe.device.type, False):
            rows.append((name, True, f"available on explicit request only: {b.why_off}"))
        elif b.auto_min_positions > 1:
            rows.append(
                (
                    name,
                    True,
                    f"used automatically for s >= {b.auto_min_positions} positions per neuron"
                    + (
                        f" (sample route: n >= {b.auto_min_samples} samples)"
                        if b.auto_min_samples > 1
                        else ""
                    ),
                )
            )
        else:
            rows.append((name, True, "used automatically"))
    return rows
