"""GPU defects shown on a CPU: a CUDA error ends its worker, the AMP type, backend flags, mid-epoch checkpoints,
8-bit levels under bfloat16 autocast, sizing on the model's device.

The CUDA conditions are simulated: the GPU's capability is monkeypatched, the
sticky CUDA error is raised by the test hook ``CLIPQ_TEST_KILL=trialN@cuda``
inside a real Ray Tune search, and CPU autocast stands in for CUDA's bfloat16.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from torch import nn

from clipq_search.core.plan import Plan
from clipq_search.core.surgery import attach_clipq
from clipq_search.search import worker_kills as wk
from clipq_search.search.space import load_space
from clipq_search.training import loop
from clipq_search.training.data import ArrayDataset
from clipq_search.training.loop import TrainConfig, configure_device_, device_settings, train, use_channels_last
from clipq_search.training.models import build_model

from .conftest import SMOKE, cli, needs_fashion


@pytest.fixture
def restore_flags():
    """Put torch's process-wide flags back as they were (the tests set them)."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.backends.cuda.matmul.fp32_precision,
        torch.backends.cudnn.conv.fp32_precision,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        loop._settings,
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved[4], saved[5]
    if saved[6] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[6]
    loop._settings = saved[7]


def _toy(n: int = 256, channels: int = 1) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 255, (n, channels, 28, 28), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, labels, (0.2,) * channels, (0.3,) * channels)


# -- 5: bfloat16 only where the GPU computes it (compute capability 8.0 on) ----------------------------------------


def test_bfloat16_only_from_compute_capability_8(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    # torch's own test also counts emulated bfloat16 (V100, T4): it must not decide
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for capability, dtype in (((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                              ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert loop._amp_dtype(cuda) == dtype, capability
    assert loop._amp_dtype(torch.device("cpu")) is None


# -- 13: backend flags, the deterministic option, channels_last ----------------------------------------------------


def test_cuda_settings_autotune_and_tf32_unless_deterministic(restore_flags: None) -> None:
    on = configure_device_(torch.device("cuda"))
    assert on["cudnn_benchmark"] and not on["cudnn_deterministic"] and not on["deterministic"]
    assert on["matmul_fp32_precision"] == "tf32" and on["conv_fp32_precision"] == "tf32"
    det = configure_device_(torch.device("cuda"), deterministic=True)
    assert det["deterministic"] and torch.is_deterministic_algorithms_warn_only_enabled()
    assert det["cudnn_deterministic"] and not det["cudnn_benchmark"]
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == loop.CUBLAS_WORKSPACE
    # a reused worker's next trial gets its own settings, not the former trial's
    again = configure_device_(torch.device("cpu"))
    assert not again["deterministic"] and not again["cudnn_benchmark"] and not again["cudnn_deterministic"]


def test_channels_last_for_conv_nets_on_cuda_by_default(restore_flags: None) -> None:
    conv, mlp = build_model("lenet5"), build_model("lenet300")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_channels_last(conv, cuda) and not use_channels_last(conv, cpu) and not use_channels_last(mlp, cuda)
    assert not use_channels_last(conv, cuda, False) and use_channels_last(conv, cpu, True)
    configure_device_(cpu, channels_last=False)  # resources.channels_last: false
    assert not use_channels_last(conv, cuda)
    configure_device_(cpu, channels_last=True)
    assert use_channels_last(conv, cpu) and device_settings()["channels_last"] is True

    seen: list[bool] = []
    model = build_model("lenet5")
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(
        memory_format=torch.channels_last)))
    train(model, _toy(64), TrainConfig(epochs=1, batch_size=32), device="cpu", progress=False)
    assert seen == [True, True] and model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_the_space_carries_the_settings_to_the_worker(restore_flags: None) -> None:
    from clipq_search.search.trial import worker_device

    space = load_space(SMOKE)
    res = space.resources
    assert res.deterministic is False and res.channels_last is None
    assert space.final.checkpoint_minutes == 10
    space = load_space(SMOKE, ["resources.deterministic=true", "resources.channels_last=false",
                               "final.checkpoint_minutes=0.5"])
    assert worker_device(space.resources).type == "cpu"
    assert device_settings()["deterministic"] and device_settings()["channels_last"] is False
    with pytest.raises(Exception, match="deterministic"):
        load_space(SMOKE, ["resources.deterministic=3"])


def test_cuda_graphs_follow_the_space_and_only_on_cuda(restore_flags: None) -> None:
    from clipq_search.core import surgery
    from clipq_search.search.trial import worker_device

    try:
        configure_device_(torch.device("cuda"), cuda_graphs=True)
        assert surgery._cuda_graphs["on"] and device_settings()["cuda_graphs"]
        configure_device_(torch.device("cpu"), cuda_graphs=True)  # CPU layers run the compiled operator
        assert not surgery._cuda_graphs["on"]
        configure_device_(torch.device("cuda"), cuda_graphs=True)
        space = load_space(SMOKE)
        assert space.resources.cuda_graphs is False
        worker_device(space.resources)  # a reused worker's next trial: the space's setting, off
        assert not surgery._cuda_graphs["on"] and not device_settings()["cuda_graphs"]
        with pytest.raises(Exception, match="cuda_graphs"):
            load_space(SMOKE, ["resources.cuda_graphs=maybe"])
    finally:
        surgery.use_cuda_graphs(False)


# -- 15: a checkpoint inside an epoch, resumed exactly -------------------------------------------------------------


class _Stop(Exception):
    pass


def test_a_run_stopped_inside_an_epoch_resumes_from_its_mid_epoch_checkpoint(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, seed=3)  # 16 steps an epoch, 32 in all
    data = _toy(256)

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        model = build_model("lenet300")
        attach_clipq(model, Plan.from_dict({"default": {"p": 0.5, "bits": 4}}))
        return model

    whole = fresh()
    expected = train(whole, data, cfg, device="cpu", progress=False)

    ckpt = tmp_path / "run.pt"
    stopped = fresh()
    calls = [0]

    def stop_at_23(module: nn.Module, args: Any) -> None:
        calls[0] += 1
        if calls[0] == 24:  # inside step 24: steps 1..23 are done
            raise _Stop

    handle = stopped.register_forward_pre_hook(stop_at_23)
    with pytest.raises(_Stop):
        train(stopped, data, cfg, device="cpu", progress=False, checkpoint_path=ckpt, checkpoint_steps=5)
    handle.remove()
    # checkpoints at steps 5, 10, 15, the epoch's end (16), then 21: inside the second epoch
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 21 and saved["epoch_batches"] == 5 and saved["epoch_losses"].shape == (5,)

    resumed = fresh()
    result = train(resumed, data, cfg, device="cpu", progress=False, checkpoint_path=ckpt, checkpoint_steps=5)
    assert result.resumed_from_step == 21 and result.steps == 32
    # the data order went on where it stopped: the same weights, bit for bit, and the same epoch losses
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [h["train_loss"] for h in result.history] == [h["train_loss"] for h in expected.history]


def test_checkpoint_intervals_are_checked() -> None:
    model = build_model("lenet300")
    for bad in ({"checkpoint_steps": 0}, {"checkpoint_minutes": -1.0}):
        with pytest.raises(Exception, match="checkpoint_"):
            train(model, _toy(32), TrainConfig(epochs=1, batch_size=16), device="cpu", progress=False, **bad)


# -- 4: a CUDA error ends its worker; the trial runs again on a new one --------------------------------------------


def test_gpu_failures_are_told_from_trial_failures() -> None:
    from clipq_search.search.trial import device_failure

    assert device_failure(RuntimeError("CUDA error: an illegal memory access was encountered")) == "cuda"
    assert device_failure(RuntimeError("CUDA error: device-side assert triggered")) == "cuda"
    assert device_failure(RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")) == "cuda"
    assert device_failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) == "memory"
    try:
        try:
            raise RuntimeError("CUDA error: unspecified launch failure")
        except RuntimeError as inner:
            raise ValueError("while evaluating") from inner
    except ValueError as outer:
        assert device_failure(outer) == "cuda"
    assert device_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert device_failure(ValueError("bad plan")) is None
    assert wk.reason_from_text(f"DeviceFailed: {wk.GPU_ERROR}: CUDA error: ...") == wk.GPU_ERROR


def test_out_of_gpu_memory_frees_the_cache_and_tries_once_more(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipq_search.search import study

    outcomes: list[Any] = [torch.OutOfMemoryError("CUDA out of memory"), {"val_top1": 50.0}]
    freed: list[bool] = []

    def fake_trial(*args: Any, **kwargs: Any) -> Any:
        out = outcomes.pop(0)
        if isinstance(out, BaseException):
            raise out
        return out

    monkeypatch.setattr(study, "run_trial", fake_trial)
    monkeypatch.setattr(study, "free_device_memory", lambda *a: freed.append(True))
    config = {"space": {}, "plan": {}}
    assert study._run_trial_on_device(config, {}, 1, None, None) == {"val_top1": 50.0} and freed == [True]
    outcomes[:] = [torch.OutOfMemoryError("CUDA out of memory")] * 2
    with pytest.raises(torch.OutOfMemoryError):  # twice: the trainable ends the worker (DeviceFailed)
        study._run_trial_on_device(config, {}, 1, None, None)
    outcomes[:] = [ValueError("not a GPU matter")]
    with pytest.raises(ValueError):
        study._run_trial_on_device(config, {}, 1, None, None)


@pytest.mark.slow
@needs_fashion
def test_a_sticky_cuda_error_ends_the_worker_and_the_trial_runs_again(results_root: Path, tmp_path: Path) -> None:
    """Trial 0 meets a sticky CUDA error on its first attempt: a new worker runs it again and it completes."""
    proc = cli(
        "search", "smoke", "--results", str(results_root), "--name", "cudaerror", "--trials", "2", "--concurrency", "1",
        env={wk.KILL_ENV: "trial0@cuda", wk.ONCE_ENV: str(tmp_path / "once")},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"trial 0: {wk.GPU_ERROR}; running it again (retry 1 of 1)" in proc.stdout
    df = pd.read_csv(results_root / "cudaerror" / "trials.csv").set_index("number")
    assert dict(df["state"]) == {0: "COMPLETE", 1: "COMPLETE"}


# -- 12: 7- and 8-bit levels survive bfloat16 autocast ---------------------------------------------------------------


def _matmul_weights(model: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The output under CPU bfloat16 autocast, and every operand of the matrix product the weight's size."""
    from torch.utils._python_dispatch import TorchDispatchMode

    n = model[0].weight.numel()
    seen: list[torch.Tensor] = []

    class Operands(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func.overloadpacket in (torch.ops.aten.addmm, torch.ops.aten.mm, torch.ops.aten.linear):
                seen.extend(a.detach().clone() for a in args if isinstance(a, torch.Tensor) and a.numel() == n)
            return func(*args, **(kwargs or {}))

    with torch.autocast("cpu", dtype=torch.bfloat16), Operands():
        out = model(x)
    return out, seen


@pytest.mark.parametrize("bits", [7, 8])
def test_bfloat16_autocast_keeps_every_level_of_7_and_8_bit_layers(bits: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 512))
    attach_clipq(model, Plan.from_dict({"default": {"p": 0.9, "bits": bits}}))
    with torch.no_grad():
        q = model[0].weight.detach().clone()
    levels = torch.unique(q[q != 0]).numel()
    assert levels > 100
    x = torch.randn(16, 1024)
    out, operands = _matmul_weights(model, x)
    assert operands, "the layer's matrix product was not seen"
    for w in operands:  # the product sees the file's weights: every level, in float32
        assert w.dtype == torch.float32 and torch.unique(w[w != 0]).numel() == levels
    with torch.no_grad():
        assert torch.equal(out, nn.functional.linear(x, q, model[0].bias))


def test_low_bit_layers_keep_bfloat16_autocast() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64))
    attach_clipq(model, Plan.from_dict({"default": {"p": 0.5, "bits": 4}}))
    out, operands = _matmul_weights(model, torch.randn(4, 256))
    assert out.dtype == torch.bfloat16 and all(w.dtype == torch.bfloat16 for w in operands)
    # re-attached at 8 bits, the same layer leaves autocast
    attach_clipq(model, Plan.from_dict({"default": {"p": 0.5, "bits": 8}}))
    out, operands = _matmul_weights(model, torch.randn(4, 256))
    assert out.dtype == torch.float32 and all(w.dtype == torch.float32 for w in operands)


def test_a_bfloat16_model_s_8_bit_layer_runs_under_bfloat16_autocast() -> None:
    # its weights are bfloat16 already: no float32 to keep, the layer stays in autocast
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).bfloat16()
    attach_clipq(model, Plan.from_dict({"default": {"p": 0.5, "bits": 8}}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 64).bfloat16())
    assert out.dtype == torch.bfloat16


def test_an_8_bit_attention_computes_in_float32_with_its_inputs_given_by_name() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(32, 4, batch_first=True)})
    assert "attn.in_proj_weight" in attach_clipq(model, Plan.from_dict({"default": {"p": 0.5, "bits": 8}}))
    attn, x = model["attn"], torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        by_position = attn(x, x, x, need_weights=False)[0]
        by_name = attn(query=x, key=x, value=x, need_weights=False)[0]
    assert by_position.dtype == by_name.dtype == torch.float32
    assert torch.equal(by_position, by_name)


# -- 11: sizing on the model's device, with the writer's byte counts ------------------------------------------------


def _sized_models() -> list[tuple[str, nn.Module, Any]]:
    from clipq_search.core.surgery import strip_clipq

    out: list[tuple[str, nn.Module, Any]] = []
    for name, p, bits in (("lenet300", 0.9, 5), ("lenet300", 0.0, 8), ("lenet5", 0.5, 2), ("lenet5", 0.99, 3)):
        torch.manual_seed(1)
        model = build_model(name)
        attach_clipq(model, Plan.from_dict({"default": {"p": p, "bits": bits}}))
        out.append((f"{name} p={p} bits={bits}", model, None))
    # gaps longer than 2**16 and a zero tail; a layer with no non-zero at all
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(512, 300), nn.Linear(300, 10))
    with torch.no_grad():
        w = torch.zeros(300, 512)
        w.view(-1)[[3, 5, 90_000, 140_000]] = torch.tensor([0.5, -0.25, 0.5, 0.125])
        model[0].weight.copy_(w)
        model[1].weight.zero_()
    out.append(("long gaps, empty layer (plan)", model, {"default": {"p": 0.5, "bits": 3}}))
    torch.manual_seed(3)
    stripped = build_model("lenet300")
    attach_clipq(stripped, Plan.from_dict({"default": {"p": 0.7, "bits": 4}}))
    plan = strip_clipq(stripped)
    out.append(("stripped, with its plan", stripped, plan))
    torch.manual_seed(5)
    attached = build_model("lenet300")
    attach_clipq(attached, Plan.from_dict({"default": {"p": 0.7, "bits": 5}}))
    # the plan gives one attached layer fewer bits (its 31 levels are re-quantized) and another its own setting
    out.append(("attached, the plan re-sets fc1", attached, {"layers": {"fc1": {"p": 0.8, "bits": 3},
                                                                        "fc2": {"p": 0.7, "bits": 5}}}))
    torch.manual_seed(4)
    out.append(("plain model quantized by the plan", build_model("lenet300"), {"default": {"p": 0.8, "bits": 6}}))
    return out


def test_size_on_the_device_equals_the_file_writer(tmp_path: Path) -> None:
    from clipq_search.core import encoding

    for label, model, plan in _sized_models():
        device_path = encoding._estimate(model, plan)  # what estimate_size runs for a model on a GPU
        host_path = encoding._plan_file(model, plan, write=False)[0]  # the writer's own count
        assert device_path == host_path, label
        written = encoding.save_compressed(model, tmp_path / "m.clipq", plan)
        assert (tmp_path / "m.clipq").stat().st_size == device_path.total_bytes == written.total_bytes, label


def test_sizing_reads_the_device_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer's numbers come back in one read (``tolist``), not one or more per layer."""
    from clipq_search.core import encoding

    model = build_model("lenet5")
    attach_clipq(model, Plan.from_dict({"default": {"p": 0.8, "bits": 4}}))
    reads: list[str] = []
    for name in ("tolist", "item", "numpy", "__int__", "__float__", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _r=real, **k: (reads.append(_n),
                                                                                            _r(self, *a, **k))[1])
    from clipq_search.core.plan import compressible_tensors

    with torch.no_grad():
        for t in compressible_tensors(model).values():
            t.tensor()  # quantize first: only the sizing's own reads are counted
    reads.clear()
    encoding._estimate(model, None)  # what estimate_size runs for a model on a GPU
    assert reads == ["tolist"]
