"""The demo end to end on the small bundled digits set, and `neuslice info`."""

import json
import os

import pytest

from neuslice import Slice
from neuslice.experiments.cli import main

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


def test_demo_on_digits_writes_table_plot_and_slices(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--dataset", "digits", "--epochs", "3", "--random-repeats", "1",
               "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "unmasked accuracy" in text and "Area under" in text
    for name in ("rq1_masking.png", "rq1_masking.csv", "rq1_auc.json", "profile.pt",
                 "slice_semantic.json"):
        assert (out / name).stat().st_size > 0, name
    rows = (out / "rq1_masking.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 * (10 + 10 + 10)  # header + metrics x (2 ratio sweeps + thresholds)
    auc = json.loads((out / "rq1_auc.json").read_text())
    assert set(auc) == {"avg", "var", "ens", "taylor", "deeplift"}
    for res in auc.values():
        assert 0.0 <= res["semantic"] <= 1.0
    sl = Slice.load(out / "slice_semantic.json")
    assert sl.strategy == "semantic" and sl.threshold == 0.95
    assert os.path.getsize(out / "slice_semantic.json") < 8192


def test_info_prints_versions(capsys):
    assert main(["info"]) == 0
    assert "torch" in capsys.readouterr().out


def test_reproduce_rejects_a_bad_config(capsys):
    assert main(["reproduce", "rq4", "--setting", "mlp-digits", "--epochs", "0"]) == 2
    assert "epochs must be a positive integer" in capsys.readouterr().err


def test_demo_cnn_with_batchnorm_recalibration(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--model", "cnn", "--dataset", "digits", "--epochs", "1",
               "--random-repeats", "0", "--recalibrate-bn", "--out", str(out),
               "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    assert "Area under" in capsys.readouterr().out
    assert len((out / "rq1_masking.csv").read_text().splitlines()) == 1 + 5 * 30
