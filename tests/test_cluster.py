"""A search against a local multi-node Ray cluster (several raylets on loopback)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from clipq_search.search.space import load_space
from clipq_search.search.study import run_search

from .conftest import SMOKE, needs_fashion

pytestmark = [needs_fashion, pytest.mark.slow]


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def test_trials_are_placed_on_several_nodes_and_a_lost_node_is_survived(results_root: Path, cluster) -> None:
    import ray

    space = load_space(SMOKE, ["trial.train.epochs=0.5"])  # trials of about a second: the node goes mid-run
    logs: list[str] = []
    victim = list(cluster.worker_nodes)[-1]
    killed = threading.Event()

    def kill_a_node_mid_run() -> None:
        # wait until trials are running, then take a worker node (and its trial) away
        deadline = time.time() + 240
        while time.time() < deadline and not any("started" in line or "[1/" in line for line in logs):
            time.sleep(0.1)
        time.sleep(0.3)
        cluster.remove_node(victim, allow_graceful=False)
        killed.set()

    killer = threading.Thread(target=kill_a_node_mid_run, daemon=True)
    killer.start()
    summary = run_search(
        space,
        results_root=results_root,
        name="cluster",
        trials=6,
        concurrency=3,
        address=cluster.address,
        log=logs.append,
    )
    assert killed.is_set(), "the node was not lost while the search ran"
    killer.join(timeout=5)
    assert summary.finished == 6
    df = pd.read_csv(results_root / "cluster" / "trials.csv")
    finished = df[df["state"].isin(["COMPLETE", "FAIL"])]
    assert len(finished) == 6 and finished["number"].is_unique
    assert df[df["state"] == "COMPLETE"]["node"].nunique() >= 2
    assert any("connected to Ray cluster" in line for line in logs)
    assert ray.is_initialized()
