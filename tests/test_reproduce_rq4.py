"""The RQ4 (incremental development) reproduction end to end on the small digits set."""

import pytest
import torch

from neuslice.reproduce_rq4 import RQ4_METHODS, RQ4Config, format_rq4, run_rq4


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only add contention
    yield
    torch.set_num_threads(n)


def test_rq4_pipeline_on_digits(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("NEUSLICE_CACHE", str(tmp_path))
    cfg = RQ4Config(setting="mlp-digits", seeds=(0,), epochs=3, scenario="ab", hidden=(64, 32))
    rows = run_rq4(cfg, progress=False)
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
    assert (by[("replay100", "overall")]["memory_bytes"]
            > by[("replay10", "overall")]["memory_bytes"]
            > by[("replay5", "overall")]["memory_bytes"] > 0)
    # DeepArc trains only redundant layers and new head rows: without redundant layers A is kept
    if not by[("deeparc", "overall")]["redundant_layers"]:
        assert by[("deeparc", 0)]["forgetting"] == 0
    text = format_rq4(rows, "mlp-digits")
    for _, label in RQ4_METHODS:
        assert label in text
    assert "A→B" in text and "paper" not in text


@pytest.mark.parametrize("kwargs, match", [
    ({"setting": "vgg-imagenet"}, "unknown setting"),
    ({"scenario": "abcd"}, "unknown scenario"),
    ({"seeds": ()}, "seeds"),
    ({"epochs": 0}, "epochs"),
    ({"threshold": 1.5}, "threshold"),
])
def test_rq4_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RQ4Config(**kwargs)
