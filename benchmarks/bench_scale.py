#!/usr/bin/env python3
"""A simulated GPU cluster: does the driver keep 32 GPU slots busy, and how do asks and writes grow to 1,000 trials?

    python benchmarks/bench_scale.py                      # SQLite and PostgreSQL; writes results/scale.json
    python benchmarks/bench_scale.py --storages sqlite --trials 200 --utilisation-trials 100

A ``ray.cluster_utils.Cluster`` of ``--nodes`` nodes with ``--gpus-per-node``
declared GPUs each (Ray schedules declared GPUs without devices). Each trial
asks for one GPU and is a synthetic trainable: it scores its plan with a
closed-form stand-in of (accuracy, log10 rate) and sleeps ``--trial-seconds``
(a 60-s trial scaled down). Everything else is the search's own: the study
(``open_study`` on the storage), the sampler (``make_sampler``, default
``auto``), the searcher with its background proposer (``_make_searcher``), the
per-completion bookkeeping of ``search`` (progress line and trials.csv), and
Ray Tune configured as ``search`` configures it.

Per storage: phase 1 runs ``--utilisation-trials`` trials at ``--concurrency``
and measures GPU-slot utilisation = busy slot-seconds / (slots x wall);
phase 2 resumes the study to ``--trials`` trials. Over both: ask latency and
storage write latency against the number of trials, driver CPU and memory;
then ``report`` on the finished run. PostgreSQL is a throwaway server
(tests/_postgres.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import optuna  # noqa: E402
from _machine import machine_line  # noqa: E402

from clipq_search._io import write_json  # noqa: E402
from clipq_search.search import study as st  # noqa: E402
from clipq_search.search.space import LayerSearchParam, load_space  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "scale.json"


def stand_in(layers: dict[str, dict[str, float]]) -> tuple[float, float]:
    """(val accuracy %, compression rate) of a plan: smooth, conflicting, cheap."""
    p = np.array([c["p"] for c in layers.values()])
    b = np.array([c["bits"] for c in layers.values()], dtype=float)
    w = np.linspace(1.0, 2.0, len(p))
    acc = 90.0 - float(np.sum(w * (np.exp(4 * (p - 0.9)) + 2.0 ** (2 - b))))
    rate = 32.0 / float(np.average(b * (1 - p) + 0.05, weights=w))
    return acc, rate


def synthetic_trainable(config: dict[str, Any], sleep_s: float) -> None:
    """Stands in for ``study._trainable``: reports the same record, after sleeping like a trial computes."""
    from ray import tune

    started = time.time()
    time.sleep(sleep_s)
    layers = config["plan"]["layers"]
    acc, rate = stand_in(layers)
    ended = time.time()
    record = {
        "val_top1": acc, "val_loss": 0.3, "rate": rate, "size_bytes": int(1e6 / rate), "train_seconds": sleep_s,
        "trial_seconds": ended - started, "node": os.environ.get("RAY_NODE_ID", "sim")[:8],
        "kept": {k: 1 - c["p"] for k, c in layers.items()}, "train_loss": 0.3, "started_unix": started,
        "ended_unix": ended,
    }
    tune.report({"ok": 1, "val_top1": acc, "record": json.dumps(record)})


def run_phase(study: optuna.Study, space: Any, units: list[LayerSearchParam], run_dir: Path, to_run: int,
              sleep_s: float, log: list[str]) -> dict[str, Any]:
    """One ``search`` command's trial phase, with the synthetic trainable in place of the real one."""
    from ray import tune

    s = space.data["search"]
    writes: list[tuple[int, float]] = []
    bookkeeping: list[float] = []
    spans: list[tuple[float, float]] = []

    def on_done(t: optuna.trial.FrozenTrial) -> None:  # as _run_with_tune's: a progress line and trials.csv
        t0 = time.perf_counter()
        n_done = len(st._finished(study))
        a = t.user_attrs
        log.append(f"[{n_done}/{s['trials']}] trial {t.number}: val {a.get('val_top1', 0):.2f}%")
        st.write_trials_csv(study, run_dir)
        bookkeeping.append(time.perf_counter() - t0)

    searcher = st._make_searcher(study, units, space, to_run, on_done, None, 1, [], log.append)
    complete = searcher._complete  # the study's writes for a finished trial (run in the proposer's thread)

    def timed_complete(trial: Any, trial_id: str, result: dict[str, Any] | None, error: bool) -> None:
        if result and result.get("record"):
            rec = json.loads(result["record"])
            spans.append((rec["started_unix"], rec["ended_unix"]))
        n = len(study.get_trials(deepcopy=False))
        before = len(bookkeeping)
        t0 = time.perf_counter()
        complete(trial, trial_id, result, error)
        total = time.perf_counter() - t0
        writes.append((n, total - (bookkeeping[-1] if len(bookkeeping) > before else 0.0)))

    searcher._complete = timed_complete
    trainable = tune.with_resources(tune.with_parameters(synthetic_trainable, sleep_s=sleep_s), {"cpu": 1, "gpu": 1})
    tuner = tune.Tuner(  # as _run_with_tune configures it
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, num_samples=to_run, max_concurrent_trials=s["concurrency"], reuse_actors=True
        ),
        run_config=tune.RunConfig(
            name=f"tune-{int(time.time())}", storage_path=str((run_dir / "ray").resolve()),
            failure_config=tune.FailureConfig(max_failures=s["retries"]), verbose=0, log_to_file=True,
        ),
    )
    t0 = time.time()
    tuner.fit()
    wall = time.time() - t0
    searcher.interrupted()  # stops the proposer
    first = min(a for a, _ in spans)
    last = max(b for _, b in spans)
    busy = sum(b - a for a, b in spans)
    return {
        "trials": len(spans),
        "wall_fit_s": round(wall, 2),
        "wall_first_start_to_last_end_s": round(last - first, 2),
        "busy_slot_s": round(busy, 2),
        "utilisation_fit": round(busy / (s["concurrency"] * wall), 4),
        "utilisation_steady": round(busy / (s["concurrency"] * (last - first)), 4),
        "asks": [(n, round(sec, 4), name) for n, sec, name in searcher.proposer.ask_log],
        "writes": [(n, round(sec, 4)) for n, sec in writes],
        "bookkeeping_s": [round(x, 4) for x in bookkeeping],
    }


def by_bucket(points: list[tuple[int, float]], edges: list[int]) -> list[dict[str, Any]]:
    out = []
    for lo, hi in zip(edges, edges[1:], strict=False):
        xs = [s for n, s in points if lo <= n < hi]
        if xs:
            out.append({"trials": f"{lo}-{hi - 1}", "n": len(xs), "median_s": round(statistics.median(xs), 4),
                        "p90_s": round(float(np.quantile(xs, 0.9)), 4), "max_s": round(max(xs), 4)})
    return out


def bench_storage(kind: str, url: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    space = load_space("smoke", [f"search.concurrency={args.concurrency}", f"search.sampler={args.sampler}",
                                 f"search.trials={args.trials}"])
    layers = [f"layer{i}" for i in range(args.dims // 2)]
    units = [LayerSearchParam(k, (k,), (0.3, 0.99), (2, 8)) for k in layers]
    run_dir = work / f"scale-{kind}"
    run_dir.mkdir(parents=True)
    s = space.data["search"]
    study = st.open_study(url, run_dir.name, st.make_sampler(s["sampler"], s["seed"], s["trials"], False),
                          fingerprint={"layers": "synthetic"})
    (run_dir / "space.yaml").write_text(space.to_yaml())
    write_json(run_dir / "baseline.json", {
        "checkpoint": "synthetic.pt", "val_top1": 89.8, "test_top1": 89.9, "test_top5": 99.8, "seconds": 0.0,
        "model": "lenet300", "dataset": "fashion-mnist", "fingerprint": "synthetic"})
    write_json(run_dir / "run.json", {"storage": st.shown_url(url), "study": run_dir.name, "space_source": "synthetic",
                                      "name": run_dir.name, "layers": layers})
    log: list[str] = []
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.time()
    phase1 = run_phase(study, space, units, run_dir, args.utilisation_trials, args.trial_seconds, log)
    print(f"{kind}: {phase1['trials']} trials at {args.concurrency}: utilisation {phase1['utilisation_fit']:.3f} "
          f"(steady {phase1['utilisation_steady']:.3f}), wall {phase1['wall_fit_s']:.0f} s", flush=True)
    # the same study resumed (as a rerun of the command would) with the sampler's stream continued
    study.sampler = st.make_sampler(s["sampler"], s["seed"] + len(study.trials), s["trials"], False)
    phase2 = run_phase(study, space, units, run_dir, args.trials - args.utilisation_trials, args.trial_seconds, log)
    wall = time.time() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    print(f"{kind}: resumed to {len(study.trials)} trials: utilisation {phase2['utilisation_fit']:.3f}", flush=True)
    asks = phase1["asks"] + phase2["asks"]
    writes = phase1["writes"] + phase2["writes"]
    edges = [0, 100, 200, 400, 600, 800, args.trials + 100]
    t1 = time.perf_counter()
    rep = subprocess.run([sys.executable, "run_search.py", "report", str(run_dir)], cwd=ROOT, capture_output=True,
                         text=True)
    report_s = time.perf_counter() - t1
    switched = [line for line in log if line.startswith("sampler auto")]
    return {
        "storage": kind,
        "trials_in_study": len(study.trials),
        "phase1_utilisation": phase1,
        "phase2_resume": phase2,
        "ask_all": {"median_s": round(statistics.median(s for _, s, _ in asks), 4),
                    "p90_s": round(float(np.quantile([s for _, s, _ in asks], 0.9)), 4),
                    "max_s": round(max(s for _, s, _ in asks), 4)},
        "ask_by_trials": by_bucket([(n, s) for n, s, _ in asks], edges),
        "write_by_trials": by_bucket(writes, edges),
        "bookkeeping_by_trials": by_bucket(
            [(n, b) for (n, _), b in zip(writes, phase1["bookkeeping_s"] + phase2["bookkeeping_s"], strict=False)],
            edges),
        "sampler_switch": switched,
        "driver_cpu_s": round(cpu, 1),
        "driver_cpu_share": round(cpu / wall, 3),
        "driver_maxrss_mb": round(ru1.ru_maxrss / 1024, 1),
        "wall_s": round(wall, 1),
        "report_s": round(report_s, 2),
        "report_ok": rep.returncode == 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storages", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--trials", type=int, default=1000, help="trials in the study at the end")
    ap.add_argument("--utilisation-trials", type=int, default=500, help="trials of the utilisation phase")
    ap.add_argument("--trial-seconds", type=float, default=2.0, help="a trial's sleep (standing for 60 s)")
    ap.add_argument("--dims", type=int, default=12, help="searched dimensions (p and bits of dims/2 layers)")
    ap.add_argument("--sampler", default="auto")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from clipq_search.search.cluster import init_ray

    work = Path(tempfile.mkdtemp(prefix="clipq-scale-"))
    server = None
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": args.gpus_per_node, "num_gpus": args.gpus_per_node, "node_ip_address": "127.0.0.1"})
    rows = []
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=args.gpus_per_node, num_gpus=args.gpus_per_node, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        init_ray(cluster.address, args.concurrency, 1, 1, print)
        for kind in args.storages:
            if kind == "postgres":
                from tests._postgres import PostgresServer

                server = PostgresServer().start()
                url = server.create_database("scale")
            else:
                url = f"sqlite:///{work / 'scale.db'}"
            rows.append(bench_storage(kind, url, args, work))
            print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("phase")}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    out.write_text(json.dumps({"benchmark": "scale", "machine": machine_line(), "settings": settings, "rows": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
