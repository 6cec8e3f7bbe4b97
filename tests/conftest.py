from __future__ import annotations

import os
from pathlib import Path

import pytest

from clipq_search.search.cluster import LOOPBACK_SWITCH

# Keep every Ray process of the tests on loopback, also those of tests that import Ray before a command does.
os.environ.setdefault(LOOPBACK_SWITCH, "0")

FASHION = Path(os.environ.get("CLIPQ_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "search_spaces" / "smoke.yaml"

needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").exists() and not (FASHION / "train-images-idx3-ubyte").exists(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="session")
def results_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One results root per session, so the smoke baseline is trained once and reused."""
    return tmp_path_factory.mktemp("results")


@pytest.fixture
def ray_local():
    """A private local Ray instance for in-process searches; shut down afterwards."""
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


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
