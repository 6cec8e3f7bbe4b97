"""Analysis of a finished (or running) search: Pareto front, hypervolume, knee, plan selection.

Plain data only: functions take a run directory or the ``trials.csv`` frame and
return numbers, dataclasses and DataFrames. Drawing lives in ``report.py``.

Both objectives are maximised: validation top-1 accuracy (percent) and the
compression rate. Distances and areas use ``log10(rate)``, so that going from
10x to 20x counts as much as going from 20x to 40x.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd

from clipq_search.analysis.rundir import load_baseline_info, load_final_metrics, load_run_info, load_trials
from clipq_search.errors import ClipQError, ConfigError

__all__ = [
    "COMPLETE",
    "HV_REF_DROP",
    "Candidates",
    "ParetoInfo",
    "RunData",
    "Selection",
    "boundary_candidates",
    "complete_trials",
    "hypervolume",
    "hypervolume_history",
    "is_multi_fidelity",
    "knee_point",
    "layer_names",
    "load_run",
    "pareto_info",
    "pareto_mask",
    "pareto_ranks",
    "pareto_table",
    "plan_of",
    "rule_mask",
    "select_max_drop",
    "select_min_rate",
    "select_trial",
]

COMPLETE, FAIL, INTERRUPTED = "COMPLETE", "FAIL", "INTERRUPTED"
PENDING_STATES = ("RUNNING", "WAITING")
# Default hypervolume reference: this many accuracy points below the dense baseline, at rate 1x.
HV_REF_DROP = 10.0
# Float slack for "drop <= max_drop": 87.2 - 86.2 is 1.0000000000000142 in binary floating point.
_EPS = 1e-9




def layer_names(df: pd.DataFrame, order: Sequence[str] | None = None) -> list[str]:
    """Layers with a ``p:<layer>`` column, in ``order`` (e.g. run.json's list) first, then as in the CSV."""
    in_csv = [c[2:] for c in df.columns if c.startswith("p:")]
    first = [name for name in (order or []) if name in in_csv]
    return first + [name for name in in_csv if name not in first]


# -- pure Pareto math on arrays ------------------------------------------------------------------


def _as_points(acc: Any, rate: Any) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(acc, dtype=float).reshape(-1)
    r = np.asarray(rate, dtype=float).reshape(-1)
    if a.shape != r.shape:
        raise ValueError(f"acc and rate must have the same length, got {a.size} and {r.size}")
    if np.isnan(a).any() or np.isnan(r).any():
        raise ValueError("acc and rate must not contain NaN; filter the trials first (see complete_trials)")
    return a, r


def pareto_mask(acc: Any, rate: Any) -> np.ndarray:
    """Boolean mask of the non-dominated points, maximising both ``acc`` and ``rate``.

    A point is dominated when another is >= on both objectives and > on at least one, so exact
    duplicates of a front point are all on the front. O(n log n): sort by accuracy, then a prefix max.
    """
    a, r = _as_points(acc, rate)
    n = a.size
    mask = np.zeros(n, dtype=bool)
    if n == 0:
        return mask
    order = np.lexsort((-r, -a))  # accuracy descending, then rate descending
    a_s, r_s = a[order], r[order]
    starts = np.flatnonzero(np.r_[True, a_s[1:] != a_s[:-1]])  # first index of each equal-accuracy group
    group_max = r_s[starts]  # rates are descending inside a group
    group = np.repeat(np.arange(starts.size), np.diff(np.r_[starts, n]))
    # Highest rate among strictly more accurate points: those dominate anything with a rate <= it.
    better = np.r_[-np.inf, np.maximum.accumulate(group_max)[:-1]]
    keep = (r_s == group_max[group]) & (r_s > better[group])
    mask[order] = keep
    return mask


def pareto_ranks(acc: Any, rate: Any) -> np.ndarray:
    """Non-domination rank of each point: 0 for the front, 1 for the front once 0 is removed, ...

    O(n log n): in order of accuracy descending, a point joins the first front whose latest member
    does not dominate it; those latest members form a decreasing sequence, so a binary search finds it.
    """
    a, r = _as_points(acc, rate)
    ranks = np.zeros(a.size, dtype=np.int64)
    # Keys (-rate, -acc) of each front's latest member, increasing with the front index. Given the
    # processing order, that member dominates the new point exactly when its key is smaller.
    keys: list[tuple[float, float]] = []
    for i in np.lexsort((-r, -a)):
        key = (-r[i], -a[i])
        k = bisect.bisect_left(keys, key)
        if k == len(keys):
            keys.append(key)
        else:
            keys[k] = key
        ranks[i] = k
    return ranks


def hypervolume(acc: Any, rate: Any, ref_acc: float, ref_log_rate: float = 0.0) -> float:
    """Area dominated by the points in (accuracy, log10 rate) space, above the reference point.

    Only points strictly better than ``(ref_acc, ref_log_rate)`` on both objectives count.
    Units: accuracy points times decades of compression rate.
    """
    a, r = _as_points(acc, rate)
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.where(r > 0, np.log10(np.where(r > 0, r, 1.0)), -np.inf)
    ok = (a > ref_acc) & (lr > ref_log_rate)
    a, lr = a[ok], lr[ok]
    if a.size == 0:
        return 0.0
    front = pareto_mask(a, lr)
    a, lr = a[front], lr[front]
    order = np.lexsort((a, lr))  # rate ascending; along the front accuracy then descends
    a, lr = a[order], lr[order]
    widths = np.diff(np.r_[ref_log_rate, lr])
    return float(np.sum(widths * (a - ref_acc)))


def knee_point(acc: Any, rate: Any) -> int | None:
    """Index of the front point farthest from the line joining the front's two extreme points.

    Distances are taken in (accuracy, log10 rate) scaled to [0, 1] over the front, and only on the
    side of the ideal corner (high accuracy, high rate): a point bulging away from the line is a good
    trade-off, a point sagging below it is not. None when the front has fewer than three distinct
    points, or when no point lies above the line.
    """
    a, r = _as_points(acc, rate)
    idx = np.flatnonzero(r > 0)
    idx = idx[pareto_mask(a[idx], r[idx])]
    if idx.size < 3:
        return None
    idx = idx[np.lexsort((-a[idx], r[idx]))]  # rate ascending
    x, y = np.log10(r[idx]), a[idx]
    span_x, span_y = x[-1] - x[0], y[0] - y[-1]
    if span_x <= 0 or span_y <= 0:
        return None
    x, y = (x - x[0]) / span_x, (y - y[-1]) / span_y
    # Line from (0, 1) to (1, 0): x + y = 1. Signed distance, positive towards the ideal corner (1, 1).
    dist = (x + y - 1.0) / math.sqrt(2.0)
    best = int(np.argmax(dist))
    return int(idx[best]) if dist[best] > _EPS else None


# -- trials.csv -> Pareto data -------------------------------------------------------------------


def complete_trials(df: pd.DataFrame) -> pd.DataFrame:
    """COMPLETE trials with a finite accuracy and a finite positive rate (the ones analysis counts)."""
    ok = (
        (df["state"] == COMPLETE)
        & np.isfinite(df["val_top1"].to_numpy(dtype=float))
        & np.isfinite(df["rate"].to_numpy(dtype=float))
        & (df["rate"].to_numpy(dtype=float) > 0)
    )
    return df.loc[ok]


@dataclass(frozen=True)
class ParetoInfo:
    """The Pareto analysis of one run's COMPLETE trials.

    ``front`` lists trial numbers by rate ascending. The hypervolume is measured in (accuracy points,
    log10 rate) from the reference point (``ref_acc``, ``ref_log_rate``), i.e. ``ref_drop`` points below
    the dense baseline and rate ``10 ** ref_log_rate``.
    """

    front: tuple[int, ...]
    ranks: Mapping[int, int]
    hypervolume: float
    ref_acc: float
    ref_log_rate: float
    ref_drop: float
    knee: int | None
    baseline_val_top1: float
    n_complete: int
    n_failed: int
    n_interrupted: int
    n_pending: int
    n_total: int

    @property
    def ref_rate(self) -> float:
        return float(10.0**self.ref_log_rate)


def pareto_info(df: pd.DataFrame, baseline_val_top1: float, *, ref_drop: float = HV_REF_DROP) -> ParetoInfo:
    """Front, ranks, hypervolume, knee and trial counts for ``df`` (a ``load_trials`` frame)."""
    done = complete_trials(df)
    numbers = done["number"].to_numpy()
    acc, rate = done["val_top1"].to_numpy(dtype=float), done["rate"].to_numpy(dtype=float)
    ranks = pareto_ranks(acc, rate)
    on_front = ranks == 0
    front = numbers[on_front][np.lexsort((-acc[on_front], rate[on_front]))]
    knee = knee_point(acc, rate)
    ref_acc = float(baseline_val_top1) - ref_drop
    states = df["state"]
    return ParetoInfo(
        front=tuple(int(n) for n in front),
        ranks=MappingProxyType({int(n): int(k) for n, k in zip(numbers, ranks, strict=True)}),
        hypervolume=hypervolume(acc, rate, ref_acc, 0.0),
        ref_acc=ref_acc,
        ref_log_rate=0.0,
        ref_drop=float(ref_drop),
        knee=None if knee is None else int(numbers[knee]),
        baseline_val_top1=float(baseline_val_top1),
        n_complete=len(done),
        n_failed=int((states == FAIL).sum()),
        n_interrupted=int((states == INTERRUPTED).sum()),
        n_pending=int(states.isin(PENDING_STATES).sum()),
        n_total=len(df),
    )


def hypervolume_history(
    df: pd.DataFrame, baseline_val_top1: float, *, ref_drop: float = HV_REF_DROP, within: float = 1.0
) -> pd.DataFrame:
    """Hypervolume and best rate within ``within`` points of the baseline after each finished trial.

    Columns: ``n_finished``, ``number``, ``state``, ``hypervolume``, ``best_rate_within_1pt`` (NaN while no
    trial is close enough). Finished = COMPLETE or FAIL, in completion order (``datetime_complete``,
    then trial number).
    """
    fin = df.loc[df["state"].isin((COMPLETE, FAIL))].sort_values(
        ["datetime_complete", "number"], kind="stable", na_position="last"
    )
    valid = fin.index.isin(complete_trials(fin).index)
    acc = fin["val_top1"].to_numpy(dtype=float)
    rate = fin["rate"].to_numpy(dtype=float)
    ref_acc = float(baseline_val_top1) - ref_drop
    hv = np.zeros(len(fin))
    front_acc = np.empty(0)
    front_rate = np.empty(0)
    for i in range(len(fin)):
        if valid[i]:
            # The front so far plus the new point is enough: dominated points never add area.
            front_acc, front_rate = np.r_[front_acc, acc[i]], np.r_[front_rate, rate[i]]
            keep = pareto_mask(front_acc, front_rate)
            front_acc, front_rate = front_acc[keep], front_rate[keep]
            hv[i] = hypervolume(front_acc, front_rate, ref_acc, 0.0)
        else:
            hv[i] = hv[i - 1] if i else 0.0
    close = valid & (baseline_val_top1 - acc <= within + _EPS)
    best = np.maximum.accumulate(np.where(close, rate, -np.inf)) if len(fin) else np.empty(0)
    return pd.DataFrame(
        {
            "n_finished": np.arange(1, len(fin) + 1, dtype=np.int64),
            "number": fin["number"].to_numpy(dtype=np.int64),
            "state": fin["state"].to_numpy(dtype=object),
            "hypervolume": hv,
            "best_rate_within_1pt": np.where(np.isfinite(best), best, np.nan),
        }
    )


def is_multi_fidelity(df: pd.DataFrame) -> bool:
    """Whether the run's trials ran rung by rung (``trial.rungs``): some reached a rung past the first."""
    return "rung" in df.columns and bool((pd.to_numeric(df["rung"], errors="coerce") > 0).any())


def pareto_table(df: pd.DataFrame, info: ParetoInfo, *, order: Sequence[str] | None = None) -> pd.DataFrame:
    """The Pareto trials (rate ascending): number, rank, knee, val_top1, drop, rate, size_bytes, p:/bits: per layer
    (and, after ``size_bytes``, the ``budget`` of each result in a multi-fidelity run).

    This is what ``pareto.csv`` holds; ``drop`` is baseline val accuracy minus the trial's.
    """
    layers = layer_names(df, order)
    rows = df.set_index("number").loc[list(info.front)] if info.front else df.iloc[:0].set_index("number")
    table = pd.DataFrame(
        {
            "number": np.asarray(info.front, dtype=np.int64),
            "rank": np.asarray([info.ranks[n] for n in info.front], dtype=np.int64),
            "knee": np.asarray([n == info.knee for n in info.front], dtype=bool),
            "val_top1": rows["val_top1"].to_numpy(dtype=float),
            # Rounded so that 87.25 - 86.65 reads 0.6, not 0.5999999999999943.
            "drop": np.round(info.baseline_val_top1 - rows["val_top1"].to_numpy(dtype=float), 6),
            "rate": rows["rate"].to_numpy(dtype=float),
            "size_bytes": pd.array(rows["size_bytes"].to_numpy(dtype=float), dtype="Int64"),
        }
    )
    if is_multi_fidelity(df):  # each plan's result is at the highest budget it reached: say which
        table["budget"] = rows["budget"].to_numpy(dtype=float)
    for layer in layers:
        table[f"p:{layer}"] = rows[f"p:{layer}"].to_numpy(dtype=float)
        bits = rows[f"bits:{layer}"] if f"bits:{layer}" in rows.columns else pd.Series(np.nan, index=rows.index)
        table[f"bits:{layer}"] = pd.array(bits.to_numpy(dtype=float), dtype="Int64")
    return table


def plan_of(df: pd.DataFrame, number: int) -> dict[str, Any]:
    """``{"layers": {layer: {"p": float, "bits": int}}}`` from trial ``number``'s p:/bits: columns."""
    row = _row(df, number)
    layers: dict[str, dict[str, Any]] = {}
    for layer in layer_names(df):
        p, bits = row.get(f"p:{layer}"), row.get(f"bits:{layer}")
        if p is None or bits is None or not (np.isfinite(p) and np.isfinite(bits)):
            continue
        layers[layer] = {"p": float(p), "bits": int(bits)}
    if not layers:
        raise ClipQError(f"trial {number} has no per-layer plan in trials.csv; pick a COMPLETE trial instead")
    return {"layers": layers}


def _row(df: pd.DataFrame, number: int) -> pd.Series:
    hit = df.loc[df["number"] == number]
    if hit.empty:
        raise ClipQError(f"trial {number} does not exist; trials are {_number_list(df['number'])}")
    return hit.iloc[0]


def _number_list(numbers: Any, limit: int = 12) -> str:
    """'0-4, 7, 9-12' for a set of integers, cut after ``limit`` runs with the total count."""
    values = sorted({int(n) for n in numbers})
    if not values:
        return "none"
    runs: list[str] = []
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    text = ", ".join(runs[:limit])
    return f"{text}, ... ({len(values)} in all)" if len(runs) > limit else text


# -- choosing a plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The trial a rule picked (None when none qualifies), and the closest one in that case."""

    trial: int | None
    rule: str
    closest: int | None
    message: str


_NONE_YET = "no complete trial yet; run `run_search.py search` (or wait for the running search to finish one)"


def _check_limit(name: str, value: float, flag: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name}={value!r} is invalid; pass a non-negative number to {flag}")
    return value


def _n_points(value: float) -> str:
    return f"{value:g} point" if value == 1 else f"{value:g} points"


def _describe(row: pd.Series, baseline: float | None = None) -> str:
    acc, rate = float(row["val_top1"]), float(row["rate"])
    drop = "" if baseline is None else f" (drop {baseline - acc:.1f})"
    return f"trial {int(row['number'])} at {acc:.2f}%{drop} with rate {rate:.1f}x"


def select_max_drop(df: pd.DataFrame, baseline_val_top1: float, max_drop: float = 1.0) -> Selection:
    """Highest rate among COMPLETE trials at most ``max_drop`` points below the baseline (tie: higher accuracy)."""
    max_drop = _check_limit("max_drop", max_drop, "--max-drop")
    base = float(baseline_val_top1)
    rule = f"max-drop {max_drop:g}"
    done = complete_trials(df)
    if done.empty:
        return Selection(None, rule, None, _NONE_YET)
    ok = done.loc[rule_mask(done["val_top1"], done["rate"], base, max_drop=max_drop)[0]]
    if ok.empty:
        near = done.sort_values(["val_top1", "rate", "number"], ascending=[False, False, True]).iloc[0]
        return Selection(
            None,
            rule,
            int(near["number"]),
            f"no trial within {_n_points(max_drop)} of the baseline ({base:.2f}%); closest: {_describe(near, base)}; "
            "relax --max-drop or run more trials",
        )
    best = ok.sort_values(["rate", "val_top1", "number"], ascending=[False, False, True]).iloc[0]
    return Selection(
        int(best["number"]),
        rule,
        None,
        f"{_describe(best, base)}: the highest rate within {_n_points(max_drop)} of the baseline ({base:.2f}%)",
    )


def select_min_rate(df: pd.DataFrame, min_rate: float) -> Selection:
    """Best val accuracy among COMPLETE trials with rate >= ``min_rate`` (tie: higher rate)."""
    min_rate = _check_limit("min_rate", min_rate, "--min-rate")
    rule = f"min-rate {min_rate:g}"
    done = complete_trials(df)
    if done.empty:
        return Selection(None, rule, None, _NONE_YET)
    ok = done.loc[rule_mask(done["val_top1"], done["rate"], 0.0, min_rate=min_rate)[0]]
    if ok.empty:
        near = done.sort_values(["rate", "val_top1", "number"], ascending=[False, False, True]).iloc[0]
        return Selection(
            None,
            rule,
            int(near["number"]),
            f"no trial reaches rate {min_rate:g}x; closest: {_describe(near)}; lower --min-rate or run more trials",
        )
    best = ok.sort_values(["val_top1", "rate", "number"], ascending=[False, False, True]).iloc[0]
    return Selection(int(best["number"]), rule, None, f"{_describe(best)}: the best accuracy at rate >= {min_rate:g}x")


def select_trial(df: pd.DataFrame, number: int) -> Selection:
    """Trial ``number`` itself; it must exist and be COMPLETE with finite metrics."""
    row = _row(df, number)
    done = complete_trials(df)
    if int(number) not in set(done["number"].tolist()):
        why, error = str(row["state"]), row.get("error")
        if isinstance(error, str) and error.strip():
            why += f" ({error.strip().splitlines()[0][:120]})"
        raise ClipQError(
            f"trial {number} is {why}, not a complete trial; pick one of the complete trials: "
            f"{_number_list(done['number'])}"
        )
    return Selection(int(number), f"trial {number}", None, _describe(row))


@dataclass(frozen=True)
class Candidates:
    """The trials :func:`boundary_candidates` picks, most promising first, and how each sits against the rule."""

    numbers: tuple[int, ...]
    meets: tuple[bool, ...]  # whether each trial meets the rule (on its own, short-trial metrics)
    ranks: tuple[int, ...]  # each one's non-domination rank (0: on the Pareto front)
    rule: str  # "max-drop 1", "min-rate 20"
    n_front: int  # complete trials on the front
    n_complete: int


def rule_mask(
    acc: Any, rate: Any, baseline_val_top1: float, *, max_drop: float | None = None, min_rate: float | None = None
) -> tuple[np.ndarray, str]:
    """Which points meet an export rule (``min_rate``, else ``max_drop``, default 1 point), and the rule's name.

    The test :func:`select_min_rate` and :func:`select_max_drop` apply: rate >= ``min_rate``, or val
    accuracy at most ``max_drop`` points below ``baseline_val_top1``.
    """
    if max_drop is not None and min_rate is not None:
        raise ConfigError("give one rule: max_drop or min_rate, not both")
    a, r = _as_points(acc, rate)
    if min_rate is not None:
        limit = _check_limit("min_rate", min_rate, "--min-rate")
        return r >= limit * (1 - _EPS), f"min-rate {limit:g}"
    limit = _check_limit("max_drop", 1.0 if max_drop is None else max_drop, "--max-drop")
    return float(baseline_val_top1) - a <= limit + _EPS, f"max-drop {limit:g}"


def boundary_candidates(
    df: pd.DataFrame,
    baseline_val_top1: float,
    k: int,
    *,
    max_drop: float | None = None,
    min_rate: float | None = None,
) -> Candidates:
    """The ``k`` COMPLETE trials nearest the boundary of an export rule: ``min_rate``, else ``max_drop`` (default 1).

    Short trials are a noisy proxy for a full-length run, so the plans worth a full-length run are those
    near the rule's line. Trials are taken front by front (the Pareto front first, then the next
    non-domination ranks while ``k`` is not reached). With max-drop: first the trial the rule picks
    (the least accurate one within the allowed drop), then the trials just beyond the line, nearest first
    (short trials underestimate what a full-length run recovers, so these are the higher rates that may
    pass), then the others within it. With min-rate: the trials at or above the rate, lowest rate first
    (a plan's rate hardly moves at full length, its accuracy does), then those below it. The first
    candidate is therefore what :func:`select_max_drop` / :func:`select_min_rate` pick when a front trial
    qualifies. A plan that several trials ran (the paper strategy may propose one twice) is taken once, at
    its first place in that order. Fewer than ``k`` distinct plans: all of them.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k={k!r} is invalid; give the number of candidates as an integer >= 1")
    done = complete_trials(df)
    acc, rate = done["val_top1"].to_numpy(dtype=float), done["rate"].to_numpy(dtype=float)
    meets, rule = rule_mask(acc, rate, baseline_val_top1, max_drop=max_drop, min_rate=min_rate)
    frame = pd.DataFrame(
        {
            "number": done["number"].to_numpy(dtype=np.int64),
            "acc": acc,
            "rate": rate,
            "rank": pareto_ranks(acc, rate),
            "meets": meets,
        }
    )
    # min-rate: nearest the limit are the lowest rate at or above it and the highest below it;
    # max-drop: the least accurate trial within the allowed drop and the most accurate one beyond it
    by = ["rate", "acc", "number"] if min_rate is not None else ["acc", "rate", "number"]
    order: list[int] = []
    for _, front in frame.groupby("rank", sort=True):
        # ties on the first key: the higher second key (rate, or accuracy), then the lower trial number
        ins = front.loc[front["meets"]].sort_values(by, ascending=[True, False, True], kind="stable")
        outs = front.loc[~front["meets"]].sort_values(by, ascending=[False, False, True], kind="stable")
        inside, outside = ins.index.tolist(), outs.index.tolist()
        if min_rate is not None:
            # a plan's file rate barely moves at full length, its accuracy does: the plans that meet the limit
            order += inside + outside
        else:
            # the rule's own pick (the fallback), then the plans just over the line: short trials
            # underestimate what a full-length run recovers, so those are the ones that can win a higher rate
            order += inside[:1] + outside + inside[1:]
    # one full-length run per distinct plan (NaN as None: NaN never equals itself); without p:/bits: columns
    # (a table of results alone) every trial counts as its own plan
    cols = [f"{kind}:{layer}" for layer in layer_names(done) for kind in ("p", "bits")] or ["number"]
    plans = [
        tuple(None if pd.isna(v) else v for v in row)
        for row in done.reindex(columns=cols).itertuples(index=False, name=None)
    ]
    distinct: list[int] = []
    seen: set[tuple[Any, ...]] = set()
    for i in order:
        if plans[i] not in seen:
            seen.add(plans[i])
            distinct.append(i)
    picked = frame.loc[distinct[:k]]
    return Candidates(
        numbers=tuple(int(n) for n in picked["number"]),
        meets=tuple(bool(m) for m in picked["meets"]),
        ranks=tuple(int(r) for r in picked["rank"]),
        rule=rule,
        n_front=int((frame["rank"] == 0).sum()),
        n_complete=len(frame),
    )


# -- everything a report needs ------------------------------------------------------------------------


@dataclass(frozen=True)
class RunData:
    """One run directory, loaded and analysed: what ``report.py`` draws."""

    run_dir: Path
    run: Mapping[str, Any]
    baseline: Mapping[str, Any]
    trials: pd.DataFrame
    layers: tuple[str, ...]
    info: ParetoInfo
    history: pd.DataFrame
    table: pd.DataFrame
    within_1pt: Selection
    final: Mapping[str, Any] | None
    # The searched units in model order: a group's name with its layers, or a layer alone.
    units: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))


def searched_units(run: Mapping[str, Any], layers: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """run.json's ``units`` (name -> layers, model order) restricted to ``layers``; each layer alone without it."""
    units = run.get("units")
    if isinstance(units, Mapping) and units:
        out = {}
        for key, members in units.items():
            kept = tuple(m for m in members if m in layers) if isinstance(members, list) else ()
            if kept:
                out[str(key)] = kept
        if out:
            return out
    return {layer: (layer,) for layer in layers}


def load_run(run_dir: str | Path) -> RunData:
    """Load ``run_dir`` and compute the Pareto analysis, hypervolume history and table."""
    run_dir = Path(run_dir)
    df = load_trials(run_dir)
    baseline = load_baseline_info(run_dir)
    run = load_run_info(run_dir)
    base = float(baseline["val_top1"])
    order = run.get("layers") if isinstance(run.get("layers"), list) else None
    info = pareto_info(df, base)
    layers = tuple(layer_names(df, order))
    return RunData(
        run_dir=run_dir,
        run=run,
        baseline=baseline,
        trials=df,
        layers=layers,
        info=info,
        history=hypervolume_history(df, base),
        table=pareto_table(df, info, order=order),
        within_1pt=select_max_drop(df, base, 1.0),
        final=load_final_metrics(run_dir),
        units=MappingProxyType(searched_units(run, layers)),
    )
