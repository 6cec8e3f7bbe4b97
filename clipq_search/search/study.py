"""The search: Optuna proposes per-layer plans, Ray Tune runs them as trials.

The Optuna study in durable storage (SQLite in the run directory by default)
is the single source of truth: a rerun of the same command counts its
finished trials and runs only what is missing. A Ray Tune ``Searcher`` bridges
the two: ``suggest`` asks the study for a plan, ``on_trial_complete`` tells it
the result (or the failure, with its error).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from clipq_search.analysis import rundir
from clipq_search.errors import ClipQError, ConfigError
from clipq_search.search.cluster import check_address, check_gpus, first_line, init_ray
from clipq_search.search.space import LayerSearchParam, Space
from clipq_search.search.trial import Baseline, check_space, ensure_baseline, layer_names, run_trial, trial_payload

__all__ = ["SearchSummary", "run_search", "trials_frame", "write_trials_csv"]

STUDY_NAME = "clipq"
METRIC_NAMES = ["val_top1", "log10_rate"]
# Attributes that record why a trial failed (Optuna keeps them in its storage).
ERROR_ATTR, INTERRUPTED_ATTR = "error", "interrupted"


@dataclass(frozen=True)
class SearchSummary:
    run_dir: Path
    finished: int
    complete: int
    failed: int
    wall_seconds: float
    trial_seconds: float
    concurrency: int


# -- study and samplers ---------------------------------------------------------------------


def _constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
    return list(trial.user_attrs.get("constraint", [0.0]))


def make_sampler(name: str, seed: int, n_trials: int, has_constraint: bool) -> optuna.samplers.BaseSampler:
    """The Optuna sampler for ``--sampler`` (``paper`` seeds TPE with the paper's plans)."""
    cons = _constraints if has_constraint else None
    if name in ("tpe", "paper"):
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, n_startup_trials=max(4, min(10, n_trials // 4)), constraints_func=cons
        )
    if name == "gp":
        return optuna.samplers.GPSampler(
            seed=seed, n_startup_trials=max(4, min(10, n_trials // 4)), constraints_func=cons
        )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(
            seed=seed, population_size=max(4, min(50, n_trials // 4)), constraints_func=cons
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"sampler {name!r} is unknown; choose one of tpe, gp, nsga2, random, paper")


def open_study(
    storage: str, sampler: optuna.samplers.BaseSampler | None = None, *, create: bool = True
) -> optuna.Study:
    """Open (or create) the run's study; an unusable storage URL is one clear error."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if create:
            study = optuna.create_study(
                study_name=STUDY_NAME,
                storage=storage,
                sampler=sampler,
                directions=["maximize", "maximize"],
                load_if_exists=True,
            )
            if study.metric_names is None:
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    study.set_metric_names(METRIC_NAMES)
            return study
        return optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler)
    except KeyError:
        raise ClipQError(f"storage {storage} holds no clipq-search study; is this a run directory?") from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy/driver errors vary by backend
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ClipQError(
            f"cannot open storage {storage!r} ({first}); give a writable sqlite:/// path or a reachable database URL"
        ) from None


def distributions(units: list[LayerSearchParam]) -> dict[str, optuna.distributions.BaseDistribution]:
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for u in units:
        if u.p[0] < u.p[1]:
            out[f"p:{u.key}"] = optuna.distributions.FloatDistribution(u.p[0], u.p[1])
        if u.bits[0] < u.bits[1]:
            out[f"bits:{u.key}"] = optuna.distributions.IntDistribution(u.bits[0], u.bits[1])
    if not out:
        raise ConfigError(
            "the search space has nothing to search: every p and bits range is a single value; "
            "give at least one p or bits range [low, high] with low < high"
        )
    return out


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    return [t for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get(INTERRUPTED_ATTR)]


def recover_interrupted(study: optuna.Study, log: Callable[[str], None]) -> int:
    """Trials left RUNNING by a killed search: mark them failed-interrupted and queue their plans again."""
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in stale:
        study._storage.set_trial_user_attr(t._trial_id, INTERRUPTED_ATTR, True)
        study._storage.set_trial_user_attr(t._trial_id, ERROR_ATTR, "interrupted before it finished; re-queued")
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        # Keep where the plan came from (a paper-procedure plan stays labelled as one).
        kept = {k: t.user_attrs[k] for k in ("source", "lambda") if k in t.user_attrs}
        study.enqueue_trial(t.params, user_attrs={**kept, "retry_of": t.number}, skip_if_exists=False)
    if stale:
        log(
            f"recovered {len(stale)} interrupted trial(s) ({', '.join(str(t.number) for t in stale)}): "
            "queued to run again"
        )
    return len(stale)


# -- trials.csv ---------------------------------------------------------------------------------


def trials_frame(study: optuna.Study) -> Any:
    """One row per trial: state, every layer's p and bits, metrics and timings (a DataFrame)."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        row: dict[str, Any] = {
            "number": t.number,
            "state": "INTERRUPTED" if a.get(INTERRUPTED_ATTR) else t.state.name,
            "val_top1": a.get("val_top1"),
            "rate": a.get("rate"),
            "size_bytes": a.get("size_bytes"),
            "val_loss": a.get("val_loss"),
            "train_seconds": a.get("train_seconds"),
            "trial_seconds": a.get("trial_seconds"),
            "queue_seconds": a.get("queue_seconds"),
            "node": a.get("node"),
            "source": a.get("source", "sampler"),
            "error": a.get(ERROR_ATTR),
            "datetime_start": t.datetime_start,
            "datetime_complete": t.datetime_complete,
        }
        for layer, cfg in (a.get("layers") or {}).items():
            row[f"p:{layer}"] = cfg["p"]
            row[f"bits:{layer}"] = cfg["bits"]
        for layer, kept in (a.get("kept") or {}).items():
            row[f"kept:{layer}"] = kept
        for key, value in t.params.items():
            row.setdefault(f"param:{key}", value)
        rows.append(row)
    return pd.DataFrame(rows)


def write_trials_csv(study: optuna.Study, run_dir: Path) -> Any:
    df = trials_frame(study)
    rundir.write_trials_csv(run_dir, df)
    return df


# -- the Ray side -------------------------------------------------------------------------------


def _trainable(config: dict[str, Any], payload: dict[str, Any]) -> None:
    """Ray Tune function trainable: run the trial, report success or the error (never raise)."""
    from ray import tune

    threads = max(1, int(config["threads"]))
    started = time.time()  # wall clock: compared with the study's start time of the trial
    try:
        if config.get("inject_failure") and config["number"] in config["inject_failure"]:
            raise RuntimeError("injected failure (test hook)")
        out = run_trial(config["space"], config["plan"], payload, threads=threads)
        out["started_unix"] = started
        # Ray flattens nested result dicts; ship the whole record as one JSON string.
        result = {"ok": 1, "val_top1": out["val_top1"], "record": json.dumps(out)}
    except BaseException as exc:  # noqa: BLE001 - every failure is recorded, the search goes on
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500]
        result = {"ok": 0, "val_top1": float("nan"), "error": msg, "traceback": traceback.format_exc()[-4000:]}
    tune.report(result)


def _make_searcher(
    study: optuna.Study,
    units: list[LayerSearchParam],
    space: Space,
    to_run: int,
    on_done: Callable[[optuna.trial.FrozenTrial], None],
    baseline: Baseline,
    threads: int,
    inject_failure: list[int],
) -> Any:
    from ray.tune.search import Searcher

    from clipq_search.search.space import Space as _Space

    dists = distributions(units)
    max_drop = space.data["search"]["max_accuracy_drop"]

    class StudySearcher(Searcher):
        """Ask the Optuna study for plans; tell it the outcomes."""

        def __init__(self) -> None:
            super().__init__(metric="val_top1", mode="max")
            self.issued = 0
            self.by_tune_id: dict[str, optuna.trial.Trial] = {}

        def suggest(self, trial_id: str) -> dict[str, Any] | None:
            if self.issued >= to_run:
                return Searcher.FINISHED
            trial = study.ask(dists)
            self.issued += 1
            params = dict(trial.params)
            plan = _Space.plan_from_params(params, units)
            trial.set_user_attr("layers", {k: v.to_dict() for k, v in plan.layers.items()})
            self.by_tune_id[trial_id] = trial
            return {
                "number": trial.number,
                "plan": plan.to_dict(),
                "space": space.data,
                "threads": threads,
                "inject_failure": inject_failure,
            }

        def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
            trial = self.by_tune_id.pop(trial_id, None)
            if trial is None:
                return
            if error or not result or not result.get("ok"):
                msg = (result or {}).get("error") or "the trial's worker died (node lost, out of memory, or killed)"
                trial.set_user_attr(ERROR_ATTR, msg)
                if result and result.get("traceback"):
                    trial.set_user_attr("traceback", result["traceback"])
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                result = json.loads(result["record"])
                for key in (
                    "val_top1",
                    "val_loss",
                    "rate",
                    "size_bytes",
                    "train_seconds",
                    "trial_seconds",
                    "node",
                    "kept",
                    "train_loss",
                ):
                    trial.set_user_attr(key, result[key])
                # From the plan's proposal to its start on a worker (worker start-up, scheduling).
                proposed = trial.datetime_start
                if proposed is not None:
                    queued = max(0.0, result["started_unix"] - proposed.timestamp())
                    trial.set_user_attr("queue_seconds", round(queued, 3))
                if max_drop is not None:
                    trial.set_user_attr("constraint", [baseline.val_top1 - result["val_top1"] - max_drop])
                study.tell(trial, [result["val_top1"], math.log10(result["rate"])])
            on_done(study._storage.get_trial(trial._trial_id))

        def interrupted(self) -> list[optuna.trial.Trial]:
            return list(self.by_tune_id.values())

    return StudySearcher()


def check_storage(url: str) -> None:
    """Reject a storage URL that cannot work, before any training: one clear line, nothing created.

    Checks the URL's form, that SQLAlchemy knows its database type and its
    driver is installed, and for SQLite that the file's folder exists and is
    writable. Whether a database server answers is found out when the study
    is opened.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    fix = "give sqlite:///PATH (in an existing folder) or a database URL such as postgresql+psycopg2://user@host/db"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ClipQError(f"--storage {url!r} is not a database URL; {fix}") from None
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise ClipQError(f"--storage {url!r} names an unknown database type {parsed.drivername!r}; {fix}") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
            folder = Path(parsed.database).expanduser().absolute().parent
            if not folder.is_dir():
                raise ClipQError(f"--storage {url!r}: folder {folder} does not exist; create it or {fix}")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ClipQError(f"--storage {url!r}: folder {folder} is not writable; {fix}")
        return
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise ClipQError(
            f"--storage {url!r} needs the Python module {exc.name or parsed.drivername!r}, which is not installed; "
            f"install its driver (e.g. pip install psycopg2-binary for postgresql+psycopg2://)"
        ) from None


# -- the command ---------------------------------------------------------------------------------


# What a run's trials depend on: resuming it with any of these changed would mix two searches in one study.
_RUN_SECTIONS = ("model", "dataset", "baseline", "layers", "trial")


def _check_same_space(run_dir: Path, space: Space) -> None:
    """Refuse to continue an existing run with a space whose trials would not be comparable."""
    saved = run_dir / rundir.SPACE_YAML
    if not saved.is_file():
        return
    from clipq_search.search.space import load_space

    try:
        before = load_space(saved)
    except ClipQError as exc:
        raise ClipQError(f"{run_dir} holds a run whose space.yaml is unreadable ({exc}); give another --name") from None
    changed = [k for k in _RUN_SECTIONS if before.fingerprint(k) != space.fingerprint(k)]
    if changed:
        raise ClipQError(
            f"{run_dir} holds a search of a different space ({', '.join(changed)} differ from its space.yaml); "
            "give another --name, or resume it with the same space and --set values"
        )


def run_search(
    space: Space,
    *,
    results_root: str | Path = "results",
    name: str | None = None,
    trials: int | None = None,
    concurrency: int | None = None,
    sampler: str | None = None,
    seed: int | None = None,
    address: str | None = None,
    storage: str | None = None,
    progress: bool | None = None,
    inject_failure: list[int] | None = None,
    log: Callable[[str], None] = print,
) -> SearchSummary:
    """Run (or resume) a search until ``trials`` trials have finished; see the module doc."""
    t0 = time.perf_counter()
    s = space.data["search"]
    if trials is not None:
        s["trials"] = trials
    if concurrency is not None:
        s["concurrency"] = concurrency
    if sampler is not None:
        s["sampler"] = sampler
    if seed is not None:
        s["seed"] = seed
    make_sampler(s["sampler"], s["seed"], s["trials"], False)  # validates the name early
    # Everything that can fail on bad input is checked before any training or write.
    if address:
        check_address(address)
    if storage:
        check_storage(storage)
    check_gpus(address, space.data["resources"]["gpus_per_trial"])
    distributions(check_space(space))
    run_dir = Path(results_root) / (name or space.name)
    _check_same_space(run_dir, space)
    where_study = f"the study in {storage}" if storage else "study.db beside it"
    storage = storage or rundir.default_storage(run_dir)

    baseline = ensure_baseline(space, results_root, progress=progress, log=log)
    payload = trial_payload(space, baseline)
    units = space.search_params(layer_names(space, payload["info"]))
    distributions(units)

    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        study = open_study(
            storage, make_sampler(s["sampler"], s["seed"], s["trials"], s["max_accuracy_drop"] is not None)
        )
    except ClipQError:
        if created:
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    rundir.write_run_files(
        run_dir,
        space_yaml=space.to_yaml(),
        baseline=baseline.to_dict(),
        run_info={
            "storage": storage, "space_source": space.source, "name": run_dir.name, "layers": [u.key for u in units]
        },
    )
    recover_interrupted(study, log)
    # A resumed run continues the sampler's stream instead of replaying it.
    n_existing = len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(s["sampler"], s["seed"] + n_existing, s["trials"], s["max_accuracy_drop"] is not None)
    done = _finished(study)
    to_run = s["trials"] - len(done)
    log(
        f"run {run_dir}: {len(done)} of {s['trials']} trials finished; {max(to_run, 0)} to run, "
        f"{s['concurrency']} at a time, sampler {s['sampler']}, baseline val {baseline.val_top1:.2f}%"
    )
    if to_run <= 0:
        write_trials_csv(study, run_dir)
        return _summary(study, run_dir, t0, s["concurrency"])

    if s["sampler"] == "paper" and not any(
        t.user_attrs.get("source") == "paper" for t in study.get_trials(deepcopy=False)
    ):
        from clipq_search.search.paper import paper_plans

        res = space.data["resources"]
        init_ray(address, s["concurrency"], res["cpus_per_trial"], res["gpus_per_trial"], log)
        for lam, params in paper_plans(space, units, payload, log=log):
            study.enqueue_trial(params, user_attrs={"source": "paper", "lambda": lam})

    _run_with_tune(study, space, units, payload, baseline, run_dir, to_run, address, inject_failure or [], log)
    write_trials_csv(study, run_dir)
    summary = _summary(study, run_dir, t0, s["concurrency"])
    log(
        f"done: {summary.finished} finished ({summary.complete} complete, {summary.failed} failed) in "
        f"{summary.wall_seconds:.0f}s; trials.csv in {run_dir}, {where_study}"
    )
    if summary.finished and not summary.complete:
        first = next((t for t in _finished(study) if t.user_attrs.get(ERROR_ATTR)), None)
        why = f" (trial {first.number}: {str(first.user_attrs[ERROR_ATTR])[:200]})" if first else ""
        raise ClipQError(
            f"every trial failed{why}; fix the space (the error column of {run_dir / rundir.TRIALS_CSV} has each "
            "reason) and run again"
        )
    return summary


def _summary(study: optuna.Study, run_dir: Path, t0: float, concurrency: int) -> SearchSummary:
    done = _finished(study)
    complete = [t for t in done if t.state == optuna.trial.TrialState.COMPLETE]
    return SearchSummary(
        run_dir,
        len(done),
        len(complete),
        len(done) - len(complete),
        time.perf_counter() - t0,
        sum(t.user_attrs.get("trial_seconds", 0.0) for t in complete),
        concurrency,
    )


def _best_line(study: optuna.Study, baseline: Baseline) -> str:
    best = None
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        acc, rate = t.user_attrs["val_top1"], t.user_attrs["rate"]
        if baseline.val_top1 - acc <= 1.0 and (best is None or rate > best[1]):
            best = (t.number, rate, acc)
    return f"best within 1 pt: #{best[0]} {best[1]:.1f}x @ {best[2]:.2f}%" if best else "best within 1 pt: none yet"


def _run_with_tune(
    study: optuna.Study,
    space: Space,
    units: list[LayerSearchParam],
    payload: dict[str, Any],
    baseline: Baseline,
    run_dir: Path,
    to_run: int,
    address: str | None,
    inject_failure: list[int],
    log: Callable[[str], None],
) -> None:
    from ray import tune

    s, res = space.data["search"], space.data["resources"]
    init_ray(address, s["concurrency"], res["cpus_per_trial"], res["gpus_per_trial"], log)
    total = s["trials"]

    def on_done(t: optuna.trial.FrozenTrial) -> None:
        n_done = len(_finished(study))
        if t.state == optuna.trial.TrialState.COMPLETE:
            a = t.user_attrs
            line = (
                f"[{n_done}/{total}] trial {t.number}: val {a['val_top1']:.2f}%  rate {a['rate']:.1f}x  "
                f"{a['trial_seconds']:.1f}s on {a['node']}  | {_best_line(study, baseline)}"
            )
        else:
            line = f"[{n_done}/{total}] trial {t.number}: FAILED ({t.user_attrs.get(ERROR_ATTR, 'unknown error')})"
        log(line)
        write_trials_csv(study, run_dir)

    threads = max(1, int(res["cpus_per_trial"]))
    searcher = _make_searcher(study, units, space, to_run, on_done, baseline, threads, inject_failure)
    resources = {"cpu": res["cpus_per_trial"], "gpu": res["gpus_per_trial"]}
    trainable = tune.with_resources(tune.with_parameters(_trainable, payload=payload), resources)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=to_run,
            max_concurrent_trials=s["concurrency"],
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"tune-{int(time.time())}",
            storage_path=str((run_dir / "ray").resolve()),
            failure_config=tune.FailureConfig(max_failures=s["retries"]),
            verbose=0,
            log_to_file=True,
        ),
    )
    import ray

    try:
        try:
            tuner.fit()
        except (ray.exceptions.RaySystemError, ConnectionError) as exc:
            # the cluster went away under the search (its head stopped, the network): finished trials are saved
            first = first_line(exc)
            raise ClipQError(
                f"the Ray cluster stopped answering during the search ({first}); finished trials are saved: "
                "run the same command again to resume"
            ) from exc
        if len(_finished(study)) < total and searcher.interrupted():
            # Ray Tune turns Ctrl-C into a graceful stop; surface it as one.
            raise KeyboardInterrupt
    finally:
        # A Ctrl-C (or a crash) leaves the in-flight trials RUNNING in the study;
        # record them as interrupted now so a rerun re-queues them.
        left = searcher.interrupted()
        if left:
            recover_interrupted(study, lambda m: None)
            log(f"{len(left)} trial(s) were interrupted and will run again on resume")
        write_trials_csv(study, run_dir)
    if sys.stdout.isatty():
        sys.stdout.flush()
