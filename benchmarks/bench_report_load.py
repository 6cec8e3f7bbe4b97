#!/usr/bin/env python3
"""Load: `report` on a run whose study holds 2,000 trials (issue: reliability).

Builds a run directory with a real Optuna SQLite study of N trials (synthetic
metrics on a plausible accuracy/compression trade-off, a few failed trials),
exports trials.csv from the study as `search` does, then times the real
command `python run_search.py report RUN_DIR` (median of several runs).

    python benchmarks/bench_report_load.py [--trials 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import optuna  # noqa: E402
from _machine import machine_line  # noqa: E402

from clipq_search._io import write_json  # noqa: E402
from clipq_search.search.space import LayerSearchParam  # noqa: E402
from clipq_search.search.study import ERROR_ATTR, distributions, open_study, write_trials_csv  # noqa: E402


def build_run(run_dir: Path, n: int, seed: int = 0) -> float:
    rng = random.Random(seed)
    layers = ["fc1", "fc2", "fc3"]
    units = [LayerSearchParam(name, (name,), (0.5, 0.99), (2, 6)) for name in layers]
    dists = distributions(units)
    run_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    study = open_study(f"sqlite:///{run_dir / 'study.db'}", run_dir.name, optuna.samplers.RandomSampler(seed=seed))
    for _ in range(n):
        trial = study.ask(dists)
        p = [trial.params[f"p:{name}"] for name in layers]
        b = [trial.params[f"bits:{name}"] for name in layers]
        trial.set_user_attr("layers", {name: {"p": p[i], "bits": b[i]} for i, name in enumerate(layers)})
        if rng.random() < 0.02:
            trial.set_user_attr(ERROR_ATTR, "RuntimeError: synthetic failure")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        rate = 1.0 / max(1e-3, (1 - statistics.mean(p)) * statistics.mean(b) / 32)
        acc = 89.8 - 4 * max(0.0, statistics.mean(p) - 0.8) ** 1.5 * 10 - (6 - min(b)) * 0.2 + rng.gauss(0, 0.2)
        for key, value in {
            "val_top1": acc,
            "rate": rate,
            "size_bytes": int(1066440 / rate),
            "val_loss": 0.3,
            "train_seconds": 3.0,
            "trial_seconds": 3.5,
            "node": "synthetic",
            "kept": {name: 1 - p[i] for i, name in enumerate(layers)},
        }.items():
            trial.set_user_attr(key, value)
        study.tell(trial, [acc, math.log10(rate)])
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    write_trials_csv(study, run_dir)
    export_s = time.perf_counter() - t1
    (run_dir / "space.yaml").write_text("model: lenet300\n")
    write_json(
        run_dir / "baseline.json",
        {
            "checkpoint": "synthetic.pt",
            "val_top1": 89.8,
            "test_top1": 89.9,
            "test_top5": 99.8,
            "seconds": 0.0,
            "model": "lenet300",
            "dataset": "fashion-mnist",
            "fingerprint": "synthetic",
        },
    )
    write_json(
        run_dir / "run.json", {"storage": "sqlite", "space_source": "synthetic", "name": run_dir.name, "layers": layers}
    )
    print(f"built a study of {n} trials in {build_s:.1f}s; trials.csv export {export_s:.2f}s")
    return export_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "report_load.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "load"
        export_s = build_run(run_dir, args.trials)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "run_search.py", "report", str(run_dir)], cwd=ROOT, check=True, capture_output=True
            )
            times.append(time.perf_counter() - t0)
        size = (run_dir / "report.html").stat().st_size
    med = statistics.median(times)
    print(
        f"report on {args.trials} trials: median {med:.2f}s over {args.repeats} runs (whole command, "
        f"interpreter start included); report.html {size / 1e6:.1f} MB"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "report_load",
                "machine": machine_line(),
                "trials": args.trials,
                "report_seconds": times,
                "median_seconds": med,
                "trials_csv_export_seconds": export_s,
                "html_bytes": size,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
