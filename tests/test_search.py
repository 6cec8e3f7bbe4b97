"""End-to-end searches on real Fashion-MNIST with search_spaces/smoke.yaml."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest

from clipq_search.core.plan import Plan
from clipq_search.errors import ClipQError
from clipq_search.search.space import load_space
from clipq_search.search.study import run_search

from .conftest import SMOKE, needs_fashion

pytestmark = [needs_fashion, pytest.mark.slow]


def _search(results_root: Path, name: str, logs: list[str], **kw):
    space = load_space(SMOKE, kw.pop("overrides", []))
    return run_search(space, results_root=results_root, name=name, log=logs.append, **kw)


def _study(run_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=run_dir.name, storage=f"sqlite:///{run_dir / 'study.db'}")


def test_search_concurrency_2_writes_run_files_and_resumes(results_root: Path) -> None:
    logs: list[str] = []
    summary = _search(results_root, "conc2", logs, trials=4, concurrency=2)
    run_dir = results_root / "conc2"
    assert summary.finished == 4 and summary.complete == 4
    for f in ("space.yaml", "baseline.json", "run.json", "study.db", "trials.csv"):
        assert (run_dir / f).is_file(), f
    df = pd.read_csv(run_dir / "trials.csv")
    assert len(df) == 4 and set(df["state"]) == {"COMPLETE"}
    for layer in ("fc1", "fc2", "fc3"):
        assert df[f"p:{layer}"].between(0.3, 0.95).all() and df[f"bits:{layer}"].between(2, 6).all()
        assert df[f"kept:{layer}"].between(0, 1).all()
    assert (df["rate"] > 1).all() and df["val_top1"].between(10, 100).all()
    # queue time: from the proposal to the start on a worker, a fraction of the whole trial's span
    span = (pd.to_datetime(df["datetime_complete"]) - pd.to_datetime(df["datetime_start"])).dt.total_seconds()
    assert (df["queue_seconds"] >= 0).all() and (df["queue_seconds"] < span).all()
    assert (df["queue_seconds"] + df["trial_seconds"] <= span + 1.0).all()
    # two trials really ran at the same time
    start = pd.to_datetime(df["datetime_start"])
    end = pd.to_datetime(df["datetime_complete"])
    overlaps = sum(1 for i in range(4) for j in range(i + 1, 4) if start[i] < end[j] and start[j] < end[i])
    assert overlaps >= 1
    assert sum("trial" in line and "val" in line and "rate" in line for line in logs) == 4
    # one budget per trial: no rung lines, every result at the trial's epochs
    assert not [line for line in logs if "promoted" in line or "MO-ASHA" in line]
    assert (df["budget"] == 0.1).all() and (df["rung"] == 0).all() and df["rung_results"].isna().all()

    # resume to a larger total: nothing lost, nothing run twice
    _search(results_root, "conc2", logs, trials=6, concurrency=2)
    study = _study(run_dir)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 6
    assert len({t.number for t in finished}) == 6
    df = pd.read_csv(run_dir / "trials.csv")
    assert len(df) == 6 and list(df["number"]) == sorted(t.number for t in study.trials)
    # the same command again runs nothing
    logs.clear()
    _search(results_root, "conc2", logs, trials=6)
    assert any("6 of 6 trials finished; 0 to run" in line for line in logs)
    assert len(_study(run_dir).trials) == 6
    # a different space never continues this run: its trials would not be comparable
    before = {f: (run_dir / f).read_bytes() for f in ("space.yaml", "run.json", "trials.csv")}
    for overrides in (["layers.default.bits=[2,8]"], ["trial.train.epochs=0.5"], ["baseline.train.epochs=7"]):
        with pytest.raises(ClipQError, match=r"holds a search of a different space \((layers|trial|baseline)"):
            _search(results_root, "conc2", logs, trials=8, overrides=overrides)
    assert {f: (run_dir / f).read_bytes() for f in before} == before
    assert len(_study(run_dir).trials) == 6


def test_failing_trial_is_recorded_and_search_goes_on(results_root: Path) -> None:
    logs: list[str] = []
    summary = _search(results_root, "failing", logs, trials=3, concurrency=1, inject_failure=[1])
    assert summary.finished == 3 and summary.failed == 1 and summary.complete == 2
    df = pd.read_csv(results_root / "failing" / "trials.csv")
    failed = df[df["state"] == "FAIL"]
    assert list(failed["number"]) == [1] and "injected failure" in failed["error"].iloc[0]
    assert any("FAILED" in line for line in logs)


def test_paper_strategy_produces_valid_plans(results_root: Path) -> None:
    logs: list[str] = []
    summary = _search(results_root, "paper", logs, trials=3, concurrency=2, sampler="paper")
    assert summary.finished == 3
    study = _study(results_root / "paper")
    paper = [t for t in study.trials if t.user_attrs.get("source") == "paper"]
    assert {t.user_attrs["lambda"] for t in paper} == {1.0, 10.0}
    for t in paper:
        plan = Plan.from_dict({"layers": t.user_attrs["layers"]})
        assert set(plan.layers) == {"fc1", "fc2", "fc3"}
    # a larger lambda values compression more: it never gives a less compressed plan
    by_lam = {t.user_attrs["lambda"]: t for t in paper if t.state == optuna.trial.TrialState.COMPLETE}
    if len(by_lam) == 2:
        assert by_lam[10.0].user_attrs["rate"] >= by_lam[1.0].user_attrs["rate"] * 0.8


def test_recovered_interrupted_trials_keep_their_source() -> None:
    """A paper-procedure plan cut off mid-trial is re-queued with its label and lambda; others stay sampler plans."""
    from clipq_search.search.study import interrupted_numbers, recover_interrupted, trials_frame

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "maximize"])
    dist = {"fc1.p": optuna.distributions.FloatDistribution(0.0, 0.99)}
    study.enqueue_trial({"fc1.p": 0.9}, user_attrs={"source": "paper", "lambda": 0.5})
    paper = study.ask(dist)
    plain = study.ask(dist)
    logs: list[str] = []
    assert recover_interrupted(study, logs.append) == 2
    assert "recovered 2 interrupted trial(s)" in logs[0]
    old = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert interrupted_numbers(study) == {paper.number, plain.number}
    assert old[paper.number].state == old[plain.number].state == optuna.trial.TrialState.FAIL
    rows = trials_frame(study).set_index("number")
    assert rows.loc[paper.number, "state"] == "INTERRUPTED" and "re-queued" in rows.loc[plain.number, "error"]
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    by_retry = {t.user_attrs["retry_of"]: t for t in waiting}
    assert by_retry[paper.number].user_attrs["source"] == "paper"
    assert by_retry[paper.number].user_attrs["lambda"] == 0.5
    assert by_retry[paper.number].system_attrs["fixed_params"] == {"fc1.p": 0.9}
    assert "source" not in by_retry[plain.number].user_attrs
