"""Plans proposed ahead of need, off Ray Tune's event loop, so a free slot never waits for the sampler.

Tune asks its searcher for a plan inside its event loop, one ask after
another; a sampler that takes seconds per ask (a GP with a hundred trials and
thirty running) holds every slot that frees meanwhile. The :class:`Proposer`
asks the study in a background thread and keeps one plan ready beyond the
slots that are free, so the searcher's ``suggest`` only takes a plan off the
shelf (or answers "not yet"). The sampler sees the plans in flight as running
trials (TPE's constant liar, the GP's own handling of running trials).

Policy ``auto`` (the default sampler): the GP while its asks keep pace with
the trials (an ask takes at most half the time between two trial
completions: the median trial's length / concurrency), then TPE with the
constant liar for the rest of the command: a sampler that cannot keep up
costs more trials per hour than its better proposals win back.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import optuna

__all__ = ["Proposer"]

# An ask may take this share of the time between two trial completions before ``auto`` leaves the GP.
PACE_SHARE = 0.5
# Study user attribute: set once ``auto`` has left the GP, so a resumed run starts with TPE.
AUTO_ATTR = "clipq:auto_sampler"


class Proposer:
    """Ask ``study`` for up to ``total`` plans in a background thread; :meth:`take` one when a slot frees."""

    def __init__(
        self,
        study: optuna.Study,
        dists: dict[str, optuna.distributions.BaseDistribution],
        total: int,
        concurrency: int,
        prepare: Callable[[optuna.trial.Trial], dict[str, Any]],
        *,
        fallback: Callable[[], optuna.samplers.BaseSampler] | None = None,
        log: Callable[[str], None] = print,
        spare: int = 1,
    ) -> None:
        self.study, self.dists, self.total, self.concurrency = study, dists, total, max(1, concurrency)
        self.prepare, self.fallback, self.log, self.spare = prepare, fallback, log, spare
        self.asked = 0  # plans asked of the study (ready, handed out, or finished)
        self.asking = False  # an ask is under way
        self.in_flight = 0  # plans handed out and not finished
        self.ask_log: list[tuple[int, float, str]] = []  # (trials before it in the study, seconds, sampler class)
        self.trial_seconds: deque[float] = deque(maxlen=32)
        self.error: BaseException | None = None
        self._ready: deque[tuple[optuna.trial.Trial, dict[str, Any]]] = deque()
        self._work: deque[Callable[[], None]] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="clipq-proposer", daemon=True)

    # -- the searcher's side ------------------------------------------------------------------------

    def start(self) -> Proposer:
        if self.fallback is not None and self.study.user_attrs.get(AUTO_ATTR) == "tpe":
            self.study.sampler = self.fallback()  # the GP fell behind earlier in this run
            self.fallback = None
        self._thread.start()
        return self

    def take(self) -> tuple[optuna.trial.Trial, dict[str, Any]] | None:
        """A ready plan (its trial and the trial's config), or None when none is ready yet. Never waits."""
        if self.error is not None:
            raise self.error
        with self._cond:
            if not self._ready:
                return None
            item = self._ready.popleft()
            self.in_flight += 1
            self._cond.notify()
            return item

    def done(self, seconds: float | None) -> None:
        """A handed-out plan finished (after ``seconds`` of running, when known)."""
        with self._cond:
            self.in_flight = max(0, self.in_flight - 1)
            if seconds is not None and seconds > 0:
                self.trial_seconds.append(seconds)
            self._cond.notify()

    def defer(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` in the thread, before its next ask (a finished trial's writes: off Tune's loop)."""
        with self._cond:
            self._work.append(lambda: fn(*args))
            self._cond.notify()

    def exhausted(self) -> bool:
        """Every plan was asked and handed out."""
        with self._cond:
            return self.asked >= self.total and not self.asking and not self._ready

    def stop(self) -> list[optuna.trial.Trial]:
        """Finish the deferred work, end the thread; the plans asked but never handed out (RUNNING, never run)."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=600)
        while self._work:  # the thread never started, or ended on an error
            self._work.popleft()()
        with self._cond:
            left = [t for t, _ in self._ready]
            self._ready.clear()
        return left

    # -- the thread ------------------------------------------------------------------------------

    def _wanted(self) -> bool:
        free = self.concurrency - self.in_flight
        return self.asked + self.asking < self.total and len(self._ready) < max(0, free) + self.spare

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._work and not self._stop and not self._wanted():
                        self._cond.wait()
                    job = self._work.popleft() if self._work else None
                    if job is None and self._stop:
                        return
                    if job is None:
                        self.asking = True
                if job is not None:
                    job()
                    continue
                t0 = time.perf_counter()
                trial = self.study.ask(self.dists)
                seconds = time.perf_counter() - t0
                self.ask_log.append((trial.number, seconds, type(self.study.sampler).__name__))
                config = self.prepare(trial)
                with self._cond:
                    self._ready.append((trial, config))
                    self.asked += 1
                    self.asking = False
                self._keep_pace(seconds)
        except BaseException as exc:  # noqa: BLE001 - handed to the searcher, which raises it in Tune's loop
            self.error = exc

    def _keep_pace(self, seconds: float) -> None:
        """Policy ``auto``: leave a sampler whose recent asks take longer than the trials allow."""
        if self.fallback is None or len(self.trial_seconds) < 3:
            return
        sampler = type(self.study.sampler).__name__
        recent = [s for _, s, name in self.ask_log[-3:] if name == sampler]
        budget = PACE_SHARE * statistics.median(self.trial_seconds) / self.concurrency
        # three asks over the budget, or one far over it (an ask of a resumed run with many trials)
        if (len(recent) == 3 and statistics.median(recent) > budget) or seconds > 4 * budget:
            self.study.sampler = self.fallback()
            self.fallback = None
            self.study.set_user_attr(AUTO_ATTR, "tpe")
            self.log(
                f"sampler auto: {sampler} asks take {max([seconds, *recent]):.2f} s, more than the "
                f"{budget:.2f} s the trials allow (median trial {statistics.median(self.trial_seconds):.1f} s, "
                f"{self.concurrency} at a time); TPE from trial {len(self.study.get_trials(deepcopy=False))} on"
            )
