"""Smoke test of the RQ3 (re-adaptation) reproduction on the small digits data."""

from __future__ import annotations

import pytest

pytest.importorskip("torchattacks")
pytest.importorskip("sklearn")

from neuslice.experiments.cli import main  # noqa: E402
from neuslice.experiments.reproduce_rq3 import (
    METHODS,
    RQ3Config,
    format_rq3,
    plot_rq3,  # noqa: E402
    run_rq3,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def rq3_rows(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEUSLICE_CACHE", str(tmp_path_factory.mktemp("cache")))
        config = RQ3Config(
            setting="mlp-digits",
            seeds=(0,),
            epochs=3,
            readapt_epochs=1,
            attacks=("fgsm",),
            n_adv_train=200,
            n_adv_test=200,
        )
        return run_rq3(config, progress=False)


def test_rq3_digits_smoke(rq3_rows):
    rows = rq3_rows
    assert set(rows) == {(m, "fgsm") for m in METHODS}
    for row in rows.values():
        assert len(row.tpr) == len(row.ra) == len(row.raa) == 1
        assert 0 < row.tpr[0] <= 1
        assert 0 <= row.ra[0] <= 1 and 0 <= row.raa[0] <= 1
        assert 0 <= row.original_adv[0] <= 1
    assert rows[("Full training", "fgsm")].tpr[0] == 1.0
    assert rows[("NeuSemSlice", "fgsm")].tpr[0] < 1.0
    assert (
        rows[("NeuSemSlice+DeepArc", "fgsm")].tpr[0] <= rows[("NeuSemSlice", "fgsm")].tpr[0] + 1e-12
    )
    text = format_rq3(rows, "mlp-digits")
    for method in METHODS:
        assert method in text
    assert "original model" in text


def test_rq3_plot_is_a_png(rq3_rows, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "rq3.png"
    assert plot_rq3(rq3_rows, "mlp-digits", path) == str(path)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000


def test_rq3_cli_writes_table_and_png(rq3_rows, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import neuslice.experiments.reproduce_rq3 as rq3

    monkeypatch.setattr(rq3, "run_rq3", lambda config: rq3_rows)  # the run is tested above
    out = tmp_path / "out"
    assert (
        main(["reproduce", "rq3", "--setting", "mlp-digits", "--seeds", "0", "--out", str(out)])
        == 0
    )
    assert "NeuSemSlice+DeepArc" in (out / "rq3_mlp-digits.txt").read_text()
    data = (out / "rq3_mlp-digits.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000


@pytest.mark.parametrize(
    "kwargs",
    [
        {"setting": "cnn-cifar"},
        {"seeds": ()},
        {"attacks": ("cw",)},
        {"attacks": ()},
        {"n_adv_train": 0},
        {"readapt_epochs": 0},
        {"fgsm_eps": 1.5},
        {"pgd_eps": 0.0},
        {"lr": 0.0},
        {"deeparc_threshold": 0.0},
    ],
)
def test_rq3_bad_config(kwargs):
    with pytest.raises(ValueError):
        RQ3Config(**kwargs)


def test_rq3_accepts_the_cnn_setting():
    from neuslice.experiments.reproduce_rq3 import RQ3_EPS, RQ3Config

    assert RQ3Config(setting="cnn-mnist").setting == "cnn-mnist"
    assert set(RQ3_EPS["cnn-mnist"]) == {"fgsm", "pgd"}
