"""How long one ``study.ask`` takes against the number of finished trials, per sampler and dimension.

    python benchmarks/bench_ask.py                       # gp and tpe, 6 and 12 dims, up to 1,000 trials
    python benchmarks/bench_ask.py --samplers tpe --dims 12 --trials 100 1000

The samplers are the search's own (``make_sampler``); each point is a study
of ``n`` finished trials with the search's two objectives (a closed-form
stand-in for accuracy and log rate), plus ``--pending`` running trials, as at
cluster concurrency. Each ask is followed by a tell, so the count stays ``n``.
A sampler whose ask passes ``--give-up`` seconds is measured once at each
larger ``n`` and not past it. In-memory storage: this is the sampler's cost
alone (bench_scale.py measures it with the storage). Writes
``benchmarks/results/ask_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clipq_search.search.space import LayerSearchParam  # noqa: E402
from clipq_search.search.study import distributions, make_sampler  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "ask_latency.json"


def stand_in(params: dict[str, float], layers: list[str]) -> tuple[float, float]:
    """(accuracy-like, log10-rate-like) of a plan: cheap, smooth, conflicting objectives."""
    p = np.array([params.get(f"p:{k}", 0.5) for k in layers])
    b = np.array([params.get(f"bits:{k}", 4) for k in layers], dtype=float)
    w = np.linspace(1.0, 2.0, len(layers))  # later layers matter more
    acc = 90.0 - float(np.sum(w * (np.exp(4 * (p - 0.9)) + 2.0 ** (2 - b))))
    rate = float(np.log10(32.0 / np.average(b * (1 - p) + 0.05, weights=w)))
    return acc, rate


def study_with(sampler_name: str, dims: int, n: int, pending: int, seed: int) -> tuple[optuna.Study, dict, list[str]]:
    layers = [f"l{i}" for i in range(dims // 2)]
    units = [LayerSearchParam(k, (k,), (0.3, 0.99), (2, 8)) for k in layers]
    dists = distributions(units)
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=make_sampler(sampler_name, seed, n, False))
    rng = np.random.default_rng(seed)
    trials = []
    for _ in range(n):
        params = {k: (float(rng.uniform(d.low, d.high)) if isinstance(d, optuna.distributions.FloatDistribution)
                      else int(rng.integers(d.low, d.high + 1))) for k, d in dists.items()}
        values = list(stand_in(params, layers))
        trials.append(optuna.trial.create_trial(params=params, distributions=dists, values=values))
    study.add_trials(trials)
    for _ in range(pending):  # running trials at cluster concurrency (the sampler sees them)
        study.enqueue_trial({k: t for k, t in trials[rng.integers(n)].params.items()})
        study.ask(dists)
    return study, dists, layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samplers", nargs="+", default=["gp", "tpe"])
    ap.add_argument("--dims", nargs="+", type=int, default=[6, 12])
    ap.add_argument("--trials", nargs="+", type=int, default=[25, 50, 100, 200, 400, 1000])
    ap.add_argument("--asks", type=int, default=3, help="asks per point (the median is reported)")
    ap.add_argument("--pending", type=int, default=31, help="running trials the sampler sees (concurrency - 1)")
    ap.add_argument("--give-up", type=float, default=30.0, help="seconds: past this, one ask per larger point")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    rows = []
    for name in args.samplers:
        for dims in args.dims:
            slow = False
            for n in args.trials:
                study, dists, layers = study_with(name, dims, n, args.pending, seed=n)
                times = []
                for _ in range(1 if slow else args.asks):
                    t0 = time.perf_counter()
                    trial = study.ask(dists)
                    times.append(time.perf_counter() - t0)
                    study.tell(trial, list(stand_in(trial.params, layers)))
                med = statistics.median(times)
                rows.append({"sampler": name, "dims": dims, "trials": n, "pending": args.pending,
                             "ask_s": [round(t, 4) for t in times], "median_s": round(med, 4)})
                each = ", ".join(f"{t:.3f}" for t in times)
                print(f"{name:4s} {dims:2d} dims {n:5d} trials: ask {med:8.3f} s  ({each})", flush=True)
                if med > args.give_up:
                    if slow:
                        break
                    slow = True
    out = {"python": platform.python_version(), "optuna": optuna.__version__, "cpus": __import__("os").cpu_count(),
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
