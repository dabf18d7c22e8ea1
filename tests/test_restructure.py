"""neuslice.restructure: physically removing non-critical neurons matches masking them."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import neuslice

pytest.importorskip("torch_pruning")
from neuslice.maintenance.restructure import restructure  # noqa: E402

IMG = [3, 8, 8]


def _bn_stats(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)
    ).eval()


def cnn() -> nn.Module:
    torch.manual_seed(1)
    return _bn_stats(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 10),
            nn.ReLU(),
            nn.Linear(10, 3),
        ),
        1,
    )


class ResNetTiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.relu(self.bn0(self.stem(x)))
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.fc(torch.flatten(self.pool(self.relu(x + y)), 1))


def resnet() -> nn.Module:
    torch.manual_seed(2)
    return _bn_stats(ResNetTiny(), 2)


def make_slice(
    model: nn.Module, shape: list[int], seed: int = 0, p: float = 0.5, masks: dict | None = None
) -> neuslice.Slice:
    if masks is None:
        g = torch.Generator().manual_seed(seed)
        masks = {
            l.name: torch.rand(l.num_neurons, generator=g) < p for l in neuslice.find_layers(model)
        }
    return neuslice.Slice(
        masks=masks,
        strategy="global",
        metric="avg",
        fingerprint=neuslice.model_fingerprint(model),
        input_shape=shape,
    )


def _x(shape: list[int], n: int = 5) -> torch.Tensor:
    return torch.randn([n, *shape], generator=torch.Generator().manual_seed(9))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


CASES = [(mlp, [10]), (cnn, IMG)]


@pytest.mark.parametrize("factory,shape", CASES, ids=["mlp", "cnn"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_masking_and_param_count(factory, shape, seed):
    model = factory()
    sl = make_slice(model, shape, seed)
    small, eff = restructure(model, sl, _x(shape, 2), return_slice=True)
    for name, mask in sl.masks.items():
        assert torch.equal(eff.masks[name], mask)  # no coupling: the slice is applied as is
    x = _x(shape)
    with torch.no_grad(), neuslice.masked(model, sl):
        want = model(x)
    with torch.no_grad():
        got = small(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    expected = _n_params(model) * (1 - sl.compression_rate(model))
    assert _n_params(small) == round(expected)
    assert _n_params(small) < _n_params(model)


def test_residual_uses_coupling_adjusted_slice():
    model = resnet()
    layers = {l.name: l for l in neuslice.find_layers(model)}
    assert layers["stem"].coupled and layers["conv2"].coupled
    masks = {
        "stem": torch.tensor([1, 0, 0, 1, 0, 0, 1, 0], dtype=torch.bool),
        "conv1": torch.tensor([1, 0, 1, 0, 1, 0, 0, 1], dtype=torch.bool),
        "conv2": torch.tensor([0, 0, 1, 1, 0, 1, 0, 0], dtype=torch.bool),
    }
    sl = make_slice(model, IMG, masks=masks)
    small, eff = restructure(model, sl, _x(IMG, 2), return_slice=True)
    union = masks["stem"] | masks["conv2"]
    assert torch.equal(eff.masks["stem"], union) and torch.equal(eff.masks["conv2"], union)
    assert torch.equal(eff.masks["conv1"], masks["conv1"])  # not coupled
    assert small.stem.out_channels == small.conv2.out_channels == int(union.sum())
    assert small.conv1.out_channels == int(masks["conv1"].sum())
    assert small.fc.in_features == int(union.sum())
    x = _x(IMG)
    with torch.no_grad(), neuslice.masked(model, eff):
        want = model(x)
    with torch.no_grad():
        got = small(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # compression_rate skips coupled layers, so it undercounts what was removed here
    removed = 1 - _n_params(small) / _n_params(model)
    assert removed > sl.compression_rate(model) > 0


def test_frozen_flags_and_original_untouched():
    model = cnn()
    model[0].weight.requires_grad_(False)
    model[4].bias.requires_grad_(False)
    model[8].weight.requires_grad_(False)
    state = copy.deepcopy(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    small = restructure(model, make_slice(model, IMG), _x(IMG, 2))
    assert {n: p.requires_grad for n, p in small.named_parameters()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert small is not model and not small.training


def test_training_mode_kept_and_bn_stats_not_updated():
    model = cnn().train()
    small = restructure(model, make_slice(model, IMG), _x(IMG, 2))
    assert small.training
    model.eval()
    small.eval()
    # running statistics of kept channels are the original ones (tracing ran in eval mode)
    kept = make_slice(model, IMG).masks["0"]
    torch.testing.assert_close(small[1].running_mean, model[1].running_mean[kept])


def test_default_example_inputs_from_slice():
    model = mlp()
    small = restructure(model, make_slice(model, [10]))
    assert small[0].out_features < 16


def test_all_non_critical_keeps_one(caplog):
    model = mlp()
    masks = {"0": torch.zeros(16, dtype=torch.bool), "2": torch.ones(12, dtype=torch.bool)}
    sl = make_slice(model, [10], masks=masks)
    with caplog.at_level(logging.WARNING, logger="neuslice.maintenance.restructure"):
        small, eff = restructure(model, sl, _x([10], 2), return_slice=True)
    assert small[0].out_features == 1 and small[2].in_features == 1
    assert int(eff.masks["0"].sum()) == 1
    assert any("non-critical" in r.getMessage() for r in caplog.records)
    x = _x([10])
    with torch.no_grad(), neuslice.masked(model, eff):
        want = model(x)
    with torch.no_grad():
        torch.testing.assert_close(small(x), want, atol=1e-5, rtol=1e-5)


def test_head_in_slice_is_not_shrunk():
    model = mlp()
    masks = {"4": torch.tensor([True, False, False])}
    sl = make_slice(model, [10], masks=masks)
    small, eff = restructure(model, sl, _x([10], 2), return_slice=True)
    assert small[4].out_features == 3 and bool(eff.masks["4"].all())


def test_slice_of_other_model_rejected():
    sl = make_slice(mlp(), [10])
    with pytest.raises(ValueError, match="different model"):
        restructure(cnn(), sl, _x(IMG, 2))
    with pytest.raises(TypeError):
        restructure(mlp(), {"0": torch.ones(16, dtype=torch.bool)}, _x([10], 2))


class ListOutput(nn.Module):
    """Returns Python floats: autograd, and so torch-pruning, cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return {"out": self.fc2(torch.relu(self.fc1(x))).tolist()}


def test_untraceable_model_or_bad_inputs_raise_valueerror():
    model = mlp()
    sl = make_slice(model, [10])
    with pytest.raises(ValueError, match="neuslice.masked"):
        restructure(model, sl, torch.randn(2, 7))  # wrong input width: forward fails
    model = ListOutput()
    with pytest.raises(ValueError, match="could not trace ListOutput"):
        restructure(model, make_slice(model, [4]), torch.randn(2, 4))


def test_coupled_with_unsliced_layer_keeps_channels():
    model = resnet()
    masks = {
        "conv1": torch.tensor([1, 0, 1, 0, 1, 0, 0, 1], dtype=torch.bool),
        "conv2": torch.tensor([0, 0, 1, 1, 0, 1, 0, 0], dtype=torch.bool),
    }
    sl = make_slice(model, IMG, masks=masks)  # stem, coupled to conv2, is not in the slice
    small, eff = restructure(model, sl, _x(IMG, 2), return_slice=True)
    assert small.conv2.out_channels == small.stem.out_channels == 8
    assert bool(eff.masks["conv2"].all()) and small.conv1.out_channels == 4
    x = _x(IMG)
    with torch.no_grad(), neuslice.masked(model, eff):
        want = model(x)
    with torch.no_grad():
        torch.testing.assert_close(small(x), want, atol=1e-5, rtol=1e-5)


class Reshaper(nn.Module):
    """Hard-codes a channel count in forward: torch-pruning's result cannot run."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h.reshape(-1, 6))


def test_forward_hardcoding_channels_raises_valueerror():
    model = Reshaper()
    masks = {"fc1": torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.bool)}
    sl = make_slice(model, [4], masks=masks)
    with pytest.raises(ValueError, match="neuslice.masked"):
        restructure(model, sl, torch.randn(2, 4))


def test_missing_torch_pruning_message(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "torch_pruning":
            raise ImportError("no module")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    model = mlp()
    with pytest.raises(ImportError, match="pip install torch-pruning"):
        restructure(model, make_slice(model, [10]), _x([10], 2))
