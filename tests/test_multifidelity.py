"""Multi-fidelity search (``trial.rungs``, MO-ASHA): rung by rung training, promotion, checkpoints, resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch

from clipq_search.search.rungs import make_scheduler
from clipq_search.search.space import load_space
from clipq_search.search.study import interrupted_numbers
from clipq_search.search.trial import (
    RungState,
    dataset_spec,
    model_for,
    run_trial,
    segment_config,
    splits_info,
    state_to_bytes,
    train_config,
    trial_budgets,
)
from clipq_search.training.data import load_dataset

from .conftest import REPO, cli, needs_fashion, wait_for_output

RUNGS = ["--set", "trial.rungs=[1, 3, 9]"]


def test_the_segments_of_a_trial_add_up_to_its_budgets_each_with_its_own_order() -> None:
    space = load_space("smoke", ["trial.rungs=[1, 3, 9]", "trial.train.epochs=0.5", "trial.train.max_steps=10"])
    cfg = train_config(space, "trial")
    assert trial_budgets(space) == [0.5, 1.5, 4.5]
    segments = [segment_config(cfg, space.trial.rungs, k) for k in range(3)]
    assert [s.epochs for s in segments] == [0.5, 1.0, 3.0]
    assert [s.max_steps for s in segments] == [10, 20, 60]
    assert len({s.seed for s in segments}) == 3
    assert all(s.lr == cfg.lr and s.schedule == cfg.schedule for s in segments)
    # without rungs a trial is one segment: its config as it is
    plain = load_space("smoke")
    assert segment_config(train_config(plain, "trial"), None, 0) == train_config(plain, "trial")
    assert trial_budgets(plain) == [train_config(plain, "trial").epochs]


def test_rungs_are_checked_and_count_in_the_runs_fingerprint_only_when_set() -> None:
    from clipq_search.errors import ConfigError

    for bad in ("[3, 1]", "[0, 1]", "[]", "[1, .inf]", "three"):
        with pytest.raises(ConfigError, match="trial.rungs"):
            load_space("smoke", [f"trial.rungs={bad}"])
    with pytest.raises(ConfigError, match="reduction_factor"):
        load_space("smoke", ["trial.reduction_factor=1"])
    plain = load_space("smoke")
    assert plain.fingerprint("trial") == load_space("smoke", ["trial.reduction_factor=2"]).fingerprint("trial")
    assert plain.fingerprint("trial") != load_space("smoke", ["trial.rungs=[1, 3]"]).fingerprint("trial")


@pytest.fixture
def keep_threads():
    """run_trial sets torch's thread count for its process: give later tests the count they had."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@needs_fashion
def test_a_trial_reports_each_rung_and_resumes_after_one_exactly(keep_threads) -> None:
    """Rung by rung: a report (with the model) after each rung but the last; resumed from a rung, the same end."""
    space = load_space("smoke", ["trial.rungs=[1, 2, 3]", "trial.train.max_steps=6"])
    splits = load_dataset(dataset_spec(space))
    info = splits_info(splits)
    torch.manual_seed(0)
    payload = {
        "baseline": state_to_bytes(model_for(space, info)),
        "train": splits.train.to_state(),
        "val": splits.val.to_state(),
        "info": info,
    }
    plan = {"layers": {"fc1": {"p": 0.8, "bits": 3}, "fc2": {"p": 0.7, "bits": 4}, "fc3": {"p": 0.3, "bits": 5}}}
    reports: list[tuple[dict, dict]] = []

    def report(record: dict, model: torch.nn.Module) -> None:
        reports.append((dict(record), {k: v.clone() for k, v in model.state_dict().items()}))

    whole = run_trial(space, plan, payload, threads=1, report=report)
    assert [r["rung"] for r, _ in reports] == [0, 1]
    assert whole["rung"] == 2 and whole["budget"] == trial_budgets(space)[2]
    assert [h["rung"] for h in whole["rungs"]] == [0, 1, 2]
    assert [h["budget"] for h in whole["rungs"]] == trial_budgets(space)
    # training goes on between rungs (the weights move)
    first, second = reports[0][1], reports[1][1]
    assert any(not torch.equal(first[k], second[k]) for k in first if first[k].is_floating_point())

    record0, state0 = reports[0]
    later: list[dict] = []
    resumed = run_trial(
        space, plan, payload, threads=1, report=lambda r, m: later.append(r), resume=RungState(0, state0, record0)
    )
    assert [r["rung"] for r in later] == [1]
    assert resumed["val_top1"] == whole["val_top1"] and resumed["rate"] == whole["rate"]
    assert resumed["rungs"] == whole["rungs"]


def test_the_scheduler_of_a_resumed_run_knows_the_rungs_of_its_finished_trials() -> None:
    space = load_space("smoke", ["trial.rungs=[1, 3]"])
    assert make_scheduler(load_space("smoke"), []) is None

    class Done:
        def __init__(self, number: int, rungs: list[dict]) -> None:
            self.number, self.user_attrs = number, {"rungs": rungs}

    budgets = trial_budgets(space)
    finished = [
        Done(0, [{"rung": 0, "budget": budgets[0], "val_top1": 80.0, "rate": 10.0}]),
        Done(1, [{"rung": 0, "budget": budgets[0], "val_top1": 85.0, "rate": 20.0},
                 {"rung": 1, "budget": budgets[1], "val_top1": 86.0, "rate": 20.0}]),
    ]
    scheduler = make_scheduler(space, finished)
    assert set(scheduler.rungs[budgets[0]]) == {"study-0", "study-1"}
    assert set(scheduler.rungs[budgets[1]]) == {"study-1"}
    assert scheduler.decisions == []  # loaded, not decided
    # a new trial dominated by both at the first rung is stopped there (1 of 3 go on)
    assert scheduler.record("new", budgets[0], [79.0, math.log10(5.0)]) is False
    # Tune's trials are keyed by their study trial: study trial 1, run again under a new Tune id (a kill ended
    # Tuner.fit) and reporting its checkpoint's rung again, goes on and is no second copy of itself
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    again = SimpleNamespace(trial_id="tune-9", config={"number": 1})
    result = {"budget": budgets[0], "val_top1": 85.0, "log10_rate": math.log10(20.0)}
    assert scheduler.on_trial_result(None, again, result) == TrialScheduler.CONTINUE
    assert set(scheduler.rungs[budgets[0]]) == {"study-0", "study-1", "new"}


def test_trials_interrupted_or_run_again_go_on_from_their_newest_checkpoint() -> None:
    """A retry interrupted before its next rung keeps the checkpoint it was to resume from; a trial Tune runs
    again after a kill goes on from its own newest one, and its older ones are removed once it is done."""
    from clipq_search.search.rungs import CHECKPOINT_ATTR, RESUME_ATTR
    from clipq_search.search.searcher import StudySearcher
    from clipq_search.search.study import check_space, distributions, recover_interrupted
    from clipq_search.search.worker_kills import KillLedger

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space("smoke", ["trial.rungs=[1, 3]"])
    units = check_space(space)
    dists = distributions(units)
    study = optuna.create_study(directions=["maximize", "maximize"])
    first = study.ask(dists)
    first.set_user_attr(CHECKPOINT_ATTR, "/ckpt/first-rung0")
    recover_interrupted(study, lambda m: None)  # a second command
    retry = study.ask(dists)
    assert retry.user_attrs[RESUME_ATTR] == "/ckpt/first-rung0"
    recover_interrupted(study, lambda m: None)  # interrupted again before its next rung: a third command
    again = study.ask(dists)
    assert again.user_attrs == {RESUME_ATTR: "/ckpt/first-rung0", "retry_of": retry.number}

    searcher = StudySearcher(study, units, dists, space, to_run=1, on_done=lambda t: None, baseline=None,
                             threads=1, kills=KillLedger(1, 1, "", lambda m: None))
    config = searcher._hand("tune-1", again, searcher.prepare(again))
    assert config["resume"] == "/ckpt/first-rung0"
    searcher.checkpoint_saved("tune-1", "/ckpt/again-rung1")  # no proposer yet: recorded in the study at once
    searcher.release("tune-1")  # a kill ended Tuner.fit under it
    config = searcher._hand("tune-2", again, searcher.prepare(again))
    assert config["resume"] == "/ckpt/again-rung1"
    assert searcher.checkpoints["tune-2"] == ["/ckpt/first-rung0", "/ckpt/again-rung1"]  # removed when it is done


def _search(results: Path, name: str, *extra: str, trials: int = 8) -> list[str]:
    return [
        sys.executable, "run_search.py", "search", "smoke", "--results", str(results), "--name", name,
        "--trials", str(trials), "--concurrency", "2", *RUNGS, *extra,
    ]


@needs_fashion
@pytest.mark.slow
def test_a_multi_fidelity_search_promotes_a_third_and_reports_each_plan_at_its_highest_budget(
    results_root: Path,
) -> None:
    name = "mf-search"
    done = cli(*_search(results_root, name)[2:])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "multi-fidelity: MO-ASHA rungs at 0.1, 0.3, 0.9 epochs, reduction factor 3" in done.stdout
    run_dir = results_root / name
    df = pd.read_csv(run_dir / "trials.csv")
    assert (df["state"] == "COMPLETE").all()
    assert (df["cpu_seconds"] > 0).all()  # each trial's compute, for equal-compute comparisons
    budgets = sorted(df["budget"].unique())
    assert budgets[0] == pytest.approx(0.1) and budgets[-1] == pytest.approx(0.9)  # some stopped, some went on
    stopped = df[df["rung"] == 0]
    assert 0 < len(stopped) < len(df)
    # each row is the plan's result at its highest budget, with every rung it passed in the study
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'study.db'}")
    for t in study.trials:
        rungs = t.user_attrs["rungs"]
        assert [r["rung"] for r in rungs] == list(range(t.user_attrs["rung"] + 1))
        assert rungs[-1]["val_top1"] == t.user_attrs["val_top1"] == t.values[0]
        assert t.values[1] == pytest.approx(math.log10(rungs[-1]["rate"]))
        # and as intermediate values (step: the rung), which optuna-dashboard draws as learning curves
        assert t.intermediate_values == {r["rung"]: r["val_top1"] for r in rungs}
    promoted_lines = [line for line in done.stdout.splitlines() if ": promoted" in line]
    assert len(promoted_lines) == sum(len(t.user_attrs["rungs"]) - 1 for t in study.trials)
    assert "(stopped at rung 0)" in done.stdout and "(full budget)" in done.stdout
    # the finished trials' rung checkpoints are gone
    assert not list((run_dir / "ray").rglob("rung.json"))
    # the report shows the rungs and each plan's budget
    report = cli("report", str(run_dir))
    assert report.returncode == 0, report.stderr[-2000:]
    html = (run_dir / "report.html").read_text()
    assert "Rungs</h2>" in html and "promoted" in html and "Plans promoted past the first rung" in html
    assert json.loads((run_dir / "run.json").read_text())["rungs"] == [1, 3, 9]  # the report's last rung
    assert "budget" in pd.read_csv(run_dir / "pareto.csv").columns
    # export names the budget of the chosen result
    out = results_root / "mf-plan.json"
    export = cli("export", str(run_dir), "--out", str(out))
    assert export.returncode == 0, export.stderr[-2000:]
    chosen = json.loads(out.read_text())
    row = df[df["number"] == chosen["source"]["trial"]].iloc[0]
    assert chosen["metrics"]["budget"] == pytest.approx(row["budget"])
    assert f"(after {row['budget']:.3g} epochs)" in export.stdout


@needs_fashion
@pytest.mark.slow
def test_a_search_killed_after_a_rung_resumes_each_trial_from_its_checkpoint(results_root: Path) -> None:
    """SIGKILL once a trial has a rung checkpoint; the same command goes on from that rung, not from the start."""
    name = "mf-kill"
    # slower trials, so that the kill lands while a promoted trial trains its next rung
    cmd = _search(results_root, name, "--set", "trial.train.epochs=0.3", trials=4)
    run_dir = results_root / name
    log = results_root / f"{name}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        out = wait_for_output(log, ": promoted", proc, deadline)
        assert ": promoted" in out, out[-3000:]
        # the study has the path of the promoted trial's checkpoint before it is killed
        storage = f"sqlite:///{run_dir / 'study.db'}"
        while time.time() < deadline:
            trials = optuna.load_study(study_name=name, storage=storage).trials
            running = [t for t in trials if t.user_attrs.get("checkpoint")]
            if running and not running[0].state.is_finished():
                break
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    killed = running[0]
    rung = json.loads(Path(killed.user_attrs["checkpoint"], "rung.json").read_text())["rung"]

    again = cli(*cmd[2:])  # the same command again
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from its checkpoint at rung {rung}" in again.stdout
    study = optuna.load_study(study_name=name, storage=storage)
    assert killed.number in interrupted_numbers(study)
    retry = next(t for t in study.trials if t.user_attrs.get("retry_of") == killed.number)
    assert retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.user_attrs["resume_from"] == killed.user_attrs["checkpoint"]
    # its rungs continue the killed trial's: the rungs before the checkpoint are the same results
    before = killed.user_attrs["rungs"][: rung + 1]
    assert retry.user_attrs["rungs"][: len(before)] == before
    finished = [t for t in study.trials if t.state.is_finished() and t.number not in interrupted_numbers(study)]
    assert len(finished) == 4
    assert not Path(killed.user_attrs["checkpoint"]).exists()  # used, then removed


@needs_fashion
@pytest.mark.slow
def test_a_worker_killed_in_a_later_rung_runs_again_from_its_last_rung(results_root: Path, tmp_path: Path) -> None:
    """Trial 0 (always promoted: the first at its rung) dies 40 steps into its second rung; Tune runs it again
    from its rung-0 checkpoint, and it finishes its rungs."""
    from clipq_search.search import worker_kills as wk

    name = "mf-worker-kill"
    # smoke: 0.1 epoch = 43 steps a rung; the kill counts the trial's steps since its (re)start
    hook = {wk.KILL_ENV: "trial0@83", wk.ONCE_ENV: str(tmp_path / "once")}
    done = cli(*_search(results_root, name, trials=3)[2:], env=hook)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert f"trial 0: {wk.PROCESS}; running it again (retry 1 of 1)" in done.stdout, done.stdout
    assert "trial 0: rung 0 (0.1 epochs)" in done.stdout
    assert "promoted (resumed from its checkpoint at rung 0)" in done.stdout, done.stdout
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{results_root / name / 'study.db'}")
    trial0 = study.trials[0]
    assert trial0.state == optuna.trial.TrialState.COMPLETE
    assert [r["rung"] for r in trial0.user_attrs["rungs"]][:2] == [0, 1]
