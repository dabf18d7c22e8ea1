"""The RQ4 (incremental development) reproduction end to end on the small digits set, and on
the SmallCNN (BatchNorm) setting in a fast mode."""

import pytest
import torch

from neuslice.experiments.cli import main
from neuslice.experiments.reproduce_rq4 import RQ4_METHODS, RQ4Config, format_rq4, plot_rq4, run_rq4

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only add contention
    yield
    torch.set_num_threads(n)


def _run(tmp_path_factory, **kwargs):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEUSLICE_CACHE", str(tmp_path_factory.mktemp("cache")))
        return run_rq4(RQ4Config(**kwargs), progress=False)


@pytest.fixture(scope="module")
def digits_rows(tmp_path_factory, one_thread):
    return _run(
        tmp_path_factory, setting="mlp-digits", seeds=(0,), epochs=3, scenario="ab", hidden=(64, 32)
    )


@pytest.fixture(scope="module")
def cnn_rows(tmp_path_factory, one_thread):
    # fast mode: 1 seed, 1 epoch per task, a 4-wide SmallCNN (the real run: width 16, 10 epochs)
    return _run(tmp_path_factory, setting="cnn-mnist", seeds=(0,), epochs=1, scenario="ab", width=4)


def _check_rows(rows):
    methods = [m for m, _ in RQ4_METHODS]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        assert [r["task"] for r in mine] == [0, 1, "overall"], m
        assert all(0 <= r["task_aware"] <= 1 and 0 <= r["task_agnostic"] <= 1 for r in mine)
    by = {(r["method"], r["task"]): r for r in rows}
    # slices freeze task A's critical neurons: its task-aware accuracy is exactly unchanged
    for m in ("neusemslice", "global", "categorywise"):
        a = by[(m, 0)]
        assert a["task_aware"] == a["task_aware_at_learning"] and a["forgetting"] == 0
        assert by[(m, "overall")]["memory_bytes"] > 0
    assert by[("original", "overall")]["memory_bytes"] == 0
    assert (
        by[("replay100", "overall")]["memory_bytes"]
        > by[("replay10", "overall")]["memory_bytes"]
        > by[("replay5", "overall")]["memory_bytes"]
        > 0
    )
    # DeepArc trains only redundant layers and new head rows: without redundant layers A is kept
    # (on the CNN this needs the frozen layers' BatchNorm running statistics kept as well)
    if not by[("deeparc", "overall")]["redundant_layers"]:
        assert by[("deeparc", 0)]["forgetting"] == 0
    return by


def test_rq4_pipeline_on_digits(digits_rows):
    by = _check_rows(digits_rows)
    assert by[("original", 0)]["model"] == "MLP"
    text = format_rq4(digits_rows, "mlp-digits")
    for _, label in RQ4_METHODS:
        assert label in text
    assert "A→B" in text and "paper" not in text


def test_rq4_pipeline_on_the_cnn(cnn_rows):
    by = _check_rows(cnn_rows)
    assert {r["model"] for r in cnn_rows} == {"SmallCNN"}
    assert by[("original", 0)]["task_aware"] > 0.2  # learned something in one epoch (5 classes)
    text = format_rq4(cnn_rows, "cnn-mnist")
    assert "cnn-mnist" in text and "NeuSemSlice+Replay 10%" in text and "paper" not in text


def test_rq4_plot_is_a_png(digits_rows, cnn_rows, tmp_path):
    pytest.importorskip("matplotlib")
    for name, rows in (("mlp-digits", digits_rows), ("cnn-mnist", cnn_rows)):
        path = tmp_path / f"rq4_{name}.png"
        assert plot_rq4(rows, name, path) == str(path)
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 20_000


def test_rq4_cli_writes_table_and_png(digits_rows, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import neuslice.experiments.reproduce_rq4 as rq4

    monkeypatch.setattr(rq4, "run_rq4", lambda config: digits_rows)  # the run is tested above
    out = tmp_path / "out"
    assert (
        main(["reproduce", "rq4", "--setting", "mlp-digits", "--seeds", "0", "--out", str(out)])
        == 0
    )
    assert "Joint (all data)" in (out / "rq4_mlp-digits.txt").read_text()
    assert main(["reproduce", "rq4", "--setting", "mlp-digits", "--threads", "0"]) == 2
    data = (out / "rq4_mlp-digits.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"setting": "vgg-imagenet"}, "unknown setting"),
        ({"scenario": "abcd"}, "unknown scenario"),
        ({"seeds": ()}, "seeds"),
        ({"epochs": 0}, "epochs"),
        ({"threshold": 1.5}, "threshold"),
        ({"width": 0}, "width"),
    ],
)
def test_rq4_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RQ4Config(**kwargs)
