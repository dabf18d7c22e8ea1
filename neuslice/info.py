"""``python -m neuslice.info``: versions, and which op backends are live and why not."""

from __future__ import annotations

import platform

import torch

__all__ = ["report", "main"]


def report() -> str:
    from . import __version__
    from .ops import backend_report

    lines = [
        f"neuslice {__version__}",
        f"python {platform.python_version()}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda}, "
        f"CUDA available: {torch.cuda.is_available()})",
    ]
    for mod in ("triton", "captum", "mlxtend", "sklearn", "matplotlib", "torchvision"):
        try:
            m = __import__(mod)
            lines.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception as exc:  # report, never fail
            lines.append(f"{mod}: not available ({type(exc).__name__})")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        lines.append(f"\nbackends of block_gram_norms on {dev} (priority order):")
        for name, live, why in backend_report(dev):
            lines.append(f"  {name:<7} {'live' if live else 'off':<5} {why}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
