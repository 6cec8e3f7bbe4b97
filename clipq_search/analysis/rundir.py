"""The run directory ``results/<run>/``: every file name in it, and every reader and writer of it.

    space.yaml      the resolved search space            (written by ``search``)
    baseline.json   the dense baseline's record          (``search``)
    run.json        storage URL, space source, layers    (``search``)
    study.db        the Optuna study (SQLite default)    (``search``)
    trials.csv      one row per trial                    (``search``, after every trial)
    plan.json       the exported plan                    (``export``)
    report.html, pareto.csv                              (``report``)
    final/          plan.json, model.clipq, metrics.json, checkpoints (``final``)

Other modules name these files through this module only.

A run's name is one folder under the results root: letters, digits, ``-``,
``_`` and ``.``, not ``.`` or ``..`` (:func:`check_run_name`). A folder holding
files that clipq-search did not write is never written into (:func:`run_folder`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from clipq_search._io import MiB, read_regular, write_json, write_text
from clipq_search.errors import ClipQError, shown

__all__ = [
    "BASELINE_JSON",
    "FINAL_DIR",
    "METRICS_JSON",
    "MODEL_FILE",
    "PARETO_CSV",
    "PLAN_JSON",
    "REPORT_HTML",
    "RUN_JSON",
    "SPACE_YAML",
    "STUDY_DB",
    "TRIALS_CSV",
    "check_run_dir",
    "check_run_name",
    "default_storage",
    "load_baseline_info",
    "load_final_metrics",
    "load_run_info",
    "load_trials",
    "read_json",
    "require_folder",
    "run_folder",
    "write_run_files",
    "write_trials_csv",
]

SPACE_YAML = "space.yaml"
BASELINE_JSON = "baseline.json"
RUN_JSON = "run.json"
STUDY_DB = "study.db"
TRIALS_CSV = "trials.csv"
PLAN_JSON = "plan.json"
REPORT_HTML = "report.html"
PARETO_CSV = "pareto.csv"
FINAL_DIR = "final"
MODEL_FILE = "model.clipq"
METRICS_JSON = "metrics.json"

_NUMERIC_COLUMNS = ("val_top1", "rate", "size_bytes", "val_loss", "train_seconds", "trial_seconds", "queue_seconds")
_TEXT_COLUMNS = ("state", "node", "source", "error")
_BASE_COLUMNS = ("number", "state", *_NUMERIC_COLUMNS, "node", "source", "error", "datetime_start", "datetime_complete")


RUN_NAME_MAX = 100
_RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")
# What a search writes in a new run folder before run.json (the mark of a run folder): an interrupted
# first search leaves only these, and its rerun goes on in that folder.
_BEFORE_RUN_JSON = (SPACE_YAML, BASELINE_JSON, STUDY_DB)


def check_run_name(name: object, origin: str = "--name") -> str:
    """``name`` when it is one path component of letters, digits, ``-``, ``_`` and ``.``, not ``.`` or ``..``.

    ``origin`` says where the name came from (``--name``, a space's ``name:``) for the message.
    """
    if isinstance(name, str) and _RUN_NAME.fullmatch(name) and name not in (".", "..") and len(name) <= RUN_NAME_MAX:
        return name
    raise ClipQError(
        f"run name {shown(name)} ({origin}) is not allowed: a run name is one folder under --results made of "
        f"letters, digits, '-', '_' and '.' (not '.' or '..', at most {RUN_NAME_MAX} characters); give --name NAME"
    )


def _written_before_run_json(entry: str) -> bool:
    return (
        entry in _BEFORE_RUN_JSON
        or entry.startswith(STUDY_DB + "-")  # SQLite's journal files
        or (entry.startswith(".") and entry.endswith(".tmp"))  # an atomic write that was cut short
    )


def run_folder(results_root: str | Path, name: object, origin: str = "--name") -> Path:
    """``RESULTS_ROOT/NAME`` for a search, after checking the name and that the folder is a run's (or new).

    A folder that exists and is neither empty nor a run folder (no ``run.json``
    and files a search does not write) is refused: a search never writes into,
    or over, files it did not write.
    """
    run_dir = Path(results_root) / check_run_name(name, origin)
    if not run_dir.exists():
        return run_dir
    if not run_dir.is_dir():
        raise ClipQError(f"{run_dir} is a file, not a run folder; give another --name, or move that file away")
    if (run_dir / RUN_JSON).is_file():
        return run_dir
    foreign = sorted(e.name for e in run_dir.iterdir() if not _written_before_run_json(e.name))
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        listed = ", ".join(shown(n, 40) for n in foreign[:3]) + more
        raise ClipQError(
            f"{run_dir} holds files clipq-search did not write ({listed}) and is not a run folder (no {RUN_JSON}); "
            "give another --name, or move that folder away"
        )
    return run_dir


def not_a_run(run_dir: Path) -> ClipQError:
    return ClipQError(f"{run_dir} is not a run directory (no trials.csv); run `run_search.py search` first")


def load_trials(run_dir: str | Path) -> pd.DataFrame:
    """Read ``RUN_DIR/trials.csv`` with numeric metrics, parsed datetimes and integer trial numbers.

    An empty file (a search that has not finished a trial yet) gives an empty frame with the usual columns.
    """
    run_dir = Path(run_dir)
    path = run_dir / TRIALS_CSV
    if not path.is_file():
        raise not_a_run(run_dir)
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        df = pd.DataFrame({c: pd.Series(dtype=object) for c in _BASE_COLUMNS})
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as e:
        fix = "rerun `run_search.py search` to rewrite it"
        raise ClipQError(f"{path} is unreadable ({type(e).__name__}); {fix}") from e
    for col in ("number", "state"):
        if col not in df.columns:
            raise ClipQError(f"{path} has no {col!r} column; it is not a trials.csv written by `run_search.py search`")
    # added at once, and the frame returned consolidated (its columns are replaced one by one below): a frame of
    # many layers' columns would otherwise be fragmented, which pandas warns of on every later insert
    df = df.reindex(columns=[*df.columns, *(c for c in _BASE_COLUMNS if c not in df.columns)])
    numbers = pd.to_numeric(df["number"], errors="coerce")
    if numbers.isna().any():
        raise ClipQError(f"{path} has a non-integer trial number; rerun `run_search.py search` to rewrite it")
    df["number"] = numbers.astype("int64")
    for col in (*_NUMERIC_COLUMNS, *(c for c in df.columns if c.startswith(("p:", "bits:", "kept:")))):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in _TEXT_COLUMNS:
        df[col] = df[col].astype(object).where(df[col].notna(), None)
    df["state"] = df["state"].fillna("UNKNOWN").astype(str)
    for col in ("datetime_start", "datetime_complete"):
        df[col] = pd.to_datetime(df[col], errors="coerce", format="ISO8601")
    return df.sort_values("number", kind="stable").reset_index(drop=True).copy()


JSON_LIMIT = 16 * MiB  # the largest run JSON file read (they are a few kB)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a run's file; one clear error ending in ``what`` (the fix) otherwise."""
    try:
        data = json.loads(read_regular(path, JSON_LIMIT, "JSON file").decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ClipQError(f"{path} is unreadable ({type(e).__name__}); {what}") from e
    if not isinstance(data, dict):
        raise ClipQError(f"{path} does not hold a JSON object; {what}")
    return data


def load_baseline_info(run_dir: str | Path) -> dict[str, Any]:
    """``RUN_DIR/baseline.json`` as a dict; ``val_top1`` is checked to be a number."""
    run_dir = Path(run_dir)
    path = run_dir / BASELINE_JSON
    fix = "rerun `run_search.py search` on this run to rewrite it"
    if not path.is_file():
        if not (run_dir / TRIALS_CSV).is_file():
            raise not_a_run(run_dir)
        raise ClipQError(f"{run_dir} has no baseline.json; {fix}")
    info = read_json(path, fix)
    val = info.get("val_top1")
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
        raise ClipQError(f"{path} has val_top1={val!r}, not a number; {fix}")
    return info


def load_run_info(run_dir: str | Path) -> dict[str, Any]:
    """``RUN_DIR/run.json`` as a dict (``{"name": <dir name>}`` when the file is absent)."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_JSON
    if not path.is_file():
        return {"name": run_dir.resolve().name}
    info = read_json(path, "rerun `run_search.py search` on this run to rewrite it")
    info.setdefault("name", run_dir.resolve().name)
    return info


def load_final_metrics(run_dir: str | Path) -> dict[str, Any] | None:
    """``RUN_DIR/final/metrics.json`` as a dict, or None when `final` has not been run."""
    path = Path(run_dir) / FINAL_DIR / METRICS_JSON
    if not path.is_file():
        return None
    return read_json(path, "rerun `run_search.py final` to rewrite it")


def require_folder(run_dir: Path) -> None:
    """One clear error when ``run_dir`` is missing or a file."""
    if not run_dir.is_dir():
        what = "is a file, not a folder" if run_dir.exists() else "does not exist"
        raise ClipQError(f"{run_dir} {what}; give a run directory made by `clipq-search search` (results/<name>)")


def check_run_dir(run_dir: Path) -> None:
    """One clear error when ``run_dir`` is not a search run."""
    require_folder(run_dir)
    for needed in (RUN_JSON, SPACE_YAML, BASELINE_JSON):
        if not (run_dir / needed).is_file():
            raise ClipQError(f"{run_dir} is not a run directory (no {needed}); run `clipq-search search` first")


def default_storage(run_dir: Path) -> str:
    """The run's own SQLite study file as an Optuna storage URL."""
    return f"sqlite:///{(run_dir / STUDY_DB).resolve()}"


def write_run_files(run_dir: Path, *, space_yaml: str, baseline: dict[str, Any], run_info: dict[str, Any]) -> None:
    """``space.yaml``, ``baseline.json`` and ``run.json``, each written atomically."""
    write_text(run_dir / SPACE_YAML, space_yaml)
    write_json(run_dir / BASELINE_JSON, baseline)
    write_json(run_dir / RUN_JSON, run_info)


def write_trials_csv(run_dir: Path, df: pd.DataFrame) -> None:
    """``trials.csv`` from the study's trials frame, written atomically."""
    write_text(run_dir / TRIALS_CSV, df.to_csv(index=False))
