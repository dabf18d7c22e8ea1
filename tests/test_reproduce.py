"""The RQ2 reproduction pipeline end to end on the small digits set (1 seed, few rounds)."""

import pytest

pytest.importorskip("torch_pruning")

from neuslice.reproduce import RQ2Config, format_rq2, run_rq2  # noqa: E402


def test_rq2_pipeline_on_digits(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUSLICE_CACHE", str(tmp_path))
    cfg = RQ2Config(setting="mlp-digits", seeds=(0,), epochs=3, max_rounds=2)
    rows = run_rq2(cfg, progress=False)
    assert len(rows) == 16 and set(rows) >= {"LAMP", "NeuSemSlice+ERK", "Global+Glob"}
    for name, r in rows.items():
        assert len(r.cr) == 1 and 0 <= r.ni[0] <= 2 and 0 <= r.ma[0] <= 1
        if name.startswith(("Global+", "Category-wise+", "NeuSemSlice+")):
            assert r.cr[0] > 0  # restructuring removed parameters before any pruning
    text = format_rq2(rows, "mlp-digits")
    assert "NeuSemSlice+LAMP" in text and "paper" not in text


def test_rq2_config_rejects_unknown_setting():
    with pytest.raises(ValueError, match="unknown setting"):
        RQ2Config(setting="vgg-imagenet")
