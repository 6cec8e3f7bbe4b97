from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from clipq_search.errors import ClipQError, ConfigError
from clipq_search.training.data import DEFAULT_ROOTS, ArrayDataset, DatasetSpec, load_dataset
from clipq_search.training.loop import (
    DEFAULT_PRETRAIN,
    TrainConfig,
    TrainingDiverged,
    configure_threads,
    evaluate,
    load_state_dict_file,
    lr_at,
    save_state_dict,
    select_device,
    train,
)
from clipq_search.training.models import build_model

FASHION = Path(os.environ.get("CLIPQ_FASHION_MNIST", DEFAULT_ROOTS["fashion-mnist"]))
HAVE_FASHION = any((FASHION / f).is_file() for f in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"))
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason=f"Fashion-MNIST not installed in {FASHION}")


def synthetic(n: int = 256, classes: int = 10, seed: int = 0) -> ArrayDataset:
    """Learnable toy data: the class sets the brightness of one image row."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    images = torch.randint(0, 60, (n, 1, 28, 28), generator=g, dtype=torch.int64)
    images[torch.arange(n), 0, labels * 2] += 180
    return ArrayDataset(images.to(torch.uint8), labels, (0.2,), (0.3,))


@pytest.fixture(scope="module")
def fashion_subset() -> tuple[ArrayDataset, ArrayDataset]:
    if not HAVE_FASHION:
        pytest.skip(f"Fashion-MNIST not installed in {FASHION}")
    splits = load_dataset(DatasetSpec("fashion-mnist", root=str(FASHION)))
    return splits.train.subset(torch.arange(3000)), splits.val.subset(torch.arange(1000))


# --------------------------------------------------------------------------- config


def test_config_validation_names_field() -> None:
    with pytest.raises(ConfigError, match=r"TrainConfig\.epochs=0 .*> 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match=r"TrainConfig\.schedule='linear'.*cosine \| step \| constant"):
        TrainConfig(epochs=1, schedule="linear")
    with pytest.raises(ConfigError, match="step_epochs is required"):
        TrainConfig(epochs=1, schedule="step")
    with pytest.raises(ConfigError, match="momentum"):
        TrainConfig(epochs=1, momentum=1.5)
    with pytest.raises(ConfigError, match="nesterov"):
        TrainConfig(epochs=1, momentum=0.0)
    with pytest.raises(ConfigError, match="max_steps"):
        TrainConfig(epochs=1, max_steps=0)
    cfg = TrainConfig(epochs=0.5, batch_size=32)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"epochs": 1, "lrr": 0.1})


def test_total_steps_and_schedules() -> None:
    assert TrainConfig(epochs=0.5).total_steps(10) == 5
    assert TrainConfig(epochs=0.25).total_steps(10) == 3
    assert TrainConfig(epochs=3, max_steps=7).total_steps(10) == 7
    cos = TrainConfig(epochs=1, lr=0.1)
    assert lr_at(cos, 0, 100, 100) == pytest.approx(0.1)
    assert lr_at(cos, 50, 100, 100) == pytest.approx(0.05)
    assert lr_at(cos, 99, 100, 100) < 1e-3
    step = TrainConfig(epochs=3, lr=0.1, schedule="step", step_epochs=1, gamma=0.5)
    assert [lr_at(step, s, 30, 10) for s in (0, 9, 10, 25)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    assert lr_at(TrainConfig(epochs=1, schedule="constant"), 5, 10, 10) == 0.05


def test_default_pretrain_covers_lenets() -> None:
    assert {"lenet300", "lenet5"} <= set(DEFAULT_PRETRAIN)
    assert all(isinstance(c, TrainConfig) for c in DEFAULT_PRETRAIN.values())


def test_select_device_and_threads() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type in {"cpu", "cuda"}
    if not torch.cuda.is_available():
        with pytest.raises(ClipQError, match="CUDA is not available"):
            select_device("cuda")
    with pytest.raises(ConfigError, match="not a device"):
        select_device("gpu0")
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        assert configure_threads(None) >= 1
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- training


@needs_fashion
def test_training_lowers_loss_on_fashion(fashion_subset: tuple[ArrayDataset, ArrayDataset]) -> None:
    train_ds, val_ds = fashion_subset
    torch.manual_seed(0)
    model = build_model("lenet300")
    before = evaluate(model, val_ds, device="cpu")
    seen: list[dict[str, float]] = []
    result = train(
        model,
        train_ds,
        TrainConfig(epochs=2, batch_size=64),
        device="cpu",
        val_data=val_ds,
        progress=False,
        on_epoch_end=seen.append,
    )
    after = evaluate(model, val_ds, device="cpu")
    steps_per_epoch = 3000 // 64
    assert result.steps == 2 * steps_per_epoch and len(result.history) == 2 == len(seen)
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]
    assert after["loss"] < before["loss"] - 0.5 and after["top1"] > 75
    assert result.history[-1]["val_top1"] == pytest.approx(after["top1"])
    assert result.final_train_loss == result.history[-1]["train_loss"]
    assert model.training  # evaluate restores the mode


def test_evaluate_sane_numbers() -> None:
    data = synthetic(300)
    torch.manual_seed(0)
    model = build_model("lenet300")
    m = evaluate(model, data, device="cpu", batch_size=128)
    assert m["n"] == 300 and 0 <= m["top1"] <= m["top5"] <= 100
    assert abs(m["loss"] - math.log(10)) < 0.5  # untrained: about uniform
    three = build_model("lenet300", num_classes=3)
    assert "top5" not in evaluate(three, synthetic(30, classes=3), device="cpu")


def test_fractional_epoch_and_max_steps() -> None:
    data = synthetic(256)
    model = build_model("lenet300")
    r = train(model, data, TrainConfig(epochs=0.5, batch_size=32), device="cpu", progress=False)
    assert r.steps == 4 and r.history[-1]["epoch"] == 0.5
    r = train(model, data, TrainConfig(epochs=10, batch_size=32, max_steps=3), device="cpu", progress=False)
    assert r.steps == 3


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    train(
        build_model("lenet300"),
        synthetic(64),
        TrainConfig(epochs=1, batch_size=32),
        device="cpu",
        progress=True,
        desc="pretrain",
    )
    assert "pretrain" in capsys.readouterr().err


def test_checkpoint_resume_continues(tmp_path: Path) -> None:
    data = synthetic(256)
    cfg = TrainConfig(epochs=3, batch_size=32, seed=1)

    torch.manual_seed(0)
    reference = build_model("lenet300")
    ref = train(reference, data, cfg, device="cpu", progress=False)

    class Interrupt(Exception):
        pass

    def stop_after_first(record: dict[str, float]) -> None:
        if record["epoch"] == 1:
            raise Interrupt

    ckpt = tmp_path / "run" / "ckpt.pt"
    torch.manual_seed(0)
    with pytest.raises(Interrupt):
        train(
            build_model("lenet300"),
            data,
            cfg,
            device="cpu",
            progress=False,
            checkpoint_path=ckpt,
            on_epoch_end=stop_after_first,
        )
    assert ckpt.is_file()

    torch.manual_seed(123)  # a fresh process would start from other weights
    resumed = build_model("lenet300")
    res = train(resumed, data, cfg, device="cpu", progress=False, checkpoint_path=ckpt)
    assert res.resumed_from_step == 8 and res.steps == 24
    assert [h["epoch"] for h in res.history] == [1, 2, 3]
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert res.final_train_loss == pytest.approx(ref.final_train_loss)

    # Finished checkpoint: nothing left to do. Changed config: refuse rather than mix runs.
    again = train(resumed, data, cfg, device="cpu", progress=False, checkpoint_path=ckpt)
    assert again.steps == 24 and len(again.history) == 3
    with pytest.raises(ClipQError, match="different training setup"):
        train(resumed, data, TrainConfig(epochs=4, batch_size=32, seed=1), device="cpu", checkpoint_path=ckpt)
    fresh = train(resumed, data, TrainConfig(epochs=1, batch_size=32), device="cpu", checkpoint_path=ckpt, resume=False)
    assert fresh.resumed_from_step == 0 and fresh.steps == 8


class _Scale(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return w * 0.5


def test_trains_parametrized_weights() -> None:
    torch.manual_seed(0)
    model = build_model("lenet300")
    parametrize.register_parametrization(model.fc1, "weight", _Scale())
    original = model.fc1.parametrizations.weight.original.detach().clone()
    train(model, synthetic(128), TrainConfig(epochs=1, batch_size=32), device="cpu", progress=False)
    assert parametrize.is_parametrized(model.fc1, "weight")
    assert not torch.equal(model.fc1.parametrizations.weight.original, original)


class _GoesNaN(nn.Module):
    """Returns NaN logits from its 5th forward call on."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        out = self.fc(x.flatten(1))
        return out * float("nan") if self.calls >= 5 else out


def test_nan_loss_raises_diverged() -> None:
    with pytest.raises(TrainingDiverged, match="step 5 of") as info:
        train(_GoesNaN(), synthetic(256), TrainConfig(epochs=2, batch_size=16), device="cpu", progress=False)
    assert isinstance(info.value, ClipQError) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- state dict files


def test_state_dict_roundtrip(tmp_path: Path) -> None:
    model = build_model("lenet5")
    path = tmp_path / "w" / "lenet5.pt"
    save_state_dict(model, path)
    other = build_model("lenet5")
    load_state_dict_file(other, path)
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_wrong_architecture_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "lenet300.pt"
    save_state_dict(build_model("lenet300"), path)
    with pytest.raises(ClipQError) as info:
        load_state_dict_file(build_model("lenet5"), path, model_name="lenet5")
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "lenet5" in msg
    assert "missing conv1.weight" in msg and "re-run pretrain" in msg
    with pytest.raises(ClipQError, match="shape mismatch fc3.weight"):
        load_state_dict_file(build_model("lenet300", num_classes=5), path)


def test_bad_checkpoint_files(tmp_path: Path) -> None:
    model = build_model("lenet300")
    with pytest.raises(ClipQError, match="does not exist"):
        load_state_dict_file(model, tmp_path / "absent.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ClipQError, match="not a PyTorch state-dict file"):
        load_state_dict_file(model, junk)
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(ClipQError, match="not a state dict"):
        load_state_dict_file(model, listing)


@pytest.mark.slow
@needs_fashion
def test_pretrain_is_reproducible_and_says_when_it_reuses_the_cache(tmp_path: Path) -> None:
    """The same space pretrains to the same weights anywhere (the init is seeded too); a rerun reuses them."""
    import subprocess

    from .conftest import SMOKE, cli

    def pretrain(root: Path) -> subprocess.CompletedProcess[str]:
        r = cli("pretrain", str(SMOKE), "--results", str(root), "--set", "baseline.train.epochs=0.2")
        assert r.returncode == 0, r.stderr
        return r

    first, second = pretrain(tmp_path / "a"), pretrain(tmp_path / "b")
    assert "(cached)" not in first.stdout and "(cached)" not in second.stdout
    (a,), (b,) = (list((tmp_path / d / "baselines").glob("*.pt")) for d in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()
    assert first.stdout.splitlines()[-1].split(" -> ")[0].split(": ")[1] == \
        second.stdout.splitlines()[-1].split(" -> ")[0].split(": ")[1]
    again = pretrain(tmp_path / "a")
    assert "(cached)" in again.stdout.splitlines()[-1]


def test_validation_uses_the_eval_batch_size_under_inference_mode() -> None:
    """Per-epoch validation runs at the batch size it is given, without autograd; training goes on after it."""
    from clipq_search.core.plan import Plan
    from clipq_search.core.surgery import attach_clipq

    train_ds, val_ds = synthetic(128), synthetic(100, seed=1)
    torch.manual_seed(0)
    model = build_model("lenet300")
    attach_clipq(model, Plan.from_dict({"default": {"p": 0.5, "bits": 4}}))
    seen: list[tuple[int, bool]] = []

    def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        if not module.training:
            seen.append((args[0].shape[0], torch.is_inference_mode_enabled()))

    model.register_forward_pre_hook(record)
    result = train(
        model, train_ds, TrainConfig(epochs=2, batch_size=32), device="cpu", val_data=val_ds, progress=False,
        eval_batch_size=25,
    )
    assert result.steps == 8 and len(result.history) == 2
    assert seen == [(25, True)] * 8  # 4 batches of 25 per validation, 2 epochs
    assert math.isfinite(result.history[-1]["val_loss"])
    seen.clear()
    assert evaluate(model, val_ds, device="cpu", batch_size=50)["n"] == 100 and seen == [(50, True)] * 2


# -- distillation -------------------------------------------------------------------------------------------------


def test_distillation_loss_mixes_labels_and_the_teachers_softened_outputs() -> None:
    from clipq_search.training.loop import distillation_loss

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g)
    labels = torch.randint(0, 10, (16,), generator=g)
    ce = nn.functional.cross_entropy(student, labels)
    assert torch.allclose(distillation_loss(student, teacher, labels, 0.0, 4.0), ce)
    # weight 1 against itself: nothing to learn
    assert float(distillation_loss(student, student, labels, 1.0, 3.0)) == pytest.approx(0.0, abs=1e-6)
    # the written-out definition: T^2 * mean over the batch of sum_k q_k (log q_k - log p_k)
    t = 2.5
    q, logp = torch.softmax(teacher / t, 1), torch.log_softmax(student / t, 1)
    kl = (q * (q.log() - logp)).sum(1).mean()
    expected = 0.3 * ce + 0.7 * t * t * kl
    assert torch.allclose(distillation_loss(student, teacher, labels, 0.7, t), expected, atol=1e-6)


def test_training_with_a_teacher_learns_the_teachers_answers_and_leaves_the_teacher_alone() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (512, 1, 4, 4), dtype=torch.uint8)
    x = (images.float() / 255 - 0.5) / 0.25  # what the batches hold
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    with torch.no_grad():
        answers = teacher(x).argmax(1)
    noise = torch.randint(0, 4, (512,))  # labels that disagree with the teacher
    data = ArrayDataset(images, noise, [0.5], [0.25])
    before = [p.detach().clone() for p in teacher.parameters()]

    def agreement(weight: float) -> float:
        torch.manual_seed(1)
        student = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
        cfg = TrainConfig(epochs=20, batch_size=64, lr=0.1, distill_weight=weight, distill_temperature=2.0)
        train(student, data, cfg, device="cpu", progress=False, teacher=teacher)
        with torch.no_grad():
            return float((student(x).argmax(1) == answers).float().mean())

    assert agreement(1.0) > 0.9 > agreement(0.0)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    assert not any(p.requires_grad for p in teacher.parameters())


def test_distillation_without_a_teacher_or_with_bad_settings_is_refused() -> None:
    data = ArrayDataset(torch.zeros(64, 1, 4, 4, dtype=torch.uint8), torch.randint(0, 4, (64,)), [0.5], [0.25])
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    with pytest.raises(ConfigError, match="distill_weight=0.5 needs a teacher network"):
        train(model, data, TrainConfig(epochs=1, distill_weight=0.5), device="cpu", progress=False)
    with pytest.raises(ConfigError, match="distill_weight"):
        TrainConfig(epochs=1, distill_weight=1.5)
    with pytest.raises(ConfigError, match="distill_temperature"):
        TrainConfig(epochs=1, distill_temperature=0)
