"""Incite's mutation analysis: how much each unit cluster of a layer drives each output.

For every mutated layer ``l`` (by default every ``Linear``/``Conv2d`` but the head), its units
are grouped into clusters (:mod:`neuslice.decomposition.clustering`), and for every cluster
``U`` and factor ``alpha`` (default ``1.1, 0.9, 0``) a mutant scales the incoming weights and
bias of ``U``'s units by ``alpha``. The contribution of ``U`` to output ``o`` is

* classification: ``C_o(l, U) = sum_m sum_x |onehot(argmax f(x))_o - onehot(argmax f_m(x))_o|``,
  the number of (mutant, input) pairs whose *predicted* class moves into or out of ``o``;
* regression: ``C_o(l, U) = sum_m sum_x |f_o(x) - f^m_o(x)|``.

Every unit carries its cluster's score. No weight is edited here: scaling a unit's incoming
weights and bias by ``alpha`` is scaling the layer module's own output channel by ``alpha``
(before any BatchNorm/activation), and a mutant of ``l`` changes nothing upstream of ``l``. So:

1. one clean forward per batch (a ``torch.fx`` interpretation of the model) records, for every
   layer, the layer module's output ``z`` and the values its downstream part reads from
   upstream (e.g. the skip input of a residual add);
2. for a chunk of mutants, ``z * multiplier`` (one row of channel multipliers per mutant) is
   stacked along the batch and only the nodes downstream of ``l`` run, with the recorded
   upstream values repeated per mutant;
3. where the layer's units reach their consumers (the next ``Linear``/``Conv2d``) only
   through per-channel ops, a consumer's output is its clean output plus the consumer applied
   to the change of the mutated channels alone (``delta=True``): a cluster of 10 units costs
   10 input columns/channels of the consumer instead of all of them.

The result equals the weight-editing definition mathematically; in floating point, scaling the
output rounds differently from scaling the weights and the low-rank update sums in another
order, so a classifier's argmax can differ only where two logits are tied to rounding.
:func:`reference_mutation_scores` is the direct definition (weights edited on a copy, one full
forward over the data per mutant), kept as the oracle of the tests and the benchmark.

Models that ``torch.fx`` cannot trace, or whose downstream part reads a batch-dependent
non-tensor value from upstream (e.g. ``x.size(0)`` of the input), fall back to running the
whole model on the stacked batch with a forward hook that applies the multipliers to the
layer's output (still many mutants per forward, upstream work repeated).

The model runs in eval mode (BatchNorm with running statistics, so stacking mutants along the
batch is per-sample exact) under ``torch.no_grad``; its parameters, buffers, train/eval flags,
``requires_grad`` flags and gradients are left as they were.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from .._utils.checks import batch_pair, model_device
from .._utils.hooks import hooks_at, module_modes
from .._utils.progress import progress as progress_bar
from ..layers import SlicedLayer, find_layers
from .clustering import check_cluster_size, cluster_units

logger = logging.getLogger(__name__)

__all__ = [
    "mutation_scores",
    "reference_mutation_scores",
    "add_mutation_scores",
    "TASKS",
    "DEFAULT_FACTORS",
]

TASKS = ("classification", "regression")
DEFAULT_FACTORS = (1.1, 0.9, 0.0)
_CHUNK_BYTES = 8 * 2**20


# ---- argument checks ----------------------------------------------------------------------


def check_task(task) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    return task


def check_factors(factors) -> tuple[float, ...]:
    """The mutation factors as floats; a factor of 1.0 (a mutant that changes nothing) or a
    non-finite one is a ``ValueError``."""
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Iterable):
        raise TypeError(
            f"factors must be a sequence of numbers such as (1.1, 0.9, 0.0), got {factors!r}"
        )
    out = []
    for f in factors:
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not math.isfinite(f):
            raise ValueError(f"every mutation factor must be a finite number, got {f!r}")
        if float(f) == 1.0:
            raise ValueError(
                "a mutation factor of 1.0 makes a mutant identical to the model "
                "(it can never change an output); use factors such as "
                "(1.1, 0.9, 0.0)."
            )
        out.append(float(f))
    if not out:
        raise ValueError("factors must hold at least one mutation factor")
    return tuple(out)


def check_clusters(clusters, layers: list[SlicedLayer]) -> dict[str, torch.Tensor]:
    """Cluster labels per layer: ``LongTensor`` of one label per unit, labels ``0..K-1``."""
    if not isinstance(clusters, dict):
        raise TypeError(
            f"clusters must be a dict layer name -> label tensor, got {type(clusters).__name__}"
        )
    out = {}
    for l in layers:
        if l.name not in clusters:
            raise ValueError(
                f"clusters has no labels for layer {l.name!r}; it has {sorted(clusters)}"
            )
        lab = torch.as_tensor(clusters[l.name]).cpu()
        if (
            lab.dtype.is_floating_point
            or lab.dtype == torch.bool
            or lab.dim() != 1
            or lab.numel() != l.num_neurons
        ):
            raise ValueError(
                f"clusters[{l.name!r}] must be an integer tensor of "
                f"{l.num_neurons} labels, got dtype {lab.dtype}, shape "
                f"{tuple(lab.shape)}"
            )
        lab = lab.long()
        k = int(lab.max()) + 1
        if int(lab.min()) < 0 or torch.bincount(lab, minlength=k).eq(0).any():
            raise ValueError(f"clusters[{l.name!r}] must use every label 0..K-1 (no gaps)")
        out[l.name] = lab
    return out


def split_batch(batch, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of batch ``index``."""
    return batch_pair(batch, index, "targets")


def check_outputs(out, y: torch.Tensor, task: str, index: int) -> torch.Tensor:
    """The model's output as ``(batch, outputs)``; ValueError if it does not fit the task or
    the targets."""
    if not torch.is_tensor(out):
        raise TypeError(f"the model must return one tensor, got {type(out).__name__}")
    if task == "classification":
        if out.dim() != 2 or out.shape[1] < 2:
            raise ValueError(
                f"task='classification' needs class logits of shape (batch, classes >= 2); the "
                f"model returned shape {tuple(out.shape)}. Use task='regression' for a model "
                f"with real-valued outputs."
            )
        if y.dtype.is_floating_point or y.dim() != 1:
            raise ValueError(
                f"batch {index}: classification targets must be a 1-D integer "
                f"tensor of class indices, got dtype {y.dtype}, shape "
                f"{tuple(y.shape)}"
            )
        return out
    if out.dim() == 1:
        out = out.unsqueeze(1)
    if out.dim() != 2:
        raise ValueError(
            f"task='regression' needs outputs of shape (batch, outputs); the model "
            f"returned shape {tuple(out.shape)}"
        )
    if tuple(y.shape) != tuple(out.shape) and not (out.shape[1] == 1 and y.dim() == 1):
        raise ValueError(
            f"batch {index}: regression targets of shape {tuple(y.shape)} do not "
            f"match the model's outputs {tuple(out.shape)}"
        )
    return out


def contributions(task: str, clean: torch.Tensor, mutated: torch.Tensor) -> torch.Tensor:
    """Per-output contribution of mutants: ``clean`` ``(b, K)``, ``mutated`` ``(..., b, K)``
    -> ``(..., K)`` float64 (summed over the ``b`` inputs)."""
    if task == "classification":
        k = clean.shape[-1]
        p = clean.argmax(-1)
        pm = mutated.argmax(-1)
        changed = (pm != p).to(torch.float64).unsqueeze(-1)
        moved = F.one_hot(pm, k).to(torch.float64) + F.one_hot(p, k).to(torch.float64)
        return (moved * changed).sum(-2)
    return (mutated.to(torch.float64) - clean.to(torch.float64)).abs().sum(-2)


# ---- graph analysis -----------------------------------------------------------------------


@dataclass
class _Consumer:
    node: fx.Node
    module: nn.Module
    kind: str  # "linear" | "conv"
    per_channel: int  # Linear input columns per channel (positions after a flatten)
    weights: list[torch.Tensor] = field(default_factory=list)  # per cluster
    index: list[torch.Tensor] = field(default_factory=list)  # per cluster: columns/channels


@dataclass
class _Plan:
    """How the mutants of one layer are run."""

    layer: SlicedLayer
    labels: torch.Tensor
    members: list[torch.Tensor]
    node: fx.Node | None = None
    nodes: list[fx.Node] = field(default_factory=list)  # downstream of the layer, in order
    boundary: list[fx.Node] = field(default_factory=list)  # upstream values read downstream
    consumers: dict[fx.Node, _Consumer] = field(default_factory=dict)
    region: list[fx.Node] = field(default_factory=list)  # per-channel ops before consumers
    after: list[fx.Node] = field(default_factory=list)  # downstream of the consumers
    last_use: dict[fx.Node, int] = field(default_factory=dict)  # over ``nodes``
    last_use_after: dict[fx.Node, int] = field(default_factory=dict)  # over ``after``
    fast: bool = False
    delta: bool = False
    verified: bool = False
    sample_bytes: float = 0.0  # memory per stacked row
    batched: set = field(default_factory=set)  # boundary nodes repeated per mutant
    why: str = ""

    @property
    def num_clusters(self) -> int:
        return len(self.members)


def _trace(model: nn.Module) -> fx.GraphModule | None:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # any failure: the hook fallback
        logger.info(
            "mutation analysis: torch.fx cannot trace %s (%s); every mutant runs the whole model.",
            type(model).__name__,
            type(exc).__name__,
        )
        return None


def _plan_graph(
    plan: _Plan, gm: fx.GraphModule, modules: dict[str, nn.Module], delta: bool
) -> None:
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == plan.layer.name]
    if len(nodes) != 1:
        plan.why = "the layer is not called exactly once in the traced graph"
        return
    start = plan.node = nodes[0]
    down: set[fx.Node] = set()
    stack = [start]
    while stack:
        for u in stack.pop().users:
            if u not in down:
                down.add(u)
                stack.append(u)
    plan.nodes = [n for n in gm.graph.nodes if n in down]
    plan.boundary = list(
        dict.fromkeys(
            a for n in plan.nodes for a in n.all_input_nodes if a not in down and a is not start
        )
    )
    plan.fast = True
    for i, n in enumerate(plan.nodes):
        for a in n.all_input_nodes:
            plan.last_use[a] = i
    if (
        not delta
        or plan.layer.coupled
        or not plan.layer.consumers
        or 4 * max(len(u) for u in plan.members) > plan.layer.num_neurons
    ):
        return  # (clusters of over a quarter of the layer gain little from the low-rank update)
    d = plan.layer.num_neurons
    by_target = {n.target: n for n in plan.nodes if n.op == "call_module"}
    consumers = {}
    for name, _width in plan.layer.consumers:
        n = by_target.get(name)
        m = modules.get(name)
        if n is None or len(n.args) != 1 or n.kwargs or n.args[0] not in down:
            return
        if isinstance(m, nn.Linear) and m.in_features % d == 0:
            consumers[n] = _Consumer(n, m, "linear", m.in_features // d)
        elif (
            isinstance(m, nn.Conv2d)
            and m.groups == 1
            and m.padding_mode == "zeros"
            and m.in_channels == d
        ):
            consumers[n] = _Consumer(n, m, "conv", 1)
        else:
            return
    for c in consumers.values():
        w = c.module.weight.detach()
        for units in plan.members:
            if c.kind == "linear":
                idx = (
                    (units.unsqueeze(1) * c.per_channel + torch.arange(c.per_channel))
                    .flatten()
                    .to(w.device)
                )
            else:
                idx = units.to(w.device)
            c.index.append(idx)
            c.weights.append(w.index_select(1, idx))
    ancestors: set[fx.Node] = set()
    stack = [n.args[0] for n in consumers]
    while stack:
        n = stack.pop()
        if n in down and n not in ancestors:
            ancestors.add(n)
            stack.extend(n.all_input_nodes)
    plan.region = [n for n in plan.nodes if n in ancestors]
    plan.after = [n for n in plan.nodes if n not in ancestors and n not in consumers]
    if any(
        u not in ancestors and u not in consumers for n in [start] + plan.region for u in n.users
    ):
        return  # a value of the region escapes the consumers: not per-channel
    for i, n in enumerate(plan.after):
        for a in n.all_input_nodes:
            plan.last_use_after[a] = i
    plan.consumers = consumers
    plan.delta = True


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _run_node(n: fx.Node, env: dict, gm: fx.GraphModule, modules: dict[str, nn.Module]):
    args = fx.node.map_arg(n.args, env.__getitem__)
    kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
    if n.op == "call_module":
        return modules[n.target](*args, **kwargs)
    if n.op == "call_function":
        return n.target(*args, **kwargs)
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    if n.op == "get_attr":
        return _fetch_attr(gm, n.target)
    if n.op == "output":
        return args[0]
    raise ValueError(f"unexpected graph node {n.op} {n.target}")  # placeholders run elsewhere


def _nbytes(v) -> int:
    return v.numel() * v.element_size() if torch.is_tensor(v) else 0


class _Record:
    """What one clean batch leaves for the mutants of one layer."""

    __slots__ = ("z", "boundary", "cin", "cout", "region")

    def __init__(self):
        self.z = None
        self.region = None
        self.boundary: dict[fx.Node, object] = {}
        self.cin: dict[fx.Node, torch.Tensor] = {}
        self.cout: dict[fx.Node, torch.Tensor] = {}


def _clean_pass(gm, modules, plans: list[_Plan], x: torch.Tensor, measure: bool):
    """Run the model on ``x`` node by node; return its output and each fast plan's record."""
    env: dict[fx.Node, object] = {}
    records = {p.layer.name: _Record() for p in plans if p.fast}
    fast = [p for p in plans if p.fast]
    down = {p.layer.name: set(p.nodes) for p in fast}
    sizes: dict[fx.Node, int] = {}
    dependent: set[fx.Node] = set()
    first = True
    out = None
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if first:
                env[n], first = x, False
            elif n.args:
                env[n] = n.args[0]
            else:
                raise ValueError(
                    "mutation analysis feeds the model one input tensor; its "
                    f"forward takes more ({n.target!r} has no default)"
                )
            dependent.add(n)
            continue
        if any(a in dependent for a in n.all_input_nodes):
            dependent.add(n)
        for p in fast:
            if n not in down[p.layer.name]:
                continue
            rec = records[p.layer.name]
            for a in n.all_input_nodes:
                if a in rec.boundary or a is p.node or a in down[p.layer.name]:
                    continue
                v = env[a]
                if a in dependent:
                    if not torch.is_tensor(v) or v.dim() == 0 or v.shape[0] != x.shape[0]:
                        p.fast = False
                        p.why = (
                            f"its downstream part reads {a.name!r} (a batch-dependent "
                            f"{type(v).__name__}) from upstream"
                        )
                        continue
                    p.batched.add(a)
                    v = v.clone()
                rec.boundary[a] = v
            if n in p.consumers:
                rec.cin[n] = env[n.args[0]].clone()
        value = _run_node(n, env, gm, modules)
        if n.op == "output":
            out = value
            break
        env[n] = value
        if measure:
            sizes[n] = _nbytes(value)
        for p in fast:
            rec = records[p.layer.name]
            if n is p.node:
                rec.z = value.clone()
            elif n in p.consumers:
                rec.cout[n] = value.clone()
    if measure:
        b = max(1, x.shape[0])
        total = sum(sizes.values())
        for p in plans:
            if p.fast:
                rec = records[p.layer.name]
                run = (p.after + list(p.consumers)) if p.delta else p.nodes
                down_bytes = sum(sizes.get(n, 0) for n in run) + sum(
                    _nbytes(v) for a, v in rec.boundary.items() if a in p.batched
                )
                if not p.delta:
                    down_bytes += _nbytes(rec.z)
                p.sample_bytes = down_bytes / b
            else:
                p.sample_bytes = (total + _nbytes(x)) / b
    return out, {p.layer.name: records[p.layer.name] for p in fast if p.fast}


def _multipliers(
    plan: _Plan, clusters: Sequence[int], factors: tuple[float, ...], dtype, device
) -> torch.Tensor:
    # Built in float64 and rounded once: the same multiplier whatever the model's dtype.
    mult = torch.ones(len(clusters) * len(factors), plan.layer.num_neurons, dtype=torch.float64)
    for j, c in enumerate(clusters):
        for i, a in enumerate(factors):
            mult[j * len(factors) + i, plan.members[c]] = a
    return mult.to(device=device, dtype=dtype)


def _scale(plan: _Plan, z: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """``z`` (b, ...) stacked once per multiplier row: (m * b, ...), mutant-major."""
    m = mult.shape[0]
    shape = [m, 1] + [1] * (z.dim() - 1)
    shape[-1 if plan.layer.kind == "linear" else 2] = plan.layer.num_neurons
    return (z.unsqueeze(0) * mult.view(shape)).reshape(m * z.shape[0], *z.shape[1:])


def _repeat(v: torch.Tensor, m: int) -> torch.Tensor:
    return v.repeat(m, *([1] * (v.dim() - 1)))


def _region_values(plan: _Plan, gm, modules, rec: _Record, factors: tuple[float, ...]):
    """Each consumer's input when *every* unit of the layer is scaled by each factor:
    ``(factors, b, ...)``. The ops between the layer and its consumers act channel by channel,
    so channel ``j`` of these values is channel ``j`` of any mutant whose cluster holds ``j``:
    one pass per factor serves every cluster."""
    if rec.region is not None:
        return rec.region
    z = rec.z
    nf, b = len(factors), z.shape[0]
    alpha = torch.tensor(factors, dtype=torch.float64).to(device=z.device, dtype=z.dtype)
    env: dict[fx.Node, object] = {
        plan.node: (z.unsqueeze(0) * alpha.view([nf] + [1] * z.dim())).reshape(nf * b, *z.shape[1:])
    }
    needed = set(plan.region)
    for a, v in rec.boundary.items():
        if any(a in n.all_input_nodes for n in plan.region):
            env[a] = _repeat(v, nf) if a in plan.batched else v
    for n in plan.region:
        env[n] = _run_node(n, env, gm, modules)
    # minus the clean consumer input: the change of every channel under each factor
    rec.region = {
        c: (env[c.args[0]].reshape(nf, b, *env[c.args[0]].shape[1:]) - rec.cin[c].unsqueeze(0))
        for c in plan.consumers
        if c.args[0] in needed or c.args[0] is plan.node
    }
    return rec.region


def _delta_consumer(
    c: _Consumer, dvf: torch.Tensor, cout: torch.Tensor, clusters: Sequence[int]
) -> torch.Tensor:
    """The consumer's output for every mutant of ``clusters``: its clean output plus the
    consumer applied to the change of the mutant's own columns/channels only. ``dvf``:
    ``(factors, b, ...)`` from :func:`_region_values`; returns ``(clusters * factors * b, ...)``,
    mutant-major."""
    nf, b = dvf.shape[0], dvf.shape[1]
    rows = nf * b
    base = _repeat(cout, nf)
    out = torch.empty((len(clusters) * rows, *cout.shape[1:]), dtype=cout.dtype, device=cout.device)
    mod = c.module
    dvf = dvf.reshape(rows, *dvf.shape[2:])
    for j, cl in enumerate(clusters):
        idx, w = c.index[cl], c.weights[cl]
        dv = dvf.index_select(1, idx)
        if c.kind == "linear":
            torch.addmm(base, dv, w.t(), out=out[j * rows : (j + 1) * rows])
        else:
            torch.add(
                base,
                F.conv2d(dv, w, None, mod.stride, mod.padding, mod.dilation, 1),
                out=out[j * rows : (j + 1) * rows],
            )
    return out


def _run_nodes(nodes: list[fx.Node], env: dict, last_use: dict, gm, modules):
    for i, n in enumerate(nodes):
        value = _run_node(n, env, gm, modules)
        if n.op == "output":
            return value
        env[n] = value
        for a in n.all_input_nodes:
            if last_use.get(a) == i:
                env.pop(a, None)
    raise ValueError("the traced graph has no output")


def _run_mutants(
    plan: _Plan,
    gm,
    modules,
    rec: _Record,
    clusters: Sequence[int],
    factors: tuple[float, ...],
    s0: int,
    s1: int,
) -> torch.Tensor:
    """Model outputs of the chunk's mutants on samples ``s0:s1``: (m * b, K), mutant-major."""
    m = len(clusters) * len(factors)
    if plan.delta and not plan.verified:
        _verify_delta(plan, gm, modules, rec, clusters, factors, s0, s1)
    if not plan.delta:
        z = rec.z[s0:s1]
        env: dict[fx.Node, object] = {
            plan.node: _scale(plan, z, _multipliers(plan, clusters, factors, z.dtype, z.device))
        }
        for a, v in rec.boundary.items():
            env[a] = _repeat(v[s0:s1], m) if a in plan.batched else v
        return _run_nodes(plan.nodes, env, plan.last_use, gm, modules)
    region = _region_values(plan, gm, modules, rec, factors)
    env = {}
    for c in plan.consumers.values():
        env[c.node] = _delta_consumer(
            c, region[c.node][:, s0:s1], rec.cout[c.node][s0:s1], clusters
        )
    after = set(plan.after)
    for a, v in rec.boundary.items():
        if any(a in n.all_input_nodes for n in after):
            env[a] = _repeat(v[s0:s1], m) if a in plan.batched else v
    return _run_nodes(plan.after, env, plan.last_use_after, gm, modules)


def _verify_delta(
    plan: _Plan,
    gm,
    modules,
    rec: _Record,
    clusters: Sequence[int],
    factors: tuple[float, ...],
    s0: int,
    s1: int,
) -> None:
    """Once per layer, on a few samples: the low-rank route must match running the consumers
    (it assumes the ops between the layer and its consumers act channel by channel and that a
    flatten is channel-major; anything else switches it off)."""
    plan.verified = True
    s1 = min(s1, s0 + 16)
    fast = _run_mutants(plan, gm, modules, rec, clusters, factors, s0, s1)
    plan.delta = False
    direct = _run_mutants(plan, gm, modules, rec, clusters, factors, s0, s1)
    finite = direct.nan_to_num(0.0, 0.0, 0.0)
    scale = 1.0 + (float(finite.abs().max()) if direct.numel() else 0.0)
    if (
        torch.is_tensor(fast)
        and fast.shape == direct.shape
        and torch.allclose(fast, direct, rtol=1e-3, atol=1e-4 * scale, equal_nan=True)
    ):
        plan.delta = True
    else:
        logger.warning(
            "mutation analysis: the low-rank update of layer %r's consumers does "
            "not match running them; its mutants run in full.",
            plan.layer.name,
        )


def _run_mutants_hooked(
    plan: _Plan, model: nn.Module, x: torch.Tensor, clusters, factors, s0: int, s1: int
) -> torch.Tensor:
    """The fallback: the whole model on the stacked inputs, the layer's output multiplied."""
    xs = x[s0:s1]
    mult = _multipliers(plan, clusters, factors, torch.float64, x.device)
    m = mult.shape[0]

    def scale(out):
        b = out.shape[0] // m
        shape = [m, 1] + [1] * (out.dim() - 1)
        shape[-1 if plan.layer.kind == "linear" else 2] = plan.layer.num_neurons
        return (out.reshape(m, b, *out.shape[1:]) * mult.to(out.dtype).view(shape)).reshape(
            out.shape
        )

    with hooks_at(model, [(plan.layer.module, None, scale)]):
        return model(_repeat(xs, m))


def _chunks(plan: _Plan, b: int, nf: int, budget: float):
    """(clusters, s0, s1) chunks whose stacked rows fit the memory budget."""
    rows = max(1, int(budget // max(plan.sample_bytes, 1.0)))
    per_cluster = nf * b
    if per_cluster <= rows:
        # Within the budget, chunks of a few MiB: large stacked batches only add cache misses.
        rows = min(rows, max(per_cluster, int(_CHUNK_BYTES // max(plan.sample_bytes, 1.0))))
        k = max(1, rows // per_cluster)
        for c0 in range(0, plan.num_clusters, k):
            yield list(range(c0, min(plan.num_clusters, c0 + k))), 0, b
    else:
        step = max(1, rows // nf)
        for c in range(plan.num_clusters):
            for s0 in range(0, b, step):
                yield [c], s0, min(b, s0 + step)


def _check_budget(max_memory_gb) -> float:
    if (
        isinstance(max_memory_gb, bool)
        or not isinstance(max_memory_gb, numbers.Real)
        or not math.isfinite(max_memory_gb)
        or max_memory_gb <= 0
    ):
        raise ValueError(f"max_memory_gb must be a positive number, got {max_memory_gb!r}")
    return float(max_memory_gb) * 2**30


def mutation_scores(
    model: nn.Module,
    loader: Iterable,
    task: str = "classification",
    layers: Sequence[str] | None = None,
    cluster_size: int = 10,
    factors: Sequence[float] = DEFAULT_FACTORS,
    *,
    clusters: dict[str, torch.Tensor] | None = None,
    delta: bool = True,
    max_memory_gb: float = 0.5,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Incite's contribution ``C_o(l, U)`` of every unit cluster to every output.

    Args:
        model: any ``nn.Module`` :func:`neuslice.find_layers` handles, returning
            ``(batch, outputs)`` (class logits for classification).
        loader: iterable of ``(inputs, targets)``; the whole data is used once. Classification
            scores use the model's predictions, not the targets (they are only checked).
        task: ``"classification"`` or ``"regression"``.
        layers: the mutated ``Linear``/``Conv2d`` layers; default all but the head.
        cluster_size: average units per cluster (``ceil(n / cluster_size)`` Ward clusters per
            layer); 1 mutates each unit on its own and needs no scikit-learn.
        factors: the mutants of a cluster scale its units' incoming weights and bias by each
            factor (1.0 is refused: such a mutant changes nothing).
        clusters: precomputed cluster labels per layer (e.g. from
            :func:`neuslice.decomposition.clustering.cluster_units`); overrides
            ``cluster_size``.
        delta: propagate a mutant into the layer's consumers as a low-rank update of their
            clean output (see the module docstring); False runs them in full.
        max_memory_gb: budget of the stacked mutant batch; mutants per forward (and, if one
            cluster's mutants on a whole loader batch do not fit, the samples per forward)
            are chosen from it, measured on the first batch.
        progress: a tqdm bar over the batches.

    Returns:
        ``{layer: scores}`` with ``scores`` float64 of shape ``(outputs, neurons)``; every
        neuron carries its cluster's score.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    task = check_task(task)
    factors = check_factors(factors)
    budget = _check_budget(max_memory_gb)
    sliced = find_layers(model, layers)
    if clusters is None:
        check_cluster_size(cluster_size)
        clusters = cluster_units(model, [l.name for l in sliced], cluster_size)
    labels = check_clusters(clusters, sliced)
    plans = [
        _Plan(
            l,
            labels[l.name],
            [
                torch.nonzero(labels[l.name] == k).flatten()
                for k in range(int(labels[l.name].max()) + 1)
            ],
        )
        for l in sliced
    ]
    device = model_device(model)
    nf = len(factors)
    start = time.perf_counter()
    with torch.no_grad(), module_modes(model, train=False):
        gm = _trace(model)
        modules = dict(gm.named_modules()) if gm is not None else {}
        if gm is not None:
            for p in plans:
                _plan_graph(p, gm, modules, bool(delta))
        totals: dict[str, torch.Tensor] | None = None
        bar = progress_bar(loader, progress, "neuslice mutation analysis")
        try:
            for index, batch in enumerate(bar):
                x, y = split_batch(batch, index)
                if x.shape[0] == 0:
                    continue
                x = x.to(device)
                measure = totals is None
                if gm is not None:
                    out, records = _clean_pass(gm, modules, plans, x, measure)
                else:
                    out, records = model(x), {}
                    if measure:
                        _measure_hooked(model, plans, x)
                out = check_outputs(out, y, task, index)
                if totals is None:
                    totals = {
                        p.layer.name: torch.zeros(out.shape[1], p.num_clusters, dtype=torch.float64)
                        for p in plans
                    }
                    for p in plans:
                        if not p.fast and gm is not None:
                            logger.info(
                                "mutation analysis of %r runs the whole model per mutant: %s.",
                                p.layer.name,
                                p.why,
                            )
                elif out.shape[1] != totals[plans[0].layer.name].shape[0]:
                    raise ValueError(
                        f"batch {index}: the model returned {out.shape[1]} "
                        f"outputs, earlier batches "
                        f"{totals[plans[0].layer.name].shape[0]}"
                    )
                b = x.shape[0]
                for p in plans:
                    acc = totals[p.layer.name]
                    for cl, s0, s1 in _chunks(p, b, nf, budget):
                        if p.fast and p.layer.name in records:
                            fm = _run_mutants(
                                p, gm, modules, records[p.layer.name], cl, factors, s0, s1
                            )
                        else:
                            fm = _run_mutants_hooked(p, model, x, cl, factors, s0, s1)
                        if fm.dim() == 1:
                            fm = fm.unsqueeze(1)
                        fm = fm.reshape(len(cl), nf, s1 - s0, out.shape[1])
                        got = contributions(task, out[s0:s1], fm).sum(1)  # (clusters, K)
                        acc[:, cl] += got.T.cpu()
        finally:
            if hasattr(bar, "close"):
                bar.close()
    if totals is None:
        raise ValueError("the loader yielded no samples; mutation analysis needs data.")
    logger.info(
        "mutation analysis: %d mutants in %.2f s",
        nf * sum(p.num_clusters for p in plans),
        time.perf_counter() - start,
    )
    return {p.layer.name: totals[p.layer.name][:, p.labels] for p in plans}


def _measure_hooked(model: nn.Module, plans: list[_Plan], x: torch.Tensor) -> None:
    """Memory per stacked row of the fallback: every leaf module's output, measured."""
    total = [_nbytes(x)]

    def hook(_m, _i, out):
        total[0] += _nbytes(out)

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    for p in plans:
        p.sample_bytes = total[0] / max(1, x.shape[0])


# ---- the direct definition (oracle) ------------------------------------------------------


def reference_mutation_scores(
    model: nn.Module,
    loader: Iterable,
    task: str = "classification",
    layers: Sequence[str] | None = None,
    cluster_size: int = 10,
    factors: Sequence[float] = DEFAULT_FACTORS,
    *,
    clusters: dict[str, torch.Tensor] | None = None,
    how: str = "weights",
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """:func:`mutation_scores` computed the direct (slow) way, as the Incite artifact does.

    ``how="weights"``: a copy of the model, each mutant's incoming weights and bias scaled in
    place, one full forward over the data per mutant, weights restored afterwards.
    ``how="multiplier"``: the layer module's output channels multiplied instead (by a forward
    hook), still one mutant and one full forward at a time -- the arithmetic of
    ``mutation_scores(..., delta=False)``.
    """
    import copy

    task = check_task(task)
    factors = check_factors(factors)
    if how not in ("weights", "multiplier"):
        raise ValueError(f"how must be 'weights' or 'multiplier', got {how!r}")
    sliced = find_layers(model, layers)
    if clusters is None:
        clusters = cluster_units(model, [l.name for l in sliced], check_cluster_size(cluster_size))
    labels = check_clusters(clusters, sliced)
    device = model_device(model)
    data = [tuple(t.to(device) for t in split_batch(b, i)) for i, b in enumerate(loader)]
    data = [(x, y) for x, y in data if x.shape[0]]
    if not data:
        raise ValueError("the loader yielded no samples; mutation analysis needs data.")
    work = copy.deepcopy(model) if how == "weights" else model
    work_modules = dict(work.named_modules())
    result = {}
    with torch.no_grad(), module_modes(work, train=False):
        clean = [check_outputs(work(x), y, task, i) for i, (x, y) in enumerate(data)]
        items = [
            (l, k, a) for l in sliced for k in range(int(labels[l.name].max()) + 1) for a in factors
        ]
        for l in sliced:
            result[l.name] = torch.zeros(
                clean[0].shape[1], int(labels[l.name].max()) + 1, dtype=torch.float64
            )
        for l, k, a in progress_bar(items, progress, "reference mutants", "mutant"):
            units = torch.nonzero(labels[l.name] == k).flatten()
            if how == "weights":
                mod = work_modules[l.name]
                saved = [t.detach().clone() for t in (mod.weight, mod.bias) if t is not None]
                for t in (mod.weight, mod.bias):
                    if t is not None:
                        t[units.to(t.device)] *= a
                outs = [work(x) for x, _ in data]
                for t, s in zip([t for t in (mod.weight, mod.bias) if t is not None], saved):
                    t.copy_(s)
            else:
                mult = torch.ones(l.num_neurons, dtype=torch.float64)
                mult[units] = a

                def scale(out, _l=l, _mult=mult):
                    return out * _mult.to(out.device, out.dtype).view(_l.mask_shape(out))

                with hooks_at(work, [(l.module, None, scale)]):
                    outs = [work(x) for x, _ in data]
            for c, o in zip(clean, outs):
                result[l.name][:, k] += contributions(task, c, o.reshape(c.shape)).cpu()
    return {l.name: result[l.name][:, labels[l.name]] for l in sliced}


# ---- a contribution metric for slicing ---------------------------------------------------


def add_mutation_scores(profile, scores: dict[str, torch.Tensor]):
    """Insert mutation scores into ``profile`` as the metric ``"mutation"`` and return it.

    ``scores`` is :func:`mutation_scores`' result for the profiled model: per layer a
    ``(categories, neurons)`` tensor whose row ``c`` is every neuron's contribution to class
    ``c``'s output (its category-wise score); the whole-data (global) score is the sum over
    the rows. Afterwards ``global_slice(profile, "mutation", 0.5)``,
    ``categorywise_slice(...)`` and ``semantic_slice(profile, "mutation", θ)`` (which needs a
    profile that kept its HSIC matrices) rank neurons by it. The profile is modified in place
    (``profile.tensors["<layer>.mutation"]`` and ``profile.metrics``).
    """
    from ..profiling.profile import Profile

    if not isinstance(profile, Profile):
        raise TypeError(f"expected a neuslice.Profile, got {type(profile).__name__}")
    if not isinstance(scores, dict):
        raise TypeError(
            f"scores must be the dict mutation_scores returns, got {type(scores).__name__}"
        )
    missing = [l for l in profile.layers if l not in scores]
    if missing:
        raise ValueError(
            f"scores have no entry for profiled layer(s) {missing}; compute "
            f"mutation_scores with layers={profile.layers}"
        )
    new = {}
    for layer in profile.layers:
        s = torch.as_tensor(scores[layer])
        want = (profile.num_classes, profile.num_neurons[layer])
        if tuple(s.shape) != want:
            raise ValueError(
                f"scores[{layer!r}] has shape {tuple(s.shape)}, the profile needs "
                f"{want} (categories x neurons): were they computed on another "
                f"model, or is the profile's num_classes not the model's number of "
                f"outputs?"
            )
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"scores[{layer!r}] holds NaN/Inf")
        new[f"{layer}.mutation"] = s.detach().to(device="cpu", dtype=torch.float64).clone()
    profile.tensors.update(new)
    if "mutation" not in profile.metrics:
        profile.metrics = tuple(profile.metrics) + ("mutation",)
    return profile
