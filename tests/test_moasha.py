"""MO-ASHA: non-dominated ranks, hypervolume contributions, the promotion rule, and Ray Tune running it."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
from ray.tune.schedulers import TrialScheduler

from clipq_search.search.moasha import (
    MOASHA,
    hypervolume_contributions,
    nondominated_ranks,
    promotion_order,
    rung_levels,
)


def _hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Area dominated by ``points`` above ``reference`` (2 maximised objectives), by a sweep."""
    total, best_y = 0.0, reference[1]
    for x, y in sorted(points.tolist(), key=lambda p: -p[0]):  # from the largest first objective down
        if y > best_y:
            total += (x - reference[0]) * (y - best_y)
            best_y = y
    return total


def test_rungs_grow_by_the_reduction_factor_and_end_at_the_budget() -> None:
    assert rung_levels(1, 9, 3) == [1, 3, 9]
    assert rung_levels(1, 10, 3) == [1, 3, 9, 10]
    assert rung_levels(0.5, 4, 2) == [0.5, 1, 2, 4]
    with pytest.raises(ValueError, match="reduction_factor > 1"):
        rung_levels(1, 9, 1)


@pytest.mark.parametrize("seed", range(5))
def test_ranks_are_the_successive_pareto_fronts(seed: int) -> None:
    rng = np.random.default_rng(seed)
    points = rng.integers(0, 6, size=(40, 2)).astype(float)  # many ties
    ranks = nondominated_ranks(points)

    def dominates(a: np.ndarray, b: np.ndarray) -> bool:
        return bool((a >= b).all() and (a > b).any())

    left = list(range(len(points)))
    rank = 0
    while left:
        front = [i for i in left if not any(dominates(points[j], points[i]) for j in left)]
        assert sorted(np.flatnonzero(ranks == rank).tolist()) == sorted(front)
        left = [i for i in left if i not in front]
        rank += 1


@pytest.mark.parametrize("seed", range(5))
def test_contributions_are_what_each_point_alone_adds_to_the_hypervolume(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = np.sort(rng.random(12))
    front = np.stack([x, 1 - x**2], axis=1)[rng.permutation(12)]  # mutually non-dominated, in no order
    assert (nondominated_ranks(front) == 0).all()
    reference = front.min(axis=0) - 0.1
    got = hypervolume_contributions(front, reference)
    whole = _hypervolume(front, reference)
    for i in range(len(front)):
        without = np.delete(front, i, axis=0)
        assert got[i] == pytest.approx(whole - _hypervolume(without, reference), abs=1e-12)


def test_promotion_prefers_the_front_over_a_more_accurate_dominated_plan() -> None:
    # (accuracy, log rate): A accurate and dense, B compressed, D dominated by A but more accurate than B
    points = np.array([[90.0, 0.0], [80.0, math.log(100)], [89.0, -0.1]])
    order = promotion_order(points)
    assert order[2] == 2  # the dominated plan is last, though accuracy alone would rank it second
    assert set(order[:2]) == {0, 1}
    # within a front, the larger exclusive area first (reference (0.8, -0.3): areas 0.02, 2.9, 0.3);
    # equal points keep their order
    assert promotion_order(np.array([[1.0, 3.0], [2.0, 2.9], [3.0, 0.0]])) == [1, 2, 0]
    assert promotion_order(np.array([[1.0, 1.0], [1.0, 1.0]])) == [0, 1]


def _trial(i: int) -> SimpleNamespace:
    return SimpleNamespace(trial_id=f"t{i}")


def test_the_scheduler_promotes_the_best_third_of_each_rung_as_results_arrive() -> None:
    sched = MOASHA(objectives=["acc", "log_rate"], time_attr="epochs", max_t=9, grace_period=1, reduction_factor=3)
    # at rung 1, in arrival order: each goes on only if in the best third of what the rung holds so far
    arrivals = [(80.0, 1.0), (70.0, 0.5), (60.0, 0.2), (85.0, 2.0), (50.0, 0.1), (40.0, 0.0)]
    actions = [sched.on_trial_result(None, _trial(i), {"epochs": 1, "acc": a, "log_rate": r})
               for i, (a, r) in enumerate(arrivals)]
    C, S = TrialScheduler.CONTINUE, TrialScheduler.STOP
    assert actions == [C, S, S, C, S, S]
    # between rungs nothing is decided; at the next rung the promoted ones compete again
    assert sched.on_trial_result(None, _trial(0), {"epochs": 2, "acc": 81.0, "log_rate": 1.0}) == C
    assert sched.on_trial_result(None, _trial(3), {"epochs": 3, "acc": 86.0, "log_rate": 2.0}) == C
    assert sched.on_trial_result(None, _trial(0), {"epochs": 3, "acc": 82.0, "log_rate": 1.0}) == S  # dominated
    # the full budget ends a trial; a result without the objectives is let through; NaN stops
    assert sched.on_trial_result(None, _trial(3), {"epochs": 9, "acc": 87.0, "log_rate": 2.0}) == S
    assert sched.on_trial_result(None, _trial(7), {"epochs": 1}) == C
    assert sched.on_trial_result(None, _trial(8), {"epochs": 1, "acc": float("nan"), "log_rate": 1.0}) == S
    assert [d[:2] for d in sched.decisions if not d[2]] == [("t1", 1), ("t2", 1), ("t4", 1), ("t5", 1), ("t0", 3)]
    assert "stopped 5" in sched.debug_string()


def test_signs_minimise_an_objective() -> None:
    sched = MOASHA(objectives=["loss"], time_attr="epochs", max_t=3, signs=[-1.0])
    assert sched.on_trial_result(None, _trial(0), {"epochs": 1, "loss": 1.0}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, _trial(1), {"epochs": 1, "loss": 2.0}) == TrialScheduler.STOP
    assert sched.on_trial_result(None, _trial(2), {"epochs": 1, "loss": 0.5}) == TrialScheduler.CONTINUE


@pytest.mark.slow
def test_ray_tune_runs_it_and_stops_trials_at_the_rungs(tmp_path) -> None:  # noqa: ANN001
    import ray
    from ray import tune

    from clipq_search.search.cluster import init_ray

    rates = list(itertools.islice(itertools.cycle([0.5, 1.5, 2.5, 3.5]), 12))

    def trainable(config: dict) -> None:
        # accuracy rises with the budget and falls with compression: a trade-off, as in a search; every
        # third plan is worse than the trade-off (dominated once a better plan is at its rung)
        log_rate = rates[config["i"]]
        for epoch in range(1, 10):
            acc = 90.0 - 3.0 * log_rate + 0.1 * epoch - (5.0 if config["i"] % 3 == 2 else 0.0)
            tune.report({"epochs": epoch, "acc": acc, "log_rate": log_rate})

    sched = MOASHA(objectives=["acc", "log_rate"], time_attr="epochs", max_t=9, grace_period=1, reduction_factor=3)
    init_ray(None, 2, 1, 0, lambda line: None)  # a private local instance, on loopback
    try:
        results = tune.Tuner(
            trainable,
            param_space={"i": tune.grid_search(list(range(12)))},
            tune_config=tune.TuneConfig(scheduler=sched, max_concurrent_trials=1),  # one order, one outcome
            run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0),
        ).fit()
    finally:
        ray.shutdown()
    reached = {r.config["i"]: int(r.metrics["epochs"]) for r in results}
    assert set(reached.values()) <= {1, 3, 9} and 0 < list(reached.values()).count(9) < 12
    assert min(reached.values()) == 1  # some stopped at the first rung
    # each trial ran exactly to where the scheduler stopped it
    stopped = [level for _, level, promoted in sched.decisions if not promoted]
    assert sorted(stopped) == sorted(v for v in reached.values() if v < 9)
    # the plans given the whole budget are spread along the trade-off, not only the least compressed
    assert len({rates[i] for i, v in reached.items() if v == 9}) >= 2
    assert all(v < 9 for i, v in reached.items() if i % 3 == 2 and i > 3)  # dominated plans stop early
