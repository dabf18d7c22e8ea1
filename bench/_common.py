"""Shared helpers of the benchmark scripts: environment tags and result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

import torch


def environment() -> dict:
    """Device, versions, date and commit, attached to every saved row."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(__file__),
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    return {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def save_rows(name: str, rows: list[dict], env: dict, folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    return path
