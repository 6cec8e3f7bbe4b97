#!/usr/bin/env python3
"""A simulated GPU cluster: does the driver keep the GPU slots busy, and how do asks and writes grow to 1,000 trials?

    python benchmarks/bench_scale.py                    # about 10 min here; writes benchmarks/results/scale.json
    python benchmarks/bench_scale.py --storages --out benchmarks/results/scale_utilisation.json   # phase U only

Everything but the training is the search's own: the study (``open_study``
on SQLite or a throwaway PostgreSQL server, tests/_postgres.py), the sampler
(``make_sampler``, default ``auto``), the searcher with its background
proposer (``searcher.StudySearcher``), what ``search`` does after each trial (a
progress line and trials.csv), Ray Tune configured as ``search`` configures it.

Phase L (per storage in ``--storages``): the study is filled with finished
trials to each size in ``--at`` and a window of ``--window`` trials runs
through the searcher with ``--concurrency`` plans in flight, Tune's calls made
directly and every trial of zero length. It measures ask latency, the
study's write latency per finished trial, the trials.csv rewrite, and the
trials per second the driver alone sustains; then ``report`` on the run
(``--at``'s last size + the window = 1,000 trials by default).

Phase U (``--utilisation-storage``): a ``ray.cluster_utils.Cluster`` of
``--nodes`` nodes with ``--gpus-per-node`` declared GPUs each (Ray schedules
declared GPUs without devices) runs ``--utilisation-trials`` trials, each
asking one GPU: a synthetic trainable that scores its plan with a closed-form
stand-in of (accuracy, log10 rate) and sleeps ``--trial-seconds`` (a 60-s
trial scaled down). It measures GPU-slot utilisation = busy slot-seconds /
(slots x wall), the time Tune spent inside the searcher's ``suggest`` and how
often a free slot found no plan ready, and the driver's CPU and memory.
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
        "ended_unix": ended, "pid": os.getpid(), **one_budget(acc, rate, sleep_s),
    }
    tune.report({"ok": 1, "val_top1": acc, "record": json.dumps(record)})


def one_budget(acc: float, rate: float, cpu_seconds: float) -> dict[str, Any]:
    """The record's multi-fidelity keys for a trial of one budget (a stand-in's epoch)."""
    return {"budget": 1.0, "rung": 0, "rungs": [{"rung": 0, "budget": 1.0, "val_top1": acc, "rate": rate}],
            "cpu_seconds": cpu_seconds}


def search_on_done(study: optuna.Study, run_dir: Path, s: Any, log: list[str],
                   seconds: list[tuple[int, float]]) -> Any:
    """What ``search`` does after each finished trial (as study._progress makes it): a progress line, trials.csv."""

    def on_done(t: optuna.trial.FrozenTrial) -> None:
        t0 = time.perf_counter()
        n_done = len(st._finished(study))
        a = t.user_attrs
        log.append(f"[{n_done}/{s.trials}] trial {t.number}: val {a.get('val_top1', 0):.2f}%")
        st.write_trials_csv(study, run_dir)
        seconds.append((t.number, time.perf_counter() - t0))

    return on_done


def make_searcher(study: optuna.Study, space: Any, units: list[LayerSearchParam], to_run: int, on_done: Any,
                  log: list[str]) -> Any:
    """The search's own searcher (no baseline: the synthetic runs set no accuracy constraint)."""
    from clipq_search.search.searcher import StudySearcher
    from clipq_search.search.worker_kills import KillLedger

    s = space.search
    return StudySearcher(study, units, st.distributions(units), space, to_run=to_run, on_done=on_done, baseline=None,
                         threads=1, kills=KillLedger(s.retries, s.concurrency, "", log.append), log=log.append)


def run_phase(study: optuna.Study, space: Any, units: list[LayerSearchParam], run_dir: Path, to_run: int,
              sleep_s: float, log: list[str]) -> dict[str, Any]:
    """One ``search`` command's trial phase, with the synthetic trainable in place of the real one."""
    from ray import tune

    s = space.search
    writes: list[tuple[int, float]] = []
    bookkeeping: list[tuple[int, float]] = []
    spans: list[tuple[float, float]] = []
    workers: list[int] = []

    searcher = make_searcher(study, space, units, to_run, search_on_done(study, run_dir, s, log, bookkeeping), log)
    complete = searcher._settle  # the study's writes for a finished trial (run in the proposer's thread)

    def timed_complete(trial: Any, trial_id: str, result: dict[str, Any] | None, error: bool) -> None:
        if result and result.get("record"):
            rec = json.loads(result["record"])
            spans.append((rec["started_unix"], rec["ended_unix"]))
            workers.append(rec["pid"])
        n = trial.number
        before = len(bookkeeping)
        t0 = time.perf_counter()
        complete(trial, trial_id, result, error)
        total = time.perf_counter() - t0
        writes.append((n, total - (bookkeeping[-1][1] if len(bookkeeping) > before else 0.0)))

    searcher._settle = timed_complete
    suggest = searcher.suggest
    asked: list[tuple[float, bool]] = []  # (seconds inside suggest, a plan was ready)

    def timed_suggest(trial_id: str) -> Any:
        t0 = time.perf_counter()
        out = suggest(trial_id)
        asked.append((time.perf_counter() - t0, out is not None))
        return out

    searcher.suggest = timed_suggest
    trainable = tune.with_resources(tune.with_parameters(synthetic_trainable, sleep_s=sleep_s), {"cpu": 1, "gpu": 1})
    tuner = tune.Tuner(  # as study._tuner configures it
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, num_samples=to_run, max_concurrent_trials=s.concurrency, reuse_actors=True
        ),
        run_config=tune.RunConfig(
            name=f"tune-{int(time.time())}", storage_path=str((run_dir / "ray").resolve()),
            failure_config=tune.FailureConfig(max_failures=s.retries), verbose=0, log_to_file=True,
        ),
    )
    t0 = time.time()
    tuner.fit()
    wall = time.time() - t0
    searcher.interrupted()  # stops the proposer
    pids = set(workers)
    first = min(a for a, _ in spans)
    last = max(b for _, b in spans)
    busy = sum(b - a for a, b in spans)
    return {
        "trials": len(spans),
        "wall_fit_s": round(wall, 2),
        "wall_first_start_to_last_end_s": round(last - first, 2),
        "busy_slot_s": round(busy, 2),
        "utilisation_fit": round(busy / (s.concurrency * wall), 4),
        "utilisation_steady": round(busy / (s.concurrency * (last - first)), 4),
        "worker_processes": len(pids),
        "suggest_calls": len(asked),
        "suggest_not_ready": sum(1 for _, ready in asked if not ready),
        "suggest_seconds_total": round(sum(sec for sec, _ in asked), 4),
        "suggest_seconds_max": round(max(sec for sec, _ in asked), 4),
        "asks": [(n, round(sec, 4), name) for n, sec, name in searcher.proposer.ask_log],
        "writes": [(n, round(sec, 4)) for n, sec in writes],
        "bookkeeping": [(n, round(x, 4)) for n, x in bookkeeping],
    }


def drive_without_ray(study: optuna.Study, space: Any, units: list[LayerSearchParam], run_dir: Path, to_run: int,
                      log: list[str]) -> dict[str, Any]:
    """Grow the study through the same searcher with Tune's calls made directly: trials of zero length.

    ``concurrency`` plans are in flight at any time (the sampler sees them as
    running trials); each completion is the searcher's ``on_trial_complete``
    with the synthetic trainable's record. The rate reached is what the driver
    alone sustains: trials finished per second with no time spent training.
    """
    from ray.tune.search import Searcher

    s = space.search
    writes: list[tuple[int, float]] = []
    bookkeeping: list[tuple[int, float]] = []
    searcher = make_searcher(study, space, units, to_run, search_on_done(study, run_dir, s, log, bookkeeping), log)
    complete = searcher._settle

    def timed_complete(trial: Any, trial_id: str, result: dict[str, Any] | None, error: bool) -> None:
        n = trial.number
        before = len(bookkeeping)
        t0 = time.perf_counter()
        complete(trial, trial_id, result, error)
        total = time.perf_counter() - t0
        writes.append((n, total - (bookkeeping[-1][1] if len(bookkeeping) > before else 0.0)))

    searcher._settle = timed_complete
    in_flight: dict[str, dict[str, Any]] = {}
    issued = done = 0
    t0 = time.perf_counter()
    while done < to_run:
        while len(in_flight) < s.concurrency:
            config = searcher.suggest(f"t{issued}")
            if config is None or config == Searcher.FINISHED:
                break
            in_flight[f"t{issued}"] = config
            issued += 1
        if not in_flight:
            time.sleep(0.001)
            continue
        trial_id = next(iter(in_flight))
        layers = in_flight.pop(trial_id)["plan"]["layers"]
        acc, rate = stand_in(layers)
        now = time.time()
        record = {"val_top1": acc, "val_loss": 0.3, "rate": rate, "size_bytes": int(1e6 / rate), "train_seconds": 0.0,
                  "trial_seconds": 0.0, "node": "none", "kept": {k: 1 - c["p"] for k, c in layers.items()},
                  "train_loss": 0.3, "started_unix": now, **one_budget(acc, rate, 0.0)}
        searcher.on_trial_complete(trial_id, {"ok": 1, "val_top1": acc, "record": json.dumps(record)})
        done += 1
    searcher.interrupted()  # finishes the deferred writes, stops the proposer
    wall = time.perf_counter() - t0
    return {
        "trials": done,
        "wall_s": round(wall, 2),
        "driver_trials_per_s": round(done / wall, 2),
        "bookkeeping": [(n, round(x, 4)) for n, x in bookkeeping],
        "asks": [(n, round(sec, 4), name) for n, sec, name in searcher.proposer.ask_log],
        "writes": [(n, round(sec, 4)) for n, sec in writes],
    }


def new_run(kind: str, url: str, args: argparse.Namespace, work: Path) -> tuple[optuna.Study, Any, list, Path]:
    """A run folder and its study in ``url``, as ``search`` makes them (synthetic baseline and layers)."""
    space = load_space("smoke", [f"search.concurrency={args.concurrency}", f"search.sampler={args.sampler}",
                                 f"search.trials={args.trials}"])
    layers = [f"layer{i}" for i in range(args.dims // 2)]
    units = [LayerSearchParam(k, (k,), (0.3, 0.99), (2, 8)) for k in layers]
    run_dir = work / f"scale-{kind}"
    run_dir.mkdir(parents=True)
    s = space.search
    study = st.open_study(url, run_dir.name, st.make_sampler(s.sampler, s.seed, s.trials, False),
                          fingerprint={"layers": "synthetic"})
    (run_dir / "space.yaml").write_text(space.to_yaml())
    write_json(run_dir / "baseline.json", {
        "checkpoint": "synthetic.pt", "val_top1": 89.8, "test_top1": 89.9, "test_top5": 99.8, "seconds": 0.0,
        "model": "lenet300", "dataset": "fashion-mnist", "fingerprint": "synthetic"})
    write_json(run_dir / "run.json", {"storage": st.shown_url(url), "study": run_dir.name, "space_source": "synthetic",
                                      "name": run_dir.name, "layers": layers})
    return study, space, units, run_dir


def prefill(study: optuna.Study, units: list[LayerSearchParam], n: int, seed: int) -> None:
    """Finished trials with the records a real trial leaves, until the study holds ``n``."""
    dists = st.distributions(units)
    rng = np.random.default_rng(seed)
    trials = []
    for _ in range(n - len(study.get_trials(deepcopy=False))):
        params = {k: (float(rng.uniform(d.low, d.high)) if isinstance(d, optuna.distributions.FloatDistribution)
                      else int(rng.integers(d.low, d.high + 1))) for k, d in dists.items()}
        layers = {u.key: {"p": params[f"p:{u.key}"], "bits": params[f"bits:{u.key}"]} for u in units}
        acc, rate = stand_in(layers)
        attrs = {"layers": layers, "val_top1": acc, "val_loss": 0.3, "rate": rate, "size_bytes": int(1e6 / rate),
                 "train_seconds": 60.0, "trial_seconds": 61.0, "node": "prefill",
                 "kept": {k: 1 - c["p"] for k, c in layers.items()}, "train_loss": 0.3, "queue_seconds": 0.0}
        trials.append(optuna.trial.create_trial(params=params, distributions=dists, values=[acc, float(np.log10(rate))],
                                                user_attrs=attrs))
    study.add_trials(trials)


def utilisation(kind: str, url: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Phase U: the search's trial phase on the simulated cluster, ``--utilisation-trials`` trials."""
    study, space, units, run_dir = new_run(f"{kind}-u", url, args, work)
    log: list[str] = []
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.time()
    out = run_phase(study, space, units, run_dir, args.utilisation_trials, args.trial_seconds, log)
    wall = time.time() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    print(f"{kind}: {out['trials']} trials at {args.concurrency}: utilisation {out['utilisation_fit']:.3f} "
          f"(first start to last end {out['utilisation_steady']:.3f}), wall {out['wall_fit_s']:.0f} s, "
          f"{out['worker_processes']} worker processes", flush=True)
    out.update({
        "storage": kind,
        "sampler_switch": [line for line in log if line.startswith("sampler auto")],
        "driver_cpu_s": round(cpu, 1),
        "driver_cpu_share": round(cpu / wall, 3),
        "driver_cpu_ms_per_trial": round(1000 * cpu / max(1, out["trials"]), 1),
        "driver_maxrss_mb": round(ru1.ru_maxrss / 1024, 1),
    })
    return out


def latency(kind: str, url: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Phase L: at each size in ``--at``, ``--window`` trials through the same searcher without Ray."""
    study, space, units, run_dir = new_run(kind, url, args, work)
    s = space.search
    log: list[str] = []
    windows = []
    for n in args.at:
        t0 = time.perf_counter()
        prefill(study, units, n, seed=n)
        fill_s = time.perf_counter() - t0
        # a rerun of the command at this size: the sampler's stream continued, `auto` starting as the GP again
        study.sampler = st.make_sampler(s.sampler, s.seed + len(study.trials), s.trials, False)
        w = drive_without_ray(study, space, units, run_dir, args.window, log)
        asks = [sec for _, sec, _ in w["asks"]]
        tpe_asks = [sec for _, sec, name in w["asks"] if name == "TPESampler"]
        windows.append({
            "trials_at_start": n, "prefill_s": round(fill_s, 1), "driver_trials_per_s": w["driver_trials_per_s"],
            "ask_median_s": round(statistics.median(asks), 4),
            "ask_median_tpe_s": round(statistics.median(tpe_asks), 4) if tpe_asks else None,
            "ask_max_s": round(max(asks), 4),
            "write_median_s": round(statistics.median(x for _, x in w["writes"]), 4),
            "write_p90_s": round(float(np.quantile([x for _, x in w["writes"]], 0.9)), 4),
            "bookkeeping_median_s": round(statistics.median(x for _, x in w["bookkeeping"]), 4),
            "asks": w["asks"],
        })
        print(f"{kind}: at {n} trials: driver alone {w['driver_trials_per_s']:.1f} trials/s, ask median "
              f"{windows[-1]['ask_median_s']:.3f} s, write median {windows[-1]['write_median_s']:.3f} s, "
              f"trials.csv {windows[-1]['bookkeeping_median_s']:.3f} s", flush=True)
    t1 = time.perf_counter()
    rep = subprocess.run([sys.executable, "run_search.py", "report", str(run_dir)], cwd=ROOT, capture_output=True,
                         text=True)
    report_s = time.perf_counter() - t1
    all_asks = [sec for w in windows for _, sec, _ in w["asks"]]
    return {
        "storage": kind,
        "windows": windows,
        "ask_median_all_s": round(statistics.median(all_asks), 4),
        "sampler_switch": [line for line in log if line.startswith("sampler auto")],
        "trials_in_study": len(study.trials),
        "report_s": round(report_s, 2),
        "report_ok": rep.returncode == 0,
        "report_error": rep.stderr.strip().splitlines()[-1] if rep.returncode else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storages", nargs="*", default=["sqlite", "postgres"], choices=["sqlite", "postgres"],
                    help="storages of phase L")
    ap.add_argument("--utilisation-storage", default="postgres", choices=["sqlite", "postgres", "none"],
                    help="storage of phase U (none: skip it)")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--utilisation-trials", type=int, default=160, help="trials of phase U")
    ap.add_argument("--trial-seconds", type=float, default=8.0, help="a trial's sleep in phase U (standing for 60 s)")
    ap.add_argument("--at", nargs="+", type=int, default=[0, 250, 500, 936],
                    help="phase L: study sizes at which a window of trials runs")
    ap.add_argument("--window", type=int, default=64, help="phase L: trials per window")
    ap.add_argument("--dims", type=int, default=12, help="searched dimensions (p and bits of dims/2 layers)")
    ap.add_argument("--sampler", default="auto")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    args.trials = max(args.at) + args.window

    import ray
    from ray.cluster_utils import Cluster

    from clipq_search.search.cluster import init_ray

    work = Path(tempfile.mkdtemp(prefix="clipq-scale-"))
    server = None
    cluster = None
    out: dict[str, Any] = {"benchmark": "scale", "machine": machine_line(), "cpus": os.cpu_count(),
                           "settings": {k: v for k, v in vars(args).items() if k != "out"}, "latency": []}
    t_all = time.time()
    try:
        urls = {}
        for kind in sorted(set(args.storages) | ({args.utilisation_storage} - {"none"})):
            if kind == "postgres":
                from tests._postgres import PostgresServer

                server = PostgresServer().start()
                urls[kind] = server.create_database("scale")
            else:
                urls[kind] = f"sqlite:///{work / 'scale.db'}"
        for kind in args.storages:
            out["latency"].append(latency(kind, urls[kind], args, work))
            row = out["latency"][-1]
            print(f"{kind}: report on {row['trials_in_study']} trials {row['report_s']:.1f} s "
                  f"({'ok' if row['report_ok'] else row['report_error']})", flush=True)
        if args.utilisation_storage != "none":
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": args.gpus_per_node, "num_gpus": args.gpus_per_node, "node_ip_address": "127.0.0.1"})
            for _ in range(args.nodes - 1):
                cluster.add_node(num_cpus=args.gpus_per_node, num_gpus=args.gpus_per_node, node_ip_address="127.0.0.1")
            cluster.wait_for_nodes()
            # simulated GPUs torch cannot see: the per-node version check would refuse them
            init_ray(cluster.address, args.concurrency, 1, 1, print, check_versions=False)
            kind = args.utilisation_storage
            out["utilisation"] = utilisation(kind, urls[kind], args, work)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    out["wall_s"] = round(time.time() - t_all, 1)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} ({out['wall_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
