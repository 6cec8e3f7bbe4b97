"""Start of the benchmarks that train on Fashion-MNIST: threads, device and data, or one error line.

    from _common import fashion_setup
    threads, device, splits = fashion_setup(args.threads, args.root, args.device)

A missing dataset or a bad ``--threads``/``--device`` prints ``error: ...`` and
exits with status 2, as the command line does.
"""

from __future__ import annotations

import sys
from typing import Any

from clipq_search.errors import ClipQError
from clipq_search.training.data import DatasetSpec, load_dataset
from clipq_search.training.loop import configure_threads, select_device

__all__ = ["fashion_setup"]


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
