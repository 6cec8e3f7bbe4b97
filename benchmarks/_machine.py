"""One-line description of the machine a benchmark ran on, stored next to its figures.

    from _machine import machine_info, machine_line
    machine_info(threads)  # {"platform": ..., "cpu": ..., "cpus": ..., ..., "line": "..."}
    machine_line(threads)  # the same as one line of text

Benchmarks put ``machine_info()`` (or the line) in their JSON so that README
tables can say where a number came from. Plain data only; nothing here fails.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["machine_info", "machine_line", "shown_path"]

_PROJECT = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """Platform, CPU model and counts, Python and torch versions, torch threads, date, and ``line``.

    ``threads``: the intra-op thread count the benchmark used (default: torch's current one).
    """
    try:
        import torch

        torch_version = torch.__version__
        if threads is None:
            threads = torch.get_num_threads()
        cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # torch missing or broken: still describe the machine
        torch_version, cuda = "unavailable", None
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "usable_cpus": _usable_cpus(),
        "python": platform.python_version(),
        "torch": torch_version,
        "threads": threads,
        "cuda": cuda,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    info["load_1min"] = round(load, 2) if load is not None else None
    info["line"] = (
        f"{info['platform']}; {info['cpu']}; {info['cpus']} CPUs ({info['usable_cpus']} usable); "
        f"Python {info['python']}; torch {info['torch']}; {threads} threads"
        + (f"; {cuda}" if cuda else "")
        + f"; {info['date']}"
        + (f"; load {info['load_1min']}" if load is not None else "")
    )
    return info


def machine_line(threads: int | None = None) -> str:
    """``machine_info(threads)["line"]``: everything on one line."""
    return str(machine_info(threads)["line"])


def shown_path(path: str | os.PathLike[str]) -> str:
    """A path as results quote it: relative to the project when inside it (no machine paths in results)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(_PROJECT))
    except ValueError:
        return str(p)
