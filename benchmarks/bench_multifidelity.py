#!/usr/bin/env python3
"""Single- against multi-fidelity search, with and without distillation, at equal compute (benchmarks.md, Figure 7).

One run per model and seed, several arms on the same dense baseline:

- ``single``: the single-fidelity search (``search.sampler`` auto: the GP
  while it keeps pace, then TPE; one budget per trial: 48 trials of 1 epoch
  for LeNet-300-100, 64 of 0.5 epoch for LeNet-5, as the presets had it);
- ``paper``: the paper's per-layer procedure (``--sampler paper``);
- ``moasha``: multi-fidelity, ``trial.rungs: [1, 3, 9]`` over a third of the
  single arm's trial epochs (so the longest rung is three times its trial),
  MO-ASHA with reduction factor 3, and as many plans as fit the single arm's
  trial epochs (a plan costs about 2.33 x its first rung on average);
- ``moasha-distill``: the same with the dense baseline as teacher
  (``train.distill.weight`` 0.5, temperature 4) in trials and finals.

Every arm then runs ``final --top K`` (the K plans of its front nearest the
0.5-point export boundary, full length, chosen on full-length validation
accuracy). The figures: the best file rate within 0.25, 0.5 and 1 point of
the dense baseline, chosen on **validation** among the arm's finals, with the
**test** accuracy of that model reloaded from its ``.clipq`` file; and the
compute, in CPU-seconds of the trials and the final runs (each measured as its
worker's process CPU time).

    python benchmarks/bench_multifidelity.py --models lenet300 --seeds 0 1 2 [--arms single moasha ...] [--top 3] \
        [--plans N] [--no-control]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SPACES  # noqa: E402
from _machine import machine_line  # noqa: E402

from clipq_search.analysis.rundir import load_trials  # noqa: E402
from clipq_search.search.final import run_final  # noqa: E402
from clipq_search.search.space import load_space  # noqa: E402
from clipq_search.search.study import run_search  # noqa: E402

ARMS = ("single", "paper", "moasha", "moasha-distill")
TOLERANCES = (0.25, 0.5, 1.0)
RUNGS = (1, 3, 9)
REDUCTION = 3
DISTILL = ["trial.train.distill.weight=0.5", "final.train.distill.weight=0.5"]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "multifidelity.json"


def mean_plan_cost(rungs: tuple[float, ...] = RUNGS, eta: float = REDUCTION) -> float:
    """Expected epochs of one plan, in units of its first rung, when a share 1/eta goes on from each rung."""
    cost, share, done = 0.0, 1.0, 0.0
    for r in rungs:
        cost += share * (r - done)
        share, done = share / eta, r
    return cost / rungs[0]


# The single-fidelity search the multi-fidelity one is measured against: (epochs per trial, trials) per model.
SINGLE = {"lenet300": (1.0, 48), "lenet5": (0.5, 64)}


def arm_space(model: str, arm: str, seed: int, plans: int | None = None) -> tuple[Any, int]:
    """The arm's space (the shipped one, with the arm's trial settings) and its number of trials (plans).

    ``plans`` sets a multi-fidelity arm's number of plans (default: as many as fit the single arm's trial epochs).
    """
    seeds = [f"trial.train.seed={seed}", f"final.train.seed={seed}"]
    epochs, trials = SINGLE[model]
    if arm in ("single", "paper"):
        overrides = [*seeds, f"trial.train.epochs={epochs}", "trial.rungs=null"]
        return load_space(ROOT / "search_spaces" / SPACES[model], overrides), trials
    first = epochs / 3
    overrides = [
        *seeds, f"trial.train.epochs={first}", f"trial.rungs={list(RUNGS)}", f"trial.reduction_factor={REDUCTION}"
    ]
    if arm == "moasha-distill":
        overrides += DISTILL
    if plans is None:
        plans = round(trials * epochs / (first * mean_plan_cost()))
    return load_space(ROOT / "search_spaces" / SPACES[model], overrides), plans


def best_within(finals: list[dict[str, Any]], baseline_val: float) -> dict[str, Any]:
    """Per tolerance: the highest file rate among the finals within it on full-length validation accuracy."""
    out = {}
    for tol in TOLERANCES:
        ok = [f for f in finals if baseline_val - f["val_top1"] <= tol + 1e-9]
        b = max(ok, key=lambda f: f["rate"]) if ok else None
        out[str(tol)] = None if b is None else {k: b[k] for k in ("trial", "rate", "val_top1", "test_top1")}
    return out


def run_arm(
    model: str, arm: str, seed: int, results: Path, top: int, control: bool, log: Callable[[str], None],
    plans: int | None = None,
) -> dict[str, Any]:
    space, trials = arm_space(model, arm, seed, plans)
    name = f"mf-{model}-s{seed}-{arm}" + (f"-p{plans}" if plans is not None else "")
    sampler = "paper" if arm == "paper" else None
    t0 = time.perf_counter()
    run_search(space, results_root=results, name=name, seed=seed, trials=trials, sampler=sampler, log=log)
    search_wall = time.perf_counter() - t0
    run_dir = results / name
    df = load_trials(run_dir)
    search_cpu = float(df["cpu_seconds"].fillna(0).sum())
    t0 = time.perf_counter()
    overrides = DISTILL[1:] if arm == "moasha-distill" else []
    m = run_final(
        run_dir, overrides=[f"final.train.seed={seed}", *overrides], top=top, max_drop=0.5, control=control,
        force=True, log=log,
    )
    final_wall = time.perf_counter() - t0
    baseline = json.loads((run_dir / "baseline.json").read_text())
    finals = [
        {
            "trial": c["trial"],
            "rate": c["rate"],
            "val_top1": c["val_top1"],
            "test_top1": c["test_top1"],
            "short_val_top1": c.get("short_val_top1"),
            "short_rate": c.get("short_rate"),
            "cpu_seconds": m.get("cpu_seconds", {}).get(f"trial-{c['trial']}"),
        }
        for c in m["candidates"]
    ]
    final_cpu = float(sum(m.get("cpu_seconds", {}).values()))
    complete = df[df["state"] == "COMPLETE"]
    return {
        "model": model,
        "seed": seed,
        "arm": arm,
        "top": top,
        "plans": plans,  # None: the number that gives the single arm's trial epochs
        "control": control,
        "trials": int(len(df)),
        "budgets": sorted({float(b) for b in complete["budget"].dropna()}),
        "baseline_val_top1": baseline["val_top1"],
        "baseline_test_top1": baseline["test_top1"],
        "control_test_top1": m.get("control_test_top1"),
        "search_wall_seconds": search_wall,
        "final_wall_seconds": final_wall,
        "search_cpu_seconds": search_cpu,
        "final_cpu_seconds": final_cpu,
        "total_cpu_seconds": search_cpu + final_cpu,
        "finals": finals,
        "chosen": m.get("trial"),
        "best_within": best_within(finals, baseline["val_top1"]),
    }


def top_of(row: dict[str, Any]) -> int:
    """The row's ``final --top K`` (rows written before the benchmark kept it ran 3)."""
    return row.get("top", 3)


def variant(row: dict[str, Any]) -> tuple[str, int, int | None]:
    """What sets a row apart from another of its model and seed: arm, ``--top`` and ``--plans``."""
    return row["arm"], top_of(row), row.get("plans")


def cell(best: dict[str, Any] | None) -> str:
    return f"{best['rate']:.1f}x @ {best['test_top1']:.2f}%" if best else "-"


def summary(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for model in sorted({r["model"] for r in rows}):
        for arm, top, plans in sorted({variant(r) for r in rows if r["model"] == model},
                                      key=lambda a: (ARMS.index(a[0]), a[1], a[2] or 0)):
            mine = [r for r in rows if r["model"] == model and variant(r) == (arm, top, plans)]
            cells = []
            for tol in TOLERANCES:
                rates = [(r["best_within"][str(tol)] or {}).get("rate", 0.0) for r in mine]
                cells.append(f"{statistics.median(rates):6.1f}x")
            cpu = statistics.median(r["total_cpu_seconds"] for r in mine)
            head = f"{model:<9} {arm:<15} top {top}  plans {plans or 'equal':<5}  seeds {len(mine)}  median "
            lines.append(head + " ".join(cells) + f"  cpu {cpu:7.0f}s")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["lenet300"], choices=sorted(SPACES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--top", type=int, default=3, help="finals per arm (final --top K)")
    ap.add_argument("--plans", type=int, help="plans of the multi-fidelity arms (default: the single arm's epochs)")
    ap.add_argument("--no-control", dest="control", action="store_false",
                    help="no dense control run (by default the first arm of each seed runs one, for reference)")
    ap.add_argument("--results", default=str(ROOT / "results" / "bench"))
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    results, out = Path(args.results), Path(args.out)
    print(machine_line(), flush=True)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []  # other models, seeds or arms kept
    for model in args.models:
        for seed in args.seeds:
            for i, arm in enumerate(args.arms):
                plans = args.plans if arm.startswith("moasha") else None
                row = run_arm(model, arm, seed, results, args.top, control=args.control and i == 0,
                              log=lambda m: print(m, flush=True), plans=plans)
                # rows of other --top or --plans values are kept beside
                rows = [r for r in rows if (r["model"], r["seed"], *variant(r)) != (model, seed, *variant(row))] + [row]
                out.parent.mkdir(parents=True, exist_ok=True)
                doc = {"benchmark": "multifidelity", "machine": machine_line(), "command": " ".join(sys.argv)}
                out.write_text(json.dumps({**doc, "rows": rows}, indent=2) + "\n")
                cells = " ".join(f"{t}pt: {cell(row['best_within'][str(t)])}" for t in TOLERANCES)
                print(f"== {model} seed {seed} {arm}: {cells}; cpu {row['total_cpu_seconds']:.0f}s", flush=True)
    print("\n".join(summary(rows)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
