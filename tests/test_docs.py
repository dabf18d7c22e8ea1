"""Every ```python block of README.md and docs/*.md runs as written, in a fresh interpreter in
an empty folder (the block holds its own set-up; bundled or synthetic data only)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks():
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            line = text[: m.start()].count("\n") + 1
            yield pytest.param(m.group(1), id=f"{doc.name}:{line}")


BLOCKS = list(_blocks())


def test_the_docs_have_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("code", BLOCKS)
def test_block_runs(code, tmp_path):
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        NEUSLICE_CACHE=str(tmp_path / "cache"),
        PYTHONWARNINGS="error:neuslice:DeprecationWarning",
    )
    prelude = "import torch\ntorch.set_num_threads(1)\ntorch.manual_seed(0)\n"
    out = subprocess.run(
        [sys.executable, "-c", prelude + code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, f"block failed:\n{code}\n--- stderr ---\n{out.stderr[-4000:]}"
