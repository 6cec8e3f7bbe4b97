"""Command implementations that need the training and search stack (registered into the CLI)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from clipq_search.errors import ClipQError, shown

if TYPE_CHECKING:
    from clipq_search.search.space import Space


def add_overrides(p: argparse.ArgumentParser, help_text: str) -> None:
    """The repeatable ``--set KEY.PATH=VALUE`` option (into ``args.overrides``)."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help=help_text)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _check_results_root(root: str) -> None:
    """``--results`` must be (or be creatable as) a folder this user can write to."""
    import os

    path = Path(root)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ClipQError(f"--results {root}: {existing} is a file, not a folder; give a folder for the results")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ClipQError(f"--results {root}: {existing} is not writable here; give a folder you can write to")


def _prepare(args: argparse.Namespace, *, search: bool, address: str | None = None) -> Space:
    """Load the space and check every input of the command, before any training, Ray start or write.

    Cheap checks first: ``address`` answers and takes this shell's token (when given), ``--results``, the
    space file and its ``--set`` values; then what the space names (dataset,
    model, layers). A ``search`` checks those itself (``run_search``, once,
    with the run's name, cluster and storage): here only the space is read.
    """
    if address:
        from clipq_search.search.cluster import check_address, check_auth

        check_address(address)
        check_auth(address)
    _check_results_root(args.results)
    from clipq_search.search.space import load_space  # imports torch: after the checks that need none

    space = load_space(args.space, args.overrides)
    if not search:
        from clipq_search.search.trial import check_space

        check_space(space)
    return space


def cmd_pretrain(args: argparse.Namespace) -> None:
    space = _prepare(args, search=False, address=args.address)
    from clipq_search.search.trial import ensure_baseline

    b = ensure_baseline(space, args.results, log=_log, address=args.address)
    took = " (cached)" if b.cached else f" in {b.seconds:.0f}s"
    top5 = f", top-5 {b.test_top5:.2f}%" if b.test_top5 is not None else ""
    print(
        f"baseline {b.model} on {b.dataset}{took}: val {b.val_top1:.2f}%, test {b.test_top1:.2f}%{top5}"
        f"  -> {b.checkpoint}"
    )


def cmd_search(args: argparse.Namespace) -> None:
    space = _prepare(args, search=True, address=args.address)
    from clipq_search.search.study import run_search

    run_search(
        space,
        results_root=args.results,
        name=args.name,
        trials=args.trials,
        concurrency=args.concurrency,
        sampler=args.sampler,
        seed=args.seed,
        address=args.address,
        storage=args.storage,
        inject_failure=[int(x) for x in args.inject_failure.split(",")] if args.inject_failure else None,
        log=_log,
    )


def cmd_report(args: argparse.Namespace) -> None:
    from clipq_search.analysis.report import write_report
    from clipq_search.analysis.rundir import require_folder

    run_dir = Path(args.run_dir)
    require_folder(run_dir)
    html, csv = write_report(run_dir)
    print(f"wrote {html} and {csv}")


def cmd_export(args: argparse.Namespace) -> None:
    from clipq_search.search.final import export_plan

    out = export_plan(
        Path(args.run_dir), max_drop=args.max_drop, min_rate=args.min_rate, trial=args.trial, out=args.out, log=_log
    )
    print(f"wrote {out}")


def cmd_final(args: argparse.Namespace) -> None:
    from clipq_search.search.final import run_final

    run_final(
        Path(args.run_dir),
        config=args.config,
        trial=args.trial,
        overrides=args.overrides,
        address=args.address,
        force=args.force,
        control=args.control,
        workers=args.workers,
        top=args.top,
        max_drop=args.max_drop,
        min_rate=args.min_rate,
        log=_log,
    )


def cmd_demo(args: argparse.Namespace) -> None:
    """pretrain -> search -> report -> export -> final on one space."""
    space = _prepare(args, search=True)
    from clipq_search.analysis.report import write_report
    from clipq_search.search.final import export_plan, run_final
    from clipq_search.search.study import run_search

    summary = run_search(space, results_root=args.results, name=args.name, log=_log)
    html, _ = write_report(summary.run_dir)
    _log(f"report: {html}")
    plan_path = export_plan(summary.run_dir, log=_log)
    _log(f"exported plan: {plan_path}")
    # the chain's own final: a rerun of demo replaces the final of its earlier plan
    run_final(summary.run_dir, config=str(plan_path), overrides=[], force=True, log=_log)
    html, _ = write_report(summary.run_dir)
    _log(f"report with the final result: {html}")


def cmd_cluster(args: argparse.Namespace) -> None:
    """Each node of the cluster (or of a local instance): resources, torch and CUDA, and whether its workers
    import the package (shipped through Ray's runtime_env) and, with --space, read the space's dataset.root."""
    from clipq_search.search.cluster import (
        check_address,
        check_nodes,
        format_node,
        init_ray,
        node_reports,
        nodes_summary,
    )

    root, needed = None, False
    if args.space:
        from clipq_search.search.space import load_space
        from clipq_search.search.trial import dataset_spec

        spec = dataset_spec(load_space(args.space, args.overrides))
        root, needed = spec.resolved_root, spec.name == "imagefolder"
    if args.address:
        check_address(args.address)
        init_ray(args.address, 1, 0, 0, _log, check_versions=False)
    else:
        import torch

        init_ray(None, 1, 0, 1 if torch.cuda.is_available() else 0, _log)  # GPUs: Ray counts this machine's
    reports = node_reports(root)
    for r in reports:
        print(format_node(r))
    where = args.address or "local"
    check_nodes(reports, where, 0, 0)
    if needed:
        unread = [r.name for r in reports if r.dataset_ok is False]
        if unread:
            raise ClipQError(
                f"{', '.join(unread)} cannot read dataset.root {root}; image folders must be at the same path on "
                "every node"
            )
    elif root is not None:
        print(f"dataset {spec.name}: shipped from this machine through Ray's object store; nodes need no copy")
    print(f"ok: {nodes_summary(reports)}")


def cmd_spaces(args: argparse.Namespace) -> None:
    from clipq_search.search.space import list_presets

    presets = list_presets()
    width = max(len(name) for name, _ in presets)
    for name, description in presets:
        print(f"{name:<{width}}  {description}")
    print("use a name in place of a space file, e.g. clipq-search search smoke; "
          "clipq-search init MODEL writes a space of your own")


def cmd_init(args: argparse.Namespace) -> None:
    from clipq_search._io import write_text
    from clipq_search.search.space import load_space
    from clipq_search.search.starter import starter_space

    text = starter_space(args.model, args.dataset)
    out = Path(args.out) if args.out else None
    if out is None:
        print(text, end="")
        return
    if out.exists() and not args.force:
        raise ClipQError(f"--out {out} exists; give another file name or --force to replace it")
    if out.parent != Path() and not out.parent.is_dir():
        raise ClipQError(f"--out {out}: folder {out.parent} does not exist; create it or give another path")
    write_text(out, text)
    load_space(out)  # what was written loads as a space
    print(f"wrote {out}; edit it, then: clipq-search search {out}")


def _nonneg_float(text: str) -> float:
    """argparse type: a number >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a number") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"{shown(text)} must be >= 0")
    return v


def _seed_int(text: str) -> int:
    """argparse type: a sampler seed."""
    from clipq_search.search.space import SEED_MAX

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not an integer") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{shown(text)} is out of range; a seed is an integer in [0, {SEED_MAX}]")
    return v


def register(sub: argparse._SubParsersAction, add_space_args: Callable, positive_int: Callable) -> None:
    """Add the pretrain / search / report / export / final / demo / cluster sub-commands."""
    from clipq_search.search.space import SAMPLERS

    p = sub.add_parser("spaces", help="list the shipped search spaces (presets)")
    p.set_defaults(func=cmd_spaces)

    p = sub.add_parser("init", help="write a commented starter search space for a model")
    p.add_argument("model", help="registered name (lenet300, ...), torchvision:NAME, timm:NAME or module:factory")
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, mnist, cifar10 or imagefolder")
    p.add_argument("--out", help="file to write (default: print to standard output)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("pretrain", help="train (or reuse) the dense baseline a space names")
    add_space_args(p)
    p.add_argument("--address", help="Ray cluster address HOST:PORT (default: a private local Ray instance)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("search", help="run or resume a search (Optuna + Ray Tune)")
    add_space_args(p)
    p.add_argument("--trials", type=positive_int, help="total finished trials wanted (default: search.trials)")
    p.add_argument("--concurrency", type=positive_int, help="trials at once (default: search.concurrency)")
    p.add_argument("--sampler", choices=SAMPLERS, help="default: search.sampler")
    p.add_argument("--seed", type=_seed_int, help="sampler seed (default: search.seed)")
    p.add_argument("--name", help="run name: results/<name>/ (default: the space's name)")
    p.add_argument("--address", help="Ray cluster address HOST:PORT (default: a private local Ray instance)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///<run dir>/study.db)")
    p.add_argument("--inject-failure", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("report", help="write report.html and pareto.csv for a run")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write the chosen plan as JSON")
    p.add_argument("run_dir")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--max-drop", type=_nonneg_float, help="highest rate within X points of the baseline (default 1.0)")
    g.add_argument("--min-rate", type=_nonneg_float, help="best accuracy with rate at least R")
    g.add_argument("--trial", type=int, help="a given trial number")
    p.add_argument("--out", help="output file (default: <run dir>/plan.json)")
    p.set_defaults(func=cmd_export)

    _add_final(sub, positive_int)

    p = sub.add_parser("demo", help="pretrain, search, report, export and final in one go")
    add_space_args(p)
    p.add_argument("--name", help="run name (default: the space's name)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("cluster", help="list the Ray cluster's nodes: resources, torch, CUDA, package, dataset")
    p.add_argument("--address", help="Ray cluster address HOST:PORT (default: a private local Ray instance)")
    p.add_argument("--space", help="also check that every node reads this space's dataset.root")
    add_overrides(p, "override a value of --space, e.g. --set dataset.root=/data/imagenet (repeatable)")
    p.set_defaults(func=cmd_cluster)


def _add_final(sub: argparse._SubParsersAction, positive_int: Callable) -> None:
    """The ``final`` sub-command: which plan (a file, a trial, a rule, the rule's top K), how, where."""
    p = sub.add_parser("final", help="full-length CLIP-Q fine-tune of a plan -> final/model.clipq")
    p.add_argument("run_dir")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", help="plan JSON (default: what `export` picks, by --max-drop or --min-rate)")
    g.add_argument("--trial", type=int, help="the plan of this trial number (as `export --trial N` would pick)")
    # The rules choose among the run's trials: they go with --top, not with --config or --trial (run_final says so).
    g = p.add_mutually_exclusive_group()
    g.add_argument("--max-drop", type=_nonneg_float, help="as export: highest rate within X points of the baseline "
                   "(default 1.0; a rule chooses among the run's trials: not with --config or --trial)")
    g.add_argument("--min-rate", type=_nonneg_float, help="as export: best accuracy with rate at least R "
                   "(not with --config or --trial)")
    p.add_argument(
        "--top", type=positive_int, metavar="K",
        help="fine-tune the K trials nearest the rule's boundary in parallel and keep the one the rule picks on "
        "full-length val accuracy (default 1: the rule's pick on the short trials)",
    )
    add_overrides(p, "override a value of the run's space, e.g. --set final.train.epochs=10 (repeatable)")
    p.add_argument("--address", help="Ray cluster address (default: local)")
    p.add_argument("--force", action="store_true", help="replace a finished final run of another plan or setup")
    p.add_argument(
        "--no-control", dest="control", action="store_false",
        help="skip the dense control run (the baseline fine-tuned as long, a reference only): less compute",
    )
    p.add_argument(
        "--workers", type=positive_int, help="data-parallel workers of each run (Ray Train DDP; default final.workers)"
    )
    p.set_defaults(func=cmd_final)
