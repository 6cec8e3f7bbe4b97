"""The search: Optuna proposes per-layer plans, Ray Tune runs them as trials.

The Optuna study in durable storage (SQLite in the run directory by default)
is the single source of truth: a rerun of the same command counts its
finished trials and runs only what is missing. A Ray Tune ``Searcher`` bridges
the two: ``suggest`` asks the study for a plan, ``on_trial_complete`` tells it
the result (or the failure, with its error).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna

from clipq_search.analysis import rundir
from clipq_search.errors import ClipQError, ConfigError
from clipq_search.search.cluster import check_address, check_gpus, first_line, init_ray, local_concurrency
from clipq_search.search.rungs import CHECKPOINT_ATTR, RESUME_ATTR
from clipq_search.search.runlock import hold_run, releasing_locks
from clipq_search.search.space import SAMPLERS, SEED_MAX, LayerSearchParam, Space
from clipq_search.search.trial import (
    Baseline,
    check_space,
    describe_dense,
    device_failure,
    ensure_baseline,
    free_device_memory,
    run_trial,
    trial_payload,
)
from clipq_search.search.worker_kills import (
    GPU_ERROR,
    GPU_MEMORY,
    DeviceFailed,
    KillLedger,
    kill_point,
    kill_reason,
    quiet_tune,
)

__all__ = ["SearchRequest", "SearchSummary", "run_search", "trials_frame", "write_trials_csv"]

# Each run is a study named after the run, so one database holds many runs. Runs made before that
# have one study of this name in their own study.db; they resume under it.
LEGACY_STUDY_NAME = "clipq"
# Study user attribute: the fingerprint of each space section a run's trials depend on.
SPACE_ATTR = "clipq:space"
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
    """The Optuna sampler for ``--sampler`` (``paper`` seeds TPE with the paper's plans).

    ``seed`` is taken modulo 2**32 (a resumed run's seed grows with its trials; samplers take 32 bits).

    ``auto`` starts as the GP; the search's proposer moves it to TPE once the
    GP's asks no longer keep pace with the trials (clipq_search/search/proposer.py).
    TPE's constant liar counts the plans in flight as running trials.
    """
    seed %= SEED_MAX + 1
    cons = _constraints if has_constraint else None
    if name in ("tpe", "paper"):
        return optuna.samplers.TPESampler(
            seed=seed,
            multivariate=True,
            constant_liar=True,
            n_startup_trials=max(4, min(10, n_trials // 4)),
            constraints_func=cons,
        )
    if name in ("gp", "auto"):
        return optuna.samplers.GPSampler(
            seed=seed, n_startup_trials=max(4, min(10, n_trials // 4)), constraints_func=cons
        )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(
            seed=seed, population_size=max(4, min(50, n_trials // 4)), constraints_func=cons
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"sampler {name!r} is unknown; choose one of {', '.join(SAMPLERS)}")


def shown_url(url: str) -> str:
    """A storage URL for messages: its password, if any, masked."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: show it as given
        return url


def open_study(
    storage: str,
    name: str,
    sampler: optuna.samplers.BaseSampler | None = None,
    *,
    create: bool = True,
    fingerprint: dict[str, str] | None = None,
    legacy: bool = False,
) -> optuna.Study:
    """Open (or create) the study ``name`` in ``storage``; an unusable storage URL is one clear error.

    ``fingerprint`` (section -> hash of that part of the space) is stored with a
    new study; an existing study with another fingerprint is refused, so one
    name never mixes two searches. With ``legacy`` (the run's own SQLite file),
    a file holding only the study of a run made before studies were named
    after their run is opened under that old name.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study, name = _racing_schema(lambda: _open_or_create(storage, name, sampler, create=create, legacy=legacy))
    except KeyError:
        raise ClipQError(
            f"storage {shown_url(storage)} holds no study {name!r}; give the run's --name and --storage"
        ) from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy/driver errors vary by backend
        raise _unusable_storage(storage, exc) from None
    if fingerprint is not None:
        have = study.user_attrs.get(SPACE_ATTR)
        if have is None:
            study.set_user_attr(SPACE_ATTR, fingerprint)
        elif have != fingerprint:
            changed = sorted(k for k in set(have) | set(fingerprint) if have.get(k) != fingerprint.get(k))
            raise ClipQError(
                f"study {name!r} in {shown_url(storage)} holds a search of a different space "
                f"({', '.join(changed)} differ); give another --name, or resume it with the same space and --set values"
            )
    return study


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


# The study's record of interrupted trials: their numbers (a study attribute, set through Optuna's public
# API; a trial of another process can be ended by number, not given attributes).
INTERRUPTED_TRIALS = "interrupted_trials"
INTERRUPTED_ERROR = "interrupted before it finished; re-queued"


def interrupted_numbers(study: optuna.Study) -> set[int]:
    """Numbers of the trials a killed or interrupted search left unfinished (their plans ran again)."""
    return set(study.user_attrs.get(INTERRUPTED_TRIALS, []))


def is_interrupted(trial: optuna.trial.FrozenTrial, interrupted: set[int]) -> bool:
    return trial.number in interrupted or bool(trial.user_attrs.get(INTERRUPTED_ATTR))  # the attribute: older runs


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    interrupted = interrupted_numbers(study)
    return [t for t in study.get_trials(deepcopy=False, states=states) if not is_interrupted(t, interrupted)]


def recover_interrupted(study: optuna.Study, log: Callable[[str], None]) -> int:
    """Trials left RUNNING by a killed search: mark them failed-interrupted and queue their plans again."""
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if stale:
        study.set_user_attr(INTERRUPTED_TRIALS, sorted(interrupted_numbers(study) | {t.number for t in stale}))
    for t in stale:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        # Keep where the plan came from (a paper-procedure plan stays labelled as one).
        kept = {k: t.user_attrs[k] for k in ("source", "lambda") if k in t.user_attrs}
        # A multi-fidelity trial goes on from its last rung checkpoint: its own, else the one it was to resume
        # from (a retry interrupted before its next rung, or before it started).
        last = t.user_attrs.get(CHECKPOINT_ATTR) or t.user_attrs.get(RESUME_ATTR)
        if last:
            kept[RESUME_ATTR] = last
        study.enqueue_trial(t.params, user_attrs={**kept, "retry_of": t.number}, skip_if_exists=False)
    if stale:
        log(
            f"recovered {len(stale)} interrupted trial(s) ({', '.join(str(t.number) for t in stale)}): "
            "queued to run again"
        )
    return len(stale)


# -- trials.csv ---------------------------------------------------------------------------------


def _rung_results(rungs: list[dict[str, Any]] | None) -> str | None:
    """A multi-fidelity trial's ``[[budget, val_top1, rate], ...]`` (JSON); None for a result of one budget."""
    if not rungs or (len(rungs) == 1 and rungs[0].get("rung", 0) == 0):
        return None
    return json.dumps([[r["budget"], r["val_top1"], r["rate"]] for r in rungs])


def trials_frame(study: optuna.Study) -> Any:
    """One row per trial: state, every layer's p and bits, metrics and timings (a DataFrame)."""
    import pandas as pd

    rows = []
    interrupted = interrupted_numbers(study)
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        stopped = is_interrupted(t, interrupted)
        row: dict[str, Any] = {
            "number": t.number,
            "state": "INTERRUPTED" if stopped else t.state.name,
            "val_top1": a.get("val_top1"),
            "rate": a.get("rate"),
            "size_bytes": a.get("size_bytes"),
            "val_loss": a.get("val_loss"),
            "train_seconds": a.get("train_seconds"),
            "trial_seconds": a.get("trial_seconds"),
            "cpu_seconds": a.get("cpu_seconds"),
            "queue_seconds": a.get("queue_seconds"),
            "node": a.get("node"),
            "budget": a.get("budget"),
            "rung": a.get("rung"),
            # multi-fidelity: [[budget, val_top1, rate], ...] at each rung the plan reached (the report's curves)
            "rung_results": _rung_results(a.get("rungs")),
            "source": a.get("source", "sampler"),
            "error": INTERRUPTED_ERROR if stopped else a.get(ERROR_ATTR),
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
    """Ray Tune function trainable: run the trial, report success or the error (never raise).

    A multi-fidelity trial reports each rung it scores (see ``rungs``); one
    resumed from a rung's checkpoint first reports that rung again.
    """
    from ray import tune

    from clipq_search.search.rungs import load_rung_state, report_rung, rung_metrics

    threads = max(1, int(config["threads"]))
    started = time.time()  # wall clock: compared with the study's start time of the trial
    try:
        with kill_point(f"trial{config['number']}", payload["kill_hook"]):
            # Which worker runs this trial: a kill that ends Tune's own loop names only the process.
            tune.report({"ok": 0, "started": 1, "val_top1": float("nan"), "worker_pid": os.getpid()})
            if config.get("inject_failure") and config["number"] in config["inject_failure"]:
                raise RuntimeError("injected failure (test hook)")
            def report(record: dict[str, Any], model: Any) -> None:
                report_rung({**record, "started_unix": started}, model)

            resume = load_rung_state(config.get("resume")) if config["space"].trial.rungs else None
            if resume is not None:
                report({**resume.record, "resumed_from_rung": resume.rung}, None)
            out = _run_trial_on_device(config, payload, threads, report, resume)
        out["started_unix"] = started
        result = rung_metrics(out)
    except BaseException as exc:  # noqa: BLE001 - every failure is recorded, the search goes on
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        failure = device_failure(exc)
        if failure is not None:
            # This worker's GPU is unusable (or its memory stays full): raising makes Tune end this actor,
            # never reuse it, and run the trial again on a new one (FailureConfig, search.retries).
            reason = GPU_ERROR if failure == "cuda" else GPU_MEMORY
            raise DeviceFailed(f"{reason}: {first_line(exc)}") from exc
        msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500]
        result = {"ok": 0, "val_top1": float("nan"), "error": msg, "traceback": traceback.format_exc()[-4000:]}
    tune.report(result)


def _run_trial_on_device(
    config: dict[str, Any], payload: dict[str, Any], threads: int, report: Callable[..., None], resume: Any
) -> dict[str, Any]:
    """``run_trial``; after the GPU ran out of memory, once more with the worker's cached memory freed."""

    def attempt() -> dict[str, Any]:
        return run_trial(config["space"], config["plan"], payload, threads=threads, report=report, resume=resume)

    try:
        return attempt()
    except Exception as exc:  # noqa: BLE001 - only a GPU out of memory is tried again
        if device_failure(exc) != "memory":
            raise
    free_device_memory()  # outside the handler: the error's frames no longer hold the trial's tensors
    return attempt()


def normalise_storage(url: str) -> str:
    """``url`` with a bare ``postgresql://`` pointed at psycopg 3 when the dialect's default driver is missing.

    SQLAlchemy 2.1 maps ``postgresql://`` to psycopg 3, earlier versions to
    psycopg2; the ``postgres`` extra installs psycopg 3, so either way a bare
    URL works. Any other URL is returned as given.
    """
    import importlib.util

    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        if parsed.drivername != "postgresql":
            return url
        parsed.get_dialect().import_dbapi()
    except ImportError:
        if importlib.util.find_spec("psycopg") is not None:
            return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    except Exception:  # noqa: BLE001 - a malformed URL is check_storage's to report
        pass
    return url


def check_storage(url: str) -> None:
    """Reject a storage URL that cannot work, before any training: one clear line, nothing created.

    Checks the URL's form, that SQLAlchemy knows its database type and its
    driver is installed, and for SQLite that the file's folder exists and is
    writable. Whether a database server answers is found out when the study
    is opened.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    fix = "give sqlite:///PATH (in an existing folder) or a database URL such as postgresql://user@host/db"
    url = normalise_storage(url)
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
        hint = (
            "pip install 'clipq-search[postgres]' (psycopg 3, for postgresql:// and postgresql+psycopg://)"
            if parsed.get_backend_name() == "postgresql"
            else "install the driver that URL names"
        )
        raise ClipQError(
            f"--storage {shown_url(url)!r} needs the Python module {exc.name or parsed.drivername!r}, "
            f"which is not installed; {hint}"
        ) from None


# -- the command ---------------------------------------------------------------------------------


# What a run's trials depend on: resuming it with any of these changed would mix two searches in one study.
_RUN_SECTIONS = ("model", "dataset", "baseline", "layers", "trial")


def _saved_space(run_dir: Path) -> Space | None:
    """The space an existing run was made with (its space.yaml), or ``None`` for a new run."""
    saved = run_dir / rundir.SPACE_YAML
    if not saved.is_file():
        return None
    from clipq_search.search.space import load_space

    try:
        return load_space(saved)
    except ClipQError as exc:
        raise ClipQError(f"{run_dir} holds a run whose space.yaml is unreadable ({exc}); give another --name") from None


def _check_same_space(run_dir: Path, space: Space, before: Space | None) -> None:
    """Refuse to continue an existing run (made with ``before``) with a space whose trials would not be comparable."""
    if before is None:
        return
    changed = [k for k in _RUN_SECTIONS if before.fingerprint(k) != space.fingerprint(k)]
    if changed:
        raise ClipQError(
            f"{run_dir} holds a search of a different space ({', '.join(changed)} differ from its space.yaml); "
            "give another --name, or resume it with the same space and --set values"
        )


def _existing_study(run_dir: Path, storage: str | None) -> optuna.Study | None:
    """The run's study if its storage already holds one; reads only (no file or study is created)."""
    if storage is None:
        if not (run_dir / rundir.STUDY_DB).is_file():
            return None
        url, legacy = rundir.default_storage(run_dir), True
    else:
        url, legacy = storage, False
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        names = optuna.get_all_study_names(url)
        name = run_dir.name
        if legacy and name not in names and names == [LEGACY_STUDY_NAME]:
            name = LEGACY_STUDY_NAME
        return optuna.load_study(study_name=name, storage=url) if name in names else None
    except Exception:  # noqa: BLE001 - an unusable storage is reported when the study is opened
        return None


def _has_complete(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def _restartable(run_dir: Path, space: Space, before: Space | None, storage: str | None) -> bool:
    """A run (made with ``before``) of another space that may start afresh: none of its trials completed.

    After "every trial failed", the fixed space is a different space; it
    replaces the run (``_restart``) instead of being refused.
    """
    fingerprint = _run_fingerprint(space)
    differs = before is not None and any(before.fingerprint(k) != fingerprint[k] for k in _RUN_SECTIONS)
    study = _existing_study(run_dir, storage)
    if study is not None:
        if _has_complete(study):
            return False
        have = study.user_attrs.get(SPACE_ATTR)
        differs = differs or (have is not None and have != fingerprint)
    return differs


def _restart(run_dir: Path, storage: str | None, log: Callable[[str], None]) -> None:
    """Drop a run's study and trials.csv (it holds no complete trial; checked again under the run's lock)."""
    study = _existing_study(run_dir, storage)
    if study is not None:
        if _has_complete(study):
            raise ClipQError(
                f"{run_dir} completed a trial meanwhile; give another --name, or resume it with its own space"
            )
        optuna.delete_study(study_name=study.study_name, storage=storage or rundir.default_storage(run_dir))
    (run_dir / rundir.TRIALS_CSV).unlink(missing_ok=True)
    log(f"run {run_dir} holds no complete trial: starting it afresh with this space (its failed trials are dropped)")


def _racing_schema(open_: Callable[[], Any]) -> Any:
    """``open_()``, tried again when it loses a race to create Optuna's tables.

    Two commands opening a new database at once both create the tables; the
    loser sees a duplicate-key error and, a moment later, the tables.
    """
    from sqlalchemy.exc import DBAPIError

    for attempt in range(3):
        try:
            return open_()
        except DBAPIError:
            if attempt == 2:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _open_or_create(
    storage: str, name: str, sampler: optuna.samplers.BaseSampler | None, *, create: bool, legacy: bool
) -> tuple[optuna.Study, str]:
    if legacy:
        names = optuna.get_all_study_names(storage)
        if name not in names and names == [LEGACY_STUDY_NAME]:
            name = LEGACY_STUDY_NAME
    if not create:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler), name
    study = optuna.create_study(
        study_name=name, storage=storage, sampler=sampler, directions=["maximize", "maximize"], load_if_exists=True
    )
    if study.metric_names is None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(METRIC_NAMES)
    return study, name


def _unusable_storage(storage: str, exc: Exception) -> ClipQError:
    """One line for a storage that cannot be opened (SQLAlchemy's and the drivers' errors run to pages)."""
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    return ClipQError(
        f"cannot open storage {shown_url(storage)!r} ({first}); give a writable sqlite:/// path or a reachable "
        "database URL"
    )


def _check_stored_space(storage: str, name: str, fingerprint: dict[str, str]) -> None:
    """A study of this name already in a shared storage must be of the same space: checked before any training."""
    try:
        names = _racing_schema(lambda: optuna.get_all_study_names(storage))
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy/driver errors vary by backend
        raise _unusable_storage(storage, exc) from None
    if name in names:
        open_study(storage, name, create=False, fingerprint=fingerprint)


@dataclass(frozen=True)
class SearchRequest:
    """What one search command asks besides its space.

    Where the run lives (``results_root``/``name``; the name defaults to the
    space's), where it runs (``address``: a Ray cluster, default a local
    instance; ``storage``: the study's database, default the run's own
    study.db), and the command line's replacements of the space's search
    settings (``trials``, ``concurrency``, ``sampler``, ``seed``; ``None``: the
    space's own). ``inject_failure``: trial numbers that fail on purpose (a
    test hook); ``progress`` is kept for callers.
    """

    results_root: str | Path = "results"
    name: str | None = None
    trials: int | None = None
    concurrency: int | None = None
    sampler: str | None = None
    seed: int | None = None
    address: str | None = None
    storage: str | None = None
    progress: bool | None = None
    inject_failure: Sequence[int] | None = None

    def search_changes(self) -> dict[str, Any]:
        """The search settings this request replaces."""
        given = {k: getattr(self, k) for k in ("trials", "concurrency", "sampler", "seed")}
        return {k: v for k, v in given.items() if v is not None}


@dataclass(frozen=True)
class _Run:
    """A search's run once opened: its space as run, study, baseline, searched units and trial payload."""

    space: Space
    run_dir: Path
    study: optuna.Study
    baseline: Baseline
    units: list[LayerSearchParam]
    dists: dict[str, optuna.distributions.BaseDistribution]
    payload: dict[str, Any]
    where_study: str  # where the study is, for the last line
    storage_url: str  # the study's storage


@releasing_locks
def run_search(
    space: Space, request: SearchRequest | None = None, *, log: Callable[[str], None] = print, **options: Any
) -> SearchSummary:
    """Run (or resume) a search until ``search.trials`` trials have finished; see the module doc.

    ``request`` says where and how (:class:`SearchRequest`); its fields may
    also be given as keyword arguments (``run_search(space, name="r", trials=8)``).
    """
    t0 = time.perf_counter()
    request = replace(request or SearchRequest(), **options)
    run = _open_run(space, request, log)
    s = run.space.search
    done = _finished(run.study)
    to_run = s.trials - len(done)
    log(
        f"run {run.run_dir}: {len(done)} of {s.trials} trials finished; {max(to_run, 0)} to run, "
        f"{s.concurrency} at a time, sampler {s.sampler}, baseline val {run.baseline.val_top1:.2f}%"
    )
    if to_run <= 0:
        write_trials_csv(run.study, run.run_dir)
        return _summary(run.study, run.run_dir, t0, s.concurrency)
    _enqueue_paper_plans(run, request.address, log)
    _run_with_tune(run, to_run, request.address, list(request.inject_failure or []), log)
    write_trials_csv(run.study, run.run_dir)
    return _summarise(run, t0, log)


@dataclass(frozen=True)
class _Checked:
    """What the input checks found (:func:`_check_inputs`)."""

    space: Space  # with the request's search settings
    run_dir: Path
    storage: str | None  # as given, normalised; None: the run's own study.db
    restart: bool  # the run holds another space and no complete trial: it starts afresh
    units: list[LayerSearchParam]
    dists: dict[str, optuna.distributions.BaseDistribution]


def _check_inputs(space: Space, request: SearchRequest) -> _Checked:
    """Everything that can fail on bad input, before any training or write."""
    if request.sampler is not None:
        make_sampler(request.sampler, 0, 1, False)  # an unknown name: the list of samplers
    space = space.with_search(**request.search_changes())
    if request.name is not None:
        run_dir = rundir.run_folder(request.results_root, request.name, "--name")
    else:
        run_dir = rundir.run_folder(request.results_root, space.name, f"the name of {space.source}")
    if request.address:
        check_address(request.address)
    storage = request.storage
    if storage:
        storage = normalise_storage(storage)
        check_storage(storage)
    check_gpus(request.address, space.resources.gpus_per_trial)
    units = check_space(space)
    dists = distributions(units)
    before = _saved_space(run_dir)
    restart = _restartable(run_dir, space, before, storage)
    if not restart:
        _check_same_space(run_dir, space, before)
        if storage:
            _check_stored_space(storage, run_dir.name, _run_fingerprint(space))
    return _Checked(space, run_dir, storage, restart, units, dists)


def _run_fingerprint(space: Space) -> dict[str, str]:
    return {k: space.fingerprint(k) for k in _RUN_SECTIONS}


def _fit_to_cluster(space: Space, address: str | None, log: Callable[[str], None]) -> Space:
    """A cluster answers before anything is trained or written; a local instance caps the concurrency."""
    s, res = space.search, space.resources
    if address:
        init_ray(address, s.concurrency, res.cpus_per_trial, res.gpus_per_trial, log)
        return space
    return space.with_search(concurrency=local_concurrency(s.concurrency, res.cpus_per_trial, res.gpus_per_trial, log))


def _open_run(space: Space, request: SearchRequest, log: Callable[[str], None]) -> _Run:
    """Check the inputs, make the baseline and open the run: its lock, study and files; interrupted trials requeued."""
    checked = _check_inputs(space, request)
    run_dir, storage, units = checked.run_dir, checked.storage, checked.units
    space = _fit_to_cluster(checked.space, request.address, log)
    where_study = f"study {run_dir.name!r} in {shown_url(storage)}" if storage else "study.db beside it"
    own_file = storage is None
    url = storage or rundir.default_storage(run_dir)

    baseline = ensure_baseline(space, request.results_root, progress=request.progress, log=log, address=request.address)
    payload = trial_payload(space, baseline)
    dense, dense_line = describe_dense(space, payload["info"], [n for u in units for n in u.layers])
    log(dense_line)

    s = space.search
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        # One command at a time on a run, across machines (released when run_search ends).
        hold_run(url, run_dir.name, "search", log)
        if checked.restart:
            _restart(run_dir, None if own_file else url, log)
        study = open_study(
            url,
            run_dir.name,
            make_sampler(s.sampler, s.seed, s.trials, s.max_accuracy_drop is not None),
            fingerprint=_run_fingerprint(space),
            legacy=own_file,
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
            "storage": url,
            "study": study.study_name,
            "space_source": space.source,
            "name": run_dir.name,
            "layers": [u.key for u in units],
            "units": {u.key: list(u.layers) for u in units},
            "rungs": list(space.trial.rungs) if space.trial.rungs else None,  # multiples of trial.train.epochs
            "dense": dense,
        },
    )
    recover_interrupted(study, log)
    # A resumed run continues the sampler's stream instead of replaying it.
    n_existing = len(study.get_trials(deepcopy=False))
    stream = (s.seed + n_existing) % (SEED_MAX + 1)  # seeds stay 32-bit however long the run
    study.sampler = make_sampler(s.sampler, stream, s.trials, s.max_accuracy_drop is not None)
    return _Run(space, run_dir, study, baseline, units, checked.dists, payload, where_study, url)


def _enqueue_paper_plans(run: _Run, address: str | None, log: Callable[[str], None]) -> None:
    """``--sampler paper``: the paper's per-layer plans run first (once per run)."""
    s, res = run.space.search, run.space.resources
    if s.sampler != "paper" or any(t.user_attrs.get("source") == "paper" for t in run.study.get_trials(deepcopy=False)):
        return
    from clipq_search.search.paper import paper_plans

    init_ray(address, s.concurrency, res.cpus_per_trial, res.gpus_per_trial, log)
    for lam, params in paper_plans(run.space, run.units, run.payload, log=log):
        run.study.enqueue_trial(params, user_attrs={"source": "paper", "lambda": lam})


def _summarise(run: _Run, t0: float, log: Callable[[str], None]) -> SearchSummary:
    """The last line of a search; a search whose every trial failed is an error that names the first reason."""
    summary = _summary(run.study, run.run_dir, t0, run.space.search.concurrency)
    log(
        f"done: {summary.finished} finished ({summary.complete} complete, {summary.failed} failed) in "
        f"{summary.wall_seconds:.0f}s; trials.csv in {run.run_dir}, {run.where_study}"
    )
    if summary.finished and not summary.complete:
        first = next((t for t in _finished(run.study) if t.user_attrs.get(ERROR_ATTR)), None)
        why = f" (trial {first.number}: {str(first.user_attrs[ERROR_ATTR])[:200]})" if first else ""
        raise ClipQError(
            f"every trial failed{why}; fix the space (the error column of {run.run_dir / rundir.TRIALS_CSV} has "
            "each reason) and run the same command again: a run with no complete trial starts afresh with the "
            "fixed space"
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


def _memory_advice(space: Space) -> str:
    """What to change when Ray keeps killing trials for memory: fewer trials per node, or smaller ones."""
    from clipq_search.search.trial import train_config

    conc, cpus = space.search.concurrency, space.resources.cpus_per_trial
    batch = train_config(space, "trial").batch_size
    fewer = f"run fewer trials at once (search.concurrency {conc // 2} instead of {conc}), " if conc > 1 else ""
    return (
        f"To need less memory per node: {fewer}give each trial more CPUs so that fewer share a node "
        f"(resources.cpus_per_trial {cpus * 2:g} instead of {cpus:g}), or train with a smaller batch "
        f"(trial.train.batch_size {max(1, batch // 2)} instead of {batch})"
    )


def _progress(run: _Run, log: Callable[[str], None]) -> Callable[[optuna.trial.FrozenTrial], None]:
    """What the search does after each finished trial: a progress line, trials.csv rewritten."""
    study, baseline, run_dir, total = run.study, run.baseline, run.run_dir, run.space.search.trials
    last = len(run.space.trial.rungs or ()) - 1

    def rung_text(a: dict[str, Any]) -> str:
        """Multi-fidelity: the budget of the result, and whether MO-ASHA stopped the plan before the last rung."""
        if last < 1 or a.get("rung") is None:
            return ""
        verdict = "full budget" if a["rung"] >= last else f"stopped at rung {a['rung']}"
        return f"  {a['budget']:.3g} epochs ({verdict})"

    def on_done(t: optuna.trial.FrozenTrial) -> None:
        n_done = len(_finished(study))
        if t.state == optuna.trial.TrialState.COMPLETE:
            a = t.user_attrs
            line = (
                f"[{n_done}/{total}] trial {t.number}: val {a['val_top1']:.2f}%  rate {a['rate']:.1f}x  "
                f"{a['trial_seconds']:.1f}s on {a['node']}{rung_text(a)}  | {_best_line(study, baseline)}"
            )
        else:
            line = f"[{n_done}/{total}] trial {t.number}: FAILED ({t.user_attrs.get(ERROR_ATTR, 'unknown error')})"
        log(line)
        write_trials_csv(study, run_dir)

    return on_done


def _tune_storage(run: _Run) -> str:
    """Ray Tune's folder of the run: ``search.checkpoint_storage`` (a shared folder or URI) or ``RUN_DIR/ray``."""
    shared = run.space.search.checkpoint_storage
    if not shared:
        return str((run.run_dir / "ray").resolve())
    if "://" in shared:
        return f"{shared.rstrip('/')}/{run.run_dir.name}"
    return str((Path(shared).expanduser() / run.run_dir.name).resolve())


def _budgets_text(space: Space) -> str:
    from clipq_search.search.trial import trial_budgets

    return ", ".join(f"{b:.3g}" for b in trial_budgets(space)) + " epochs"


def _tuner(run: _Run, trainable: Any, searcher: Any, kills: KillLedger, num_samples: int, scheduler: Any) -> Any:
    """A Ray Tune run of the search's trials, configured as ``search`` runs them (``scheduler``: MO-ASHA or None)."""
    from ray import tune

    from clipq_search.search.rungs import checkpoint_callback

    s = run.space.search
    callbacks = [kills.callback()]
    if scheduler is not None:
        callbacks.append(checkpoint_callback(searcher.checkpoint_saved))
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=s.concurrency,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"tune-{time.time_ns() // 1_000_000}",  # a new folder for each Tune run, even a restart
            storage_path=_tune_storage(run),
            # A trial whose worker Ray kills runs again, up to search.retries times; its reason is logged.
            failure_config=tune.FailureConfig(max_failures=s.retries),
            # a multi-fidelity trial's last two rung checkpoints (the last may be half-registered when killed)
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            stop=kills.stopper(),
            callbacks=callbacks,
            verbose=0,
            log_to_file=True,
        ),
    )


def _run_with_tune(
    run: _Run, to_run: int, address: str | None, inject_failure: list[int], log: Callable[[str], None]
) -> None:
    """Run ``to_run`` trials on Ray Tune; a kill Tune cannot handle settles its trials and Tune goes on."""
    import ray
    from ray import tune

    from clipq_search.search.rungs import make_scheduler
    from clipq_search.search.searcher import StudySearcher

    s, res = run.space.search, run.space.resources
    study, run_dir, total = run.study, run.run_dir, s.trials
    init_ray(address, s.concurrency, res.cpus_per_trial, res.gpus_per_trial, log)
    kills = KillLedger(s.retries, s.concurrency, _memory_advice(run.space), log)
    searcher = StudySearcher(
        study, run.units, run.dists, run.space, to_run=to_run, on_done=_progress(run, log), baseline=run.baseline,
        threads=max(1, int(res.cpus_per_trial)), kills=kills, inject_failure=inject_failure, log=log,
        storage_url=run.storage_url,
    )
    resources = {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(_trainable, payload=run.payload), resources)
    scheduler = make_scheduler(run.space, _finished(study))
    if scheduler is not None:
        factor = run.space.trial.reduction_factor
        log(f"multi-fidelity: MO-ASHA rungs at {_budgets_text(run.space)}, reduction factor {factor:g}")
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        if nodes > 1 and not s.checkpoint_storage:
            log(
                f"warning: {nodes} nodes keep rung checkpoints in {run.run_dir / 'ray'} on the head; unless every "
                "node mounts that folder, set search.checkpoint_storage to a shared folder (NFS) or a cloud URI"
            )
    quiet_tune()

    left: list[optuna.trial.Trial] | None = None  # the plans left unfinished, once asked for
    try:
        num_samples = to_run
        while True:
            try:
                _tuner(run, trainable, searcher, kills, num_samples, scheduler).fit()
                break
            except (ray.exceptions.RaySystemError, ConnectionError) as exc:
                # the cluster went away under the search (its head stopped, the network): finished trials are saved
                first = first_line(exc)
                raise ClipQError(
                    f"the Ray cluster stopped answering during the search ({first}); finished trials are saved: "
                    "run the same command again to resume"
                ) from exc
            except Exception as exc:
                reason = kill_reason(exc)
                if reason is None:
                    raise
                # Tune has no handler for some kills (an actor task killed for memory ends Tuner.fit with the
                # memory error): the trials in flight are settled here and a new Tune run goes on with the rest.
                in_flight = dict(searcher.by_tune_id)
                for tune_id in kills.crashed(exc, reason, in_flight):
                    searcher.on_trial_complete(tune_id, None, error=True)
                for tune_id in in_flight:
                    searcher.release(tune_id)  # a rerun goes on from the trial's last checkpoint
                if kills.stop_line is not None:
                    break
                num_samples = -1  # the searcher says when it is done: the trials run again, then the rest
        if kills.stop_line is not None:
            raise ClipQError(kills.stop_line)
        if len(_finished(study)) < total:
            left = searcher.interrupted()
            if left:  # Ray Tune turns Ctrl-C into a graceful stop; surface it as one.
                raise KeyboardInterrupt
    finally:
        # A Ctrl-C (or a crash) leaves the in-flight trials RUNNING in the study;
        # record them as interrupted now so a rerun re-queues them.
        if left is None:
            left = searcher.interrupted()
        if left:
            recover_interrupted(study, lambda m: None)
            log(f"{len(left)} trial(s) were interrupted and will run again on resume")
        write_trials_csv(study, run_dir)
    if sys.stdout.isatty():
        sys.stdout.flush()
