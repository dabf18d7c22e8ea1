"""Atomic file writes: write a temporary file beside the target, fsync, then rename.

Files are created with the permissions the user's umask gives a new file (``0o666 & ~umask``,
as ``open`` would), not the ``0600`` of ``tempfile``. :func:`content_digest` is the checksum the
file formats store to detect edited or damaged files.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

import torch


def current_umask() -> int:
    """The process's umask (read from ``/proc`` where possible: ``os.umask`` can only be read by
    setting it, which races with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def content_digest(obj: Any) -> str:
    """SHA-256 of a nest of dicts, lists, tensors, strings and numbers (tensor dtype, shape and
    bytes; dict keys in sorted order): what a file's ``checksum`` field holds."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)};".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"S{obj!r};".encode())


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary file and move it over ``path``; a crash or error never
    leaves a partial file at ``path`` (the previous one, if any, stays intact)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600 whatever the umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))
