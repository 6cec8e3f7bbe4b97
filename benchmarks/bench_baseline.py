"""Dense baselines: train each model with its shipped DEFAULT_PRETRAIN recipe on Fashion-MNIST.

Prints and writes (JSON, with a one-line machine description) the test and
validation top-1, the training time and the time per epoch. Also measures how
well the CPU path uses the cores: the median time of one training step with
1 thread against all threads, alternated in this process.

    python benchmarks/bench_baseline.py [--models lenet300 lenet5] [--seed 0] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import fashion_setup
from _machine import machine_line
from torch.nn import functional as F

from clipq_search._io import write_json
from clipq_search.training.data import DEFAULT_ROOTS, ArrayDataset
from clipq_search.training.loop import DEFAULT_PRETRAIN, evaluate, train
from clipq_search.training.models import build_model, count_parameters

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "baseline.json"


def step_times(model_name: str, data: ArrayDataset, batch_size: int, threads: list[int], rounds: int = 5,
               steps: int = 20) -> dict[str, float]:
    """Median milliseconds per SGD step for each thread count, measured alternately (round-robin)."""
    torch.manual_seed(0)
    model = build_model(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = next(data.batches(batch_size, shuffle=False))
    samples: dict[int, list[float]] = {t: [] for t in threads}
    for _ in range(rounds):
        for t in threads:
            torch.set_num_threads(t)
            for i in range(steps + 2):
                start = time.perf_counter()
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if i >= 2:  # first steps after a thread change warm the pool up
                    samples[t].append(1000 * (time.perf_counter() - start))
    return {str(t): round(statistics.median(v), 3) for t, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"], choices=sorted(DEFAULT_PRETRAIN))
    parser.add_argument("--seed", type=int, default=0, help="training seed (the validation split stays seed 0)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--root", default=DEFAULT_ROOTS["fashion-mnist"], help="folder with the four IDX files")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all usable CPUs)")
    parser.add_argument("--skip-scaling", action="store_true", help="do not measure 1-thread vs all-threads steps")
    args = parser.parse_args(argv)

    threads, _, splits = fashion_setup(args.threads, args.root)
    assert splits.val is not None and isinstance(splits.train, ArrayDataset)
    machine = machine_line(threads)
    print(machine)
    results: dict[str, Any] = {
        "benchmark": "baseline",
        "machine": machine,
        "dataset": {"name": "fashion-mnist", "train": len(splits.train), "val": len(splits.val),
                    "test": len(splits.test), "split_seed": 0},
        "seed": args.seed,
        "models": {},
    }
    for name in args.models:
        cfg = dataclasses.replace(DEFAULT_PRETRAIN[name], seed=args.seed)
        torch.manual_seed(args.seed)
        model = build_model(name, num_classes=splits.num_classes, in_channels=splits.in_channels,
                            image_size=splits.image_size)
        run = train(model, splits.train, cfg, device="cpu", val_data=splits.val, desc=name)
        test = evaluate(model, splits.test, device="cpu")
        val = evaluate(model, splits.val, device="cpu")
        epoch_s = [h["seconds"] for h in run.history]
        entry: dict[str, Any] = {
            "config": cfg.to_dict(),
            "params": count_parameters(model),
            "test_top1": test["top1"],
            "val_top1": val["top1"],
            "test_loss": round(test["loss"], 5),
            "final_train_loss": round(run.final_train_loss, 5),
            "seconds": round(run.seconds, 2),
            "epoch_seconds_median": round(statistics.median(epoch_s), 3),
            "steps": run.steps,
            "history": [{k: round(v, 5) for k, v in h.items()} for h in run.history],
        }
        print(
            f"{name:9s} test top-1 {test['top1']:.2f}%  val top-1 {val['top1']:.2f}%  "
            f"{run.seconds:.1f} s total, {entry['epoch_seconds_median']:.2f} s/epoch (median), {run.steps} steps"
        )
        if not args.skip_scaling and threads > 1:
            ms = step_times(name, splits.train, cfg.batch_size, [1, threads])
            entry["step_ms_by_threads"] = ms
            entry["thread_speedup"] = round(ms["1"] / ms[str(threads)], 3)
            print(f"{'':9s} step {ms['1']:.2f} ms on 1 thread, {ms[str(threads)]:.2f} ms on {threads}: "
                  f"{entry['thread_speedup']:.2f}x")
            torch.set_num_threads(threads)
        results["models"][name] = entry
    write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
