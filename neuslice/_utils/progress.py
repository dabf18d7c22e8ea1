"""Progress bars (tqdm) that can be switched off."""

from __future__ import annotations

from collections.abc import Iterable


def progress(items: Iterable, enabled: bool, desc: str, unit: str = "batch") -> Iterable:
    """``items`` wrapped in a tqdm bar (total from ``len`` when there is one), or as they are."""
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return items
    total = len(items) if hasattr(items, "__len__") else None
    return tqdm(items, total=total, desc=desc, unit=unit, leave=False)
