"""Training and evaluation: one SGD loop for pretraining, fine-tuning and search trials.

The loop only touches ``model.parameters()``, so it fine-tunes models whose
weights carry ``torch.nn.utils.parametrize`` parametrizations (CLIP-Q) exactly
as it trains dense ones. It is seeded, checkpoints at epoch ends and every few
minutes inside an epoch (atomically), resumes from a checkpoint exactly where it
stopped, and stops with :class:`TrainingDiverged` on a non-finite loss.
"""

from __future__ import annotations

import math
import os
import sys
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from clipq_search._io import atomic_open
from clipq_search.core.surgery import use_cuda_graphs
from clipq_search.errors import ClipQError, ConfigError
from clipq_search.training.data import ArrayDataset, BatchSource, iter_batches, num_batches

__all__ = [
    "DEFAULT_PRETRAIN",
    "DeviceSettings",
    "epochs_text",
    "SCHEDULES",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "check_checkpoint",
    "configure_device_",
    "configure_threads",
    "device_settings",
    "evaluate",
    "load_state_dict_file",
    "lr_at",
    "save_state_dict",
    "select_device",
    "train",
    "use_channels_last",
]

SCHEDULES: tuple[str, ...] = ("cosine", "step", "constant")

# How often (in steps) the loss is checked for NaN/inf and the progress bar updated.
# Each check synchronises with the GPU, so it is not done every step.
_CHECK_EVERY = 20

_CHECKPOINT_VERSION = 1


class TrainingDiverged(ClipQError):
    """The training loss became NaN or infinite."""


# --------------------------------------------------------------------------- environment


def select_device(name: str | None = "auto") -> torch.device:
    """``"auto"``/None: CUDA if available, else CPU. An explicit device must exist."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device={name!r} is not a device name; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ClipQError(
                f"device {name!r} requested but CUDA is not available here; "
                "set resources.device to cpu or auto (--set resources.device=auto)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ClipQError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist; "
                f"use cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ClipQError(f"device {name!r} requested but MPS is not available here; use cpu or auto")
    return device


def available_cpus() -> int:
    """CPUs this process may run on (respects affinity masks, e.g. ``taskset``), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def configure_threads(n: int | None) -> int:
    """Set torch's intra-op thread count to ``n`` (None or 0: all available CPUs); returns it.

    Small models on a few cores are compute bound per batch, so one thread per
    core is what ``benchmarks/bench_baseline.py`` measures as fastest.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ConfigError(f"threads={n!r} is invalid; use an integer >= 1, or 0/None for all CPUs")
    threads = n or available_cpus()
    torch.set_num_threads(threads)
    return threads


@dataclass(frozen=True)
class DeviceSettings:
    """How this process computes (``resources.deterministic``, ``channels_last`` and ``cuda_graphs``).

    ``channels_last``: None lets :func:`train` and :func:`evaluate` use the
    channels-last memory layout for models with 2-D convolutions on CUDA
    (what cuDNN's fastest convolutions want); True uses it on every device;
    False never.
    """

    deterministic: bool = False
    channels_last: bool | None = None
    cuda_graphs: bool = False


_settings = DeviceSettings()

#: cuBLAS needs a fixed workspace to be reproducible; it reads this before its first use in the process.
CUBLAS_WORKSPACE = ":4096:8"


def configure_device_(
    device: torch.device | str, *, deterministic: bool = False, channels_last: bool | None = None,
    cuda_graphs: bool = False,
) -> dict[str, Any]:
    """Set torch's process-wide flags for computing on ``device``; return the settings now in effect.

    On CUDA: cuDNN picks its fastest convolution algorithms (``benchmark``)
    and float32 matrix products and convolutions run in TF32. With
    ``deterministic``: ``torch.use_deterministic_algorithms(True,
    warn_only=True)`` (an operation without a deterministic implementation
    warns rather than fails), ``cudnn.deterministic``, no ``benchmark``, and
    ``CUBLAS_WORKSPACE_CONFIG`` (set when the process has not set it). With
    ``cuda_graphs`` on CUDA, each layer's CLIP-Q operator is replayed as a
    recorded CUDA graph (``core.surgery.use_cuda_graphs``). Each call sets
    every flag, so a reused worker never keeps a former trial's.
    """
    global _settings
    device = torch.device(device)
    _settings = DeviceSettings(deterministic, channels_last, cuda_graphs)
    use_cuda_graphs(cuda_graphs and device.type == "cuda")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    cuda = device.type == "cuda"
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = cuda and not deterministic
    if cuda:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    return device_settings()


def device_settings() -> dict[str, Any]:
    """The flags in effect in this process (see :func:`configure_device_`), as plain data."""
    return {
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "matmul_fp32_precision": torch.backends.cuda.matmul.fp32_precision,
        "conv_fp32_precision": torch.backends.cudnn.conv.fp32_precision,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "channels_last": _settings.channels_last,
        "cuda_graphs": _settings.cuda_graphs,
    }


def use_channels_last(model: nn.Module, device: torch.device, choice: bool | None = None) -> bool:
    """Whether ``model`` computes in the channels-last layout on ``device``.

    ``choice`` None takes the process's setting (:func:`configure_device_`);
    still None there: yes for a model with 2-D convolutions on CUDA.
    """
    choice = _settings.channels_last if choice is None else choice
    if choice is False:
        return False
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return has_conv and (choice is True or device.type == "cuda")


def _layout(x: Tensor, channels_last: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


# --------------------------------------------------------------------------- config


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainConfig:
    """SGD training recipe. ``epochs`` may be fractional (0.5 = half a pass).

    Total steps are ``ceil(epochs * steps_per_epoch)``, or ``max_steps`` when
    given. The learning rate follows ``schedule`` per step: ``cosine`` decays
    to 0, ``step`` multiplies by ``gamma`` every ``step_epochs`` epochs,
    ``constant`` keeps it. ``amp`` uses bfloat16 (or float16 with loss
    scaling) autocast on CUDA and is ignored elsewhere.

    ``distill_weight`` > 0 trains on a mix of the labels and a teacher's
    softened outputs (:func:`distillation_loss`, at ``distill_temperature``);
    :func:`train` then needs the teacher.
    """

    epochs: float
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    step_epochs: float | None = None
    gamma: float = 0.1
    nesterov: bool = True
    seed: int = 0
    amp: bool = True
    max_steps: int | None = None
    distill_weight: float = 0.0
    distill_temperature: float = 4.0

    def __post_init__(self) -> None:
        def bad(name: str, accepted: str) -> ConfigError:
            return ConfigError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid; accepted: {accepted}")

        if not _is_number(self.epochs) or self.epochs <= 0:
            raise bad("epochs", "a number > 0 (fractions allowed)")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise bad("batch_size", "an integer >= 1")
        if not _is_number(self.lr) or self.lr <= 0:
            raise bad("lr", "a number > 0")
        if not _is_number(self.momentum) or not 0 <= self.momentum < 1:
            raise bad("momentum", "a number in [0, 1)")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise bad("weight_decay", "a number >= 0")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", " | ".join(SCHEDULES))
        if self.step_epochs is not None and (not _is_number(self.step_epochs) or self.step_epochs <= 0):
            raise bad("step_epochs", "a number > 0, or None")
        if self.schedule == "step" and self.step_epochs is None:
            raise ConfigError("TrainConfig.step_epochs is required when schedule='step'; e.g. step_epochs=10")
        if not _is_number(self.gamma) or not 0 < self.gamma <= 1:
            raise bad("gamma", "a number in (0, 1]")
        if not isinstance(self.nesterov, bool):
            raise bad("nesterov", "true or false")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("TrainConfig.nesterov=True needs momentum > 0; set nesterov=False or momentum=0.9")
        if not _is_int(self.seed) or self.seed < 0:
            raise bad("seed", "an integer >= 0")
        if not isinstance(self.amp, bool):
            raise bad("amp", "true or false")
        if self.max_steps is not None and (not _is_int(self.max_steps) or self.max_steps < 1):
            raise bad("max_steps", "an integer >= 1, or None")
        if not _is_number(self.distill_weight) or not 0 <= self.distill_weight <= 1:
            raise bad("distill_weight", "a number in [0, 1] (0: no distillation)")
        if not _is_number(self.distill_temperature) or self.distill_temperature <= 0:
            raise bad("distill_temperature", "a number > 0")

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps for this config when one epoch is ``steps_per_epoch`` batches."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * steps_per_epoch - 1e-9))

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data; without distillation its two fields are left out, so that checkpoints
        and final-run set-ups recorded before they existed still match."""
        out = asdict(self)
        if not self.distill_weight:
            del out["distill_weight"], out["distill_temperature"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s) {unknown}; valid fields: {', '.join(sorted(known))}")
        return cls(**data)


def distillation_loss(
    logits: Tensor, teacher_logits: Tensor, labels: Tensor, weight: float, temperature: float
) -> Tensor:
    """Knowledge distillation (Hinton et al. 2015): ``(1 - weight) * CE(labels) + weight * T**2 * KL``.

    KL is from the teacher's softened distribution ``softmax(teacher / T)`` to
    the student's, averaged over the batch; ``T**2`` keeps its gradients on the
    scale of the cross-entropy's whatever the temperature.
    """
    hard = F.cross_entropy(logits, labels)
    soft = F.kl_div(
        F.log_softmax(logits.float() / temperature, dim=1),
        F.log_softmax(teacher_logits.float() / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - weight) * hard + weight * temperature**2 * soft


def lr_at(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        assert cfg.step_epochs is not None  # guaranteed by TrainConfig validation
        return cfg.lr * cfg.gamma ** math.floor(step / (cfg.step_epochs * steps_per_epoch))
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * step / total_steps))


def epochs_text(epochs: float) -> str:
    """``1 epoch``, ``2 epochs``, ``0.5 epochs``: for messages."""
    return f"{epochs:g} epoch" + ("" if epochs == 1 else "s")


#: Shipped pretraining recipes per model: the shortest cosine runs whose test
#: top-1 on Fashion-MNIST sits clearly past the targets (LeNet-300-100 89.5%,
#: LeNet-5 90.5%); the figures and their command are in docs/benchmarks.md,
#: "Dense baselines".
DEFAULT_PRETRAIN: dict[str, TrainConfig] = {
    "lenet300": TrainConfig(epochs=20, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
    "lenet5": TrainConfig(epochs=8, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
}


# --------------------------------------------------------------------------- results


@dataclass
class TrainResult:
    """What :func:`train` did.

    ``history`` has one dict per epoch end: ``epoch`` (float, fractional for a
    final partial epoch), ``step``, ``train_loss`` (mean over the epoch's
    steps), ``lr`` (at the epoch's last step), ``seconds`` (training time of
    the epoch, without validation) and, with validation data, ``val_top1`` and
    ``val_loss``. ``seconds`` is the wall time of this call; ``steps`` the
    total optimizer steps done (including any before a resume).
    """

    history: list[dict[str, float]] = field(default_factory=list)
    final_train_loss: float = math.nan
    seconds: float = 0.0
    steps: int = 0
    resumed_from_step: int = 0


# --------------------------------------------------------------------------- training


def _resident(data: Any, device: torch.device) -> Any:
    """An in-memory dataset copied to the accelerator once, so batches are indexed there (no per-step copy)."""
    if isinstance(data, ArrayDataset) and device.type == "cuda" and data.device != device:
        return data.to(device)
    return data


def _show_progress(progress: bool | None) -> bool:
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return progress


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    """Autocast's type on ``device``: bfloat16 from compute capability 8.0 (Ampere) on, else float16; None off CUDA.

    ``torch.cuda.is_bf16_supported()`` also counts emulated bfloat16 (V100, T4),
    which is slow there: those GPUs train in float16 with loss scaling.
    """
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def _amp_setup(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    dtype = _amp_dtype(device) if cfg.amp else None
    if dtype is None or dtype == torch.bfloat16:
        return dtype, None
    return dtype, torch.amp.GradScaler("cuda")


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Tensor]:
    state = {"torch": torch.get_rng_state(), "shuffle": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _write_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    with atomic_open(path, "wb") as fh:
        torch.save(payload, fh)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ClipQError(
            f"cannot read training checkpoint {path} ({type(exc).__name__}); delete {path} to start that "
            "training afresh"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("version") != _CHECKPOINT_VERSION or "model" not in ckpt:
        raise ClipQError(
            f"{path} is not a clipq_search training checkpoint; delete {path} to start that training afresh"
        )
    return ckpt


def check_checkpoint(path: str | os.PathLike[str]) -> None:
    """One clear error, naming the file to delete, when a training checkpoint exists but cannot be read.

    Callers that resume in another process (a Ray task) check first, so the
    user reads which file is bad rather than a worker's failure.
    """
    if Path(path).exists():
        _load_checkpoint(Path(path))


def _first_bad(losses: list[Tensor], start_step: int) -> tuple[int, float] | None:
    """``(step, value)`` of the first non-finite loss among ``losses`` (steps from ``start_step``), else None."""
    stacked = torch.stack(losses)
    finite = torch.isfinite(stacked)
    if bool(finite.all()):
        return None
    i = int((~finite).nonzero()[0, 0])
    return start_step + i, float(stacked[i])


def _resume_from_(
    ckpt_path: Path,
    cfg: TrainConfig,
    steps_per_epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    generator: torch.Generator,
    device: torch.device,
    result: TrainResult,
) -> tuple[int, int, Tensor | None]:
    """Load a checkpoint into the model, optimizer, scaler and random streams.

    Returns its step and, for a checkpoint inside an epoch, the batches of
    that epoch done and their losses (else 0 and None).
    """
    ckpt = _load_checkpoint(ckpt_path)
    if ckpt.get("config") != cfg.to_dict() or ckpt.get("steps_per_epoch") != steps_per_epoch:
        raise ClipQError(
            f"checkpoint {ckpt_path} was written by a different training setup (config or data size); "
            f"delete {ckpt_path} to start this training afresh"
        )
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ClipQError(
            f"checkpoint {ckpt_path} does not match this model ({str(exc).splitlines()[0][:200]}); "
            f"delete {ckpt_path} to start this training afresh"
        ) from exc
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt["rng"]
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["shuffle"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    step = int(ckpt["step"])
    result.history = [dict(h) for h in ckpt["history"]]
    result.resumed_from_step = step
    return step, int(ckpt.get("epoch_batches", 0)), ckpt.get("epoch_losses")


@dataclass
class _Run:
    """What one training run's phases share: the data, the optimizer, the step count and the progress bar.

    A checkpoint inside an epoch (every ``every_steps`` steps or ``every_seconds``)
    keeps the shuffle generator's state from the start of that epoch, the
    batches of the epoch already done and their losses: a resume draws the
    same order and goes on from the next batch.
    """

    model: nn.Module
    train_data: Any
    cfg: TrainConfig
    device: torch.device
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    generator: torch.Generator
    drop_last: bool
    steps_per_epoch: int
    total: int
    desc: str
    step: int = 0
    bar: Any = None
    channels_last: bool = False
    ckpt_path: Path | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    every_steps: int | None = None
    every_seconds: float | None = None
    teacher: nn.Module | None = None  # distillation's teacher (``cfg.distill_weight`` > 0), in eval mode
    skip: int = 0  # batches of the current epoch done before a mid-epoch resume
    done_losses: Tensor | None = None  # their losses
    last_save: tuple[int, float] = (0, 0.0)  # step and monotonic time of the latest checkpoint (or start)

    def check(self, losses: list[Tensor], checked: int, first_step: int, lr: float) -> int:
        """Raise on a non-finite loss among the unchecked ones; update the bar. Returns #checked."""
        bad = _first_bad(losses[checked:], first_step + checked + 1)
        if bad is not None:
            raise TrainingDiverged(
                f"training diverged at step {bad[0]} of {self.total} ({self.desc}): loss is {bad[1]}; "
                f"lower TrainConfig.lr (now {self.cfg.lr}) or check the data"
            )
        if self.bar is not None:
            self.bar.update(len(losses) - checked)
            self.bar.set_postfix(loss=f"{float(losses[-1]):.4f}", lr=f"{lr:.3g}")
        return len(losses)

    def _due(self) -> bool:
        """Whether a checkpoint inside the epoch is due (never without a checkpoint path)."""
        if self.ckpt_path is None:
            return False
        step0, t0 = self.last_save
        if self.every_steps is not None and self.step - step0 >= self.every_steps:
            return True
        return self.every_seconds is not None and time.monotonic() - t0 >= self.every_seconds

    def epoch(self) -> tuple[float, float]:
        """Train up to one epoch (or to the last step); return the mean training loss and the last lr."""
        cfg, optimizer, scaler = self.cfg, self.optimizer, self.scaler
        epoch_rng = self.generator.get_state()  # before the epoch's order is drawn
        skip, done = self.skip, self.done_losses
        self.skip, self.done_losses = 0, None
        first_step = self.step
        losses: list[Tensor] = []
        checked = 0
        lr = cfg.lr
        batches = iter_batches(
            self.train_data, cfg.batch_size, shuffle=True, generator=self.generator, device=self.device,
            drop_last=self.drop_last,
        )
        for i, (xb, yb) in enumerate(batches):
            if i < skip:  # done before the checkpoint this run resumed from
                continue
            lr = lr_at(cfg, self.step, self.total, self.steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            xb = _layout(xb, self.channels_last)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = self.model(xb)
                if self.teacher is None:
                    loss = F.cross_entropy(logits, yb)
                else:
                    with torch.no_grad():
                        taught = self.teacher(xb)
                    loss = distillation_loss(logits, taught, yb, cfg.distill_weight, cfg.distill_temperature)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            losses.append(loss.detach().float())
            self.step += 1
            if len(losses) - checked >= _CHECK_EVERY:
                checked = self.check(losses, checked, first_step, lr)
            if self.step >= self.total:
                break
            if i + 1 < self.steps_per_epoch and self._due():
                checked = self.check(losses, checked, first_step, lr)  # never save a diverged model
                so_far = torch.stack(losses) if done is None else torch.cat([done.to(losses[0].device),
                                                                                torch.stack(losses)])
                self.checkpoint(epoch_rng=epoch_rng, epoch_batches=i + 1, epoch_losses=so_far)
        if not losses:
            raise ClipQError("training data yielded no batches; check the dataset")
        if checked < len(losses):
            self.check(losses, checked, first_step, lr)
        all_losses = torch.stack(losses)
        if done is not None:
            all_losses = torch.cat([done.to(all_losses.device), all_losses])
        return float(all_losses.mean()), lr

    def checkpoint(
        self,
        *,
        epoch_rng: Tensor | None = None,
        epoch_batches: int = 0,
        epoch_losses: Tensor | None = None,
    ) -> None:
        """Write the checkpoint: at an epoch's end, or inside one (``epoch_batches`` of it done)."""
        assert self.ckpt_path is not None
        rng = _rng_state(self.generator, self.device)
        payload: dict[str, Any] = {
            "version": _CHECKPOINT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": round(self.step / self.steps_per_epoch, 6),
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "rng": rng,
            "history": self.history,
            "config": self.cfg.to_dict(),
        }
        if epoch_batches:
            assert epoch_rng is not None and epoch_losses is not None
            rng["shuffle"] = epoch_rng  # the resume draws this epoch's order again and skips what was done
            payload["epoch_batches"] = epoch_batches
            payload["epoch_losses"] = epoch_losses.detach().cpu()
        if self.scaler is not None:
            payload["scaler"] = self.scaler.state_dict()
        _write_checkpoint(self.ckpt_path, payload)
        self.last_save = (self.step, time.monotonic())


def _place_(
    model: nn.Module, teacher: nn.Module | None, cfg: TrainConfig, device: torch.device, channels_last: bool | None
) -> tuple[bool, nn.Module | None]:
    """Move the model to ``device`` (and its memory layout); the teacher too, frozen in eval mode, when distilling.

    Returns whether the layout is channels-last, and the teacher (``None`` when ``cfg.distill_weight`` is 0).
    """
    model.to(device)
    layout = use_channels_last(model, device, channels_last)
    if layout:
        model.to(memory_format=torch.channels_last)
    if teacher is None or cfg.distill_weight <= 0:
        return layout, None
    teacher.to(device).eval()
    for par in teacher.parameters():
        par.requires_grad_(False)
    if layout:
        teacher.to(memory_format=torch.channels_last)
    return layout, teacher


def _check_checkpoint_every(checkpoint_steps: int | None, checkpoint_minutes: float | None) -> None:
    if checkpoint_steps is not None and (not _is_int(checkpoint_steps) or checkpoint_steps < 1):
        raise ConfigError(f"checkpoint_steps={checkpoint_steps!r} is invalid; use an integer >= 1, or None")
    if checkpoint_minutes is not None and (not _is_number(checkpoint_minutes) or checkpoint_minutes <= 0):
        raise ConfigError(f"checkpoint_minutes={checkpoint_minutes!r} is invalid; use a number > 0, or None")


def _end_epoch(
    run: _Run,
    train_loss: float,
    lr: float,
    seconds: float,
    val_data: BatchSource | Iterable[Any] | None,
    eval_batch_size: int,
    on_epoch_end: Callable[[dict[str, float]], None] | None,
) -> None:
    """An epoch's record (validated when ``val_data`` is given) into the history, a checkpoint, ``on_epoch_end``."""
    record: dict[str, float] = {
        "epoch": round(run.step / run.steps_per_epoch, 6),
        "step": run.step,
        "train_loss": train_loss,
        "lr": lr,
        "seconds": seconds,
    }
    if val_data is not None:
        metrics = evaluate(run.model, val_data, device=run.device, batch_size=eval_batch_size, amp=run.cfg.amp,
                           channels_last=run.channels_last)
        record["val_top1"] = metrics["top1"]
        record["val_loss"] = metrics["loss"]
        run.model.train()
    run.history.append(record)
    if run.ckpt_path is not None:
        run.checkpoint()
    if on_epoch_end is not None:
        on_epoch_end(dict(record))


def train(
    model: nn.Module,
    train_data: BatchSource | Iterable[Any],
    cfg: TrainConfig,
    *,
    device: torch.device | str,
    val_data: BatchSource | Iterable[Any] | None = None,
    progress: bool | None = None,
    desc: str = "train",
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = True,
    eval_batch_size: int = 1000,
    checkpoint_minutes: float | None = 10.0,
    checkpoint_steps: int | None = None,
    channels_last: bool | None = None,
    teacher: nn.Module | None = None,
) -> TrainResult:
    """Train ``model`` in place with SGD + cross-entropy on ``train_data``; returns a :class:`TrainResult`.

    Batches ``(x, y)``: float ``(B, C, H, W)``, int64 ``(B,)``. The learning
    rate is set every step from ``cfg.schedule``. At each epoch end (and at
    the end of a final partial epoch) the model is evaluated on ``val_data``
    if given, a checkpoint is written if ``checkpoint_path`` is set, then
    ``on_epoch_end(record)`` is called; an exception it raises (e.g. a pruned
    Optuna trial) stops training. With ``resume`` and an existing checkpoint,
    training continues from it instead of starting over. Validation runs in
    batches of ``eval_batch_size``, under autocast when ``cfg.amp`` applies.

    Inside an epoch, a checkpoint is also written every ``checkpoint_minutes``
    (None: never) and every ``checkpoint_steps`` steps (None: never); resuming
    from one continues the epoch's data order at the next batch, so the
    result is the one of an uninterrupted run (the skipped batches are read
    again, not trained on). ``channels_last``: see :func:`use_channels_last`.

    ``teacher``: the network whose outputs ``cfg.distill_weight`` mixes into
    the loss (the dense baseline, for CLIP-Q); it is moved to ``device`` and
    put in eval mode, and never trained. Required when ``distill_weight`` > 0.
    """
    device = torch.device(device)
    if cfg.distill_weight > 0 and teacher is None:
        raise ConfigError(
            f"distill_weight={cfg.distill_weight:g} needs a teacher network; pass teacher=, or set distill_weight=0"
        )
    started = time.perf_counter()
    train_data = _resident(train_data, device)
    val_data = _resident(val_data, device) if val_data is not None else None
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    layout, teacher = _place_(model, teacher, cfg, device, channels_last)

    # Drop a ragged last batch (every step the same size; BatchNorm never sees a batch of 1).
    n_items = len(train_data) if isinstance(train_data, BatchSource) else None
    drop_last = n_items is not None and n_items > cfg.batch_size
    steps_per_epoch = num_batches(train_data, cfg.batch_size, drop_last=drop_last)
    if steps_per_epoch < 1:
        raise ClipQError("training data is empty; check the dataset and the validation split size")

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ClipQError("model has no trainable parameters; nothing to train")
    optimizer = torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
    )
    amp_dtype, scaler = _amp_setup(cfg, device)
    _check_checkpoint_every(checkpoint_steps, checkpoint_minutes)
    result = TrainResult()
    ckpt_path = Path(checkpoint_path) if checkpoint_path is not None else None
    run = _Run(model, train_data, cfg, device, optimizer, scaler, amp_dtype, generator, drop_last,
               steps_per_epoch, cfg.total_steps(steps_per_epoch), desc, channels_last=layout, ckpt_path=ckpt_path,
               history=result.history, every_steps=checkpoint_steps, teacher=teacher,
               every_seconds=None if checkpoint_minutes is None else 60.0 * checkpoint_minutes)
    if ckpt_path is not None and resume and ckpt_path.exists():
        run.step, run.skip, run.done_losses = _resume_from_(
            ckpt_path, cfg, steps_per_epoch, model, optimizer, scaler, generator, device, result
        )
        run.history = result.history
    run.last_save = (run.step, time.monotonic())

    if _show_progress(progress):
        from tqdm.auto import tqdm

        run.bar = tqdm(total=run.total, initial=run.step, desc=desc, unit="step", dynamic_ncols=True, leave=False)
    model.train()
    try:
        while run.step < run.total:
            epoch_start = time.perf_counter()
            train_loss, lr = run.epoch()
            _end_epoch(run, train_loss, lr, time.perf_counter() - epoch_start, val_data, eval_batch_size, on_epoch_end)
    finally:
        if run.bar is not None:
            run.bar.close()

    result.steps = run.step
    result.final_train_loss = result.history[-1]["train_loss"] if result.history else math.nan
    result.seconds = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------- evaluation


def evaluate(
    model: nn.Module,
    data: BatchSource | Iterable[Any],
    *,
    device: torch.device | str,
    batch_size: int = 1000,
    amp: bool = True,
    channels_last: bool | None = None,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``data``, in batches of ``batch_size``.

    Runs under ``torch.inference_mode`` and, on CUDA with ``amp``, under the
    same autocast as training (bfloat16, or float16). Returns ``top1``
    (percent), ``loss``, ``n`` (items) and, when there are more than 5
    classes, ``top5`` (percent). The model's train/eval mode is restored
    afterwards. ``channels_last``: see :func:`use_channels_last`.
    """
    device = torch.device(device)
    data = _resident(data, device)
    was_training = model.training
    model.eval()
    model.to(device)
    layout = use_channels_last(model, device, channels_last)
    if layout:
        model.to(memory_format=torch.channels_last)
    amp_dtype = _amp_dtype(device) if amp else None
    n = 0
    classes = 0
    try:
        with torch.inference_mode():
            correct1 = torch.zeros((), dtype=torch.int64, device=device)
            correct5 = torch.zeros((), dtype=torch.int64, device=device)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for xb, yb in iter_batches(data, batch_size, shuffle=False, device=device):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(_layout(xb, layout)).float()
                classes = logits.shape[1]
                loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
                k = min(5, classes)
                topk = logits.topk(k, dim=1).indices
                hits = topk == yb.unsqueeze(1)
                correct1 += hits[:, 0].sum()
                correct5 += hits.any(dim=1).sum()
                n += int(yb.shape[0])
    finally:
        model.train(was_training)
    if n == 0:
        raise ClipQError("evaluation data is empty; check the dataset")
    out = {"top1": 100.0 * int(correct1) / n, "loss": float(loss_sum) / n, "n": n}
    if classes > 5:
        out["top5"] = 100.0 * int(correct5) / n
    return out


# --------------------------------------------------------------------------- state dict files


def save_state_dict(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``model.state_dict()`` to ``path`` with ``torch.save``, atomically (tmp file + rename)."""
    with atomic_open(path, "wb") as fh:
        torch.save(model.state_dict(), fh)


def _describe(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _load_failure(exc: BaseException) -> str:
    """A short reason why ``torch.load`` failed (its own messages run to several lines)."""
    text = str(exc).strip()
    if "WeightsUnpickler error:" in text:  # not a weights-only torch.save file
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0].strip()
        return f"not a weights-only torch.save file: {detail}"[:120]
    first = text.splitlines()[0].strip() if text else type(exc).__name__
    return first[:120]


def load_state_dict_file(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    fix: str = "re-run pretrain",
) -> None:
    """Load weights written by :func:`save_state_dict` (or a :func:`train` checkpoint) into ``model``.

    Uses ``torch.load(weights_only=True)``: no arbitrary code runs. A missing
    file, a file that is not a state dict, or one for another architecture
    raises :class:`ClipQError` naming the file and the problem, ending in ``fix``
    (what the user should do; the caller knows where the path came from).
    """
    path = Path(path)
    label = model_name or type(model).__name__
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist"
        raise ClipQError(f"checkpoint {path} {what}; {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        with open(path, "rb") as fh:
            head = fh.read(1)
        # torch.save writes a zip archive (or, in its legacy format, a pickle: b"\x80")
        reason = _load_failure(exc) if zipfile.is_zipfile(path) or head == b"\x80" else "not written by torch.save"
        raise ClipQError(f"{path} is not a PyTorch state-dict file ({reason}); {fix}") from exc
    if isinstance(state, dict) and state.get("version") == _CHECKPOINT_VERSION and "model" in state:
        state = state["model"]
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise ClipQError(f"{path} holds a {type(state).__name__}, not a state dict of tensors; {fix}")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected {_describe(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {_describe(mismatched)}")
    if problems:
        raise ClipQError(f"checkpoint {path} does not match model {label}: {'; '.join(problems)}; {fix}")
    model.load_state_dict(state)
