"""Checkpoints of a running profile: write atomically, refuse to resume anything else.

A checkpoint holds every accumulator, the number of batches consumed and a running digest of
those batches (labels, shapes and a strided sample of the inputs). Resuming re-reads -- without
computing anything -- the batches already consumed, checks the digest, and continues; the result
equals an uninterrupted run. A checkpoint from another model (architecture or weights), another
configuration or another data order is refused with the reason.
"""

from __future__ import annotations

import hashlib
import glob
import json
import logging
import os
import re
import warnings

import torch
from torch import nn

from .._utils.io import atomic_torch_save, content_digest

logger = logging.getLogger(__name__)

FORMAT = "neuslice.profile-checkpoint"
VERSION = 1
_SAMPLE = 4096  # input values per batch that enter the digest


def weights_digest(model: nn.Module) -> str:
    """Hash of every parameter's and buffer's values."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(
            t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            if t.numel()
            else b""
        )
    return h.hexdigest()[:24]


def batch_digest(previous: str, x: torch.Tensor, y: torch.Tensor) -> str:
    """Running digest of the data stream: labels, input shape and a strided input sample."""
    h = hashlib.sha256(previous.encode())
    h.update(str(tuple(x.shape)).encode())
    h.update(y.detach().cpu().to(torch.int64).numpy().tobytes())
    flat = x.detach().reshape(-1)
    if flat.numel():
        step = max(1, flat.numel() // _SAMPLE)
        h.update(flat[::step][:_SAMPLE].to(device="cpu", dtype=torch.float64).numpy().tobytes())
    return h.hexdigest()


def rank_path(path: str | os.PathLike, rank: int, world: int) -> str:
    """Each rank checkpoints to its own file."""
    path = os.fspath(path)
    return path if world <= 1 else f"{path}.rank{rank}-of-{world}"


def previous(path: str) -> str:
    return f"{path}.prev"


def save(path: str, payload: dict, keep_previous: bool = False) -> bool:
    """Write atomically; on failure (full disk, ...) warn, keep the previous file, return False.

    ``keep_previous`` first moves the current file to ``<path>.prev``: ranks that checkpoint at
    the same round can then always agree on a round every rank still has."""
    try:
        if keep_previous and os.path.exists(path):
            os.replace(path, previous(path))
        blob = {"format": FORMAT, "version": VERSION, **payload}
        atomic_torch_save({**blob, "checksum": content_digest(blob)}, path)
        return True
    except OSError as exc:
        msg = (
            f"neuslice.profile could not write checkpoint {path} ({type(exc).__name__}: "
            f"{exc}); the previous checkpoint is intact and profiling continues."
        )
        logger.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return False


def load(path: str | os.PathLike) -> dict:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(_missing_message(os.fspath(path))) from None
    except Exception as exc:
        raise ValueError(
            f"{path} is not a readable neuslice checkpoint (corrupt or truncated?): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or blob.get("version") != VERSION:
        raise ValueError(f"{path} is not a neuslice profile checkpoint (version {VERSION}).")
    if "checksum" in blob:  # checkpoints of neuslice 0.1 have none
        body = {k: v for k, v in blob.items() if k != "checksum"}
        if blob["checksum"] != content_digest(body):
            raise ValueError(
                f"{path} is corrupt: field 'checksum' does not match the content "
                f"(the file was edited or damaged after it was written). Delete it "
                f"and start without resume=."
            )
    return blob


def _missing_message(path: str) -> str:
    """Why ``path`` is missing, naming the per-rank files of another world size if any exist."""
    base = re.sub(r"\.rank\d+-of-\d+$", "", path)
    found = sorted(glob.glob(glob.escape(base) + ".rank*-of-*"))
    found = [f for f in found if re.search(r"\.rank\d+-of-\d+$", f)]
    if os.path.exists(base) and base != path:
        found.insert(0, base)
    if not found:
        return f"resume checkpoint {path} does not exist."
    worlds = sorted(
        {int(m.group(1)) for f in found if (m := re.search(r"-of-(\d+)$", f))}
        | ({1} if base in found else set())
    )
    return (
        f"resume checkpoint {path} does not exist, but checkpoints of the same run written "
        f"by another number of processes do: {found}. A checkpoint resumes only with the "
        f"world size that wrote it: launch {' or '.join(map(str, worlds))} process(es) "
        f"(e.g. torchrun --nproc-per-node={worlds[-1]}) with resume={base!r}, or start "
        f"without resume=."
    )


def check_compatible(blob: dict, expect: dict, path) -> None:
    """Refuse a checkpoint whose model, configuration or data set-up differs from this run's."""
    reasons = {
        "fingerprint": "it was written for a different model architecture",
        "weights": "the model's weights differ from the run that wrote it",
        "layers": "it profiles different layers",
        "config": "the profiling configuration differs",
        "positions": "the layers' output shapes differ (different input size?)",
        "world": "it was written by a different rank / number of processes",
    }
    for key, why in reasons.items():
        if blob.get(key) != expect.get(key):
            a, b = blob.get(key), expect.get(key)
            if key == "config":
                diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
                detail = f" (checkpoint vs now: {json.dumps(diff, default=str)})"
            elif key in ("fingerprint", "weights", "world"):
                detail = f" (checkpoint {a}, now {b})"
            else:
                detail = ""
            raise ValueError(
                f"cannot resume from {path}: {why}{detail}. Resume with the same "
                f"model, data and arguments, or start without resume=."
            )


def generations(path: str) -> dict[int, str]:
    """``{round: file}`` of the readable checkpoints at ``path`` and ``<path>.prev``."""
    out = {}
    for p in (path, previous(path)):
        if os.path.exists(p):
            try:
                out[int(load(p).get("rounds", -1))] = p
            except ValueError:
                continue
    return out
