#!/usr/bin/env python3
"""In-parallel versus two-stage pruning-quantization (benchmarks.md figure 6).

At identical per-layer (p, bits) plans and an equal total fine-tuning budget of
E epochs, both starting from the same converged dense baseline with the same
optimizer settings and seed:

* **in-parallel (CLIP-Q)**: ``attach_clipq`` for E epochs; clipping and
  quantization are recomputed every step, so a pruned weight can come back.
* **two-stage**: stage 1 prunes only (the same per-sign magnitude clipping of
  fraction p, recomputed every step, straight-through, no quantization) for
  E/2 epochs; the clipping mask of the final stage-1 weights is then frozen;
  stage 2 quantizes the surviving weights with the same scheme (2**bits - 1
  uniform intervals shared between the signs in proportion to their spans,
  each level the mean of its full-precision weights, straight-through) for
  E/2 epochs, masked weights staying exactly zero. Each stage is a fresh
  fine-tune (new SGD momentum, its own cosine schedule over E/2 epochs).

Stage-2 partitioning spans (``--stage2-span``): ``survivors`` (default) splits
the range the surviving weights occupy on each side, [w_min, largest surviving
negative] and [smallest surviving positive, w_max], the analogue of CLIP-Q's
[w_min, c-] and [c+, w_max] with a frozen mask; ``zero`` reuses
``clipq_quantize(surviving, p=0, bits)``, whose spans run to 0 and so spend
intervals on the empty pruned band (a handicap at few bits).

Each final model is stripped, written with ``save_compressed``, reloaded with
``load_compressed`` into a fresh model (checked to give identical weights and
accuracy), and its compression rate is quoted from the file bytes (checked
equal to ``estimate_size``). Also reported: the dense baseline, a dense control
fine-tuned for the same E epochs, CLIP-Q one-shot accuracy (no fine-tune), the
pruned-only accuracy at the end of stage 1, and how the final masks overlap.

    python benchmarks/bench_two_stage.py [--models lenet300 lenet5] [--epochs lenet300=6 lenet5=4]
        [--levels 0.8:4 0.93:3 0.98:2] [--seed 0] [--out benchmarks/results/two_stage.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import SPACES, dense_baseline, start  # noqa: E402

from clipq_search.core.encoding import estimate_size, load_compressed, save_compressed  # noqa: E402
from clipq_search.core.operator import clipq_quantize, clipq_quantize_with_stats  # noqa: E402
from clipq_search.core.plan import LayerConfig, Plan  # noqa: E402
from clipq_search.core.surgery import _StraightThrough, attach_clipq, strip_clipq  # noqa: E402
from clipq_search.errors import ClipQError  # noqa: E402
from clipq_search.training.data import DEFAULT_ROOTS  # noqa: E402
from clipq_search.training.loop import (  # noqa: E402
    DEFAULT_PRETRAIN,
    TrainConfig,
    evaluate,
    train,
)
from clipq_search.training.models import build_model  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "two_stage.json"
DEFAULT_EPOCHS = {"lenet300": 6.0, "lenet5": 4.0}
DEFAULT_LEVELS = ("0.8:4", "0.93:3", "0.98:2")


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- two-stage parametrizations


class _Cached(nn.Module):
    """A weight parametrization recomputed only when the full-precision tensor changes (as ClipQWeight)."""

    def __init__(self) -> None:
        super().__init__()
        self._key: tuple[int, int, int] | None = None
        self._value: torch.Tensor | None = None

    def compute(self, original: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        key = (original.data_ptr(), original._version, id(original))
        if self._value is None or key != self._key:
            with torch.no_grad():
                self._value = self.compute(original.detach())
            self._key = key
        if original.requires_grad and torch.is_grad_enabled():
            return _StraightThrough.apply(original, self._value)
        return self._value


def clip_mask(weight: torch.Tensor, p: float, state: dict[str, Any] | None = None) -> torch.Tensor:
    """True where CLIP-Q's per-sign clipping of fraction p keeps the weight (weights in [c-, c+] are clipped).

    The thresholds are CLIP-Q's own (``clipq_quantize_with_stats``; bits do not
    affect them); ``state`` carries the previous thresholds as a speed hint.
    """
    hint = state.get("hint") if state is not None else None
    _, stats = clipq_quantize_with_stats(weight, p, 2, hint=hint)
    if state is not None:
        state["hint"] = (stats.c_neg, stats.c_pos)
    return (weight < stats.c_neg) | (weight > stats.c_pos)


class PruneWeight(_Cached):
    """Stage 1: per-sign magnitude clipping of fraction p, recomputed every step, no quantization."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self._state: dict[str, Any] = {}

    def mask(self, original: torch.Tensor) -> torch.Tensor:
        return clip_mask(original.detach(), self.p, self._state)

    def compute(self, original: torch.Tensor) -> torch.Tensor:
        return original * self.mask(original)


def masked_quantize(weight: torch.Tensor, mask: torch.Tensor, bits: int, span: str = "survivors") -> torch.Tensor:
    """Quantize the weights where ``mask`` holds with CLIP-Q's interval-mean scheme; zero elsewhere.

    ``span="survivors"``: the 2**bits - 1 intervals split [min, max] of the
    surviving negatives and of the surviving positives (sign taken from the
    current value), shared in proportion to the spans (each non-empty side at
    least one), equal widths within a side; boundary values go to the upper
    interval, extremes to the last one; each level is the float32 mean of its
    weights. ``span="zero"``: ``clipq_quantize(surviving, p=0, bits)``.
    """
    flat = weight.detach().reshape(-1).float()
    m = mask.reshape(-1)
    v = flat[m]
    out = torch.zeros_like(flat)
    if span == "zero":
        out[m] = clipq_quantize(v, 0.0, bits)
        return out.reshape(weight.shape).to(weight.dtype)
    if span != "survivors":
        raise ValueError(f"span={span!r}: use 'survivors' or 'zero'")
    n_levels = 2**bits - 1
    neg, pos = v < 0, v > 0
    vn, vp = v[neg], v[pos]
    has_neg, has_pos = vn.numel() > 0, vp.numel() > 0
    if not (has_neg or has_pos):
        return out.reshape(weight.shape).to(weight.dtype)
    lo_n, span_n = (float(vn.min()), float(vn.max() - vn.min())) if has_neg else (0.0, 0.0)
    lo_p, span_p = (float(vp.min()), float(vp.max() - vp.min())) if has_pos else (0.0, 0.0)
    if has_neg and has_pos:
        total = span_n + span_p
        n_neg = round(n_levels * span_n / total) if total > 0 else n_levels // 2
        n_neg = min(max(n_neg, 1), n_levels - 1)
    else:
        n_neg = n_levels if has_neg else 0
    n_pos = n_levels - n_neg
    idx = torch.full_like(v, float(n_levels))  # exact zeros among the survivors: the zero code
    if has_neg:
        width = span_n / n_neg if span_n > 0 else math.inf
        idx[neg] = torch.floor((vn - lo_n) / width).clamp_(0, n_neg - 1)
    if has_pos:
        width = span_p / n_pos if span_p > 0 else math.inf
        idx[pos] = torch.floor((vp - lo_p) / width).clamp_(0, n_pos - 1) + n_neg
    codes = idx.to(torch.int64)
    sums = torch.bincount(codes, weights=v, minlength=n_levels + 1)
    counts = torch.bincount(codes, minlength=n_levels + 1).to(sums.dtype)
    table = (sums / counts).to(torch.float32)  # NaN for empty intervals: never indexed
    table[n_levels] = 0.0
    out[m] = table[codes]
    return out.reshape(weight.shape).to(weight.dtype)


class MaskedQuantWeight(_Cached):
    """Stage 2: fixed mask, surviving weights quantized every step (straight-through)."""

    def __init__(self, mask: torch.Tensor, bits: int, span: str) -> None:
        super().__init__()
        self.register_buffer("mask", mask.clone(), persistent=False)
        self.bits, self.span = bits, span

    def compute(self, original: torch.Tensor) -> torch.Tensor:
        return masked_quantize(original, self.mask, self.bits, self.span)


def _attach(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    modules = dict(model.named_modules())
    for name, par in layers.items():
        parametrize.register_parametrization(modules[name], "weight", par, unsafe=True)


def _detach(model: nn.Module, names: list[str], *, bake: bool) -> None:
    modules = dict(model.named_modules())
    for name in names:
        with torch.no_grad():
            parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=bake)


# --------------------------------------------------------------------------- baseline


# --------------------------------------------------------------------------- one run


# Fine-tuning learning rate of every run (both methods and the control); --lr.
FINETUNE_LR = 0.01


def finetune_config(epochs: float, seed: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=128, lr=FINETUNE_LR, momentum=0.9, weight_decay=5e-4,
                       schedule="cosine", seed=seed)


def _history(run: Any) -> list[dict[str, float]]:
    return [{k: round(v, 5) for k, v in h.items() if k in ("epoch", "train_loss", "val_top1", "seconds")}
            for h in run.history]


def _masks(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {n: modules[n].weight.detach() != 0 for n in names}


def finish(model_name: str, model: nn.Module, plan: Plan, splits: Any, device: torch.device,
           tmp: Path, tag: str) -> dict[str, Any]:
    """Evaluate a stripped model, write/reload its .clipq file, and size it."""
    model.cpu()
    resolved = plan.resolve(model)
    modules = dict(model.named_modules())
    for name, cfg in resolved.items():
        distinct = torch.unique(modules[name].weight.detach()[modules[name].weight.detach() != 0]).numel()
        if distinct > 2**cfg.bits - 1:
            raise ClipQError(f"{tag}: layer {name} has {distinct} distinct non-zero values after baking")
    val = evaluate(model, splits.val, device=device)
    test = evaluate(model, splits.test, device=device)
    model.cpu()
    path = tmp / f"{tag}.clipq"
    est_written = save_compressed(model, path, plan)
    est = estimate_size(model, plan)
    file_bytes = path.stat().st_size
    fresh = build_model(model_name, num_classes=splits.num_classes, in_channels=splits.in_channels,
                        image_size=splits.image_size)
    fresh.load_state_dict(load_compressed(path), strict=True)
    same_weights = all(torch.equal(a, fresh.state_dict()[k]) for k, a in model.state_dict().items())
    rval = evaluate(fresh, splits.val, device=device)
    rtest = evaluate(fresh, splits.test, device=device)
    path.unlink()
    reload_ok = same_weights and rval["top1"] == val["top1"] and rtest["top1"] == test["top1"]
    if not reload_ok or est.total_bytes != file_bytes or est_written.total_bytes != file_bytes:
        log(f"  WARNING {tag}: reload/size check failed (weights equal {same_weights}, val {val['top1']} vs "
            f"{rval['top1']}, test {test['top1']} vs {rtest['top1']}, estimate {est.total_bytes} vs file {file_bytes})")
    compressed = [s for s in est.layers if s.compressed]
    kept = sum(s.kept for s in compressed) / sum(s.numel for s in compressed)
    return {
        "val_top1": val["top1"],
        "test_top1": test["top1"],
        "reloaded_val_top1": rval["top1"],
        "reloaded_test_top1": rtest["top1"],
        "reload_identical": reload_ok,
        "file_bytes": file_bytes,
        "estimate_bytes": est.total_bytes,
        "original_bytes": est.original_bytes,
        "rate": est.original_bytes / file_bytes,
        "rate_estimate": est.rate,
        "kept_fraction": kept,
        "layers": {s.name[: -len(".weight")]: {"kept": round(s.kept_fraction, 6), "k": s.k, "bytes": s.bytes}
                   for s in compressed},
    }


def overlap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """|a & b| / |a|, |a & b| / |b| and Jaccard over all compressed layers (a, b: survivor masks)."""
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    na, nb = sum(int(a[n].sum()) for n in a), sum(int(b[n].sum()) for n in b)
    union = na + nb - inter
    return {"of_first": inter / na if na else math.nan, "of_second": inter / nb if nb else math.nan,
            "jaccard": inter / union if union else math.nan}


def run_level(model_name: str, base_state: dict[str, torch.Tensor], splits: Any, p: float, bits: int,
              epochs: float, seed: int, span: str, device: torch.device, tmp: Path) -> dict[str, Any]:
    plan = Plan.uniform(p, bits)

    def fresh() -> nn.Module:
        torch.manual_seed(seed)
        model = build_model(model_name, num_classes=splits.num_classes, in_channels=splits.in_channels,
                            image_size=splits.image_size)
        model.load_state_dict(base_state, strict=True)
        return model

    def epoch_log(tag: str):
        return lambda r: log(f"    {tag} epoch {r['epoch']:g}: loss {r['train_loss']:.4f}, val {r['val_top1']:.2f}%, "
                             f"{r['seconds']:.1f} s")

    names = list(plan.resolve(fresh()))
    base_model = fresh()
    oneshot_masks = {n: clip_mask(dict(base_model.named_modules())[n].weight.detach(), p) for n in names}
    attach_clipq(base_model, plan)
    oneshot_val = evaluate(base_model, splits.val, device=device)["top1"]
    log(f"  (p={p}, bits={bits}) one-shot CLIP-Q val {oneshot_val:.2f}%")
    out: dict[str, Any] = {"p": p, "bits": bits, "oneshot_clipq_val_top1": oneshot_val}

    # in parallel: CLIP-Q for the whole budget
    model = fresh()
    attach_clipq(model, plan)
    t0 = time.perf_counter()
    run = train(model, splits.train, finetune_config(epochs, seed), device=device, val_data=splits.val,
                progress=False, desc="clipq", on_epoch_end=epoch_log("clipq"))
    secs = time.perf_counter() - t0
    strip_clipq(model)
    res = finish(model_name, model, plan, splits, device, tmp, f"{model_name}-clipq")
    clipq_masks = _masks(model, names)
    res.update(steps=run.steps, train_seconds=round(secs, 2), history=_history(run),
               mask_overlap_with_oneshot=overlap(clipq_masks, oneshot_masks))
    out["in_parallel"] = res
    log(f"  in-parallel: val {res['val_top1']:.2f}%, test {res['test_top1']:.2f}%, rate {res['rate']:.2f}x "
        f"({res['file_bytes']} B), {secs:.0f} s")

    # two-stage: prune E/2, freeze the mask, quantize E/2
    half = epochs / 2
    model = fresh()
    prune = {n: PruneWeight(p) for n in names}
    _attach(model, prune)
    t0 = time.perf_counter()
    run1 = train(model, splits.train, finetune_config(half, seed), device=device, val_data=splits.val,
                 progress=False, desc="prune", on_epoch_end=epoch_log("stage 1 (prune)"))
    model.cpu()
    modules = dict(model.named_modules())
    frozen = {n: prune[n].mask(modules[n].parametrizations.weight.original.detach()) for n in names}
    stage1_val = evaluate(model, splits.val, device=device)["top1"]
    _detach(model, names, bake=False)  # back to the full-precision weights
    _attach(model, {n: MaskedQuantWeight(frozen[n], bits, span) for n in names})
    run2 = train(model, splits.train, finetune_config(half, seed), device=device, val_data=splits.val,
                 progress=False, desc="quantize", on_epoch_end=epoch_log("stage 2 (quantize)"))
    secs = time.perf_counter() - t0
    model.cpu()
    _detach(model, names, bake=True)
    res = finish(model_name, model, plan, splits, device, tmp, f"{model_name}-two-stage")
    two_masks = _masks(model, names)
    lost = sum(int((frozen[n] & ~two_masks[n]).sum()) for n in names)  # survivors quantized to exactly 0
    if any(bool((two_masks[n] & ~frozen[n]).any()) for n in names):
        raise ClipQError("two-stage: a weight outside the frozen mask is non-zero")
    res.update(steps=run1.steps + run2.steps, train_seconds=round(secs, 2),
               stage1_pruned_val_top1=stage1_val, stage1_kept_fraction=sum(int(frozen[n].sum()) for n in names)
               / sum(frozen[n].numel() for n in names), stage1_survivors_zeroed=lost,
               history=_history(run1) + [{**h, "epoch": round(h["epoch"] + half, 5)} for h in _history(run2)],
               mask_overlap_with_oneshot=overlap(two_masks, oneshot_masks))
    out["two_stage"] = res
    out["mask_overlap_in_parallel_vs_two_stage"] = overlap(clipq_masks, two_masks)
    out["diff_in_parallel_minus_two_stage"] = {
        "val_top1": round(out["in_parallel"]["val_top1"] - res["val_top1"], 4),
        "test_top1": round(out["in_parallel"]["test_top1"] - res["test_top1"], 4),
        "rate": round(out["in_parallel"]["rate"] - res["rate"], 4),
    }
    log(f"  two-stage:   val {res['val_top1']:.2f}%, test {res['test_top1']:.2f}%, rate {res['rate']:.2f}x "
        f"({res['file_bytes']} B), stage-1 pruned val {stage1_val:.2f}%, {secs:.0f} s")
    return out


# --------------------------------------------------------------------------- main


def parse_levels(items: list[str]) -> list[tuple[float, int]]:
    out = []
    for item in items:
        try:
            p_s, b_s = item.split(":")
            cfg = LayerConfig(float(p_s), int(b_s))
        except (ValueError, ClipQError) as exc:
            raise SystemExit(f"error: --levels {item!r}: expected P:BITS, e.g. 0.93:3 ({exc})") from None
        out.append((cfg.p, cfg.bits))
    return out


def parse_epochs(items: list[str] | None, models: list[str]) -> dict[str, float]:
    epochs = {m: DEFAULT_EPOCHS[m] for m in models}
    for item in items or []:
        name, _, value = item.rpartition("=")
        try:
            e = float(value)
        except ValueError:
            raise SystemExit(f"error: --epochs {item!r}: expected E or MODEL=E") from None
        if not e > 0:
            raise SystemExit(f"error: --epochs {item!r}: epochs must be > 0")
        if name and name not in epochs:
            raise SystemExit(f"error: --epochs {item!r}: {name} is not among --models")
        for m in ([name] if name else models):
            epochs[m] = e
    return epochs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"], choices=sorted(SPACES))
    parser.add_argument("--epochs", nargs="+", metavar="[MODEL=]E",
                        help="total fine-tuning epochs per method (default lenet300=6 lenet5=4)")
    parser.add_argument("--levels", nargs="+", default=list(DEFAULT_LEVELS), metavar="P:BITS",
                        help="uniform plans, every compressible layer (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="fine-tuning seed (both methods and the control)")
    parser.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate (both methods, control)")
    parser.add_argument("--baseline-seed", type=int, default=0, help="seed of the dense DEFAULT_PRETRAIN baseline")
    parser.add_argument("--stage2-span", choices=("survivors", "zero"), default="survivors")
    parser.add_argument("--no-cache", action="store_true", help="train the baselines even if a cached one matches")
    parser.add_argument("--root", default=DEFAULT_ROOTS["fashion-mnist"], help="folder with the four IDX files")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all usable CPUs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    global FINETUNE_LR
    FINETUNE_LR = args.lr
    levels = parse_levels(args.levels)
    epochs = parse_epochs(args.epochs, args.models)

    started = time.perf_counter()
    device, splits, head = start("two_stage", args, argv)
    results: dict[str, Any] = {
        **head,
        "dataset": {"name": "fashion-mnist", "train": len(splits.train), "val": len(splits.val),
                    "test": len(splits.test), "split_seed": 0},
        "seed": args.seed,
        "finetune": {k: v for k, v in finetune_config(1.0, args.seed).to_dict().items() if k != "epochs"},
        "two_stage": {"split": "E/2 prune-only + E/2 quantize with the frozen stage-1 mask; each stage its own "
                               "SGD and cosine schedule", "stage2_span": args.stage2_span},
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="two_stage_") as tmp_s:
        tmp = Path(tmp_s)
        for name in args.models:
            t_model = time.perf_counter()
            model, source = dense_baseline(name, splits, device, seed=args.baseline_seed,
                                           use_cache=not args.no_cache, log=log)
            pre = dataclasses.replace(DEFAULT_PRETRAIN[name], seed=args.baseline_seed)
            model.cpu()
            base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            bval = evaluate(model, splits.val, device=device)["top1"]
            btest = evaluate(model, splits.test, device=device)["top1"]
            log(f"{name}: baseline val {bval:.2f}%, test {btest:.2f}%")
            e = epochs[name]
            t0 = time.perf_counter()
            run = train(model, splits.train, finetune_config(e, args.seed), device=device, val_data=splits.val,
                        progress=False, desc="control")
            cval = evaluate(model, splits.val, device=device)["top1"]
            ctest = evaluate(model, splits.test, device=device)["top1"]
            log(f"{name}: dense control ({e:g} epochs) val {cval:.2f}%, test {ctest:.2f}%, "
                f"{time.perf_counter() - t0:.0f} s")
            entry: dict[str, Any] = {
                "epochs": e,
                "baseline": {"source": source, "config": pre.to_dict(), "val_top1": bval, "test_top1": btest},
                "control": {"val_top1": cval, "test_top1": ctest, "steps": run.steps},
                "levels": [],
            }
            results["models"][name] = entry
            for p, bits in levels:
                entry["levels"].append(run_level(name, base_state, splits, p, bits, e, args.seed, args.stage2_span,
                                                 device, tmp))
                results["total_seconds"] = round(time.perf_counter() - started, 1)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=2) + "\n")  # partial results survive a crash
            entry["seconds"] = round(time.perf_counter() - t_model, 1)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    log(f"\n{'model':<9} {'p':>5} {'b':>2} | {'in-parallel val/test':>21} {'rate':>7} | "
        f"{'two-stage val/test':>19} {'rate':>7} | {'diff val/test':>14} | {'base/ctrl test':>14}")
    for name, entry in results["models"].items():
        for lv in entry["levels"]:
            a, b, d = lv["in_parallel"], lv["two_stage"], lv["diff_in_parallel_minus_two_stage"]
            log(f"{name:<9} {lv['p']:>5} {lv['bits']:>2} | {a['val_top1']:>9.2f} / {a['test_top1']:>6.2f}% "
                f"{a['rate']:>6.1f}x | {b['val_top1']:>7.2f} / {b['test_top1']:>6.2f}% {b['rate']:>6.1f}x | "
                f"{d['val_top1']:>+6.2f}/{d['test_top1']:>+6.2f} | "
                f"{entry['baseline']['test_top1']:>6.2f}/{entry['control']['test_top1']:.2f}")
    log(f"total {results['total_seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
