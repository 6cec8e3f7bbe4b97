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

from .conftest import REPO, needs_fashion

pytestmark = [needs_fashion, pytest.mark.slow]


def _cmd(results: Path, name: str) -> list[str]:
    return [
        sys.executable,
        "run_search.py",
        "search",
        "search_spaces/smoke.yaml",
        "--results",
        str(results),
        "--name",
        name,
        "--trials",
        "6",
        "--concurrency",
        "2",
        "--set",
        "trial.train.epochs=1.0",  # about 1.4 s a trial here: the signal surely lands mid-run
    ]


def _interrupt_mid_run(results: Path, name: str, sig: signal.Signals) -> int:
    log = results / f"{name}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(_cmd(results, name), cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline and "[1/6]" not in log.read_text():
            time.sleep(0.1)
        time.sleep(0.3)  # the next trials are now in flight
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    return rc


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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_interrupted_search_resumes_to_the_exact_count(results_root: Path, sig: signal.Signals) -> None:
    name = f"interrupt-{sig.name.lower()}"
    rc = _interrupt_mid_run(results_root, name, sig)
    assert rc != 0
    if sig == signal.SIGINT:
        assert "run the same command again" in (results_root / f"{name}.log").read_text()
    done = subprocess.run(_cmd(results_root, name), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[6/6]" in done.stdout
    _check_exact(results_root, name)
    # and once more: nothing left to run, nothing added
    again = subprocess.run(_cmd(results_root, name), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert "0 to run" in again.stdout
    _check_exact(results_root, name)
