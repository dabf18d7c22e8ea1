"""Command line: ``neuslice demo`` and ``neuslice info``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .. import categorywise_slice, global_slice, profile, semantic_slice
    from .data import make_loader
    from .sweep import (SweepConfig, area_under_curves, format_auc_table, format_table,
                           masking_sweep, plot_sweep, write_csv)
    from .train import cached_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    print(f"[1/4] model: {args.model} on {args.dataset} (seed {args.seed}, {args.epochs} epochs; "
          f"cached under {args.cache_dir or 'the default cache'})", flush=True)
    t0 = time.perf_counter()
    model, train_set, test_set = cached_model(args.model, args.dataset, seed=args.seed,
                                              epochs=args.epochs, cache_dir=args.cache_dir,
                                              progress=True)
    print(f"      ready in {time.perf_counter() - t0:.1f}s", flush=True)

    print(f"[2/4] profiling {len(train_set)} training images (all metrics, neuron-HSIC)",
          flush=True)
    num_classes = int(train_set.tensors[1].max()) + 1
    prof = profile(model, make_loader(train_set, batch_size=args.batch_size), num_classes)
    prof.save(os.path.join(args.out, "profile.pt"))
    t = prof.timings
    print(f"      {t['total']:.2f}s (forward+Taylor {t['forward']:.2f}s, DeepLIFT "
          f"{t['deeplift']:.2f}s, HSIC finalise {t['hsic_finalize']:.2f}s); routes "
          f"{prof.hsic_routes}", flush=True)
    for w in prof.warnings:
        print(f"      note: {w}")

    print("[3/4] masking sweep: 3 strategies x 5 metrics, ratios 10%..100%, thresholds "
          "0.90..0.99, random floor", flush=True)
    config = SweepConfig(random_repeats=args.random_repeats)
    recal = make_loader(train_set, batch_size=args.batch_size, shuffle=True, seed=args.seed) \
        if args.recalibrate_bn else None
    base, rows = masking_sweep(model, prof, test_set, config, recalibrate_with=recal)
    print(format_table(base, rows))
    auc = area_under_curves(base, rows)
    print("\nArea under the accuracy-vs-compression curve (mean accuracy over the common "
          "compression range):")
    print(format_auc_table(auc))

    print("[4/4] writing results", flush=True)
    plot = os.path.join(args.out, "rq1_masking.png")
    plot_sweep(base, rows, plot, title=f"{args.model.upper()}-{args.dataset}: masking evaluation")
    write_csv(rows, os.path.join(args.out, "rq1_masking.csv"))
    with open(os.path.join(args.out, "rq1_auc.json"), "w") as f:
        json.dump(auc, f, indent=1)
    examples = {"semantic": semantic_slice(prof, "taylor", 0.95),
                "global": global_slice(prof, "taylor", 0.5),
                "categorywise": categorywise_slice(prof, "taylor", 0.5)}
    for name, sl in examples.items():
        sl.save(os.path.join(args.out, f"slice_{name}.json"))
    print(f"      plot: {plot}\n      table: {os.path.join(args.out, 'rq1_masking.csv')}\n"
          f"      slices and profile: {args.out}/\n"
          f"done in {time.perf_counter() - t_start:.1f}s")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    import time

    if args.threads is not None:
        if args.threads < 1:
            print(f"neuslice reproduce {args.rq}: --threads must be at least 1",
                  file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    from .data import DISK_DATASETS
    from .reproduce import SETTINGS, setting_data

    if args.rq == "rq2":
        from .reproduce import (RQ2Config as Config, format_rq2 as fmt, plot_rq2 as plot,
                                run_rq2 as run)
    elif args.rq == "rq3":
        from .reproduce_rq3 import (RQ3Config as Config, format_rq3 as fmt, plot_rq3 as plot,
                                    run_rq3 as run)
    else:
        from .reproduce_rq4 import (RQ4Config as Config, format_rq4 as fmt, plot_rq4 as plot,
                                    run_rq4 as run)
    try:
        extra = {"task_batchnorm": True} if args.task_batchnorm else {}
        if extra and args.rq != "rq4":
            raise ValueError("--task-batchnorm applies to rq4 only")
        config = Config(setting=args.setting, seeds=tuple(args.seeds), epochs=args.epochs,
                        device=args.device, data_root=args.data_root, **extra)
    except ValueError as exc:
        print(f"neuslice reproduce {args.rq}: {exc}", file=sys.stderr)
        return 2
    data = SETTINGS[args.setting].data
    if data in DISK_DATASETS:  # fail fast, before any training, without data or torchvision
        try:
            setting_data(data, args.seeds[0], args.data_root)
        except (ImportError, FileNotFoundError) as exc:
            print(f"neuslice reproduce {args.rq} --setting {args.setting}: {exc}",
                  file=sys.stderr)
            return 2
    rows = run(config)
    text = fmt(rows, args.setting)
    print(text)
    print(f"({time.perf_counter() - t0:.0f}s)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"{args.rq}_{args.setting}")
        with open(stem + ".txt", "w") as f:
            f.write(text + "\n")
        try:
            plot(rows, args.setting, stem + ".png")
        except ImportError as exc:
            print(f"neuslice reproduce {args.rq}: no plot written ({exc})", file=sys.stderr)
            print(f"table: {stem}.txt")
        else:
            print(f"table: {stem}.txt\nplot: {stem}.png")
    return 0


def _info(_args: argparse.Namespace) -> int:
    from ..info import main as info_main

    return info_main()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neuslice", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train (or reuse) an MLP on MNIST-5k, profile, slice with "
                                    "all strategies and metrics, print the table, write a plot")
    d.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    d.add_argument("--dataset", default="mnist5k", choices=["mnist5k", "digits"])
    d.add_argument("--epochs", type=int, default=10)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--batch-size", type=int, default=256)
    d.add_argument("--random-repeats", type=int, default=3)
    d.add_argument("--recalibrate-bn", action="store_true",
                   help="evaluate every slice with BatchNorm statistics re-estimated under it "
                        "(neuslice.recalibrate_batchnorm; for models with BatchNorm)")
    d.add_argument("--out", default="neuslice-demo", help="output folder (default %(default)s)")
    d.add_argument("--cache-dir", default=None, help="trained-model cache folder")
    d.set_defaults(func=_demo)
    r = sub.add_parser("reproduce", help="reproduce a table of the paper on bundled real data "
                                         "(or CIFAR-10 files you provide)")
    r.add_argument("rq", choices=["rq2", "rq3", "rq4"])
    r.add_argument("--setting", default="mlp-mnist",
                   choices=["mlp-mnist", "mlp-digits", "cnn-mnist", "vgg16-cifar10",
                            "resnet18-cifar10"],
                   help="model and data (default %(default)s); the *-cifar10 settings read "
                        "CIFAR-10 from --data-root or $NEUSLICE_DATA and want a GPU")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--epochs", type=int, default=None,
                   help="training epochs (RQ4: per task); default: the setting's (10 on the "
                        "bundled data, 30 (RQ2/RQ3) and 10 (RQ4) on CIFAR-10)")
    r.add_argument("--data-root", default=None, metavar="DIR",
                   help="folder holding cifar-10-batches-py/ (torchvision's layout; never "
                        "downloaded) for the *-cifar10 settings; default: $NEUSLICE_DATA")
    r.add_argument("--device", default=None,
                   help="torch device, e.g. cuda, cuda:1 or cpu (default: cuda when "
                        "available, else cpu)")
    r.add_argument("--out", default=None, help="folder to write the table (.txt) and the plot "
                                               "(.png) to")
    r.add_argument("--task-batchnorm", action="store_true",
                   help="rq4: keep each task's BatchNorm statistics re-estimated under its mask "
                        "and use them for its masked inference")
    r.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own choice); 1 is much faster "
                        "for these small models on a CPU that other jobs share")
    r.set_defaults(func=_reproduce)
    i = sub.add_parser("info", help="print versions and which op backends are live")
    i.set_defaults(func=_info)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
