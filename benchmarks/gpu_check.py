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

4. checks the device paths: the CLIP-Q operator on the GPU bit for bit
   against ``core.reference.reference_clipq`` on several layer sizes; host
   syncs (``torch.cuda.set_sync_debug_mode``) and kernel launches
   (``torch.profiler``) of one CLIP-Q step of ResNet-18's layers; the AMP
   type chosen for the GPU and its compute capability; ``estimate_size`` of
   ResNet-50 on the GPU against the CPU; the cuDNN, TF32 and channels_last
   settings a worker runs with;

and writes the figures to ``benchmarks/results/gpu_check.json``. Without
CUDA it says so and exits 0 (the gpu-marked tests skip), writing nothing.
``--cpu-smoke`` runs the checks of 4 on the CPU at small sizes (seconds) and
writes ``benchmarks/results/gpu_check_cpu_smoke.json``.
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


def step_ms(model_name: str, clipq: bool, batch: int, steps: int, warmup: int, graphs: bool = False) -> float:
    """Median milliseconds of one SGD step (forward, backward, update) on random 224x224 images.

    ``graphs``: the CLIP-Q operator replayed as CUDA graphs (``resources.cuda_graphs``).
    """
    import torchvision

    from clipq_search.core.surgery import use_cuda_graphs

    use_cuda_graphs(graphs)
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


def bit_exact(device: torch.device, sizes: list[int]) -> dict[str, Any]:
    """The operator on ``device`` against the reference, bit for bit, for each size and a few (p, bits)."""
    from clipq_search.core.operator import clipq_quantize_with_stats
    from clipq_search.core.reference import reference_clipq

    rows = []
    for n in sizes:
        w = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.05
        for p, bits in ((0.0, 8), (0.5, 4), (0.9, 2), (0.98, 6)):
            out, _ = clipq_quantize_with_stats(w.to(device), p, bits)
            ref, _ = reference_clipq(w, p, bits)
            same = torch.equal(out.cpu().view(torch.int32), ref.view(torch.int32))  # bit patterns, signed zeros too
            rows.append({"n": n, "p": p, "bits": bits, "equal": bool(same)})
    return {"all_equal": all(r["equal"] for r in rows), "cases": rows}


def _resnet(name: str) -> torch.nn.Module:
    """torchvision's model when installed, else a stack of its layer shapes (enough for the operator and sizing)."""
    try:
        import torchvision

        return torchvision.models.get_model(name, num_classes=1000)
    except ImportError:
        widths = [64, 128, 256, 512]
        layers = [torch.nn.Conv2d(3, 64, 7)]
        for a, b in zip([64, *widths[:-1]], widths, strict=True):
            layers += [torch.nn.Conv2d(a, b, 3), torch.nn.Conv2d(b, b, 3)]
        return torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(512, 1000))


def step_syncs_and_launches(device: torch.device, model_name: str, graphs: bool = False) -> dict[str, Any]:
    """Host syncs and kernel launches of one CLIP-Q step of every layer (the weights changed, then read).

    ``graphs``: with the operator replayed as CUDA graphs.
    """
    import warnings

    from clipq_search.core.plan import compressible_tensors
    from clipq_search.core.surgery import use_cuda_graphs

    use_cuda_graphs(graphs)

    model = _resnet(model_name).to(device)
    attach_clipq(model, Plan.from_dict({"default": {"p": 0.9, "bits": 4}}))
    tensors = list(compressible_tensors(model).values())

    def step() -> None:
        with torch.no_grad():
            for par in model.parameters():
                par.add_(0.0)  # as an optimizer step: every weight's version moves on
            for t in tensors:
                t.tensor()

    for _ in range(3):  # warm up: buffers, hints, caches
        step()
    out: dict[str, Any] = {"model": model_name, "layers": len(tensors)}
    if device.type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
        out["host_syncs_per_step"] = len(syncs)
        out["host_syncs_first"] = syncs[:5]
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    out["aten_calls_per_step"] = sum(1 for e in events if e.name.startswith("aten::"))
    if device.type == "cuda":
        launches = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                        "cudaGraphLaunch"))
        out["kernel_launches_per_step"] = launches
        out["kernel_launches_per_layer"] = round(launches / max(1, len(tensors)), 2)
    return out


def amp_choice(device: torch.device) -> dict[str, Any]:
    """The autocast type training picks on ``device`` and, on CUDA, the GPU's compute capability."""
    from clipq_search.training import loop

    out: dict[str, Any] = {"amp_dtype": str(loop._amp_dtype(device))}
    if device.type == "cuda":
        out["capability"] = list(torch.cuda.get_device_capability(device))
        out["torch_is_bf16_supported"] = torch.cuda.is_bf16_supported()
    return out


def sizing(device: torch.device, model_name: str) -> dict[str, Any]:
    """Seconds of ``estimate_size`` on ``device`` and on the CPU for a compressed model; the two must agree."""
    from clipq_search.core.encoding import estimate_size

    rows = []
    for p, bits in ((0.8, 5), (0.0, 8)):
        torch.manual_seed(0)
        model = _resnet(model_name)
        attach_clipq(model, Plan.from_dict({"default": {"p": p, "bits": bits}}))
        row: dict[str, Any] = {"p": p, "bits": bits}
        for where in (device, torch.device("cpu")) if device.type != "cpu" else (device,):
            model.to(where)
            estimate_size(model)  # warm: every layer quantized, kernels loaded
            if where.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            est = estimate_size(model)
            row[f"{where.type}_seconds"] = round(time.perf_counter() - t0, 4)
            row[f"{where.type}_bytes"] = est.total_bytes
        row["same_bytes"] = len({v for k, v in row.items() if k.endswith("_bytes")}) == 1
        rows.append(row)
    return {"model": model_name, "cases": rows}


def settings(device: torch.device) -> dict[str, Any]:
    """The flags a worker on ``device`` runs with (``resources`` defaults); whether ResNet-50 is channels_last."""
    from clipq_search.training.loop import configure_device_, use_channels_last

    out = configure_device_(device)
    out["channels_last_resnet50"] = use_channels_last(_resnet("resnet50"), device)
    out["deterministic_variant"] = configure_device_(device, deterministic=True)
    configure_device_(device)
    return out


def device_checks(device: torch.device, smoke: bool) -> dict[str, Any]:
    sizes = [1_000, 10_000] if smoke else [4_096, 147_456, 589_824, 2_359_296]
    out: dict[str, Any] = {"bit_exact": bit_exact(device, sizes)}
    print(f"operator bit-exact on {device}: {out['bit_exact']['all_equal']}")
    out["step"] = step_syncs_and_launches(device, "resnet18")
    print(f"one CLIP-Q step of resnet18's layers: {out['step']}")
    if device.type == "cuda":
        out["step_cuda_graphs"] = step_syncs_and_launches(device, "resnet18", graphs=True)
        print(f"the same with CUDA graphs: {out['step_cuda_graphs']}")
    out["amp"] = amp_choice(device)
    print(f"AMP: {out['amp']}")
    out["sizing"] = sizing(device, "resnet18" if smoke else "resnet50")
    print(f"estimate_size: {out['sizing']}")
    out["settings"] = settings(device)
    print(f"settings: {out['settings']}")
    return out


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
    ap.add_argument("--skip-device-checks", action="store_true", help="do not run the checks of the device paths")
    ap.add_argument("--cpu-smoke", action="store_true", help="run the device-path checks on the CPU, small sizes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = ROOT / "benchmarks" / "results"
    if args.cpu_smoke:
        out_path = Path(args.out or results / "gpu_check_cpu_smoke.json")
        report = {"torch": torch.__version__, **device_checks(torch.device("cpu"), smoke=True)}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out_path}")
        return 0 if report["bit_exact"]["all_equal"] else 1
    args.out = args.out or str(results / "gpu_check.json")
    if not torch.cuda.is_available():
        print("no CUDA GPU here: the GPU check is skipped (nothing written)")
        return 0
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "settings": {"batch": args.batch, "steps": args.steps, "warmup": args.warmup, "amp": "bfloat16",
                     "memory_format": "channels_last", "plan": {"p": 0.9, "bits": 4}},
    }
    if not args.skip_device_checks:
        out["device_checks"] = device_checks(torch.device("cuda"), smoke=False)
    if not args.skip_tests:
        out["gpu_tests"] = gpu_tests()
        print(f"gpu tests: {out['gpu_tests']['summary']}")
    out["steps"] = {}
    for name in filter(None, args.models.split(",")):
        plain = step_ms(name, False, args.batch, args.steps, args.warmup)
        clipq = step_ms(name, True, args.batch, args.steps, args.warmup)
        graphs = step_ms(name, True, args.batch, args.steps, args.warmup, graphs=True)
        ratio, ratio_g = clipq / plain, graphs / plain
        out["steps"][name] = {"plain_ms": round(plain, 2), "clipq_ms": round(clipq, 2), "ratio": round(ratio, 3),
                              "clipq_cuda_graphs_ms": round(graphs, 2), "ratio_cuda_graphs": round(ratio_g, 3)}
        print(f"{name}: plain {plain:.1f} ms, CLIP-Q {clipq:.1f} ms ({ratio:.2f}x), "
              f"with CUDA graphs {graphs:.1f} ms ({ratio_g:.2f}x) per step")
    if not args.skip_trials:
        out["packed_trials"] = packed_trials()
        print(f"4 trials at gpus_per_trial 0.25: {out['packed_trials']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    failed = out.get("gpu_tests", {}).get("returncode", 0) not in (0, 5) or \
        out.get("packed_trials", {}).get("returncode", 0) != 0 or \
        not out.get("device_checks", {}).get("bit_exact", {}).get("all_equal", True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
