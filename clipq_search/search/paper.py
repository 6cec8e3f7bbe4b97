"""The CLIP-Q paper's own (p, b) selection: per-layer Bayesian optimisation without fine-tuning.

For each layer i (or group) independently, minimise ``eps(theta) - lambda * c_i(theta)``
with a Gaussian-process sampler and expected improvement, where ``eps`` is the
top-1 error on a fixed subset of the training set with only that layer
pruned-quantized, and ``c_i = (m_i - s_i) / sum_j m_j`` is the share of the
network's weight storage the layer saves under the sparse encoding. ``b`` is
searched as a continuous value and rounded. Layers run in parallel as Ray tasks;
each lambda of the sweep yields one whole plan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
import torch

from clipq_search.core.encoding import sparse_layer_bytes
from clipq_search.core.operator import clipq_quantize
from clipq_search.core.plan import compressible_tensors
from clipq_search.search.space import LayerSearchParam, Space
from clipq_search.search.worker_kills import gather, kill_point
from clipq_search.training.data import ArrayDataset, FolderDataset, dataset_from_state, loader_workers

__all__ = ["paper_layer_search", "paper_plans"]


def paper_layer_search(
    space: Space, unit: LayerSearchParam, payload: dict[str, Any], *, threads: int = 1
) -> dict[float, tuple[float, int, float, float]]:
    """Best (p, bits, error, c_i) of one unit for every lambda of ``search.paper``."""
    from clipq_search.search.trial import model_for, state_from_bytes, worker_device
    from clipq_search.training.loop import configure_threads, evaluate

    configure_threads(threads)
    device = worker_device(space.resources)
    cfg = space.search.paper
    model = model_for(space, payload["info"])
    model.load_state_dict(state_from_bytes(payload["baseline"]), strict=True)
    model.eval()
    model.to(device)
    train = dataset_from_state(payload["train"], num_workers=loader_workers(space.resources.cpus_per_trial))
    n = min(cfg.subset, len(train))
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(space.search.seed))[:n]
    # Every evaluation sees the same images: no augmentation; in-memory images are moved to the device once.
    if isinstance(train, FolderDataset):
        subset: ArrayDataset | FolderDataset = train.subset(torch.sort(idx).values, train=False)
    else:
        subset = train.subset(torch.sort(idx).values).to(device)
    eval_bs = space.trial.eval_batch_size
    tensors = compressible_tensors(model)
    total_bits = sum(32 * t.tensor().numel() for t in tensors.values())
    originals = {name: tensors[name].tensor().detach().clone() for name in unit.layers}
    cache: dict[tuple[float, int], tuple[float, float]] = {}

    def measure(p: float, bits: int) -> tuple[float, float]:
        key = (round(p, 6), bits)
        if key not in cache:
            saved = 0.0
            with torch.no_grad():
                for name, w in originals.items():
                    q = clipq_quantize(w, p, bits)
                    tensors[name].tensor().copy_(q)
                    saved += 32 * w.numel() - 8 * sparse_layer_bytes(tensors[name].key, q, bits)
            err = 1.0 - evaluate(model, subset, device=device, batch_size=eval_bs)["top1"] / 100.0
            with torch.no_grad():
                for name, w in originals.items():
                    tensors[name].tensor().copy_(w)
            cache[key] = (err, saved / total_bits)
        return cache[key]

    out: dict[float, tuple[float, int, float, float]] = {}
    with kill_point("paper", payload["kill_hook"]):  # test hook (CLIPQ_TEST_KILL); nothing without it
        for lam in cfg.lambdas:
            sampler = optuna.samplers.GPSampler(seed=space.search.seed, n_startup_trials=min(8, cfg.evals_per_layer))
            study = optuna.create_study(direction="minimize", sampler=sampler)

            def objective(trial: optuna.Trial, lam: float = lam) -> float:
                p = trial.suggest_float("p", *unit.p) if unit.p[0] < unit.p[1] else unit.p[0]
                if unit.bits[0] < unit.bits[1]:
                    bits = int(round(trial.suggest_float("b", unit.bits[0] - 0.49, unit.bits[1] + 0.49)))
                else:
                    bits = unit.bits[0]
                err, c = measure(p, bits)
                trial.set_user_attr("pb", (p, bits, err, c))
                return err - lam * c

            study.optimize(objective, n_trials=cfg.evals_per_layer)
            out[float(lam)] = tuple(study.best_trial.user_attrs["pb"])  # type: ignore[assignment]
    return out


def paper_plans(
    space: Space, units: list[LayerSearchParam], payload: dict[str, Any], *, log: Callable[[str], None] = print
) -> list[tuple[float, dict[str, Any]]]:
    """Run the per-layer searches on Ray (one task per unit) and return one param set per lambda."""
    import ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    res = space.resources
    # Retries are gather's: a layer's search whose worker Ray kills runs again, up to search.retries times.
    task = ray.remote(num_cpus=res.cpus_per_trial, num_gpus=res.gpus_per_trial, max_retries=0)(
        paper_layer_search
    )
    payload_ref = ray.put(payload)
    lambdas = space.search.paper.lambdas
    log(
        f"paper strategy: per-layer GP search for {len(units)} layer(s) x {len(lambdas)} lambda(s), "
        f"{space.search.paper.evals_per_layer} evaluations each, in parallel on Ray"
    )
    threads = max(1, int(res.cpus_per_trial))
    done = gather(
        lambda i: task.remote(space, units[i], payload_ref, threads=threads),
        list(range(len(units))),
        retries=space.search.retries,
        what=lambda i: f"the paper strategy's search of layer {units[i].key}",
        log=log,
    )
    results = [done[i] for i in range(len(units))]
    plans = []
    for lam in lambdas:
        params: dict[str, Any] = {}
        desc = []
        for u, r in zip(units, results, strict=True):
            p, bits, err, c = r[float(lam)]
            if u.p[0] < u.p[1]:
                params[f"p:{u.key}"] = float(p)
            if u.bits[0] < u.bits[1]:
                params[f"bits:{u.key}"] = int(bits)
            desc.append(f"{u.key}=({p:.2f},{bits})")
        log(f"  lambda {lam:g}: {' '.join(desc)}")
        plans.append((float(lam), params))
    return plans
