#!/usr/bin/env python3
"""Orchestration overhead and scaling of the search (benchmarks.md figure 4).

Runs the same small search (smoke.yaml, real Fashion-MNIST) at concurrency 1
and 2, and on a local two-node Ray cluster, and reports:

- overhead = wall time of the trial phase / (summed trial compute / concurrency)
  (1.0 = no orchestration cost), and the same for the whole command;
- trials per hour at each concurrency;
- queue time (a plan's proposal to its start on a worker) of the first trials,
  which start the Ray workers, and the median of the later ones.

    python benchmarks/bench_orchestration.py [--trials 16] [--epochs 1] [--out benchmarks/results/orchestration.json]

The runs go to a temporary folder, deleted afterwards; the first run trains
the dense baseline there (its command time includes that), unless
``--baselines results/baselines`` names a baseline cache to reuse (or fill).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd  # noqa: E402
from _machine import machine_line  # noqa: E402

from clipq_search.search.space import load_space  # noqa: E402
from clipq_search.search.study import run_search  # noqa: E402


def measure(results: Path, name: str, trials: int, concurrency: int, address: str | None, epochs: float) -> dict:
    import ray

    space = load_space(ROOT / "search_spaces" / "smoke.yaml", [f"trial.train.epochs={epochs}"])
    t0 = time.perf_counter()
    summary = run_search(
        space,
        results_root=results,
        name=name,
        trials=trials,
        concurrency=concurrency,
        address=address,
        log=lambda m: None,
    )
    wall = time.perf_counter() - t0
    if address is None:
        ray.shutdown()
    df = pd.read_csv(results / name / "trials.csv", parse_dates=["datetime_start", "datetime_complete"])
    df = df[df["state"] == "COMPLETE"]
    phase = (df["datetime_complete"].max() - df["datetime_start"].min()).total_seconds()
    compute = float(df["trial_seconds"].sum())
    ideal = compute / concurrency
    by_start = df.sort_values("datetime_start")
    queue = by_start["queue_seconds"]
    return {
        "name": name,
        "trials": int(len(df)),
        "concurrency": concurrency,
        "trial_seconds_median": float(df["trial_seconds"].median()),
        "summed_trial_seconds": compute,
        "trial_phase_seconds": phase,
        "command_seconds": wall,
        "overhead_trial_phase": phase / ideal,
        "overhead_command": wall / ideal,
        "trials_per_hour": 3600.0 * len(df) / phase,
        # proposal -> start on a worker: the first trials include starting the workers
        "queue_seconds_first_trials": [round(float(q), 3) for q in queue.iloc[:concurrency]],
        "queue_seconds_median_later": float(queue.iloc[concurrency:].median()),
        "nodes": int(df["node"].nunique()),
        "complete": summary.complete,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--epochs", type=float, default=1.0, help="trial fine-tune length (epochs)")
    ap.add_argument("--no-cluster", action="store_true", help="skip the two-node cluster run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "orchestration.json"))
    ap.add_argument("--baselines", help="a baseline cache to reuse and fill (a results folder's baselines/)")
    args = ap.parse_args()
    results = Path(tempfile.mkdtemp(prefix="clipq-orch-"))
    if args.baselines:  # the runs stay in the temporary folder; only the cache is shared
        cache = Path(args.baselines).resolve()
        cache.mkdir(parents=True, exist_ok=True)
        (results / "baselines").symlink_to(cache, target_is_directory=True)
    rows = []
    try:
        for c in (1, 2):
            rows.append(measure(results, f"c{c}", args.trials, c, None, args.epochs))
            print(json.dumps(rows[-1]), flush=True)
        if not args.no_cluster:
            from ray.cluster_utils import Cluster

            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
            cluster.wait_for_nodes()
            try:
                rows.append(measure(results, "cluster2", args.trials, 2, cluster.address, args.epochs))
                print(json.dumps(rows[-1]), flush=True)
            finally:
                import ray

                ray.shutdown()
                cluster.shutdown()
    finally:
        shutil.rmtree(results, ignore_errors=True)
    print(
        f"\n{'run':<10} {'conc':>4} {'trials':>6} {'trial s':>8} {'phase s':>8} {'overhead':>8} "
        f"{'cmd ovh':>8} {'trials/h':>9} {'nodes':>5} {'queue 1st':>9} {'queue later':>11}"
    )
    for r in rows:
        print(
            f"{r['name']:<10} {r['concurrency']:>4} {r['trials']:>6} {r['trial_seconds_median']:>8.1f} "
            f"{r['trial_phase_seconds']:>8.1f} {r['overhead_trial_phase']:>8.2f} {r['overhead_command']:>8.2f} "
            f"{r['trials_per_hour']:>9.0f} {r['nodes']:>5} {max(r['queue_seconds_first_trials']):>8.1f}s "
            f"{r['queue_seconds_median_later']:>10.2f}s"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "orchestration",
                "machine": machine_line(),
                "trials": args.trials,
                "trial_epochs": args.epochs,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
