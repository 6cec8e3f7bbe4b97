"""The Ray Tune ``Searcher`` of a search: Optuna's study proposes the plans, Tune runs them.

``suggest`` hands Tune a plan the :class:`~clipq_search.search.proposer.Proposer`
asked of the study in its background thread; ``on_trial_complete`` tells the
study the trial's result, or its failure with the error. Imported only where
Ray Tune runs (it imports Ray).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from ray.tune.search import Searcher

from clipq_search.search.proposer import Proposer
from clipq_search.search.rungs import CHECKPOINT_ATTR, RESUME_ATTR, RUNG_ATTRS, forget_checkpoint
from clipq_search.search.space import LayerSearchParam, Space
from clipq_search.search.study import ERROR_ATTR, make_sampler
from clipq_search.search.trial import Baseline
from clipq_search.search.worker_kills import KillLedger

__all__ = ["StudySearcher"]

# What a finished trial's record gives the study, as trial attributes (trials.csv's columns).
_RECORDED = (
    "val_top1", "val_loss", "rate", "size_bytes", "train_seconds", "trial_seconds", "node", "kept", "train_loss",
    "budget", "rung", "rungs", "cpu_seconds",
)


class StudySearcher(Searcher):
    """Ask the Optuna study for plans; tell it the outcomes.

    ``to_run`` plans are proposed from ``dists`` (the units' distributions);
    ``on_done`` sees each finished trial as the study stored it. ``baseline``
    gives the accuracy that ``search.max_accuracy_drop`` counts from (needed
    only with it). ``threads`` and ``inject_failure`` (trial numbers that fail
    on purpose, a test hook) go into every trial's config.
    """

    def __init__(
        self,
        study: optuna.Study,
        units: list[LayerSearchParam],
        dists: dict[str, optuna.distributions.BaseDistribution],
        space: Space,
        *,
        to_run: int,
        on_done: Callable[[optuna.trial.FrozenTrial], None],
        baseline: Baseline | None,
        threads: int,
        kills: KillLedger,
        inject_failure: Sequence[int] = (),
        log: Callable[[str], None] = print,
        storage_url: str | None = None,
    ) -> None:
        super().__init__(metric="val_top1", mode="max")
        self.study, self.units, self.dists, self.space = study, units, dists, space
        self.to_run, self.on_done, self.baseline, self.threads = to_run, on_done, baseline, threads
        self.kills, self.inject_failure, self.log = kills, list(inject_failure), log
        self.by_tune_id: dict[str, optuna.trial.Trial] = {}
        self.handed: dict[str, float] = {}
        self.checkpoints: dict[str, list[str]] = {}  # multi-fidelity: each running trial's rung checkpoints
        # those of a trial whose Tune run ended under it, by study trial number: removed once its re-run is done
        self.carried: dict[int, list[str]] = {}
        self.storage_url = storage_url  # where rung results go as intermediate values (learning curves)
        self._curves: tuple[optuna.storages.BaseStorage, int] | None = None  # storage and study id, once opened
        # Plans are asked in a background thread: Tune's loop only takes a ready one (never waits).
        # Made at the first suggest: Tune pickles the searcher when the tuner is built.
        self.proposer: Proposer | None = None

    def prepare(self, trial: optuna.trial.Trial) -> dict[str, Any]:
        """The config of a proposed trial (runs in the proposer's thread)."""
        plan = Space.plan_from_params(dict(trial.params), self.units)
        trial.set_user_attr("layers", {k: v.to_dict() for k, v in plan.layers.items()})
        return {
            "number": trial.number,
            "plan": plan.to_dict(),
            "space": self.space,
            "threads": self.threads,
            "inject_failure": self.inject_failure,
            # a multi-fidelity trial's last rung checkpoint: its own newest (Tune's run of it ended under it),
            # else that of the interrupted trial it re-runs; the trial goes on from there
            "resume": trial.user_attrs.get(CHECKPOINT_ATTR) or trial.user_attrs.get(RESUME_ATTR),
        }

    def tpe(self) -> optuna.samplers.BaseSampler:
        """The sampler ``auto`` moves to when the GP no longer keeps pace (continuing the seed's stream)."""
        s = self.space.search
        n = len(self.study.get_trials(deepcopy=False))
        return make_sampler("tpe", s.seed + n, s.trials, s.max_accuracy_drop is not None)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.proposer is None:
            s = self.space.search
            fallback = self.tpe if s.sampler == "auto" else None
            self.proposer = Proposer(
                self.study, self.dists, self.to_run, s.concurrency, self.prepare, fallback=fallback, log=self.log
            )
            self.proposer.start()
        if self.kills.rerun:  # trials whose Tune run ended under them (a kill Tune could not handle)
            trial = self.kills.rerun.pop(0)
            return self._hand(trial_id, trial, self.prepare(trial))
        if self.proposer.exhausted():
            return Searcher.FINISHED
        ready = self.proposer.take()
        if ready is None:
            return None  # Tune asks again on its next step
        return self._hand(trial_id, *ready)

    def _hand(self, trial_id: str, trial: optuna.trial.Trial, config: dict[str, Any]) -> dict[str, Any]:
        """Tune's trial ``trial_id`` runs ``trial``; the checkpoint it resumes from is removed once it is done."""
        self.by_tune_id[trial_id] = trial
        self.handed[trial_id] = time.time()
        saved = [*self.carried.pop(trial.number, []), *([config["resume"]] if config.get("resume") else [])]
        self.checkpoints[trial_id] = list(dict.fromkeys(saved))
        return config

    def release(self, trial_id: str) -> None:
        """Tune's run ``trial_id`` ended under its trial (a kill Tune has no handler for): the trial is no longer in
        flight; its checkpoints stay until its re-run is done."""
        trial = self.by_tune_id.pop(trial_id, None)
        self.handed.pop(trial_id, None)
        saved = self.checkpoints.pop(trial_id, [])
        if trial is not None and saved:
            self.carried.setdefault(trial.number, []).extend(saved)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self.kills.started(trial_id, result)
        trial = self.by_tune_id.get(trial_id)
        last = len(self.space.trial.rungs or ()) - 1
        # a multi-fidelity trial's rung short of the last: the scheduler let it go on
        if trial is not None and result.get("ok") and 0 <= result.get("rung", -1) < last and self.proposer is not None:
            self.proposer.defer(self._rung_reached, trial, json.loads(result["record"]))

    def _rung_reached(self, trial: optuna.trial.Trial, record: dict[str, Any]) -> None:
        """A multi-fidelity trial scored a rung and goes on: its results so far join the study (and a log line)."""
        for key in RUNG_ATTRS:
            trial.set_user_attr(key, record[key])
        self._curve(trial.number, record)
        resumed = record.get("resumed_from_rung")
        how = f" (resumed from its checkpoint at rung {resumed})" if resumed is not None else ""
        self.log(
            f"  trial {trial.number}: rung {record['rung']} ({record['budget']:.3g} epochs) "
            f"val {record['val_top1']:.2f}% rate {record['rate']:.1f}x: promoted{how}"
        )

    def _curve(self, number: int, record: dict[str, Any]) -> None:
        """Each rung's validation accuracy as the trial's intermediate value at step = the rung's index.

        ``Trial.report`` refuses multi-objective studies; the storage's own call (public API of Optuna's
        storages) records the same values, so tools that draw intermediate values (optuna-dashboard)
        show each plan's learning curve.
        """
        if not self.storage_url or not record.get("rungs"):
            return
        if self._curves is None:
            storage = optuna.storages.RDBStorage(self.storage_url)
            self._curves = (storage, storage.get_study_id_from_name(self.study.study_name))
        storage, study_id = self._curves
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
        for entry in record["rungs"]:
            storage.set_trial_intermediate_value(trial_id, int(entry["rung"]), float(entry["val_top1"]))

    def checkpoint_saved(self, trial_id: str, path: str) -> None:
        """Tune persisted a rung checkpoint of a trial: the study keeps its path (a resumed run goes on from it)."""
        trial = self.by_tune_id.get(trial_id)
        if trial is None:
            return
        self.checkpoints.setdefault(trial_id, []).append(path)
        if self.proposer is None:
            trial.set_user_attr(CHECKPOINT_ATTR, path)
        else:  # the study's writes run in the proposer's thread, in order, off Tune's event loop
            self.proposer.defer(trial.set_user_attr, CHECKPOINT_ATTR, path)

    def __getstate__(self) -> dict[str, Any]:
        # Each Tuner pickles its searcher (for Tune's own restore, which the search never uses); after a
        # kill ends Tuner.fit, the next Tuner gets this searcher with its proposer thread running: leave it out.
        return {k: (None if k == "_curves" else v) for k, v in self.__dict__.items() if k != "proposer"}

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        trial = self.by_tune_id.pop(trial_id, None)
        if trial is None:
            return
        # its rung checkpoints, and the one it resumed from, are no longer needed once the study has its result
        trial_checkpoints = self.checkpoints.pop(trial_id, [])
        finish = functools.partial(self._complete, trial, trial_id, result, error, trial_checkpoints)
        if self.proposer is None:
            finish()
        else:  # the study's writes run in the proposer's thread, in order, off Tune's event loop
            self.proposer.defer(finish)

    def _complete(
        self,
        trial: optuna.trial.Trial,
        trial_id: str,
        result: dict[str, Any] | None,
        error: bool,
        trial_checkpoints: list[str],
    ) -> None:
        self._settle(trial, trial_id, result, error)
        forget_checkpoint(trial_checkpoints)

    def _settle(self, trial: optuna.trial.Trial, trial_id: str, result: dict[str, Any] | None, error: bool) -> None:
        if self.proposer is not None:
            self.proposer.done(time.time() - self.handed.pop(trial_id, time.time()))
        # Ray ended its worker on the last attempt Tune allows, or on the last the search allows (then Tune's
        # own retry of it was stopped at its first report)
        if error or trial_id in self.kills.spent:
            msg, text = self.kills.failed(trial_id, trial.number)
            result = {"error": msg, "traceback": text}
        else:
            self.kills.ended(None)
        if error or not result or not result.get("ok"):
            msg = (result or {}).get("error") or "the trial's worker died (node lost, out of memory, or killed)"
            trial.set_user_attr(ERROR_ATTR, msg)
            if result and result.get("traceback"):
                trial.set_user_attr("traceback", result["traceback"])
            frozen = self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            frozen = self._tell_success(trial, json.loads(result["record"]))
        self.on_done(frozen)

    def _tell_success(self, trial: optuna.trial.Trial, record: dict[str, Any]) -> optuna.trial.FrozenTrial:
        for key in _RECORDED:
            trial.set_user_attr(key, record[key])
        if self.space.trial.rungs:
            self._curve(trial.number, record)
        # From the plan's proposal to its start on a worker (worker start-up, scheduling).
        proposed = trial.datetime_start
        if proposed is not None:
            queued = max(0.0, record["started_unix"] - proposed.timestamp())
            trial.set_user_attr("queue_seconds", round(queued, 3))
        max_drop = self.space.search.max_accuracy_drop
        if max_drop is not None and self.baseline is not None:  # run_search always gives the baseline
            trial.set_user_attr("constraint", [self.baseline.val_top1 - record["val_top1"] - max_drop])
        return self.study.tell(trial, [record["val_top1"], math.log10(record["rate"])])

    def interrupted(self) -> list[optuna.trial.Trial]:
        """The plans of this command left unfinished: in flight, or proposed and never started."""
        never_started = self.proposer.stop() if self.proposer else []  # first: finishes the deferred writes
        return list(self.by_tune_id.values()) + self.kills.rerun + never_started
