"""Where work runs: the device is resolved on each Ray worker, every stage asks Ray for the trials' GPUs.

No GPU is needed: Ray is started with GPUs it is told of (its resources are
counts), so tasks are scheduled and given GPU ids as on a GPU node, while
torch on this machine has no CUDA.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from clipq_search.errors import ClipQError, ConfigError
from clipq_search.search.space import load_space
from clipq_search.search.trial import check_device, check_space, worker_device

from .conftest import SMOKE, needs_fashion, private_ray


@pytest.fixture(scope="module")
def fake_gpu_ray():
    """A local Ray instance that believes it has 2 GPUs, for the module's tests."""
    # address "local": a new instance even where another test process left a cluster as the latest one
    ray = private_ray(num_cpus=2, num_gpus=2)
    yield ray
    ray.shutdown()


def _device_in_task(ray: Any, name: str, gpus: float, cuda_present: bool) -> str:
    @ray.remote(num_cpus=0.5, num_gpus=gpus, max_retries=0)
    def where() -> str:
        if cuda_present:  # as on a GPU node: torch there sees every GPU of the node
            torch.cuda.is_available = lambda: True
        try:
            return str(worker_device(name))
        except ClipQError as exc:
            return f"error: {exc}"

    return ray.get(where.remote())


@pytest.mark.slow
def test_auto_is_resolved_from_the_gpus_ray_gave_the_worker(fake_gpu_ray: Any) -> None:
    ray = fake_gpu_ray
    # a worker given no GPU computes on the CPU even where CUDA is visible to it (else every one lands on GPU 0)
    assert _device_in_task(ray, "auto", 0, cuda_present=True) == "cpu"
    assert _device_in_task(ray, "auto", 0.5, cuda_present=True) == "cuda"
    assert _device_in_task(ray, "auto", 0.5, cuda_present=False) == "cpu"
    assert _device_in_task(ray, "cpu", 0.5, cuda_present=True) == "cpu"
    said = _device_in_task(ray, "cuda", 0, cuda_present=True)
    assert said.startswith("error:") and "gpus_per_trial" in said
    # the driver is no Ray worker: auto there is plain CUDA-if-present
    assert worker_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@needs_fashion
def test_a_driver_without_a_gpu_accepts_a_cuda_space() -> None:
    space = load_space(SMOKE, ["resources.device=cuda", "resources.gpus_per_trial=0.25"])
    assert [u.key for u in check_space(space)] == ["fc1", "fc2", "fc3"]  # the workers check the device


def test_device_names_the_workers_cannot_use_are_refused() -> None:
    def refused(device: str, gpus: float) -> str:
        with pytest.raises(ConfigError) as info:
            check_device(device, gpus)
        return str(info.value)

    assert "gpus_per_trial above 0" in refused("cuda", 0)
    assert "use cuda" in refused("cuda:1", 1)
    assert "not a device" in refused("gpu0", 1)
    for ok in ("auto", "cpu", "cuda", "cuda:0", None):
        check_device(ok, 1)


@needs_fashion
@pytest.mark.slow
def test_every_stage_asks_ray_for_the_trials_gpus(
    fake_gpu_ray: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Baseline, paper strategy, final runs and the final evaluation run as Ray tasks with gpus_per_trial."""
    from clipq_search.search.final import run_final
    from clipq_search.search.study import run_search

    ray = fake_gpu_ray
    asked: list[dict[str, Any]] = []
    real_remote = ray.remote

    def recording_remote(*args: Any, **kwargs: Any) -> Any:
        if kwargs:
            asked.append(kwargs)
        return real_remote(*args, **kwargs)

    monkeypatch.setattr(ray, "remote", recording_remote)
    overrides = [
        "resources.gpus_per_trial=0.5", "resources.cpus_per_trial=1", "baseline.train.epochs=0.05",
        "trial.train.max_steps=3", "final.train.max_steps=3", "search.paper.lambdas=[10]",
        "search.paper.evals_per_layer=2", "search.paper.subset=50", "search.concurrency=1",
    ]
    space = load_space(SMOKE, overrides)
    logs: list[str] = []
    run_search(space, results_root=tmp_path, name="gpus", trials=2, sampler="paper", address="auto", log=logs.append)
    metrics = run_final(tmp_path / "gpus", trial=0, address="auto", log=logs.append)
    gpus = [a["num_gpus"] for a in asked if "num_gpus" in a]
    # baseline, 3 paper layers, final compressed and control (one function), final evaluation
    assert len(gpus) >= 4 and set(gpus) == {0.5}, asked
    assert json.loads((tmp_path / "gpus" / "final" / "metrics.json").read_text()) == metrics
    assert metrics["compressed_test_top1"] > 10
