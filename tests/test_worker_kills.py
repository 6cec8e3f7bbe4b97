"""Workers that Ray kills: failed trials with their reason, the search going on, one line instead of a traceback.

The slow tests run the real command line on real Fashion-MNIST, and Ray's
workers die for real: the test hook ``CLIPQ_TEST_KILL`` makes a worker SIGKILL
itself at a trial's start or after some training steps, or take memory until
Ray's memory monitor kills it; a very low ``RAY_memory_usage_threshold`` makes
the memory monitor kill every worker as it starts. The hook travels from the
command to its workers, so those commands run in the test process; a command
that sets Ray's memory monitor starts a Ray instance of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from html import escape
from pathlib import Path

import pandas as pd
import pytest

from clipq_search.search import worker_kills as wk

from .conftest import REPO, needs_fashion
from .conftest import cli as run_cli

# -- what a kill was, and the search's record of kills (no Ray cluster) ---------------------------------------------


def test_kill_reason_names_each_kind_of_kill() -> None:
    import ray.exceptions as rex

    oom = rex.OutOfMemoryError("1 worker(s) were killed due to the node running low on memory. ... pid=4242, ...")
    assert wk.kill_reason(oom) == wk.MEMORY
    try:  # how Ray Tune ends Tuner.fit when an actor task is killed for memory
        raise RuntimeError("Caught unexpected exception") from oom
    except RuntimeError as exc:
        assert wk.kill_reason(exc) == wk.MEMORY and wk.worker_pids(exc) == {4242}
    assert wk.kill_reason(rex.NodeDiedError("node 1 died")) == wk.NODE
    assert wk.kill_reason(rex.WorkerCrashedError()) == wk.PROCESS
    assert wk.kill_reason(rex.ActorDiedError()) == wk.PROCESS
    # the memory monitor's text, as Tune keeps it; Ray's generic crash text mentions the kernel's OOM killer
    assert wk.reason_from_text("Worker exit type: NODE_OUT_OF_MEMORY") == wk.MEMORY
    assert wk.reason_from_text("(1) the process was killed by the OOM killer due to high memory usage") == wk.PROCESS
    # errors that are not kills
    assert wk.kill_reason(ValueError("bad plan")) is None
    assert wk.kill_reason(rex.ActorUnschedulableError("no node")) is None
    assert wk.is_ray_error(rex.ActorUnschedulableError("no node")) and not wk.is_ray_error(ValueError("x"))


class _Trial:
    def __init__(self, number: int) -> None:
        self.number = number


def test_ledger_settles_trials_cut_off_by_a_kill_and_stops_on_kills_in_a_row() -> None:
    import ray.exceptions as rex

    logs: list[str] = []
    ledger = wk.KillLedger(retries=1, concurrency=2, advice="To need less memory per node: do less", log=logs.append)
    ledger.started("a", {"worker_pid": 11})
    ledger.started("b", {"worker_pid": 12})
    oom = rex.OutOfMemoryError("1 worker(s) were killed due to the node running low on memory ... pid=11")
    in_flight = {"a": _Trial(5), "b": _Trial(6)}
    # the killed trial (found by its worker's pid) runs again; the other one too, its retries untouched
    assert ledger.crashed(oom, wk.MEMORY, in_flight) == []
    assert [t.number for t in ledger.rerun] == [5, 6] and ledger.kills == {5: [wk.MEMORY]}
    assert logs == [f"trial 5: {wk.MEMORY}; running it again (retry 1 of 1)"]
    # killed again: no retry left, it ends failed with its reason
    ledger.rerun.clear()
    ledger.started("c", {"worker_pid": 21})
    oom = rex.OutOfMemoryError("1 worker(s) were killed due to the node running low on memory ... pid=21")
    assert ledger.crashed(oom, wk.MEMORY, {"c": _Trial(5)}) == ["c"]
    assert ledger.failed("c", 5) == (f"{wk.MEMORY}, on each of 2 attempt(s)", str(oom))
    assert ledger.stop_line is None
    # a finished trial breaks the run of kills; three kills in a row stop the search
    ledger.ended(None)
    for _ in range(2):
        ledger.ended(wk.MEMORY)
    assert ledger.stop_line is None
    ledger.ended(wk.MEMORY)
    assert ledger.stop_line is not None
    assert ledger.stop_line.startswith(f"stopped: the last 3 trials were all {wk.MEMORY}")
    assert "do less" in ledger.stop_line and ledger.stop_line.endswith("rerun the same command to resume")
    assert "\n" not in ledger.stop_line


class _TuneTrial:
    """What the ledger reads of a Ray Tune trial: its id, its config and its latest error."""

    def __init__(self, trial_id: str, number: int, error: str) -> None:
        self.trial_id, self.config, self.error_file, self._error = trial_id, {"number": number}, None, error

    def get_error(self) -> str:
        return self._error


def test_a_trial_handed_out_again_after_a_crash_keeps_one_retry_budget_with_tunes_own_retries() -> None:
    """A kill that ended Tune's run took trial 5's one retry; Tune, which counts afresh in its new run, retries the
    next kill itself: that attempt is stopped at its first report and the trial ends failed after 2 attempts."""
    import ray.exceptions as rex

    logs: list[str] = []
    ledger = wk.KillLedger(retries=1, concurrency=1, advice="do less", log=logs.append)
    ledger.started("a", {"worker_pid": 11})
    oom = rex.OutOfMemoryError("1 worker(s) were killed due to the node running low on memory ... pid=11")
    assert ledger.crashed(oom, wk.MEMORY, {"a": _Trial(5)}) == []  # handed out again: retry 1 of 1
    error = "ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory."
    ledger.callback().on_trial_recover(0, [], _TuneTrial("b", 5, error))  # Tune's own retry in its new run
    assert logs == [f"trial 5: {wk.MEMORY}; running it again (retry 1 of 1)"]  # never "retry 2 of 1"
    stop = ledger.stopper()
    assert stop("b", {"started": 1}) and not stop("c", {"started": 1})
    assert ledger.failed("b", 5)[0] == f"{wk.MEMORY}, on each of 2 attempt(s)"
    assert not stop("b", {"started": 1})  # settled


def test_command_line_turns_a_ray_error_into_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import ray.exceptions as rex

    from clipq_search import cli, commands

    def killed(args) -> None:
        try:
            raise rex.OutOfMemoryError("1 worker(s) were killed due to the node running low on memory.\nmore")
        except rex.OutOfMemoryError as exc:
            raise RuntimeError("Caught unexpected exception") from exc

    monkeypatch.setattr(commands, "cmd_spaces", killed)
    monkeypatch.setenv("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")  # restored afterwards (--debug sets it)
    assert cli.main(["spaces"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert wk.MEMORY in err and err.rstrip().endswith("rerun the same command to resume")
    assert cli.main(["--debug", "spaces"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and os.environ.get("TUNE_PRINT_ALL_TRIAL_ERRORS") == "1"
    monkeypatch.setattr(commands, "cmd_spaces", lambda args: 1 / 0)  # anything else is a bug: its traceback
    with pytest.raises(ZeroDivisionError):
        cli.main(["spaces"])


# -- real kills through the command line --------------------------------------------------------------------------


def _run(args: list[str], env: dict[str, str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """The command with ``env``: in this process, unless ``env`` sets Ray's own settings (an interpreter, hence a
    Ray instance, of its own)."""
    if not any(key.startswith("RAY_") for key in env or {}):
        return run_cli(*args, env=env)
    full = {**os.environ, **(env or {})}
    for key in (wk.KILL_ENV, wk.ONCE_ENV, "RAY_memory_usage_threshold", "TUNE_PRINT_ALL_TRIAL_ERRORS"):
        if key not in (env or {}):
            full.pop(key, None)
    return subprocess.run(
        [sys.executable, "run_search.py", *args], cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout
    )


def _search(results: Path, name: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return _run(["search", "smoke", "--results", str(results), "--name", name, *extra], env)


def _no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]


@pytest.fixture(scope="module")
def killed_run(results_root: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """4 trials, 2 at a time: trial 1's worker dies as the trial starts, trial 2's after 5 training steps."""
    kill = {wk.KILL_ENV: "trial1@start,trial2@5"}
    proc = _search(results_root, "kills", "--trials", "4", "--concurrency", "2", env=kill)
    return results_root / "kills", proc


@pytest.mark.slow
@needs_fashion
def test_killed_workers_become_failed_trials_and_the_search_goes_on(killed_run) -> None:
    run_dir, proc = killed_run
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    _no_traceback(proc)
    assert "[4/4]" in proc.stdout
    for n in (1, 2):  # each kill is retried once (search.retries: 1), with its reason
        assert f"trial {n}: {wk.PROCESS}; running it again (retry 1 of 1)" in proc.stdout
    df = pd.read_csv(run_dir / "trials.csv").set_index("number")
    assert len(df) == 4 and dict(df["state"]) == {0: "COMPLETE", 1: "FAIL", 2: "FAIL", 3: "COMPLETE"}
    for n in (1, 2):
        assert df.loc[n, "error"] == f"{wk.PROCESS}, on each of 2 attempt(s)"
    report = run_cli("report", str(run_dir))
    assert report.returncode == 0, report.stderr
    html = (run_dir / "report.html").read_text()
    assert html.count(escape(wk.PROCESS)) >= 2  # the report's failed trials, with their reason


@pytest.mark.slow
@needs_fashion
def test_final_run_killed_once_resumes_from_its_checkpoint(killed_run, tmp_path: Path) -> None:
    run_dir, _ = killed_run
    # 1.2 epochs: a checkpoint after the first (453 steps); the worker dies some steps later, once
    proc = _run(
        ["final", str(run_dir), "--set", "final.train.epochs=1.2", "--no-control"],
        env={wk.KILL_ENV: "compressed@470", wk.ONCE_ENV: str(tmp_path / "once")},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    _no_traceback(proc)
    assert f"final compressed run: {wk.PROCESS}; running it again from its checkpoint (retry 1 of 1)" in proc.stdout
    assert "compressed: resumed from its checkpoint at step 453" in proc.stdout
    assert (run_dir / "final" / "model.clipq").is_file()


@pytest.mark.slow
@needs_fashion
def test_final_run_killed_every_time_stops_with_one_line(killed_run) -> None:
    run_dir, _ = killed_run
    args = ["final", str(run_dir), "--set", "final.train.epochs=1.2", "--no-control"]
    proc = _run(args, env={wk.KILL_ENV: "compressed@start"})
    assert proc.returncode == 2
    _no_traceback(proc)
    err = proc.stderr.strip().splitlines()
    assert err == [
        f"error: final compressed run failed ({wk.PROCESS}, 2 time(s); search.retries=1); "
        "rerun the same command to resume"
    ]


@pytest.mark.slow
@needs_fashion
def test_memory_kills_in_a_row_stop_the_search_and_keep_finished_trials(killed_run) -> None:
    run_dir, _ = killed_run
    before = pd.read_csv(run_dir / "trials.csv")
    # The memory monitor kills every worker at once (at 1% of the node's memory), during its start-up.
    proc = _search(run_dir.parent, run_dir.name, "--trials", "12", env={"RAY_memory_usage_threshold": "0.01"})
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    _no_traceback(proc)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: stopped: the last 3 trials were all {wk.MEMORY}")
    for advice in ("search.concurrency 1 instead of 2", "resources.cpus_per_trial 2 instead of 1",
                   "trial.train.batch_size 64 instead of 128", "rerun the same command to resume"):
        assert advice in err[0]
    df = pd.read_csv(run_dir / "trials.csv")
    kept = df[df["number"].isin(before["number"])]
    assert list(kept["state"]) == list(before["state"])  # finished trials are kept as they were
    new = df[~df["number"].isin(before["number"]) & (df["state"] == "FAIL")]
    assert len(new) >= 3 and new["error"].str.startswith(wk.MEMORY).all()


def _memory_in_use() -> float:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    total, available = (int(info[k].split()[0]) for k in ("MemTotal", "MemAvailable"))
    return 1 - available / total


@pytest.mark.slow
@needs_fashion
def test_memory_kill_mid_training_is_retried_then_failed(results_root: Path) -> None:
    """A trial killed for memory while it trains: Ray Tune itself stops on that error; the search goes on."""
    if not Path("/proc/meminfo").is_file() or _memory_in_use() > 0.3:
        pytest.skip("needs a Linux machine with most of its memory free (the trial takes memory until killed)")
    proc = _search(
        results_root, "memkill", "--trials", "3", "--concurrency", "1",
        env={wk.KILL_ENV: "trial1@mem5", "RAY_memory_usage_threshold": "0.45", "RAY_memory_monitor_refresh_ms": "50"},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    _no_traceback(proc)
    assert "[3/3]" in proc.stdout
    assert f"trial 1: {wk.MEMORY}; running it again (retry 1 of 1)" in proc.stdout
    df = pd.read_csv(results_root / "memkill" / "trials.csv").set_index("number")
    assert df.loc[1, "state"] == "FAIL" and df.loc[1, "error"] == f"{wk.MEMORY}, on each of 2 attempt(s)"
    assert (df["state"] == "COMPLETE").sum() >= 1


@pytest.mark.slow
@needs_fashion
def test_paper_strategy_killed_stops_with_one_line(results_root: Path) -> None:
    proc = _search(results_root, "paperkill", "--trials", "2", "--sampler", "paper", env={wk.KILL_ENV: "paper@start"})
    assert proc.returncode == 2
    _no_traceback(proc)
    assert any("the paper strategy's search of layer" in line and "running it again" in line
               for line in proc.stdout.splitlines())
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "the paper strategy's search of layer" in err[0]
    assert f"({wk.PROCESS}, 2 time(s); search.retries=1); rerun the same command to resume" in err[0]


def test_ray_and_tunes_words_on_failed_trials_are_dropped_unless_debugging(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The search reports each failed trial in one line; Ray's and Tune's tracebacks of it stay out of the way."""
    import logging

    from clipq_search.search.worker_kills import quiet_tune

    monkeypatch.delenv("TUNE_PRINT_ALL_TRIAL_ERRORS", raising=False)
    quiet_tune()
    records = [
        ("ray._private.worker", "Unhandled error (suppress with 'RAY_IGNORE_UNHANDLED_ERRORS=1'): ray::ImplicitFunc"),
        ("ray.tune.execution.tune_controller", "Trial _trainable_1: Error stopping trial."),
        ("ray.tune.tune", "Trials did not complete: [_trainable_1]"),
    ]
    with caplog.at_level(logging.ERROR):
        for name, message in records:
            logging.getLogger(name).error(message)
        logging.getLogger("ray._private.worker").error("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
    caplog.clear()
    monkeypatch.setenv("TUNE_PRINT_ALL_TRIAL_ERRORS", "1")  # what --debug sets
    with caplog.at_level(logging.ERROR):
        for name, message in records:
            logging.getLogger(name).error(message)
    assert len(caplog.records) == len(records)
