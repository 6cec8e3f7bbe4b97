#!/usr/bin/env python3
"""Distillation from the dense network during CLIP-Q fine-tuning, on and off (benchmarks.md, Distillation).

The same per-layer plans, the same dense baseline, the same fine-tuning
recipe and seeds; once with the plain cross-entropy, once with the dense
baseline as teacher (``TrainConfig.distill_weight``, ``distill_temperature``:
``(1 - w) * CE + w * T^2 * KL``). Each model is stripped, written as a
``.clipq`` file and measured as reloaded from it (as ``bench_two_stage.py``
does), so the rate is the file's.

    python benchmarks/bench_distill.py [--models lenet300 lenet5] [--seeds 0 1 2]
        [--levels lenet300=0.95:2,0.93:3 lenet5=0.97:2,0.95:3] [--epochs lenet300=6 lenet5=4]
        [--weight 0.5] [--temperature 4] [--out benchmarks/results/distill.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import SPACES, dense_baseline, start  # noqa: E402
from bench_two_stage import DEFAULT_EPOCHS, finetune_config, finish, parse_epochs  # noqa: E402

from clipq_search.core.plan import LayerConfig, Plan  # noqa: E402
from clipq_search.core.surgery import attach_clipq, strip_clipq  # noqa: E402
from clipq_search.training.data import DEFAULT_ROOTS  # noqa: E402
from clipq_search.training.loop import evaluate, train  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "distill.json"
# High compression, where accuracy is lost and distillation could win it back.
DEFAULT_LEVELS = {"lenet300": "0.95:2,0.93:3", "lenet5": "0.97:2,0.95:3"}


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_levels(items: list[str] | None, models: list[str]) -> dict[str, list[tuple[float, int]]]:
    """``MODEL=P:B,P:B`` per model (defaults for the others)."""
    given = dict(item.split("=", 1) for item in items or [])
    out = {}
    for model in models:
        pairs = [pair.split(":") for pair in given.get(model, DEFAULT_LEVELS[model]).split(",")]
        out[model] = [(float(p), int(b)) for p, b in pairs]
    return out


def run_one(name: str, base: Any, splits: Any, p: float, bits: int, epochs: float, seed: int,
            distill: tuple[float, float] | None, device: Any, tmp: Path) -> dict[str, Any]:
    """CLIP-Q fine-tune of ``base`` with the plan (p, bits) everywhere; distilled from ``base`` when asked."""
    model = copy.deepcopy(base)
    plan = Plan(default=LayerConfig(p, bits))
    attach_clipq(model, plan)
    cfg = finetune_config(epochs, seed)
    if distill is not None:
        cfg = dataclasses.replace(cfg, distill_weight=distill[0], distill_temperature=distill[1])
    t0 = time.perf_counter()
    train(model, splits.train, cfg, device=device, progress=False, desc="distill" if distill else "plain",
          teacher=copy.deepcopy(base) if distill is not None else None)
    seconds = time.perf_counter() - t0
    strip_clipq(model)
    res = finish(name, model, plan, splits, device, tmp, f"{name}-{p}-{bits}-{seed}-{'kd' if distill else 'ce'}")
    return {"seconds": round(seconds, 1), **{k: res[k] for k in ("val_top1", "test_top1", "rate", "file_bytes")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"], choices=sorted(SPACES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="fine-tuning seeds")
    parser.add_argument("--levels", nargs="+", metavar="MODEL=P:B[,P:B]")
    parser.add_argument("--epochs", nargs="+", metavar="[MODEL=]E",
                        help=f"fine-tuning epochs (default {DEFAULT_EPOCHS})")
    parser.add_argument("--weight", type=float, default=0.5, help="distill_weight of the distilled runs")
    parser.add_argument("--temperature", type=float, default=4.0, help="distill_temperature of the distilled runs")
    parser.add_argument("--baseline-seed", type=int, default=0)
    parser.add_argument("--baseline-epochs", type=float, default=None,
                        help="pretrain the baseline this long instead of its recipe (quick checks; no cache)")
    parser.add_argument("--root", default=DEFAULT_ROOTS["fashion-mnist"], help="folder with the four IDX files")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all usable CPUs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    levels = parse_levels(args.levels, args.models)
    epochs = parse_epochs(args.epochs, args.models)

    started = time.perf_counter()
    device, splits, head = start("distill", args, argv)
    results: dict[str, Any] = {
        **head,
        "distill": {"weight": args.weight, "temperature": args.temperature, "teacher": "the dense baseline"},
        "finetune": {k: v for k, v in finetune_config(1.0, 0).to_dict().items() if k not in ("epochs", "seed")},
        "seeds": args.seeds,
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="distill_") as tmp_s:
        tmp = Path(tmp_s)
        for name in args.models:
            base, source = dense_baseline(name, splits, device, seed=args.baseline_seed, log=log,
                                          epochs=args.baseline_epochs)
            btest = evaluate(base, splits.test, device=device)["top1"]
            base.cpu()
            entry: dict[str, Any] = {"baseline": {"source": source, "test_top1": btest}, "epochs": epochs[name],
                                     "levels": []}
            results["models"][name] = entry
            for p, bits in levels[name]:
                runs = []
                for seed in args.seeds:
                    plain = run_one(name, base, splits, p, bits, epochs[name], seed, None, device, tmp)
                    kd = run_one(name, base, splits, p, bits, epochs[name], seed, (args.weight, args.temperature),
                                 device, tmp)
                    runs.append({"seed": seed, "plain": plain, "distilled": kd,
                                 "test_gain": round(kd["test_top1"] - plain["test_top1"], 4)})
                    log(f"{name} p {p} b {bits} seed {seed}: test {plain['test_top1']:.2f}% plain, "
                        f"{kd['test_top1']:.2f}% distilled ({runs[-1]['test_gain']:+.2f}), rate {plain['rate']:.1f}x")
                gains = [r["test_gain"] for r in runs]
                entry["levels"].append({"p": p, "bits": bits, "runs": runs, "wins": sum(g > 0 for g in gains),
                                        "median_test_gain": statistics.median(gains)})
                results["total_seconds"] = round(time.perf_counter() - started, 1)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=2) + "\n")  # partial results survive a crash

    log(f"\n{'model':<9} {'p':>5} {'b':>2} | {'rate':>6} | {'median test gain':>16} | wins")
    for name, entry in results["models"].items():
        for lv in entry["levels"]:
            log(f"{name:<9} {lv['p']:>5} {lv['bits']:>2} | {lv['runs'][0]['plain']['rate']:>5.1f}x | "
                f"{lv['median_test_gain']:>+15.2f} | {lv['wins']}/{len(lv['runs'])}")
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    log(f"total {results['total_seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
