#!/usr/bin/env python3
"""Compression at iso-accuracy (benchmarks.md figure 1).

For each model and seed: search (the shipped space), then finalise several
Pareto plans with the full-length CLIP-Q run, choose on **validation**
accuracy the highest file-byte rate within 0.5 points of the dense baseline,
and quote that model's **test** accuracy (reloaded from its .clipq file)
against the dense baseline and the dense control (same extra epochs, no
compression). Also the best rate within 0.25, 0.5, 1 and 2 points.

    python benchmarks/bench_iso_accuracy.py --models lenet300 lenet5 --seeds 0 1 2

``--set KEY.PATH=VALUE`` (repeatable) changes the shipped space, e.g. to
rerun a figure measured with an earlier version of a preset.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_line  # noqa: E402

from clipq_search.analysis.pareto import complete_trials, pareto_info, plan_of  # noqa: E402
from clipq_search.analysis.rundir import load_trials  # noqa: E402
from clipq_search.core.plan import Plan  # noqa: E402
from clipq_search.search.final import run_final  # noqa: E402
from clipq_search.search.space import load_space  # noqa: E402
from clipq_search.search.study import run_search  # noqa: E402
from clipq_search.search.trial import write_plan_json  # noqa: E402

SPACES = {"lenet300": "lenet300_fashion.yaml", "lenet5": "lenet5_fashion.yaml"}
TOLERANCES = (0.25, 0.5, 1.0, 2.0)


def candidates(run_dir: Path, baseline_val: float, k: int, max_trial_drop: float) -> list[int]:
    """Up to k Pareto trials with trial-level val drop <= max_trial_drop, spread evenly in log rate."""
    df = load_trials(run_dir)
    info = pareto_info(df, baseline_val)
    comp = complete_trials(df).set_index("number")
    front = [n for n in info.front if baseline_val - comp.loc[n, "val_top1"] <= max_trial_drop]
    if len(front) <= k:
        return sorted(front, key=lambda n: -comp.loc[n, "rate"])
    logs = {n: math.log(comp.loc[n, "rate"]) for n in front}
    lo, hi = min(logs.values()), max(logs.values())
    chosen: list[int] = []
    for i in range(k):
        target = hi - (hi - lo) * i / (k - 1)
        best = min((n for n in front if n not in chosen), key=lambda n: abs(logs[n] - target))
        chosen.append(best)
    return sorted(chosen, key=lambda n: -comp.loc[n, "rate"])


def run_one(
    model: str, seed: int, results: Path, trials: int | None, k: int, max_trial_drop: float, log,
    overrides: list[str],
) -> dict:
    space = load_space(
        ROOT / "search_spaces" / SPACES[model], [*overrides, f"final.train.seed={seed}", f"trial.train.seed={seed}"]
    )
    name = f"iso-{model}-s{seed}"
    t0 = time.perf_counter()
    run_search(space, results_root=results, name=name, seed=seed, trials=trials, log=log)
    search_s = time.perf_counter() - t0
    run_dir = results / name
    baseline = json.loads((run_dir / "baseline.json").read_text())
    finals = []
    for i, number in enumerate(candidates(run_dir, baseline["val_top1"], k, max_trial_drop)):
        out = run_dir / f"final-trial{number}"
        if (out / "metrics.json").exists():
            m = json.loads((out / "metrics.json").read_text())
        else:
            plan_path = out / "plan.json"
            write_plan_json(plan_path, Plan.from_dict(plan_of(load_trials(run_dir), number)), source={"trial": number})
            m = run_final(
                run_dir,
                config=str(plan_path),
                overrides=[f"final.train.seed={seed}"],
                log=log,
                out_dir=out,
                control=(i == 0),
            )
        m["trial"] = number
        finals.append(m)
        log(
            f"{name}: trial {number} -> rate {m['rate']:.1f}x, val {m['compressed_val_top1']:.2f}%, "
            f"test {m['compressed_test_top1']:.2f}%"
        )
    control = next((m["control_test_top1"] for m in finals if m.get("control_test_top1") is not None), None)
    best = {}
    for tol in TOLERANCES:
        ok = [m for m in finals if baseline["val_top1"] - m["compressed_val_top1"] <= tol]
        b = max(ok, key=lambda m: m["rate"]) if ok else None
        best[str(tol)] = (
            None
            if b is None
            else {
                "rate": b["rate"],
                "val_top1": b["compressed_val_top1"],
                "test_top1": b["compressed_test_top1"],
                "file_bytes": b["file_bytes"],
                "trial": b["trial"],
            }
        )
    return {
        "model": model,
        "seed": seed,
        "overrides": overrides,
        "baseline_val_top1": baseline["val_top1"],
        "baseline_test_top1": baseline["test_top1"],
        "control_test_top1": control,
        "search_seconds": search_s,
        "finals": [
            {k2: m[k2] for k2 in ("trial", "rate", "file_bytes", "compressed_val_top1", "compressed_test_top1", "plan")}
            for m in finals
        ],
        "best_within": best,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["lenet300", "lenet5"], choices=sorted(SPACES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--trials", type=int, help="trials per search (default: the space's)")
    ap.add_argument("--finals", type=int, default=5, help="Pareto plans finalised per search")
    ap.add_argument("--max-trial-drop", type=float, default=3.0, help="candidates: trial val drop at most this")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="change the shipped space, e.g. --set search.trials=48 (repeatable)")
    ap.add_argument("--results", default=str(ROOT / "results" / "bench"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "iso_accuracy.json"))
    args = ap.parse_args()
    results = Path(args.results)
    out = Path(args.out)
    # Keep rows of earlier invocations (other models or seeds) in the same file.
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    for model in args.models:
        for seed in args.seeds:
            rows = [r for r in rows if (r["model"], r["seed"]) != (model, seed)]
            rows.append(
                run_one(
                    model, seed, results, args.trials, args.finals, args.max_trial_drop, lambda m: print(m, flush=True),
                    args.overrides,
                )
            )
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(
                json.dumps({"benchmark": "iso_accuracy", "machine": machine_line(), "rows": rows}, indent=2) + "\n"
            )
    print(
        f"\n{'model':<9} {'seed':>4} {'base test':>9} {'control':>8} "
        + " ".join(f"{'<=' + str(t) + 'pt':>16}" for t in TOLERANCES)
    )
    for r in rows:
        cells = []
        for t in TOLERANCES:
            b = r["best_within"][str(t)]
            cells.append(f"{b['rate']:>6.1f}x @ {b['test_top1']:5.2f}%" if b else f"{'-':>16}")
        ctrl = f"{r['control_test_top1']:.2f}" if r["control_test_top1"] is not None else "-"
        print(f"{r['model']:<9} {r['seed']:>4} {r['baseline_test_top1']:>9.2f} {ctrl:>8} " + " ".join(cells))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
