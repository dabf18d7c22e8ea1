"""Layer-wise sparsity allocation for magnitude pruning (the restructure experiments, RQ2).

The weights of every ``nn.Linear`` / ``nn.Conv2d`` (biases and BatchNorm are never pruned) are
pruned with one of the four allocations compared by Lee et al., "Layer-adaptive sparsity for the
magnitude-based pruning" (LAMP, ICLR 2021):

``global``
    One magnitude threshold over all prunable weights (Morcos et al., 2019).
``lamp``
    LAMP score. With a layer's weights sorted ascending by magnitude ``w_(1) <= ... <= w_(n)``,
    ``score(u) = w_(u)^2 / sum_{v >= u} w_(v)^2``; the globally smallest scores are pruned.
``uniform_plus``
    Uniform+ (Gale et al., 2019): one common density for all layers, except that the first
    prunable layer stays dense and the last one is pruned to at most 80% sparsity (a model with
    a single prunable layer only gets the 80% cap).
``erk``
    Erdős–Rényi-Kernel (Evci et al., 2020): layer density proportional to
    ``sum(weight.shape) / prod(weight.shape)``, layers whose density would exceed 1 kept dense and
    the common factor recomputed for the others.

Amounts follow the LAMP reference implementation: one call prunes the fraction ``amount`` of
the *currently remaining* prunable weights, so ``r`` rounds leave a density of ``(1 - amount)^r``.
Masks are applied with :func:`torch.nn.utils.prune.custom_from_mask`, so they combine with the
masks of earlier rounds and pruned weights stay pruned.

"First" and "last" prunable layer mean the first and last in ``model.named_modules()`` order
(registration order), which for ordinary feed-forward models is the input and output layer.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.utils import prune

__all__ = [
    "METHODS",
    "PRUNABLE_TYPES",
    "PruneReport",
    "prune_weights",
    "sparsity",
    "compression_rate",
    "remove_reparametrization",
    "iterative_prune",
]

METHODS = ("global", "lamp", "uniform_plus", "erk")
PRUNABLE_TYPES = (nn.Linear, nn.Conv2d)
_LAST_LAYER_MAX_SPARSITY = 0.8  # Uniform+: the output layer keeps at least 20% of its weights.

LayerSpec = Union[str, nn.Module]


# ----------------------------------------------------------------------------- layer helpers
def _is_pruned(module: nn.Module) -> bool:
    return "weight_orig" in module._parameters and "weight_mask" in module._buffers


def _mask(module: nn.Module, zeros_pruned: bool = True) -> torch.Tensor:
    """Current 0/1 keep-mask of ``module.weight``. Without a pruning reparametrisation, exact
    zeros count as pruned if ``zeros_pruned`` (for the metrics), else everything is kept."""
    if _is_pruned(module):
        return module.weight_mask.detach()
    if zeros_pruned:
        return (module.weight.detach() != 0).to(module.weight.dtype)
    return torch.ones_like(module.weight.detach())


def _weight(module: nn.Module) -> torch.Tensor:
    """The effective weight, recomputed from ``weight_orig * weight_mask`` (the ``weight``
    attribute is only refreshed on the next forward, so it may be stale after fine-tuning)."""
    if _is_pruned(module):
        return (module.weight_orig * module.weight_mask).detach()
    return module.weight.detach()


def _prunable_layers(
    model: nn.Module, layers: Optional[Iterable[LayerSpec]] = None
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the layers to prune, in registration order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    if layers is None:
        if not found:
            raise ValueError("model has no nn.Linear or nn.Conv2d layer to prune")
        return found
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    by_name = dict(model.named_modules())
    by_id = {id(m): n for n, m in by_name.items()}
    wanted: set[str] = set()
    for spec in layers:
        if isinstance(spec, str):
            if spec not in by_name:
                raise ValueError(f"no submodule named {spec!r} in the model")
            name = spec
        elif isinstance(spec, nn.Module):
            if id(spec) not in by_id:
                raise ValueError(f"module {type(spec).__name__} is not part of the model")
            name = by_id[id(spec)]
        else:
            raise TypeError(f"layers must hold module names or modules, got {type(spec).__name__}")
        if not isinstance(by_name[name], PRUNABLE_TYPES):
            raise TypeError(
                f"layer {name!r} is a {type(by_name[name]).__name__}; only nn.Linear "
                "and nn.Conv2d weights can be pruned"
            )
        wanted.add(name)
    if not wanted:
        raise ValueError("layers is empty: nothing to prune")
    return [(n, m) for n, m in found if n in wanted]


def _check_amount(amount: float) -> float:
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(f"amount must be a real number in [0, 1), got {type(amount).__name__}")
    amount = float(amount)
    if not 0.0 <= amount < 1.0:  # also rejects NaN
        raise ValueError(
            f"amount must be in [0, 1) (fraction of the remaining weights to prune), got {amount}"
        )
    return amount


def _check_method(method: str) -> str:
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, one of {', '.join(METHODS)}")
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    return method


# --------------------------------------------------------------------------- allocations
def _solve_keeps(
    weights: Sequence[float], lo: Sequence[int], hi: Sequence[int], target: int
) -> list[int]:
    """Integer keeps ``k_l = clip(eps * weights[l], lo[l], hi[l])`` with ``sum k_l = target``.

    ``eps`` is found exactly from the breakpoints of the piecewise-linear, non-decreasing sum
    (equivalent to the iterative "clamp the layers that overflow and recompute eps for the rest"
    scheme); the fractional keeps are then rounded by the largest-remainder rule so the total is
    exact whenever it is reachable (``sum lo <= target <= sum hi``).
    """

    def total(e: float) -> float:
        return sum(min(max(e * w, a), b) for w, a, b in zip(weights, lo, hi))

    if target <= sum(lo):
        return list(lo)
    if target >= sum(hi):
        return list(hi)
    points = sorted(
        {0.0} | {a / w for w, a in zip(weights, lo)} | {b / w for w, b in zip(weights, hi)}
    )
    prev_e, prev_f = 0.0, total(0.0)
    eps = points[-1]
    for e in points[1:]:
        f = total(e)
        if f >= target:  # the sum is linear between prev_e and e
            eps = prev_e + (e - prev_e) * (target - prev_f) / (f - prev_f) if f > prev_f else e
            break
        prev_e, prev_f = e, f
    exact = [min(max(eps * w, a), b) for w, a, b in zip(weights, lo, hi)]
    keeps = [min(max(int(math.floor(x + 1e-9)), a), b) for x, a, b in zip(exact, lo, hi)]
    short = target - sum(keeps)
    order = sorted(range(len(keeps)), key=lambda i: keeps[i] - exact[i])  # largest remainder first
    for i in order:
        if short <= 0:
            break
        if keeps[i] < hi[i]:
            keeps[i] += 1
            short -= 1
    return keeps


def _lamp_scores(w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """LAMP scores of the remaining entries ``w[keep]`` (1-D, same order)."""
    sq = w[keep].double().pow(2)
    srt, idx = torch.sort(sq, stable=True)
    tail = torch.flip(torch.cumsum(torch.flip(srt, [0]), 0), [0])  # sum_{v >= u} w_(v)^2
    score_sorted = torch.where(
        tail > 0, srt / tail.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(srt)
    )
    out = torch.empty_like(score_sorted)
    out[idx] = score_sorted
    return out


def _global_prune_sets(scores: list[torch.Tensor], n_prune: int) -> list[torch.Tensor]:
    """Per layer, the positions (into its remaining entries) of the ``n_prune`` globally smallest
    scores; ties go to the earlier layer / entry."""
    sizes = [s.numel() for s in scores]
    flat = torch.cat(scores)
    chosen = torch.argsort(flat, stable=True)[:n_prune]
    picked = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    picked[chosen] = True
    return [p.nonzero().flatten() for p in torch.split(picked, sizes)]


def _keep_counts(
    method: str, layers: list[tuple[str, nn.Module]], remaining: list[int], target: int
) -> list[int]:
    """Number of weights each layer keeps under ``uniform_plus`` / ``erk``."""
    sizes = [m.weight.numel() for _, m in layers]
    if method == "erk":
        shapes = [tuple(_weight(m).shape) for _, m in layers]
        # density_l = eps * sum(dims)/prod(dims)  =>  keep_l = eps * sum(dims), capped at the
        # layer's remaining weights (density 1 on a dense layer)
        return _solve_keeps([float(sum(s)) for s in shapes], [0] * len(layers), remaining, target)
    # uniform_plus: common density (relative to the full layer) for all, first layer dense,
    # last layer keeps at least 20% of its weights (or what it still has, if fewer).
    lo = [0] * len(layers)
    hi = list(remaining)
    if len(layers) > 1:
        lo[0] = remaining[0]
    min_last = int(math.ceil((1.0 - _LAST_LAYER_MAX_SPARSITY) * sizes[-1] - 1e-9))
    lo[-1] = max(lo[-1], min(remaining[-1], min_last))
    return _solve_keeps([float(s) for s in sizes], lo, hi, target)


def prune_weights(
    model: nn.Module, method: str, amount: float, layers: Optional[Iterable[LayerSpec]] = None
) -> dict[str, float]:
    """Prune the fraction ``amount`` of the currently remaining prunable weights, in place.

    Args:
        model: the network; the weights of its ``nn.Linear``/``nn.Conv2d`` layers are pruned.
        method: ``"global"``, ``"lamp"``, ``"uniform_plus"`` or ``"erk"`` (see module docstring).
        amount: fraction in ``[0, 1)`` of the still-unpruned weights to remove this round.
        layers: restrict pruning (and the allocation) to these layers, given as names or modules;
            default: all ``nn.Linear``/``nn.Conv2d`` layers.

    Returns:
        ``{layer name: sparsity of its weight after the round}``.

    The new mask is added with ``prune.custom_from_mask``, so it multiplies any earlier mask; a
    layer without a mask counts as fully unpruned. Within a layer the smallest-magnitude
    remaining weights are pruned first.
    """
    method = _check_method(method)
    amount = _check_amount(amount)
    chosen = _prunable_layers(model, layers)
    keeps = [_mask(m, zeros_pruned=False).flatten().bool() for _, m in chosen]
    weights = [_weight(m).flatten() for _, m in chosen]
    remaining = [int(k.sum()) for k in keeps]
    total_left = sum(remaining)
    target = int(math.floor((1.0 - amount) * total_left + 0.5))  # weights that survive
    n_prune = total_left - target

    if method in ("global", "lamp"):
        if method == "global":
            scores = [w[k].abs().double() for w, k in zip(weights, keeps)]
        else:
            scores = [_lamp_scores(w, k) for w, k in zip(weights, keeps)]
        prune_sets = _global_prune_sets(scores, n_prune)
    else:
        counts = _keep_counts(method, chosen, remaining, target)
        prune_sets = []
        for w, k, r, c in zip(weights, keeps, remaining, counts):
            order = torch.argsort(w[k].abs(), stable=True)
            prune_sets.append(order[: r - c])

    result: dict[str, float] = {}
    for (name, module), w, k, drop in zip(chosen, weights, keeps, prune_sets):
        new_keep = k.clone()
        new_keep[k.nonzero().flatten()[drop]] = False
        mask = new_keep.view_as(module.weight_mask if _is_pruned(module) else module.weight)
        prune.custom_from_mask(module, "weight", mask.to(w.dtype))
        result[name] = 1.0 - float(new_keep.sum()) / new_keep.numel()
    return result


# ------------------------------------------------------------------------------- metrics
def _pruned_counts(model: nn.Module) -> tuple[int, int]:
    """(pruned entries, total entries) over all nn.Linear/nn.Conv2d weights."""
    pruned = total = 0
    for _, m in _prunable_layers(model):
        mask = _mask(m)
        pruned += int((mask == 0).sum())
        total += mask.numel()
    return pruned, total


def sparsity(model: nn.Module) -> float:
    """Fraction of the ``nn.Linear``/``nn.Conv2d`` weights that are pruned.

    A weight counts as pruned when its mask entry is 0, or, for a layer without a pruning mask
    (e.g. after :func:`remove_reparametrization`), when it is exactly zero.
    """
    pruned, total = _pruned_counts(model)
    return pruned / total


def compression_rate(model: nn.Module) -> float:
    """Fraction of *all* model parameters that are pruned (biases, BatchNorm etc. count as kept).

    Pruned weights are counted as in :func:`sparsity`; ``weight_orig`` stands for the weight, so
    no parameter is counted twice.
    """
    pruned, _ = _pruned_counts(model)
    n_params = sum(p.numel() for p in model.parameters())
    return pruned / n_params if n_params else 0.0


def remove_reparametrization(model: nn.Module) -> nn.Module:
    """Make pruning permanent: ``prune.remove`` on every pruned layer weight (masked entries
    become zeros in a plain ``weight`` parameter). Returns ``model``."""
    for _, m in _prunable_layers(model):
        if _is_pruned(m):
            prune.remove(m, "weight")
    return model


# ------------------------------------------------------------------------ iterative pruning
@dataclass
class PruneReport:
    """Result of :func:`iterative_prune`.

    Attributes:
        method: the allocation method.
        rounds: number of pruning rounds kept (NI).
        compression_rate: :func:`compression_rate` of the returned model (CR).
        accuracy: accuracy of the returned model (MA).
        original_accuracy: accuracy before pruning.
        history: ``(round, sparsity, accuracy)`` for round 0 (the original model) and every round
            evaluated, including a final rejected (reverted) one.
    """

    method: str
    rounds: int
    compression_rate: float
    accuracy: float
    original_accuracy: float
    history: list[tuple[int, float, float]] = field(default_factory=list)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _restore(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    """Load ``snap`` back in place, first re-aligning each layer's pruning reparametrisation
    (a layer pruned for the first time since the snapshot has ``weight_orig``/``weight_mask``
    keys instead of ``weight``). Parameter objects are kept, so optimisers stay valid."""
    for name, m in _prunable_layers(model):
        prefix = f"{name}." if name else ""
        was_pruned = f"{prefix}weight_mask" in snap
        if _is_pruned(m) and not was_pruned:
            prune.remove(m, "weight")
        elif was_pruned and not _is_pruned(m):
            prune.custom_from_mask(m, "weight", snap[f"{prefix}weight_mask"])
    model.load_state_dict(snap)
    for _, m in _prunable_layers(model):
        if _is_pruned(m):  # refresh the cached effective weight from the restored buffers
            m.weight = m.weight_orig * m.weight_mask


def _accuracy(evaluate: Callable[[nn.Module], float], model: nn.Module) -> float:
    value = evaluate(model)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"evaluate(model) must return a number, got {type(value).__name__}")
    return float(value)


def iterative_prune(
    model: nn.Module,
    method: str,
    evaluate: Callable[[nn.Module], float],
    finetune: Optional[Callable[[nn.Module], object]],
    amount: float = 0.2,
    tolerance: float = 0.01,
    max_rounds: int = 20,
    layers: Optional[Iterable[LayerSpec]] = None,
    reference_accuracy: Optional[float] = None,
) -> PruneReport:
    """Prune-finetune-evaluate rounds until accuracy drops more than ``tolerance``.

    Each round calls :func:`prune_weights` with ``amount``, then ``finetune(model)`` (skipped if
    ``None``), then ``evaluate(model)``. If the accuracy falls below
    ``original_accuracy - tolerance`` the round is reverted (the state dict, including
    ``weight_orig``/``weight_mask``, is snapshot before every round and loaded back in place) and
    the loop stops; it also stops after ``max_rounds`` kept rounds. ``model`` is modified in place
    and ends as the last acceptable model. ``reference_accuracy`` replaces the model's own
    starting accuracy in the stopping rule (e.g. the unrestructured model's accuracy).
    """
    method = _check_method(method)
    amount = _check_amount(amount)
    if not callable(evaluate):
        raise TypeError("evaluate must be a callable evaluate(model) -> accuracy")
    if finetune is not None and not callable(finetune):
        raise TypeError("finetune must be a callable finetune(model) or None")
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real):
        raise TypeError(f"tolerance must be a number, got {type(tolerance).__name__}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, numbers.Integral):
        raise TypeError(f"max_rounds must be an int, got {type(max_rounds).__name__}")
    if max_rounds < 0:
        raise ValueError(f"max_rounds must be >= 0, got {max_rounds}")
    _prunable_layers(model, layers)  # validate before any callback runs

    original = _accuracy(evaluate, model)
    history = [(0, sparsity(model), original)]
    accuracy, kept = original, 0
    for r in range(1, max_rounds + 1):
        snap = _snapshot(model)
        prune_weights(model, method, amount, layers)
        if finetune is not None:
            finetune(model)
        acc = _accuracy(evaluate, model)
        history.append((r, sparsity(model), acc))
        reference = original if reference_accuracy is None else reference_accuracy
        if acc < reference - tolerance:
            _restore(model, snap)
            break
        accuracy, kept = acc, r
    return PruneReport(
        method=method,
        rounds=kept,
        compression_rate=compression_rate(model),
        accuracy=accuracy,
        original_accuracy=original,
        history=history,
    )
