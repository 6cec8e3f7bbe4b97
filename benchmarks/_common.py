"""Start of the benchmarks that train on Fashion-MNIST: threads, device and data, or one error line; dense baselines.

    from _common import dense_baseline, fashion_setup
    threads, device, splits = fashion_setup(args.threads, args.root, args.device)
    model, source = dense_baseline("lenet5", splits, device, seed=0, log=print)

A missing dataset or a bad ``--threads``/``--device`` prints ``error: ...`` and
exits with status 2, as the command line does.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from clipq_search.errors import ClipQError
from clipq_search.training.data import DatasetSpec, load_dataset
from clipq_search.training.loop import DEFAULT_PRETRAIN, configure_threads, load_state_dict_file, select_device, train
from clipq_search.training.models import build_model

__all__ = ["SPACES", "cached_baseline", "dense_baseline", "fashion_setup", "start"]

ROOT = Path(__file__).resolve().parent.parent
SPACES = {"lenet300": "lenet300_fashion.yaml", "lenet5": "lenet5_fashion.yaml"}


def fashion_setup(threads: int, root: str, device: str = "cpu") -> tuple[int, Any, Any]:
    """``(threads used, torch device, Fashion-MNIST splits)``; exits 2 with one line on bad input."""
    try:
        used = configure_threads(threads)
        dev = select_device(device)
        splits = load_dataset(DatasetSpec("fashion-mnist", root=root))
    except ClipQError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return used, dev, splits


def start(benchmark: str, args: Any, argv: list[str] | None) -> tuple[Any, Any, dict[str, Any]]:
    """Threads, device and data from ``args`` (``--threads``, ``--root``, ``--device``); the machine line printed;
    returns the device, the splits and the head of the results: benchmark, machine, command."""
    from _machine import machine_line

    threads, device, splits = fashion_setup(args.threads, args.root, args.device)
    machine = machine_line(threads)
    print(machine, flush=True)
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    return device, splits, {"benchmark": benchmark, "machine": machine, "command": command}


def cached_baseline(model_name: str, seed: int, log: Callable[[str], None] = print) -> Path | None:
    """A results/baselines checkpoint of the shipped space when it is exactly DEFAULT_PRETRAIN, seed, default split."""
    try:
        from clipq_search.search.space import load_space
        from clipq_search.search.trial import baseline_paths, dataset_spec, train_config

        space = load_space(ROOT / "search_spaces" / SPACES[model_name])
        ckpt, meta = baseline_paths(space, ROOT / "results")
        if not (ckpt.is_file() and meta.is_file()):
            return None
        info = json.loads(meta.read_text())
        wanted = dataclasses.replace(DEFAULT_PRETRAIN[model_name], seed=seed)
        if (
            space.baseline.checkpoint
            or train_config(space, "baseline") != wanted
            or dataset_spec(space) != DatasetSpec("fashion-mnist")
            or info.get("fingerprint") != space.fingerprint("model", "dataset", "baseline")
            or info.get("checkpoint_bytes") != ckpt.stat().st_size
        ):
            return None
        return ckpt
    except Exception as exc:  # noqa: BLE001 - any doubt: train instead
        log(f"  (no usable cached baseline: {type(exc).__name__}: {exc})")
        return None


def dense_baseline(
    model_name: str, splits: Any, device: Any, *, seed: int, use_cache: bool = True,
    log: Callable[[str], None] = print, epochs: float | None = None,
) -> tuple[nn.Module, str]:
    """The dense ``model_name`` trained with its DEFAULT_PRETRAIN recipe and ``seed`` (the cached one when it
    matches), on the CPU; and where it came from. ``epochs`` shortens the recipe (never cached)."""
    model = build_model(model_name, num_classes=splits.num_classes, in_channels=splits.in_channels,
                        image_size=splits.image_size)
    ckpt = cached_baseline(model_name, seed, log) if use_cache and epochs is None else None
    pre = dataclasses.replace(DEFAULT_PRETRAIN[model_name], seed=seed)
    if epochs is not None:
        pre = dataclasses.replace(pre, epochs=epochs)
    if ckpt is not None:
        load_state_dict_file(model, ckpt)
        source = f"cached {ckpt.relative_to(ROOT)} (DEFAULT_PRETRAIN, seed {seed})"
        log(f"{model_name}: baseline from {source}")
    else:
        log(f"{model_name}: training the dense baseline, {pre.epochs:g} epochs (DEFAULT_PRETRAIN, seed {seed})")
        train(model, splits.train, pre, device=device, val_data=splits.val, progress=False, desc="pretrain",
              on_epoch_end=lambda r: log(f"    pretrain epoch {r['epoch']:g}: val {r['val_top1']:.2f}%, "
                                         f"{r['seconds']:.1f} s"))
        source = f"trained here (DEFAULT_PRETRAIN, seed {seed})"
    return model.cpu(), source
