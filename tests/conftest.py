from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

# The suite runs more busy processes than there are cores (pytest-xdist workers and their Ray workers): an OpenMP
# thread that spins while it waits for work takes a core another process needs. Set before torch loads libgomp;
# the commands and Ray workers the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from clipq_search.search.cluster import LOOPBACK_SWITCH, use_ray_settings  # noqa: E402

# As a command does before it imports Ray, for tests that import Ray before a command runs in their process:
# every Ray process on loopback, and Ray's settings of the package (Ray Train's v1 API among them).
os.environ.setdefault(LOOPBACK_SWITCH, "0")
use_ray_settings()

FASHION = Path(os.environ.get("CLIPQ_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "search_spaces" / "smoke.yaml"

FASHION_PRESENT = (FASHION / "train-images-idx3-ubyte.gz").exists() or (FASHION / "train-images-idx3-ubyte").exists()
needs_fashion = pytest.mark.skipif(
    not FASHION_PRESENT,
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="session")
def results_root(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """One results root per test process, whose baselines are those of the whole run: the smoke baseline is
    trained once, by the first process to get here, and reused by every test of every process (pytest-xdist)."""
    import fcntl

    root = tmp_path_factory.mktemp("results")
    # pytest-xdist's processes share the parent of their temporary folders (that of this run alone)
    shared = tmp_path_factory.getbasetemp().parent / "baselines" if worker_id != "master" else root / "baselines"
    shared.mkdir(exist_ok=True)
    if shared != root / "baselines":
        (root / "baselines").symlink_to(shared, target_is_directory=True)
    with open(shared / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the others wait for the first, then find its baseline
        if FASHION_PRESENT:
            r = cli("pretrain", str(SMOKE), "--results", str(root))
            assert r.returncode == 0, r.stderr[-2000:]
    return root


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A command of ``run_search.py`` run in this test process: the script's own ``main``, its exit status,
    its standard output and error as text.

    A command needs Ray; the first one of a test process starts a local instance and it stays up for the
    next (commands use Ray when it is up), so a command costs no interpreter start, imports or Ray start.
    ``env`` is for settings the command itself reads (the driver's); Ray's workers keep the environment
    their instance started with, so a setting the workers read needs a command in its own interpreter
    (``subprocess``), as do tests that kill the command or check what a user's terminal shows.
    """
    from clipq_search.cli import main

    # put back afterwards: what ``env`` sets, and the switch --debug sets (what Ray sets for itself stays, as
    # in a process that ran the command)
    saved = {key: os.environ.get(key) for key in [*(env or {}), "TUNE_PRINT_ALL_TRIAL_ERRORS"]}
    os.environ.update(env or {})
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse: bad arguments, --help
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return subprocess.CompletedProcess([sys.executable, "run_search.py", *args], code, out.getvalue(), err.getvalue())


def wait_for_output(log: Path, text: str, proc: subprocess.Popen, deadline: float) -> str:
    """Poll the ``log`` a command writes until it holds ``text``, the command ends, or ``deadline`` (a
    ``time.time()``) passes; return the log's text. A leading newline in ``text`` matches at the start of any
    line, the first one included."""
    while True:
        out = "\n" + log.read_text()
        if text in out or proc.poll() is not None or time.time() >= deadline:
            return out[1:]
        time.sleep(0.1)


def private_ray(**kwargs: object):
    """A Ray instance of a test's own making (``ray.init(address="local", ...)``): the process' shared one, if
    any, is shut down first (the next command starts a fresh one)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False, **kwargs)
    return ray


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server for the session (see tests/_postgres.py); stopped and deleted afterwards."""
    from ._postgres import PostgresServer, find_bin_dir

    if find_bin_dir() is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")
    pytest.importorskip("psycopg", reason="psycopg 3 is not installed: pip install 'psycopg[binary]'")
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules with slow tests first, each module's tests kept together (its module fixtures are made once).

    With several workers (``make test`` runs pytest-xdist) the long end-to-end
    modules start at once and the many quick tests fill the gaps after them,
    instead of one long module starting last.
    """
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow") and item.module is not None}
    order = {id(item): n for n, item in enumerate(items)}
    items.sort(key=lambda item: (item.module is None or item.module.__name__ not in slow, order[id(item)]))
