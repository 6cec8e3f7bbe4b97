"""Workers that Ray kills: why, in a few words; Ray tasks run again after a kill; the test hook that kills one.

Ray ends a worker process when its node runs low on memory (the memory
monitor), when its node dies, or when the process itself dies (a signal, the
kernel's OOM killer). The search, ``final`` and the paper strategy treat each
of these as an event of the run, not as a crash of the command:
:func:`kill_reason` names it in one line, :func:`gather` runs Ray tasks again
after one (the training resumes from its checkpoint), and :func:`is_ray_error`
lets the command line turn any other error of Ray into one line.

``CLIPQ_TEST_KILL`` is a test hook, not a setting: it makes chosen workers
kill themselves with SIGKILL (see :func:`kill_point`). The command reads it
(:func:`kill_hook`) and sends it to its workers with their data, so it reaches
workers on every node and those of a Ray instance already running.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "GPU_ERROR",
    "GPU_MEMORY",
    "MEMORY",
    "DeviceFailed",
    "KillLedger",
    "gather",
    "is_ray_error",
    "kill_hook",
    "kill_point",
    "kill_reason",
    "quiet_tune",
    "reason_from_text",
    "worker_pids",
]

MEMORY = "killed: node out of memory (Ray memory monitor)"
NODE = "killed: its node died or left the cluster"
PREEMPTED = "killed: its node was preempted"
PROCESS = "killed: the worker process died (a signal, a crash, or the system's OOM killer)"
GPU_ERROR = "ended: a CUDA error left its GPU unusable to its worker"
GPU_MEMORY = "ended: its GPU ran out of memory twice"

KILL_ENV, ONCE_ENV = "CLIPQ_TEST_KILL", "CLIPQ_TEST_KILL_ONCE"
# The search stops when this many trials in a row (or the concurrency, if larger) end killed.
STREAK_MIN = 3


# -- what a kill was -----------------------------------------------------------------------


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what caused it (``__cause__``, ``__context__``, a Ray task error's cause), each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        cause = getattr(e, "cause", None)  # a Ray task error's cause is the task's own exception
        todo += [e.__cause__, e.__context__, cause if isinstance(cause, BaseException) else None]


class DeviceFailed(RuntimeError):
    """A trial's GPU failed under it (a sticky CUDA error, or memory that stays full): its worker must go.

    Raised out of a Ray Tune trainable, it makes Tune end that actor (Tune never
    reuses the actor of a trial that raised) and run the trial again on a new
    one, counted under ``search.retries``. The message starts with the reason.
    """


def reason_from_text(text: str) -> str:
    """The kill's reason from the text of Ray's error (what Ray Tune keeps of a failed trial)."""
    for reason in (GPU_ERROR, GPU_MEMORY):
        if reason in text:
            return reason
    if "running low on memory" in text or "NODE_OUT_OF_MEMORY" in text:
        return MEMORY
    if "preempted" in text:
        return PREEMPTED
    low = text.lower()
    if "node has died" in low or "node died" in low or "node is dead" in low or "nodedied" in low:
        return NODE
    return PROCESS


def kill_reason(exc: BaseException) -> str | None:
    """Why Ray ended a worker, when ``exc`` (or its cause) says Ray did; ``None`` for any other error."""
    try:
        import ray.exceptions as rex
    except ImportError:  # Ray never loaded: nothing of Ray can have failed
        return None
    for e in _chain(exc):
        if isinstance(e, rex.OutOfMemoryError):
            return MEMORY
        if isinstance(e, rex.NodeDiedError):
            return NODE
        if isinstance(e, rex.RayActorError):
            return PREEMPTED if getattr(e, "preempted", False) else reason_from_text(str(e))
        if isinstance(e, rex.WorkerCrashedError):
            return reason_from_text(str(e))
    return None


def is_ray_error(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was caused by, an error of Ray or Ray Tune (never imports Ray)."""
    import sys

    kinds: list[type] = []
    if "ray.exceptions" in sys.modules:
        kinds.append(sys.modules["ray.exceptions"].RayError)
    if "ray.tune.error" in sys.modules:
        kinds.append(sys.modules["ray.tune.error"].TuneError)
    return bool(kinds) and any(isinstance(e, tuple(kinds)) for e in _chain(exc))


def worker_pids(exc: BaseException) -> set[int]:
    """The process ids of the killed workers that Ray's error names (``pid=123`` or ``pid: 123``)."""
    return {int(m) for e in _chain(exc) for m in re.findall(r"\bpid[=:]\s*(\d+)", str(e))}


# -- the search's trials (Ray Tune) ----------------------------------------------------------------


def _last_failure(text: str) -> str:
    """The last entry of a Tune trial's error file (one ``Failure # N (occurred at ...)`` header each)."""
    parts = re.split(r"^Failure # \d+ \(occurred at [^)]*\)\n", text, flags=re.MULTILINE)
    return parts[-1].strip()


def tune_trial_error(trial: Any) -> str:
    """The text of a Ray Tune trial's latest failure ("" when Tune kept none)."""
    path = getattr(trial, "error_file", None)
    try:
        if path and Path(path).is_file():
            return _last_failure(Path(path).read_text(errors="replace"))
        error = trial.get_error()
        return _last_failure(str(error)) if error is not None else ""
    except Exception:  # noqa: BLE001 - the reason is a courtesy; the failure itself is already known
        return ""


class KillLedger:
    """The search's record of killed workers, shared by its searcher, a Tune callback and a stopper.

    Ray Tune retries a trial whose worker died (``FailureConfig``, the same
    trial again) and tells the searcher only of the last attempt; the
    callback logs each retry with its reason. Trials that end killed, one
    after another, stop the search (:attr:`stop_line`). Tune itself cannot
    handle every kill (an actor task killed for memory ends ``Tuner.fit``
    with the memory error): :meth:`crashed` decides what then becomes of the
    trials in flight, and :attr:`rerun` holds those to hand out again. A study
    trial has one budget of ``retries`` over both ways: Tune's own retry of a
    trial whose budget went on an earlier Tune run is stopped (:attr:`spent`).
    """

    def __init__(self, retries: int, concurrency: int, advice: str, log: Callable[[str], None]) -> None:
        self.retries, self.limit, self.advice, self.log = retries, max(STREAK_MIN, concurrency), advice, log
        self.trials: list[Any] = []  # Tune's own list of its trials (the callback keeps it current)
        self.pids: dict[str, int] = {}  # Tune trial id -> its worker's process id (its first report)
        self.kills: dict[int, list[str]] = {}  # study trial number -> the reasons of its kills so far
        self.known: dict[str, tuple[str, str]] = {}  # Tune trial id -> (reason, Ray's text), set by crashed()
        self.streak: list[str] = []  # reasons of the kills that ended the latest trials, one after another
        self.rerun: list[Any] = []  # study trials to hand out again (their Tune run ended under them)
        # Tune ids that Tune runs again although their study trial has no retry left (a trial handed out again
        # after a kill that ended a Tune run starts with Tune's whole budget): stopped at their first report
        self.spent: set[str] = set()
        self.stop_line: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks and stopper with each Tuner; its live trials and the study's stay out.
        return {**self.__dict__, "trials": [], "rerun": [], "known": {}, "spent": set(), "log": print}

    # -- the searcher's side

    def started(self, tune_id: str, result: dict[str, Any]) -> None:
        if "worker_pid" in result:
            self.pids[tune_id] = int(result["worker_pid"])

    def failed(self, tune_id: str, number: int) -> tuple[str, str]:
        """A trial Tune gave up on (its worker died on the last attempt allowed): (its error line, Ray's text)."""
        self.pids.pop(tune_id, None)
        self.spent.discard(tune_id)
        reason, text = self.known.pop(tune_id, (None, None))  # type: ignore[arg-type]
        if reason is None:
            trial = next((t for t in self.trials if t.trial_id == tune_id), None)
            text = tune_trial_error(trial) if trial is not None else ""
            reason = reason_from_text(text)
            self.kills.setdefault(number, []).append(reason)
        n = len(self.kills.get(number, [])) or 1
        self.ended(reason)
        return f"{reason}, on each of {n} attempt(s)" if n > 1 else reason, text[:4000]

    def ended(self, killed: str | None) -> None:
        """A trial ended (``killed``: why its worker was killed, or None); kills one after another stop the search."""
        if killed is None:
            self.streak.clear()
            return
        self.streak.append(killed)
        if len(self.streak) >= self.limit and self.stop_line is None:
            self.stop_line = self._stop_line()

    def _stop_line(self) -> str:
        reasons = self.streak[-self.limit :]
        main = max(set(reasons), key=reasons.count)
        head = f"stopped: the last {len(reasons)} trials were all {main}; finished trials are kept"
        if main == MEMORY:
            return f"{head}. {self.advice}, then rerun the same command to resume"
        return (
            f"{head}. Check the cluster's nodes (`ray status`, the Ray logs of the nodes), "
            "then rerun the same command to resume"
        )

    # -- Ray Tune's side

    def callback(self) -> Any:
        from ray import tune

        ledger = self

        class KillWatch(tune.Callback):
            """Keeps Tune's trial list at hand and says why a trial runs again."""

            def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
                ledger.trials = trials

            def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
                number = trial.config.get("number")
                reason = reason_from_text(tune_trial_error(trial))
                ledger.pids.pop(trial.trial_id, None)
                kills = ledger.kills.setdefault(number, [])
                kills.append(reason)
                if len(kills) > ledger.retries:  # its retries went on earlier Tune runs: it ends failed
                    ledger.spent.add(trial.trial_id)
                    ledger.known[trial.trial_id] = (reason, tune_trial_error(trial)[:4000])
                    return
                ledger.log(f"trial {number}: {reason}; running it again (retry {len(kills)} of {ledger.retries})")

        return KillWatch()

    def stopper(self) -> Any:
        from ray import tune

        ledger = self

        class StopOnKills(tune.Stopper):
            def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
                return trial_id in ledger.spent

            def stop_all(self) -> bool:
                return ledger.stop_line is not None

        return StopOnKills()

    # -- after Tune.fit ended on a kill

    def crashed(self, exc: BaseException, reason: str, in_flight: dict[str, Any]) -> list[str]:
        """``Tuner.fit`` ended on a kill: the Tune ids of the trials that end failed; the others go to :attr:`rerun`.

        The killed worker's trial is found by its process id, which Ray's error
        names; it runs again while it has retries left. The other trials in
        flight were cut off only by Tune's end: they run again, uncounted.
        """
        pids = worker_pids(exc)
        text = str(next((e for e in _chain(exc) if reason_from_text(str(e)) == reason), exc))[:4000]
        failed: list[str] = []
        victims = {tid for tid in in_flight if self.pids.get(tid) in pids}
        for tid, trial in in_flight.items():
            if tid in victims:
                kills = self.kills.setdefault(trial.number, [])
                kills.append(reason)
                if len(kills) > self.retries:
                    self.known[tid] = (reason, text)
                    failed.append(tid)
                    continue
                self.log(f"trial {trial.number}: {reason}; running it again (retry {len(kills)} of {self.retries})")
            self.rerun.append(trial)
        if not victims:  # a kill whose trial is unknown still counts as one more kill in a row
            self.log(f"a worker was {reason} (its trial is unknown); the trials in flight run again")
            self.ended(reason)
        self.pids.clear()
        return failed


def quiet_tune() -> None:
    """Ray Tune's own report of a failed trial is a traceback per failure; the search says it in one line.

    ``TUNE_PRINT_ALL_TRIAL_ERRORS=1`` (what ``--debug`` sets) brings Tune's
    tracebacks back.
    """
    import logging

    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    for name in ("ray.tune.tune", "ray.tune.execution.tune_controller", "ray._private.worker"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTrialList) for f in logger.filters):
            logger.addFilter(_NoTrialList())


class _NoTrialList:
    """Drops Tune's own words on failed trials (the search reports its failed trials itself, in one line each).

    "Trials did not complete: [...]"; "Trial ... : Error stopping trial." with
    a traceback, which Tune logs when the actor of a trial that raised (a
    GPU failure ends it on purpose) is gone before Tune stops it; and Ray's
    "Unhandled error ..." with the trial's traceback, printed when Tune drops
    a pending call on that actor without reading its error.
    """

    def filter(self, record: Any) -> bool:
        if os.environ.get("TUNE_PRINT_ALL_TRIAL_ERRORS") == "1":
            return True
        message = str(record.getMessage())
        return not message.startswith(("Trials did not complete", "Unhandled error")) and not message.endswith(
            "Error stopping trial."
        )


# -- Ray tasks that run again after a kill ----------------------------------------------------


def gather(
    submit: Callable[[Hashable], Any],
    keys: list[Hashable],
    *,
    retries: int,
    what: Callable[[Hashable], str],
    log: Callable[[str], None],
    poll: Callable[[], None] | None = None,
    again: str = "running it again",
) -> dict[Hashable, Any]:
    """Run one Ray task per key and wait for all of them; a task whose worker Ray kills is submitted again.

    ``submit(key)`` starts the task (declared with ``max_retries=0``: the
    retries are counted here, where a memory kill counts like any other,
    instead of Ray's endless retries after memory kills). Up to ``retries``
    kills per task are survived; one more, or any other error, ends the wait
    with a ``ClipQError`` (the tasks still running are cancelled). ``poll`` is
    called about once a second while waiting (e.g. to relay progress lines).
    """
    import ray

    from clipq_search.errors import ClipQError

    refs = {submit(k): k for k in keys}
    kills: dict[Hashable, int] = dict.fromkeys(keys, 0)
    out: dict[Hashable, Any] = {}
    try:
        while refs:
            ready, _ = ray.wait(list(refs), timeout=1.0, num_returns=1)
            if poll is not None:
                poll()
            for ref in ready:
                key = refs.pop(ref)
                try:
                    out[key] = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    reason = kill_reason(exc)
                    if reason is not None and kills[key] < retries:
                        kills[key] += 1
                        log(f"  {what(key)}: {reason}; {again} (retry {kills[key]} of {retries})")
                        refs[submit(key)] = key
                        continue
                    if reason is not None:
                        why = f"{reason}, {kills[key] + 1} time(s); search.retries={retries}"
                    else:
                        why = _task_error_line(exc)
                    raise ClipQError(f"{what(key)} failed ({why}); rerun the same command to resume") from exc
    finally:
        for ref in refs:  # a failure ends the wait: nothing of it goes on running
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
    return out


def _task_error_line(exc: BaseException) -> str:
    """The user's exception inside a Ray task error (its last line: ``Type: message``), else the first line."""
    lines = str(exc).strip().splitlines()
    return (lines[-1] if lines else type(exc).__name__)[:300]


# -- the test hook ----------------------------------------------------------------------------


def kill_hook() -> dict[str, str] | None:
    """This command's ``CLIPQ_TEST_KILL`` and ``CLIPQ_TEST_KILL_ONCE``, for its workers; None when unset."""
    hook = {key: os.environ[key] for key in (KILL_ENV, ONCE_ENV) if os.environ.get(key)}
    return hook if KILL_ENV in hook else None


def _plan(hook: dict[str, str]) -> dict[str, str]:
    """``CLIPQ_TEST_KILL`` as {target: when}: ``trial3@start,trial5@20,compressed@300,paper@start``."""
    out: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in hook[KILL_ENV].split(","))):
        target, _, when = item.partition("@")
        out[target] = when or "start"
    return out


def _first_time(target: str, hook: dict[str, str]) -> bool:
    """False when ``CLIPQ_TEST_KILL_ONCE`` says ``target`` was hit already (else it marks it now)."""
    once = hook.get(ONCE_ENV)
    if once:
        marker = Path(once) / target
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.open("x").close()
        except FileExistsError:
            return False  # killed once already: this attempt lives
    return True


def _die(target: str, hook: dict[str, str]) -> None:
    if _first_time(target, hook):
        os.kill(os.getpid(), signal.SIGKILL)


def _hog(target: str) -> None:
    """Take memory until Ray's memory monitor kills this worker (a real memory kill)."""
    held = []
    for _ in range(512):  # up to 32 GiB in 64 MiB steps, each one written so that it is really used
        held.append(b"\x01" * (64 << 20))
        time.sleep(0.02)
    raise RuntimeError(f"test hook: {target} took {len(held) * 64} MiB and was not killed")


@contextlib.contextmanager
def kill_point(target: str, hook: dict[str, str] | None) -> Iterator[None]:
    """Test hook: while inside, the worker kills itself if ``CLIPQ_TEST_KILL`` names ``target``.

    ``hook`` is the command's :func:`kill_hook`, sent with the worker's data.

    ``target@start`` dies at once; ``target@N`` after N training steps (counted
    as top-level forward calls, through torch's global module hooks, removed on
    leaving); ``target@memN`` takes memory after N steps until Ray's memory
    monitor kills it; ``target@cuda`` raises, at once, the ``RuntimeError``
    torch raises after an illegal memory access on a GPU (the process lives).
    With ``CLIPQ_TEST_KILL_ONCE=DIR`` each target is hit only once (a marker
    file in DIR); a rerun of it then lives. Without the variable this does
    nothing.
    """
    when = _plan(hook).get(target) if hook else None
    if when is None:
        yield
        return
    if when == "start":
        _die(target, hook)
        yield
        return
    if when == "cuda":
        if _first_time(target, hook):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (test hook)")
        yield
        return
    hog = when.startswith("mem")
    steps = int(when[3:] if hog else when)
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    depth, count = [0], [0]

    def before(module: Any, args: Any) -> None:
        if depth[0] == 0:
            count[0] += 1
            if count[0] == steps + 1:
                _hog(target) if hog else _die(target, hook)
        depth[0] += 1

    def after(module: Any, args: Any, output: Any) -> None:
        depth[0] = max(0, depth[0] - 1)

    handles = [register_module_forward_pre_hook(before), register_module_forward_hook(after)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
