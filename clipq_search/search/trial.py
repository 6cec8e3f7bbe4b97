"""What a space means in practice: its data, model, dense baseline, and one trial.

Everything here works on plain data so it can run inside a Ray worker: a trial
gets the resolved space dict, its sampled parameters, and the baseline and
dataset as serialised payloads; it returns a dict of numbers.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipq_search._io import write_bytes, write_json
from clipq_search.core.encoding import estimate_size
from clipq_search.core.plan import Plan, compressible_tensors, dense_summary
from clipq_search.core.surgery import attach_clipq
from clipq_search.errors import ClipQError, ConfigError
from clipq_search.search.space import LayerSearchParam, Resources, Space
from clipq_search.search.worker_kills import gather, kill_hook, kill_point
from clipq_search.training.data import (
    DEFAULT_ROOTS,
    DatasetSpec,
    DataSplits,
    dataset_from_state,
    dataset_info,
    load_dataset,
    loader_workers,
)
from clipq_search.training.loop import (
    DEFAULT_PRETRAIN,
    TrainConfig,
    configure_device_,
    configure_threads,
    epochs_text,
    evaluate,
    select_device,
    train,
)
from clipq_search.training.models import build_model, check_weights, pretrained_model

__all__ = [
    "Baseline",
    "baseline_paths",
    "check_device",
    "check_space",
    "configure_for_",
    "dataset_spec",
    "device_failure",
    "free_device_memory",
    "ensure_baseline",
    "load_baseline",
    "model_for",
    "run_task",
    "RungState",
    "run_trial",
    "segment_config",
    "train_config",
    "trial_budgets",
    "worker_device",
]


def dataset_spec(space: Space) -> DatasetSpec:
    d = space.dataset
    if d.root is None and d.name not in DEFAULT_ROOTS:  # say it in the space's terms
        raise ConfigError(
            f"{space.source}: dataset.root is required for {d.name!r}; set it to the folder holding its files "
            "(--set dataset.root=/path/to/data)"
        )
    return DatasetSpec(
        name=d.name, root=d.root, val_size=d.val_size, split_seed=d.split_seed, image_size=d.image_size
    )


def model_for(space: Space, splits_info: dict[str, int]) -> nn.Module:
    """The space's model, untrained, for a dataset of ``splits_info``'s shape."""
    return build_model(
        space.model,
        num_classes=splits_info["num_classes"],
        in_channels=splits_info["in_channels"],
        image_size=splits_info["image_size"],
    )


def splits_info(splits: DataSplits) -> dict[str, int]:
    return {"num_classes": splits.num_classes, "in_channels": splits.in_channels, "image_size": splits.image_size}


def teacher_for(space: Space, payload: dict[str, Any], cfg: TrainConfig) -> nn.Module | None:
    """The dense baseline as distillation teacher when ``cfg`` distils (``train.distill.weight`` > 0), else None."""
    if cfg.distill_weight <= 0:
        return None
    teacher = model_for(space, payload["info"])
    teacher.load_state_dict(state_from_bytes(payload["baseline"]), strict=True)
    return teacher


def train_config(space: Space, section: str) -> TrainConfig:
    """The TrainConfig of ``baseline``, ``trial`` or ``final`` (nulls fall back to defaults)."""
    given = getattr(space, section).train.given()
    if section == "baseline":
        base = asdict(DEFAULT_PRETRAIN.get(space.model, TrainConfig(epochs=20)))
    else:
        base = {"epochs": 1.0}
    base.update(given)
    return TrainConfig(**base)


# -- the dense baseline ---------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """A trained dense model: where its weights are and how well it does."""

    checkpoint: str
    val_top1: float
    test_top1: float
    test_top5: float | None
    seconds: float
    model: str
    dataset: str
    fingerprint: str
    cached: bool = field(default=False, compare=False)  # read from the cache this time (not saved)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["cached"]
        return d


def baseline_paths(space: Space, results_root: str | Path) -> tuple[Path, Path]:
    """(checkpoint, metrics json) of the space's baseline; a user checkpoint keeps its own path."""
    given = space.baseline.checkpoint
    fp = space.fingerprint("model", "dataset", "baseline")
    if given:
        ckpt = Path(given)
        return ckpt, Path(results_root) / "baselines" / f"{ckpt.stem}-{fp}.json"
    base = (
        Path(results_root)
        / "baselines"
        / f"{space.model.replace(':', '_').replace('/', '_')}-{space.dataset.name}-{fp}"
    )
    return base.with_suffix(".pt"), base.with_suffix(".json")


def ensure_baseline(
    space: Space,
    results_root: str | Path,
    *,
    progress: bool | None = None,
    log: Any = print,
    address: str | None = None,
) -> Baseline:
    """Train the space's dense baseline, or reuse the cached one when it exists and matches.

    A user-given ``baseline.checkpoint`` is never trained over: it is loaded
    (weights only), checked against the architecture, and evaluated once.
    Published weights (``model_weights``) are evaluated, not retrained, unless
    the dataset has another class count: then the new classifier is trained
    with ``baseline.train``. Training and evaluation run in a Ray task with the
    space's resources (``address``: a cluster; default a local instance), on
    ``resources.device`` resolved on the worker; the driver only reads and
    writes files. Epoch lines are logged (``progress`` is kept for callers).
    """
    ckpt, meta = baseline_paths(space, results_root)
    fp = space.fingerprint("model", "dataset", "baseline")
    if meta.exists() and ckpt.exists():
        try:
            info = json.loads(meta.read_text())
            if info.get("fingerprint") == fp and info.get("checkpoint_bytes") == ckpt.stat().st_size:
                info.pop("checkpoint_bytes", None)
                return Baseline(**info, cached=True)
        except (ValueError, TypeError):
            pass  # unreadable cache: rebuild it
    splits = load_dataset(dataset_spec(space))
    info = splits_info(splits)
    given = None
    if space.baseline.checkpoint:
        from clipq_search.training.loop import load_state_dict_file

        model = model_for(space, info)
        load_state_dict_file(
            model,
            ckpt,
            model_name=space.model,
            fix=f"point baseline.checkpoint at a {space.model} state dict, or remove it to pretrain one",
        )
        given = state_to_bytes(model)
        log(f"evaluating the given baseline {ckpt} on {splits.name}")
    elif space.model_weights:
        log(f"evaluating {space.model} with weights {space.model_weights} on {splits.name}")
    else:
        cfg = train_config(space, "baseline")
        log(f"pretraining dense {space.model} on {splits.name}: {epochs_text(cfg.epochs)} (cached afterwards)")
    payload = {
        "train": splits.train.to_state(),
        "val": splits.val.to_state() if splits.val is not None else None,
        "test": splits.test.to_state(),
        "info": info,
        "kill_hook": kill_hook(),
    }
    res = space.resources
    from clipq_search.search.cluster import check_gpus, init_ray

    check_gpus(address, res.gpus_per_trial)
    init_ray(address, 1, res.cpus_per_trial, res.gpus_per_trial, log)
    import ray
    from ray.util.queue import Queue

    queue = Queue()
    out = run_task(
        _baseline_task,
        res,
        space,
        ray.put(payload),
        given,
        str(ckpt.with_suffix(".resume.pt").resolve()),
        queue,
        what="the dense baseline",
        retries=space.search.retries,
        log=log,
        poll=relay(queue, log),
    )
    relay(queue, log)()
    if out["note"]:
        log(out["note"])
    if given is None:
        write_bytes(ckpt, out["state"])
        ckpt.with_suffix(".resume.pt").unlink(missing_ok=True)
    val, test = out["val"], out["test"]
    info_ = Baseline(
        str(ckpt), val["top1"], test["top1"], test.get("top5"), out["seconds"], space.model, splits.name, fp
    )
    write_json(meta, {**info_.to_dict(), "checkpoint_bytes": ckpt.stat().st_size})
    return info_


def _baseline_task(
    space: Space, payload: dict[str, Any], given: bytes | None, resume_path: str, queue: Any
) -> dict[str, Any]:
    """Ray task: the dense baseline's training (unless given or published) and its evaluation."""
    res = space.resources
    threads = configure_threads(max(1, int(res.cpus_per_trial)))
    device = worker_device(res)
    workers = loader_workers(res.cpus_per_trial)
    info = payload["info"]
    cfg = train_config(space, "baseline")
    eval_bs = space.trial.eval_batch_size
    torch.manual_seed(cfg.seed)  # the dense model's initial weights come from the training seed too
    note = ""
    if given is not None:
        model = model_for(space, info)
        model.load_state_dict(state_from_bytes(given), strict=True)
        fresh = False
    elif space.model_weights:
        model, fresh = pretrained_model(
            space.model,
            space.model_weights,
            num_classes=info["num_classes"],
            in_channels=info["in_channels"],
            image_size=info["image_size"],
        )
        if fresh:
            note = (
                f"the weights {space.model_weights} predict another number of classes than the "
                f"{info['num_classes']} of the dataset: the classifier is new and was trained "
                f"({epochs_text(cfg.epochs)} of baseline.train)"
            )
    else:
        model = model_for(space, info)
        fresh = True
    seconds = 0.0
    val_data = dataset_from_state(payload["val"], num_workers=workers) if payload["val"] is not None else None
    if fresh:

        def on_epoch(rec: dict[str, float]) -> None:
            val = f", val {rec['val_top1']:.2f}%" if "val_top1" in rec else ""
            say(queue, f"  pretrain: epoch {rec['epoch']:g}/{cfg.epochs:g} loss {rec['train_loss']:.4f}{val}")

        t0 = time.perf_counter()
        with kill_point("baseline", payload["kill_hook"]):
            train(
                model,
                dataset_from_state(payload["train"], num_workers=workers),
                cfg,
                device=device,
                val_data=val_data,
                progress=False,
                desc="pretrain",
                on_epoch_end=on_epoch,
                checkpoint_path=resume_path,
                eval_batch_size=eval_bs,
            )
        seconds = time.perf_counter() - t0
    test_data = dataset_from_state(payload["test"], num_workers=workers)
    val = evaluate(model, val_data, device=device, batch_size=eval_bs) if val_data is not None else {"top1": math.nan}
    test = evaluate(model, test_data, device=device, batch_size=eval_bs)
    model.cpu()
    return {
        "state": state_to_bytes(model) if given is None else b"",
        "val": val,
        "test": test,
        "seconds": seconds,
        "note": note,
        "device": str(device),
        "threads": threads,
    }


# -- where work runs -----------------------------------------------------------------------


def _ray_gpu_ids() -> list[Any] | None:
    """The GPU ids Ray gave this worker; None outside a Ray task or actor (the driver included)."""
    if "ray" not in sys.modules:
        return None
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_task_id() is None:
        return None
    return list(ray.get_gpu_ids())


def worker_device(resources: str | None | Resources) -> torch.device:
    """The device of a trial, task or training worker (``resources.device``), resolved where the work runs.

    Given the space's whole ``resources`` section, it also sets this process's
    flags for that device (``training.loop.configure_device_``: cuDNN
    autotuning, TF32, ``deterministic``, ``channels_last``).

    ``auto`` inside a Ray worker is the GPU Ray gave it, else the CPU: Ray leaves
    ``CUDA_VISIBLE_DEVICES`` alone for a worker given no GPU, so there torch
    sees every GPU of the node and ``cuda`` would put all such workers on GPU 0.
    Outside Ray, ``auto`` is CUDA when present. An explicit device must exist;
    ``cuda`` in a Ray worker needs a GPU of its own (``gpus_per_trial`` > 0,
    fractions share one).
    """
    name = resources.device if isinstance(resources, Resources) else resources
    device = _resolve_device(name)
    if isinstance(resources, Resources):
        configure_for_(device, resources)
    return device


def configure_for_(device: torch.device, resources: Resources) -> None:
    """Set this process's flags for ``device`` as the space's ``resources`` say (``loop.configure_device_``)."""
    configure_device_(
        device,
        deterministic=resources.deterministic,
        channels_last=resources.channels_last,
        cuda_graphs=resources.cuda_graphs,
    )


def _resolve_device(name: str | None) -> torch.device:
    ids = _ray_gpu_ids()
    if name is None or name == "auto":
        if ids is None:
            return select_device("auto")
        return torch.device("cuda") if ids and torch.cuda.is_available() else torch.device("cpu")
    device = select_device(name)
    if device.type == "cuda" and ids == []:
        raise ClipQError(
            f"resources.device={name} but Ray gave this worker no GPU; set resources.gpus_per_trial above 0 "
            "(0.25 packs four trials on a GPU)"
        )
    return device


#: Texts of the CUDA errors after which a process's GPU context is unusable (every later call fails too).
_STICKY_CUDA = (
    "cuda error",
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "cublas_status_execution_failed",
    "cublas_status_internal_error",
    "cudnn_status_execution_failed",
    "cudnn_status_internal_error",
    "uncorrectable ecc error",
)


def device_failure(exc: BaseException) -> str | None:
    """What broke when ``exc`` is a failure of the GPU rather than of the trial: ``"cuda"``, ``"memory"``, or None.

    ``"cuda"``: a CUDA error that leaves the process's GPU context unusable
    (an illegal memory access, a device-side assert, a cuBLAS or cuDNN
    execution failure); ``"memory"``: the GPU ran out of memory.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, torch.OutOfMemoryError):
            return "memory"
        if isinstance(e, (torch.AcceleratorError, RuntimeError)):
            text = str(e).lower()
            if any(marker in text for marker in _STICKY_CUDA):
                return "cuda"
        todo += [e.__cause__, e.__context__]
    return None


def free_device_memory(device: torch.device | None = None) -> None:
    """Hand the CUDA memory this process caches back to the GPU (a reused worker keeps it otherwise)."""
    import gc

    gc.collect()
    if (device is None or device.type == "cuda") and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def check_device(name: str | None, gpus_per_trial: float, source: str = "space") -> None:
    """``resources.device`` names a device the workers can use; its presence is checked where they run.

    The driver (often a head node without a GPU) does not need the device.
    """
    if name is None or name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{source}: resources.device={name!r} is not a device; use auto, cpu, cuda or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{source}: resources.device={name!r} is not supported; use auto, cpu, cuda or mps")
    if device.type == "cuda" and device.index not in (None, 0):
        raise ConfigError(
            f"{source}: resources.device={name!r}: each Ray worker sees only the GPUs Ray gave it (as cuda:0); "
            "use cuda, and resources.gpus_per_trial to say how much of a GPU each trial gets"
        )
    if device.type == "cuda" and not gpus_per_trial > 0:
        raise ConfigError(
            f"{source}: resources.device={name} needs resources.gpus_per_trial above 0 (e.g. 1, or 0.25 to pack "
            "four trials on a GPU); with 0 Ray gives the trials no GPU"
        )


def run_task(
    fn: Callable[..., Any],
    resources: Resources,
    *args: Any,
    what: str,
    retries: int,
    log: Callable[[str], None],
    poll: Callable[[], None] | None = None,
) -> Any:
    """``fn(*args)`` as one Ray task with a trial's resources; re-run after a worker kill, up to ``retries``.

    A ``ClipQError`` raised by ``fn`` (a user's error, e.g. a missing file) is
    raised here as it is, so the command line shows its one line.
    """
    import ray

    task = ray.remote(num_cpus=resources.cpus_per_trial, num_gpus=resources.gpus_per_trial, max_retries=0)(fn)
    try:
        return gather(lambda _k: task.remote(*args), [0], retries=retries, what=lambda _k: what, log=log, poll=poll)[0]
    except ClipQError as exc:
        inner = getattr(exc.__cause__, "cause", None)  # a Ray task error's cause: the task's own exception
        if isinstance(inner, ClipQError):
            raise inner from None
        raise


def say(queue: Any, line: str) -> None:
    """Put a progress line on ``queue`` (a ``ray.util.queue.Queue``); a lost queue never stops the work."""
    if queue is None:
        return
    try:
        queue.put(line)
    except Exception:  # noqa: BLE001 - progress lines are a courtesy
        pass


def relay(queue: Any, log: Callable[[str], None]) -> Callable[[], None]:
    """A function that logs the lines waiting on ``queue``; once the queue's actor is gone, it stays quiet."""
    alive = [True]

    def drain() -> None:
        while alive[0]:
            try:
                if queue.empty():
                    return
                log(queue.get(timeout=5))
            except Exception:  # noqa: BLE001 - Ray's errors for a lost actor vary
                alive[0] = False

    return drain


def check_space(space: Space) -> list[LayerSearchParam]:
    """Check what a space names against the real world, without training; return the searched units.

    The dataset files (decoded, or listed for an image folder), the model
    name and its published weights' name, the device's name (whether the
    device exists is checked on the workers), and every layer name, pattern
    and group against the model's compressible layers. Commands call it
    first, so bad input fails in seconds and before anything is written.
    """
    info = dataset_info(dataset_spec(space))
    check_device(space.resources.device, space.resources.gpus_per_trial, space.source)
    if space.model_weights is not None:
        if space.baseline.checkpoint:
            raise ConfigError(
                f"{space.source}: model_weights and baseline.checkpoint both give the dense model's weights; "
                "keep one of them"
            )
        check_weights(space.model, space.model_weights)
    return space.search_params(layer_names(space, info))


def load_baseline(model: nn.Module, baseline: Baseline | dict[str, Any]) -> None:
    from clipq_search.training.loop import load_state_dict_file

    path = baseline.checkpoint if isinstance(baseline, Baseline) else baseline["checkpoint"]
    load_state_dict_file(model, path)


def state_to_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def state_from_bytes(blob: bytes) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


# -- one trial ----------------------------------------------------------------------------


def _node_name() -> str:
    try:
        import ray

        if ray.is_initialized():
            return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:8]}"
    except Exception:  # noqa: BLE001 - the node label is informative only
        pass
    return socket.gethostname()


@dataclass(frozen=True)
class RungState:
    """Where a multi-fidelity trial stands: the model after ``rung`` and the result it reported there."""

    rung: int  # index into the trial's budgets
    state: dict[str, torch.Tensor]  # the CLIP-Q model's state dict (full-precision weights)
    record: dict[str, Any]  # the result reported at that rung (with its ``rungs`` history)


def trial_budgets(space: Space) -> list[float]:
    """The epochs of CLIP-Q fine-tuning at which a trial reports: one budget, or one per rung."""
    epochs = train_config(space, "trial").epochs
    return [epochs * r for r in space.trial.rungs] if space.trial.rungs else [epochs]


def segment_config(cfg: TrainConfig, rungs: tuple[float, ...] | None, k: int) -> TrainConfig:
    """The fine-tune from rung ``k - 1`` to rung ``k``: its share of the epochs, its own schedule and data order.

    Each segment runs its schedule to the end (a cosine decays to 0 at every
    rung: the model is scored where the schedule leaves it, as a single-budget
    trial is), and draws its own batch order (seed + k). Without rungs this is
    ``cfg`` itself.
    """
    if not rungs:
        return cfg
    share = rungs[k] - (rungs[k - 1] if k else 0.0)
    max_steps = max(1, round(cfg.max_steps * share)) if cfg.max_steps is not None else None
    return replace(cfg, epochs=cfg.epochs * share, max_steps=max_steps, seed=cfg.seed + k)


def run_trial(
    space: Space,
    plan: dict[str, Any],
    payload: dict[str, Any],
    *,
    threads: int | None = None,
    report: Callable[[dict[str, Any], nn.Module], None] | None = None,
    resume: RungState | None = None,
) -> dict[str, Any]:
    """One search trial: baseline + plan -> short CLIP-Q fine-tune -> validation accuracy and size.

    ``payload`` holds ``baseline`` (state-dict bytes), ``train`` and ``val``
    (dataset states) and ``info`` (num_classes, in_channels, image_size).
    Returns plain numbers; raises on failure (the caller records it). On
    CUDA the size is computed on the device, and the memory the trial cached
    is handed back at its end (a reused worker runs the next trial).

    With ``trial.rungs`` the fine-tune goes rung by rung: after each rung but
    the last, ``report(record, model)`` is called (a scheduler may end the
    trial there); the last rung's record is returned. ``resume`` continues
    after the rung it holds.
    """
    t_start = time.perf_counter()
    configure_threads(threads)
    device = worker_device(space.resources)
    try:
        return _run_trial(space, plan, payload, device, t_start, report, resume)
    finally:
        if device.type == "cuda":
            free_device_memory(device)


def _run_trial(
    space: Space,
    plan: dict[str, Any],
    payload: dict[str, Any],
    device: torch.device,
    t_start: float,
    report: Callable[[dict[str, Any], nn.Module], None] | None,
    resume: RungState | None,
) -> dict[str, Any]:
    model = model_for(space, payload["info"])
    model.load_state_dict(state_from_bytes(payload["baseline"]), strict=True)
    resolved = attach_clipq(model, Plan.from_dict(plan))
    workers = loader_workers(space.resources.cpus_per_trial)
    train_data = dataset_from_state(payload["train"], num_workers=workers)
    val_data = dataset_from_state(payload["val"], num_workers=workers)
    cfg = train_config(space, "trial")
    teacher = teacher_for(space, payload, cfg)
    budgets, rungs = trial_budgets(space), space.trial.rungs
    first, history, train_seconds, cpu_before = 0, [], 0.0, 0.0
    cpu0 = time.process_time()  # this worker's CPU time (all its threads): the trial's compute
    if resume is not None:
        model.load_state_dict(resume.state, strict=True)
        first, history = resume.rung + 1, list(resume.record.get("rungs", []))
        train_seconds = float(resume.record.get("train_seconds", 0.0))
        cpu_before = float(resume.record.get("cpu_seconds", 0.0))
    record: dict[str, Any] = dict(resume.record) if resume is not None else {}
    for k in range(first, len(budgets)):
        t_train = time.perf_counter()
        result = train(
            model, train_data, segment_config(cfg, rungs, k), device=device, progress=False, desc="trial",
            teacher=teacher,
        )
        train_seconds += time.perf_counter() - t_train
        record = _score(space, model, val_data, device, cfg, resolved)
        history.append({"rung": k, "budget": budgets[k], "val_top1": record["val_top1"], "rate": record["rate"]})
        record.update(
            train_loss=float(result.final_train_loss), train_seconds=train_seconds, rung=k, budget=budgets[k],
            rungs=list(history), trial_seconds=time.perf_counter() - t_start,
            cpu_seconds=cpu_before + time.process_time() - cpu0,
        )
        if report is not None and k < len(budgets) - 1:
            report(record, model)
    return record


def _score(
    space: Space,
    model: nn.Module,
    val_data: Any,
    device: torch.device,
    cfg: TrainConfig,
    resolved: dict[str, Any],
) -> dict[str, Any]:
    """The trial's numbers where it stands: validation accuracy and loss, size and rate, where it ran."""
    metrics = evaluate(model, val_data, device=device, batch_size=space.trial.eval_batch_size, amp=cfg.amp)
    if not math.isfinite(metrics["top1"]) or not math.isfinite(metrics["loss"]):
        raise ClipQError(f"trial produced a non-finite validation result ({metrics})")
    size = estimate_size(model)  # on the model's device
    names = {t.key: name for name, t in compressible_tensors(model).items()}
    kept = {names[s.name]: s.kept_fraction for s in size.layers if s.compressed}
    return {
        "val_top1": float(metrics["top1"]),
        "val_loss": float(metrics["loss"]),
        "rate": float(size.rate),
        "size_bytes": int(size.total_bytes),
        "kept": kept,
        "layers": {k: v.to_dict() for k, v in resolved.items()},
        "node": _node_name(),
        "pid": os.getpid(),
        "device": str(device),
    }


def trial_payload(space: Space, baseline: Baseline, *, test: bool = False) -> dict[str, Any]:
    """What every trial needs, as plain data (shipped once through Ray's object store); ``test``: the test split too.

    The dataset is read (an image folder listed) once, here.
    """
    splits = load_dataset(dataset_spec(space))
    if splits.val is None:
        raise ClipQError("the search needs a validation split: set dataset.val_size > 0")
    model = model_for(space, splits_info(splits))
    load_baseline(model, baseline)
    payload = {
        "baseline": state_to_bytes(model),
        "train": splits.train.to_state(),
        "val": splits.val.to_state(),
        "info": splits_info(splits),
        "kill_hook": kill_hook(),
    }
    if test:
        payload["test"] = splits.test.to_state()
    return payload


def layer_names(space: Space, info: dict[str, int]) -> list[str]:
    return list(compressible_tensors(model_for(space, info)))


def describe_dense(space: Space, info: dict[str, int], compressed: list[str]) -> tuple[dict[str, Any], str]:
    """What the search leaves dense (``core.plan.dense_summary``) and a line saying so."""
    d = dense_summary(model_for(space, info), compressed)
    largest = ", ".join(f"{k} {b:,} B" for k, b in d["largest"])
    line = (f"stays dense: {d['tensors']} parameter tensors, {100 * d['share']:.1f}% of the model's fp32 bytes"
            + (f" (largest: {largest})" if largest else ""))
    return d, line


def write_plan_json(path: str | Path, plan: Plan, **extra: Any) -> None:
    write_json(path, {**plan.to_dict(), **extra})


__all__ += [
    "describe_dense",
    "layer_names",
    "splits_info",
    "state_from_bytes",
    "state_to_bytes",
    "trial_payload",
    "write_bytes",
    "write_plan_json",
]
