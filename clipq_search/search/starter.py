"""``clipq-search init``: a commented starter search space built from the real model.

The layer names, their shapes and sizes, and the groups come from building
the model (untrained, no weights fetched); the YAML it writes loads with
:func:`clipq_search.search.space.load_space` and resolves against the model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from clipq_search.core.plan import compressible_tensors
from clipq_search.errors import ConfigError
from clipq_search.training.models import build_model

__all__ = ["DATASET_SHAPES", "StarterLayer", "group_layers", "starter_space"]

# (num_classes, in_channels, image_size) the model is built with for each dataset.
DATASET_SHAPES: Mapping[str, tuple[int, int, int]] = {
    "fashion-mnist": (10, 1, 28),
    "mnist": (10, 1, 28),
    "cifar10": (10, 3, 32),
    "imagefolder": (1000, 3, 224),
}

# Above this many compressible layers the starter searches groups of layers, not each one:
# every searched unit adds two dimensions, and the samplers slow down and need more trials.
MAX_UNITS = 12


@dataclass(frozen=True)
class StarterLayer:
    name: str
    kind: str
    shape: tuple[int, ...]
    weights: int


def _layers(model: nn.Module) -> list[StarterLayer]:
    return [
        StarterLayer(name, type(t.module).__name__, tuple(t.tensor().shape), t.tensor().numel())
        for name, t in compressible_tensors(model).items()
    ]


def group_layers(names: list[str], max_units: int = MAX_UNITS) -> dict[str, list[str]]:
    """Group layer names by a common name prefix, in model order.

    Takes the shallowest prefix depth that gives 3 to ``max_units`` groups;
    where one depth gives too few and the next too many, consecutive groups of
    the deeper one are merged. Returns ``{}`` when the layers are few enough
    to search one by one.
    """
    if len(names) <= max_units:
        return {}
    previous: dict[str, list[str]] = {}
    groups: dict[str, list[str]] = {}
    for depth in range(1, 1 + max(len(n.split(".")) for n in names)):
        groups = {}
        for n in names:
            groups.setdefault(".".join(n.split(".")[:depth]), []).append(n)
        if len(groups) > max_units:
            break
        if len(groups) >= 3:
            return _named(groups)
        previous = groups
    if len(groups) <= max_units:  # every depth gave fewer than 3 groups
        return _named(previous or groups)
    keys = list(groups)
    size = -(-len(keys) // max_units)
    merged = {}
    for i in range(0, len(keys), size):
        chunk = keys[i : i + size]
        merged[chunk[0] if len(chunk) == 1 else f"{chunk[0]}-{chunk[-1]}"] = [n for k in chunk for n in groups[k]]
    return _named(merged)


def _named(groups: dict[str, list[str]]) -> dict[str, list[str]]:
    return {re.sub(r"[^A-Za-z0-9_]+", "_", key).strip("_") or "layers": members for key, members in groups.items()}


def _yaml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def starter_space(model_ref: str, dataset: str = "fashion-mnist") -> str:
    """The YAML text of a commented starter space for ``model_ref`` on ``dataset``."""
    if dataset not in DATASET_SHAPES:
        raise ConfigError(f"--dataset {dataset!r} is unknown; choose one of {', '.join(DATASET_SHAPES)}")
    num_classes, in_channels, image_size = DATASET_SHAPES[dataset]
    model = build_model(model_ref, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    layers = _layers(model)
    if not layers:
        raise ConfigError(
            f"model {model_ref!r} has no nn.Linear or nn.Conv1d/2d/3d layer to compress; "
            "CLIP-Q compresses the weights of those layers"
        )
    total = sum(x.weights for x in layers)
    groups = group_layers([x.name for x in layers])
    first, last = layers[0].name, layers[-1].name
    slug = re.sub(r"[^A-Za-z0-9_]+", "_", model_ref.split(":")[-1]).strip("_").lower() or "model"
    name = f"{slug}_{dataset.replace('-', '')}"
    width = max(len(x.name) for x in layers)

    out = [
        f"# Starter search space for {model_ref} on {dataset}, written by `clipq-search init`.",
        "# Edit it, then: clipq-search search THIS_FILE   (docs/search-space.md lists every key)",
        f"name: {name}",
        f"description: {_yaml_str(f'{model_ref} on {dataset}, per-layer CLIP-Q search')}",
        f"model: {_yaml_str(model_ref)}",
        "dataset:",
        f"  name: {dataset}",
    ]
    if dataset == "imagefolder":
        out += ["  root: null                # REQUIRED: folder with train/ and val/ (one sub-folder per class)"]
    else:
        out += ["  root: null                # null: the default folder of this dataset"]
    out += [
        "  val_size: 5000            # held out of the training set; the search scores on it",
        "baseline:",
        "  checkpoint: null          # your trained weights (a state_dict .pt file); null trains one first",
        "  train:",
        "    epochs: null            # null: the model's default recipe (docs/search-space.md)",
        "trial:",
        "  train:",
        "    epochs: 1.0             # short CLIP-Q fine-tune per trial: the search's proxy",
        "    lr: 0.01",
        "final:",
        "  train:",
        "    epochs: 20              # full-length CLIP-Q fine-tune of the chosen plan",
        "    lr: 0.01",
        f"# The model's {len(layers)} compressible layers ({total:,} weights), in model order:",
    ]
    for x in layers:
        share = 100.0 * x.weights / total
        out.append(f"#   {x.name:<{width}}  {x.kind:<8} {str(list(x.shape)):<22} {x.weights:>11,} ({share:4.1f}%)")
    out += [
        "layers:",
        "  default:                  # p: fraction pruned per sign; bits: 2..8 (2^b - 1 levels)",
        "    p: [0.5, 0.95]",
        "    bits: [2, 6]",
        "  overrides:                # the first and last layers are small and sensitive: search milder",
        f"    {_yaml_str(first)}:",
        "      p: [0.0, 0.9]",
        "      bits: [3, 8]",
    ]
    if last != first:
        out += [f"    {_yaml_str(last)}:", "      p: [0.0, 0.9]", "      bits: [3, 8]"]
    out.append("  dense: []                 # layers to leave uncompressed (names or patterns)")
    if groups:
        n_layers, n_groups = len(layers), len(groups)
        out.append(f"  groups:                   # {n_layers} layers searched as {n_groups} groups, one (p, bits) each")
        for key, members in groups.items():
            out.append(f"    {key}: [{', '.join(_yaml_str(m) for m in members)}]")
    else:
        out.append("  groups: {}                # each layer is searched on its own")
    out += [
        "search:",
        "  sampler: auto             # auto (GP while it keeps pace, then TPE), gp, tpe, nsga2, random or paper",
        "  trials: 48",
        "  concurrency: 2            # trials at once",
        "  seed: 0",
        "resources:",
        "  device: auto              # auto (the GPU Ray gives a trial, else CPU), cpu, cuda or mps",
        "  cpus_per_trial: 1",
        "  gpus_per_trial: 0         # e.g. 1, or 0.25 to pack four trials on one GPU",
    ]
    return "\n".join(out) + "\n"
