"""The per-batch work of ``neuslice.profile``: forward (+Taylor backward) and DeepLIFT passes."""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from .._utils.checks import batch_pair
from .._utils.hooks import hooks_at
from .._utils.numerics import accumulation_dtype
from .deeplift import rescale_rule
from ..layers import SlicedLayer
from .stats import ACC, scratch


def split_batch(batch, num_classes: int, index: int):
    """``(inputs, labels)`` of batch ``index``, the labels checked as class indices."""
    x, y = batch_pair(batch, index, "labels")
    if (
        y.dtype.is_floating_point
        or y.dtype == torch.bool
        or y.dim() != 1
        or y.shape[0] != x.shape[0]
    ):
        raise ValueError(
            f"batch {index}: labels must be a 1-D integer tensor with one class index per input "
            f"(got dtype {y.dtype}, shape {tuple(y.shape)} for {x.shape[0]} inputs)."
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"batch {index}: labels must lie in [0, {num_classes}) (num_classes={num_classes}); "
            f"found values in [{int(y.min())}, {int(y.max())}]. Pass the right num_classes or "
            f"remap the labels."
        )
    return x, y.long()


def model_logits(out, cfg) -> torch.Tensor:
    """The logits in the model's output ``out``: ``cfg.output_fn(out)``, or ``out`` itself."""
    fn = getattr(cfg, "output_fn", None)
    logits = out if fn is None else fn(out)
    if not torch.is_tensor(logits):
        where = "output_fn returned" if fn is not None else "the model returned"
        raise TypeError(
            f"Taylor and DeepLIFT need the model's classification logits, but {where} a "
            f"{type(logits).__name__}. Pass output_fn= to neuslice.profile to pick them, e.g. "
            f"output_fn=lambda out: out['logits'] for a dict or out[0] for a tuple "
            f"(logits, aux)."
        )
    return logits


def check_logits(logits: torch.Tensor, num_classes: int, metric: str) -> None:
    if logits.dim() != 2 or logits.shape[1] < num_classes:
        raise ValueError(
            f"{metric} needs classification logits of shape (batch, num_classes={num_classes}); "
            f"the model returned shape {tuple(logits.shape)}."
        )


def check_finite(layer: SlicedLayer, values: torch.Tensor, what: str) -> None:
    """ValueError if ``values`` holds NaN/Inf. A sum is finite only if every term is (NaN and
    Inf propagate), so callers may pass sums over positions instead of every value."""
    # the extremes are finite iff every value is (NaN propagates through them); one reduction,
    # where ``torch.isfinite(values).all()`` makes several passes and two temporaries
    if values.numel() and not torch.isfinite(torch.stack(torch.aminmax(values))).all():
        raise ValueError(
            f"layer {layer.name!r} produced NaN/Inf {what}; check the model's weights and the "
            f"inputs (normalisation, overflow in half precision)."
        )


def autocast_ctx(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` (None: no autocast)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_leaf(out: torch.Tensor) -> torch.Tensor:
    """``out`` itself when autograd tracks it; else (a frozen model fed integer tokens, whose
    first layers have nothing that requires grad) a detached copy that requires grad, so the
    gradients of everything after it can be taken. The model's parameters are not touched."""
    if out.requires_grad or not (out.is_floating_point() or out.is_complex()):
        return out
    return out.detach().requires_grad_(True)


def neuron_values(layer: SlicedLayer, h: torch.Tensor) -> torch.Tensor:
    """(batch, d, positions) neuron outputs at the layer's output point, detached."""
    return layer.neuron_view(layer.apply_post(h.detach().clone() if layer.post_ops else h.detach()))


def probe_positions(model, layers, x: torch.Tensor, autocast=None, inplace=None):
    """Positions per neuron (1 for dense layers, H·W for convolutions) from one sample, and
    the dtype the statistics will be accumulated from. ``inplace``: a dict to fill with the
    hook points (``"z"``, ``"u"``, ``"h"``, as in :func:`forward_pass`) of each layer whose
    output the model then changes in place."""
    kept = {}
    versions = {}

    def keep(layer):
        def cb(out):
            kept[layer.name] = out
            return out

        return cb

    def watch(layer, key):
        def cb(out):
            versions[(layer.name, key)] = (out, out._version)

        return cb

    points = [(l.hook_module, l.call_index, keep(l)) for l in layers]
    if inplace is not None:
        for l in layers:
            points.append((l.module, None, watch(l, "z")))
            if l.norm_module is not None:
                points.append((l.norm_module, None, watch(l, "u")))
            points.append((l.hook_module, l.call_index, watch(l, "h")))
    with torch.no_grad(), hooks_at(model, points):
        with autocast_ctx(x.device, autocast):
            model(x[:1])
    missing = [l.name for l in layers if l.name not in kept]
    if missing:
        raise RuntimeError(f"layer(s) {missing} were not executed by the model's forward pass.")
    if inplace is not None:
        for (name, key), (out, version) in versions.items():
            if out._version != version:
                inplace.setdefault(name, set()).add(key)
    values = {l.name: neuron_values(l, kept[l.name]) for l in layers}
    dtype = accumulation_dtype(next(iter(values.values()))) if values else torch.float32
    return {n: int(v.shape[2]) for n, v in values.items()}, dtype


def forward_pass(model, layers, states, x, y, cfg) -> float:
    """One forward on the batch for every metric: moments and HSIC statistics from it, then one
    backward for Taylor and one, through the same graph with the rescale rule switched on, for
    DeepLIFT (its baseline is one extra forward of a single sample). Returns the seconds spent
    on DeepLIFT's own work (baseline and backward).

    The hooked outputs are kept as they are and handed on to the model uncopied; a point whose
    output the model then changes in place (``ReLU(inplace=True)``, ``out += identity``: its
    version counter moves) is copied from then on (``LayerState.copied``), and the batch runs
    again."""
    want_taylor = "taylor" in cfg.metrics or "taylor_act" in cfg.metrics
    want_dl = "deeplift" in cfg.metrics
    want_grad = want_taylor or want_dl
    kept: dict[str, dict[str, torch.Tensor]] = {l.name: {} for l in layers}
    versions: dict[tuple[str, str], int] = {}
    copy_all = [False]
    points = []

    def keep(layer, key):
        copied = states[layer.name].copied

        def cb(out):
            leaf = grad_leaf(out) if want_grad else out
            kept[layer.name][key] = leaf
            if copy_all[0] or leaf is not out or key in copied:
                return leaf.clone()  # the model gets a copy; ours is never modified in place
            versions[(layer.name, key)] = leaf._version
            return None

        return cb

    for l in layers:
        if want_taylor:
            points.append((l.module, None, keep(l, "z")))
            if l.norm_module is not None:
                points.append((l.norm_module, None, keep(l, "u")))
        points.append((l.hook_module, l.call_index, keep(l, "h")))
    t_dl = 0.0
    with contextlib.ExitStack() as stack:
        rule = stack.enter_context(rescale_rule(model)) if want_dl else None  # before hooks_at
        stack.enter_context(torch.set_grad_enabled(want_grad))
        stack.enter_context(hooks_at(model, points))
        if want_dl:
            t0 = time.perf_counter()
            rule.begin("record")
            copy_all[0] = True  # one sample: copying costs nothing
            with torch.no_grad(), autocast_ctx(x.device, cfg.autocast):
                model(torch.zeros_like(x[:1]))
            copy_all[0] = False
            base = {l.name: kept[l.name].pop("h", None) for l in layers}
            t_dl += time.perf_counter() - t0
        if want_grad and x.is_floating_point():
            x = x.detach().requires_grad_(True)
        while True:
            for k in kept.values():
                k.clear()
            versions.clear()
            if rule is not None:
                rule.begin("apply")
            with autocast_ctx(x.device, cfg.autocast):
                logits = model_logits(model(x), cfg)
            changed = [
                (n, key)
                for (n, key), v in versions.items()
                if key in kept[n] and kept[n][key]._version != v
            ]
            if not changed:
                break
            for n, key in changed:  # the model changed them in place: copy them from now on
                states[n].copied.add(key)
        if rule is not None:
            rule.begin(None)
    for l in layers:
        st = states[l.name]
        h = kept[l.name].get("h")
        if h is None:
            raise RuntimeError(f"layer {l.name!r} was not executed by the model's forward pass.")
        a = neuron_values(l, h)
        a = a.to(accumulation_dtype(a))
        per_sample = a[:, :, 0] if a.shape[2] == 1 else a.mean(dim=2)
        check_finite(l, per_sample, "outputs")  # the means are finite iff every value is
        st.moments.update(per_sample, y)
        if cfg.hsic:
            st.update_hsic(a, y)
    if want_taylor:
        _taylor(layers, states, kept, logits, y, cfg, retain=want_dl)
    if want_dl:
        t0 = time.perf_counter()
        _deeplift(layers, states, kept, base, logits, y, cfg, rule)
        t_dl += time.perf_counter() - t0
    return t_dl


def _product_over_positions(name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(2)`` of ``(batch, neurons, positions)`` tensors, as float64; a dense
    layer's products (one position) are written straight into reused float64 memory."""
    if a.shape[2] == 1 and b.shape[2] == 1:
        out = scratch(name, (a.shape[0], a.shape[1]), ACC, a.device)
        return torch.mul(a[:, :, 0], b[:, :, 0], out=out)
    prod = torch.mul(
        a,
        b,
        out=scratch(
            "product",
            torch.broadcast_shapes(a.shape, b.shape),
            torch.promote_types(a.dtype, b.dtype),
            a.device,
        ),
    )
    return prod.sum(2).to(ACC)


def _taylor(layers, states, kept, logits, y, cfg, retain: bool) -> None:
    check_logits(logits, cfg.num_classes, "Taylor")
    loss = F.cross_entropy(logits.to(accumulation_dtype(logits)), y, reduction="sum")
    targets, owners = [], []
    for l in layers:
        for key, t in kept[l.name].items():
            if key == "h" and "taylor_act" not in cfg.metrics:
                continue
            targets.append(t)
            owners.append((l, key))
    grads = torch.autograd.grad(loss, targets, allow_unused=True, retain_graph=retain)
    per = {}
    for (l, key), t, g in zip(owners, targets, grads):
        g = torch.zeros_like(t) if g is None else g
        wd = accumulation_dtype(t)
        per[(l.name, key)] = _product_over_positions(
            f"taylor.{l.name}.{key}", l.neuron_view(t.detach()).to(wd), l.neuron_view(g).to(wd)
        )
    cats, inv, n_b = torch.unique(y, return_inverse=True, return_counts=True)  # present ones
    for l in layers:
        st = states[l.name]
        if "taylor" in cfg.metrics:
            t = per[(l.name, "z")]
            if (l.name, "u") in per:
                t = t + per[(l.name, "u")]
            sums = torch.zeros(cats.numel(), t.shape[1], dtype=ACC, device=t.device).index_add_(
                0, inv, t
            )
            st.sums["taylor"][cats] += (sums / n_b.unsqueeze(1).to(ACC)).square()
            st.sums["taylor_batches"][cats] += 1
            st.sums["taylor_all"] += (t.sum(0) / t.shape[0]).square()
            st.sums["taylor_all_batches"] += 1
        if "taylor_act" in cfg.metrics:
            st.sums["taylor_act"].index_add_(0, y, per[(l.name, "h")].abs())


def _deeplift(layers, states, kept, base, logits, y, cfg, rule) -> None:
    """Contributions (h - h0) · m summed over positions, m from a backward with the rescale
    rule on (h0: the layer's output on the baseline)."""
    check_logits(logits, cfg.num_classes, "DeepLIFT")
    target = logits.gather(1, y.view(-1, 1)).to(accumulation_dtype(logits)).sum()
    hs = [kept[l.name]["h"] for l in layers]
    rule.active = True
    try:
        grads = torch.autograd.grad(target, hs, allow_unused=True)
    finally:
        rule.active = False
    for l, h, g in zip(layers, hs, grads):
        g = torch.zeros_like(h) if g is None else g
        h0 = base[l.name]
        if h0 is None:
            raise RuntimeError(f"layer {l.name!r} was not executed on the DeepLIFT baseline.")
        wd = accumulation_dtype(h)
        hv, h0v = l.neuron_view(h.detach()).to(wd), l.neuron_view(h0.detach()).to(wd)
        diff = torch.sub(hv, h0v, out=scratch("deeplift.diff", hv.shape, wd, hv.device))
        contrib = _product_over_positions("deeplift", diff, l.neuron_view(g).to(wd))
        check_finite(l, contrib, "DeepLIFT contributions")
        states[l.name].sums["deeplift"].index_add_(0, y, contrib)
