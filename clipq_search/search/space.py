"""Search-space files: schema, validation, ``--set`` overrides, and the per-layer parameters.

A space is a YAML mapping (see ``docs/search-space.md`` and ``search_spaces/``).
It is validated against :data:`SCHEMA` on load: unknown keys get the closest
known key suggested, values are type- and range-checked with messages that
name the key. A :class:`Space` is built once from the validated data and read
through typed, read-only sections (``space.search.trials``,
``space.resources.cpus_per_trial``); its plain data (``to_dict``, ``to_yaml``)
is written to the run directory.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from clipq_search._io import MiB, read_regular
from clipq_search.core.plan import BITS_RANGE, LayerConfig, Plan, check_pattern, matches
from clipq_search.errors import ConfigError, clip, shown
from clipq_search.training import DATASET_NAMES

__all__ = [
    "SAMPLERS",
    "SCHEMA",
    "SEED_MAX",
    "BaselineSettings",
    "DatasetSettings",
    "FinalSettings",
    "LayerSearchParam",
    "LayerSettings",
    "PaperSettings",
    "Resources",
    "SearchSettings",
    "Space",
    "TrainSettings",
    "TrialSettings",
    "apply_override",
    "list_presets",
    "load_space",
    "preset_text",
]

SAMPLERS = ("auto", "tpe", "gp", "nsga2", "random", "paper")
PRESETS_PACKAGE = "clipq_search.presets"  # search_spaces/, installed as package data
SPACE_FILE_LIMIT = 1 * MiB  # the largest space file read: real ones are a few kB; YAML parses at about 1 MB/s
# Seeds are 32-bit everywhere (numpy's and Optuna's samplers take seeds below 2**32).
SEED_MAX = 2**32 - 1


class _Refused(Exception):
    """YAML this project does not read (an alias, too deep a nesting); the message says why."""


class _Loader(yaml.SafeLoader):
    """Safe YAML, with YAML 1.2's numbers and without aliases.

    ``1e-3`` is a number (YAML 1.1, PyYAML's default, reads it as a string).
    An alias (``*name``) repeats a node without writing it out: a few hundred
    bytes of them expand to gigabytes, so spaces may not use them; nesting is
    bounded for the same reason.
    """

    MAX_DEPTH = 32
    MAX_NODES = 20_000  # a space holds tens to a few thousand values; parsing stops early beyond this

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            line = self.peek_event().start_mark.line + 1
            raise _Refused(f"uses a YAML alias (*name) at line {line}; aliases are not accepted: write the value out")
        depth = getattr(self, "_depth", 0)
        if depth >= self.MAX_DEPTH:
            line = self.peek_event().start_mark.line + 1
            raise _Refused(f"nests deeper than {self.MAX_DEPTH} levels at line {line}; a space is a few levels deep")
        self._nodes = getattr(self, "_nodes", 0) + 1
        if self._nodes > self.MAX_NODES:
            line = self.peek_event().start_mark.line + 1
            raise _Refused(f"holds more than {self.MAX_NODES:,} values (at line {line}); a space holds a few hundred")
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth


_Loader.add_implicit_resolver(  # the YAML 1.2 floats YAML 1.1 misses: 1e-3, 2E5, 1.5e3
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class _Dumper(yaml.SafeDumper):
    """Safe YAML that writes a repeated value out again (a saved space is read back without aliases)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def yaml_load(text: str) -> Any:
    """Parse YAML as spaces are read (:class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass(frozen=True)
class Field:
    """One leaf of the schema: its default, a type description and a checker.

    ``kind`` may be a function giving the description, for one that needs an
    import the space's reading does without (the model registry needs torch).
    """

    default: Any
    kind: str | Callable[[], str]
    check: Callable[[Any], bool]
    help: str = ""

    def described(self) -> str:
        return self.kind if isinstance(self.kind, str) else self.kind()


def _num(
    lo: float | None = None, hi: float | None = None, *, open_lo: bool = False, open_hi: bool = False,
    optional: bool = False,
) -> Field:
    def check(v: Any) -> bool:
        if v is None:
            return optional
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if lo is not None and (v <= lo if open_lo else v < lo):
            return False
        return hi is None or (v < hi if open_hi else v <= hi)

    rng = (f"{'(' if open_lo else '['}{lo if lo is not None else '-inf'}, "
           f"{hi if hi is not None else 'inf'}{')' if open_hi else ']'}")
    return Field(None, f"a number in {rng}" + (" or null" if optional else ""), check)


def _int(lo: int | None = None, hi: int | None = None, *, optional: bool = False) -> Field:
    def check(v: Any) -> bool:
        if v is None:
            return optional
        if isinstance(v, bool) or not isinstance(v, int):
            return False
        return (lo is None or v >= lo) and (hi is None or v <= hi)

    rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
    return Field(None, f"an integer in {rng}" + (" or null" if optional else ""), check)


def _str(*choices: str, optional: bool = False) -> Field:
    def check(v: Any) -> bool:
        if v is None:
            return optional
        return isinstance(v, str) and (not choices or v in choices)

    kind = ("one of " + ", ".join(choices)) if choices else "a string"
    return Field(None, kind + (" or null" if optional else ""), check)


def _bool() -> Field:
    return Field(None, "true or false", lambda v: isinstance(v, bool))


def _list_of_str() -> Field:
    return Field(None, "a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))


def _rungs() -> Field:
    def check(v: Any) -> bool:
        if v is None:
            return True
        numbers = isinstance(v, list) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v
        )
        return numbers and len(v) > 0 and v[0] > 0 and all(a < b for a, b in itertools.pairwise(v))

    return Field(None, "null or an increasing list of positive numbers, e.g. [1, 3, 9]", check)


def _list_of_num() -> Field:
    return Field(
        None,
        "a list of numbers",
        lambda v: (
            isinstance(v, list)
            and len(v) > 0
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        ),
    )


def _d(field: Field, default: Any) -> Field:
    return Field(default, field.kind, field.check, field.help)


def _train_schema(epochs: float | None, lr: float | None, schedule: str | None) -> dict[str, Field]:
    # null means "the model's shipped default" (train.DEFAULT_PRETRAIN) for the baseline.
    return {
        "epochs": _d(_num(0, None, open_lo=True, optional=True), epochs),
        "batch_size": _d(_int(1, optional=True), None),
        "lr": _d(_num(0, None, optional=True), lr),
        "momentum": _d(_num(0, 1, open_hi=True, optional=True), None),
        "weight_decay": _d(_num(0, None, optional=True), None),
        "schedule": _d(_str("cosine", "step", "constant", optional=True), schedule),
        "step_epochs": _d(_num(0, None, optional=True), None),
        "gamma": _d(_num(0, 1, optional=True), None),
        "nesterov": _d(Field(None, "true, false or null", lambda v: v is None or isinstance(v, bool)), None),
        "seed": _d(_int(0, SEED_MAX, optional=True), None),
        "amp": _d(Field(None, "true, false or null", lambda v: v is None or isinstance(v, bool)), None),
        "max_steps": _d(_int(1, optional=True), None),
        # the dense baseline as teacher of the CLIP-Q fine-tunes: (1 - weight) * CE + weight * T^2 * KL
        "distill": {
            "weight": _d(_num(0, 1), 0.0),
            "temperature": _d(_num(0, None, open_lo=True), 4.0),
        },
    }


# Layer ranges: `p: [lo, hi]` or a fixed number; `bits: [lo, hi]` or a fixed integer.
_RANGE_KIND = "a [low, high] pair or a single value"
_LAYER_RANGE = {
    "p": _d(Field(None, _RANGE_KIND, lambda v: True), [0.5, 0.98]),
    "bits": _d(Field(None, _RANGE_KIND, lambda v: True), [2, 6]),
}


def _registered_models() -> list[str]:
    from clipq_search.training.models import list_models  # imports torch: only when a model name is checked

    return list_models()


def _model_kind() -> str:
    return (
        f"a registered model ({', '.join(_registered_models())}), 'torchvision:<name>', 'timm:<name>' or "
        "'package.module:factory'"
    )


SCHEMA: dict[str, Any] = {
    "name": _d(_str(optional=True), None),
    "description": _d(_str(optional=True), None),
    "model": _d(
        Field(
            None,
            _model_kind,
            lambda v: isinstance(v, str) and (":" in v or v in _registered_models()),
        ),
        "lenet300",
    ),
    # Published weights of a torchvision or timm model (IMAGENET1K_V2, DEFAULT), read from the local cache.
    "model_weights": _d(_str(optional=True), None),
    "dataset": {
        "name": _d(_str(*DATASET_NAMES), "fashion-mnist"),
        "root": _d(_str(optional=True), None),
        "val_size": _d(_int(1), 5000),
        "split_seed": _d(_int(0, SEED_MAX), 0),
        "image_size": _d(_int(1, optional=True), None),  # image folders: the crops' side (null: 224)
    },
    "baseline": {
        "checkpoint": _d(_str(optional=True), None),
        "train": _train_schema(None, None, None),
    },
    "trial": {
        "train": _train_schema(1.0, 0.01, "cosine"),
        "eval_batch_size": _d(_int(1), 1000),
        # Multi-fidelity (MO-ASHA): budgets as multiples of trial.train.epochs; null: every trial runs one budget.
        "rungs": _d(_rungs(), None),
        "reduction_factor": _d(_num(1, None, open_lo=True), 3),
    },
    "final": {
        "train": _train_schema(20.0, 0.01, "cosine"),
        "workers": _d(_int(1), 1),  # data-parallel workers of each final run (Ray Train, DDP); 1: one Ray task
        "checkpoint_minutes": _d(_num(0, open_lo=True, optional=True), 10),  # also inside an epoch; null: epoch ends
    },
    "layers": {
        "default": dict(_LAYER_RANGE),
        "overrides": _d(
            Field(None, "a mapping of layer name or pattern to {p: .., bits: ..}", lambda v: isinstance(v, dict)), {}
        ),
        "dense": _d(_list_of_str(), []),
        "groups": _d(
            Field(
                None,
                "a mapping of group name to a list of layer names or patterns",
                lambda v: (
                    isinstance(v, dict)
                    and all(isinstance(x, list) and all(isinstance(y, str) for y in x) for x in v.values())
                ),
            ),
            {},
        ),
    },
    "search": {
        "sampler": _d(_str(*SAMPLERS), "auto"),
        "trials": _d(_int(1), 32),
        "concurrency": _d(_int(1), 2),
        "seed": _d(_int(0, SEED_MAX), 0),
        "max_accuracy_drop": _d(_num(0, 100, optional=True), None),
        "retries": _d(_int(0, 10), 1),
        # Where Ray Tune keeps the trials' rung checkpoints (null: RUN_DIR/ray); on several machines a folder
        # every node mounts (NFS) or a cloud URI (s3://...), as Ray Tune requires for checkpoints across nodes.
        "checkpoint_storage": _d(_str(optional=True), None),
        "paper": {
            "lambdas": _d(_list_of_num(), [1.0, 3.0, 10.0, 30.0]),
            "evals_per_layer": _d(_int(2), 30),
            "subset": _d(_int(1), 2000),
        },
    },
    "resources": {
        "device": _d(_str(optional=True), "auto"),
        "cpus_per_trial": _d(_num(0.01), 1),
        "gpus_per_trial": _d(_num(0), 0),
        "deterministic": _d(_bool(), False),  # reproducible CUDA runs (deterministic algorithms, no cuDNN autotuning)
        "channels_last": _d(Field(None, "true, false or null", lambda v: v is None or isinstance(v, bool)), None),
        "cuda_graphs": _d(_bool(), False),  # replay each layer's CLIP-Q operator as a recorded CUDA graph
    },
}


def _defaults(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (_defaults(v) if isinstance(v, Mapping) else copy.deepcopy(v.default)) for k, v in schema.items()}


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"


def _merge(base: dict[str, Any], user: Mapping[str, Any], schema: Mapping[str, Any], path: str, source: str) -> None:
    for key, value in user.items():
        where = f"{path}{key}"
        if key not in schema:
            raise ConfigError(f"{source}: unknown key {shown(where)}; {_suggest(str(key)[:100], list(schema))}")
        sub = schema[key]
        if isinstance(sub, Mapping):
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{source}: {shown(where)} must be a mapping with keys {', '.join(sub)}, got {shown(value)}"
                )
            _merge(base[key], value, sub, where + ".", source)
        else:
            if not sub.check(value):
                raise ConfigError(f"{source}: {where}={shown(value)} is invalid; expected {sub.described()}")
            base[key] = copy.deepcopy(value)


def _parse_range(
    value: Any, *, what: str, integer: bool, lo: float, hi: float, open_hi: bool, where: str
) -> tuple[float, float]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ConfigError(f"{where}.{what}={shown(value)} is invalid; expected [low, high] or a single value")
        low, high = value
    else:
        low = high = value
    for v in (low, high):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if integer:
            ok = ok and float(v).is_integer()
        ok = ok and lo <= v and (v < hi if open_hi else v <= hi)
        if not ok:
            rng = f"[{lo}, {hi})" if open_hi else f"[{lo}, {hi}]"
            kind = "integers" if integer else "numbers"
            raise ConfigError(f"{where}.{what}={shown(value)} is invalid; {what} must be {kind} in {rng}")
    if low > high:
        raise ConfigError(f"{where}.{what}={shown(value)} has low > high; write [low, high] with low <= high")
    return (int(low), int(high)) if integer else (float(low), float(high))


def _p_bits_ranges(p: Any, bits: Any, where: str) -> tuple[tuple[float, float], tuple[int, int]]:
    """A layer's p range in [0, 1) and bits range in ``BITS_RANGE``, each a [low, high] pair or one value."""
    return (
        _parse_range(p, what="p", integer=False, lo=0.0, hi=1.0, open_hi=True, where=where),  # type: ignore[return-value]
        _parse_range(bits, what="bits", integer=True, lo=BITS_RANGE[0], hi=BITS_RANGE[1], open_hi=False, where=where),
    )


@dataclass(frozen=True)
class LayerSearchParam:
    """One searched unit: a layer or a group of layers sharing (p, bits)."""

    key: str
    layers: tuple[str, ...]
    p: tuple[float, float]
    bits: tuple[int, int]


# -- typed, read-only sections -------------------------------------------------------------
# One frozen dataclass per section of SCHEMA, with the same keys: built once, from validated data.


@dataclass(frozen=True)
class TrainSettings:
    """``baseline.train``, ``trial.train`` or ``final.train``: ``None`` means the default (see ``given``)."""

    epochs: float | None
    batch_size: int | None
    lr: float | None
    momentum: float | None
    weight_decay: float | None
    schedule: str | None
    step_epochs: float | None
    gamma: float | None
    nesterov: bool | None
    seed: int | None
    amp: bool | None
    max_steps: int | None
    distill: DistillSettings

    def given(self) -> dict[str, Any]:
        """The settings the space sets, as ``TrainConfig`` fields (nulls left out: they fall back to the defaults)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "distill"}
        if self.distill.weight > 0:
            out.update(distill_weight=self.distill.weight, distill_temperature=self.distill.temperature)
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class DistillSettings:
    """``<section>.train.distill``: the weight of the dense teacher's softened outputs in the loss (0: off)."""

    weight: float
    temperature: float


@dataclass(frozen=True)
class DatasetSettings:
    name: str
    root: str | None
    val_size: int
    split_seed: int
    image_size: int | None


@dataclass(frozen=True)
class BaselineSettings:
    checkpoint: str | None  # a user's dense state dict, used instead of pretraining one
    train: TrainSettings


@dataclass(frozen=True)
class TrialSettings:
    train: TrainSettings
    eval_batch_size: int
    rungs: tuple[float, ...] | None  # multiples of train.epochs at which MO-ASHA decides; None: one budget
    reduction_factor: float  # MO-ASHA: a trial goes on from a rung when among the best 1/reduction_factor there


@dataclass(frozen=True)
class FinalSettings:
    train: TrainSettings
    workers: int
    checkpoint_minutes: float | None


@dataclass(frozen=True)
class PaperSettings:
    """``search.paper``: the paper's per-layer procedure (``--sampler paper``)."""

    lambdas: tuple[float, ...]
    evals_per_layer: int
    subset: int


@dataclass(frozen=True)
class SearchSettings:
    sampler: str
    trials: int
    concurrency: int
    seed: int
    max_accuracy_drop: float | None
    retries: int
    checkpoint_storage: str | None
    paper: PaperSettings


@dataclass(frozen=True)
class Resources:
    """``resources``: what each trial, task or training worker gets, and how its device is set up."""

    device: str | None
    cpus_per_trial: float
    gpus_per_trial: float
    deterministic: bool
    channels_last: bool | None
    cuda_graphs: bool


Ranges = tuple[tuple[float, float], tuple[int, int]]  # a layer's (p low, p high), (bits low, bits high)


@dataclass(frozen=True)
class LayerSettings:
    """``layers``, parsed: the default ranges, the overrides' ranges by name or pattern, dense layers, groups."""

    default: Ranges
    overrides: tuple[tuple[str, Ranges], ...]  # (name or pattern, its ranges), in the file's order
    dense: tuple[str, ...]
    groups: tuple[tuple[str, tuple[str, ...]], ...]  # (group name, its members), in the file's order


def _train_settings(node: Mapping[str, Any]) -> TrainSettings:
    return TrainSettings(**{**node, "distill": DistillSettings(**node["distill"])})


def _search_settings(node: Mapping[str, Any]) -> SearchSettings:
    paper = node["paper"]
    return SearchSettings(**{**node, "paper": PaperSettings(**{**paper, "lambdas": tuple(paper["lambdas"])})})


def _layer_settings(layers: Mapping[str, Any], source: str) -> LayerSettings:
    """The ``layers`` section's ranges, each checked (raises ``ConfigError`` naming the key)."""
    default = _p_bits_ranges(layers["default"]["p"], layers["default"]["bits"], f"{source}: layers.default")
    overrides: dict[str, Ranges] = {}
    for key, spec in layers["overrides"].items():
        where = f"{source}: layers.overrides.{clip(str(key))}"
        if not isinstance(spec, Mapping) or not set(spec) <= {"p", "bits"} or not spec:
            example = "{p: [0.5, 0.9], bits: 4}"
            raise ConfigError(f"{where} must be a mapping with p and/or bits, e.g. {example}, got {shown(spec)}")
        overrides[str(key)] = _p_bits_ranges(spec.get("p", list(default[0])), spec.get("bits", list(default[1])), where)
    groups = tuple((str(g), tuple(m)) for g, m in layers["groups"].items())
    return LayerSettings(default, tuple(overrides.items()), tuple(layers["dense"]), groups)


class Space:
    """A validated search space, read through typed, read-only sections.

    ``model``, ``model_weights``, ``dataset``, ``baseline``, ``trial``, ``final``,
    ``layers``, ``search`` and ``resources`` mirror the file's keys (frozen
    dataclasses). The space never changes once built: :meth:`with_search` makes
    a new one (command-line options such as ``--trials``). ``to_dict`` and
    ``to_yaml`` give the resolved plain data (written to the run directory).
    A space pickles as it is, so Ray ships it to the workers.
    """

    def __init__(self, data: Mapping[str, Any], source: str = "space") -> None:
        data = copy.deepcopy(dict(data))
        self._set(
            _data=data,
            source=source,
            model=data["model"],
            model_weights=data["model_weights"],
            dataset=DatasetSettings(**data["dataset"]),
            baseline=BaselineSettings(data["baseline"]["checkpoint"], _train_settings(data["baseline"]["train"])),
            trial=TrialSettings(
                _train_settings(data["trial"]["train"]),
                data["trial"]["eval_batch_size"],
                tuple(float(r) for r in data["trial"]["rungs"]) if data["trial"]["rungs"] is not None else None,
                float(data["trial"]["reduction_factor"]),
            ),
            final=FinalSettings(
                _train_settings(data["final"]["train"]), data["final"]["workers"], data["final"]["checkpoint_minutes"]
            ),
            layers=_layer_settings(data["layers"], source),
            search=_search_settings(data["search"]),
            resources=Resources(**data["resources"]),
        )
        # search.concurrency above search.trials is allowed: it is capped by the number of trials to run.
        if self.baseline.train.distill.weight > 0:
            raise ConfigError(
                f"{source}: baseline.train.distill.weight={shown(self.baseline.train.distill.weight)} is invalid: "
                "the dense baseline is the teacher, it learns from labels alone; set trial.train.distill or "
                "final.train.distill instead"
            )

    def _set(self, **values: Any) -> None:
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"a Space is read-only; make another with with_search(), not by setting {key}")

    def with_search(self, **changes: Any) -> Space:
        """This space with some ``search`` settings replaced (``trials``, ``concurrency``, ``sampler``, ``seed``).

        Each value is checked as the schema checks the file's; the layers are not parsed again.
        """
        schema = SCHEMA["search"]
        data = self.to_dict()
        for key, value in changes.items():
            if key not in schema or not isinstance(schema[key], Field):
                raise TypeError(f"with_search: {key!r} is not a search setting")
            if not schema[key].check(value):
                raise ConfigError(f"{key}={value!r} is invalid; give {schema[key].described()}")
            data["search"][key] = copy.deepcopy(value)
        new = copy.copy(self)
        new._set(_data=data, search=_search_settings(data["search"]))
        return new

    @property
    def name(self) -> str:
        return self._data.get("name") or Path(self.source).stem

    @property
    def description(self) -> str | None:
        return self._data.get("description")

    def to_dict(self) -> dict[str, Any]:
        """The resolved space as plain data (a copy: changing it leaves the space as it is)."""
        return copy.deepcopy(self._data)

    def to_yaml(self) -> str:
        return yaml.dump(self._data, Dumper=_Dumper, sort_keys=False)

    def fingerprint(self, *sections: str) -> str:
        blob = json.dumps({s: self._fingerprinted(s) for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def _fingerprinted(self, section: str) -> Any:
        """What of ``section`` its fingerprint covers: ``model`` includes ``model_weights`` when set.

        Keys added to the schema later count only once set, so runs and baselines
        made before them keep their fingerprints.
        """
        value = self._data[section]
        if section == "model" and self._data.get("model_weights") is not None:
            return [value, self._data["model_weights"]]
        if section == "dataset" and value.get("image_size") is None:
            return {k: v for k, v in value.items() if k != "image_size"}
        if section == "trial" and value.get("rungs") is None:
            value = {k: v for k, v in value.items() if k not in ("rungs", "reduction_factor")}
        train = value.get("train") if isinstance(value, Mapping) else None
        if isinstance(train, Mapping) and not train.get("distill", {}).get("weight"):
            return {**value, "train": {k: v for k, v in train.items() if k != "distill"}}
        return value

    # -- layers -----------------------------------------------------------------------

    def search_params(self, layer_names: list[str]) -> list[LayerSearchParam]:
        """The searched units for a model's compressible layers (groups share one (p, bits)), in model order.

        A group stands where its first layer is and takes that layer's ranges. Raises
        ``ConfigError`` listing the real layers when an override, dense entry or group
        member matches nothing, or when every layer is dense.
        """
        layers = self.layers
        overrides = dict(layers.overrides)
        listed = ", ".join(layer_names)

        def check(pattern: str, what: str) -> list[str]:
            check_pattern(pattern, f"{self.source}: {what}")
            hits = [n for n in layer_names if n == pattern or matches(pattern, n)]
            if not hits:
                raise ConfigError(
                    f"{self.source}: {what} {shown(pattern)} matches no compressible layer; layers are: {listed}"
                )
            return hits

        dense: set[str] = set()
        for pat in layers.dense:
            dense.update(check(pat, "layers.dense entry"))
        for pat in overrides:
            check(pat, "layers.overrides key")
        remaining = [n for n in layer_names if n not in dense]
        if not remaining:
            raise ConfigError(
                f"{self.source}: every layer is in layers.dense; leave at least one of {listed} compressible"
            )

        def ranges(name: str) -> tuple[tuple[float, float], tuple[int, int]]:
            if name in overrides:
                return overrides[name]
            for pat, r in overrides.items():
                if matches(pat, name):
                    return r
            return layers.default

        out: list[LayerSearchParam] = []
        owner: dict[str, str] = {}  # layer -> its group: a layer is in one group at most
        for group, members in layers.groups:
            where = f"layers.groups.{clip(group)}"
            if not members:
                raise ConfigError(f"{self.source}: {where} is empty; list its layers (of {listed}) or remove it")
            found = {n for pat in members for n in check(pat, f"{where} member")}
            names = [n for n in layer_names if n in found]  # model order
            for n in names:
                if n in owner:
                    raise ConfigError(
                        f"{self.source}: layer {n!r} is in both layers.groups.{clip(owner[n])} and {where}; "
                        "a layer belongs to one group at most: remove it from one of them"
                    )
                owner[n] = group
            names = [n for n in names if n not in dense]
            if not names:
                raise ConfigError(
                    f"{self.source}: every layer of {where} is in layers.dense; remove the group or those dense entries"
                )
            p, b = ranges(names[0])
            out.append(LayerSearchParam(group, tuple(names), p, b))
        grouped = set(owner)
        for name in remaining:
            if name not in grouped:
                p, b = ranges(name)
                out.append(LayerSearchParam(name, (name,), p, b))
        position = {n: i for i, n in enumerate(layer_names)}
        return sorted(out, key=lambda u: position[u.layers[0]])  # model order, a group where its first layer is

    @staticmethod
    def plan_from_params(params: Mapping[str, Any], units: list[LayerSearchParam]) -> Plan:
        """Turn sampled values ``{"p:<unit>": .., "bits:<unit>": ..}`` into a per-layer plan."""
        layers: dict[str, LayerConfig] = {}
        for u in units:
            p = params.get(f"p:{u.key}", u.p[0])
            b = params.get(f"bits:{u.key}", u.bits[0])
            for name in u.layers:
                layers[name] = LayerConfig(float(p), int(b))
        return Plan(layers=layers)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``key.path=value`` (value parsed as YAML) to the resolved space, validating it."""
    if "=" not in assignment:
        raise ConfigError(f"--set {shown(assignment)}: expected KEY.PATH=VALUE, e.g. --set trial.train.epochs=2")
    key, _, raw = assignment.partition("=")
    parts = key.strip().split(".")
    schema: Any = SCHEMA
    node: Any = data
    free: tuple[str, Field, dict[str, Any]] | None = None
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        is_free_mapping = isinstance(schema, Field) and isinstance(node, dict)
        if is_free_mapping:  # layers.overrides.<name>.p and friends
            if free is None:  # the whole mapping is checked once the value is in
                free = (".".join(parts[:i]), schema, node)
            schema = Field(None, "a value", lambda v: True)
        elif not isinstance(schema, Mapping) or part not in schema:
            known = list(schema) if isinstance(schema, Mapping) else []
            raise ConfigError(f"--set {key}: unknown key {here!r}; {_suggest(part, known)}")
        else:
            schema = schema[part]
        if i < len(parts) - 1:
            if node.get(part) is not None and not isinstance(node[part], dict):
                raise ConfigError(f"--set {key}: {here!r} is a value, not a section; use --set {here}=VALUE")
            if part not in node or not isinstance(node[part], dict):
                node[part] = {}
            node = node[part]
    try:
        value = yaml_load(raw) if raw.strip() else None
    except _Refused as exc:
        raise ConfigError(f"--set {key}: the value {exc}") from None
    except yaml.YAMLError:
        value = raw
    if isinstance(schema, Mapping):
        raise ConfigError(f"--set {key}: {key!r} is a section; set one of its keys: {', '.join(schema)}")
    if not schema.check(value):
        raise ConfigError(f"--set {key}={clip(raw)}: invalid value; expected {schema.described()}")
    node[parts[-1]] = value
    if free is not None and not free[1].check(free[2]):
        raise ConfigError(f"--set {key}={clip(raw)}: invalid value; {free[0]} must be {free[1].described()}")


def list_presets() -> list[tuple[str, str]]:
    """The shipped search spaces (package data): ``(name, description)`` in name order."""
    out = []
    for entry in sorted(resources.files(PRESETS_PACKAGE).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            raw = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
            out.append((entry.name.removesuffix(".yaml"), str(raw.get("description") or "")))
    return out


def preset_text(name: str) -> str | None:
    """The YAML text of the preset ``name``, or ``None`` when no preset has that name."""
    entry = resources.files(PRESETS_PACKAGE).joinpath(f"{name}.yaml")
    return entry.read_text(encoding="utf-8") if entry.is_file() else None


def _is_preset_name(text: str) -> bool:
    return bool(text) and all(c.isalnum() or c in "_-" for c in text)


def load_space(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Space:
    """Read, validate and resolve a space file (or a preset by name), then apply ``--set`` overrides.

    A bare name such as ``smoke`` that is not a file in the current folder
    names a shipped preset (``clipq-search spaces`` lists them).
    """
    path = Path(path)
    source = str(path)
    if not path.exists() and _is_preset_name(source):
        text = preset_text(source)
        if text is None:
            names = ", ".join(n for n, _ in list_presets())
            raise ConfigError(
                f"{shown(source)} is neither a space file nor a preset; presets are: {names} "
                "(clipq-search spaces), or write one with clipq-search init MODEL"
            )
        return _load_text(text, f"preset {source}", overrides, name=source)
    try:
        text = read_regular(path, SPACE_FILE_LIMIT, "space file").decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"space file {path} does not exist; name a preset (clipq-search spaces) or write one "
            "with clipq-search init MODEL (docs/search-space.md)"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"space file {path} is a directory; give a .yaml file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"space file {path} is not text; give a YAML search-space file") from None
    return _load_text(text, source, overrides)


def _load_text(
    text: str, source: str, overrides: list[str] | tuple[str, ...], *, name: str | None = None
) -> Space:
    path = source
    try:
        raw = yaml_load(text)
    except _Refused as exc:
        raise ConfigError(f"space file {path} {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"space file {path} is not valid YAML{at}; fix the syntax (see search_spaces/ for examples)"
        ) from None
    if raw is None:
        raise ConfigError(
            f"space file {path} is empty; write a mapping of keys (model, dataset, layers, ...) "
            "as in search_spaces/smoke.yaml"
        )
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"space file {path} must be a YAML mapping of keys (model, dataset, layers, ...), got {type(raw).__name__}"
        )
    data = _defaults(SCHEMA)
    _merge(data, raw, SCHEMA, "", source)
    if name is not None and not data["name"]:
        data["name"] = name
    for assignment in overrides:
        apply_override(data, assignment)
    return Space(data, source)
