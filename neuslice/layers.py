"""Which layers are sliced, and where each layer's neuron outputs live.

A *neuron* is an output unit of an ``nn.Linear`` or an output channel of an ``nn.Conv2d``. Its
*output* is the value the next layer consumes: the layer's own output followed by any
BatchNorm / element-wise activation / dropout that comes straight after it. Masking a neuron at
that point is then the same as removing it.

The chain after each layer is read from a ``torch.fx`` trace of the model (so functional ops in
``forward``, in-place ReLUs and a ReLU module reused twice are all understood). When the model
cannot be traced, the layer's own output is used and a warning is logged.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import fx, nn
import torch.nn.functional as F

from ._utils.wrappers import unwrap_model

logger = logging.getLogger(__name__)

__all__ = ["SlicedLayer", "find_layers", "model_fingerprint", "SLICEABLE_TYPES"]

SLICEABLE_TYPES = (nn.Linear, nn.Conv2d)

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
# element-wise activation modules (their rescale rule is DeepLIFT's; see profiling.deeplift)
ACT_TYPES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.PReLU,
)
_IDENTITY_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)

# Functional element-wise activations that may follow a layer: target -> (fn, in-place kwarg?)
ACT_FUNCTIONS: dict = {
    F.relu: torch.relu,
    torch.relu: torch.relu,
    torch.relu_: torch.relu,
    F.relu6: F.relu6,
    F.leaky_relu: F.leaky_relu,
    F.elu: F.elu,
    F.selu: F.selu,
    F.gelu: F.gelu,
    F.silu: F.silu,
    F.mish: F.mish,
    F.hardswish: F.hardswish,
    F.hardsigmoid: F.hardsigmoid,
    F.hardtanh: F.hardtanh,
    F.softplus: F.softplus,
    torch.sigmoid: torch.sigmoid,
    F.sigmoid: torch.sigmoid,
    torch.tanh: torch.tanh,
    F.tanh: torch.tanh,
}
ACT_METHODS = {
    "relu": torch.relu,
    "relu_": torch.relu,
    "sigmoid": torch.sigmoid,
    "sigmoid_": torch.sigmoid,
    "tanh": torch.tanh,
    "tanh_": torch.tanh,
}
_INPLACE_ONLY_ARGS = {torch.relu, F.relu6, F.selu, F.silu, F.mish, F.hardswish, F.hardsigmoid}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout}

# Ops a neuron's value passes through unchanged per channel on the way to its consumers.
_PASS_MODULES = (
    _NORM_TYPES
    + ACT_TYPES
    + _IDENTITY_TYPES
    + (
        nn.MaxPool2d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveMaxPool2d,
        nn.Flatten,
    )
)
_PASS_FUNCTIONS = (
    set(ACT_FUNCTIONS)
    | _DROPOUT_FUNCTIONS
    | {
        torch.flatten,
        F.max_pool2d,
        F.avg_pool2d,
        F.adaptive_avg_pool2d,
        F.adaptive_max_pool2d,
    }
)
_PASS_METHODS = set(ACT_METHODS) | {"flatten", "view", "reshape", "contiguous"}
_IGNORED_USERS_METHODS = {"size", "dim"}
# Reductions that keep the neuron axis when they reduce only other axes (global pooling).
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_RESHAPES = {"flatten", "view", "reshape", torch.flatten, nn.Flatten}


@dataclass
class SlicedLayer:
    """One sliced layer and where its neuron outputs are observed.

    ``hook_module`` is the module whose forward output (on its ``call_index``-th call within one
    forward, or every call when ``None``) is the neuron output once ``post_ops`` (functional
    activations) are applied. ``mask_fill`` is the value a masked neuron takes at the hook point
    so that its output after ``post_ops`` is 0: 0 when they all map 0 to 0, ``-inf`` after e.g.
    ``torch.sigmoid`` / ``F.softplus`` (which map -inf, not 0, to 0). ``norm`` is the BatchNorm right after the layer,
    if any (its scale/shift belong to the neuron's parameters).
    """

    name: str
    module: nn.Module
    num_neurons: int
    hook_name: str
    hook_module: nn.Module
    call_index: int | None = None
    post_ops: list[Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=list)
    norm_name: str | None = None
    norm_module: nn.Module | None = None
    chain: list[str] = field(default_factory=list)
    # Parameters removed with each neuron: own (weights, bias, norm) and in its consumers.
    own_params_per_neuron: int = 0
    # (consumer layer name, weight entries per removed neuron and per consumer output unit)
    consumers: list[tuple[str, int]] = field(default_factory=list)
    pass_params_per_neuron: int = 0  # per-channel norms/PReLUs between layer and consumers
    coupled: bool = False  # output reaches a join (residual add, concat, model output)
    mask_fill: float = 0.0  # hook-point value of a masked neuron (post_ops map it to 0)

    @property
    def kind(self) -> str:
        return "linear" if isinstance(self.module, nn.Linear) else "conv"

    def neuron_view(self, t: torch.Tensor) -> torch.Tensor:
        """Reshape a hooked output to ``(batch, neurons, positions)``."""
        if self.kind == "linear":
            t = t.movedim(-1, 1)
        return t.reshape(t.shape[0], self.num_neurons, -1)

    def mask_shape(self, t: torch.Tensor) -> list[int]:
        """Shape a per-neuron vector must take to broadcast against a hooked output."""
        shape = [1] * t.dim()
        shape[-1 if self.kind == "linear" else 1] = self.num_neurons
        return shape

    def apply_post(self, t: torch.Tensor) -> torch.Tensor:
        for op in self.post_ops:
            t = op(t)
        return t


def model_fingerprint(model: nn.Module) -> str:
    """Architecture fingerprint: hash of parameter/buffer names, shapes and module types
    (of the module inside a ``torch.compile`` / DataParallel wrapper)."""
    model = unwrap_model(model)
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)};".encode())
    for name, m in model.named_modules():
        h.update(f"{name}={type(m).__name__};".encode())
    return h.hexdigest()[:16]


def _trace(model: nn.Module) -> fx.GraphModule | None:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # any tracing failure means: use the fallback
        logger.warning(
            "neuslice could not trace %s with torch.fx (%s: %s); neuron outputs are taken at "
            "each layer's own output (before any BatchNorm/activation).",
            type(model).__name__,
            type(exc).__name__,
            str(exc).splitlines()[0][:200],
        )
        return None


def _fixes_zero(fn: Callable) -> bool:
    with torch.no_grad():
        return bool(fn(torch.zeros(4)).eq(0).all())


def _zero_fill(ops: list[Callable]) -> float | None:
    """A value that ``ops`` (applied in turn) map to exactly 0: 0, -inf or +inf; else None."""
    for v in (0.0, float("-inf"), float("inf")):
        t = torch.full((4,), v)
        with torch.no_grad():
            for op in ops:
                t = op(t)
        if bool(t.eq(0).all()):
            return v
    return None


def _functional_op(node: fx.Node, src: fx.Node) -> Callable | None:
    """A per-element activation applied to ``src`` alone, as a callable; else None."""
    if not node.args or node.args[0] is not src:
        return None
    rest = list(node.args[1:]) + list(node.kwargs.values())
    if any(isinstance(a, fx.Node) for a in rest):
        return None
    kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
    if node.op == "call_function" and node.target in ACT_FUNCTIONS:
        fn = ACT_FUNCTIONS[node.target]
        # These take no argument but `inplace` after the input; never run in place.
        args = () if fn in _INPLACE_ONLY_ARGS else tuple(node.args[1:])
        return lambda t: fn(t, *args, **kwargs)
    if node.op == "call_method" and node.target in ACT_METHODS and len(node.args) == 1:
        return ACT_METHODS[node.target]
    return None


def _zero_fill_ok(ops: list[Callable], fill: float) -> bool:
    t = torch.full((4,), fill)
    with torch.no_grad():
        for op in ops:
            t = op(t)
    return bool(t.eq(0).all())


def _is_dropout_node(node: fx.Node, src: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target in _DROPOUT_FUNCTIONS
        and bool(node.args)
        and node.args[0] is src
    )


def _value_users(node: fx.Node) -> list[fx.Node]:
    return [
        u
        for u in node.users
        if not (u.op == "call_method" and u.target in _IGNORED_USERS_METHODS)
        and not (
            u.op == "call_function"
            and u.target in (getattr, operator.getitem)
            and len(u.args) > 1
            and u.args[1] == "shape"
        )
    ]


def _module_call_indices(gm: fx.GraphModule) -> dict[fx.Node, tuple[int, int]]:
    counts: dict[str, int] = {}
    order: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            order[node] = counts.get(node.target, 0)
            counts[node.target] = counts.get(node.target, 0) + 1
    return {n: (i, counts[n.target]) for n, i in order.items()}


def _num_neurons(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _own_params(m: nn.Module) -> int:
    per = m.weight[0].numel() if m.weight is not None else 0
    return per + (1 if getattr(m, "bias", None) is not None else 0)


def _chain(layer: SlicedLayer, node: fx.Node, gm: fx.GraphModule, calls) -> fx.Node:
    """Walk the per-neuron ops after ``node``; fill the hook point into ``layer``."""
    mods = dict(gm.named_modules())
    cur = node
    while True:
        users = _value_users(cur)
        if len(users) != 1:
            break
        u = users[0]
        if u.op == "call_module":
            m = mods[u.target]
            if not isinstance(m, _NORM_TYPES + ACT_TYPES + _IDENTITY_TYPES):
                break
            if isinstance(m, _NORM_TYPES) and m.num_features != layer.num_neurons:
                break
            if isinstance(m, _NORM_TYPES) and cur is node:
                layer.norm_name, layer.norm_module = u.target, m
            layer.hook_name, layer.hook_module = u.target, m
            idx, total = calls[u]
            layer.call_index = idx if total > 1 else None
            layer.post_ops = []
            layer.mask_fill = 0.0
            layer.chain.append(u.target)
            cur = u
            continue
        if _is_dropout_node(u, cur):
            cur = u
            continue
        fn = _functional_op(u, cur)
        if fn is None:
            break
        fill = layer.mask_fill if _fixes_zero(fn) else _zero_fill(layer.post_ops + [fn])
        if fill is None or not _zero_fill_ok(layer.post_ops + [fn], fill):
            name = getattr(u.target, "__name__", u.target)
            msg = (
                f"neuslice: the neurons of layer {layer.name!r} pass through {name} after "
                f"{layer.chain or 'the layer'}, and no input value makes that chain output 0; "
                f"masking them there is not the same as removing them (the next layer sees "
                f"{name}(0), not 0). Use an nn.Module activation or apply {name} before the "
                f"others to make masking exact."
            )
            logger.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            break
        layer.mask_fill = fill
        layer.post_ops.append(fn)
        layer.chain.append(str(getattr(u.target, "__name__", u.target)))
        cur = u
    return cur


def _per_neuron_reduction(u: fx.Node, src: fx.Node, rank: int | None) -> int | None | bool:
    """If ``u`` reduces ``src`` (still in the layer's own layout: neurons on axis 1 of a conv
    output of ``rank`` axes, on the last axis of a linear one, ``rank=None``) over non-neuron
    axes only -- ``x.mean((2, 3))``, ``torch.amax(x, dim=(-2, -1))``, ... -- the rank of its
    result; else False."""
    is_reduce = (u.op == "call_method" and u.target in _REDUCE_METHODS) or (
        u.op == "call_function" and u.target in _REDUCE_FUNCTIONS
    )
    if not is_reduce or not u.args or u.args[0] is not src:
        return False
    dims = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim")
    dims = (dims,) if isinstance(dims, int) else dims
    if (
        not isinstance(dims, (tuple, list))
        or not dims
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in dims)
    ):
        return False
    others = [a for a in list(u.args[2:]) + list(u.kwargs.values()) if isinstance(a, fx.Node)]
    if others:
        return False
    keep = u.kwargs.get("keepdim", u.args[2] if len(u.args) > 2 else False) is True
    if rank is None:  # (..., d): any axis but the last, counted from the end
        return None if all(v < -1 for v in dims) else False
    axes = {v % rank for v in dims if -rank <= v < rank}
    if len(axes) != len(dims) or min(axes) < 2:  # (N, C, ...): never N or C
        return False
    return rank if keep else rank - len(axes)


def _consumers(layer: SlicedLayer, end: fx.Node, gm: fx.GraphModule) -> None:
    """Find the layers that consume this layer's neurons (through per-channel ops only)."""
    mods = dict(gm.named_modules())
    d = layer.num_neurons
    frontier, seen = [end], set()
    # nodes whose value still has the neurons on their own axis -> its rank (None: linear)
    own_layout = {end: 4 if layer.kind == "conv" else None}
    while frontier:
        n = frontier.pop()
        for u in _value_users(n):
            rank = _per_neuron_reduction(u, n, own_layout[n]) if n in own_layout else False
            if rank is not False:
                if u not in seen:
                    seen.add(u)
                    frontier.append(u)
                    own_layout[u] = rank
                continue
            if u in seen:
                continue
            seen.add(u)
            if u.op == "call_module":
                m = mods[u.target]
                if isinstance(m, nn.Linear) and m.in_features % d == 0:
                    layer.consumers.append((u.target, m.in_features // d))
                    continue
                if (
                    isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))
                    and m.in_channels == d
                    and m.groups == 1
                ):
                    # weight entries per removed input channel and per output channel
                    layer.consumers.append((u.target, m.weight[0, 0].numel()))
                    continue
                if isinstance(m, _PASS_MODULES) and not isinstance(m, SLICEABLE_TYPES):
                    if isinstance(m, _NORM_TYPES) and m.affine and m.num_features == d:
                        layer.pass_params_per_neuron += 2
                    if isinstance(m, nn.PReLU) and m.num_parameters == d:
                        layer.pass_params_per_neuron += 1
                    frontier.append(u)
                    if n in own_layout and not isinstance(m, nn.Flatten):
                        own_layout[u] = own_layout[n]
                    continue
            elif (u.op == "call_function" and u.target in _PASS_FUNCTIONS) or (
                u.op == "call_method" and u.target in _PASS_METHODS
            ):
                if u.args and u.args[0] is n:
                    frontier.append(u)
                    if n in own_layout and u.target not in _RESHAPES:
                        own_layout[u] = own_layout[n]
                    continue
            layer.coupled = True
            layer.consumers, layer.pass_params_per_neuron = [], 0
            return


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def find_layers(model: nn.Module, layers: Sequence[str] | None = None) -> list[SlicedLayer]:
    """The layers to slice, in execution order, with their neuron-output hook points.

    ``layers=None`` picks every ``Linear``/``Conv2d`` except the classifier head (the last one
    executed). Unknown or unsupported names raise ``ValueError``. Results are cached per model
    and architecture fingerprint (tracing a large model is not free).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)  # torch.compile / DataParallel: the module inside
    # Module identities too: a submodule swapped for one of the same type and shape keeps the
    # fingerprint, but hooks must go on the new object. (Cached entries hold the old modules,
    # so their ids cannot be reused while cached.)
    key = (
        model_fingerprint(model),
        tuple(map(id, model.modules())),
        None if layers is None else ((layers,) if isinstance(layers, str) else tuple(layers)),
    )
    cached = _CACHE.setdefault(model, {})
    if key not in cached:
        cached[key] = _find_layers(model, layers)
    return list(cached[key])


def _find_layers(model: nn.Module, layers: Sequence[str] | None) -> list[SlicedLayer]:
    named = dict(model.named_modules())
    gm = _trace(model)
    if gm is not None:
        calls = _module_call_indices(gm)
        nodes = [
            n
            for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(named.get(n.target), SLICEABLE_TYPES)
        ]
        ordered = list(dict.fromkeys(n.target for n in nodes))
    else:
        nodes, calls = [], {}
        ordered = [n for n, m in named.items() if isinstance(m, SLICEABLE_TYPES)]
    if not ordered:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d layer to slice.")
    if layers is None:
        chosen = ordered[:-1]
        if not chosen:
            raise ValueError(
                "the model's only Linear/Conv2d layer is its classifier head; pass layers=[...] "
                "explicitly to slice it."
            )
    else:
        if isinstance(layers, str):
            layers = [layers]
        unknown = [n for n in layers if n not in named]
        if unknown:
            raise ValueError(
                f"unknown layer name(s) {unknown}; sliceable layers of this model are {ordered}."
            )
        bad = [n for n in layers if not isinstance(named[n], SLICEABLE_TYPES)]
        if bad:
            raise ValueError(
                f"layer(s) {bad} are not nn.Linear/nn.Conv2d (got "
                f"{[type(named[n]).__name__ for n in bad]}); choose from {ordered}."
            )
        chosen = sorted(set(layers), key=lambda n: ordered.index(n) if n in ordered else 1e9)
    result = []
    for name in chosen:
        m = named[name]
        layer = SlicedLayer(
            name=name,
            module=m,
            num_neurons=_num_neurons(m),
            hook_name=name,
            hook_module=m,
            own_params_per_neuron=_own_params(m),
        )
        layer_nodes = [n for n in nodes if n.target == name]
        if gm is None or not layer_nodes:
            layer.coupled = True
        elif len(layer_nodes) > 1:
            raise ValueError(
                f"layer {name!r} is called {len(layer_nodes)} times per forward pass; a shared "
                f"layer has no single set of neuron outputs, so it cannot be sliced. Leave it "
                f"out of layers=[...]."
            )
        else:
            end = _chain(layer, layer_nodes[0], gm, calls)
            _consumers(layer, end, gm)
            if (
                isinstance(m, nn.Conv2d)
                and m.groups > 1
                and not m.groups == m.in_channels == m.out_channels
            ):
                layer.coupled = True  # a grouped conv's channels cannot be removed one by one
                layer.consumers, layer.pass_params_per_neuron = [], 0
            for n in layer.chain:
                mod = named.get(n)
                if isinstance(mod, _NORM_TYPES) and mod.affine:
                    layer.own_params_per_neuron += 2
                elif isinstance(mod, nn.PReLU) and mod.num_parameters == layer.num_neurons:
                    layer.own_params_per_neuron += 1
        result.append(layer)
    return result
