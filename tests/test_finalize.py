"""export and final on real Fashion-MNIST with smoke.yaml, through the command line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipq_search import Plan, attach_clipq, load_compressed
from clipq_search.search.space import load_space
from clipq_search.search.trial import dataset_spec
from clipq_search.training.data import load_dataset
from clipq_search.training.loop import evaluate
from clipq_search.training.models import build_model

from .conftest import REPO, SMOKE, cli, needs_fashion, wait_for_output

pytestmark = [needs_fashion, pytest.mark.slow]


@pytest.fixture(scope="module")
def run_dir(results_root: Path) -> Path:
    r = cli("search", str(SMOKE), "--results", str(results_root), "--name", "final-smoke", "--trials", "4",
            "--concurrency", "1")  # one trial at a time: one Ray worker to start
    assert r.returncode == 0, r.stderr[-2000:]
    return results_root / "final-smoke"


def test_export_round_trips_and_attaches(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    r = cli("export", str(run_dir), "--max-drop", "100", "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert set(data["layers"]) == {"fc1", "fc2", "fc3"}
    assert data["source"]["trial"] in range(4) and data["metrics"]["rate"] > 1
    plan = Plan.load(out)
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert set(attach_clipq(build_model("lenet300"), plan)) == {"fc1", "fc2", "fc3"}
    # the same trial by number gives the same plan
    r = cli("export", str(run_dir), "--trial", str(data["source"]["trial"]), "--out", str(tmp_path / "again.json"))
    assert r.returncode == 0 and Plan.load(tmp_path / "again.json") == plan
    # no trial qualifies: one clear line naming the closest trial, no file
    r = cli("export", str(run_dir), "--min-rate", "100000", "--out", str(tmp_path / "none.json"))
    assert r.returncode == 2 and "closest" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "none.json").exists()
    # an earlier export is replaced; anything else is never written over: a user's file, the run's own data
    r = cli("export", str(run_dir), "--trial", str(data["source"]["trial"]), "--out", str(out))
    assert r.returncode == 0, r.stderr
    mine = tmp_path / "mine.json"
    mine.write_text('{"keep": true}')
    trials = (run_dir / "trials.csv").read_bytes()
    for target in (mine, run_dir / "trials.csv", tmp_path):
        r = cli("export", str(run_dir), "--max-drop", "100", "--out", str(target))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "--out" in r.stderr or "move that file away" in r.stderr
    assert mine.read_text() == '{"keep": true}' and (run_dir / "trials.csv").read_bytes() == trials


def test_final_writes_a_file_whose_reloaded_model_gives_the_reported_accuracy(run_dir: Path) -> None:
    import pandas as pd

    trials = pd.read_csv(run_dir / "trials.csv")
    number = int(trials.loc[trials["state"] == "COMPLETE", "number"].iloc[-1])
    r = cli("final", str(run_dir), "--trial", str(number))  # a trial's plan directly, without export
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert metrics["trial"] == number
    path = run_dir / "final" / "model.clipq"
    assert metrics["file_bytes"] == path.stat().st_size
    assert metrics["rate"] == pytest.approx(metrics["original_bytes"] / path.stat().st_size)
    for key in ("baseline_test_top1", "control_test_top1", "compressed_test_top1"):
        assert 50 < metrics[key] <= 100
    space = load_space(run_dir / "space.yaml")
    splits = load_dataset(dataset_spec(space))
    model = build_model("lenet300")
    model.load_state_dict(load_compressed(path), strict=True)
    assert evaluate(model, splits.test, device="cpu")["top1"] == pytest.approx(metrics["compressed_test_top1"])
    # the weights really are pruned-quantized with the plan's bits
    plan = Plan.from_dict(metrics["plan"])
    for name, cfg in plan.layers.items():
        w = getattr(model, name).weight
        assert torch.unique(w[w != 0]).numel() <= 2**cfg.bits - 1
    report = cli("report", str(run_dir))
    assert report.returncode == 0
    assert (
        "compressed_test_top1" in (run_dir / "report.html").read_text()
        or "Final" in (run_dir / "report.html").read_text()
    )


def test_final_resumes_from_its_checkpoint_after_a_kill(run_dir: Path, tmp_path: Path) -> None:
    # --force: final/ holds the finished final of the previous test (another training length)
    # no dense control (--no-control): the compressed run's checkpoint is what this is about
    args = [sys.executable, "run_search.py", "final", str(run_dir), "--set", "final.train.epochs=3", "--force",
            "--no-control"]
    log = tmp_path / "final.log"
    finished = {name: (run_dir / "final" / name).read_bytes() for name in ("plan.json", "model.clipq", "metrics.json")}
    with open(log, "w") as fh:
        proc = subprocess.Popen(args, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
        wait_for_output(log, "compressed: epoch 1/", proc, time.time() + 300)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    # the finished final it was replacing is as it was: its plan, file and metrics still agree
    assert {name: (run_dir / "final" / name).read_bytes() for name in finished} == finished
    (left,) = (run_dir / "final").glob("ckpt-compressed-*.pt")
    # another plan never resumes from that checkpoint, and final/plan.json says which plan it trains
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"default": {"p": 0.5, "bits": 6}}))
    r = cli("final", str(run_dir), "--config", str(other), "--set", "final.train.epochs=1", "--force", "--no-control")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "compressed: resumed" not in r.stdout
    metrics = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert metrics["resumed_from_step"]["compressed"] == 0 and metrics["plan"]["default"]["bits"] == 6
    chosen = json.loads((run_dir / "final" / "plan.json").read_text())
    assert Plan.from_dict(chosen) == Plan.from_dict(metrics["plan"]) and chosen["source"] == {"config": str(other)}
    assert left.exists()  # the interrupted plan's checkpoint is still there
    refused = cli("final", str(run_dir), "--set", "final.train.epochs=3")  # it would replace the other plan's
    assert refused.returncode == 2 and "--force" in refused.stderr, refused.stderr[-2000:]
    r = cli("final", str(run_dir), "--set", "final.train.epochs=3", "--force", "--no-control")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "compressed: resumed from its checkpoint" in r.stdout and "control" not in r.stdout
    metrics = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert metrics["control_test_top1"] is None and set(metrics["resumed_from_step"]) == {"compressed"}
    assert metrics["resumed_from_step"]["compressed"] > 0 and metrics["epochs"] == 3
    assert not left.exists() and not list((run_dir / "final").glob("ckpt-*.pt"))
