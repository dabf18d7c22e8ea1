"""Physically remove a slice's non-critical neurons from a model (needs ``torch-pruning``).

:func:`restructure` returns a smaller copy of the model: each removed neuron takes its weight
row/channel, bias, BatchNorm entries and the input columns/channels of its consumers with it.
The dependency graph of `torch-pruning <https://github.com/VainF/Torch-Pruning>`_ finds every
tensor that shares a channel dimension, including channels coupled through residual additions
and concatenations.

Coupled channels (e.g. the convolutions feeding one residual add) can only be removed together,
so a channel is removed only when *every* layer producing it marks it non-critical; a coupled
producer that is not in the slice keeps all its channels, and so do channels that reach the
model's output. The slice actually applied is available with ``return_slice=True``::

    small, eff = neuslice.restructure(model, sl, example_inputs, return_slice=True)
    with neuslice.masked(model, eff):
        assert torch.allclose(model(x), small(x), atol=1e-5)   # in eval mode
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from ..layers import SlicedLayer
from ..slicing import Slice
from .._utils.checks import model_device
from .._utils.in_use import exclusive
from .._utils.wrappers import unwrap_model

logger = logging.getLogger(__name__)

__all__ = ["restructure"]

_INSTALL_HINT = "pip install torch-pruning  (or: pip install 'neuslice[restructure]')"


def _import_tp():
    try:
        import torch_pruning as tp
    except ImportError as exc:
        raise ImportError(
            f"neuslice.restructure needs the torch-pruning package: {_INSTALL_HINT}. "
            f"To evaluate a slice without it, use neuslice.masked(model, slice)."
        ) from exc
    return tp


def _example_inputs(slice: Slice, example_inputs: Any, model: nn.Module) -> Any:
    if example_inputs is not None:
        return example_inputs
    if not slice.input_shape:
        raise ValueError("the slice records no input shape; pass example_inputs=...")
    return torch.zeros([1, *slice.input_shape], device=model_device(model))


def _forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _shapes(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return [_shapes(o) for o in out]
    if isinstance(out, dict):
        return {k: _shapes(v) for k, v in out.items()}
    return type(out).__name__


@dataclasses.dataclass
class _Group:
    """One set of coupled output channels, rooted at a sliced layer."""

    root: str
    size: int
    # sliced layer name -> (its channel indices, the matching root indices)
    members: dict[str, tuple[list[int], list[int]]]
    blocked: str | None = None  # why no channel of this group may be removed
    extra_norms: list[str] = dataclasses.field(default_factory=list)
    remove: list[int] = dataclasses.field(default_factory=list)  # root indices


def _grouped(m: nn.Module) -> bool:
    """A grouped (not depthwise) convolution: removing single channels breaks its groups."""
    groups = getattr(m, "groups", 1)
    return (
        isinstance(m, nn.modules.conv._ConvNd)
        and groups > 1
        and not (groups == m.in_channels == m.out_channels)
    )


def _pruning_group(dg, module: nn.Module, name: str, idxs: list[int]):
    """torch-pruning's group of ``module``'s output channels ``idxs``; its errors (raised for
    modules it does not support, e.g. ``nn.GRU``) become a ``ValueError`` saying what to do."""
    try:
        fn = dg.get_pruner_of_module(module).prune_out_channels
        return dg.get_pruning_group(module, fn, idxs)
    except Exception as exc:
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise ValueError(
            f"torch-pruning cannot follow the channels of layer {name!r} through the model "
            f"({type(exc).__name__}: {reason}); this happens when they feed a module it does not "
            f"support (e.g. nn.GRU/nn.RNN). Leave {name!r} out of the slice (profile with "
            f"layers=[...] without it) or evaluate the slice with neuslice.masked(model, slice)."
        ) from exc


def _ties(model: nn.Module) -> list[list[str]]:
    """Names of each parameter that is shared by several modules (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    return [names for names in by_id.values() if len(names) > 1]


def _get(model: nn.Module, name: str) -> torch.Tensor:
    module, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module) if module else model, attr)


def _analyse(
    dg, layers: list[SlicedLayer], masks: dict[str, torch.Tensor], modules: dict[str, nn.Module]
) -> list[_Group]:
    """Group the sliced layers by coupled output channels and decide what each group removes."""
    by_module = {id(modules[l.name]): l for l in layers}
    sliceable = (
        nn.Linear,
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
    )
    names = {id(m): n for n, m in modules.items()}
    done: set[str] = set()
    groups = []
    for layer in layers:
        if layer.name in done:
            continue
        module = modules[layer.name]
        if module not in dg.module2node:
            raise ValueError(
                f"layer {layer.name!r} is not used in the forward pass torch-pruning traced with "
                f"example_inputs, so it cannot be restructured; use neuslice.masked instead."
            )
        group = _pruning_group(dg, module, layer.name, list(range(layer.num_neurons)))
        g = _Group(root=layer.name, size=layer.num_neurons, members={})
        chain_norms = set()
        for item in group.items:
            dep, target = item.dep, item.dep.target
            tmod = target.module
            if _grouped(tmod) and g.blocked is None:  # as producer or as consumer
                g.blocked = (
                    f"it is coupled to grouped convolution "
                    f"{names.get(id(tmod), '?')!r} (groups={tmod.groups}), whose channels "
                    f"torch-pruning cannot remove one by one"
                )
            if not dg.is_out_channel_pruning_fn(dep.handler):
                continue
            if not target.outputs and g.blocked is None:
                g.blocked = "its channels reach the model's output"
            if not isinstance(tmod, nn.Module):
                continue
            if id(tmod) in by_module:
                member = by_module[id(tmod)]
                g.members[member.name] = (list(item.idxs), list(item.root_idxs))
                chain_norms.update(member.chain)
                done.add(member.name)
            elif isinstance(tmod, sliceable) and g.blocked is None:
                g.blocked = (
                    f"it is coupled to layer {names.get(id(tmod), '?')!r}, which is "
                    f"not in the slice"
                )
            elif isinstance(tmod, nn.modules.batchnorm._BatchNorm):
                g.extra_norms.append(names.get(id(tmod), "?"))
        g.extra_norms = [n for n in g.extra_norms if n not in chain_norms]
        if g.blocked is None:
            needed = torch.zeros(g.size, dtype=torch.bool)
            for name, (idxs, roots) in g.members.items():
                needed[torch.as_tensor(roots, dtype=torch.long)] |= masks[name][
                    torch.as_tensor(idxs, dtype=torch.long)
                ]
            g.remove = torch.nonzero(~needed).flatten().tolist()
            if len(g.remove) == g.size:
                keep = g.remove.pop(0)
                logger.warning(
                    "every neuron of layer(s) %s is non-critical; torch-pruning cannot remove "
                    "them all, so neuron %d is kept.",
                    sorted(g.members),
                    keep,
                )
        groups.append(g)
    return groups


def _effective(slice: Slice, groups: list[_Group], layers: list[SlicedLayer]) -> Slice:
    """The slice that masking must apply to equal the restructured model."""
    keep = {l.name: torch.ones(l.num_neurons, dtype=torch.bool) for l in layers}
    for g in groups:
        if not g.remove:
            continue
        removed = torch.zeros(g.size, dtype=torch.bool)
        removed[g.remove] = True
        for name, (idxs, roots) in g.members.items():
            keep[name][torch.as_tensor(idxs, dtype=torch.long)] = ~removed[
                torch.as_tensor(roots, dtype=torch.long)
            ]
    masks = {k: keep[k] for k in slice.masks}
    cat = None
    if slice.category_masks is not None:  # keep "masks = union of category masks"
        cat = {
            k: v.bool().cpu() | (masks[k] & ~slice.masks[k].bool().cpu())
            for k, v in slice.category_masks.items()
        }
    changed = [k for k in masks if not torch.equal(masks[k], slice.masks[k].bool().cpu())]
    notes = list(slice.notes)
    if changed:
        notes.append(f"restructure: kept extra (coupled or last) neurons in {changed}")
    return dataclasses.replace(slice, masks=masks, category_masks=cat, notes=notes)


def restructure(
    model: nn.Module, slice: Slice, example_inputs: Any = None, *, return_slice: bool = False
) -> nn.Module | tuple[nn.Module, Slice]:
    """A copy of ``model`` with the slice's non-critical neurons physically removed.

    ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of keyword inputs) is
    run once through the copy to trace its dependency graph; by default a zero batch of
    ``slice.input_shape``. ``model`` itself is not modified. Coupled channels are removed only
    where every coupled layer marks them non-critical (see the module docstring), and at least
    one neuron of each layer stays. Parameters frozen in ``model`` stay frozen in the result.

    With ``return_slice=True`` the slice actually applied is returned too: masking ``model``
    with it gives the restructured model's outputs (in eval mode, to float rounding).

    A ``torch.compile`` or (Distributed)DataParallel wrapper is seen through: the result is the
    restructured plain module (compile or wrap it again if you want).

    Raises ``ValueError`` when the slice does not belong to ``model`` or torch-pruning cannot
    trace or prune it (use :func:`neuslice.masked` then), ``ImportError`` without torch-pruning.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)
    if not isinstance(slice, Slice):
        raise TypeError(f"expected a neuslice.Slice, got {type(slice).__name__}")
    layers = slice.layers_of(model)  # ValueError if the slice does not fit
    tp = _import_tp()
    inputs = _example_inputs(slice, example_inputs, model)
    masks = {l.name: slice.masks[l.name].bool().cpu() for l in layers}

    with exclusive(model, "neuslice.restructure"):  # never copy another thread's hooks
        new = copy.deepcopy(model)
    frozen = {n: p.requires_grad for n, p in new.named_parameters()}
    ties = _ties(new)
    training = new.training
    new.eval()  # tracing runs a forward pass: do not update BatchNorm statistics
    for p in new.parameters():  # torch-pruning traces through autograd: frozen layers too
        if p.is_floating_point() or p.is_complex():
            p.requires_grad_(True)
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(new, example_inputs=inputs, verbose=False)
        with torch.no_grad():
            before = _shapes(_forward(new, inputs))
    except Exception as exc:
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise ValueError(
            f"torch-pruning could not trace {type(model).__name__} with the given "
            f"example_inputs ({type(exc).__name__}: {reason}); restructuring needs a model it "
            f"can trace. Use neuslice.masked(model, slice) to evaluate the slice instead."
        ) from exc

    modules = dict(new.named_modules())
    groups = _analyse(dg, layers, masks, modules)
    for g in groups:
        if g.blocked and any(not bool(masks[n].all()) for n in g.members):
            logger.info(
                "restructure: no neuron of %s is removed: %s.", sorted(g.members), g.blocked
            )
        if g.remove and g.extra_norms:
            logger.warning(
                "restructure: channels of %s also pass through BatchNorm(s) %s that are not "
                "right after a sliced layer; the restructured model then differs from masking.",
                sorted(g.members),
                g.extra_norms,
            )

    for g in groups:
        if not g.remove:
            continue
        module = modules[g.root]
        group = _pruning_group(dg, module, g.root, g.remove)
        if not dg.check_pruning_group(group):
            logger.warning(
                "restructure: torch-pruning refuses to prune %s (it would empty a "
                "coupled layer); its neurons are all kept.",
                sorted(g.members),
            )
            g.remove = []
            continue
        try:
            group.prune()
        except Exception as exc:
            raise ValueError(
                f"torch-pruning failed to remove neurons of layer {g.root!r} "
                f"({type(exc).__name__}: {exc}); use neuslice.masked(model, slice) "
                f"instead."
            ) from exc

    for n, p in new.named_parameters():
        if n in frozen:
            p.requires_grad_(frozen[n])
    broken = [names for names in ties if len({id(_get(new, n)) for n in names}) > 1]
    if broken:
        raise ValueError(
            f"restructuring would untie the shared parameters {broken} of "
            f"{type(model).__name__} (torch-pruning thins each use separately). Keep the neurons "
            f"whose removal touches them (mark them critical, or leave their layers out of the "
            f"slice), untie them in the model first, or use neuslice.masked(model, slice)."
        )
    try:
        with torch.no_grad():
            after = _shapes(_forward(new, inputs))
    except Exception as exc:
        raise ValueError(
            f"the restructured {type(model).__name__} no longer runs ({type(exc).__name__}: "
            f"{exc}); its forward probably hard-codes a channel count. Use "
            f"neuslice.masked(model, slice) instead."
        ) from exc
    if after != before:
        raise ValueError(
            f"restructuring changed {type(model).__name__}'s output shape from {before} to "
            f"{after}; use neuslice.masked(model, slice) instead."
        )
    new.train(training)
    if not return_slice:
        return new
    return new, _effective(slice, groups, layers)
