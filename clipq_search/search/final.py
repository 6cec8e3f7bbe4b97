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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipq_search._io import read_regular, write_json
from clipq_search.analysis import rundir
from clipq_search.analysis.rundir import check_run_dir
from clipq_search.core.plan import PLAN_FILE_LIMIT, Plan
from clipq_search.errors import ClipQError
from clipq_search.search.runlock import hold_run, releasing_locks
from clipq_search.search.worker_kills import gather, kill_point

if TYPE_CHECKING:
    from clipq_search.search.space import Space

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
        doc = json.loads(read_regular(path, PLAN_FILE_LIMIT, "plan file"))
    except (OSError, ValueError, RecursionError, ClipQError):
        doc = None
    source = doc.get("source") if isinstance(doc, dict) else None
    ours = isinstance(source, dict) and "trial" in source and "layers" in doc
    if not ours:
        raise ClipQError(
            f"{path} exists and is not a plan exported by clipq-search; choose another --out, or move that file away"
        )


def _checkpoints(final_dir: Path, setup: dict[str, Any]) -> dict[str, Path]:
    """The compressed and control runs' checkpoint files.

    Checkpoints belong to one plan and one training setup: an interrupted run of another plan, or
    with other settings, is never resumed into this one (it starts afresh; its checkpoint is left).
    """
    return {
        "compressed": final_dir / f"ckpt-compressed-{_digest(setup)}.pt",
        "control": final_dir / f"ckpt-control-{_digest(setup['train'])}.pt",
    }


def _check_final_dir(final_dir: Path, setup: dict[str, Any], *, force: bool) -> None:
    """Refuse to replace a finished final of another plan or training setup, unless ``force``."""
    if force:
        return
    path = final_dir / rundir.METRICS_JSON
    if not path.is_file():
        return
    done = rundir.read_json(path, f"delete {path} or pass --force to replace it")
    same = done.get("setup") == _digest(setup) if "setup" in done else done.get("plan") == setup["plan"]
    if same:
        return
    trial = (done.get("source") or {}).get("trial") if isinstance(done.get("source"), dict) else None
    which = f"trial {trial}'s plan" if trial is not None else "another plan"
    raise ClipQError(
        f"{final_dir} holds the finished final run of {which} or another training setup; pass --force to "
        f"replace it, or copy {final_dir} elsewhere first to keep it"
    )


def _final_task(
    space: Space,
    plan: dict[str, Any] | None,
    payload: dict[str, Any],
    ckpt: str,
    threads: int,
    queue: Any,
    tag: str,
) -> dict[str, Any]:
    """Ray task: full-length fine-tune (CLIP-Q when ``plan`` is given, else the dense control)."""
    from clipq_search.core.surgery import attach_clipq
    from clipq_search.search.trial import (
        model_for,
        state_from_bytes,
        state_to_bytes,
        teacher_for,
        train_config,
        worker_device,
    )
    from clipq_search.training.data import loader_workers
    from clipq_search.training.loop import configure_threads, train

    configure_threads(threads)
    device = worker_device(space.resources)
    workers = loader_workers(space.resources.cpus_per_trial)
    model = model_for(space, payload["info"])
    model.load_state_dict(state_from_bytes(payload["baseline"]), strict=True)
    if plan is not None:
        attach_clipq(model, Plan.from_dict(plan))
    from clipq_search.training.data import dataset_from_state

    cfg = train_config(space, "final")
    if plan is None:  # the dense control: the baseline fine-tuned alone, from labels
        cfg = replace(cfg, distill_weight=0.0)
    teacher = teacher_for(space, payload, cfg)

    def on_epoch(rec: dict[str, float]) -> None:
        if queue is not None:
            val = f", val {rec['val_top1']:.2f}%" if "val_top1" in rec else ""
            try:
                queue.put(f"  {tag}: epoch {rec['epoch']:g}/{cfg.epochs:g} loss {rec['train_loss']:.4f}{val}")
            except Exception:  # noqa: BLE001 - progress lines are a courtesy; a lost queue never stops training
                pass

    with kill_point(tag):
        res = train(
            model,
            dataset_from_state(payload["train"], num_workers=workers),
            cfg,
            device=device,
            val_data=dataset_from_state(payload["val"], num_workers=workers),
            eval_batch_size=space.trial.eval_batch_size,
            progress=False,
            desc=tag,
            on_epoch_end=on_epoch,
            checkpoint_path=ckpt,
            resume=True,
            checkpoint_minutes=space.final.checkpoint_minutes,
            teacher=teacher,
        )
    model.cpu()
    return {
        "state": state_to_bytes(model),
        "seconds": res.seconds,
        "resumed_from_step": res.resumed_from_step,
        "final_train_loss": res.final_train_loss,
    }


def _evaluate_task(space: Space, states: dict[str, bytes], payload: dict[str, Any]) -> dict[str, Any]:
    """Ray task: test (and validation) metrics of each state dict in ``states``, on the worker's device."""
    from clipq_search.search.trial import model_for, state_from_bytes, worker_device
    from clipq_search.training.data import dataset_from_state, loader_workers
    from clipq_search.training.loop import configure_threads, evaluate

    res = space.resources
    configure_threads(max(1, int(res.cpus_per_trial)))
    device = worker_device(res)
    workers = loader_workers(res.cpus_per_trial)
    bs = space.trial.eval_batch_size
    test = dataset_from_state(payload["test"], num_workers=workers)
    val = dataset_from_state(payload["val"], num_workers=workers) if payload.get("val") is not None else None
    out: dict[str, Any] = {}
    for tag, blob in states.items():
        model = model_for(space, payload["info"])
        model.load_state_dict(state_from_bytes(blob), strict=True)
        out[tag] = {
            "test": evaluate(model, test, device=device, batch_size=bs),
            "val": evaluate(model, val, device=device, batch_size=bs) if val is not None else None,
            "device": str(device),
        }
    return out


def _relay(queue: Any, log: Callable[[str], None]) -> Callable[[], None]:
    """Log the progress lines the runs put on ``queue``; once the queue's actor is gone (killed), stay quiet."""
    alive = [True]

    def relay() -> None:
        while alive[0]:
            try:
                if queue.empty():
                    return
                log(queue.get(timeout=5))
            except Exception:  # noqa: BLE001 - Ray's errors for a lost actor vary; the runs go on without it
                alive[0] = False

    return relay


@dataclass(frozen=True)
class _FinalJob:
    """A checked ``final``: what is trained, from what, with which settings, and where it goes."""

    run_dir: Path
    space: Space
    cfg: Any  # the TrainConfig of final.train
    workers: int  # data-parallel workers of each run
    plan: Plan
    plan_doc: dict[str, Any]  # final/plan.json
    chosen_line: str | None  # the log line of a trial chosen from the run (None: a given plan file)
    source: dict[str, Any] | None  # where the plan came from (run, trial, rule), when known
    baseline: Any  # the run's Baseline
    payload: dict[str, Any]  # the trial payload with the test split (the dataset, read once)
    final_dir: Path
    setup: dict[str, Any]  # what the checkpoints belong to: the plan, final.train, the workers
    ckpts: dict[str, Path]
    tags: tuple[str, ...]  # "compressed", and "control" unless skipped


@releasing_locks
def run_final(
    run_dir: Path,
    *,
    config: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    address: str | None = None,
    log: Callable[[str], None] = print,
    out_dir: Path | None = None,
    control: bool = True,
    force: bool = False,
    trial: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Full-length CLIP-Q run of a plan -> ``final/model.clipq`` and ``final/metrics.json``.

    ``out_dir`` (default ``RUN_DIR/final``) and ``control=False`` (skip the dense
    control run) serve benchmarks that finalise several plans of one run. A
    finished final of another plan or training setup is replaced only with
    ``force``. ``workers`` (default ``final.workers``) above 1 trains each run
    data-parallel on that many Ray Train workers (``final_ddp``).
    """
    job = _check_final(
        run_dir, config=config, overrides=overrides, address=address, out_dir=out_dir, control=control,
        force=force, trial=trial, workers=workers,
    )
    _open_final(job, address, log)
    t0 = time.perf_counter()
    results, ref_payload = _train_final(job, log)
    written, scores = _write_and_evaluate(job, results, ref_payload, log)
    return _finish_final(job, results, written, scores, time.perf_counter() - t0, log)


def _check_final(
    run_dir: Path,
    *,
    config: str | None,
    overrides: list[str] | tuple[str, ...],
    address: str | None,
    out_dir: Path | None,
    control: bool,
    force: bool,
    trial: int | None,
    workers: int | None,
) -> _FinalJob:
    """Everything that can fail on bad input, before anything is written; the dataset is read once, here."""
    from clipq_search.search.cluster import check_address, check_gpus
    from clipq_search.search.final_ddp import check_workers
    from clipq_search.search.space import load_space
    from clipq_search.search.trial import model_for, train_config, trial_payload
    from clipq_search.training.loop import check_checkpoint

    check_run_dir(run_dir)
    if address:
        check_address(address)
    space = load_space(run_dir / rundir.SPACE_YAML, overrides)
    check_gpus(address, space.resources.gpus_per_trial)
    cfg = train_config(space, "final")
    n_workers = space.final.workers if workers is None else workers
    check_workers(n_workers, cfg.batch_size)
    chosen_line = None
    if config:
        plan = Plan.load(config)
        try:
            source = json.loads(read_regular(config, PLAN_FILE_LIMIT, "plan file")).get("source")
        except (OSError, ValueError, AttributeError, RecursionError, ClipQError):
            source = None
        # a given plan file: final/plan.json says what is trained, whatever it said before
        plan_doc = {**plan.to_dict(), "source": source if source is not None else {"config": str(config)}}
    else:
        plan, plan_doc, chosen_line = choose_plan(run_dir, trial=trial)
        source = plan_doc["source"]
    baseline = run_baseline(run_dir)
    payload = trial_payload(space, baseline, test=True)
    plan.resolve(model_for(space, payload["info"]))  # unknown layers fail before any training
    final_dir = out_dir or run_dir / rundir.FINAL_DIR
    setup = {"plan": plan.to_dict(), "train": cfg.to_dict()}
    if n_workers > 1:  # another setup: its own checkpoints (a 1-worker setup keeps the digest it always had)
        setup["workers"] = n_workers
    ckpts = _checkpoints(final_dir, setup)
    _check_final_dir(final_dir, setup, force=force)
    for path in ckpts.values():
        check_checkpoint(path)
    tags = ("compressed", "control") if control else ("compressed",)
    return _FinalJob(
        run_dir, space, cfg, n_workers, plan, plan_doc, chosen_line, source, baseline, payload, final_dir, setup,
        ckpts, tags,
    )


def _open_final(job: _FinalJob, address: str | None, log: Callable[[str], None]) -> None:
    """The cluster answers, the final folder is this command's (a lock in the run's storage), plan.json written."""
    from clipq_search.search.cluster import init_ray

    res = job.space.resources
    if address:  # the cluster answers before anything is written
        init_ray(address, 2, res.cpus_per_trial, res.gpus_per_trial, log)
    # One `final` at a time into a folder; the lock lives in the run's storage (released when run_final ends).
    storage = rundir.load_run_info(job.run_dir).get("storage") or rundir.default_storage(job.run_dir)
    hold_run(storage, f"{job.run_dir.name}:{job.final_dir.name}", "final", log)
    job.final_dir.mkdir(parents=True, exist_ok=True)
    if job.chosen_line is not None:
        log(job.chosen_line)
    write_json(job.final_dir / rundir.PLAN_JSON, job.plan_doc)
    init_ray(address, 2, res.cpus_per_trial, res.gpus_per_trial, log)


def _train_final(job: _FinalJob, log: Callable[[str], None]) -> tuple[dict[str, dict[str, Any]], Any]:
    """The compressed (and control) fine-tunes on Ray: each run's result by tag, and the payload's object ref."""
    import ray

    from clipq_search.training.loop import epochs_text

    res = job.space.resources
    ref_payload = ray.put(job.payload)
    control = "control" in job.tags
    plans = {"compressed": job.plan.to_dict(), "control": None}
    if job.workers > 1:
        from clipq_search.search.final_ddp import run_ddp

        log(
            f"final run: {epochs_text(job.cfg.epochs)} of CLIP-Q fine-tuning"
            + (" then of the dense control" if control else "")
            + f", each on {job.workers} data-parallel workers (Ray Train)"
        )
        results = run_ddp(
            job.space, {t: plans[t] for t in job.tags}, ref_payload, _ddp_storage(job), _digest(job.setup),
            job.workers, retries=job.space.search.retries, log=log,
        )
    else:
        from ray.util.queue import Queue

        log(
            f"final run: {epochs_text(job.cfg.epochs)} of CLIP-Q fine-tuning"
            + (" and of the dense control, in parallel" if control else "")
            + " on Ray"
        )
        queue = Queue()
        threads = max(1, int(res.cpus_per_trial))
        # Retries are gather's: a run whose worker Ray kills starts again from its last checkpoint.
        task = ray.remote(num_cpus=res.cpus_per_trial, num_gpus=res.gpus_per_trial, max_retries=0)(_final_task)

        def submit(tag: Any) -> Any:
            ckpt = str(job.ckpts[tag].resolve())
            return task.remote(job.space, plans[tag], ref_payload, ckpt, threads, queue, tag)

        relay = _relay(queue, log)
        results = gather(
            submit,
            list(job.tags),
            retries=job.space.search.retries,
            what=lambda tag: f"final {tag} run",
            log=log,
            poll=relay,
            again="running it again from its checkpoint",
        )
        relay()
    for tag, r in results.items():
        if r["resumed_from_step"]:
            log(f"  {tag}: resumed from its checkpoint at step {r['resumed_from_step']}")
    return results, ref_payload


def _ddp_storage(job: _FinalJob) -> Path:
    return (job.final_dir / "ray-train").resolve()


def _write_and_evaluate(
    job: _FinalJob, results: dict[str, dict[str, Any]], ref_payload: Any, log: Callable[[str], None]
) -> tuple[Any, dict[str, Any]]:
    """Write ``model.clipq``, then score the model decoded from it (and the control) on the test split."""
    from clipq_search.core.encoding import read_compressed, save_compressed
    from clipq_search.core.surgery import attach_clipq
    from clipq_search.search.trial import model_for, run_task, state_from_bytes, state_to_bytes

    info = job.payload["info"]
    model = model_for(job.space, info)
    attach_clipq(model, job.plan)
    model.load_state_dict(state_from_bytes(results["compressed"]["state"]), strict=True)
    written = save_compressed(model, job.final_dir / rundir.MODEL_FILE)
    # What is evaluated is the file as written: decoded here, evaluated by a worker with the space's resources.
    reloaded = model_for(job.space, info)
    reloaded.load_state_dict(read_compressed(job.final_dir / rundir.MODEL_FILE)[0], strict=True)
    states = {"compressed": state_to_bytes(reloaded)}
    if "control" in results:
        states["control"] = results["control"]["state"]
    scores = run_task(
        _evaluate_task, job.space.resources, job.space, states, ref_payload,
        what="the final evaluation", retries=job.space.search.retries, log=log,
    )
    return written, scores


def _finish_final(
    job: _FinalJob,
    results: dict[str, dict[str, Any]],
    written: Any,
    scores: dict[str, Any],
    seconds: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """``metrics.json`` written, the checkpoints removed, the result line logged; the metrics returned."""
    model_file = job.final_dir / rundir.MODEL_FILE
    compressed = scores["compressed"]
    control_top1 = scores["control"]["test"]["top1"] if "control" in scores else None
    metrics = {
        "baseline_test_top1": job.baseline.test_top1,
        "control_test_top1": control_top1,
        "compressed_test_top1": compressed["test"]["top1"],
        "compressed_val_top1": compressed["val"]["top1"] if compressed["val"] else None,
        "rate": written.original_bytes / model_file.stat().st_size,
        "file_bytes": model_file.stat().st_size,
        "original_bytes": written.original_bytes,
        "plan": job.plan.to_dict(),
        "epochs": job.cfg.epochs,
        "seconds": seconds,
        "trial": (job.source or {}).get("trial"),
        "source": job.source,
        "resumed_from_step": {k: r["resumed_from_step"] for k, r in results.items()},
        "setup": _digest(job.setup),
        "workers": job.workers,
    }
    if job.workers > 1:  # one digest of the quantized weights per rank: they agree (checked by run_ddp)
        metrics["rank_digests"] = {k: r["digests"] for k, r in results.items()}
    write_json(job.final_dir / rundir.METRICS_JSON, metrics)
    for path in job.ckpts.values():
        path.unlink(missing_ok=True)
    if job.workers > 1:
        from clipq_search.search.final_ddp import forget

        forget(_ddp_storage(job), _digest(job.setup), list(job.tags))
    log(
        f"final: test accuracy baseline {metrics['baseline_test_top1']:.2f}%, "
        + (f"control {control_top1:.2f}%, " if control_top1 is not None else "")
        + f"compressed (reloaded from file) {metrics['compressed_test_top1']:.2f}%; "
        f"file {metrics['file_bytes']:,} bytes, "
        f"rate {metrics['rate']:.1f}x -> {job.final_dir / 'model.clipq'}"
    )
    return metrics
