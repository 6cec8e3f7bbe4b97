"""final --top K: the K trials nearest the export rule's boundary fine-tuned at full length, the rule's pick kept."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from clipq_search import load_compressed
from clipq_search.analysis.pareto import boundary_candidates, select_max_drop, select_min_rate
from clipq_search.analysis.rundir import load_trials
from clipq_search.errors import ConfigError
from clipq_search.search.final import choose_candidates
from clipq_search.search.space import load_space
from clipq_search.search.trial import dataset_spec
from clipq_search.training.data import load_dataset
from clipq_search.training.loop import evaluate
from clipq_search.training.models import build_model

from .conftest import SMOKE, cli, needs_fashion

# A front falling from 90% at 5x to 88% at 20x, one dominated trial (5) and one failed trial (6).
TRIALS = pd.DataFrame(
    {
        "number": [0, 1, 2, 3, 4, 5, 6],
        "state": ["COMPLETE"] * 6 + ["FAIL"],
        "val_top1": [90.0, 89.5, 89.1, 88.8, 88.0, 87.0, float("nan")],
        "rate": [5.0, 8.0, 10.0, 14.0, 20.0, 4.0, float("nan")],
    }
)


def test_candidates_are_the_rules_pick_then_the_trials_just_over_the_line() -> None:
    # max-drop 1 below 90%: trials 0-2 meet it (2 nearest the line), 3 and 4 miss it (3 nearest)
    near = boundary_candidates(TRIALS, 90.0, 4, max_drop=1.0)
    assert near.numbers == (2, 3, 4, 1) and near.meets == (True, False, False, True) and near.rule == "max-drop 1"
    assert near.numbers[0] == select_max_drop(TRIALS, 90.0, 1.0).trial  # the first is what export picks
    assert boundary_candidates(TRIALS, 90.0, 1).numbers == (2,)  # max-drop 1 by default
    # nothing meets the rule: the nearest beyond it first (export's closest)
    assert boundary_candidates(TRIALS, 95.0, 2, max_drop=0.5).numbers == (0, 1)
    # min-rate 10: the trials at or above it, lowest rate (most accurate) first; then the highest below it
    near = boundary_candidates(TRIALS, 90.0, 4, min_rate=10)
    assert near.numbers == (2, 3, 4, 1) and near.numbers[0] == select_min_rate(TRIALS, 10).trial
    # the front (5 trials) first, then the next front; never a failed trial
    near = boundary_candidates(TRIALS, 90.0, 10)
    assert near.numbers == (2, 3, 4, 1, 0, 5) and near.ranks[-1] == 1
    assert (near.n_front, near.n_complete) == (5, 6)
    assert boundary_candidates(TRIALS.iloc[:0], 90.0, 3).numbers == ()
    with pytest.raises(ConfigError, match="not both"):
        boundary_candidates(TRIALS, 90.0, 2, max_drop=1.0, min_rate=5.0)
    with pytest.raises(ConfigError, match="integer >= 1"):
        boundary_candidates(TRIALS, 90.0, 0)


def test_a_plan_two_trials_ran_is_one_candidate() -> None:
    # trials 3 and 5 ran the same plan (as the paper strategy can propose): one full-length run of it, and the
    # next plan out takes the freed place
    plans = TRIALS.assign(**{"p:fc1": [0.5, 0.6, 0.7, 0.8, 0.9, 0.8, 0.4], "bits:fc1": [4, 4, 3, 3, 2, 3, 4]})
    plans.loc[5, ["val_top1", "rate"]] = [88.8, 14.0]
    near = boundary_candidates(plans, 90.0, 3, max_drop=1.0)
    assert near.numbers == (2, 3, 4) and near.n_complete == 6
    assert boundary_candidates(plans, 90.0, 10).numbers == (2, 3, 4, 1, 0)  # 5 runs no second time
    from clipq_search.search.final import _candidate_lines

    near = boundary_candidates(plans, 90.0, 6)
    docs = [{"source": {"trial": n}, "metrics": plans.set_index("number").loc[n].to_dict()} for n in near.numbers]
    assert "the run's 6 complete trials ran 5 distinct plans; fine-tuning each once" in _candidate_lines(
        near, docs, 6, 90.0
    )[0]
    # the same trials as plans of their own: both duplicates are candidates
    assert 5 in boundary_candidates(plans.assign(**{"bits:fc1": [4, 4, 3, 3, 2, 4, 4]}), 90.0, 10).numbers


@pytest.fixture(scope="module")
def run_dir(results_root: Path) -> Path:
    r = cli("search", str(SMOKE), "--results", str(results_root), "--name", "final-top", "--trials", "4",
            "--concurrency", "1")  # one trial at a time: one Ray worker to start
    assert r.returncode == 0, r.stderr[-2000:]
    return results_root / "final-top"


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@needs_fashion
@pytest.mark.slow
def test_top_goes_with_a_rule_not_with_a_named_plan(run_dir: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"default": {"p": 0.5, "bits": 4}}))
    before = _tree(run_dir)
    for extra, needles in (
        (["--top", "3", "--trial", "0"], ("--top", "--trial")),
        (["--top", "2", "--config", str(plan)], ("--top", "--config")),
        (["--max-drop", "2", "--trial", "0"], ("--max-drop", "--trial")),
    ):
        r = cli("final", str(run_dir), *extra)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert all(n in r.stderr for n in needles) and "give one of them" in r.stderr
    # another split, model or baseline than the run's: refused before anything runs; where the files are may move
    for key in ("dataset.split_seed=7", "model=lenet5", "baseline.train.epochs=3"):
        r = cli("final", str(run_dir), "--set", key)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"--set changes {key.split('.')[0].split('=')[0]} of the run" in r.stderr
    from clipq_search.search.final import _check_same_data

    saved = run_dir / "space.yaml"
    _check_same_data(run_dir, load_space(saved, ["dataset.root=/data/elsewhere", "final.train.epochs=2"]),
                     load_space(saved))
    assert _tree(run_dir) == before  # nothing written


@needs_fashion
@pytest.mark.slow
def test_more_candidates_than_trials_takes_them_all(run_dir: Path) -> None:
    base = json.loads((run_dir / "baseline.json").read_text())["val_top1"]
    picks, rule, lines = choose_candidates(run_dir, 10, max_drop=1.0)
    assert len(picks) == 4 and rule == "max-drop 1"
    assert "the run has 4 complete trial(s); fine-tuning all of them" in lines[0]
    near = boundary_candidates(load_trials(run_dir), base, 10)
    assert [doc["source"]["trial"] for _, doc in picks] == list(near.numbers)


@needs_fashion
@pytest.mark.slow
def test_top_3_keeps_the_candidate_the_rule_picks_at_full_length(run_dir: Path) -> None:
    base = json.loads((run_dir / "baseline.json").read_text())["val_top1"]
    trials = load_trials(run_dir)
    # the boundary between the two least-dropped trials, so that candidates lie on both sides of it
    drops = sorted(base - trials.loc[trials["state"] == "COMPLETE", "val_top1"])
    max_drop = round(max(0.0, (drops[0] + drops[1]) / 2), 3)
    r = cli("final", str(run_dir), "--top", "3", "--max-drop", str(max_drop), "--set", "final.train.epochs=0.05")
    assert r.returncode == 0, r.stderr[-3000:]
    final = run_dir / "final"
    metrics = json.loads((final / "metrics.json").read_text())
    cands = metrics["candidates"]
    expected = boundary_candidates(trials, base, 3, max_drop=max_drop).numbers
    assert [c["trial"] for c in cands] == list(expected)
    assert "3 candidate(s) nearest the max-drop" in r.stdout
    assert all(f"trial {n}: full-length val" in r.stdout for n in expected)

    # exactly one kept, by the rule on full-length val: the highest file rate within max_drop, else the most accurate
    (kept,) = [c for c in cands if c["chosen"]]
    for c in cands:
        assert c["meets_rule"] == (base - c["val_top1"] <= max_drop + 1e-9)
    meeting = [c for c in cands if c["meets_rule"]]
    if meeting:
        assert kept["meets_rule"] and kept["rate"] == max(c["rate"] for c in meeting)
        assert "picked among 3 candidates by max-drop" in r.stdout
    else:
        assert kept["val_top1"] == max(c["val_top1"] for c in cands)
        assert "no candidate meets" in r.stdout
    assert metrics["rule_met"] == bool(meeting) and metrics["rule"] == f"max-drop {max_drop:g}"

    # model.clipq is the kept candidate's file, and the reported test accuracy is that of the model read from it
    model_file = final / "model.clipq"
    assert model_file.read_bytes() == (final / kept["file"]).read_bytes()
    assert metrics["trial"] == kept["trial"] and metrics["compressed_test_top1"] == kept["test_top1"]
    assert metrics["compressed_val_top1"] == kept["val_top1"] and metrics["file_bytes"] == model_file.stat().st_size
    assert metrics["rate"] == pytest.approx(metrics["original_bytes"] / model_file.stat().st_size)
    splits = load_dataset(dataset_spec(load_space(run_dir / "space.yaml")))
    model = build_model("lenet300")
    model.load_state_dict(load_compressed(model_file), strict=True)
    assert evaluate(model, splits.test, device="cpu")["top1"] == pytest.approx(metrics["compressed_test_top1"])
    plan = json.loads((final / "plan.json").read_text())
    assert plan["source"]["trial"] == kept["trial"]
    assert {k: v for k, v in plan.items() if k not in ("metrics", "source")} == metrics["plan"]
    assert metrics["control_test_top1"] is not None and set(metrics["resumed_from_step"]) == {"compressed", "control"}
    assert not list(final.glob("ckpt-*.pt"))

    # the report lists the candidates
    assert cli("report", str(run_dir)).returncode == 0
    html = (run_dir / "report.html").read_text()
    assert "Candidates of final --top: 3 plans" in html and "full val top-1" in html
    assert f"kept among 3 candidates by max-drop {max_drop:g}" in html
