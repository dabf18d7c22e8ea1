"""Distributed profiling on torch.distributed (gloo, 2 processes on loopback) equals the
single-process result; a rank that dies gives the others a clear error, not a hang."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import neuslice
from neuslice.runtime import checkpoint as ckpt

sys.path.insert(0, os.path.dirname(__file__))
from conftest import finite_max, max_abs_err  # noqa: E402
from dist_worker import BATCH, C, data  # noqa: E402

WORKER = Path(__file__).with_name("dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        str(WORKER),
        "profile",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


def _batches(ds, index_lists):
    """Single-process stream with the ranks' batches interleaved (rank 0, rank 1, ...)."""
    per_rank = [[idx[i : i + BATCH] for i in range(0, len(idx), BATCH)] for idx in index_lists]
    out = []
    for step in range(max(len(b) for b in per_rank)):
        for b in per_rank:
            if step < len(b):
                x, y = ds[b[step]]
                out.append((x, y))
    return out


def _rel(a, b):
    return max_abs_err(a, b) / max(1.0, finite_max(b))


def _load(out, name):
    return [neuslice.Profile.load(out / f"{name}.rank{r}.pt") for r in (0, 1)]


def test_two_processes_equal_one_process(dist_run):
    model, ds, _ = data()
    idx = [torch.load(dist_run / f"indices.rank{r}.pt")["any"] for r in (0, 1)]
    assert sorted(idx[0] + idx[1]) == list(range(len(ds)))  # a partition, no padding
    ref = neuslice.profile(model, _batches(ds, idx), C, hsic_route="feature", progress=False)
    p0, p1 = _load(dist_run, "feature")
    for key, t in ref.tensors.items():
        assert torch.equal(p0.tensors[key], p1.tensors[key]), key  # every rank: same result
        assert _rel(p0.tensors[key], t) <= 1e-10, (key, _rel(p0.tensors[key], t))
    for metric in ("avg", "var", "ens", "taylor", "deeplift"):
        for th in (0.9, 0.95, 0.99):
            a, b = (
                neuslice.semantic_slice(p0, metric, th, criterion="layer_cka"),
                neuslice.semantic_slice(ref, metric, th, criterion="layer_cka"),
            )
            assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks), (metric, th)
        a, b = (
            neuslice.categorywise_slice(p0, metric, 0.3),
            neuslice.categorywise_slice(ref, metric, 0.3),
        )
        assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)


def test_minibatch_route_combines_the_ranks_chunks(dist_run):
    """Minibatch HSIC chunks are formed within each rank: the result is the chunk-weighted
    mean of the two shards' single-process results (and the sums equal the 1-process run)."""
    model, ds, _ = data()
    idx = [torch.load(dist_run / f"indices.rank{r}.pt")["any"] for r in (0, 1)]
    shards = [
        neuslice.profile(
            model, _batches(ds, [i]), C, hsic_route="minibatch", cka_batch=5, progress=False
        )
        for i in idx
    ]
    p0, p1 = _load(dist_run, "minibatch")
    for layer in p0.layers:
        w = [s.tensors[f"{layer}.hsic_weight"] for s in shards]
        h = [s.tensors[f"{layer}.hsic"] for s in shards]
        total = w[0] + w[1]
        want = (h[0] * w[0].view(-1, 1, 1) + h[1] * w[1].view(-1, 1, 1)) / total.view(-1, 1, 1)
        assert torch.equal(p0.tensors[f"{layer}.hsic_weight"], total)
        assert _rel(p0.tensors[f"{layer}.hsic"], want) <= 1e-10
        assert torch.equal(p0.tensors[f"{layer}.hsic"], p1.tensors[f"{layer}.hsic"])
        for key in ("count", "deeplift", "taylor_act"):
            both = shards[0].tensors[f"{layer}.{key}"] + shards[1].tensors[f"{layer}.{key}"]
            assert _rel(p0.tensors[f"{layer}.{key}"], both) <= 1e-10, key


def test_grouped_distributed_equals_one_process(dist_run):
    model, ds, _ = data()
    ref = neuslice.profile(
        model, [ds[:]], C, hsic_route="feature", progress=False, metrics=("avg", "var", "deeplift")
    )
    p0, p1 = _load(dist_run, "grouped")
    assert not p0.keeps_hsic
    for layer in ref.layers:
        for c in range(C):
            for metric in ("avg", "var", "ens", "deeplift"):
                assert _rel(p0.scores(layer, metric, c), ref.scores(layer, metric, c)) <= 1e-10
                assert _rel(p0.curve(layer, metric, c), ref.curve(layer, metric, c)) <= 1e-9
                assert torch.equal(p0.curve(layer, metric, c), p1.curve(layer, metric, c))
    for metric in ("avg", "deeplift"):
        a, b = (
            neuslice.semantic_slice(p0, metric, 0.95, criterion="layer_cka"),
            neuslice.semantic_slice(ref, metric, 0.95, criterion="layer_cka"),
        )
        assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)


def _spawn_two(mode, out, timeout=30):
    """Two worker processes with the torch.distributed environment set (no torchrun, so a
    failing rank does not get the other one killed)."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), mode, str(out), "--timeout", str(timeout)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


def _two_ranks(mode, out, timeout=30):
    procs = _spawn_two(mode, out, timeout)
    outs = [p.communicate(timeout=180)[0].decode()[-3000:] for p in procs]
    return [p.returncode for p in procs], outs


@pytest.mark.slow
def test_grouped_distributed_resume_after_a_crash(dist_run, tmp_path):
    """Both ranks crash part-way (at different batches); rank 1's newest checkpoint is lost as
    if it died while writing it; resuming agrees on the newest round both ranks still have and
    gives the uninterrupted result."""
    codes, outs = _two_ranks("gcrash", tmp_path)
    assert codes == [1, 1], outs
    latest = {r: ckpt.load(ckpt.rank_path(tmp_path / "g.ckpt", r, 2))["rounds"] for r in (0, 1)}
    assert latest[0] == latest[1] == 3
    os.remove(ckpt.rank_path(tmp_path / "g.ckpt", 1, 2))  # only round 2 (.prev) left on rank 1
    codes, outs = _two_ranks("gresume", tmp_path)
    assert codes == [0, 0], outs
    ref = _load(dist_run, "grouped")[0]
    for r in (0, 1):
        got = neuslice.Profile.load(tmp_path / f"gresumed.rank{r}.pt")
        for key, t in ref.tensors.items():
            assert _rel(got.tensors[key], t) <= 1e-12, (r, key)


@pytest.mark.slow
@pytest.mark.parametrize("mode,timeout", [("die", 30), ("stall", 5)])
def test_a_dying_or_stuck_rank_gives_a_clear_error(tmp_path, mode, timeout):
    """A crashed rank (its sockets close) or a stuck one (the process group's timeout expires):
    the other rank raises DistributedProfileError instead of hanging."""
    procs = _spawn_two(mode, tmp_path, timeout)
    try:
        procs[0].wait(timeout=180)  # would hang forever without the timeout handling
    finally:
        procs[1].kill()
        procs[1].wait()
    kind, seconds, message = (tmp_path / "rank0.txt").read_text().split("\n", 2)
    assert kind == "DistributedProfileError", message
    assert "rank 0 of 2" in message and "timeout" in message
    assert float(seconds) < timeout + 60


@pytest.mark.slow
def test_example_script_two_ranks_match_one(tmp_path):
    """examples/profile_distributed.py prints the same slice with 1 and 2 processes."""
    script = Path(__file__).parents[1] / "examples" / "profile_distributed.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env
    )
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            "--nproc-per-node=2",
            "--master-addr=127.0.0.1",
            f"--master-port={_free_port()}",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    line = lambda out: [l for l in out.splitlines() if l.startswith("profiled")][0]  # noqa: E731
    a, b = line(one.stdout), line(two.stdout)
    assert "on 1 process" in a and "on 2 process" in b
    assert a.split(";", 1)[1] == b.split(";", 1)[1]  # same slice and compression rate
