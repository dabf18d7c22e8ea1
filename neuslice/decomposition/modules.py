"""Decomposition of a model into one module per output (Incite, or NeuSemSlice's masks).

``decompose(model, loader, method="incite")`` ranks each layer's unit clusters by their mutation
contribution to output ``o`` (:func:`neuslice.mutation_scores`) and keeps the
``ceil(fraction * K_l)`` best clusters of every layer (``fraction=0.6``: a fraction of clusters,
not a score threshold); ``method="semantic"`` keeps the units of NeuSemSlice's per-category
semantic slice of category ``o`` instead (``neuslice.profile`` +
``neuslice.semantic_slice(prof, metric, threshold).category_masks``). Either way, each module is
physically extracted with :func:`neuslice.restructure` (coupled channels are kept whole as it
explains; the masks actually applied are stored), its hidden layers are frozen and its head is
replaced:

* classification: a 2-way head, column 0 "no" initialised from the mean of the other output
  rows, column 1 "yes" from output ``o``'s row; trained (Adam, cross-entropy) on all training
  samples of class ``o`` and as many negatives drawn in turn from the other classes, keeping
  the epoch of best accuracy on a stratified validation split drawn after shuffling;
* regression: a 1-output copy of output ``o``'s row, trained with MSE, keeping the epoch of
  lowest validation loss.

The head sees frozen features, so they are computed once per module and the head is trained on
them alone. Recombination: a classifier predicts the class whose module gives the highest
"yes" probability (softmax over the module's two columns); a regressor stacks the modules'
outputs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import numbers
import os
import time
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .._utils.checks import check_fraction, model_device
from .._utils.hooks import module_modes
from .._utils.io import atomic_torch_save, atomic_write
from .._utils.progress import progress as progress_bar
from ..layers import SLICEABLE_TYPES, find_layers, model_fingerprint
from ..maintenance.restructure import restructure
from ..slicing import Slice
from .clustering import check_cluster_size, cluster_units
from .incite import (
    DEFAULT_FACTORS,
    check_clusters,
    check_outputs,
    check_task,
    split_batch,
    mutation_scores,
)

logger = logging.getLogger(__name__)

__all__ = ["Modules", "decompose", "METHODS"]

METHODS = ("incite", "semantic")
_FORMAT = "neuslice.modules"
_VERSION = 1


# ---- helpers ------------------------------------------------------------------------------


def _encode(mask: torch.Tensor) -> str:
    return np.packbits(mask.cpu().numpy().astype(np.uint8)).tobytes().hex()


def _decode(text: str, size: int) -> torch.Tensor:
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8), count=size)
    return torch.from_numpy(bits.astype(bool))


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def head_name(model: nn.Module) -> str:
    """Name of the model's output layer: the last ``Linear``/``Conv2d`` executed, whose output
    must be the model's output (``ValueError`` otherwise)."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:
        raise ValueError(
            f"decompose needs a model torch.fx can trace ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]})"
        ) from exc
    named = dict(model.named_modules())
    nodes = [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(named.get(n.target), SLICEABLE_TYPES)
    ]
    if not nodes:
        raise ValueError(f"{type(model).__name__} has no nn.Linear/nn.Conv2d output layer")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    if out.args[0] is not nodes[-1]:
        raise ValueError(
            f"decompose replaces the output layer {nodes[-1].target!r} by a per-module head, so "
            f"the model must return that layer's output directly (it applies "
            f"{out.args[0].op} {getattr(out.args[0].target, '__name__', out.args[0].target)!r} "
            f"after it)."
        )
    return nodes[-1].target


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _new_head(old: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A copy of ``old`` (Linear or Conv2d) with the given output rows."""
    new = copy.deepcopy(old)
    new.weight = nn.Parameter(weight.detach().clone())
    if old.bias is not None:
        new.bias = nn.Parameter(bias.detach().clone())
    if isinstance(new, nn.Linear):
        new.out_features = weight.shape[0]
    else:
        new.out_channels = weight.shape[0]
    return new


def _data(loader: Iterable, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for i, batch in enumerate(loader):
        x, y = split_batch(batch, i)
        xs.append(x.detach().cpu())
        ys.append(y.detach().cpu())
    if not xs or sum(len(x) for x in xs) == 0:
        raise ValueError("the loader yielded no samples; decompose needs training data.")
    return torch.cat(xs), torch.cat(ys)


def _features(module: nn.Module, head: nn.Module, x: torch.Tensor, batch: int = 512):
    """The inputs of ``head`` when ``module`` runs on ``x`` (eval mode, no grad)."""
    got: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: got.append(args[0].detach()))
    device = model_device(module)
    try:
        with torch.no_grad(), module_modes(module, train=False):
            for i in range(0, len(x), batch):
                module(x[i : i + batch].to(device))
    finally:
        handle.remove()
    return torch.cat(got)


def _split_val(idx: torch.Tensor, fraction: float, g: torch.Generator):
    idx = idx[torch.randperm(len(idx), generator=g)]
    n = int(round(len(idx) * fraction)) if len(idx) > 1 else 0
    return idx[n:], idx[:n]


def _train_head(
    head: nn.Module,
    feats: torch.Tensor,
    targets: torch.Tensor,
    train_idx,
    val_idx,
    task: str,
    epochs: int,
    lr: float,
    batch: int,
    g: torch.Generator,
):
    """Adam on the head alone; returns (best validation metric, epochs run). Keeps the best
    epoch's parameters (epoch 0 = the initialisation)."""
    if len(val_idx) == 0:
        val_idx = train_idx
    feats = feats.to(model_device(head))
    targets = targets.to(feats.device)

    def val_metric() -> float:
        with torch.no_grad():
            out = head(feats[val_idx])
            if task == "classification":
                return float((out.argmax(1) == targets[val_idx]).double().mean())
            return -float(F.mse_loss(out.reshape(-1), targets[val_idx].reshape(-1)))

    best, best_state = val_metric(), copy.deepcopy(head.state_dict())
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=g)]
        for i in range(0, len(order), batch):
            b = order[i : i + batch]
            out = head(feats[b])
            if task == "classification":
                loss = F.cross_entropy(out, targets[b])
            else:
                loss = F.mse_loss(out.reshape(-1), targets[b].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        metric = val_metric()
        if metric > best:
            best, best_state = metric, copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)
    for p in head.parameters():
        p.grad = None
    return best


def _balanced(y: torch.Tensor, o: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """All samples of class ``o`` and as many negatives, taken in turn from the other classes;
    returns (indices, binary labels: 1 = class o)."""
    pos = torch.nonzero(y == o).flatten()
    pools = [
        idx[torch.randperm(len(idx), generator=g)]
        for k in torch.unique(y).tolist()
        if k != o and len(idx := torch.nonzero(y == k).flatten())
    ]
    neg: list[int] = []
    depth = 0
    while len(neg) < len(pos) and any(depth < len(p) for p in pools):
        for p in pools:
            if depth < len(p) and len(neg) < len(pos):
                neg.append(int(p[depth]))
        depth += 1
    neg_t = torch.tensor(neg, dtype=torch.long)
    return torch.cat([pos, neg_t]), torch.cat(
        [torch.ones(len(pos), dtype=torch.long), torch.zeros(len(neg_t), dtype=torch.long)]
    )


# ---- the result ---------------------------------------------------------------------------


class Modules:
    """One module per output of a decomposed model.

    ``len(modules)`` is the number of outputs; ``modules[k]`` is module ``k``, a standalone
    ``nn.Module`` (the original architecture with the units outside its slice removed, hidden
    layers frozen, a new head: 2 outputs "no"/"yes" for classifiers, 1 for regressors).
    ``masks[k]`` are the hidden units it keeps (layer -> bool tensor).
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        masks: Sequence[dict[str, torch.Tensor]],
        *,
        task: str,
        method: str,
        head: str,
        input_shape: Sequence[int],
        fingerprint: str,
        original_params: int,
        info: dict | None = None,
    ):
        self.modules = list(modules)
        self.masks = [{k: v.bool().cpu() for k, v in m.items()} for m in masks]
        self.task, self.method, self.head = check_task(task), method, head
        self.input_shape = [int(s) for s in input_shape]
        self.fingerprint, self.original_params = fingerprint, int(original_params)
        self.info = dict(info or {})

    def __len__(self) -> int:
        return len(self.modules)

    def __getitem__(self, k: int) -> nn.Module:
        return self.modules[k]

    def __iter__(self):
        return iter(self.modules)

    def __repr__(self) -> str:
        return (
            f"Modules({len(self)} {self.task} modules by {self.method}, overlap "
            f"{self.overlap():.3f}, compression {self.compression():.2f}x)"
        )

    # ---- inference ---------------------------------------------------------------------
    def _check_inputs(self, inputs) -> torch.Tensor:
        if not torch.is_tensor(inputs):
            raise TypeError(f"inputs must be a tensor, got {type(inputs).__name__}")
        if inputs.dim() < 1 or list(inputs.shape[1:]) != self.input_shape:
            raise ValueError(
                f"these modules take inputs of shape (batch, "
                f"{', '.join(map(str, self.input_shape))}), got "
                f"{tuple(inputs.shape)}"
            )
        return inputs

    def outputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """``(batch, modules)``: each module's "yes" probability (classifiers) or its output
        (regressors)."""
        x = self._check_inputs(inputs)
        cols = []
        with torch.no_grad():
            for m in self.modules:
                with module_modes(m, train=False):
                    out = m(x.to(model_device(m)))
                cols.append(
                    out.softmax(1)[:, 1] if self.task == "classification" else out.reshape(len(x))
                )
        return torch.stack([c.cpu() for c in cols], dim=1)

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        """Class indices (argmax of the modules' "yes" probabilities) or, for regressors, the
        ``(batch, outputs)`` predictions."""
        out = self.outputs(inputs)
        return out.argmax(1) if self.task == "classification" else out

    # ---- metrics -----------------------------------------------------------------------
    def overlap(self) -> float:
        """Mean pairwise Jaccard similarity of the modules' kept hidden units (NaN for a single
        module)."""
        sets = [
            {(l, int(i)) for l, m in masks.items() for i in torch.nonzero(m).flatten()}
            for masks in self.masks
        ]
        pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1 :]]
        if not pairs:
            return float("nan")
        return float(np.mean([len(a & b) / len(a | b) if a | b else 1.0 for a, b in pairs]))

    def module_params(self) -> list[int]:
        return [sum(p.numel() for p in m.parameters()) for m in self.modules]

    def compression(self) -> float:
        """Mean over modules of (original parameters / module parameters)."""
        return float(np.mean([self.original_params / n for n in self.module_params()]))

    def check_model(self, model: nn.Module) -> None:
        """``ValueError`` unless ``model`` has the architecture these modules came from."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
        fp = model_fingerprint(model)
        if fp != self.fingerprint:
            raise ValueError(
                f"these modules were extracted from another model (fingerprint "
                f"{self.fingerprint}; this model has {fp}: other layer names, "
                f"shapes or module types)"
            )

    def evaluate(self, loader: Iterable, original: nn.Module | None = None) -> dict:
        """Combined accuracy (classifiers) or MAE (regressors: the mean over outputs of each
        module's MAE) on ``loader``, with overlap and compression; with ``original`` also the
        original model's accuracy / MAE on the same data."""
        if original is not None:
            self.check_model(original)
        correct, n, abs_err, orig_correct, orig_err = 0, 0, None, 0, None
        for i, batch in enumerate(loader):
            x, y = split_batch(batch, i)
            if not len(x):
                continue
            pred = self.predict(x)
            ref = None
            if original is not None:
                with torch.no_grad(), module_modes(original, train=False):
                    ref = original(x.to(model_device(original))).cpu()
            if self.task == "classification":
                correct += int((pred == y.cpu()).sum())
                if ref is not None:
                    orig_correct += int((ref.argmax(1) == y.cpu()).sum())
            else:
                t = y.cpu().reshape(pred.shape).double()
                e = (pred.double() - t).abs().sum(0)
                abs_err = e if abs_err is None else abs_err + e
                if ref is not None:
                    e = (ref.reshape(pred.shape).double() - t).abs().sum(0)
                    orig_err = e if orig_err is None else orig_err + e
            n += len(x)
        if n == 0:
            raise ValueError("the loader yielded no samples")
        res: dict = {
            "modules": len(self),
            "samples": n,
            "overlap": self.overlap(),
            "compression": self.compression(),
        }
        if self.task == "classification":
            res["accuracy"] = correct / n
            if original is not None:
                res["original_accuracy"] = orig_correct / n
        else:
            per = (abs_err / n).tolist()
            res["mae"], res["mae_per_output"] = float(np.mean(per)), per
            if original is not None:
                res["original_mae"] = float((orig_err / n).mean())
        return res

    def slice(self, k: int) -> Slice:
        """Module ``k``'s kept units as a :class:`neuslice.Slice` of the original model."""
        return Slice(
            masks=dict(self.masks[k]),
            strategy=f"{self.method}-module",
            metric=None,
            fingerprint=self.fingerprint,
            input_shape=self.input_shape,
        )

    # ---- persistence -------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write ``path/manifest.json`` and one state dict per module (``module_<k>.pt``)."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        entries = []
        for k, (m, masks) in enumerate(zip(self.modules, self.masks)):
            name = f"module_{k}.pt"
            atomic_torch_save(
                {n: t.detach().cpu() for n, t in m.state_dict().items()}, os.path.join(path, name)
            )
            entries.append(
                {
                    "file": name,
                    "masks": {l: _encode(v) for l, v in masks.items()},
                    "sizes": {l: int(v.numel()) for l, v in masks.items()},
                }
            )
        manifest = {
            "format": _FORMAT,
            "version": _VERSION,
            "task": self.task,
            "method": self.method,
            "head": self.head,
            "input_shape": self.input_shape,
            "fingerprint": self.fingerprint,
            "original_params": self.original_params,
            "info": self.info,
            "modules": entries,
        }
        text = json.dumps(manifest, indent=1, default=float).encode()
        atomic_write(os.path.join(path, "manifest.json"), lambda f: f.write(text))

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module) -> "Modules":
        """Read modules written by :meth:`save`. ``model`` is an instance of the original
        architecture (its weights are not used: every module's come from its file); the
        modules are rebuilt by restructuring it and loaded with ``weights_only=True``."""
        path = os.fspath(path)
        try:
            with open(os.path.join(path, "manifest.json")) as f:
                man = json.load(f)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ValueError(f"{path}/manifest.json is not readable: {exc}") from exc
        if man.get("format") != _FORMAT or man.get("version") != _VERSION:
            raise ValueError(
                f"{path} does not hold neuslice modules (format "
                f"{man.get('format')!r}, version {man.get('version')!r})"
            )
        shell = cls(
            [],
            [],
            task=man["task"],
            method=man["method"],
            head=man["head"],
            input_shape=man["input_shape"],
            fingerprint=man["fingerprint"],
            original_params=man["original_params"],
            info=man.get("info"),
        )
        shell.check_model(model)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        example = torch.zeros([1, *shell.input_shape], device=model_device(model), dtype=dtype)
        for entry in man["modules"]:
            masks = {l: _decode(v, entry["sizes"][l]) for l, v in entry["masks"].items()}
            state = torch.load(
                os.path.join(path, entry["file"]), map_location="cpu", weights_only=True
            )
            sl = Slice(
                masks=masks,
                strategy=f"{shell.method}-module",
                metric=None,
                fingerprint=shell.fingerprint,
                input_shape=shell.input_shape,
            )
            small = restructure(model, sl, example)
            old = small.get_submodule(shell.head)
            w = state[f"{shell.head}.weight"]
            b = state.get(f"{shell.head}.bias")
            _set_module(
                small,
                shell.head,
                _new_head(old, torch.empty_like(w), None if b is None else torch.empty_like(b)),
            )
            small.load_state_dict(state)
            _freeze(small, shell.head)
            small.eval()
            shell.modules.append(small)
            shell.masks.append(masks)
        return shell


def _freeze(module: nn.Module, head: str) -> None:
    head_params = {id(p) for p in module.get_submodule(head).parameters()}
    for p in module.parameters():
        p.requires_grad_(id(p) in head_params)


# ---- decomposition ------------------------------------------------------------------------


def _incite_masks(
    model,
    loader,
    task,
    sliced,
    num_outputs,
    fraction,
    cluster_size,
    factors,
    scores,
    clusters,
    max_memory_gb,
    progress,
    info,
):
    names = [l.name for l in sliced]
    if clusters is None:
        clusters = cluster_units(model, names, check_cluster_size(cluster_size))
    labels = check_clusters(clusters, sliced)
    if scores is None:
        t0 = time.perf_counter()
        scores = mutation_scores(
            model,
            loader,
            task,
            names,
            clusters=labels,
            factors=factors,
            max_memory_gb=max_memory_gb,
            progress=progress,
        )
        info["mutation_time_s"] = time.perf_counter() - t0
    if not isinstance(scores, dict):
        raise TypeError(
            f"scores must be the dict mutation_scores returns, got {type(scores).__name__}"
        )
    for l in sliced:
        s = scores.get(l.name)
        if s is None or tuple(torch.as_tensor(s).shape) != (num_outputs, l.num_neurons):
            raise ValueError(
                f"scores[{l.name!r}] must have shape ({num_outputs}, {l.num_neurons}) (outputs x "
                f"neurons of this model), got "
                f"{None if s is None else tuple(torch.as_tensor(s).shape)}: were the scores "
                f"computed on another model?"
            )
    masks = []
    for o in range(num_outputs):
        per = {}
        for l in sliced:
            lab = labels[l.name]
            k = int(lab.max()) + 1
            first = torch.stack([torch.nonzero(lab == c).flatten()[0] for c in range(k)])
            cluster_scores = torch.as_tensor(scores[l.name])[o].cpu()[first]
            keep = torch.argsort(cluster_scores, descending=True, stable=True)[
                : math.ceil(fraction * k)
            ]
            per[l.name] = torch.isin(lab, keep)
        masks.append(per)
    return masks


def _semantic_masks(
    model,
    loader,
    sliced,
    num_outputs,
    metric,
    threshold,
    progress,
    info,
    profile_kwargs,
    max_memory_gb,
):
    from ..profiling.profile import profile
    from ..slicing import semantic_slice
    from .incite import add_mutation_scores

    names = [l.name for l in sliced]
    t0 = time.perf_counter()
    metrics = ("avg",) if metric == "mutation" else (metric,)
    prof = profile(
        model,
        loader,
        num_outputs,
        names,
        metrics=metrics,
        progress=progress,
        **(profile_kwargs or {}),
    )
    if metric == "mutation":
        t1 = time.perf_counter()
        add_mutation_scores(
            prof,
            mutation_scores(
                model,
                loader,
                "classification",
                names,
                max_memory_gb=max_memory_gb,
                progress=progress,
            ),
        )
        info["mutation_time_s"] = time.perf_counter() - t1
    sl = semantic_slice(prof, metric, threshold, criterion="layer_cka")
    info["profile_time_s"] = time.perf_counter() - t0
    masks = []
    for o in range(num_outputs):
        per = {}
        for l in sliced:
            row = sl.category_masks[l.name][o].bool()
            per[l.name] = row if bool(row.any()) else torch.ones_like(row)  # skipped category
        masks.append(per)
    return masks


def decompose(
    model: nn.Module,
    loader: Iterable,
    method: str = "incite",
    task: str = "classification",
    *,
    fraction: float = 0.6,
    layers: Sequence[str] | None = None,
    cluster_size: int = 10,
    factors: Sequence[float] = DEFAULT_FACTORS,
    scores: dict[str, torch.Tensor] | None = None,
    clusters: dict[str, torch.Tensor] | None = None,
    metric: str = "taylor",
    threshold: float = 0.95,
    head_epochs: int = 10,
    head_lr: float = 1e-3,
    head_batch_size: int = 64,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_memory_gb: float = 0.5,
    profile_kwargs: dict | None = None,
    progress: bool = True,
) -> Modules:
    """Decompose ``model`` into one module per output (see the module docstring).

    Args:
        model: a traceable model whose output is its last ``Linear``/``Conv2d`` layer's output
            (class logits, or regression outputs); it is not modified.
        loader: the training data, ``(inputs, targets)`` batches (class indices, or targets
            shaped like the outputs); gathered in memory for the heads.
        method: ``"incite"`` (mutation analysis) or ``"semantic"`` (NeuSemSlice's per-category
            semantic slice; classifiers only).
        task: ``"classification"`` or ``"regression"``.
        fraction: Incite's θ, the fraction of each layer's clusters a module keeps, in (0, 1].
        layers, cluster_size, factors, max_memory_gb: as in :func:`neuslice.mutation_scores`.
        scores, clusters: precomputed mutation scores / cluster labels of this model.
        metric, threshold: the semantic slice's contribution metric and CKA threshold
            (``metric="mutation"`` ranks by mutation scores); ``profile_kwargs`` go to
            ``neuslice.profile``.
        head_epochs, head_lr, head_batch_size, val_fraction, seed: the head's Adam training.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be 'incite' or 'semantic', got {method!r}")
    task = check_task(task)
    if method == "semantic" and task != "classification":
        raise ValueError(
            "method='semantic' slices per class category, so it needs task='classification'"
        )
    fraction = check_fraction("fraction", fraction)
    head_epochs = _positive_int("head_epochs", head_epochs, 0)
    head_batch_size = _positive_int("head_batch_size", head_batch_size)
    if (
        isinstance(head_lr, bool)
        or not isinstance(head_lr, numbers.Real)
        or not math.isfinite(head_lr)
        or head_lr <= 0
    ):
        raise ValueError(f"head_lr must be a positive number, got {head_lr!r}")
    val_fraction = check_fraction("val_fraction", val_fraction, open_low=False)
    if val_fraction >= 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    head = head_name(model)
    sliced = find_layers(model, layers)
    if any(l.name == head for l in sliced):
        raise ValueError(f"layer {head!r} is the output layer; it cannot be decomposed")
    x, y = _data(loader, task)
    device = model_device(model)
    with torch.no_grad(), module_modes(model, train=False):
        out = check_outputs(model(x[:2].to(device)), y[:2], task, 0)
    k = out.shape[1]
    if task == "classification" and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ValueError(
            f"class labels must lie in [0, {k}) for a model with {k} outputs, "
            f"found [{int(y.min())}, {int(y.max())}]"
        )
    if task == "classification":
        empty = [c for c, n in enumerate(torch.bincount(y, minlength=k).tolist()) if n == 0]
        if empty:
            raise ValueError(
                f"class(es) {empty} have no samples in the loader; each output's module is "
                f"trained on its class's samples: give decompose data of every class"
            )
    if task == "regression":
        y = y.reshape(len(y), -1).to(torch.float32)
        if y.shape[1] != k:
            raise ValueError(f"regression targets have {y.shape[1]} columns, the model {k} outputs")
    info: dict = {}
    if method == "incite":
        masks = _incite_masks(
            model,
            loader,
            task,
            sliced,
            k,
            fraction,
            cluster_size,
            factors,
            scores,
            clusters,
            max_memory_gb,
            progress,
            info,
        )
    else:
        masks = _semantic_masks(
            model,
            loader,
            sliced,
            k,
            metric,
            threshold,
            progress,
            info,
            profile_kwargs,
            max_memory_gb,
        )
    fingerprint = model_fingerprint(model)
    input_shape = list(x.shape[1:])
    example = x[:1].to(device)
    modules, kept = [], []
    t_extract = t_head = 0.0
    for o in progress_bar(range(k), progress, "neuslice modules", "module"):
        t0 = time.perf_counter()
        sl = Slice(
            masks=masks[o],
            strategy=f"{method}-module",
            metric=None,
            fingerprint=fingerprint,
            input_shape=input_shape,
        )
        small, eff = restructure(model, sl, example, return_slice=True)
        old = small.get_submodule(head)
        w, b = old.weight.detach(), None if old.bias is None else old.bias.detach()
        if task == "classification":
            others = [j for j in range(k) if j != o]
            weight = torch.stack([w[others].mean(0), w[o]])
            bias = None if b is None else torch.stack([b[others].mean(0), b[o]])
        else:
            weight, bias = w[o : o + 1], None if b is None else b[o : o + 1]
        new = _new_head(old, weight, bias)
        _set_module(small, head, new)
        _freeze(small, head)
        small.eval()
        t1 = time.perf_counter()
        g = torch.Generator().manual_seed(int(seed) * 1000 + o)
        if task == "classification":
            idx, target = _balanced(y, o, g)
            labels = torch.zeros(len(y), dtype=torch.long)
            labels[idx] = target
            pos, neg = idx[target == 1], idx[target == 0]
            tr_p, va_p = _split_val(pos, val_fraction, g)
            tr_n, va_n = _split_val(neg, val_fraction, g)
            train_idx, val_idx = torch.cat([tr_p, tr_n]), torch.cat([va_p, va_n])
            feats = _features(small, new, x[idx])
            remap = torch.full((len(y),), -1, dtype=torch.long)
            remap[idx] = torch.arange(len(idx))
            _train_head(
                new,
                feats,
                labels[idx],
                remap[train_idx],
                remap[val_idx],
                task,
                head_epochs,
                head_lr,
                head_batch_size,
                g,
            )
        else:
            train_idx, val_idx = _split_val(torch.arange(len(y)), val_fraction, g)
            feats = _features(small, new, x)
            _train_head(
                new,
                feats,
                y[:, o],
                train_idx,
                val_idx,
                task,
                head_epochs,
                head_lr,
                head_batch_size,
                g,
            )
        new.requires_grad_(True)
        t_extract += t1 - t0
        t_head += time.perf_counter() - t1
        modules.append(small)
        kept.append(eff.masks)
    info.update(
        extract_time_s=t_extract,
        head_time_s=t_head,
        fraction=fraction,
        cluster_size=cluster_size,
        factors=list(factors),
        metric=metric,
        threshold=threshold,
    )
    return Modules(
        modules,
        kept,
        task=task,
        method=method,
        head=head,
        input_shape=input_shape,
        fingerprint=fingerprint,
        original_params=sum(p.numel() for p in model.parameters()),
        info=info,
    )
