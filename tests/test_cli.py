"""The command line: the demo end to end on the small bundled digits set, `neuslice info`, every
option's help and default, --quiet/--verbose, and where `reproduce` writes."""

import argparse
import csv
import json
import logging
import os
import re

import pytest

from neuslice import Slice
from neuslice.experiments import cli
from neuslice.experiments.cli import DEFAULT_REPRODUCE_DIR, build_parser, main

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


@pytest.mark.slow
def test_demo_on_digits_writes_table_plot_and_slices(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(
        [
            "demo",
            "--dataset",
            "digits",
            "--epochs",
            "3",
            "--random-repeats",
            "1",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "unmasked accuracy" in text and "Area under" in text
    for name in (
        "rq1_masking.png",
        "rq1_masking.csv",
        "rq1_auc.json",
        "profile.pt",
        "slice_semantic.json",
    ):
        assert (out / name).stat().st_size > 0, name
    rows = (out / "rq1_masking.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 * (10 + 10 + 10)  # header + metrics x (2 ratio sweeps + thresholds)
    auc = json.loads((out / "rq1_auc.json").read_text())
    assert set(auc) == {"avg", "var", "ens", "taylor", "deeplift"}
    for res in auc.values():
        assert 0.0 <= res["semantic"] <= 1.0
    sl = Slice.load(out / "slice_semantic.json")  # semantic_slice's default criterion
    assert sl.strategy == "consumer_r2" and sl.threshold == 0.3
    paper = Slice.load(out / "slice_semantic_layer_cka.json")
    assert paper.strategy == "semantic" and paper.threshold == 0.95
    assert os.path.getsize(out / "slice_semantic.json") < 8192


def test_info_prints_versions(capsys):
    assert main(["info"]) == 0
    assert "torch" in capsys.readouterr().out


def test_reproduce_rejects_a_bad_config(capsys):
    assert main(["reproduce", "rq4", "--setting", "mlp-digits", "--epochs", "0"]) == 2
    assert "epochs must be a positive integer" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_cnn_with_batchnorm_recalibration(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(
        [
            "demo",
            "--model",
            "cnn",
            "--dataset",
            "digits",
            "--epochs",
            "1",
            "--random-repeats",
            "0",
            "--recalibrate-bn",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert rc == 0
    assert "Area under" in capsys.readouterr().out
    assert len((out / "rq1_masking.csv").read_text().splitlines()) == 1 + 5 * 30


# ------------------------------------------------------------------------------ help texts
def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def _subcommands(parser, prefix=()):
    """Every command path, e.g. (), ("demo",), ("reproduce",), ("reproduce", "rq2"), ..."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, prefix + (name,))


def _options_in_help(text: str) -> dict[str, str]:
    """Option entries of the 'options:' section of a --help text: first flag -> help text."""
    section = text.split("\noptions:\n", 1)[1]
    entries: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        m = re.match(
            r"^  (-[^ ,]+)(?:[^ ]*(?: [^ -][^ ]*)*)*(?:, -[^ ]+(?: [^ -][^ ]*)*)?"
            r"(?:\s{2,}(.*))?$",
            line,
        )
        if m and not line.startswith("   "):
            current = m.group(1)
            entries[current] = m.group(2) or ""
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
    return entries


def test_every_option_of_every_command_has_help_and_default(capsys):
    paths = list(_subcommands(build_parser()))
    names = {p for p, _ in paths}
    assert {
        ("demo",),
        ("reproduce",),
        ("info",),
        ("reproduce", "rq2"),
        ("reproduce", "rq3"),
        ("reproduce", "rq4"),
    } <= names
    for path, parser in paths:
        text = _help(list(path), capsys)
        entries = _options_in_help(text)
        flags = [a.option_strings[0] for a in parser._actions if a.option_strings]
        assert sorted(entries) == sorted(flags), (path, sorted(entries))  # the parse saw all
        for flag, help_text in entries.items():
            if flag == "-h":
                continue
            m = re.search(r"\(default: [^()]*(\([^()]*\))?[^()]*\)$", help_text.strip())
            assert m, (path, flag, help_text)
            assert len(help_text[: m.start()].strip()) > 10, (path, flag, help_text)
        for action in parser._actions:  # each listed subcommand has a one-line help too
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help and choice.dest in text, (path, choice.dest)


def test_main_help_lists_every_command_in_plain_text(capsys):
    text = _help([], capsys)
    for name in ("demo", "reproduce", "info"):
        assert re.search(rf"^    {name}\s+\S", text, re.M), name
    assert "`" not in text and "::" not in text
    assert "--quiet" in text and "--verbose" in text
    reproduce = _help(["reproduce"], capsys)
    for rq in ("rq2", "rq3", "rq4"):
        assert re.search(rf"^    {rq}\s+\S", reproduce, re.M), rq
    assert "`" not in reproduce


# --------------------------------------------------------------------------------- logging
@pytest.fixture
def neuslice_logger():
    log = logging.getLogger("neuslice")
    level, handlers = log.level, list(log.handlers)
    yield log
    log.setLevel(level)
    log.handlers[:] = handlers


@pytest.mark.parametrize(
    "argv, level",
    [
        (["info"], logging.INFO),
        (["--quiet", "info"], logging.WARNING),
        (["info", "-q"], logging.WARNING),
        (["-v", "info"], logging.DEBUG),
        (["info", "--verbose"], logging.DEBUG),
    ],
)
def test_quiet_and_verbose_set_the_level(argv, level, neuslice_logger, capsys):
    assert main(argv) == 0
    assert neuslice_logger.level == level
    capsys.readouterr()
    logging.getLogger("neuslice.somewhere").info("progress line")
    logging.getLogger("neuslice.somewhere").debug("debug line")
    logging.getLogger("neuslice.somewhere").warning("a warning")
    err = capsys.readouterr().err
    assert ("progress line" in err) == (level <= logging.INFO)
    assert ("debug line" in err) == (level <= logging.DEBUG)
    assert "WARNING: a warning" in err


def test_quiet_and_verbose_together_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["-q", "info", "-v"])
    assert exc.value.code == 2
    assert "--quiet" in capsys.readouterr().err


# ------------------------------------------------------------------ reproduce's output folder
@pytest.fixture
def fake_rq2(monkeypatch):
    import neuslice.experiments.reproduce as rq2

    rows = {
        "NeuSemSlice+LAMP": rq2.RQ2Row("NeuSemSlice+LAMP", cr=[0.5, 0.6], ni=[3, 4], ma=[0.9, 0.8])
    }
    calls = []
    monkeypatch.setattr(rq2, "run_rq2", lambda config: calls.append(config) or rows)
    monkeypatch.setattr(rq2, "format_rq2", lambda rows, setting: f"TABLE {setting}")

    def plot(rows, setting, path):
        with open(path, "wb") as f:
            f.write(b"\x89PNG fake")
        return path

    monkeypatch.setattr(rq2, "plot_rq2", plot)
    return calls


def test_reproduce_writes_to_the_default_folder(
    fake_rq2, tmp_path, monkeypatch, capsys, neuslice_logger
):
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "rq2", "--setting", "mlp-digits", "--seeds", "0", "1"]) == 0
    assert fake_rq2[0].seeds == (0, 1)
    folder = tmp_path / DEFAULT_REPRODUCE_DIR / "rq2-mlp-digits"
    assert (folder / "rq2_mlp-digits.txt").read_text() == "TABLE mlp-digits\n"
    assert (folder / "rq2_mlp-digits.png").read_bytes().startswith(b"\x89PNG")
    with open(folder / "rq2_mlp-digits.csv") as f:
        records = list(csv.DictReader(f))
    assert [(r["name"], r["seed"], r["cr"], r["ni"], r["ma"]) for r in records] == [
        ("NeuSemSlice+LAMP", "0", "0.5", "3", "0.9"),
        ("NeuSemSlice+LAMP", "1", "0.6", "4", "0.8"),
    ]
    out = capsys.readouterr().out
    assert os.path.join(DEFAULT_REPRODUCE_DIR, "rq2-mlp-digits") in out.splitlines()[-1]


def test_reproduce_out_overrides_the_default(fake_rq2, tmp_path, monkeypatch, neuslice_logger):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "reproduce",
                "rq2",
                "--setting",
                "mlp-digits",
                "--seeds",
                "0",
                "-q",
                "--out",
                str(tmp_path / "mine"),
            ]
        )
        == 0
    )
    assert (tmp_path / "mine" / "rq2_mlp-digits.csv").is_file()
    assert not (tmp_path / DEFAULT_REPRODUCE_DIR).exists()


def test_setting_choices_match_the_settings():
    from neuslice.experiments.reproduce import SETTINGS

    assert cli.SETTING_NAMES == list(SETTINGS)


def test_a_new_command_is_one_function(monkeypatch, capsys, neuslice_logger):
    monkeypatch.setattr(cli, "_COMMANDS", list(cli._COMMANDS))

    @cli.command
    def _add_hello(sub):
        p = cli._command(sub, "hello", "print a greeting")
        p.add_argument("--name", default="world", help="whom to greet")
        p.set_defaults(func=lambda args: print(f"hello {args.name}") or 0)

    assert main(["hello", "--name", "slice"]) == 0
    assert capsys.readouterr().out == "hello slice\n"
    assert re.search(r"^    hello\s+print a greeting", _help([], capsys), re.M)


# --------------------------------------------------------------------------- the RQ1 figure
def _sweep_rows():
    from neuslice.experiments.sweep import SweepRow

    rows = []
    for metric in ("avg", "taylor"):
        for i, cr in enumerate((0.1, 0.3, 0.5)):
            rows.append(SweepRow("global", metric, cr, cr, 0.95 - 0.3 * i, 0.9 - 0.1 * i))
            rows.append(
                SweepRow("categorywise", metric, cr, cr, 0.95 - 0.01 * i, float("nan"))
            )  # no random repeats
            rows.append(SweepRow("semantic", metric, 0.9 + cr / 10, cr / 2, 0.96, 0.94))
    return rows


def test_plot_sweep_has_a_drop_row_one_legend_and_a_labelled_unmasked_line(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from neuslice.experiments.sweep import plot_sweep

    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    plot_sweep(0.95, _sweep_rows(), tmp_path / "f.png", title="t")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    (fig,) = figs
    assert len(fig.axes) == 4 and len(fig.legends) == 1
    assert all(not ax.get_legend() for ax in fig.axes)  # no per-panel legend
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "unmasked model (0.950)" in labels and len(labels) == 7
    top, bottom = fig.axes[:2], fig.axes[2:]
    lo, hi = top[0].get_ylim()
    assert 0.30 < lo < 0.35 and 0.95 < hi < 1.05, (lo, hi)  # from just below the lowest point
    assert all(ax.get_yscale() == "log" for ax in bottom)
    drops = [y for line in bottom[0].get_lines() for y in line.get_ydata()]
    assert min(drops) == pytest.approx(1e-3) and max(drops) == pytest.approx(0.6)
    # the three strategies differ in marker and line style, not only in colour
    styles = {
        (line.get_marker(), line.get_linestyle())
        for line in top[0].get_lines()
        if line.get_linestyle() != ":" and line.get_marker() not in ("", "None")
    }
    assert len(styles) == 3


def test_plot_sweep_rejects_empty_rows(tmp_path):
    from neuslice.experiments.sweep import plot_sweep

    with pytest.raises(ValueError, match="at least one"):
        plot_sweep(0.9, [], tmp_path / "f.png")
    with pytest.raises(ValueError, match="finite"):
        plot_sweep(float("nan"), _sweep_rows(), tmp_path / "f.png")


def test_reproduce_incite_writes_table_csv_and_plot(tmp_path, capsys):
    from neuslice.experiments.cli import main

    rc = main(
        [
            "reproduce",
            "incite",
            "--subjects",
            "diabetes",
            "--methods",
            "incite",
            "--seeds",
            "0",
            "--regressor-epochs",
            "2",
            "--head-epochs",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "diabetes" in out and "incite" in out
    for ext in ("txt", "csv", "png"):
        assert (tmp_path / f"incite.{ext}").stat().st_size > 0


def test_evaluate_writes_matched_table_csv_and_plot(tmp_path, capsys):
    from neuslice.experiments.cli import main

    rc = main(
        [
            "-q",
            "evaluate",
            "--model",
            "mlp",
            "--data",
            "digits",
            "--seeds",
            "0",
            "1",
            "--epochs",
            "1",
            "--metrics",
            "taylor",
            "--targets",
            "0.6",
            "--threads",
            "1",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert (
        "target 60%" in out and "semantic (consumer R², default)" in out and "categorywise" in out
    )
    for ext in ("txt", "csv", "png"):
        assert (tmp_path / "out" / f"matched.{ext}").stat().st_size > 0


def test_evaluate_refuses_targets_outside_the_unit_interval(capsys):
    from neuslice.experiments.cli import main

    assert main(["evaluate", "--targets", "1.5"]) == 2
    assert "--targets must lie in (0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["2", "0", "nan", "x"])
def test_reproduce_incite_refuses_a_bad_fraction_before_any_work(value, capsys):
    from neuslice.experiments.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "incite", "--fraction", value])
    assert exc.value.code == 2
    assert "--fraction" in capsys.readouterr().err
