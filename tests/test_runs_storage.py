"""Many runs in one storage (SQLite file or a real PostgreSQL server), and one command at a time per run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from sqlalchemy.engine import make_url

from clipq_search.errors import ClipQError
from clipq_search.search.runlock import RunLock, RunLocked
from clipq_search.search.space import load_space
from clipq_search.search.study import LEGACY_STUDY_NAME, interrupted_numbers, normalise_storage, open_study, run_search

from .conftest import REPO, SMOKE, cli, needs_fashion, wait_for_output

DIST = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}


def _fill(study: optuna.Study, n: int) -> None:
    for _ in range(n):
        t = study.ask(DIST)
        study.tell(t, [t.params["x"], 1.0])


@pytest.fixture(params=["sqlite", "postgres"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty storage: an SQLite file, or a fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    server = request.getfixturevalue("postgres")
    return server.create_database(f"t_{abs(hash(request.node.name)) % 10**8}")


# -- studies named after their run ------------------------------------------------------------


def test_runs_in_one_storage_stay_separate_and_reopen(storage: str) -> None:
    a = open_study(storage, "run-a", fingerprint={"layers": "aaa"})
    b = open_study(storage, "run-b", fingerprint={"layers": "bbb"})
    _fill(a, 3)
    _fill(b, 2)
    assert sorted(optuna.get_all_study_names(storage)) == ["run-a", "run-b"]
    again = open_study(storage, "run-a", fingerprint={"layers": "aaa"})
    assert len(again.trials) == 3 and len(open_study(storage, "run-b", fingerprint={"layers": "bbb"}).trials) == 2
    assert again.user_attrs["clipq:space"] == {"layers": "aaa"}
    # a name taken by a search of another space is refused, whoever asks
    with pytest.raises(ClipQError, match=r"study 'run-a' in .* holds a search of a different space \(layers differ\)"):
        open_study(storage, "run-a", fingerprint={"layers": "bbb"})
    assert len(open_study(storage, "run-a").trials) == 3


def test_bare_and_psycopg_postgres_urls_both_work(postgres) -> None:
    url = postgres.create_database("both_forms")
    bare = url.replace("postgresql+psycopg://", "postgresql://")
    assert make_url(normalise_storage(bare)).get_dialect().driver == "psycopg"
    _fill(open_study(normalise_storage(bare), "r"), 2)
    assert len(open_study(url, "r").trials) == 2
    assert normalise_storage("sqlite:///x.db") == "sqlite:///x.db" and normalise_storage(url) == url


def test_a_run_from_before_named_studies_resumes_under_its_old_name(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    _fill(optuna.create_study(study_name=LEGACY_STUDY_NAME, storage=url, directions=["maximize"] * 2), 2)
    study = open_study(url, "myrun", legacy=True, fingerprint={"layers": "aaa"})
    assert study.study_name == LEGACY_STUDY_NAME and len(study.trials) == 2
    # only a file holding that one study is taken for an old run; a shared storage never is
    assert open_study(url, "other").study_name == "other"
    assert open_study(url, "third", legacy=True).study_name == "third"


# -- the run lock ----------------------------------------------------------------------------


def test_a_held_run_is_refused_naming_its_holder_and_freed_on_release(storage: str) -> None:
    first = RunLock(storage, "r1", host="node-a").acquire()
    try:
        with pytest.raises(RunLocked, match=rf"run 'r1' is in use: `search` by pid {os.getpid()} on node-a since "):
            RunLock(storage, "r1").acquire()
        RunLock(storage, "r2").acquire().release()  # another run is free
    finally:
        first.release()
    RunLock(storage, "r1").acquire().release()


def test_a_lock_whose_heartbeat_stopped_is_taken_over_after_the_expiry(storage: str) -> None:
    held = RunLock(storage, "r", host="node-b", expiry_s=1.5).acquire()
    time.sleep(1.0)
    with pytest.raises(RunLocked):  # heartbeats keep it alive past the expiry
        RunLock(storage, "r", expiry_s=1.5).acquire()
    held._stop.set()  # the holder hangs or its machine is lost: no more heartbeats, no release
    held._thread.join()
    time.sleep(0.5)
    with pytest.raises(RunLocked):
        RunLock(storage, "r", expiry_s=1.5).acquire()
    time.sleep(1.5)
    logs: list[str] = []
    taker = RunLock(storage, "r", expiry_s=1.5, log=logs.append).acquire()
    assert logs and "took over run 'r'" in logs[0] and "node-b" in logs[0]
    time.sleep(1.0)
    assert not taker.lost
    taker.release()


# -- the command line ------------------------------------------------------------------------


def _cmd(results: Path, name: str, storage: str | None, trials: int, *extra: str) -> list[str]:
    cmd = [sys.executable, "run_search.py", "search", str(SMOKE), "--results", str(results), "--name", name,
           "--trials", str(trials), "--concurrency", "2", *extra]
    return [*cmd, "--storage", storage] if storage else cmd


def _finished(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=storage)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    stopped = interrupted_numbers(study)
    return [t for t in study.trials if t.state.is_finished() and t.number not in stopped]


@needs_fashion
@pytest.mark.slow
def test_two_runs_on_one_storage_search_and_resume_separately(results_root: Path, tmp_path: Path) -> None:
    """Through whole searches on one SQLite file; PostgreSQL's runs are searched at once below (and both
    storages keep runs apart at the study level above)."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    fast = ["trial.train.epochs=0.05", "search.concurrency=1"]  # one trial at a time: one Ray worker to start

    def search(name: str, trials: int, extra: list[str], root: Path = results_root) -> None:
        run_search(load_space(SMOKE, fast + extra), results_root=root, name=name, trials=trials, storage=storage,
                   log=lambda m: None)

    narrow = ["layers.default.p=[0.5,0.6]"]
    search("wide", 2, [])
    search("narrow", 2, narrow)
    search("wide", 3, [])  # resumes its own study only
    assert len(_finished(storage, "wide")) == 3 and len(_finished(storage, "narrow")) == 2
    assert all(0.5 <= v <= 0.6 for t in _finished(storage, "narrow") for k, v in t.params.items() if k[:2] == "p:")
    search("narrow", 3, narrow)
    assert len(_finished(storage, "wide")) == 3 and len(_finished(storage, "narrow")) == 3
    # a new run folder whose --name is taken in the storage by another space: refused, nothing created
    with pytest.raises(ClipQError, match=r"study 'wide' in .* holds a search of a different space \(layers differ\)"):
        search("wide", 4, narrow, root=results_root / "elsewhere")
    assert not (results_root / "elsewhere" / "wide").exists()
    assert len(_finished(storage, "wide")) == 3


@needs_fashion
@pytest.mark.slow
def test_postgres_search_refuses_a_second_command_survives_sigkill_and_resumes_exactly(
    postgres, results_root: Path
) -> None:
    url = postgres.create_database("cli_kill").replace("postgresql+psycopg://", "postgresql://")
    cmd = _cmd(results_root, "pgkill", url, 6, "--set", "trial.train.epochs=1.0")
    log = results_root / "pgkill.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
        out = wait_for_output(log, "[1/6]", proc, time.time() + 300)
        assert "[1/6]" in out, out[-2000:]
        second = cli(*cmd[2:])  # the same run, at the same time
        assert second.returncode == 2
        lines = second.stderr.splitlines()
        assert len(lines) == 1 and f"run 'pgkill' is in use: `search` by pid {proc.pid} on " in lines[0], second.stderr
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    done = cli(*cmd[2:])  # the killed holder ran here: its lock is taken over at once
    assert done.returncode == 0, done.stderr[-2000:]
    assert "took over run 'pgkill'" in done.stdout and "[6/6]" in done.stdout
    finished = _finished(url, "pgkill")
    assert len(finished) == 6 and len({t.number for t in finished}) == 6
    study = optuna.load_study(study_name="pgkill", storage=url)
    for t in study.trials:  # every interrupted plan ran again
        if t.number in interrupted_numbers(study):
            assert any(u.user_attrs.get("retry_of") == t.number and u.state.is_finished() for u in study.trials)
    assert "0 to run" in cli(*cmd[2:]).stdout


@needs_fashion
@pytest.mark.slow
def test_two_searches_at_once_on_two_runs_in_one_postgres_database(postgres, results_root: Path) -> None:
    """One command in an interpreter of its own, the other in the test process once the first is searching."""
    url = postgres.create_database("cli_two")
    fast = ("--set", "trial.train.epochs=0.05", "--concurrency", "1")
    log = results_root / "pg-one.log"
    with open(log, "w") as fh:
        one = subprocess.Popen(_cmd(results_root, "pg-one", url, 3, *fast), cwd=REPO, stdout=fh,
                               stderr=subprocess.STDOUT)
        wait_for_output(log, "\nrun ", one, time.time() + 300)  # up to its opening line: its study is open
        two = cli(*_cmd(results_root, "pg-two", url, 3, *fast, "--set", "layers.default.bits=[3,4]")[2:])
        assert one.wait(timeout=600) == 0 and two.returncode == 0, (log.read_text()[-2000:], two.stderr[-2000:])
    assert "[3/3]" in log.read_text() and "[3/3]" in two.stdout
    assert sorted(optuna.get_all_study_names(url)) == ["pg-one", "pg-two"]
    assert len(_finished(url, "pg-one")) == 3 and len(_finished(url, "pg-two")) == 3
    assert all(3 <= v <= 4 for t in _finished(url, "pg-two") for k, v in t.params.items() if k[:5] == "bits:")


@needs_fashion
@pytest.mark.slow
def test_a_lock_left_by_a_killed_holder_elsewhere_expires(results_root: Path, tmp_path: Path) -> None:
    """The holder ran on another machine (so its process cannot be checked): its lock lasts until the expiry."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    expiry = 20
    env = {"CLIPQ_LOCK_EXPIRY_S": str(expiry)}
    cmd = _cmd(results_root, "stale", url, 1, "--set", "trial.train.epochs=0.05")
    # the baseline first, so the search reaches the lock within the expiry
    pre = cli("pretrain", str(SMOKE), "--results", str(results_root))
    assert pre.returncode == 0, pre.stderr[-2000:]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom clipq_search.search.runlock import RunLock\n"
         f"RunLock({url!r}, 'stale', host='node-gone').acquire()\nprint('held', flush=True)\ntime.sleep(600)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, **env},
    )
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    killed = time.time()
    refused = cli(*cmd[2:], env=env)
    assert time.time() - killed < expiry, "too slow to see the lock before it expired"
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert "run 'stale' is in use: `search` by pid" in refused.stderr and "on node-gone" in refused.stderr
    assert f"expires {expiry} s after its last heartbeat" in refused.stderr
    time.sleep(max(0.0, killed + expiry + 1 - time.time()))
    done = cli(*cmd[2:], env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "took over run 'stale'" in done.stdout and "node-gone" in done.stdout and "[1/1]" in done.stdout
    # `final` on the run is guarded the same way: a second one is refused before any training
    held = RunLock(url, "stale:final", command="final", host="node-f").acquire()
    try:
        final = cli("final", str(results_root / "stale"), "--trial", "0")
    finally:
        held.release()
    assert final.returncode == 2 and len(final.stderr.splitlines()) == 1, final.stderr
    assert f"run 'stale:final' is in use: `final` by pid {os.getpid()} on node-f" in final.stderr
    assert not (results_root / "stale" / "final").exists()
