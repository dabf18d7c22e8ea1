"""Shared small models, data and reference computations for the profile/slicing tests."""

from __future__ import annotations

import copy
import os
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# Without a GPU, Triton kernels run in the CPU interpreter; the switch must be set before
# triton is first imported (kernels are built at import), so it lives here, not in one module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test models are tiny: intra-op threads only add OpenMP start/spin-wait cost, which on a
# loaded 2-core machine turns each small op into tens of milliseconds (the suite ran ~5x slower).
# NEUSLICE_TEST_THREADS=2 runs the suite with two threads (results must not depend on it).
torch.set_num_threads(int(os.environ.get("NEUSLICE_TEST_THREADS", "1")))

NUM_CLASSES = 3
IN_FEATURES = 12
IMG = (2, 6, 6)


# ----------------------------------------------------------------------------------- models
def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def _lift_bias(model: nn.Module, shift: float = 0.15) -> nn.Module:
    """Shift biases up so that few ReLUs are dead on a whole category."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                m.bias.add_(shift)
    return model


def make_mlp(
    seed: int = 0,
    dtype=torch.float64,
    hidden=(10, 8),
    inplace: bool = False,
    in_features: int = IN_FEATURES,
    num_classes: int = NUM_CLASSES,
    act=nn.ReLU,
) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: OrderedDict = OrderedDict()
    width = in_features
    for i, h in enumerate(hidden, start=1):
        layers[f"fc{i}"] = nn.Linear(width, h)
        layers[f"relu{i}"] = act(inplace=inplace)
        width = h
    layers["head"] = nn.Linear(width, num_classes)
    return _lift_bias(nn.Sequential(layers)).to(dtype)


def make_cnn(seed: int = 0, dtype=torch.float64, inplace: bool = False) -> nn.Sequential:
    """Conv + BN + ReLU net without max-pooling; input (2, 6, 6)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(2, 4, 3, padding=1),
            bn1=nn.BatchNorm2d(4),
            relu1=nn.ReLU(inplace=inplace),
            conv2=nn.Conv2d(4, 5, 3, stride=2, padding=1),
            bn2=nn.BatchNorm2d(5),
            relu2=nn.ReLU(inplace=inplace),
            flatten=nn.Flatten(),
            fc1=nn.Linear(5 * 3 * 3, 6),
            relu3=nn.ReLU(inplace=inplace),
            head=nn.Linear(6, NUM_CLASSES),
        )
    )
    return _lift_bias(_randomize_bn(model, seed + 100)).to(dtype)


class ReusedReLUMLP(nn.Module):
    """fc1 -> relu -> fc2 -> relu -> head with ONE ReLU module called twice."""

    def __init__(self, hidden=(10, 8)):
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.head = nn.Linear(hidden[1], NUM_CLASSES)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.head(self.relu(self.fc2(self.relu(self.fc1(x)))))


class _TwinCNNLayers(nn.Module):
    """The layers of :func:`make_cnn`; subclasses differ only in how ``forward`` uses them."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc1 = nn.Linear(5 * 3 * 3, 6)
        self.head = nn.Linear(6, NUM_CLASSES)


class ReusedReLUCNN(_TwinCNNLayers):
    """The conv net of :func:`make_cnn` with one in-place ReLU module reused three times."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        x = self.act(self.fc1(x.flatten(1)))
        return self.head(x)


class FunctionalCNN(_TwinCNNLayers):
    """The conv net of :func:`make_cnn` with F.relu / torch.flatten in forward."""

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.head(x)


class FunctionalNoBNCNN(nn.Module):
    """conv -> F.relu directly (no BatchNorm), then flatten and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.head = nn.Linear(5 * 3 * 3, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.head(torch.flatten(x, 1))


class TinyResNet(nn.Module):
    """stem conv+BN+ReLU, one basic block (conv-BN-ReLU-conv-BN + skip, ReLU), pool, head."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(2, width, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(width)
        self.relu0 = nn.ReLU()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, NUM_CLASSES)

    def forward(self, x):
        x = self.relu0(self.bn0(self.stem(x)))
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.relu2(out + x)
        return self.head(torch.flatten(self.pool(out), 1))


def twin_of(model: nn.Module, twin: nn.Module) -> nn.Module:
    """``twin`` with ``model``'s parameters and buffers (matched by name)."""
    twin.load_state_dict(model.state_dict())
    return twin


def make_twin_pair(kind: str, dtype=torch.float64, seed: int = 3):
    """(variant, twin with separate non-inplace nn.ReLU modules, {layer: twin output module})."""
    if kind == "inplace_mlp":
        var = make_mlp(seed, dtype, inplace=True)
        twin = make_mlp(seed, dtype)
        return var, twin, {"fc1": "relu1", "fc2": "relu2"}
    if kind == "inplace_leaky_mlp":
        leaky = lambda inplace: nn.LeakyReLU(0.1, inplace=inplace)  # noqa: E731
        var = make_mlp(seed, dtype, inplace=True, act=leaky)
        twin = make_mlp(seed, dtype, act=leaky)
        return var, twin, {"fc1": "relu1", "fc2": "relu2"}
    if kind == "inplace_cnn":
        var = make_cnn(seed, dtype, inplace=True)
        twin = make_cnn(seed, dtype)
        return var, twin, {"conv1": "relu1", "conv2": "relu2", "fc1": "relu3"}
    if kind == "reused_mlp":
        torch.manual_seed(seed)
        var = _lift_bias(ReusedReLUMLP()).to(dtype)
        twin = make_mlp(seed + 1, dtype)
        twin.load_state_dict({k: v for k, v in var.state_dict().items()})
        return var, twin, {"fc1": "relu1", "fc2": "relu2"}
    if kind in ("reused_cnn", "functional_cnn"):
        torch.manual_seed(seed)
        var = ReusedReLUCNN() if kind == "reused_cnn" else FunctionalCNN()
        var = _lift_bias(_randomize_bn(var, seed)).to(dtype)
        twin = make_cnn(seed + 1, dtype)
        twin.load_state_dict(var.state_dict())
        return var, twin, {"conv1": "relu1", "conv2": "relu2", "fc1": "relu3"}
    if kind == "functional_nobn":
        torch.manual_seed(seed)
        var = _lift_bias(FunctionalNoBNCNN()).to(dtype)
        twin = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(2, 4, 3, padding=1),
                relu1=nn.ReLU(),
                conv2=nn.Conv2d(4, 5, 3, stride=2, padding=1),
                relu2=nn.ReLU(),
                flatten=nn.Flatten(),
                head=nn.Linear(5 * 3 * 3, NUM_CLASSES),
            )
        ).to(dtype)
        twin.load_state_dict(var.state_dict())
        return var, twin, {"conv1": "relu1", "conv2": "relu2"}
    raise KeyError(kind)


# ------------------------------------------------------------------------------------- data
def make_data(
    n: int = 45,
    kind: str = "vec",
    dtype=torch.float64,
    seed: int = 0,
    num_classes: int = NUM_CLASSES,
):
    """Inputs with a non-zero mean and balanced, interleaved labels."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, IN_FEATURES) if kind == "vec" else (n,) + IMG
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + 0.3).to(dtype)
    y = torch.randperm(n, generator=g) % num_classes
    return x, y


def make_loader(x, y, batch_size: int = 7) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


@pytest.fixture(scope="session")
def vec_data():
    return make_data(45, "vec")


@pytest.fixture(scope="session")
def img_data():
    return make_data(45, "img")


# ------------------------------------------------------------------------------- references
@torch.no_grad()
def outputs_of(model: nn.Module, names, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of the named modules (each called exactly once) for inputs ``x``."""
    mods = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}
    handles = [
        mods[n].register_forward_hook(
            lambda _m, _i, out, _n=n: got.__setitem__(_n, out.detach().clone())
        )
        for n in names
    ]
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return got


def per_sample(a: torch.Tensor) -> torch.Tensor:
    """(n, d, *spatial) -> (n, d) spatial mean."""
    return a.reshape(a.shape[0], a.shape[1], -1).mean(2)


def direct_taylor(
    model: nn.Module, loader, param_groups: dict[str, list[str]], num_classes: int
) -> tuple[dict, dict]:
    """Taylor scores from parameter ``.grad`` of the mean CE over each category minibatch.

    ``param_groups[layer]`` lists the modules (the layer, then its BatchNorm) whose
    weight/bias rows belong to the layer's neurons. Returns ``({layer: (C, d)}, {layer: (d,)})``
    for per-category and whole-data scores.
    """
    m = copy.deepcopy(model).eval()
    mods = dict(m.named_modules())
    for p in m.parameters():
        p.requires_grad_(True)

    def t_of() -> dict[str, torch.Tensor]:
        res = {}
        for layer, names in param_groups.items():
            t = 0
            for name in names:
                for p in (mods[name].weight, mods[name].bias):
                    if p is not None:
                        t = t + (p * p.grad).reshape(p.shape[0], -1).sum(1)
            res[layer] = t.detach()
        return res

    def grads_for(x, y):
        m.zero_grad(set_to_none=False)
        F.cross_entropy(m(x), y).backward()
        return t_of()

    per = {
        l: torch.zeros(num_classes, mods[l].weight.shape[0], dtype=torch.float64)
        for l in param_groups
    }
    counts = torch.zeros(num_classes, dtype=torch.float64)
    whole = {l: 0 for l in param_groups}
    batches = 0
    for x, y in loader:
        t = grads_for(x, y)
        for l in param_groups:
            whole[l] = whole[l] + t[l].double().square()
        batches += 1
        for c in torch.unique(y).tolist():
            sel = y == c
            t = grads_for(x[sel], y[sel])
            for l in param_groups:
                per[l][c] += t[l].double().square()
            counts[c] += 1
    return (
        {l: per[l] / counts.clamp(min=1).unsqueeze(1) for l in per},
        {l: whole[l] / batches for l in whole},
    )


def captum_deeplift(
    model: nn.Module, out_modules: dict[str, str], x, y, num_classes: int
) -> dict[str, torch.Tensor]:
    """Per-category mean of captum LayerDeepLift contributions (summed over positions)."""
    captum_attr = pytest.importorskip("captum.attr")
    m = copy.deepcopy(model).eval()
    mods = dict(m.named_modules())
    res = {}
    for layer, out_name in out_modules.items():
        attr = captum_attr.LayerDeepLift(m, mods[out_name]).attribute(x, baselines=0, target=y)
        v = attr.reshape(attr.shape[0], attr.shape[1], -1).sum(2).double()
        s = torch.zeros(num_classes, v.shape[1], dtype=torch.float64).index_add_(0, y, v)
        res[layer] = s / torch.bincount(y, minlength=num_classes).clamp(min=1).unsqueeze(1)
    return res


def snapshot(model: nn.Module) -> dict:
    """Everything profile must leave untouched."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grad": {
            k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()
        },
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "ids": {k: id(p) for k, p in model.named_parameters()},
    }


def assert_same_snapshot(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].dtype == b["state"][k].dtype, k
        x, y = a["state"][k], b["state"][k]
        assert x.shape == y.shape and bool(((x == y) | (x != x) & (y != y)).all()), f"{k} changed"
    for k in a["grad"]:
        if a["grad"][k] is None:
            assert b["grad"][k] is None, f"{k}.grad was None and is now set"
        else:
            assert b["grad"][k] is not None and torch.equal(a["grad"][k], b["grad"][k]), k
    assert a["requires_grad"] == b["requires_grad"]
    assert a["training"] == b["training"]
    assert a["ids"] == b["ids"]


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b|, NaN-aware: non-finite entries must match exactly (same NaN positions,
    same infinities), else the error is ``inf``; finite entries are compared as usual."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return float("inf")
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if (
        not torch.equal(fa, fb)
        or not torch.equal(torch.isnan(a), torch.isnan(b))
        or not torch.equal(a[~fa & ~torch.isnan(a)], b[~fb & ~torch.isnan(b)])
    ):
        return float("inf")
    return float((a[fa] - b[fb]).abs().max()) if bool(fa.any()) else 0.0


def finite_max(b: torch.Tensor) -> float:
    """Largest |b| over the finite entries (0 when there are none)."""
    b = b.detach().double().cpu()
    b = b[torch.isfinite(b)]
    return float(b.abs().max()) if b.numel() else 0.0


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max_abs_err`` relative to the largest finite |b|."""
    return max_abs_err(a, b) / max(finite_max(b), 1e-300)


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """NaN-aware: ``max_abs_err(a, b) <= tol * max(1, finite_max(b))``."""
    return max_abs_err(a, b) <= tol * max(1.0, finite_max(b))


# Where each sliced layer's neuron output is (module names) and which modules own its parameters.
MLP_OUT = {"fc1": "relu1", "fc2": "relu2"}
CNN_OUT = {"conv1": "relu1", "conv2": "relu2", "fc1": "relu3"}
MLP_PARAMS = {"fc1": ["fc1"], "fc2": ["fc2"]}
CNN_PARAMS = {"conv1": ["conv1", "bn1"], "conv2": ["conv2", "bn2"], "fc1": ["fc1"]}


def build(kind: str, dtype=torch.float64, seed: int = 0):
    """(model, (x, y), neuron-output modules, parameter groups) for kind 'mlp' or 'cnn'."""
    if kind == "mlp":
        return make_mlp(seed, dtype), make_data(45, "vec", dtype), MLP_OUT, MLP_PARAMS
    return make_cnn(seed, dtype), make_data(45, "img", dtype), CNN_OUT, CNN_PARAMS


def fit_briefly(model, x, y, task="classification", steps=80):
    """A few Adam steps so that predictions depend on the hidden units (then eval mode)."""
    import torch.nn.functional as F

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y) if task == "classification" else F.l1_loss(out, y)
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()
