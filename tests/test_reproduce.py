"""The RQ2 reproduction pipeline end to end on the small digits set (1 seed, few rounds)."""

import pytest

pytest.importorskip("torch_pruning")

from neuslice.experiments.cli import main  # noqa: E402
from neuslice.experiments.reproduce import RQ2Config, format_rq2, plot_rq2, run_rq2  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def rq2_rows(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEUSLICE_CACHE", str(tmp_path_factory.mktemp("cache")))
        cfg = RQ2Config(setting="mlp-digits", seeds=(0,), epochs=3, max_rounds=2)
        return run_rq2(cfg, progress=False)


def test_rq2_pipeline_on_digits(rq2_rows):
    rows = rq2_rows
    assert len(rows) == 16 and set(rows) >= {"LAMP", "NeuSemSlice+ERK", "Global+Glob"}
    for name, r in rows.items():
        assert len(r.cr) == 1 and 0 <= r.ni[0] <= 2 and 0 <= r.ma[0] <= 1
        if name.startswith(("Global+", "Category-wise+", "NeuSemSlice+")):
            assert r.cr[0] > 0  # restructuring removed parameters before any pruning
    text = format_rq2(rows, "mlp-digits")
    assert "NeuSemSlice+LAMP" in text and "paper" not in text


def test_rq2_plot_is_a_png(rq2_rows, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "rq2.png"
    assert plot_rq2(rq2_rows, "mlp-digits", path) == str(path)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000


def test_rq2_cli_writes_table_and_png(rq2_rows, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    import neuslice.experiments.reproduce as rq2

    monkeypatch.setattr(rq2, "run_rq2", lambda config: rq2_rows)  # the run itself is tested above
    out = tmp_path / "out"
    assert (
        main(["reproduce", "rq2", "--setting", "mlp-digits", "--seeds", "0", "--out", str(out)])
        == 0
    )
    assert "NeuSemSlice+LAMP" in (out / "rq2_mlp-digits.txt").read_text()
    data = (out / "rq2_mlp-digits.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000
    assert "rq2_mlp-digits.png" in capsys.readouterr().out


def test_rq2_config_rejects_unknown_setting():
    with pytest.raises(ValueError, match="unknown setting"):
        RQ2Config(setting="vgg-imagenet")
