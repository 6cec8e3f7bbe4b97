"""Distillation from the dense baseline through the command line: trials and the final run, on smoke.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from .conftest import SMOKE, cli, needs_fashion

pytestmark = [needs_fashion, pytest.mark.slow]


def test_trials_and_the_final_run_learn_from_the_dense_teacher(results_root: Path) -> None:
    common = ["--results", str(results_root), "--trials", "1", "--seed", "3", "--set", "trial.train.epochs=0.2"]
    plain = cli("search", str(SMOKE), "--name", "kd-off", *common)
    assert plain.returncode == 0, plain.stderr[-2000:]
    taught = cli("search", str(SMOKE), "--name", "kd-on", *common, "--set", "trial.train.distill.weight=0.7")
    assert taught.returncode == 0, taught.stderr[-2000:]
    off = pd.read_csv(results_root / "kd-off" / "trials.csv").iloc[0]
    on = pd.read_csv(results_root / "kd-on" / "trials.csv").iloc[0]
    layer_cols = [c for c in off.index if c.startswith("param:")]
    assert layer_cols and (off[layer_cols] == on[layer_cols]).all()  # the same plan (same seed, same sampler)
    assert off["val_loss"] != on["val_loss"]  # trained otherwise: with the teacher's outputs in the loss
    assert "distill" in (results_root / "kd-on" / "space.yaml").read_text()

    # the final run: the compressed model distils, the dense control does not; the file is measured as always
    final = cli("final", str(results_root / "kd-on"), "--trial", "0", "--set", "final.train.distill.weight=0.5",
                 "--set", "final.train.epochs=0.2")
    assert final.returncode == 0, final.stderr[-2000:]
    metrics = json.loads((results_root / "kd-on" / "final" / "metrics.json").read_text())
    assert metrics["compressed_test_top1"] > 50 and metrics["rate"] > 1 and metrics["epochs"] == 0.2


def test_the_baseline_cannot_distil(results_root: Path) -> None:
    r = cli("search", str(SMOKE), "--results", str(results_root), "--name", "kd-bad",
             "--set", "baseline.train.distill.weight=0.5")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "baseline.train.distill.weight=0.5 is invalid: the dense baseline is the teacher" in r.stderr
    assert not (results_root / "kd-bad").exists()
