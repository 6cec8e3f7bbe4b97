"""``final`` on several workers: each run trains data-parallel with Ray Train's ``TorchTrainer`` (DDP).

With ``final.workers`` above 1 (or ``final --workers N``), the compressed run
and then the dense control each train on N Ray Train workers, every worker
with the trials' resources (``cpus_per_trial``, ``gpus_per_trial``). The
global batch is ``final.train.batch_size``: each worker takes ``batch / N``
of it from its own share of every epoch's shuffled order, and DDP averages
the gradients, so a run follows the 1-worker run of the same plan and
global batch. Every worker computes the CLIP-Q weights from identical
full-precision weights, so the quantized weights are bit-identical on every
rank; each run checks that and records one digest per rank.

Rank 0 writes a checkpoint at every epoch end through Ray Train
(``ray.train.report(..., checkpoint=...)``) into
``FINAL_DIR/ray-train/<run>-<setup>``: a worker lost mid-run restarts the
group from it (``search.retries`` times), and a rerun of ``final`` resumes
from the newest one. On a cluster that folder must be on storage every node
sees. Workers talk over gloo on CPUs, NCCL on GPUs.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clipq_search.errors import ClipQError, ConfigError
from clipq_search.search.space import Resources, Space

__all__ = ["check_train_api", "check_workers", "forget", "quantized_digest", "run_ddp"]

TRAIN_FILE, MODEL_FILE, DONE_FILE = "train.pt", "model.pt", "done.json"


def check_workers(workers: int, batch_size: int) -> None:
    """``workers`` divides the global batch (each worker takes an equal part of it)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"final.workers={workers!r} is invalid; use an integer >= 1")
    if batch_size % workers:
        raise ConfigError(
            f"final.train.batch_size={batch_size} does not split over {workers} workers; give a batch size that "
            f"{workers} divides (e.g. {batch_size - batch_size % workers or workers}), or another --workers"
        )


def quantized_digest(model: nn.Module) -> str:
    """SHA-256 of every weight as the forward pass sees it (CLIP-Q's output where attached), in model order."""
    from torch.nn.utils import parametrize

    h = hashlib.sha256()
    with torch.no_grad():
        for name, module in model.named_modules():
            if parametrize.is_parametrized(module):
                for attr in module.parametrizations:
                    h.update(f"{name}.{attr}".encode())
                    h.update(getattr(module, attr).detach().cpu().contiguous().numpy().tobytes())
        if not any(parametrize.is_parametrized(m) for m in model.modules()):  # the dense control
            for key, t in model.state_dict().items():
                h.update(key.encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _Shard:
    """One worker's share of a dataset: every ``world``-th item of each epoch's shuffled order, from ``rank``.

    All workers draw the same order (their generators are seeded alike) and
    have the same number of items, so they run the same number of steps.
    """

    def __init__(self, data: Any, rank: int, world: int) -> None:
        self.data, self.rank, self.world = data, rank, world

    def __len__(self) -> int:
        return len(self.data) // self.world

    def num_batches(self, batch_size: int, *, drop_last: bool = False) -> int:
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.data)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        mine = order[: len(self) * self.world].view(len(self), self.world)[:, self.rank]
        part = self.data.subset(mine)
        yield from part.batches(batch_size, shuffle=False, device=device, drop_last=drop_last)


def _device(resources: Resources) -> torch.device:
    """This worker's device: the GPU Ray Train gave it (its local rank's), else the CPU."""
    import ray
    import ray.train.torch

    if resources.device != "cpu" and ray.get_gpu_ids():
        return ray.train.torch.get_device()
    if resources.device not in (None, "auto", "cpu"):
        raise ClipQError(
            f"resources.device={resources.device} but Ray gave this worker no GPU; set resources.gpus_per_trial "
            "above 0"
        )
    return torch.device("cpu")


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of one run: the fine-tune on its share of the data, checkpoints from rank 0."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from clipq_search.core.plan import Plan
    from clipq_search.core.surgery import attach_clipq
    from clipq_search.search.trial import (
        configure_for_,
        model_for,
        say,
        state_from_bytes,
        teacher_for,
        train_config,
    )
    from clipq_search.search.worker_kills import kill_point
    from clipq_search.training.data import dataset_from_state, loader_workers
    from clipq_search.training.loop import configure_threads, evaluate, train

    space, tag, queue = config["space"], config["tag"], config["queue"]
    payload = ray.get(config["payload"])
    res = space.resources
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    configure_threads(max(1, int(res.cpus_per_trial)))
    device = _device(res)
    configure_for_(device, res)
    model = model_for(space, payload["info"])
    model.load_state_dict(state_from_bytes(payload["baseline"]), strict=True)
    if config["plan"] is not None:
        attach_clipq(model, Plan.from_dict(config["plan"]))
    inner = model
    model = ray.train.torch.prepare_model(model)  # DDP over the workers, on this worker's device
    whole = train_config(space, "final")
    if config["plan"] is None:  # the dense control learns from labels alone
        whole = replace(whole, distill_weight=0.0)
    cfg = replace(whole, batch_size=whole.batch_size // world)
    teacher = teacher_for(space, payload, cfg)
    workers = loader_workers(res.cpus_per_trial)
    data = _Shard(dataset_from_state(payload["train"], num_workers=workers), rank, world)
    val = dataset_from_state(payload["val"], num_workers=workers) if rank == 0 else None
    eval_bs = space.trial.eval_batch_size
    # this worker's copy of the training state, gone with the worker's run; the run's checkpoints are Ray Train's
    with tempfile.TemporaryDirectory(prefix="clipq-ddp-", ignore_cleanup_errors=True) as local:
        state_file = Path(local) / TRAIN_FILE
        start = ray.train.get_checkpoint()
        if start is not None:
            with start.as_directory() as d:
                shutil.copyfile(Path(d) / TRAIN_FILE, state_file)

        def report(metrics: dict[str, Any], files: dict[str, Path | bytes]) -> None:
            """Every rank reports (Ray Train waits for all); rank 0 attaches the checkpoint."""
            if rank != 0:
                ray.train.report(metrics)
                return
            with tempfile.TemporaryDirectory() as d:
                for name, content in files.items():
                    target = Path(d) / name
                    if isinstance(content, bytes):
                        target.write_bytes(content)
                    else:
                        shutil.copyfile(content, target)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))

        def on_epoch(rec: dict[str, float]) -> None:
            line = f"  {tag}: epoch {rec['epoch']:g}/{whole.epochs:g} loss {rec['train_loss']:.4f}"
            if val is not None:
                line += f", val {evaluate(inner, val, device=device, batch_size=eval_bs, amp=cfg.amp)['top1']:.2f}%"
                inner.train()
            if rank == 0:
                say(queue, line + f" ({world} workers)")
            report({"step": int(rec["step"]), "done": 0}, {TRAIN_FILE: state_file})

        with kill_point(f"{tag}-rank{rank}", payload["kill_hook"]):  # test hook (CLIPQ_TEST_KILL); nothing without it
            result = train(
                model, data, cfg, device=device, progress=False, desc=tag, on_epoch_end=on_epoch,
                checkpoint_path=state_file, resume=True, eval_batch_size=eval_bs, teacher=teacher,
                checkpoint_minutes=None,  # Ray Train keeps the epoch ends' checkpoints (on_epoch reports them)
            )
        digests: list[Any] = [None] * world
        torch.distributed.all_gather_object(digests, quantized_digest(inner))
        inner.cpu()
        buf = io.BytesIO()
        torch.save(inner.state_dict(), buf)
        done = {
            "digests": digests,
            "seconds": result.seconds,
            "resumed_from_step": result.resumed_from_step,
            "final_train_loss": result.final_train_loss,
            "steps": result.steps,
            "workers": world,
        }
        report({"step": result.steps, "done": 1}, {TRAIN_FILE: state_file, MODEL_FILE: buf.getvalue(),
                                                    DONE_FILE: json.dumps(done).encode()})


def check_train_api() -> None:
    """Ray Train is in its v1 API here (``RAY_TRAIN_V2_ENABLED=0``, which the commands set before importing
    Ray); a program that imported ``ray.train`` or ``ray.tune`` earlier without it has the v2 API, another one."""
    from ray.train.base_trainer import BaseTrainer
    from ray.train.torch import TorchTrainer

    if not issubclass(TorchTrainer, BaseTrainer):  # v2's trainers are another class tree
        raise ClipQError(
            "final --workers needs Ray Train's v1 API, but this program imported ray.train (or ray.tune) in its v2 "
            "mode; set RAY_TRAIN_V2_ENABLED=0 in the environment, or call clipq_search.search.cluster."
            "use_ray_settings(), before importing Ray"
        )


def _cause(exc: BaseException) -> str:
    """The last line of the innermost error under Ray Train's own (``Type: message`` of the worker's error)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = str(exc).strip().splitlines()
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _latest(experiment: Path) -> Any:
    """The newest checkpoint a run of this experiment wrote (its step is in it), or None."""
    from ray.train import Checkpoint

    best: tuple[int, Path] | None = None
    for path in experiment.glob("*/checkpoint_*"):
        state = path / TRAIN_FILE
        if not state.is_file():
            continue
        try:
            step = int(torch.load(state, map_location="cpu", weights_only=True)["step"])
        except Exception:  # noqa: BLE001 - a checkpoint cut short by a kill: an older one serves
            continue
        if best is None or step > best[0]:
            best = (step, path)
    return Checkpoint.from_directory(str(best[1])) if best is not None else None


def run_ddp(
    space: Space,
    plans: dict[str, dict[str, Any] | None],
    payload_ref: Any,
    storage: Path,
    setup: str,
    workers: int,
    *,
    retries: int,
    log: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """Each run of ``plans`` (tag -> plan, None for the dense control) on ``workers`` DDP workers, in turn.

    Returns per tag what ``final``'s 1-worker runs return (``state`` bytes,
    ``seconds``, ``resumed_from_step``, ``final_train_loss``) plus ``digests``
    (one per rank). Raises ``ClipQError`` when the ranks' quantized weights
    differ or a run fails beyond its retries.
    """
    check_train_api()
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from clipq_search.search.trial import relay
    from clipq_search.search.worker_kills import quiet_tune

    res = space.resources
    use_gpu = res.gpus_per_trial > 0 and res.device != "cpu"
    per_worker = {"CPU": res.cpus_per_trial, **({"GPU": res.gpus_per_trial} if use_gpu else {})}
    have = ray.cluster_resources()
    short = [f"{workers * v:g} {k}s (it has {have.get(k, 0):g})" for k, v in per_worker.items()
             if workers * v > have.get(k, 0) + 1e-9]
    if short:  # else Ray Train would wait for ever for workers that never fit
        raise ClipQError(
            f"final on {workers} workers needs {' and '.join(short)} in the Ray cluster, {workers} times "
            "resources.cpus_per_trial / gpus_per_trial; give fewer --workers, smaller resources, or a larger cluster"
        )
    quiet_tune()
    out: dict[str, dict[str, Any]] = {}
    for tag, plan in plans.items():
        name = f"{tag}-{setup}"
        start = _latest(storage / name)
        queue = Queue()
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"space": space, "plan": plan, "payload": payload_ref, "tag": tag, "queue": queue},
            scaling_config=ScalingConfig(
                num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker, trainer_resources={"CPU": 0}
            ),
            run_config=RunConfig(
                name=name,
                storage_path=str(storage),
                failure_config=FailureConfig(max_failures=retries),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                verbose=0,
            ),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            resume_from_checkpoint=start,
        )
        if start is not None:
            log(f"  {tag}: resuming its {workers}-worker run from {start.path}")
        box: dict[str, Any] = {}

        def fit(trainer: Any = trainer, box: dict[str, Any] = box) -> None:
            try:
                box["result"] = trainer.fit()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=fit, daemon=True)
        thread.start()
        drain = relay(queue, log)
        while thread.is_alive():
            thread.join(timeout=1.0)
            drain()
        drain()
        if "error" in box:
            raise ClipQError(
                f"final {tag} run on {workers} workers failed ({_cause(box['error'])}); rerun the same "
                "command to resume from its last checkpoint"
            ) from box["error"]
        checkpoint = box["result"].checkpoint
        with checkpoint.as_directory() as d:
            done = json.loads((Path(d) / DONE_FILE).read_text())
            state = (Path(d) / MODEL_FILE).read_bytes()
        if len(set(done["digests"])) != 1:
            raise ClipQError(
                f"final {tag} run: the {workers} workers ended with different weights ({done['digests']}); "
                "report this as a bug"
            )
        out[tag] = {**done, "state": state}
    return out


def forget(storage: Path, setup: str, tags: list[str]) -> None:
    """Delete the finished runs' Ray Train folders (their checkpoints)."""
    for tag in tags:
        shutil.rmtree(storage / f"{tag}-{setup}", ignore_errors=True)
    if storage.is_dir() and not any(storage.iterdir()):
        storage.rmdir()
