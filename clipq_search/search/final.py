"""Export a chosen plan, and run it to a final, truly smaller model file.

``final`` runs two full-length fine-tunes as Ray tasks (so a cluster GPU is
used when there is one): the plan with CLIP-Q attached, and a **control** (the
same dense baseline fine-tuned for the same epochs without compression).
Both checkpoint every epoch and resume after an interruption. The compressed
model is written as ``final/model.clipq`` and its test accuracy is measured on
the model **as reloaded from that file**.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipq_search._io import write_json
from clipq_search.analysis import rundir
from clipq_search.analysis.rundir import check_run_dir
from clipq_search.core.plan import Plan
from clipq_search.errors import ClipQError

__all__ = ["choose_plan", "export_plan", "run_final"]

DEFAULT_MAX_DROP = 1.0


def run_baseline(run_dir: Path) -> Any:
    """The run's ``baseline.json`` as a ``Baseline``; one clear error when it is unreadable or incomplete."""
    from dataclasses import fields

    from clipq_search.analysis.rundir import load_baseline_info
    from clipq_search.search.trial import Baseline

    info = load_baseline_info(run_dir)
    names = [f.name for f in fields(Baseline) if f.name != "cached"]
    missing = [n for n in names if n not in info]
    if missing:
        raise ClipQError(
            f"{run_dir / rundir.BASELINE_JSON} lacks {', '.join(missing)}; "
            "rerun `run_search.py search` on this run to rewrite it"
        )
    return Baseline(**{n: info[n] for n in names})


def _digest(obj: Any) -> str:
    """A short stable hash of a JSON-able value (names a checkpoint after what it trains)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def choose_plan(
    run_dir: Path,
    *,
    max_drop: float | None = None,
    min_rate: float | None = None,
    trial: int | None = None,
) -> tuple[Plan, dict[str, Any], str]:
    """Pick a trial by one rule: its plan, the plan JSON document (plan, metrics, source) and a log line.

    Reads only; :func:`export_plan` writes the document.
    """
    from clipq_search.analysis.pareto import plan_of, select_max_drop, select_min_rate, select_trial
    from clipq_search.analysis.rundir import load_trials

    check_run_dir(run_dir)
    baseline = run_baseline(run_dir).to_dict()
    df = load_trials(run_dir)
    if trial is not None:
        sel = select_trial(df, trial)
    elif min_rate is not None:
        sel = select_min_rate(df, min_rate)
    else:
        sel = select_max_drop(df, baseline["val_top1"], DEFAULT_MAX_DROP if max_drop is None else max_drop)
    if sel.trial is None:
        raise ClipQError(sel.message)
    row = df[df["number"] == sel.trial].iloc[0]
    plan = Plan.from_dict(plan_of(df, sel.trial))
    metrics = {k: (None if row.get(k) != row.get(k) else float(row[k])) for k in ("val_top1", "rate", "size_bytes")}
    doc = {
        **plan.to_dict(),
        "metrics": {**metrics, "baseline_val_top1": baseline["val_top1"]},
        "source": {"run": str(run_dir), "trial": int(sel.trial), "rule": sel.rule},
    }
    line = f"selected trial {sel.trial} ({sel.rule}): val {metrics['val_top1']:.2f}%, rate {metrics['rate']:.1f}x"
    return plan, doc, line


def export_plan(
    run_dir: Path,
    *,
    max_drop: float | None = None,
    min_rate: float | None = None,
    trial: int | None = None,
    out: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Pick a trial by one rule and write its plan JSON (``{"layers": ...}`` plus metrics and source)."""
    path = Path(out) if out else run_dir / rundir.PLAN_JSON
    _check_export_target(path)
    _, doc, line = choose_plan(run_dir, max_drop=max_drop, min_rate=min_rate, trial=trial)
    write_json(path, doc)
    log(line)
    return path


def _check_export_target(path: Path) -> None:
    """Refuse to write a plan over anything but an earlier exported plan (a user's file, a run's data)."""
    if path.is_dir():
        raise ClipQError(f"--out {path} is a folder; give a file path, e.g. {path / 'plan.json'}")
    if not path.exists():
        return
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = None
    source = doc.get("source") if isinstance(doc, dict) else None
    ours = isinstance(source, dict) and "trial" in source and "layers" in doc
    if not ours:
        raise ClipQError(
            f"{path} exists and is not a plan exported by clipq-search; choose another --out, or move that file away"
        )


def _final_task(
    space_data: dict[str, Any],
    plan: dict[str, Any] | None,
    payload: dict[str, Any],
    ckpt: str,
    threads: int,
    queue: Any,
    tag: str,
) -> dict[str, Any]:
    """Ray task: full-length fine-tune (CLIP-Q when ``plan`` is given, else the dense control)."""
    from clipq_search.core.surgery import attach_clipq
    from clipq_search.search.trial import model_for, state_from_bytes, state_to_bytes, train_config
    from clipq_search.training.loop import configure_threads, select_device, train

    configure_threads(threads)
    device = select_device(space_data["resources"]["device"])
    model = model_for(space_data, payload["info"])
    model.load_state_dict(state_from_bytes(payload["baseline"]), strict=True)
    if plan is not None:
        attach_clipq(model, Plan.from_dict(plan))
    from clipq_search.training.data import dataset_from_state

    cfg = train_config(space_data, "final")

    def on_epoch(rec: dict[str, float]) -> None:
        if queue is not None:
            val = f", val {rec['val_top1']:.2f}%" if "val_top1" in rec else ""
            queue.put(f"  {tag}: epoch {rec['epoch']:g}/{cfg.epochs:g} loss {rec['train_loss']:.4f}{val}")

    res = train(
        model,
        dataset_from_state(payload["train"]),
        cfg,
        device=device,
        val_data=dataset_from_state(payload["val"]),
        progress=False,
        desc=tag,
        on_epoch_end=on_epoch,
        checkpoint_path=ckpt,
        resume=True,
    )
    model.cpu()
    return {
        "state": state_to_bytes(model),
        "seconds": res.seconds,
        "resumed_from_step": res.resumed_from_step,
        "final_train_loss": res.final_train_loss,
    }


def run_final(
    run_dir: Path,
    *,
    config: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    address: str | None = None,
    log: Callable[[str], None] = print,
    out_dir: Path | None = None,
    control: bool = True,
) -> dict[str, Any]:
    """Full-length CLIP-Q run of a plan -> ``final/model.clipq`` and ``final/metrics.json``.

    ``out_dir`` (default ``RUN_DIR/final``) and ``control=False`` (skip the dense
    control run) serve benchmarks that finalise several plans of one run.
    """
    import ray

    from clipq_search.core.encoding import read_compressed, save_compressed
    from clipq_search.core.surgery import attach_clipq
    from clipq_search.search.cluster import check_address, check_gpus, init_ray
    from clipq_search.search.space import load_space
    from clipq_search.search.trial import (
        dataset_spec,
        model_for,
        splits_info,
        state_from_bytes,
        train_config,
        trial_payload,
    )
    from clipq_search.training.data import load_dataset
    from clipq_search.training.loop import evaluate

    # Everything that can fail on bad input runs before anything is written.
    check_run_dir(run_dir)
    if address:
        check_address(address)
    space = load_space(run_dir / rundir.SPACE_YAML, overrides)
    check_gpus(address, space.data["resources"]["gpus_per_trial"])
    cfg = train_config(space.data, "final")
    chosen: dict[str, Any] | None = None
    if config:
        plan = Plan.load(config)
        try:
            source = json.loads(Path(config).read_text()).get("source")
        except (OSError, ValueError, AttributeError):
            source = None
    else:
        plan, chosen, chosen_line = choose_plan(run_dir)
        source = chosen["source"]
    baseline = run_baseline(run_dir)
    payload = trial_payload(space, baseline)
    plan.resolve(model_for(space.data, payload["info"]))  # unknown layers fail before any training
    final_dir = out_dir or run_dir / rundir.FINAL_DIR
    final_dir.mkdir(parents=True, exist_ok=True)
    if chosen is None:  # a given plan file: final/plan.json says what is trained, whatever it said before
        chosen = {**plan.to_dict(), "source": source if source is not None else {"config": str(config)}}
    else:
        log(chosen_line)
    write_json(final_dir / rundir.PLAN_JSON, chosen)
    # Checkpoints belong to one plan and one training setup: an interrupted run of another plan, or
    # with other settings, is never resumed into this one (it starts afresh; its checkpoint is left).
    setup = {"plan": plan.to_dict(), "train": cfg.to_dict()}
    ckpts = {
        "compressed": final_dir / f"ckpt-compressed-{_digest(setup)}.pt",
        "control": final_dir / f"ckpt-control-{_digest(setup['train'])}.pt",
    }
    res = space.data["resources"]
    init_ray(address, 2, res["cpus_per_trial"], res["gpus_per_trial"], log)
    from ray.util.queue import Queue

    queue = Queue()
    threads = max(1, int(res["cpus_per_trial"]))
    task = ray.remote(num_cpus=res["cpus_per_trial"], num_gpus=res["gpus_per_trial"], max_retries=1)(_final_task)
    ref_payload = ray.put(payload)
    log(
        f"final run: {cfg.epochs:g} epochs of CLIP-Q fine-tuning"
        + (" and of the dense control, in parallel" if control else "")
        + " on Ray"
    )
    t0 = time.perf_counter()
    refs = {
        "compressed": task.remote(
            space.data,
            plan.to_dict(),
            ref_payload,
            str(ckpts["compressed"].resolve()),
            threads,
            queue,
            "compressed",
        ),
    }
    if control:
        refs["control"] = task.remote(
            space.data, None, ref_payload, str(ckpts["control"].resolve()), threads, queue, "control"
        )
    pending = list(refs.values())
    while pending:
        _, pending = ray.wait(pending, timeout=1.0, num_returns=len(pending))
        while not queue.empty():
            log(queue.get())
    while not queue.empty():
        log(queue.get())
    try:
        results = {k: ray.get(r) for k, r in refs.items()}
    except ray.exceptions.RayError as exc:
        raise ClipQError(
            f"the final run failed: {str(exc).strip().splitlines()[-1][:300]}; rerun `final` to resume"
        ) from None
    for tag, r in results.items():
        if r["resumed_from_step"]:
            log(f"  {tag}: resumed from its checkpoint at step {r['resumed_from_step']}")

    splits = load_dataset(dataset_spec(space))
    info = splits_info(splits)
    device = "cpu"
    model = model_for(space.data, info)
    attach_clipq(model, plan)
    model.load_state_dict(state_from_bytes(results["compressed"]["state"]), strict=True)
    written = save_compressed(model, final_dir / rundir.MODEL_FILE)
    reloaded = model_for(space.data, info)
    reloaded.load_state_dict(read_compressed(final_dir / rundir.MODEL_FILE)[0], strict=True)
    compressed = evaluate(reloaded, splits.test, device=device)
    control_top1 = None
    if control:
        control_model = model_for(space.data, info)
        control_model.load_state_dict(state_from_bytes(results["control"]["state"]), strict=True)
        control_top1 = evaluate(control_model, splits.test, device=device)["top1"]
    metrics = {
        "baseline_test_top1": baseline.test_top1,
        "control_test_top1": control_top1,
        "compressed_test_top1": compressed["top1"],
        "compressed_val_top1": evaluate(reloaded, splits.val, device=device)["top1"]
        if splits.val is not None
        else None,
        "rate": written.original_bytes / (final_dir / rundir.MODEL_FILE).stat().st_size,
        "file_bytes": (final_dir / rundir.MODEL_FILE).stat().st_size,
        "original_bytes": written.original_bytes,
        "plan": plan.to_dict(),
        "epochs": cfg.epochs,
        "seconds": time.perf_counter() - t0,
        "trial": (source or {}).get("trial"),
        "source": source,
        "resumed_from_step": {k: r["resumed_from_step"] for k, r in results.items()},
    }
    write_json(final_dir / rundir.METRICS_JSON, metrics)
    for path in ckpts.values():
        path.unlink(missing_ok=True)
    log(
        f"final: test accuracy baseline {metrics['baseline_test_top1']:.2f}%, "
        + (f"control {control_top1:.2f}%, " if control_top1 is not None else "")
        + f"compressed (reloaded from file) {metrics['compressed_test_top1']:.2f}%; "
        f"file {metrics['file_bytes']:,} bytes, "
        f"rate {metrics['rate']:.1f}x -> {final_dir / 'model.clipq'}"
    )
    return metrics
