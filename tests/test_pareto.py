from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clipq_search.analysis.pareto import (
    hypervolume,
    hypervolume_history,
    knee_point,
    load_run,
    pareto_info,
    pareto_mask,
    pareto_ranks,
    pareto_table,
    plan_of,
    select_max_drop,
    select_min_rate,
    select_trial,
)
from clipq_search.analysis.rundir import load_baseline_info, load_trials
from clipq_search.errors import ClipQError, ConfigError

BASELINE = 87.25
LAYERS = ("conv1", "features.0", "fc")


# -- a synthetic run directory (shared with test_report) ----------------------------------------------


def trials_frame(
    n: int,
    *,
    seed: int = 0,
    n_failed: int = 0,
    n_running: int = 0,
    layers: Sequence[str] = LAYERS,
    baseline: float = BASELINE,
) -> pd.DataFrame:
    """A trials.csv-shaped frame: ``n`` COMPLETE trials on a noisy front, then failed, then running ones."""
    rng = np.random.default_rng(seed)
    t0 = datetime(2026, 1, 1, 12, 0, 0)
    rows = []
    total = n + n_failed + n_running
    # Completion order differs from trial numbers, as with concurrent trials.
    finish = rng.permutation(n + n_failed)
    for i in range(total):
        state = "COMPLETE" if i < n else "FAIL" if i < n + n_failed else "RUNNING"
        log_rate = rng.uniform(0.3, 2.0)
        acc = round(baseline + 0.5 - 2.5 * (log_rate - 0.3) ** 2 - rng.exponential(1.0), 2)
        row: dict[str, object] = {
            "number": i,
            "state": state,
            "val_top1": acc if state == "COMPLETE" else None,
            "rate": 10**log_rate if state == "COMPLETE" else None,
            "size_bytes": int(1_000_000 / 10**log_rate) if state == "COMPLETE" else None,
            "val_loss": 0.4 if state == "COMPLETE" else None,
            "train_seconds": 3.0 if state == "COMPLETE" else None,
            "trial_seconds": 3.5 if state == "COMPLETE" else None,
            "node": "vm/abc",
            "source": "paper" if i == 0 else "sampler",
            "error": f"RuntimeError: CUDA out of memory in trial {i}" if state == "FAIL" else None,
            "datetime_start": t0 + timedelta(seconds=i),
            "datetime_complete": t0 + timedelta(seconds=10 + int(finish[i])) if state != "RUNNING" else None,
        }
        for layer in layers:
            row[f"p:{layer}"] = float(rng.uniform(0.0, 0.95))
            row[f"bits:{layer}"] = int(rng.integers(2, 9))
        for layer in layers:
            row[f"kept:{layer}"] = float(rng.uniform(0.05, 1.0))
        for layer in layers:
            row[f"param:p:{layer}"] = row[f"p:{layer}"]
        rows.append(row)
    return pd.DataFrame(rows)


def make_run(
    root: Path,
    df: pd.DataFrame | None,
    *,
    final: dict[str, object] | None = None,
    name: str = "synthetic",
    layers: Sequence[str] = LAYERS,
    units: dict[str, list[str]] | None = None,
) -> Path:
    """Write trials.csv (None: an empty file), baseline.json, run.json and optionally final/metrics.json."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "trials.csv").write_text("" if df is None else df.to_csv(index=False))
    baseline = {
        "checkpoint": "/tmp/base.pt",
        "val_top1": BASELINE,
        "test_top1": 87.21,
        "test_top5": 99.75,
        "seconds": 41.2,
        "model": "lenet5",
        "dataset": "fashion-mnist",
        "fingerprint": "8964304a9c24",
    }
    (root / "baseline.json").write_text(json.dumps(baseline))
    run = {
        "storage": f"sqlite:///{root}/study.db",
        "space_source": "search_spaces/x.yaml",
        "name": name,
        "layers": list(layers),
    }
    if units is not None:
        run["units"] = units
    (root / "run.json").write_text(json.dumps(run))
    if final is not None:
        (root / "final").mkdir(exist_ok=True)
        (root / "final" / "metrics.json").write_text(json.dumps(final))
    return root


# -- brute-force references -------------------------------------------------------------------


def brute_mask(a: np.ndarray, r: np.ndarray) -> np.ndarray:
    n = len(a)
    out = np.ones(n, dtype=bool)
    for i in range(n):
        for j in range(n):
            if a[j] >= a[i] and r[j] >= r[i] and (a[j] > a[i] or r[j] > r[i]):
                out[i] = False
                break
    return out


def brute_ranks(a: np.ndarray, r: np.ndarray) -> np.ndarray:
    ranks = np.full(len(a), -1)
    left = np.arange(len(a))
    k = 0
    while left.size:
        m = brute_mask(a[left], r[left])
        ranks[left[m]] = k
        left = left[~m]
        k += 1
    return ranks


def brute_hypervolume(a: np.ndarray, lr: np.ndarray, ref_a: float, ref_lr: float) -> float:
    """Exact area of the union of boxes [ref, point] on the grid the points' coordinates make."""
    ok = (a > ref_a) & (lr > ref_lr)
    a, lr = a[ok], lr[ok]
    if a.size == 0:
        return 0.0
    xs, ys = np.unique(np.r_[ref_lr, lr]), np.unique(np.r_[ref_a, a])
    area = 0.0
    for x0, x1 in zip(xs[:-1], xs[1:], strict=True):
        for y0, y1 in zip(ys[:-1], ys[1:], strict=True):
            if np.any((lr >= x1) & (a >= y1)):
                area += (x1 - x0) * (y1 - y0)
    return area


def random_points(rng: np.random.Generator, n: int, kind: int) -> tuple[np.ndarray, np.ndarray]:
    if kind == 0:  # small integer grid: many ties and exact duplicates
        return rng.integers(0, 5, n).astype(float), rng.integers(1, 6, n).astype(float)
    if kind == 1:  # continuous
        return rng.uniform(70, 90, n), 10 ** rng.uniform(0, 2, n)
    a = np.round(rng.uniform(80, 88, n), 1)  # rounded accuracies plus copied points
    r = 10 ** rng.uniform(0.5, 1.5, n)
    if n > 3:
        a[: n // 3], r[: n // 3] = a[n // 3 : 2 * (n // 3)], r[n // 3 : 2 * (n // 3)]
    return a, r


# -- pure math -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_pareto_mask_and_ranks_match_brute_force(kind: int) -> None:
    rng = np.random.default_rng(kind)
    for _ in range(150):
        a, r = random_points(rng, int(rng.integers(0, 40)), kind)
        np.testing.assert_array_equal(pareto_mask(a, r), brute_mask(a, r))
        np.testing.assert_array_equal(pareto_ranks(a, r), brute_ranks(a, r))


def test_pareto_mask_ties() -> None:
    a = np.array([80.0, 80.0, 80.0, 79.0, 81.0])
    r = np.array([10.0, 10.0, 9.0, 10.0, 5.0])
    # Duplicates of a front point both stay; equal accuracy with a lower rate, or equal rate with a
    # lower accuracy, is dominated.
    assert pareto_mask(a, r).tolist() == [True, True, False, False, True]
    assert pareto_ranks(a, r).tolist() == [0, 0, 1, 1, 0]


def test_pareto_mask_rejects_nan_and_length_mismatch() -> None:
    with pytest.raises(ValueError, match="NaN"):
        pareto_mask([1.0, math.nan], [2.0, 3.0])
    with pytest.raises(ValueError, match="same length"):
        pareto_ranks([1.0], [2.0, 3.0])


def test_pareto_is_fast_on_thousands_of_trials() -> None:
    rng = np.random.default_rng(1)
    a, r = rng.uniform(70, 90, 5000), 10 ** rng.uniform(0, 2, 5000)
    t0 = time.perf_counter()
    pareto_mask(a, r)
    pareto_ranks(a, r)
    hypervolume(a, r, 77.0)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_hypervolume_matches_exact_box_union(kind: int) -> None:
    rng = np.random.default_rng(10 + kind)
    for _ in range(60):
        a, r = random_points(rng, int(rng.integers(0, 25)), kind)
        ref_a = float(np.median(a)) - 1.0 if a.size else 0.0
        ref_lr = float(rng.choice([0.0, 0.3]))
        got = hypervolume(a, r, ref_a, ref_lr)
        assert got == pytest.approx(brute_hypervolume(a, np.log10(r), ref_a, ref_lr), abs=1e-9)


def test_hypervolume_by_hand() -> None:
    # (acc, rate): (85, 10) and (80, 100) over reference (75, 1x): 10 * 1 + 5 * 1 decades.
    assert hypervolume([85.0, 80.0], [10.0, 100.0], 75.0) == pytest.approx(15.0)
    # Points not strictly better than the reference add nothing.
    assert hypervolume([75.0, 90.0], [100.0, 1.0], 75.0) == 0.0
    assert hypervolume([], [], 75.0) == 0.0


def test_knee_point_on_a_constructed_front() -> None:
    # Extremes (90, 10^0.5) and (80, 10^2); the point (88, 10^1.5) bulges farthest towards the ideal corner.
    acc = np.array([90.0, 89.5, 88.0, 84.0, 80.0, 85.0, 79.0])
    rate = 10 ** np.array([0.5, 0.9, 1.5, 1.8, 2.0, 1.0, 0.4])
    assert knee_point(acc, rate) == 2
    # The dominated points (indices 5, 6) play no part: the front alone gives the same knee.
    assert knee_point(acc[:5], rate[:5]) == 2


def test_knee_point_needs_a_bulging_front() -> None:
    assert knee_point([90.0, 80.0], [2.0, 50.0]) is None
    assert knee_point([], []) is None
    # Three collinear points (in normalised log space): no knee.
    assert knee_point([90.0, 85.0, 80.0], [10.0, 100.0, 1000.0]) is None
    # A sagging front (middle point below the chord) has no knee either.
    assert knee_point([90.0, 89.0, 80.0], [10.0, 11.0, 1000.0]) is None


# -- trials.csv analysis ------------------------------------------------------------------------------


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run", trials_frame(60, seed=3, n_failed=4, n_running=2))


def test_load_trials_types(run: Path) -> None:
    df = load_trials(run)
    assert len(df) == 66
    assert df["number"].dtype == np.int64
    assert df["val_top1"].dtype == float and df["rate"].dtype == float
    assert pd.api.types.is_datetime64_any_dtype(df["datetime_complete"])
    assert (df["state"] == "FAIL").sum() == 4


def test_load_trials_not_a_run_dir(tmp_path: Path) -> None:
    with pytest.raises(ClipQError, match=r"is not a run directory \(no trials.csv\); run `run_search.py search`"):
        load_trials(tmp_path)
    with pytest.raises(ClipQError, match="is not a run directory"):
        load_baseline_info(tmp_path)
    (tmp_path / "trials.csv").write_text("what,ever\n1,2\n")
    with pytest.raises(ClipQError, match="no 'number' column"):
        load_trials(tmp_path)


def test_load_trials_empty_file_is_a_run_without_trials(tmp_path: Path) -> None:
    run = make_run(tmp_path, None)
    df = load_trials(run)
    assert df.empty and {"number", "state", "val_top1", "rate"} <= set(df.columns)
    info = pareto_info(df, BASELINE)
    assert info.front == () and info.n_complete == 0 and info.hypervolume == 0.0


def test_pareto_info_matches_brute_force(run: Path) -> None:
    df = load_trials(run)
    info = pareto_info(df, BASELINE)
    done = df.loc[df["state"] == "COMPLETE"]
    a, r = done["val_top1"].to_numpy(), done["rate"].to_numpy()
    expected = set(done["number"].to_numpy()[brute_mask(a, r)].tolist())
    assert set(info.front) == expected
    rates = [float(df.loc[df["number"] == n, "rate"].iloc[0]) for n in info.front]
    assert rates == sorted(rates)
    assert info.ranks == dict(zip(done["number"].tolist(), brute_ranks(a, r).tolist(), strict=True))
    assert (info.n_complete, info.n_failed, info.n_pending, info.n_total) == (60, 4, 2, 66)
    assert info.ref_acc == BASELINE - 10.0 and info.ref_log_rate == 0.0 and info.ref_rate == 1.0
    assert info.hypervolume == pytest.approx(brute_hypervolume(a, np.log10(r), BASELINE - 10, 0.0))
    assert info.knee in info.front


def test_pareto_info_ignores_complete_rows_without_metrics(run: Path) -> None:
    df = load_trials(run)
    best = int(df.loc[df["val_top1"].idxmax(), "number"])
    df.loc[df["number"] == best, "rate"] = np.nan
    assert best not in pareto_info(df, BASELINE).front


def test_hypervolume_history(run: Path) -> None:
    df = load_trials(run)
    hist = hypervolume_history(df, BASELINE)
    assert list(hist.columns) == ["n_finished", "number", "state", "hypervolume", "best_rate_within_1pt"]
    finished = df.loc[df["state"].isin(["COMPLETE", "FAIL"])]
    assert hist["n_finished"].tolist() == list(range(1, len(finished) + 1))
    assert hist["number"].tolist() == finished.sort_values("datetime_complete")["number"].tolist()
    assert np.all(np.diff(hist["hypervolume"]) >= -1e-12)
    assert hist["hypervolume"].iloc[-1] == pytest.approx(pareto_info(df, BASELINE).hypervolume)
    # Each row equals a from-scratch computation on the trials finished so far.
    for k in (1, 10, len(hist) // 2):
        seen = df.loc[df["number"].isin(hist["number"].iloc[:k]) & (df["state"] == "COMPLETE")]
        assert hist["hypervolume"].iloc[k - 1] == pytest.approx(
            hypervolume(seen["val_top1"], seen["rate"], BASELINE - 10.0)
        )
        close = seen.loc[BASELINE - seen["val_top1"] <= 1.0, "rate"]
        want = close.max() if len(close) else np.nan
        assert hist["best_rate_within_1pt"].iloc[k - 1] == pytest.approx(want, nan_ok=True)


def test_pareto_table_and_plan_of(run: Path) -> None:
    df = load_trials(run)
    info = pareto_info(df, BASELINE)
    table = pareto_table(df, info)
    assert table["number"].tolist() == list(info.front)
    assert (table["rank"] == 0).all()
    assert table["knee"].sum() == (info.knee is not None)
    for layer in LAYERS:
        assert f"p:{layer}" in table.columns and f"bits:{layer}" in table.columns
    assert not any(c.startswith(("param:", "kept:")) for c in table.columns)
    row = df.set_index("number").loc[info.front[0]]
    assert table["drop"].iloc[0] == pytest.approx(BASELINE - row["val_top1"])
    plan = plan_of(df, info.front[0])
    assert list(plan["layers"]) == list(LAYERS)
    assert plan["layers"]["features.0"] == {"p": row["p:features.0"], "bits": int(row["bits:features.0"])}
    assert isinstance(plan["layers"]["fc"]["bits"], int)
    with pytest.raises(ClipQError, match="trial 999 does not exist"):
        plan_of(df, 999)


# -- selection rules ------------------------------------------------------------------------------------


def small_frame() -> pd.DataFrame:
    rows = [
        (0, "COMPLETE", 87.0, 10.0),
        (1, "COMPLETE", 86.5, 20.0),
        (2, "COMPLETE", 86.8, 20.0),  # same rate as 1, more accurate
        (3, "COMPLETE", 84.0, 60.0),
        (4, "FAIL", None, None),
        (5, "RUNNING", None, None),
        (6, "COMPLETE", 86.25, 15.0),  # drop exactly 1.0
    ]
    df = pd.DataFrame(rows, columns=["number", "state", "val_top1", "rate"])
    df["error"] = [None, None, None, None, "ValueError: boom", None, None]
    df["p:fc"], df["bits:fc"] = 0.5, 4
    return df


def test_select_max_drop() -> None:
    df = small_frame()
    sel = select_max_drop(df, BASELINE, 1.0)
    assert sel.trial == 2 and sel.closest is None  # rate tie between 1 and 2 -> higher accuracy
    assert "trial 2" in sel.message
    assert select_max_drop(df, BASELINE, 0.3).trial == 0
    assert select_max_drop(df, 87.2, 1.0).trial == 2  # float slack: 87.2 - 86.2 counts as 1.0
    assert select_max_drop(df, BASELINE, 5.0).trial == 3


def test_select_max_drop_nothing_qualifies() -> None:
    sel = select_max_drop(small_frame(), 88.0, 0.5)
    assert sel.trial is None and sel.closest == 0
    assert sel.message == (
        "no trial within 0.5 points of the baseline (88.00%); closest: trial 0 at 87.00% (drop 1.0) with rate "
        "10.0x; relax --max-drop or run more trials"
    )


def test_select_min_rate() -> None:
    df = small_frame()
    assert select_min_rate(df, 15.0).trial == 2
    assert select_min_rate(df, 50.0).trial == 3
    sel = select_min_rate(df, 100.0)
    assert sel.trial is None and sel.closest == 3
    assert "no trial reaches rate 100x; closest: trial 3 at 84.00% with rate 60.0x" in sel.message
    assert "--min-rate" in sel.message


def test_selection_without_complete_trials() -> None:
    df = small_frame()
    df = df.loc[~df["state"].eq("COMPLETE")]
    for sel in (select_max_drop(df, BASELINE, 1.0), select_min_rate(df, 10.0)):
        assert sel.trial is None and sel.closest is None and "no complete trial yet" in sel.message


def test_selection_rejects_bad_limits() -> None:
    with pytest.raises(ConfigError, match="max_drop=-1.0"):
        select_max_drop(small_frame(), BASELINE, -1.0)
    with pytest.raises(ConfigError, match="min_rate=nan"):
        select_min_rate(small_frame(), math.nan)


def test_select_trial() -> None:
    df = small_frame()
    assert select_trial(df, 3).trial == 3
    with pytest.raises(ClipQError, match=r"trial 4 is FAIL \(ValueError: boom\), not a complete trial; .*0-3, 6"):
        select_trial(df, 4)
    with pytest.raises(ClipQError, match="trial 5 is RUNNING"):
        select_trial(df, 5)
    with pytest.raises(ClipQError, match="trial 42 does not exist; trials are 0-6"):
        select_trial(df, 42)


def test_load_run_bundles_the_analysis(run: Path) -> None:
    data = load_run(run)
    assert data.layers == LAYERS
    assert data.info.baseline_val_top1 == BASELINE
    assert data.table["number"].tolist() == list(data.info.front)
    assert data.final is None
    assert data.within_1pt == select_max_drop(data.trials, BASELINE, 1.0)
