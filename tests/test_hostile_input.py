"""Defects found by trying the command line as a careless user and as hostile input (beyond the error table).

What the table in test_cli_errors.py cannot say in one line: what is *accepted*
(``1e-3``), what is cleaned up (temporaries of a killed write), what happens
on a second run (a resumed run at the largest seed, a run whose every trial
failed), and what is never created (a run folder before the cluster answers).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from clipq_search._io import remove_stale_temporaries, write_text
from clipq_search.analysis import rundir
from clipq_search.cli import main as cli_main
from clipq_search.errors import ClipQError
from clipq_search.search.space import SEED_MAX, load_space

from .conftest import REPO, SMOKE, cli, needs_fashion

# -- numbers YAML 1.1 reads as strings ---------------------------------------------------------


@pytest.mark.parametrize("text", ["1e-3", "1E-3", "1.0e-3", "+1e-3", ".1e-2", "1e3"])
def test_exponent_numbers_are_numbers_in_set_and_in_space_files(tmp_path: Path, text: str) -> None:
    value = float(text)
    space = load_space(SMOKE, [f"trial.train.lr={text}"])
    assert space.trial.train.lr == value and isinstance(space.trial.train.lr, float)
    path = tmp_path / "space.yaml"
    path.write_text(SMOKE.read_text().replace("lr: 0.01", f"lr: {text}"))
    assert load_space(path).trial.train.lr == value
    assert load_space(path).final.train.lr == value
    # and a space written back (space.yaml in a run) reads the same
    again = tmp_path / "again.yaml"
    again.write_text(load_space(path).to_yaml())
    assert load_space(again).trial.train.lr == value


@needs_fashion
def test_lr_1e_3_passes_the_command_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """It used to be refused as "expected a number"; now the command goes on to the next check."""
    argv = ["search", str(SMOKE), "--results", str(tmp_path), "--set", "trial.train.lr=1e-3",
            "--set", "dataset.val_size=60000"]  # stops at the dataset, after the space is accepted
    assert cli_main(argv) == 2
    err = capfd.readouterr().err
    assert "val_size=60000" in err and "lr" not in err


# -- run names ---------------------------------------------------------------------------------


def test_a_run_folder_left_by_an_interrupted_first_search_is_continued(tmp_path: Path) -> None:
    """Before run.json exists a search has written only the study and the space: that folder is still the run's."""
    run = tmp_path / "r"
    run.mkdir()
    for name in (rundir.STUDY_DB, rundir.SPACE_YAML, f".{rundir.RUN_JSON}.123@host.abcdefgh.tmp"):
        (run / name).write_text("")
    assert rundir.run_folder(tmp_path, "r") == run
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ClipQError, match="did not write"):
        rundir.run_folder(tmp_path, "r")
    (run / rundir.RUN_JSON).write_text("{}")  # a run's folder: the user's notes in it are theirs to keep
    assert rundir.run_folder(tmp_path, "r") == run


@pytest.mark.parametrize("name", ["smoke", "run-1", "a.b_c", "A" * 100])
def test_ordinary_run_names_are_accepted(name: str) -> None:
    assert rundir.check_run_name(name) == name


# -- the cluster answers before anything is written -------------------------------------------------


@pytest.fixture
def grpc_lookalike() -> Iterator[int]:
    """A server that answers HTTP/2's preface with a SETTINGS frame, as a gRPC server does, and nothing more."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv.getsockname()[1]
    stop.set()
    thread.join(timeout=2)
    srv.close()


@needs_fashion
@pytest.mark.skipif(importlib.util.find_spec("grpc") is not None, reason="ray[client] would try to talk to it")
def test_a_cluster_that_does_not_connect_leaves_no_run_folder(
    tmp_path: Path, grpc_lookalike: int, capfd: pytest.CaptureFixture[str]
) -> None:
    """`ray://` and `auto` fail inside ray.init; that used to come after study.db and space.yaml were written."""
    results = tmp_path / "results"
    argv = ["search", str(SMOKE), "--results", str(results), "--address", f"ray://127.0.0.1:{grpc_lookalike}"]
    assert cli_main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ray://127.0.0.1" in err[0], err
    assert not results.exists() or not any(results.rglob("*")), sorted(results.rglob("*"))


# -- temporaries of a killed write -----------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_writers_temporaries_go_at_the_next_write(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    host = socket.gethostname()
    dead = tmp_path / f".report.html.{_dead_pid()}@{host}.k2j4h5g6.tmp"
    live = tmp_path / f".report.html.{os.getpid()}@{host}.a1b2c3d4.tmp"  # a write in progress: kept
    other_host = tmp_path / ".report.html.1@elsewhere.example.a1b2c3d4.tmp"  # its writer's host decides
    old_style = tmp_path / ".report.html.q1w2e3r4.tmp"
    recent_old_style = tmp_path / ".report.html.z9x8c7v6.tmp"
    other_file = tmp_path / f".pareto.csv.{_dead_pid()}@{host}.k2j4h5g6.tmp"
    for p in (dead, live, other_host, old_style, recent_old_style, other_file):
        p.write_text("x" * 100)
    os.utime(old_style, (1, 1))  # a temporary from before names held a process: stale after an hour
    write_text(target, "<html>")
    assert target.read_text() == "<html>"
    left = {p.name for p in tmp_path.iterdir()}
    assert dead.name not in left and old_style.name not in left
    assert {live.name, other_host.name, recent_old_style.name, other_file.name} <= left
    assert remove_stale_temporaries(target) == 0


@needs_fashion
def test_report_removes_the_temporaries_of_a_killed_report(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "space.yaml").write_text(load_space(SMOKE).to_yaml())
    baseline = {"checkpoint": "x", "val_top1": 10.0, "test_top1": 10.0, "test_top5": 50.0, "seconds": 0.0,
                "model": "lenet300", "dataset": "fashion-mnist", "fingerprint": "0"}
    (run / "baseline.json").write_text(json.dumps(baseline))
    (run / "run.json").write_text(json.dumps({"storage": "sqlite:///x", "name": "run"}))
    (run / "trials.csv").write_text("number,state\n")
    host = socket.gethostname()
    stale = [run / f".report.html.{_dead_pid()}@{host}.abcdefgh.tmp", run / f".pareto.csv.{_dead_pid()}@{host}.x.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 4_800_000)  # a killed report leaves one of these, 4.8 MB each
    assert cli_main(["report", str(run)]) == 0
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["space.yaml", "baseline.json", "run.json", "trials.csv", "report.html", "pareto.csv"]
    )


# -- second runs: resumed at the largest seed, and after every trial failed ------------------------------------


def _search(results: Path, *extra: str, own_interpreter: bool = False) -> subprocess.CompletedProcess[str]:
    args = ["search", str(SMOKE), "--results", str(results), "--name", "hostile",
            "--set", "trial.train.max_steps=3", "--set", "trial.eval_batch_size=2000", *extra]
    if not own_interpreter:
        return cli(*args)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "run_search.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@needs_fashion
@pytest.mark.slow
def test_capped_concurrency_a_failed_run_restarted_and_the_largest_seed_resumed(results_root: Path) -> None:
    """One run, four searches: what used to go wrong on each.

    --concurrency 1000 started Ray with 1000 CPUs; after "every trial failed" the
    fixed space was refused as a different space; a run at seed 2**32-1
    crashed on every resume (the seed grows with the trials).
    """
    cpus = len(os.sched_getaffinity(0))
    run = ["--name", "hostile", "--set", f"search.seed={SEED_MAX}"]
    # in its own interpreter: the Ray instance this command starts is checked, and all it writes to stderr
    bad = _search(results_root, *run, "--trials", "1", "--concurrency", "1000", "--inject-failure", "0",
                  own_interpreter=True)
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert f"concurrency 1000 lowered to {cpus}: this machine has {cpus} CPU(s)" in bad.stdout, bad.stdout
    assert f"started a local Ray instance ({cpus} CPUs)" in bad.stdout
    err = bad.stderr.strip().splitlines()
    assert len(err) == 1 and "every trial failed" in err[0] and "run the same command again" in err[0], err

    fixed = [*run, "--set", "layers.default.bits=[2, 5]", "--concurrency", "1"]
    first = _search(results_root, *fixed, "--trials", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "holds no complete trial: starting it afresh with this space" in first.stdout, first.stdout
    assert "0 of 1 trials finished" in first.stdout
    assert load_space(results_root / "hostile" / "space.yaml").to_dict()["layers"]["default"]["bits"] == [2, 5]

    again = _search(results_root, *fixed, "--trials", "2")  # resumed: the sampler's seed is 2**32-1 + 1 trial
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 of 2 trials finished; 1 to run" in again.stdout
    trials = (results_root / "hostile" / "trials.csv").read_text().splitlines()
    assert len(trials) == 3 and all(",COMPLETE," in row for row in trials[1:]), trials

    # a run with a complete trial is not replaced: another space is refused as before
    other = _search(results_root, *run, "--trials", "3", "--set", "layers.default.bits=[3, 5]")
    assert other.returncode == 2 and "different space" in other.stderr, other.stderr
