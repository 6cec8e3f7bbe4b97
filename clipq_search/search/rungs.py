"""Multi-fidelity trials on Ray Tune: a trial's rungs, their checkpoints, and the MO-ASHA scheduler of a run.

With ``trial.rungs`` (e.g. ``[1, 3, 9]``) a trial fine-tunes its plan for
``rungs[0] * trial.train.epochs`` epochs, reports, and goes on to the next
budget only if :class:`~clipq_search.search.moasha.MOASHA` promotes it. Each
report but the last carries a Tune checkpoint (the model's state and the
record so far), so that a trial continues from its own weights:

- after its worker died, Tune runs it again from that checkpoint;
- after the whole search was killed, the rerun queues the plan again with the
  path of its last checkpoint (kept in the Optuna study), and the trial first
  reports that rung's result again (the scheduler decides on it afresh) and
  then trains on from there.

A checkpoint is a folder with ``model.pt`` (tensors only, read with
``weights_only=True``) and ``rung.json`` (the rung's index and record).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipq_search.search.space import Space
from clipq_search.search.trial import RungState, trial_budgets

__all__ = [
    "CHECKPOINT_ATTR",
    "RESUME_ATTR",
    "RUNG_ATTRS",
    "checkpoint_callback",
    "forget_checkpoint",
    "load_rung_state",
    "make_scheduler",
    "report_rung",
    "rung_metrics",
    "study_key",
]

MODEL_FILE, RUNG_FILE = "model.pt", "rung.json"
# Optuna user attributes of a multi-fidelity trial: its results by rung, its last checkpoint, and (on a
# trial queued again after a kill) the checkpoint of the interrupted trial it goes on from.
RUNG_ATTRS = ("rungs", "rung", "budget")
CHECKPOINT_ATTR, RESUME_ATTR = "checkpoint", "resume_from"
# The objectives MO-ASHA ranks on (both maximised), as reported to Tune.
OBJECTIVES = ("val_top1", "log10_rate")


def rung_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """What a trial reports to Tune for a scored rung: the objectives, the budget, the whole record as JSON."""
    return {
        "ok": 1,
        "val_top1": record["val_top1"],
        "log10_rate": math.log10(record["rate"]),
        "budget": record["budget"],
        "rung": record["rung"],
        # Ray flattens nested result dicts; the record travels as one JSON string.
        "record": json.dumps(record),
    }


def report_rung(record: dict[str, Any], model: nn.Module | None) -> None:
    """Report a rung to Tune (inside a trial), with a checkpoint of ``model`` when given."""
    from ray import tune

    metrics = rung_metrics(record)
    if model is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="clipq-rung-") as folder:
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        torch.save(state, Path(folder) / MODEL_FILE)
        (Path(folder) / RUNG_FILE).write_text(json.dumps({"rung": record["rung"], "record": record}))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def load_rung_state(path: str | None) -> RungState | None:
    """The trial's state in a rung checkpoint folder (Tune's, or a path the study kept); None when there is none.

    A folder that has gone (removed by hand, another machine's disk) or that
    does not hold a whole checkpoint is no state: the trial starts afresh.
    """
    from ray import tune

    checkpoint = tune.get_checkpoint()  # Tune runs this trial again after its worker died
    if checkpoint is None and path:
        checkpoint = tune.Checkpoint(path)
    if checkpoint is None:
        return None
    try:
        with checkpoint.as_directory() as folder:
            info = json.loads((Path(folder) / RUNG_FILE).read_text())
            state = torch.load(Path(folder) / MODEL_FILE, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError):
        return None
    return RungState(int(info["rung"]), state, dict(info["record"]))


def forget_checkpoint(paths: Iterable[str]) -> None:
    """Remove a finished trial's checkpoint folders (local paths; others are left to their storage)."""
    for path in paths:
        if path and Path(path).is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _study_key(number: int) -> str:
    return f"study-{number}"


def study_key(trial: Any) -> str:
    """MO-ASHA's name for a Tune trial's results: its study trial's (a run Tune starts again after a kill keeps it)."""
    return _study_key(trial.config["number"])


def make_scheduler(space: Space, finished: Iterable[Any]) -> Any:
    """MO-ASHA over the space's rungs, with the rung results of the run's ``finished`` (frozen) trials loaded.

    None without ``trial.rungs``: every trial runs its one budget (Tune's FIFO).
    """
    if not space.trial.rungs:
        return None
    from clipq_search.search.moasha import MOASHA

    levels = trial_budgets(space)
    scheduler = MOASHA(
        objectives=OBJECTIVES, time_attr="budget", levels=levels, reduction_factor=space.trial.reduction_factor,
        trial_key=study_key,
    )
    for t in finished:
        for entry in t.user_attrs.get("rungs") or []:
            k = int(entry["rung"])
            if 0 <= k < len(levels) and entry.get("rate"):
                scheduler.load(_study_key(t.number), levels[k], [entry["val_top1"], math.log10(entry["rate"])])
    return scheduler


def checkpoint_callback(saved: Callable[[str, str], None]) -> Any:
    """A Tune callback that passes each trial's persisted checkpoint path to ``saved(tune_trial_id, path)``."""
    from ray.tune import Callback

    class _Checkpoints(Callback):
        def on_checkpoint(self, iteration: int, trials: list[Any], trial: Any, checkpoint: Any, **info: Any) -> None:
            saved(trial.trial_id, str(checkpoint.path))

    return _Checkpoints()
