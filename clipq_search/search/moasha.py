"""Multi-objective asynchronous successive halving (MO-ASHA) as a Ray Tune scheduler.

Schmucker et al. 2021, "Multi-objective Asynchronous Successive Halving";
the rule of Syne Tune's ``MOASHA``, on Ray Tune's ``TrialScheduler``
interface. A trial reports after each unit of budget (``time_attr``, e.g.
epochs). The rungs are ``grace_period * reduction_factor**k`` up to
``max_t`` (or the ``levels`` given). When a trial reaches a rung, its objectives are recorded there,
and it goes on only if it is among the best ``1 / reduction_factor`` of
everything recorded at that rung so far (at least the first): no trial ever
waits for a rung to fill.

"Best" is multi-objective: first the non-dominated rank (the Pareto front is
rank 0, the front of what remains rank 1, ...), then, within a rank, the
hypervolume that only this point adds (its exclusive contribution to the
rank's hypervolume). Ranking on one objective would promote only mildly
compressed plans.

All objectives are maximised; pass ``signs`` to minimise some (-1).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

__all__ = [
    "MOASHA",
    "hypervolume_contributions",
    "nondominated_ranks",
    "promotion_order",
    "rung_levels",
]


def rung_levels(grace_period: float, max_t: float, reduction_factor: float) -> list[float]:
    """``grace_period * reduction_factor**k`` below ``max_t``, then ``max_t`` (ascending)."""
    if not (grace_period > 0 and max_t >= grace_period and reduction_factor > 1):
        raise ValueError(
            f"rungs need 0 < grace_period <= max_t and reduction_factor > 1; got grace_period={grace_period}, "
            f"max_t={max_t}, reduction_factor={reduction_factor}"
        )
    levels, level = [], float(grace_period)
    while level < max_t * (1 - 1e-9):
        levels.append(level)
        level *= reduction_factor
    return [*levels, float(max_t)]


def nondominated_ranks(points: np.ndarray) -> np.ndarray:
    """Rank per row of ``points`` (maximised objectives): 0 for the Pareto front, 1 for the next front, ..."""
    points = np.asarray(points, dtype=float)
    n = len(points)
    ranks = np.full(n, -1, dtype=int)
    if n == 0:
        return ranks
    # dominated[i, j]: j dominates i (at least as good everywhere, better somewhere)
    ge = (points[None, :, :] >= points[:, None, :]).all(axis=2)
    gt = (points[None, :, :] > points[:, None, :]).any(axis=2)
    dominated = ge & gt
    remaining = np.ones(n, dtype=bool)
    rank = 0
    while remaining.any():
        front = remaining & ~(dominated & remaining[None, :]).any(axis=1)
        ranks[front] = rank
        remaining &= ~front
        rank += 1
    return ranks


def hypervolume_contributions(front: np.ndarray, reference: Sequence[float]) -> np.ndarray:
    """Each point's exclusive hypervolume in a 2-objective, mutually non-dominated, maximised ``front``.

    The area that only this point covers above ``reference`` (below every
    point): with the front sorted by the first objective, the rectangle
    between its neighbours. Equal points share their area, so each adds 0.
    """
    front = np.asarray(front, dtype=float)
    if front.ndim != 2 or front.shape[1] != 2:
        raise ValueError(f"hypervolume contributions are for 2 objectives; got points of shape {front.shape}")
    n = len(front)
    out = np.zeros(n)
    if n == 0:
        return out
    order = np.lexsort((-front[:, 1], front[:, 0]))  # first objective up, second down
    x, y = front[order, 0], front[order, 1]
    left = np.concatenate([[reference[0]], x[:-1]])
    below = np.concatenate([y[1:], [reference[1]]])
    out[order] = np.maximum(x - left, 0.0) * np.maximum(y - below, 0.0)
    return out


def promotion_order(points: np.ndarray) -> list[int]:
    """Indices of ``points`` (maximised) from best to worst: non-dominated rank, then hypervolume contribution.

    The reference point lies below the worst value of each objective by a
    tenth of its range (1 where the range is 0), so that the extremes of a
    front add area too. Ties keep the order of the rows.
    """
    points = np.asarray(points, dtype=float)
    if len(points) == 0:
        return []
    ranks = nondominated_ranks(points)
    worst, best = points.min(axis=0), points.max(axis=0)
    span = np.where(best > worst, best - worst, 1.0)
    reference = worst - 0.1 * span
    contribution = np.zeros(len(points))
    for rank in np.unique(ranks):
        members = np.flatnonzero(ranks == rank)
        if points.shape[1] == 2:
            contribution[members] = hypervolume_contributions(points[members], reference)
    return sorted(range(len(points)), key=lambda i: (ranks[i], -contribution[i], i))


class MOASHA(FIFOScheduler):
    """MO-ASHA for Ray Tune: ``tune.TuneConfig(scheduler=MOASHA(...))``.

    ``objectives`` are result keys, each maximised (``signs`` -1 minimises
    one). A result lacking ``time_attr`` or an objective is let through; a
    non-finite objective stops the trial. A trial reaching ``max_t`` is
    stopped (it is done). ``load`` puts results known from elsewhere (a
    resumed study) into the rungs. ``decisions`` lists every (trial, rung,
    promoted) taken, for reports. ``trial_key(trial)`` names a trial's
    results (default: Tune's trial id); a searcher whose trials Tune may run
    again under a new id keys them by its own trial, so that a re-run that
    reports a rung again is not a second, competing copy of the same plan.
    """

    def __init__(
        self,
        *,
        objectives: Sequence[str],
        time_attr: str = "training_iteration",
        max_t: float = 9,
        grace_period: float = 1,
        reduction_factor: float = 3,
        signs: Sequence[float] | None = None,
        levels: Sequence[float] | None = None,
        trial_key: Callable[[Any], str] | None = None,
    ) -> None:
        super().__init__()
        if len(objectives) < 1:
            raise ValueError("MOASHA needs at least one objective")
        self.objectives = tuple(objectives)
        self.signs = np.asarray(signs if signs is not None else [1.0] * len(self.objectives), dtype=float)
        if self.signs.shape != (len(self.objectives),):
            raise ValueError("signs needs one entry per objective")
        self.time_attr = time_attr
        if reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be > 1; got {reduction_factor}")
        self.reduction_factor = float(reduction_factor)
        if levels is not None:
            self.levels = [float(v) for v in levels]
            if not self.levels or self.levels[0] <= 0 or any(a >= b for a, b in itertools.pairwise(self.levels)):
                raise ValueError(f"levels must be positive and increasing; got {list(levels)}")
        else:
            self.levels = rung_levels(grace_period, max_t, reduction_factor)
        self.max_t = self.levels[-1]
        self.rungs: dict[float, dict[str, np.ndarray]] = {level: {} for level in self.levels}
        self.decisions: list[tuple[str, float, bool]] = []
        self.trial_key = trial_key

    # -- the rule -----------------------------------------------------------------------------------------

    def load(self, trial_id: str, level: float, values: Sequence[float]) -> None:
        """Record a result known from elsewhere (a resumed run's trials) at rung ``level``; decide nothing."""
        self.rungs[level][trial_id] = self.signs * np.asarray(values, dtype=float)

    def record(self, trial_id: str, level: float, values: Sequence[float]) -> bool:
        """Record ``values`` (the objectives, in order) of ``trial_id`` at rung ``level``; whether it goes on."""
        self.load(trial_id, level, values)
        recorded = self.rungs[level]
        ids = list(recorded)
        order = promotion_order(np.stack([recorded[i] for i in ids]))
        position = order.index(ids.index(trial_id))
        promoted = position < max(1.0, len(ids) / self.reduction_factor)
        self.decisions.append((trial_id, level, bool(promoted)))
        return promoted

    def _rung_reached(self, trial_id: str, t: float) -> float | None:
        """The highest rung at or below ``t`` that ``trial_id`` has not been recorded at."""
        reached = [level for level in self.levels if t >= level * (1 - 1e-9)]
        if not reached or trial_id in self.rungs[reached[-1]]:
            return None
        return reached[-1]

    # -- Ray Tune's TrialScheduler interface ------------------------------------------------------------

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # the objectives are this scheduler's own

    def on_trial_result(self, tune_controller: Any, trial: Any, result: Mapping[str, Any]) -> str:
        if self.time_attr not in result or any(k not in result for k in self.objectives):
            return TrialScheduler.CONTINUE
        values = [float(result[k]) for k in self.objectives]
        if not all(math.isfinite(v) for v in values):
            return TrialScheduler.STOP
        t = float(result[self.time_attr])
        key = self.trial_key(trial) if self.trial_key is not None else trial.trial_id
        level = self._rung_reached(key, t)
        promoted = self.record(key, level, values) if level is not None else True
        if t >= self.max_t * (1 - 1e-9) or not promoted:
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        counts = ", ".join(f"{level:g}: {len(r)}" for level, r in self.rungs.items())
        stopped = sum(1 for *_, promoted in self.decisions if not promoted)
        return f"MO-ASHA rungs (budget: trials recorded) {counts}; stopped {stopped}"
