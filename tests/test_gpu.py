"""On a CUDA GPU: data and order stay on the device, evaluation under autocast, trials packed on one GPU.

Marked ``gpu`` and skipped without CUDA; ``benchmarks/gpu_check.py`` runs them on a GPU machine.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from clipq_search.core.plan import Plan
from clipq_search.core.surgery import attach_clipq
from clipq_search.training.data import ArrayDataset
from clipq_search.training.loop import TrainConfig, evaluate, train
from clipq_search.training.models import build_model

from .conftest import private_ray

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _toy(n: int = 256, device: str = "cuda") -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 255, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, labels, (0.2,), (0.3,)).to(device)


def test_the_shuffled_order_is_copied_to_the_gpu_once_per_pass() -> None:
    from torch.overrides import TorchFunctionMode

    copies: list[int] = []

    class CountCopies(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func is torch.Tensor.to and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.int64:
                if args[0].device.type == "cpu" and isinstance(out, torch.Tensor) and out.device.type == "cuda":
                    copies.append(args[0].numel())
            return out

    data = _toy()
    with CountCopies():
        n = sum(1 for _ in data.batches(32, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert n == 8 and copies == [256]


def test_evaluation_runs_under_autocast_and_inference_mode_on_cuda() -> None:
    seen: list[tuple[bool, bool]] = []
    model = build_model("lenet300")
    attach_clipq(model, Plan.from_dict({"default": {"p": 0.5, "bits": 4}}))

    def record(module: nn.Module, args: Any) -> None:
        seen.append((torch.is_autocast_enabled("cuda"), torch.is_inference_mode_enabled()))

    model.register_forward_pre_hook(record)
    out = evaluate(model, _toy(), device="cuda", batch_size=64)
    assert out["n"] == 256 and seen == [(True, True)] * 4
    seen.clear()
    result = train(model, _toy(), TrainConfig(epochs=1, batch_size=64), device="cuda", progress=False)
    assert result.steps == 4 and seen == [(True, False)] * 4  # training after an inference-mode evaluation


def test_a_clipq_step_of_resnet18_with_amp_and_channels_last() -> None:
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(num_classes=10).cuda().to(memory_format=torch.channels_last)
    attach_clipq(model, Plan.from_dict({"default": {"p": 0.9, "bits": 4}}))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(8, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    w = model.layer1[0].conv1.weight
    assert w.is_cuda and torch.unique(w[w != 0]).numel() <= 15


def test_four_trials_share_one_gpu_and_each_computes_on_it() -> None:
    import ray

    from clipq_search.search.trial import worker_device

    private_ray(num_cpus=4)
    try:
        @ray.remote(num_cpus=1, num_gpus=0.25)
        def packed() -> str:
            return str(worker_device("auto"))

        @ray.remote(num_cpus=1, num_gpus=0)
        def without() -> str:
            return str(worker_device("auto"))

        assert ray.get([packed.remote() for _ in range(4)]) == ["cuda"] * 4
        assert ray.get(without.remote()) == "cpu"  # a worker given no GPU stays off the node's GPUs
    finally:
        ray.shutdown()
