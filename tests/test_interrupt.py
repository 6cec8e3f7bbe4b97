"""Ctrl-C and SIGKILL in the middle of a search, then the same command again."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from clipq_search.search.study import interrupted_numbers

from .conftest import REPO, SMOKE, cli, needs_fashion, wait_for_output

pytestmark = [needs_fashion, pytest.mark.slow]


def _cmd(results: Path, name: str) -> list[str]:
    return [
        sys.executable,
        "run_search.py",
        "search",
        str(SMOKE),
        "--results",
        str(results),
        "--name",
        name,
        "--trials",
        "6",
        "--concurrency",
        "2",
        "--set",
        "trial.train.epochs=0.5",  # trials of about a second: the signal lands while the next ones run
    ]


def _interrupt_mid_run(results: Path, name: str, sig: signal.Signals) -> tuple[int, str]:
    """The search in an interpreter of its own, sent ``sig`` once this command has finished a trial."""
    log = results / f"{name}-{sig.name}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(_cmd(results, name), cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
        wait_for_output(log, "/6] trial", proc, time.time() + 300)
        time.sleep(0.3)  # the next trials are now in flight
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    return rc, log.read_text()


def _check_exact(results: Path, name: str) -> None:
    run_dir = results / name
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'study.db'}")
    stopped = interrupted_numbers(study)
    finished = [t for t in study.trials if t.state.is_finished() and t.number not in stopped]
    assert len(finished) == 6, [(t.number, t.state.name) for t in study.trials]
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    # every interrupted trial's plan was run again
    for t in study.trials:
        if t.number in stopped:
            assert any(u.user_attrs.get("retry_of") == t.number and u.state.is_finished() for u in study.trials)
    df = pd.read_csv(run_dir / "trials.csv")
    assert list(df["number"]) == [t.number for t in study.trials]
    assert (df["state"] == "COMPLETE").sum() == sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_a_search_stopped_by_ctrl_c_then_by_sigkill_resumes_to_the_exact_count(results_root: Path) -> None:
    name = "interrupt"
    rc, out = _interrupt_mid_run(results_root, name, signal.SIGINT)
    assert rc != 0 and "run the same command again" in out, out[-2000:]
    rc, out = _interrupt_mid_run(results_root, name, signal.SIGKILL)  # the same command, killed in its turn
    assert rc == -signal.SIGKILL and "trials finished;" in out, out[-2000:]
    done = cli(*_cmd(results_root, name)[2:])  # the same command again
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[6/6]" in done.stdout
    _check_exact(results_root, name)
    # and once more: nothing left to run, nothing added
    again = cli(*_cmd(results_root, name)[2:])
    assert "0 to run" in again.stdout
    _check_exact(results_root, name)
