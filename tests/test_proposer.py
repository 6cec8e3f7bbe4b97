"""The background proposer: plans ready ahead of need, never more than asked, writes in order, ``auto``'s switch."""

from __future__ import annotations

import re
import time
from pathlib import Path

import optuna

from clipq_search.search.proposer import AUTO_ATTR, Proposer

DIST = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}


class SlowSampler(optuna.samplers.RandomSampler):
    """A sampler whose every ask takes ``delay`` seconds (a GP with many trials, in miniature)."""

    def __init__(self, delay: float) -> None:
        super().__init__(seed=0)
        self.delay = delay

    def sample_independent(self, study, trial, name, dist):  # noqa: ANN001, ANN201
        time.sleep(self.delay)
        return super().sample_independent(study, trial, name, dist)


def _take(p: Proposer, timeout: float = 10.0):  # noqa: ANN202
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = p.take()
        if got is not None:
            return got
        time.sleep(0.005)
    raise AssertionError("no plan became ready")


def _asked(p: Proposer, count: int, timeout: float = 10.0) -> None:
    """Wait until the proposer has asked the sampler for ``count`` plans (it asks in its own thread)."""
    deadline = time.time() + timeout
    while p.asked < count and time.time() < deadline:
        time.sleep(0.005)
    assert p.asked == count


def _study(tmp_path: Path, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    return optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", directions=["maximize"] * 2, sampler=sampler)


def test_plans_are_ready_for_every_free_slot_and_never_more_than_asked(tmp_path: Path) -> None:
    study = _study(tmp_path)
    p = Proposer(study, DIST, total=5, concurrency=3, prepare=lambda t: {"number": t.number}, log=lambda m: None)
    assert p.take() is None  # not started: nothing asked yet
    p.start()
    got = [_take(p) for _ in range(3)]  # every free slot, without waiting for a completion
    _asked(p, 4)  # plus one spare
    time.sleep(0.3)
    assert p.asked == 4  # no more while the slots are full
    order: list[int] = []
    for trial, config in got:
        assert config == {"number": trial.number}
        p.defer(lambda t=trial: (order.append(t.number), study.tell(t, [0.0, 0.0])))
        p.done(0.1)
    rest = [_take(p) for _ in range(2)]
    assert p.exhausted() and p.take() is None
    for trial, _ in rest:
        p.defer(study.tell, trial, [1.0, 1.0])
    assert p.stop() == []  # finishes the deferred writes first
    assert order == [t.number for t, _ in got]
    states = [t.state for t in study.trials]
    assert len(states) == 5 and all(s == optuna.trial.TrialState.COMPLETE for s in states)


def test_plans_never_handed_out_are_returned_on_stop(tmp_path: Path) -> None:
    study = _study(tmp_path)
    p = Proposer(study, DIST, total=10, concurrency=2, prepare=lambda t: {}, log=lambda m: None).start()
    _take(p)
    _asked(p, 3)
    left = p.stop()
    assert len(left) == 2 and all(t.number > 0 for t in left)  # one free slot and the spare


def test_auto_leaves_a_sampler_that_cannot_keep_pace_and_a_resume_starts_without_it(tmp_path: Path) -> None:
    study = _study(tmp_path, SlowSampler(0.2))
    logs: list[str] = []
    fallback = lambda: optuna.samplers.TPESampler(seed=0, constant_liar=True)  # noqa: E731
    p = Proposer(study, DIST, total=12, concurrency=2, prepare=lambda t: {}, fallback=fallback, log=logs.append)
    p.start()
    for _ in range(12):
        trial, _ = _take(p)
        study.tell(trial, [0.5, 0.5])
        p.done(0.05)  # trials of 50 ms, two at a time: an ask may take 12 ms
    p.stop()
    assert isinstance(study.sampler, optuna.samplers.TPESampler)
    # asks take at least the sampler's 0.2 s sleep (more on a busy machine)
    assert len(logs) == 1 and re.match(r"sampler auto: SlowSampler asks take (0\.[2-9]|[1-9])", logs[0]), logs
    assert study.user_attrs[AUTO_ATTR] == "tpe"
    # the same run resumed: TPE from the start
    again = optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{tmp_path / 's.db'}",
                              sampler=SlowSampler(0.2))
    Proposer(again, DIST, total=1, concurrency=1, prepare=lambda t: {}, fallback=fallback).start().stop()
    assert isinstance(again.sampler, optuna.samplers.TPESampler)
