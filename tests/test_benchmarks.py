"""The benchmark scripts run as a user runs them, on real Fashion-MNIST, at tiny sizes, and save their JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import FASHION, REPO, needs_fashion

BENCH = REPO / "benchmarks"


def _run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@needs_fashion
def test_overhead_benchmark_times_both_implementations(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    r = _run("bench_overhead.py", "--models", "lenet300", "--steps", "3", "--warmup", "1", "--op-reps", "2",
             "--floor", "--root", str(FASHION), "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    entry = data["models"]["lenet300"]
    assert entry["without_operator"]["clipq_ms"] > 0 and "none" in r.stdout
    assert entry["kernels"] == "numba" and entry["other_kernels"]["torch"]["kernels"] == "torch"
    for e in (entry, entry["other_kernels"]["torch"]):
        assert e["plain_ms"] > 0 and e["clipq_ms"] > 0 and e["ratio_median_of_pairs"] > 0
        assert [row["layer"] for row in e["operator"]] == ["fc1", "fc2", "fc3"]
        assert all(row["ms_in_step"] > 0 for row in e["operator"])
        compiled = e["kernels"] == "numba"
        for row in e["operator"]:  # the compiled call is timed inside the steps and alone; the tensor path has none
            assert (row["kernel_ms_in_step"] is not None and row["kernel_ms_in_step"] > 0) == compiled
            assert (row["kernel_ms_warm"] is not None and row["kernel_ms_warm"] > 0) == compiled
        assert e["operator_ms_in_step"] == pytest.approx(sum(row["ms_in_step"] for row in e["operator"]), abs=1e-3)
    assert data["settings"]["out"] == str(out)  # outside the project: quoted as given
    assert "lenet300" in r.stdout and "wrote" in r.stdout


def test_benchmark_with_missing_data_says_so_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    r = _run("bench_overhead.py", "--models", "lenet300", "--root", str(tmp_path / "nowhere"), "--out", str(out))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: fashion-mnist data folder") and "apt-get" in lines[0]
    assert not out.exists()


def test_storage_benchmark_finds_estimate_equal_to_file_bytes(tmp_path: Path) -> None:
    out = tmp_path / "storage.json"
    r = _run("bench_storage.py", "--models", "lenet300", "--plans", "0.9:4", "--runs", str(tmp_path), "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["mismatches"] == []
    (case,) = data["plans"]
    assert case["estimate_total"] == case["file_total"] > 0 and case["diff_total"] == 0
    assert case["estimate_seconds_median"] > 0 and case["write_seconds"] > 0  # both timed, and printed
    assert "estimate s" in r.stdout and "write s" in r.stdout


@pytest.mark.slow
@needs_fashion
def test_orchestration_benchmark_reports_overhead_and_queue_times(results_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "orchestration.json"
    cached = sorted((results_root / "baselines").glob("*.pt"))
    assert cached  # the test run's smoke baseline (conftest's results_root)
    r = _run("bench_orchestration.py", "--trials", "2", "--epochs", "0.05", "--no-cluster", "--out", str(out),
             "--baselines", str(results_root / "baselines"))  # the test run's smoke baseline, not another one
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"c1", "c2"}
    for c, row in rows.items():
        assert row["complete"] == 2 and row["concurrency"] == int(c[1])
        assert row["overhead_trial_phase"] >= 1.0 - 1e-6 and row["trials_per_hour"] > 0
        assert len(row["queue_seconds_first_trials"]) == row["concurrency"]
    assert sorted((results_root / "baselines").glob("*.pt")) == cached  # reused, not trained again


def test_ask_benchmark_times_each_sampler(tmp_path: Path) -> None:
    out = tmp_path / "ask.json"
    r = _run("bench_ask.py", "--samplers", "tpe", "--dims", "6", "--trials", "20", "--asks", "2", "--pending", "3",
             "--out", str(out))
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["sampler"] == "tpe" and row["trials"] == 20 and len(row["ask_s"]) == 2 and row["median_s"] > 0


@pytest.mark.slow
def test_scale_benchmark_drives_the_searcher_and_reports_the_run(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    r = _run("bench_scale.py", "--storages", "sqlite", "--utilisation-storage", "none", "--at", "0", "30",
             "--window", "10", "--concurrency", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = json.loads(out.read_text())["latency"]
    assert row["trials_in_study"] == 40 and row["report_ok"]
    assert [w["trials_at_start"] for w in row["windows"]] == [0, 30]
    assert all(w["driver_trials_per_s"] > 0 and w["write_median_s"] > 0 for w in row["windows"])


def test_gpu_check_skips_cleanly_without_cuda(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: benchmarks/gpu_check.py runs for real")
    out = tmp_path / "gpu_check.json"
    r = _run("gpu_check.py", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "no CUDA GPU here" in r.stdout and not out.exists()


@needs_fashion
def test_distillation_benchmark_compares_the_same_plan_with_and_without_a_teacher(tmp_path: Path) -> None:
    out = tmp_path / "distill.json"
    r = _run("bench_distill.py", "--models", "lenet300", "--seeds", "0", "--levels", "lenet300=0.9:3",
             "--epochs", "0.05", "--baseline-epochs", "0.1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["distill"] == {"weight": 0.5, "temperature": 4.0, "teacher": "the dense baseline"}
    (level,) = data["models"]["lenet300"]["levels"]
    (run,) = level["runs"]
    plain, kd = run["plain"], run["distilled"]
    # the same plan: the same kept counts and bits, files within a few bytes (the index gaps differ)
    assert plain["rate"] > 1 and kd["rate"] == pytest.approx(plain["rate"], rel=0.05)
    assert run["test_gain"] == pytest.approx(kd["test_top1"] - plain["test_top1"], abs=1e-3)
    assert plain["test_top1"] != kd["test_top1"]  # the teacher changed the training
    assert "median test gain" in r.stdout


def test_multifidelity_benchmark_gives_each_arm_equal_trial_epochs_and_chooses_on_validation() -> None:
    """The arms' budgets (pure: no training) and the choice among finals on validation, never test."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_multifidelity as bench
    finally:
        sys.path.remove(str(BENCH))
    assert bench.mean_plan_cost((1, 3, 9), 3) == pytest.approx(1 + 2 / 3 + 6 / 9)
    single, n_single = bench.arm_space("lenet300", "single", 0)
    multi, n_multi = bench.arm_space("lenet300", "moasha-distill", 0)
    assert single.trial.rungs is None and multi.trial.rungs == (1.0, 3.0, 9.0)
    epochs = n_multi * multi.trial.train.epochs * bench.mean_plan_cost()
    assert epochs == pytest.approx(n_single * single.trial.train.epochs, rel=0.02)
    assert multi.trial.train.distill.weight == multi.final.train.distill.weight == 0.5
    assert bench.arm_space("lenet300", "moasha", 0, plans=40)[1] == 40  # --plans
    rows = [{"arm": "moasha"}, {"arm": "moasha", "top": 5}, {"arm": "moasha", "top": 5, "plans": 40}]
    assert len({bench.variant(r) for r in rows}) == 3  # each kept beside the others
    finals = [
        {"trial": 1, "rate": 60.0, "val_top1": 89.2, "test_top1": 89.9},  # best on test, not within 0.5 on val
        {"trial": 2, "rate": 40.0, "val_top1": 89.6, "test_top1": 89.5},
    ]
    best = bench.best_within(finals, 90.0)
    assert best["0.25"] is None and best["0.5"]["trial"] == 2 and best["1.0"]["trial"] == 1
