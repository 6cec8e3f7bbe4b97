"""final on several workers (Ray Train, DDP over gloo on CPUs), through the command line, on real Fashion-MNIST."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipq_search.errors import ConfigError
from clipq_search.search.final_ddp import check_workers, quantized_digest

from .conftest import REPO, SMOKE, cli, needs_fashion, wait_for_output

# 1,024 images a step: an epoch of the 58,000 training images (smoke holds 2,000 out) is 56 steps, so a run
# of a few epochs writes checkpoints within seconds.
SHORT = ["--set", "final.train.batch_size=1024", "--set", "final.train.lr=0.05"]
EPOCH = 56


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "final" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def run_dir(results_root: Path) -> Path:
    r = cli("search", str(SMOKE), "--results", str(results_root), "--name", "ddp", "--trials", "2",
            "--concurrency", "1", "--set", "trial.train.max_steps=20")
    assert r.returncode == 0, r.stderr[-2000:]
    return results_root / "ddp"


def test_the_global_batch_must_split_over_the_workers() -> None:
    check_workers(4, 128)
    with pytest.raises(ConfigError, match="does not split over 3 workers"):
        check_workers(3, 128)


def test_a_program_that_imported_ray_train_in_its_v2_mode_is_told_what_to_set() -> None:
    code = (
        "import ray.train\nfrom clipq_search.errors import ClipQError\n"
        "from clipq_search.search.final_ddp import check_train_api\n"
        "try:\n    check_train_api()\nexcept ClipQError as exc:\n    print(exc)\n"
    )

    def said(**setting: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != "RAY_TRAIN_V2_ENABLED"}
        return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, **setting}, capture_output=True,
                              text=True, timeout=300).stdout

    assert "imported ray.train (or ray.tune) in its v2 mode; set RAY_TRAIN_V2_ENABLED=0" in said()
    assert said(RAY_TRAIN_V2_ENABLED="0") == ""


def test_the_digest_is_of_the_weights_the_forward_pass_sees() -> None:
    from clipq_search.core.plan import Plan
    from clipq_search.core.surgery import attach_clipq
    from clipq_search.training.models import build_model

    torch.manual_seed(0)
    a = build_model("lenet300")
    b = build_model("lenet300")
    b.load_state_dict(a.state_dict())
    plan = Plan.from_dict({"default": {"p": 0.6, "bits": 3}})
    attach_clipq(a, plan)
    attach_clipq(b, plan)
    assert quantized_digest(a) == quantized_digest(b)
    with torch.no_grad():  # a change below the pruning threshold leaves the quantized weights as they are
        b.fc1.parametrizations.weight.original[0, 0] += 1.0
    assert quantized_digest(a) != quantized_digest(b)


@needs_fashion
@pytest.mark.slow
def test_two_workers_replace_a_killed_worker_agree_bit_for_bit_and_follow_one_worker(
    run_dir: Path, tmp_path: Path
) -> None:
    # A worker of the compressed run's group dies in the second epoch: Ray Train restarts the group from rank 0's
    # checkpoint.
    env = {"CLIPQ_TEST_KILL": "compressed-rank1@70", "CLIPQ_TEST_KILL_ONCE": str(tmp_path / "once")}
    sets = [*SHORT, "--set", "final.train.epochs=2"]
    r = cli("final", str(run_dir), "--trial", "0", "--workers", "2", *sets, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "each on 2 data-parallel workers" in r.stdout and "(2 workers)" in r.stdout
    assert (tmp_path / "once" / "compressed-rank1").exists()  # it really died
    two = _metrics(run_dir)
    assert two["workers"] == 2
    assert two["resumed_from_step"]["compressed"] == EPOCH  # from the end of epoch 1
    assert not two["resumed_from_step"].get("control")  # the control's group was never killed
    for tag in ("compressed", "control"):  # every rank ended with the same quantized weights
        digests = two["rank_digests"][tag]
        assert len(digests) == 2 and digests[0] == digests[1]
    assert not (run_dir / "final" / "ray-train").exists()  # a finished run's checkpoints are gone
    r = cli("final", str(run_dir), "--trial", "0", "--force", *sets)  # the same plan and global batch, 1 worker
    assert r.returncode == 0, r.stderr[-3000:]
    one = _metrics(run_dir)
    assert one["workers"] == 1 and "rank_digests" not in one
    for key in ("compressed_test_top1", "control_test_top1"):
        assert abs(two[key] - one[key]) <= 1.0, (key, two[key], one[key])


@needs_fashion
@pytest.mark.slow
def test_a_killed_command_is_resumed_by_the_same_command(run_dir: Path, tmp_path: Path) -> None:
    # No dense control (--no-control): the compressed run's checkpoint is what this is about.
    # The command itself is killed after an epoch: the rerun resumes from the checkpoint in the run's storage.
    log = tmp_path / "final.log"
    longer = [*SHORT, "--set", "final.train.epochs=3", "--no-control"]
    args = [sys.executable, "run_search.py", "final", str(run_dir), "--trial", "0", "--workers", "2", "--force"]
    args += longer
    with open(log, "w") as fh:
        proc = subprocess.Popen(args, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
        out = wait_for_output(log, "compressed: epoch 2/", proc, time.time() + 600)
        assert "compressed: epoch 2/" in out, out[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert list((run_dir / "final" / "ray-train").glob("compressed-*/*/checkpoint_*"))
    r = cli(*args[2:])  # the same command again
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compressed: resuming its 2-worker run" in r.stdout
    metrics = _metrics(run_dir)
    assert metrics["resumed_from_step"]["compressed"] >= 2 * EPOCH and metrics["epochs"] == 3
