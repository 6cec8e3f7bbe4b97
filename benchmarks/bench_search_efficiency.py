#!/usr/bin/env python3
"""Search efficiency of the samplers (benchmarks.md figure 2), LeNet-300-100 on Fashion-MNIST.

For every sampler and seed, one search of N trials on search_spaces/lenet300_fashion.yaml
(trial fine-tune shortened by ``--epochs``). From each finished run:

- the hypervolume of the (validation accuracy, log10 compression rate) front after every
  finished trial (``pareto.hypervolume_history``, completion order), and the final one;
- the number of finished trials the sampler needs to reach random search's final
  (N-trial) hypervolume for the same seed (null when it never does).

All hypervolumes share one reference point: (baseline val accuracy - 10 points, rate 1x,
i.e. log10 rate 0). Units: accuracy points x decades of compression rate.

A uniform baseline is scored with the same trial function and reference point: the same
(p, bits) for every layer (fc3 included, regardless of its narrower search range), swept
over a grid. It does not depend on the sampler seed (trial training is seeded).

Resumable: each search is a run directory under ``--results`` (run_search resumes from its
study) and uniform grid points are cached in ``--results/uniform-e<epochs>/grid.json``.

    python benchmarks/bench_search_efficiency.py [--seeds 0 1 2] [--trials 64] \\
        [--samplers tpe gp nsga2 paper random] [--epochs 0.5] [--concurrency 2] \\
        [--results results/bench-search] [--out benchmarks/results/search_efficiency.json]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from clipq_search._io import write_json  # noqa: E402
from clipq_search.analysis import pareto, rundir  # noqa: E402
from clipq_search.search.space import load_space  # noqa: E402
from clipq_search.search.study import run_search  # noqa: E402
from clipq_search.search.trial import ensure_baseline, layer_names, run_trial, trial_payload  # noqa: E402
from clipq_search.training.loop import available_cpus  # noqa: E402

SPACE = ROOT / "search_spaces" / "lenet300_fashion.yaml"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "search_efficiency.json"
SAMPLERS = ["tpe", "gp", "nsga2", "paper", "random"]
GRID_P = [0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99]
GRID_BITS = [2, 3, 4, 5]
EPS = 1e-9


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.platform()}; {cpu}; {os.cpu_count()} CPUs ({available_cpus()} usable); "
        f"Python {platform.python_version()}; torch {torch.__version__}"
    )


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


# -- searches -----------------------------------------------------------------------------------


def run_name(sampler: str, seed: int, trials: int, epochs: float) -> str:
    return f"{sampler}-s{seed}-n{trials}-e{epochs:g}"


def one_search(
    args: argparse.Namespace, overrides: list[str], sampler: str, seed: int, base_val: float
) -> dict[str, Any]:
    import ray

    name = run_name(sampler, seed, args.trials, args.epochs)
    space = load_space(SPACE, overrides)
    log(f"== {name}")
    t0 = time.perf_counter()
    try:
        run_search(space, results_root=args.results, name=name, trials=args.trials, concurrency=args.concurrency,
                   sampler=sampler, seed=seed, log=lambda m: log(f"[{name}] {m}"))
    finally:
        ray.shutdown()
    wall = time.perf_counter() - t0
    run_dir = Path(args.results) / name
    df = rundir.load_trials(run_dir)
    hist = pareto.hypervolume_history(df, base_val)
    info = pareto.pareto_info(df, base_val)
    done = pareto.complete_trials(df)
    phase = None
    if len(done):
        phase = (done["datetime_complete"].max() - done["datetime_start"].min()).total_seconds()
    return {
        "sampler": sampler,
        "seed": seed,
        "run_dir": str(run_dir),
        "finished": int(len(hist)),
        "complete": info.n_complete,
        "failed": info.n_failed,
        "final_hv": float(hist["hypervolume"].iloc[-1]) if len(hist) else 0.0,
        "front_size": len(info.front),
        "hv_history": [float(v) for v in hist["hypervolume"]],
        "trial_order": [int(v) for v in hist["number"]],
        "best_rate_within_1pt": _num(hist["best_rate_within_1pt"].iloc[-1]) if len(hist) else None,
        "summed_trial_seconds": float(done["trial_seconds"].sum()),
        "trial_seconds_median": _num(done["trial_seconds"].median()) if len(done) else None,
        "trial_phase_seconds": phase,
        "this_invocation_seconds": wall,
        "front": [
            {"number": int(r["number"]), "val_top1": float(r["val_top1"]), "rate": float(r["rate"])}
            for _, r in df.set_index("number").loc[list(info.front)].reset_index().iterrows()
        ],
    }


def trials_to_reach(history: list[float], target: float) -> int | None:
    """Finished trials until the hypervolume first reaches ``target`` (None if never)."""
    for i, hv in enumerate(history):
        if hv >= target - EPS * max(1.0, abs(target)):
            return i + 1
    return None


# -- the uniform baseline -----------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(space_path: str, overrides: list[str], results_root: str) -> None:
    space = load_space(space_path, overrides)
    baseline = ensure_baseline(space, results_root, log=lambda m: None)
    payload = trial_payload(space, baseline)
    _WORKER.update(space=space, payload=payload, layers=layer_names(space, payload["info"]))


def _uniform_point(p: float, bits: int) -> dict[str, Any]:
    plan = {"layers": {name: {"p": p, "bits": bits} for name in _WORKER["layers"]}}
    try:
        out = run_trial(_WORKER["space"], plan, _WORKER["payload"], threads=1)
    except Exception as exc:  # noqa: BLE001 - a failed point is recorded, the grid goes on
        return {"p": p, "bits": bits, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"p": p, "bits": bits, "val_top1": out["val_top1"], "rate": out["rate"], "size_bytes": out["size_bytes"],
            "trial_seconds": out["trial_seconds"]}


def uniform_grid(args: argparse.Namespace, overrides: list[str], fingerprint: str, base_val: float) -> dict[str, Any]:
    cache_path = Path(args.results) / f"uniform-e{args.epochs:g}" / "grid.json"
    cache: dict[str, Any] = {}
    if cache_path.is_file():
        try:
            old = json.loads(cache_path.read_text())
            if old.get("baseline_fingerprint") == fingerprint and old.get("trial_epochs") == args.epochs:
                cache = old.get("points", {})
        except (OSError, ValueError):
            pass
    grid = [(p, b) for p in args.grid_p for b in args.grid_bits]
    key = lambda p, b: f"p={p:g},bits={b}"  # noqa: E731
    todo = [(p, b) for p, b in grid if key(p, b) not in cache or "error" in cache[key(p, b)]]
    log(f"== uniform grid: {len(grid)} points, {len(grid) - len(todo)} cached, {len(todo)} to run")
    t0 = time.perf_counter()

    def save() -> None:
        write_json(cache_path, {"baseline_fingerprint": fingerprint, "trial_epochs": args.epochs, "points": cache})

    if todo:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(args.concurrency, len(todo)), mp_context=ctx, initializer=_init_worker,
                                 initargs=(str(SPACE), overrides, str(args.results))) as pool:
            futs = {pool.submit(_uniform_point, p, b): (p, b) for p, b in todo}
            for i, fut in enumerate(as_completed(futs), 1):
                r = fut.result()
                cache[key(r["p"], r["bits"])] = r
                save()
                what = r.get("error") or f"val {r['val_top1']:.2f}%  rate {r['rate']:.1f}x  {r['trial_seconds']:.1f}s"
                log(f"[uniform {i}/{len(todo)}] p={r['p']:g} bits={r['bits']}: {what}")
    points = [cache[key(p, b)] for p, b in grid]
    ok = [r for r in points if "error" not in r]
    acc = np.array([r["val_top1"] for r in ok], dtype=float)
    rate = np.array([r["rate"] for r in ok], dtype=float)
    hv = pareto.hypervolume(acc, rate, base_val - pareto.HV_REF_DROP, 0.0)
    front = pareto.pareto_mask(acc, rate) if len(ok) else np.zeros(0, dtype=bool)
    return {
        "grid_p": list(args.grid_p),
        "grid_bits": list(args.grid_bits),
        "points": points,
        "n_points": len(points),
        "failed": len(points) - len(ok),
        "final_hv": hv,
        "front": sorted(({"p": r["p"], "bits": r["bits"], "val_top1": r["val_top1"], "rate": r["rate"]}
                         for r, f in zip(ok, front, strict=True) if f), key=lambda r: r["rate"]),
        "this_invocation_seconds": time.perf_counter() - t0,
        "note": "same (p, bits) on every layer, fc3 included; same run_trial (seeded) as the searches",
    }


# -- summary ------------------------------------------------------------------------------------


def _median_or_none(values: list[float]) -> float | None:
    med = statistics.median(values) if values else None
    return None if med is None or not math.isfinite(med) else float(med)


def summarise(runs: list[dict[str, Any]], samplers: list[str], seeds: list[int], trials: int) -> dict[str, Any]:
    random_hv = {r["seed"]: r["final_hv"] for r in runs if r["sampler"] == "random"}
    for r in runs:
        target = random_hv.get(r["seed"])
        r["random_final_hv"] = target
        r["trials_to_reach_random"] = None if target is None else trials_to_reach(r["hv_history"], target)
    table = {}
    for s in samplers:
        rs = [r for r in runs if r["sampler"] == s]
        reach = [r["trials_to_reach_random"] for r in rs if r["random_final_hv"] is not None]
        table[s] = {
            "seeds": [r["seed"] for r in rs],
            "median_final_hv": _median_or_none([r["final_hv"] for r in rs]),
            "final_hv_per_seed": [r["final_hv"] for r in rs],
            # never reaching counts as infinitely many trials in the median (null if that is the median)
            "median_trials_to_reach_random": _median_or_none([math.inf if v is None else v for v in reach]),
            "trials_to_reach_random_per_seed": reach,
            "reached": f"{sum(v is not None for v in reach)}/{len(reach)}",
        }
    return table


def print_table(table: dict[str, Any], uniform: dict[str, Any] | None, trials: int, ref: str) -> None:
    print(f"\nhypervolume in (val top-1 points) x (decades of rate); reference point {ref}; N = {trials} trials")
    reach = "median trials to reach random HV"
    print(f"{'sampler':<9} {'seeds':>5} {'median final HV':>16} {reach:>33} {'reached':>8}")
    for s, row in table.items():
        hv = "-" if row["median_final_hv"] is None else f"{row['median_final_hv']:.3f}"
        n = row["median_trials_to_reach_random"]
        nt = ("never" if row["trials_to_reach_random_per_seed"] else "-") if n is None else f"{n:g}"
        print(f"{s:<9} {len(row['seeds']):>5} {hv:>16} {nt:>33} {row['reached']:>8}")
    if uniform is not None:
        grid = f"(grid of {uniform['n_points']} points)"
        print(f"{'uniform':<9} {'-':>5} {uniform['final_hv']:>16.3f} {grid:>33}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--samplers", nargs="+", default=SAMPLERS, choices=SAMPLERS)
    ap.add_argument("--epochs", type=float, default=0.5, help="trial fine-tune length in epochs (trial.train.epochs)")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--results", default="results/bench-search", help="run directories (and the cached baseline)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--grid-p", type=float, nargs="+", default=GRID_P)
    ap.add_argument("--grid-bits", type=int, nargs="+", default=GRID_BITS)
    ap.add_argument("--no-uniform", action="store_true", help="skip the uniform (p, bits) grid")
    args = ap.parse_args()

    t0 = time.perf_counter()
    overrides = [f"trial.train.epochs={args.epochs}"]
    space = load_space(SPACE, overrides)
    baseline = ensure_baseline(space, args.results, log=log)
    base_val = float(baseline.val_top1)
    ref_acc = base_val - pareto.HV_REF_DROP
    ref = (f"(val top-1 {ref_acc:.2f}% = baseline {base_val:.2f}% - {pareto.HV_REF_DROP:g} points, "
           "rate 1x = log10 rate 0)")
    machine = machine_line()
    log(machine)
    log(f"baseline val {base_val:.2f}% (test {baseline.test_top1:.2f}%); HV reference {ref}")

    # random first, so the other samplers' trials-to-reach can be read as soon as they finish
    order = sorted(args.samplers, key=lambda s: s != "random")
    runs: list[dict[str, Any]] = []
    uniform = None

    def write(partial: bool) -> None:
        table = summarise(runs, [s for s in SAMPLERS if s in args.samplers], args.seeds, args.trials)
        out = Path(args.out)
        write_json(out, {
            "benchmark": "search_efficiency",
            "figure": 2,
            "machine": machine,
            "partial": partial,
            "space": str(SPACE.relative_to(ROOT)),
            "model": space.model,
            "trial_epochs": args.epochs,
            "trials": args.trials,
            "concurrency": args.concurrency,
            "seeds": args.seeds,
            "samplers": args.samplers,
            "baseline": {"val_top1": base_val, "test_top1": baseline.test_top1, "fingerprint": baseline.fingerprint},
            "hv_reference": {"val_top1": ref_acc, "drop_points": pareto.HV_REF_DROP, "rate": 1.0, "log10_rate": 0.0,
                             "text": ref},
            "hv_units": "accuracy points x decades of compression rate; history in completion order",
            "table": table,
            "uniform": uniform,
            "runs": runs,
            "total_seconds_this_invocation": time.perf_counter() - t0,
        })
        return table

    if not args.no_uniform:
        uniform = uniform_grid(args, overrides, baseline.fingerprint, base_val)
        log(f"uniform grid HV {uniform['final_hv']:.3f} ({uniform['n_points'] - uniform['failed']} points)")
        write(partial=True)
    for seed in args.seeds:
        for s in order:
            r = one_search(args, overrides, s, seed, base_val)
            runs.append(r)
            log(f"{s} seed {seed}: final HV {r['final_hv']:.3f} after {r['finished']} trials "
                f"({r['failed']} failed), summed trial compute {r['summed_trial_seconds']:.0f}s")
            write(partial=True)
    table = write(partial=False)
    print_table(table, uniform, args.trials, ref)
    print(f"\n{machine}\ntotal {time.perf_counter() - t0:.0f}s this invocation; wrote {args.out}")


if __name__ == "__main__":
    main()
