"""neuslice.decompose / Modules: per-output modules, their heads, metrics and persistence."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import neuslice
from conftest import fit_briefly
from neuslice.decomposition.modules import head_name


def _classifier(seed=0, n=240):
    torch.manual_seed(seed)
    x = torch.randn(n, 8)
    y = x[:, :3].argmax(1)
    model = nn.Sequential(
        nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    return fit_briefly(model, x, y), DataLoader(TensorDataset(x, y), batch_size=60), x, y


def _cnn(seed=0, n=120):
    torch.manual_seed(seed)
    x = torch.randn(n, 2, 6, 6)
    y = x.mean((2, 3)).argmax(1) + 2 * (x[:, 0, 0, 0] > 0).long()
    model = nn.Sequential(
        nn.Conv2d(2, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Conv2d(12, 12, 3, stride=2, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12 * 9, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )
    model = fit_briefly(model, x, y, steps=40)
    with torch.no_grad():  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model, DataLoader(TensorDataset(x, y), batch_size=40), x, y


def test_toy_metrics_by_hand():
    """2-4-3 network, hand-made scores: module o keeps hidden units {o, o+1}."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    x = torch.randn(60, 2)
    y = torch.arange(60) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    scores = {"0": torch.tensor([[5.0, 4, 1, 0], [0, 5, 4, 1], [0, 1, 4, 5]])}
    mods = neuslice.decompose(
        model, loader, fraction=0.5, cluster_size=1, scores=scores, head_epochs=0, progress=False
    )
    assert len(mods) == 3
    assert [torch.nonzero(m["0"]).flatten().tolist() for m in mods.masks] == [
        [0, 1],
        [1, 2],
        [2, 3],
    ]
    # Jaccard: {0,1}-{1,2} = 1/3, {0,1}-{2,3} = 0, {1,2}-{2,3} = 1/3
    assert mods.overlap() == pytest.approx(2 / 9)
    # original 2*4+4 + 4*3+3 = 27; a module 2*2+2 + (2*2+2) = 12
    assert mods.module_params() == [12, 12, 12]
    assert mods.compression() == pytest.approx(27 / 12)
    # heads before training (head_epochs=0): "no" = mean of other rows, "yes" = row o
    w, b = model[2].weight.detach(), model[2].bias.detach()
    for o, m in enumerate(mods):
        keep = torch.nonzero(mods.masks[o]["0"]).flatten()
        others = [j for j in range(3) if j != o]
        assert torch.allclose(m[2].weight[1], w[o, keep])
        assert torch.allclose(m[2].weight[0], w[others][:, keep].mean(0))
        assert torch.allclose(m[2].bias, torch.stack([b[others].mean(), b[o]]))
    # recombination: argmax of the yes probabilities
    yes = torch.stack([m(x).softmax(1)[:, 1] for m in mods], 1)
    assert torch.equal(mods.predict(x), yes.argmax(1))
    res = mods.evaluate(loader, original=model)
    assert res["accuracy"] == pytest.approx(float((yes.argmax(1) == y).double().mean()))
    assert res["original_accuracy"] == pytest.approx(
        float((model(x).argmax(1) == y).double().mean())
    )
    assert res["overlap"] == pytest.approx(2 / 9) and res["modules"] == 3


@pytest.mark.parametrize("build", [_classifier, _cnn])
def test_modules_are_the_masked_model_up_to_the_head(build, tmp_path):
    model, loader, x, y = build()
    snap = (
        copy.deepcopy(model.state_dict()),
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )
    mods = neuslice.decompose(model, loader, cluster_size=3, head_epochs=3, progress=False)
    assert len(mods) == model[-1].out_features
    head = head_name(model)
    for k, m in enumerate(mods):
        got, want = [], []
        h1 = m.get_submodule(head).register_forward_pre_hook(lambda _m, a: got.append(a[0]))
        h2 = model.get_submodule(head).register_forward_pre_hook(lambda _m, a: want.append(a[0]))
        try:
            with torch.no_grad():
                m(x)
                with neuslice.masked(model, mods.slice(k)):
                    model(x)
        finally:
            h1.remove()
            h2.remove()
        keep = mods.masks[k][neuslice.find_layers(model)[-1].name]
        assert torch.allclose(got[0], want[0][:, keep], atol=1e-5)
        assert torch.equal(want[0][:, ~keep], torch.zeros_like(want[0][:, ~keep]))
        trainable = [n for n, p in m.named_parameters() if p.requires_grad]
        assert trainable == [f"{head}.weight", f"{head}.bias"]
        assert m.get_submodule(head).out_features == 2
    res = mods.evaluate(loader, original=model)
    assert 0 <= res["accuracy"] <= 1 and res["compression"] > 1
    assert 0 < res["overlap"] <= 1
    # the model is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snap[0].items())
    assert [m.training for m in model.modules()] == snap[1]
    assert [p.requires_grad for p in model.parameters()] == snap[2]
    # save / load round trip (weights_only) on a fresh instance of the architecture
    mods.save(tmp_path / "mods")
    fresh = copy.deepcopy(model)
    for p in fresh.parameters():
        nn.init.normal_(p)
    back = neuslice.Modules.load(tmp_path / "mods", fresh)
    assert len(back) == len(mods) and back.task == mods.task
    assert torch.equal(back.predict(x), mods.predict(x))
    for a, b in zip(mods, back):
        assert a.state_dict().keys() == b.state_dict().keys()
        assert all(torch.equal(a.state_dict()[n], b.state_dict()[n]) for n in a.state_dict())
    assert back.overlap() == mods.overlap() and back.compression() == mods.compression()
    wider = copy.deepcopy(model)
    wider[-1] = nn.Linear(wider[-1].in_features, 5)  # another architecture
    with pytest.raises(ValueError, match="another model"):
        neuslice.Modules.load(tmp_path / "mods", wider)


def test_regression_modules():
    torch.manual_seed(1)
    x = torch.randn(200, 4)
    y = torch.stack([x[:, 0] + x[:, 1], (x[:, 2] * x[:, 3]), x[:, 0].abs()], 1)
    model = fit_briefly(
        nn.Sequential(nn.Linear(4, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3)),
        x,
        y,
        "regression",
        steps=150,
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=50)
    mods = neuslice.decompose(
        model, loader, task="regression", cluster_size=4, head_epochs=2, progress=False
    )
    assert len(mods) == 3
    pred = mods.predict(x)
    assert pred.shape == (200, 3)
    assert torch.allclose(pred[:, 1], mods[1](x).reshape(-1))
    res = mods.evaluate(loader, original=model)
    maes = (pred - y).abs().mean(0)
    assert res["mae"] == pytest.approx(float(maes.mean()), rel=1e-5)
    assert math.isfinite(res["original_mae"]) and res["original_mae"] > 0
    assert [m[-1].out_features for m in mods] == [1, 1, 1]
    # a single output: one module, no pair to overlap
    one = fit_briefly(
        nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 1)),
        x,
        y[:, :1],
        "regression",
        steps=30,
    )
    single = neuslice.decompose(
        one,
        DataLoader(TensorDataset(x, y[:, 0]), batch_size=50),
        task="regression",
        cluster_size=4,
        head_epochs=1,
        progress=False,
    )
    assert len(single) == 1 and math.isnan(single.overlap())
    assert single.predict(x).shape == (200, 1)


def test_semantic_modules():
    model, loader, x, y = _classifier(seed=2)
    mods = neuslice.decompose(
        model, loader, method="semantic", metric="avg", threshold=0.9, head_epochs=1, progress=False
    )
    prof = neuslice.profile(model, loader, 3, metrics=("avg",), progress=False)
    sl = neuslice.semantic_slice(prof, "avg", 0.9, criterion="layer_cka")
    assert len(mods) == 3 and mods.method == "semantic"
    for o in range(3):
        for layer, m in mods.masks[o].items():
            assert torch.equal(m, sl.category_masks[layer][o].bool())
    assert mods.predict(x).shape == (len(x),)


def test_bad_inputs():
    model, loader, x, y = _classifier()
    for bad in (0, 1.5, float("nan"), -0.1):
        with pytest.raises(ValueError, match="fraction"):
            neuslice.decompose(model, loader, fraction=bad, progress=False)
    with pytest.raises(ValueError, match="method"):
        neuslice.decompose(model, loader, method="deeparc", progress=False)
    with pytest.raises(ValueError, match="classification"):
        neuslice.decompose(model, loader, method="semantic", task="regression", progress=False)
    with pytest.raises(ValueError, match="cluster_size"):
        neuslice.decompose(model, loader, cluster_size=0, progress=False)
    with pytest.raises(ValueError, match="1.0"):
        neuslice.decompose(model, loader, factors=(1.0,), progress=False)
    with pytest.raises(ValueError, match="do not match|columns"):
        neuslice.decompose(
            model,
            DataLoader(TensorDataset(x, torch.randn(len(x), 2)), batch_size=60),
            task="regression",
            progress=False,
        )
    one = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="class logits"):
        neuslice.decompose(one, loader, progress=False)
    after_head = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3), nn.LogSoftmax(1))
    with pytest.raises(ValueError, match="output layer"):
        neuslice.decompose(after_head, loader, progress=False)
    # scores of another model
    with pytest.raises(ValueError, match="another model"):
        neuslice.decompose(
            model, loader, scores={"0": torch.zeros(3, 5), "2": torch.zeros(3, 16)}, progress=False
        )
    mods = neuslice.decompose(model, loader, cluster_size=4, head_epochs=0, progress=False)
    with pytest.raises(ValueError, match="shape"):
        mods.predict(torch.randn(5, 9))
    with pytest.raises(TypeError):
        mods.predict(x.numpy())
    other = nn.Sequential(
        nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    with pytest.raises(ValueError, match="another model"):
        mods.evaluate(loader, original=other)


def test_float64_modules_save_and_load(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(90, 6, dtype=torch.float64)
    y = torch.arange(90) % 3
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).double().eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=30)
    mods = neuslice.decompose(model, loader, cluster_size=2, head_epochs=1, progress=False)
    mods.save(tmp_path / "m64")
    back = neuslice.Modules.load(tmp_path / "m64", copy.deepcopy(model))
    assert torch.equal(back.predict(x), mods.predict(x))


def test_a_class_without_samples_is_named():
    model, _, x, y = _classifier()
    y = torch.where(y == 2, torch.zeros_like(y), y)  # class 2 never occurs
    for method in ("incite", "semantic"):
        with pytest.raises(ValueError, match=r"class\(es\) \[2\] have no samples"):
            neuslice.decompose(
                model,
                DataLoader(TensorDataset(x, y), batch_size=60),
                method,
                cluster_size=2,
                head_epochs=1,
                progress=False,
            )
