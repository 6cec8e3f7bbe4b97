"""GPU check: the gpu-marked tests, CLIP-Q training steps against plain ones, four trials packed on one GPU.

    python benchmarks/gpu_check.py [--models resnet18,resnet50] [--batch 64] [--steps 20] [--out FILE]

On a machine with a CUDA GPU it

1. runs the tests marked ``gpu`` (``pytest -m gpu``);
2. times training steps of torchvision ResNet-18 and ResNet-50 at batch 64,
   224x224 inputs, bfloat16 autocast and channels_last, plain and with CLIP-Q
   attached to every layer (p 0.9, 4 bits), and reports the ratio;
3. runs a 4-trial search of the smoke space with ``gpus_per_trial 0.25``
   and ``device: cuda`` (four trials at once on one GPU), through the command
   line, and reports whether the trials overlapped;

and writes the figures to ``benchmarks/results/gpu_check.json``. Without
CUDA it says so and exits 0 (the gpu-marked tests skip), writing nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clipq_search.core.plan import Plan  # noqa: E402
from clipq_search.core.surgery import attach_clipq  # noqa: E402


def gpu_tests() -> dict[str, Any]:
    """``pytest -m gpu``: its exit code and summary line."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], cwd=ROOT, capture_output=True,
                       text=True, timeout=1200)
    lines = [line for line in r.stdout.strip().splitlines() if line.strip()]
    return {"returncode": r.returncode, "summary": lines[-1] if lines else r.stderr.strip()[-300:]}


def step_ms(model_name: str, clipq: bool, batch: int, steps: int, warmup: int) -> float:
    """Median milliseconds of one SGD step (forward, backward, update) on random 224x224 images."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, num_classes=1000).cuda().to(memory_format=torch.channels_last)
    if clipq:
        attach_clipq(model, Plan.from_dict({"default": {"p": 0.9, "bits": 4}}))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def packed_trials() -> dict[str, Any]:
    """A 4-trial search of the smoke space, 4 at once on one GPU (gpus_per_trial 0.25), through the CLI."""
    import pandas as pd

    with tempfile.TemporaryDirectory() as results:
        t0 = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "run_search.py", "search", "smoke", "--results", results, "--name", "packed",
             "--trials", "4", "--concurrency", "4", "--set", "resources.device=cuda",
             "--set", "resources.gpus_per_trial=0.25", "--set", "resources.cpus_per_trial=1"],
            cwd=ROOT, capture_output=True, text=True, timeout=1800,
        )
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            return {"returncode": r.returncode, "error": r.stderr.strip()[-500:]}
        df = pd.read_csv(Path(results) / "packed" / "trials.csv")
        start, end = pd.to_datetime(df["datetime_start"]), pd.to_datetime(df["datetime_complete"])
        overlaps = sum(1 for i in range(len(df)) for j in range(i + 1, len(df))
                       if start[i] < end[j] and start[j] < end[i])
        return {
            "returncode": 0,
            "complete": int((df["state"] == "COMPLETE").sum()),
            "overlapping_pairs": overlaps,
            "trial_seconds": [round(float(s), 2) for s in df["trial_seconds"]],
            "wall_seconds": round(wall, 1),
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--skip-tests", action="store_true", help="do not run the gpu-marked tests")
    ap.add_argument("--skip-trials", action="store_true", help="do not run the packed-trials search")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: the GPU check is skipped (nothing written)")
        return 0
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "settings": {"batch": args.batch, "steps": args.steps, "warmup": args.warmup, "amp": "bfloat16",
                     "memory_format": "channels_last", "plan": {"p": 0.9, "bits": 4}},
    }
    if not args.skip_tests:
        out["gpu_tests"] = gpu_tests()
        print(f"gpu tests: {out['gpu_tests']['summary']}")
    out["steps"] = {}
    for name in filter(None, args.models.split(",")):
        plain = step_ms(name, False, args.batch, args.steps, args.warmup)
        clipq = step_ms(name, True, args.batch, args.steps, args.warmup)
        ratio = clipq / plain
        out["steps"][name] = {"plain_ms": round(plain, 2), "clipq_ms": round(clipq, 2), "ratio": round(ratio, 3)}
        print(f"{name}: plain {plain:.1f} ms, CLIP-Q {clipq:.1f} ms per step ({ratio:.2f}x)")
    if not args.skip_trials:
        out["packed_trials"] = packed_trials()
        print(f"4 trials at gpus_per_trial 0.25: {out['packed_trials']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    failed = out.get("gpu_tests", {}).get("returncode", 0) not in (0, 5) or \
        out.get("packed_trials", {}).get("returncode", 0) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
