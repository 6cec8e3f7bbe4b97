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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipq_search._io import write_bytes, write_json
from clipq_search.core.encoding import estimate_size
from clipq_search.core.plan import Plan, compressible_layers
from clipq_search.core.surgery import attach_clipq
from clipq_search.errors import ClipQError, ConfigError
from clipq_search.search.space import LayerSearchParam, Space
from clipq_search.training.data import (
    DEFAULT_ROOTS,
    DatasetSpec,
    DataSplits,
    dataset_from_state,
    dataset_info,
    load_dataset,
)
from clipq_search.training.loop import (
    DEFAULT_PRETRAIN,
    TrainConfig,
    configure_threads,
    epochs_text,
    evaluate,
    select_device,
    train,
)
from clipq_search.training.models import build_model

__all__ = [
    "Baseline",
    "baseline_paths",
    "check_space",
    "dataset_spec",
    "ensure_baseline",
    "load_baseline",
    "model_for",
    "run_trial",
    "train_config",
]


def dataset_spec(space: Space) -> DatasetSpec:
    d = space.data["dataset"]
    if d["root"] is None and d["name"] not in DEFAULT_ROOTS:  # say it in the space's terms
        raise ConfigError(
            f"{space.source}: dataset.root is required for {d['name']!r}; set it to the folder holding its files "
            "(--set dataset.root=/path/to/data)"
        )
    return DatasetSpec(name=d["name"], root=d["root"], val_size=d["val_size"], split_seed=d["split_seed"])


def model_for(space_data: dict[str, Any], splits_info: dict[str, int]) -> nn.Module:
    return build_model(
        space_data["model"],
        num_classes=splits_info["num_classes"],
        in_channels=splits_info["in_channels"],
        image_size=splits_info["image_size"],
    )


def splits_info(splits: DataSplits) -> dict[str, int]:
    return {"num_classes": splits.num_classes, "in_channels": splits.in_channels, "image_size": splits.image_size}


def train_config(space_data: dict[str, Any], section: str) -> TrainConfig:
    """The TrainConfig of ``baseline``, ``trial`` or ``final`` (nulls fall back to defaults)."""
    given = {k: v for k, v in space_data[section]["train"].items() if v is not None}
    if section == "baseline":
        base = asdict(DEFAULT_PRETRAIN.get(space_data["model"], TrainConfig(epochs=20)))
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
    given = space.data["baseline"]["checkpoint"]
    fp = space.fingerprint("model", "dataset", "baseline")
    if given:
        ckpt = Path(given)
        return ckpt, Path(results_root) / "baselines" / f"{ckpt.stem}-{fp}.json"
    base = (
        Path(results_root)
        / "baselines"
        / f"{space.data['model'].replace(':', '_').replace('/', '_')}-{space.data['dataset']['name']}-{fp}"
    )
    return base.with_suffix(".pt"), base.with_suffix(".json")


def ensure_baseline(
    space: Space, results_root: str | Path, *, progress: bool | None = None, log: Any = print
) -> Baseline:
    """Train the space's dense baseline, or reuse the cached one when it exists and matches.

    A user-given ``baseline.checkpoint`` is never trained over: it is loaded
    (weights only), checked against the architecture, and evaluated once.
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
    device = select_device(space.data["resources"]["device"])
    configure_threads(None)
    # the dense model's initial weights come from the training seed too: a baseline is reproducible
    torch.manual_seed(train_config(space.data, "baseline").seed)
    model = model_for(space.data, splits_info(splits))
    from clipq_search.training.loop import load_state_dict_file, save_state_dict

    seconds = 0.0
    if space.data["baseline"]["checkpoint"]:
        load_state_dict_file(
            model,
            ckpt,
            model_name=space.data["model"],
            fix=f"point baseline.checkpoint at a {space.data['model']} state dict, or remove it to pretrain one",
        )
    else:
        cfg = train_config(space.data, "baseline")
        log(f"pretraining dense {space.data['model']} on {splits.name}: {epochs_text(cfg.epochs)} (cached afterwards)")
        t0 = time.perf_counter()
        train(
            model,
            splits.train,
            cfg,
            device=device,
            val_data=splits.val,
            progress=progress,
            desc="pretrain",
            checkpoint_path=ckpt.with_suffix(".resume.pt"),
        )
        seconds = time.perf_counter() - t0
        save_state_dict(model, ckpt)
        ckpt.with_suffix(".resume.pt").unlink(missing_ok=True)
    val = evaluate(model, splits.val, device=device) if splits.val is not None else {"top1": math.nan}
    test = evaluate(model, splits.test, device=device)
    info = Baseline(
        str(ckpt), val["top1"], test["top1"], test.get("top5"), seconds, space.data["model"], splits.name, fp
    )
    write_json(meta, {**info.to_dict(), "checkpoint_bytes": ckpt.stat().st_size})
    return info


def check_space(space: Space) -> list[LayerSearchParam]:
    """Check what a space names against the real world, without training; return the searched units.

    The dataset files (decoded, or listed for an image folder), the model
    name, the device, and every layer name, pattern and group against the
    model's compressible layers. Commands call it first, so bad input fails in
    seconds and before anything is written.
    """
    info = dataset_info(dataset_spec(space))
    select_device(space.data["resources"]["device"])
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


def run_trial(
    space_data: dict[str, Any],
    plan: dict[str, Any],
    payload: dict[str, Any],
    *,
    threads: int | None = None,
) -> dict[str, Any]:
    """One search trial: baseline + plan -> short CLIP-Q fine-tune -> validation accuracy and size.

    ``payload`` holds ``baseline`` (state-dict bytes), ``train`` and ``val``
    (dataset states) and ``info`` (num_classes, in_channels, image_size).
    Returns plain numbers; raises on failure (the caller records it).
    """
    t_start = time.perf_counter()
    configure_threads(threads)
    device = select_device(space_data["resources"]["device"])
    model = model_for(space_data, payload["info"])
    model.load_state_dict(state_from_bytes(payload["baseline"]), strict=True)
    resolved = attach_clipq(model, Plan.from_dict(plan))
    train_data = dataset_from_state(payload["train"])
    val_data = dataset_from_state(payload["val"])
    cfg = train_config(space_data, "trial")
    t_train = time.perf_counter()
    result = train(model, train_data, cfg, device=device, progress=False, desc="trial")
    train_seconds = time.perf_counter() - t_train
    metrics = evaluate(model, val_data, device=device, batch_size=space_data["trial"]["eval_batch_size"])
    if not math.isfinite(metrics["top1"]) or not math.isfinite(metrics["loss"]):
        raise ClipQError(f"trial produced a non-finite validation result ({metrics})")
    model.cpu()
    size = estimate_size(model)
    kept = {s.name[: -len(".weight")]: s.kept_fraction for s in size.layers if s.compressed}
    return {
        "val_top1": float(metrics["top1"]),
        "val_loss": float(metrics["loss"]),
        "rate": float(size.rate),
        "size_bytes": int(size.total_bytes),
        "train_loss": float(result.final_train_loss),
        "kept": kept,
        "layers": {k: v.to_dict() for k, v in resolved.items()},
        "train_seconds": train_seconds,
        "trial_seconds": time.perf_counter() - t_start,
        "node": _node_name(),
        "pid": os.getpid(),
    }


def trial_payload(space: Space, baseline: Baseline) -> dict[str, Any]:
    """What every trial needs, as plain data (shipped once through Ray's object store)."""
    splits = load_dataset(dataset_spec(space))
    if splits.val is None:
        raise ClipQError("the search needs a validation split: set dataset.val_size > 0")
    model = model_for(space.data, splits_info(splits))
    load_baseline(model, baseline)
    return {
        "baseline": state_to_bytes(model),
        "train": splits.train.to_state(),
        "val": splits.val.to_state(),
        "info": splits_info(splits),
    }


def layer_names(space: Space, info: dict[str, int]) -> list[str]:
    return list(compressible_layers(model_for(space.data, info)))


def write_plan_json(path: str | Path, plan: Plan, **extra: Any) -> None:
    write_json(path, {**plan.to_dict(), **extra})


__all__ += [
    "layer_names",
    "splits_info",
    "state_from_bytes",
    "state_to_bytes",
    "trial_payload",
    "write_bytes",
    "write_plan_json",
]
