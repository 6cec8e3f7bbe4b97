"""Storage fidelity: the search's analytic size estimate against the bytes of the written file.

For LeNet-300-100 and LeNet-5 at a few uniform plans, ``estimate_size`` is
compared with the file ``save_compressed`` writes (per tensor, from
``read_compressed(path)[1].layers``, and in total, from the file's length on
disk), and both are timed (the estimate's median of 3 calls; one write).
Weights are a trained baseline's when ``<runs>/baselines/`` holds one
for the model, else a seeded random init. Then every ``final*/model.clipq``
found under ``--runs`` is checked the same way: its model is rebuilt from the
file (architecture recognised by tensor names and shapes, plan from the
file's own p and bits), re-estimated, and re-written.
(docs/benchmarks.md, figure 5.)

    python benchmarks/bench_storage.py [--runs results] [--out benchmarks/results/storage.json]
    python benchmarks/bench_storage.py --models torchvision:alexnet torchvision:resnet50 --plans 0.58:6 0.9:4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _machine import machine_info, shown_path  # noqa: E402
from torch import nn  # noqa: E402

from clipq_search import estimate_size, read_compressed, save_compressed  # noqa: E402
from clipq_search._io import write_json  # noqa: E402
from clipq_search.core.encoding import SizeEstimate  # noqa: E402
from clipq_search.errors import ClipQError  # noqa: E402
from clipq_search.training.models import build_model, list_models  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "storage.json"
DEFAULT_PLANS = ["0.5:5", "0.9:4", "0.97:3"]


def _plan(p: float, bits: int) -> dict[str, Any]:
    return {"default": {"p": p, "bits": bits}}


def _baseline_weights(model_name: str, runs: Path) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The newest trained Fashion-MNIST baseline of ``model_name`` under ``runs/baselines``, if any."""
    found = []
    for meta in (runs / "baselines").glob(f"{model_name}-*.json"):
        try:
            info = json.loads(meta.read_text())
            ckpt = Path(info["checkpoint"])
            if info.get("model") != model_name or info.get("dataset", "fashion-mnist") != "fashion-mnist":
                continue
            if not ckpt.is_absolute():
                ckpt = ROOT / ckpt if (ROOT / ckpt).exists() else meta.parent / ckpt.name
            if ckpt.exists():
                found.append((meta.stat().st_mtime, ckpt))
        except (OSError, ValueError, KeyError):
            continue
    for _, ckpt in sorted(found, reverse=True):
        try:
            return torch.load(ckpt, map_location="cpu", weights_only=True), shown_path(ckpt)
        except Exception:  # unreadable checkpoint: try the next, else random init
            continue
    return None, "random init (seed 0)"


def compare(est: SizeEstimate, path: Path) -> dict[str, Any]:
    """Per-tensor and total bytes: estimate against the file (its records and its length)."""
    _, written = read_compressed(path)
    file_layers = {s.name: s for s in written.layers}
    rows = []
    for s in est.layers:
        f = file_layers.get(s.name)
        rows.append({
            "tensor": s.name,
            "compressed": s.compressed,
            "p": s.p,
            "bits": s.bits,
            "k": s.k,
            "estimate_bytes": s.bytes,
            "file_bytes": f.bytes if f else None,
            "diff": (f.bytes - s.bytes) if f else None,
        })
    file_bytes = path.stat().st_size
    return {
        "estimate_total": est.total_bytes,
        "file_total": file_bytes,
        "records_total": sum(s.bytes for s in written.layers),
        "diff_total": file_bytes - est.total_bytes,
        "rate_estimate": round(est.rate, 4),
        "rate_file": round(est.original_bytes / file_bytes, 4),
        "tensors_differing": sum(1 for r in rows if r["diff"] != 0),
        "extra_file_tensors": sorted(set(file_layers) - {s.name for s in est.layers}),
        "layers": rows,
    }


def plan_cases(models: list[str], plans: list[tuple[float, int]], runs: Path, tmp: Path) -> list[dict[str, Any]]:
    out = []
    for name in models:
        state, source = _baseline_weights(name, runs)
        for p, bits in plans:
            torch.manual_seed(0)
            # a torchvision: or timm: network at its ImageNet shape, a registered one at Fashion-MNIST's
            shape = {"num_classes": 1000, "in_channels": 3, "image_size": 224} if ":" in name else {}
            model = build_model(name, **shape)
            if state is not None:
                model.load_state_dict(state)
            plan = _plan(p, bits)
            est_seconds = []
            for _ in range(3):
                start = time.perf_counter()
                est = estimate_size(model, plan)
                est_seconds.append(time.perf_counter() - start)
            path = tmp / f"{name}-{p}-{bits}.clipq"
            start = time.perf_counter()
            written = save_compressed(model, path, plan)
            write_seconds = time.perf_counter() - start
            entry = {"case": f"{name} p={p} bits={bits}", "model": name, "weights": source, "p": p, "bits": bits}
            entry.update(compare(est, path))
            entry["save_return_matches_estimate"] = written.total_bytes == est.total_bytes
            entry["estimate_seconds_median"] = statistics.median(est_seconds)
            entry["write_seconds"] = write_seconds
            out.append(entry)
    return out


def _model_for(state: dict[str, torch.Tensor]) -> tuple[str, nn.Module] | None:
    """A registered model whose state dict has exactly these names and shapes (10 classes, 1x28x28)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for name in list_models():
        try:
            model = build_model(name)
        except Exception:  # optional dependencies (torchvision) or other input sizes
            continue
        if {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes:
            return name, model
    return None


def found_files(runs: Path, tmp: Path) -> list[dict[str, Any]]:
    out = []
    paths = sorted(p for p in runs.rglob("model.clipq") if p.parent.name.startswith("final"))
    for i, path in enumerate(paths):
        entry: dict[str, Any] = {"case": shown_path(path)}
        try:
            state, sizes = read_compressed(path)
            match = _model_for(state)
            if match is None:
                entry["skipped"] = "no registered model has these tensor names and shapes"
                out.append(entry)
                continue
            name, model = match
            model.load_state_dict(state)
            plan = {"layers": {s.name[: -len(".weight")]: {"p": s.p, "bits": s.bits}
                               for s in sizes.layers if s.compressed}}
            est = estimate_size(model, plan)
            entry.update({"model": name, "plan": plan["layers"]})
            entry.update(compare(est, path))
            rewritten = tmp / f"found-{i}.clipq"
            save_compressed(model, rewritten, plan)
            # Record order may differ (a model saved with CLIP-Q attached lists biases first),
            # so compare the size and the decoded tensors rather than the bytes.
            again, _ = read_compressed(rewritten)
            entry["rewrite_bytes"] = rewritten.stat().st_size
            entry["rewrite_same_size"] = entry["rewrite_bytes"] == entry["file_total"]
            entry["rewrite_same_tensors"] = again.keys() == state.keys() and all(
                torch.equal(again[k], state[k]) for k in state
            )
        except (ClipQError, OSError, RuntimeError, ValueError) as exc:
            entry["skipped"] = f"{type(exc).__name__}: {exc}"
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    parser.add_argument("--plans", nargs="+", default=DEFAULT_PLANS, metavar="P:BITS",
                        help="uniform plans, e.g. 0.9:4 (default: %(default)s)")
    parser.add_argument("--runs", type=Path, default=ROOT / "results",
                        help="results folder: baselines/ for weights, final*/model.clipq files to check")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    try:
        plans = [(float(s.split(":")[0]), int(s.split(":")[1])) for s in args.plans]
    except (IndexError, ValueError):
        parser.error(f"--plans takes P:BITS pairs such as 0.9:4, got {args.plans}")

    machine = machine_info()
    print(machine["line"])
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cases = plan_cases(args.models, plans, args.runs, tmp)
        files = found_files(args.runs, tmp) if args.runs.is_dir() else []

    print(f"\n{'case':28s} {'estimate B':>11s} {'file B':>9s} {'diff':>5s} {'rate':>7s} {'estimate s':>10s} "
          f"{'write s':>8s}  weights")
    for c in cases:
        print(f"{c['case']:28s} {c['estimate_total']:11d} {c['file_total']:9d} {c['diff_total']:5d} "
              f"{c['rate_file']:7.2f} {c['estimate_seconds_median']:10.3f} {c['write_seconds']:8.3f}  "
              f"{Path(c['weights']).name}")
    print("\nper compressed layer:")
    for c in cases:
        for row in c["layers"]:
            if row["compressed"]:
                print(f"  {c['case']:28s} {row['tensor']:12s} p={row['p']} b={row['bits']} k={row['k']:2d} "
                      f"estimate {row['estimate_bytes']:7d} file {row['file_bytes']:7d} diff {row['diff']}")
    if files:
        print(f"\n{len(files)} final model file(s) under {args.runs}:")
        for f in files:
            if "skipped" in f:
                print(f"  {f['case']}: skipped ({f['skipped']})")
            else:
                print(f"  {f['case']}: {f['model']}, estimate {f['estimate_total']} B, file {f['file_total']} B, "
                      f"diff {f['diff_total']}, re-written: same size {f['rewrite_same_size']}, "
                      f"same tensors {f['rewrite_same_tensors']}")
    mismatches = [
        c["case"] for c in cases + files if c.get("diff_total") not in (0, None) or c.get("tensors_differing")
    ]
    print(f"\nmismatches: {mismatches if mismatches else 'none'}")
    write_json(args.out, {
        "benchmark": "storage",
        "machine": machine,
        "settings": {"models": args.models, "plans": args.plans, "runs": shown_path(args.runs)},
        "plans": cases,
        "found_files": files,
        "mismatches": mismatches,
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
