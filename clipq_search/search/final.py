"""Export a chosen plan, and run it to a final, truly smaller model file.

``final`` runs two full-length fine-tunes as Ray tasks (so a cluster GPU is
used when there is one): the plan with CLIP-Q attached, and a **control** (the
same dense baseline fine-tuned for the same epochs without compression).
Both checkpoint at each epoch's end and every ``final.checkpoint_minutes``
within an epoch, and resume after an interruption. The compressed
model is written as ``final/model.clipq`` and its test accuracy is measured on
the model **as reloaded from that file**.

``final --top K`` fine-tunes the K trials nearest the export rule's boundary
instead (short trials are a noisy proxy for a full-length run), all in
parallel with one shared control, writes each as
``final/candidates/trial-N.clipq``, and keeps as ``model.clipq`` the one the
same rule picks on full-length validation accuracy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipq_search._io import read_regular, write_bytes, write_json
from clipq_search.analysis import rundir
from clipq_search.analysis.rundir import check_run_dir
from clipq_search.core.plan import PLAN_FILE_LIMIT, Plan
from clipq_search.errors import ClipQError
from clipq_search.search.runlock import hold_run, releasing_locks
from clipq_search.search.worker_kills import gather, kill_point

if TYPE_CHECKING:
    from clipq_search.search.space import Space

__all__ = ["choose_candidates", "choose_plan", "export_plan", "run_final"]

DEFAULT_MAX_DROP = 1.0
CANDIDATES_DIR = "candidates"  # final/candidates/trial-N.clipq: each `final --top` candidate's model file


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


def _by_rule(df: Any, baseline_val_top1: float, max_drop: float | None, min_rate: float | None) -> Any:
    """The export rule's ``Selection``: ``min_rate`` when given, else ``max_drop`` (default 1 point)."""
    from clipq_search.analysis.pareto import select_max_drop, select_min_rate

    if min_rate is not None:
        return select_min_rate(df, min_rate)
    return select_max_drop(df, baseline_val_top1, DEFAULT_MAX_DROP if max_drop is None else max_drop)


def _trial_plan(run_dir: Path, df: Any, number: int, rule: str, base: float) -> tuple[Plan, dict[str, Any]]:
    """Trial ``number``'s plan and its plan JSON document (plan, its short-trial metrics, source)."""
    from clipq_search.analysis.pareto import is_multi_fidelity, plan_of

    row = df[df["number"] == number].iloc[0]
    plan = Plan.from_dict(plan_of(df, number))
    metrics = {k: (None if row.get(k) != row.get(k) else float(row[k])) for k in ("val_top1", "rate", "size_bytes")}
    if is_multi_fidelity(df):  # the trial's result is at the highest budget it reached
        metrics["budget"] = float(row["budget"])
    doc = {
        **plan.to_dict(),
        "metrics": {**metrics, "baseline_val_top1": base},
        "source": {"run": str(run_dir), "trial": int(number), "rule": rule},
    }
    return plan, doc


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
    from clipq_search.analysis.pareto import select_trial
    from clipq_search.analysis.rundir import load_trials

    check_run_dir(run_dir)
    base = run_baseline(run_dir).val_top1
    df = load_trials(run_dir)
    sel = select_trial(df, trial) if trial is not None else _by_rule(df, base, max_drop, min_rate)
    if sel.trial is None:
        raise ClipQError(sel.message)
    plan, doc = _trial_plan(run_dir, df, sel.trial, sel.rule, base)
    metrics = doc["metrics"]
    line = f"selected trial {sel.trial} ({sel.rule}): val {metrics['val_top1']:.2f}%, rate {metrics['rate']:.1f}x"
    if "budget" in metrics:
        line += f" (after {metrics['budget']:.3g} epochs)"
    return plan, doc, line


def choose_candidates(
    run_dir: Path, top: int, *, max_drop: float | None = None, min_rate: float | None = None
) -> tuple[list[tuple[Plan, dict[str, Any]]], str, list[str]]:
    """The ``top`` trials nearest the export rule's boundary (``boundary_candidates``): plan and plan document
    each, the rule's name, and the log lines saying which trials and why. Reads only."""
    from clipq_search.analysis.pareto import boundary_candidates
    from clipq_search.analysis.rundir import load_trials

    check_run_dir(run_dir)
    base = run_baseline(run_dir).val_top1
    df = load_trials(run_dir)
    near = boundary_candidates(df, base, top, max_drop=max_drop, min_rate=min_rate)
    if not near.numbers:
        raise ClipQError(
            "no complete trial yet; run `run_search.py search` (or wait for the running search to finish one)"
        )
    picks = [_trial_plan(run_dir, df, n, near.rule, base) for n in near.numbers]
    return picks, near.rule, _candidate_lines(near, [doc for _, doc in picks], top, base)


def _candidate_lines(near: Any, docs: list[dict[str, Any]], top: int, base: float) -> list[str]:
    """Which trials ``--top`` fine-tunes, and why those."""
    lines = []
    if near.n_complete < top:
        lines.append(f"--top {top}: the run has {near.n_complete} complete trial(s); fine-tuning all of them")
    elif len(near.numbers) < top:
        lines.append(
            f"--top {top}: the run's {near.n_complete} complete trials ran {len(near.numbers)} distinct plans; "
            "fine-tuning each once"
        )
    elif near.n_front < top:
        lines.append(
            f"--top {top}: the Pareto front holds {near.n_front} trial(s); "
            f"{top - near.n_front} more from the next fronts"
        )
    parts = []
    for doc, meets, rank in zip(docs, near.meets, near.ranks, strict=True):
        m = doc["metrics"]
        where = "" if rank == 0 else f", front {rank + 1}"
        parts.append(
            f"trial {doc['source']['trial']} (val {m['val_top1']:.2f}%, drop {base - m['val_top1']:.2f}, "
            f"rate {m['rate']:.1f}x, {'meets' if meets else 'misses'}{where})"
        )
    lines.append(
        f"{len(docs)} candidate(s) nearest the {near.rule} boundary on their short trials (baseline val "
        f"{base:.2f}%), to pick from by {near.rule} on full-length val: " + ", ".join(parts)
    )
    return lines


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


def _check_final_dir(final_dir: Path, digest: str, plan: dict[str, Any] | None, *, force: bool) -> None:
    """Refuse to replace a finished final of another plan or training setup, unless ``force``.

    ``digest`` names what this final trains (metrics.json's ``setup``); ``plan``, for a final of one plan,
    also recognises a metrics.json written before the setup was recorded.
    """
    if force:
        return
    path = final_dir / rundir.METRICS_JSON
    if not path.is_file():
        return
    done = rundir.read_json(path, f"delete {path} or pass --force to replace it")
    same = done.get("setup") == digest if "setup" in done else plan is not None and done.get("plan") == plan
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

    cpu0 = time.process_time()  # this worker's CPU time (all its threads): the run's compute
    with kill_point(tag, payload["kill_hook"]):
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
        "cpu_seconds": time.process_time() - cpu0,  # of this attempt (a resumed run: since its checkpoint)
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
class _Candidate:
    """One plan that ``final`` fine-tunes at full length."""

    tag: str  # "compressed": the one plan of a plain final; "trial-N": a --top candidate
    plan: Plan
    doc: dict[str, Any]  # its plan.json document
    source: dict[str, Any] | None  # where the plan came from (run, trial, rule), when known
    setup: dict[str, Any]  # what its checkpoint belongs to: the plan, final.train, the workers
    ckpt: Path

    @property
    def trial(self) -> int | None:
        return self.source.get("trial") if isinstance(self.source, dict) else None


@dataclass(frozen=True)
class _FinalJob:
    """A checked ``final``: what is trained, from what, with which settings, and where it goes."""

    run_dir: Path
    space: Space
    cfg: Any  # the TrainConfig of final.train
    workers: int  # data-parallel workers of each run
    candidates: tuple[_Candidate, ...]  # the one plan, or --top's candidates (most promising first)
    lines: tuple[str, ...]  # logged once the folder is ours: which plan(s) were chosen from the run, and why
    top: int | None  # --top K (K >= 2): keep the candidate the rule picks on full-length val; None: one plan
    rule: tuple[float | None, float | None]  # (max_drop, min_rate) of that pick
    rule_name: str | None  # "max-drop 1", "min-rate 20": --top's rule, as metrics.json names it
    baseline: Any  # the run's Baseline
    payload: dict[str, Any]  # the trial payload with the test split (the dataset, read once)
    final_dir: Path
    digest: str  # metrics.json's "setup": what this final trains (its rerun replaces it without --force)
    control_ckpt: Path | None  # the dense control's checkpoint; None: no control run

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(c.tag for c in self.candidates) + (("control",) if self.control_ckpt else ())

    @property
    def ckpts(self) -> dict[str, Path]:
        out = {c.tag: c.ckpt for c in self.candidates}
        if self.control_ckpt is not None:
            out["control"] = self.control_ckpt
        return out


@dataclass(frozen=True)
class _Outcome:
    """The evaluation's result: the plan kept as ``model.clipq``, that file's sizes and every run's scores."""

    chosen: _Candidate
    written: Any  # the SizeEstimate of model.clipq
    scores: dict[str, Any]  # _evaluate_task's test and val metrics, by tag
    top: dict[str, Any]  # --top's keys of metrics.json (rule, rule_met, candidates); empty for one plan
    staged: Path | None = None  # one plan: its file, written beside model.clipq until metrics.json is


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
    top: int | None = None,
    max_drop: float | None = None,
    min_rate: float | None = None,
) -> dict[str, Any]:
    """Full-length CLIP-Q run of a plan -> ``final/model.clipq`` and ``final/metrics.json``.

    The plan is ``config``, trial ``trial``'s, or the one ``export``'s rule picks (``max_drop``, default
    1 point, or ``min_rate``). ``top`` K >= 2 instead fine-tunes the K trials nearest that rule's
    boundary in parallel and keeps the one the same rule picks on their full-length val accuracy
    (``metrics.json``'s ``candidates`` lists all K). ``out_dir`` (default ``RUN_DIR/final``) and
    ``control=False`` (skip the dense control run) serve benchmarks that finalise several plans of one
    run. A finished final of another plan or training setup is replaced only with ``force``.
    ``workers`` (default ``final.workers``) above 1 trains each run data-parallel on that many Ray
    Train workers (``final_ddp``).
    """
    job = _check_final(
        run_dir, config=config, overrides=overrides, address=address, out_dir=out_dir, control=control,
        force=force, trial=trial, workers=workers, top=top, max_drop=max_drop, min_rate=min_rate,
    )
    _open_final(job, address, log)
    t0 = time.perf_counter()
    results, ref_payload = _train_final(job, log)
    if job.top is None:
        outcome = _write_and_evaluate(job, results, ref_payload, log)
    else:
        outcome = _evaluate_and_pick(job, results, ref_payload, log)
    return _finish_final(job, results, outcome, time.perf_counter() - t0, log)


# What the run's baseline, trials and checkpoints were made with: a final may not change it (where the dataset's
# files are, dataset.root, may: another machine).
_RUN_DATA = ("model", "model_weights", "dataset", "baseline")


def _check_same_data(run_dir: Path, space: Space, saved: Space) -> None:
    """Refuse --set values that change the model, the data or the baseline of the run: the final run fine-tunes
    the run's baseline on the run's split, and its checkpoints are named for the plan and training alone."""

    def part(data: dict[str, Any], key: str) -> Any:
        value = data.get(key)
        return {k: v for k, v in value.items() if k != "root"} if key == "dataset" and value else value

    now, before = space.to_dict(), saved.to_dict()
    changed = [key for key in _RUN_DATA if part(now, key) != part(before, key)]
    if changed:
        raise ClipQError(
            f"--set changes {', '.join(changed)} of the run {run_dir} (its space.yaml): a final run fine-tunes "
            "the run's baseline on the run's data; set only final.*, resources.* or dataset.root, or search "
            "again under another --name for another model or data"
        )


def _check_choice(
    config: str | None, trial: int | None, top: int | None, max_drop: float | None, min_rate: float | None
) -> None:
    """The ways of naming the plan that go together; one line for those that do not."""
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ClipQError(f"--top {top!r} is invalid; give the number of candidates as an integer >= 1")
    named = [flag for flag, given in (("--config", bool(config)), ("--trial", trial is not None)) if given]
    chooses = [flag for flag, value in (("--top", top), ("--max-drop", max_drop), ("--min-rate", min_rate))
               if value is not None]
    if len(named) > 1:
        raise ClipQError("--config and --trial each name the plan; give one of them")
    if named and chooses:
        raise ClipQError(
            f"{chooses[0]} chooses among the run's trials and {named[0]} names the plan; give one of them, not both"
        )
    if max_drop is not None and min_rate is not None:
        raise ClipQError("--max-drop and --min-rate are two rules; give one of them")


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
    top: int | None,
    max_drop: float | None,
    min_rate: float | None,
) -> _FinalJob:
    """Everything that can fail on bad input, before anything is written; the dataset is read once, here."""
    from clipq_search.search.cluster import check_address, check_gpus
    from clipq_search.search.final_ddp import check_workers
    from clipq_search.search.space import load_space
    from clipq_search.search.trial import model_for, train_config, trial_payload
    from clipq_search.training.loop import check_checkpoint

    _check_choice(config, trial, top, max_drop, min_rate)
    check_run_dir(run_dir)
    if address:
        check_address(address)
    space = load_space(run_dir / rundir.SPACE_YAML, overrides)
    if overrides:
        _check_same_data(run_dir, space, load_space(run_dir / rundir.SPACE_YAML))
    check_gpus(address, space.resources.gpus_per_trial)
    cfg = train_config(space, "final")
    n_workers = space.final.workers if workers is None else workers
    check_workers(n_workers, cfg.batch_size)
    top = top if top is not None and top > 1 else None  # --top 1 is the plain final of the rule's pick
    picks, lines, rule_name = _pick_plans(run_dir, config, trial, top, max_drop, min_rate)
    baseline = run_baseline(run_dir)
    payload = trial_payload(space, baseline, test=True)
    model = model_for(space, payload["info"])
    for plan, _, _ in picks:
        plan.resolve(model)  # unknown layers fail before any training
    final_dir = out_dir or run_dir / rundir.FINAL_DIR
    candidates = _candidates(picks, cfg, n_workers, final_dir, top)
    if top is None:
        digest = _digest(candidates[0].setup)
    else:
        digest = _digest({"top": [c.setup for c in candidates], "rule": rule_name})
    _check_final_dir(final_dir, digest, candidates[0].setup["plan"] if top is None else None, force=force)
    control_ckpt = _checkpoints(final_dir, candidates[0].setup)["control"] if control else None
    job = _FinalJob(
        run_dir, space, cfg, n_workers, candidates, tuple(lines), top, (max_drop, min_rate), rule_name, baseline,
        payload, final_dir, digest, control_ckpt,
    )
    for path in job.ckpts.values():
        check_checkpoint(path)
    return job


def _pick_plans(
    run_dir: Path,
    config: str | None,
    trial: int | None,
    top: int | None,
    max_drop: float | None,
    min_rate: float | None,
) -> tuple[list[tuple[Plan, dict[str, Any], dict[str, Any] | None]], list[str], str | None]:
    """The plan(s) to train (plan, plan.json document, source), the lines saying why, and --top's rule name."""
    if config:
        plan = Plan.load(config)
        try:
            source = json.loads(read_regular(config, PLAN_FILE_LIMIT, "plan file")).get("source")
        except (OSError, ValueError, AttributeError, RecursionError, ClipQError):
            source = None
        # a given plan file: final/plan.json says what is trained, whatever it said before
        doc = {**plan.to_dict(), "source": source if source is not None else {"config": str(config)}}
        return [(plan, doc, source)], [], None
    if top is None:
        plan, doc, line = choose_plan(run_dir, trial=trial, max_drop=max_drop, min_rate=min_rate)
        return [(plan, doc, doc["source"])], [line], None
    picks, rule_name, lines = choose_candidates(run_dir, top, max_drop=max_drop, min_rate=min_rate)
    for _, doc in picks:
        doc["source"]["top"] = top
    return [(plan, doc, doc["source"]) for plan, doc in picks], lines, rule_name


def _candidates(
    picks: list[tuple[Plan, dict[str, Any], dict[str, Any] | None]],
    cfg: Any,
    workers: int,
    final_dir: Path,
    top: int | None,
) -> tuple[_Candidate, ...]:
    """Each plan's run: its tag, and its checkpoint named after its own setup (a rerun resumes each one)."""
    out = []
    for plan, doc, source in picks:
        setup = {"plan": plan.to_dict(), "train": cfg.to_dict()}
        if workers > 1:  # another setup: its own checkpoints (a 1-worker setup keeps the digest it always had)
            setup["workers"] = workers
        tag = "compressed" if top is None else f"trial-{doc['source']['trial']}"
        out.append(_Candidate(tag, plan, doc, source, setup, _checkpoints(final_dir, setup)["compressed"]))
    return tuple(out)


def _open_final(job: _FinalJob, address: str | None, log: Callable[[str], None]) -> None:
    """The cluster answers, and the final folder is this command's (a lock in the run's storage).

    plan.json, model.clipq and metrics.json are replaced together at the end (``_finish_final``): a run
    killed before leaves those of the finished final it replaces (``--force``) as they were, in agreement.
    """
    from clipq_search.search.cluster import init_ray

    res = job.space.resources
    if address:  # the cluster answers before anything is written
        init_ray(address, 2, res.cpus_per_trial, res.gpus_per_trial, log)
    # One `final` at a time into a folder; the lock lives in the run's storage (released when run_final ends).
    storage = rundir.load_run_info(job.run_dir).get("storage") or rundir.default_storage(job.run_dir)
    hold_run(storage, f"{job.run_dir.name}:{job.final_dir.name}", "final", log)
    job.final_dir.mkdir(parents=True, exist_ok=True)
    for line in job.lines:
        log(line)
    init_ray(address, 2, res.cpus_per_trial, res.gpus_per_trial, log)


def _runs_line(job: _FinalJob) -> str:
    """The log line saying which runs train, how long, and how (in parallel, or each data-parallel)."""
    from clipq_search.training.loop import epochs_text

    control = job.control_ckpt is not None
    what = f"final run: {epochs_text(job.cfg.epochs)} of CLIP-Q fine-tuning"
    if job.top is not None:
        what += f" of {len(job.candidates)} candidates"
    if job.workers > 1:
        return (
            what
            + (" in turn" if job.top is not None else "")
            + (" then of the dense control" if control else "")
            + f", each on {job.workers} data-parallel workers (Ray Train)"
        )
    return (
        what
        + (" and of the dense control" if control else "")
        + (", in parallel" if control or job.top is not None else "")
        + " on Ray"
    )


def _train_final(job: _FinalJob, log: Callable[[str], None]) -> tuple[dict[str, dict[str, Any]], Any]:
    """Every candidate's fine-tune (and the control's) on Ray: each run's result by tag, and the payload's ref."""
    import ray

    res = job.space.resources
    ref_payload = ray.put(job.payload)
    plans: dict[str, dict[str, Any] | None] = {c.tag: c.plan.to_dict() for c in job.candidates}
    if job.control_ckpt is not None:
        plans["control"] = None
    log(_runs_line(job))
    if job.workers > 1:
        from clipq_search.search.final_ddp import run_ddp

        results = run_ddp(
            job.space, plans, ref_payload, _ddp_storage(job), job.digest, job.workers,
            retries=job.space.search.retries, log=log,
        )
    else:
        from ray.util.queue import Queue

        queue = Queue()
        threads = max(1, int(res.cpus_per_trial))
        # Retries are gather's: a run whose worker Ray kills starts again from its last checkpoint.
        task = ray.remote(num_cpus=res.cpus_per_trial, num_gpus=res.gpus_per_trial, max_retries=0)(_final_task)
        ckpts = job.ckpts

        def submit(tag: Any) -> Any:
            ckpt = str(ckpts[tag].resolve())
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


def _trained_model(job: _FinalJob, cand: _Candidate, results: dict[str, dict[str, Any]]) -> Any:
    """Candidate ``cand``'s fine-tuned model, CLIP-Q attached (ready to be written as a .clipq file)."""
    from clipq_search.core.surgery import attach_clipq
    from clipq_search.search.trial import model_for, state_from_bytes

    model = model_for(job.space, job.payload["info"])
    attach_clipq(model, cand.plan)
    model.load_state_dict(state_from_bytes(results[cand.tag]["state"]), strict=True)
    return model


def _decoded_state(job: _FinalJob, path: Path) -> bytes:
    """The state dict of the model decoded from the .clipq file ``path``: what is evaluated is the file."""
    from clipq_search.core.encoding import read_compressed
    from clipq_search.search.trial import model_for, state_to_bytes

    model = model_for(job.space, job.payload["info"])
    model.load_state_dict(read_compressed(path)[0], strict=True)
    return state_to_bytes(model)


def _evaluate(job: _FinalJob, states: dict[str, bytes], ref_payload: Any, log: Callable[[str], None]) -> Any:
    """Test and val metrics of each state, by a worker with the space's resources."""
    from clipq_search.search.trial import run_task

    return run_task(
        _evaluate_task, job.space.resources, job.space, states, ref_payload,
        what="the final evaluation", retries=job.space.search.retries, log=log,
    )


def _clear_candidates(final_dir: Path) -> None:
    """Remove an earlier --top run's candidate files (``candidates/trial-*.clipq``), and the folder once empty."""
    folder = final_dir / CANDIDATES_DIR
    if not folder.is_dir():
        return
    for path in folder.glob("trial-*.clipq"):
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # something else in there: left as it is
        folder.rmdir()


def _write_and_evaluate(
    job: _FinalJob, results: dict[str, dict[str, Any]], ref_payload: Any, log: Callable[[str], None]
) -> _Outcome:
    """Write ``model.clipq``, then score the model decoded from it (and the control) on the test split."""
    from clipq_search.core.encoding import save_compressed

    (cand,) = job.candidates
    staged = job.final_dir / f".{rundir.MODEL_FILE}.new"  # model.clipq once metrics.json says what it is
    written = save_compressed(_trained_model(job, cand, results), staged)
    states = {cand.tag: _decoded_state(job, staged)}
    if "control" in results:
        states["control"] = results["control"]["state"]
    try:
        scores = _evaluate(job, states, ref_payload, log)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return _Outcome(cand, written, scores, {}, staged)


def _evaluate_and_pick(
    job: _FinalJob, results: dict[str, dict[str, Any]], ref_payload: Any, log: Callable[[str], None]
) -> _Outcome:
    """--top: each candidate written as its own file and scored as decoded from it; the one the rule picks on
    full-length val is copied to ``model.clipq`` (the same bytes, so its test accuracy is that file's)."""
    from clipq_search.core.encoding import CLIPQ_FILE_LIMIT, save_compressed

    _clear_candidates(job.final_dir)
    folder = job.final_dir / CANDIDATES_DIR
    folder.mkdir(exist_ok=True)
    files, written = {}, {}
    for cand in job.candidates:
        files[cand.tag] = folder / f"{cand.tag}.clipq"
        written[cand.tag] = save_compressed(_trained_model(job, cand, results), files[cand.tag])
    states = {tag: _decoded_state(job, path) for tag, path in files.items()}
    if "control" in results:
        states["control"] = results["control"]["state"]
    scores = _evaluate(job, states, ref_payload, log)
    records = _candidate_records(job, results, files, written, scores)
    chosen, met = _pick(job, records, log)
    data = read_regular(files[chosen.tag], CLIPQ_FILE_LIMIT, ".clipq file")
    write_bytes(job.final_dir / rundir.MODEL_FILE, data)
    write_json(job.final_dir / rundir.PLAN_JSON, chosen.doc)
    for rec in records:
        rec["chosen"] = rec["trial"] == chosen.trial
    top = {"rule": job.rule_name, "rule_met": met, "candidates": records}
    return _Outcome(chosen, written[chosen.tag], scores, top)


def _candidate_records(
    job: _FinalJob,
    results: dict[str, dict[str, Any]],
    files: dict[str, Path],
    written: dict[str, Any],
    scores: dict[str, Any],
) -> list[dict[str, Any]]:
    """metrics.json's ``candidates``: each one's short-trial and full-length metrics, and whether it meets the rule.

    Test accuracies are those of the models decoded from the files (``test_top1_of``).
    """
    from clipq_search.analysis.pareto import rule_mask

    records = []
    for cand in job.candidates:
        path, score = files[cand.tag], scores[cand.tag]
        short = cand.doc.get("metrics") or {}
        size = path.stat().st_size
        records.append({
            "trial": cand.trial,
            "short_val_top1": short.get("val_top1"),
            "short_rate": short.get("rate"),
            "val_top1": score["val"]["top1"],
            "test_top1": score["test"]["top1"],
            "test_top1_of": "decoded file",
            "file": str(path.relative_to(job.final_dir)),
            "file_bytes": size,
            "rate": written[cand.tag].original_bytes / size,
            "resumed_from_step": results[cand.tag]["resumed_from_step"],
        })
    meets, _ = rule_mask(
        [r["val_top1"] for r in records], [r["rate"] for r in records], job.baseline.val_top1,
        max_drop=job.rule[0], min_rate=job.rule[1],
    )
    for rec, ok in zip(records, meets, strict=True):
        rec["meets_rule"] = bool(ok)
    return records


def _pick(job: _FinalJob, records: list[dict[str, Any]], log: Callable[[str], None]) -> tuple[_Candidate, bool]:
    """The candidate the rule picks on full-length val accuracy and file rate (``export``'s own selection),
    else the closest to meeting it; and whether it meets the rule. Each candidate's result is logged."""
    import pandas as pd

    from clipq_search.analysis.pareto import COMPLETE

    base, rule = job.baseline.val_top1, job.rule_name
    for rec in records:
        log(
            f"  trial {rec['trial']}: full-length val {rec['val_top1']:.2f}% (drop {base - rec['val_top1']:.2f}), "
            f"file rate {rec['rate']:.1f}x: {'meets' if rec['meets_rule'] else 'misses'} {rule}"
        )
    frame = pd.DataFrame({
        "number": [rec["trial"] for rec in records],
        "state": COMPLETE,
        "val_top1": [rec["val_top1"] for rec in records],
        "rate": [rec["rate"] for rec in records],
    })
    sel = _by_rule(frame, base, *job.rule)
    number = sel.trial if sel.trial is not None else sel.closest
    if number is None:
        raise ClipQError(sel.message)
    chosen = next(c for c in job.candidates if c.trial == number)
    if sel.trial is not None:
        log(f"picked among {len(records)} candidates by {rule} at full length: {sel.message}")
    else:
        rec = next(r for r in records if r["trial"] == number)
        log(
            f"no candidate meets {rule} at full length; keeping the closest, trial {number} "
            f"(val {rec['val_top1']:.2f}%, drop {base - rec['val_top1']:.2f}, rate {rec['rate']:.1f}x)"
        )
    return chosen, sel.trial is not None


def _finish_final(
    job: _FinalJob,
    results: dict[str, dict[str, Any]],
    out: _Outcome,
    seconds: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """``metrics.json`` written, the checkpoints removed, the result line logged; the metrics returned."""
    model_file = job.final_dir / rundir.MODEL_FILE
    if out.staged is not None:  # one plan: its file, plan.json and metrics.json replace the earlier ones together
        _clear_candidates(job.final_dir)  # an earlier --top's files would not match this final
        os.replace(out.staged, model_file)
        write_json(job.final_dir / rundir.PLAN_JSON, out.chosen.doc)
    compressed = out.scores[out.chosen.tag]
    control_top1 = out.scores["control"]["test"]["top1"] if "control" in out.scores else None
    # the kept plan's run is "compressed", as in a final of one plan
    runs = {"compressed": results[out.chosen.tag], **({"control": results["control"]} if "control" in results else {})}
    metrics = {
        "baseline_test_top1": job.baseline.test_top1,
        "control_test_top1": control_top1,
        "compressed_test_top1": compressed["test"]["top1"],
        "compressed_val_top1": compressed["val"]["top1"] if compressed["val"] else None,
        "rate": out.written.original_bytes / model_file.stat().st_size,
        "file_bytes": model_file.stat().st_size,
        "original_bytes": out.written.original_bytes,
        "plan": out.chosen.plan.to_dict(),
        "epochs": job.cfg.epochs,
        "seconds": seconds,
        "trial": out.chosen.trial,
        "source": out.chosen.source,
        "resumed_from_step": {k: r["resumed_from_step"] for k, r in runs.items()},
        "setup": job.digest,
        "workers": job.workers,
        # each run's training CPU time on its worker (every candidate and the control), for compute accounting
        "cpu_seconds": {k: r["cpu_seconds"] for k, r in results.items() if "cpu_seconds" in r},
    }
    if job.workers > 1:  # one digest of the quantized weights per rank: they agree (checked by run_ddp)
        metrics["rank_digests"] = {k: r["digests"] for k, r in runs.items()}
    metrics.update(out.top)
    write_json(job.final_dir / rundir.METRICS_JSON, metrics)
    for path in job.ckpts.values():
        path.unlink(missing_ok=True)
    if job.workers > 1:
        from clipq_search.search.final_ddp import forget

        forget(_ddp_storage(job), job.digest, list(job.tags))
    log(
        f"final: test accuracy baseline {metrics['baseline_test_top1']:.2f}%, "
        + (f"control {control_top1:.2f}%, " if control_top1 is not None else "")
        + f"compressed (reloaded from file) {metrics['compressed_test_top1']:.2f}%; "
        f"file {metrics['file_bytes']:,} bytes, "
        f"rate {metrics['rate']:.1f}x -> {job.final_dir / 'model.clipq'}"
    )
    return metrics
