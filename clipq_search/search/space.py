"""Search-space files: schema, validation, ``--set`` overrides, and the per-layer parameters.

A space is a YAML mapping (see ``docs/search-space.md`` and ``search_spaces/``).
It is validated against :data:`SCHEMA` on load: unknown keys get the closest
known key suggested, values are type- and range-checked with messages that
name the key. The resolved space is plain data (a nested dict), written to
the run directory and shipped to Ray workers as is.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from clipq_search._io import MiB, read_regular
from clipq_search.core.operator import BITS_RANGE
from clipq_search.core.plan import LayerConfig, Plan, check_pattern, matches
from clipq_search.errors import ConfigError, clip, shown
from clipq_search.training.data import DATASET_NAMES
from clipq_search.training.models import list_models

__all__ = [
    "SAMPLERS",
    "SCHEMA",
    "SEED_MAX",
    "LayerSearchParam",
    "Space",
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
    """One leaf of the schema: its default, a type description and a checker."""

    default: Any
    kind: str
    check: Callable[[Any], bool]
    help: str = ""


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
    }


# Layer ranges: `p: [lo, hi]` or a fixed number; `bits: [lo, hi]` or a fixed integer.
_RANGE_KIND = "a [low, high] pair or a single value"
_LAYER_RANGE = {
    "p": _d(Field(None, _RANGE_KIND, lambda v: True), [0.5, 0.98]),
    "bits": _d(Field(None, _RANGE_KIND, lambda v: True), [2, 6]),
}

SCHEMA: dict[str, Any] = {
    "name": _d(_str(optional=True), None),
    "description": _d(_str(optional=True), None),
    "model": _d(
        Field(
            None,
            "a registered model (" + ", ".join(list_models()) + "), 'torchvision:<name>' or 'package.module:factory'",
            lambda v: isinstance(v, str) and (v in list_models() or ":" in v),
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
                raise ConfigError(f"{source}: {where}={shown(value)} is invalid; expected {sub.kind}")
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


class Space:
    """A validated search space (``data`` is the resolved nested dict)."""

    def __init__(self, data: dict[str, Any], source: str = "space") -> None:
        self.data = data
        self.source = source
        layers = data["layers"]
        self._default_p, self._default_bits = _p_bits_ranges(
            layers["default"]["p"], layers["default"]["bits"], f"{source}: layers.default"
        )
        self._overrides: dict[str, tuple[tuple[float, float], tuple[int, int]]] = {}
        for key, spec in layers["overrides"].items():
            where = f"{source}: layers.overrides.{clip(str(key))}"
            if not isinstance(spec, Mapping) or not set(spec) <= {"p", "bits"} or not spec:
                example = "{p: [0.5, 0.9], bits: 4}"
                raise ConfigError(f"{where} must be a mapping with p and/or bits, e.g. {example}, got {shown(spec)}")
            self._overrides[str(key)] = _p_bits_ranges(  # type: ignore[assignment]
                spec.get("p", list(self._default_p)), spec.get("bits", list(self._default_bits)), where
            )
        # search.concurrency above search.trials is allowed: it is capped by the number of trials to run.

    # -- convenience accessors --------------------------------------------------------

    @property
    def name(self) -> str:
        return self.data.get("name") or Path(self.source).stem

    def get(self, dotted: str) -> Any:
        node: Any = self.data
        for part in dotted.split("."):
            node = node[part]
        return node

    def train_overrides(self, section: str) -> dict[str, Any]:
        """Non-null training settings of ``baseline``, ``trial`` or ``final``."""
        return {k: v for k, v in self.data[section]["train"].items() if v is not None}

    def to_yaml(self) -> str:
        return yaml.dump(self.data, Dumper=_Dumper, sort_keys=False)

    def fingerprint(self, *sections: str) -> str:
        blob = json.dumps({s: self._fingerprinted(s) for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def _fingerprinted(self, section: str) -> Any:
        """What of ``section`` its fingerprint covers: ``model`` includes ``model_weights`` when set.

        Keys added to the schema later count only once set, so runs and baselines
        made before them keep their fingerprints.
        """
        value = self.data[section]
        if section == "model" and self.data.get("model_weights") is not None:
            return [value, self.data["model_weights"]]
        if section == "dataset" and value.get("image_size") is None:
            return {k: v for k, v in value.items() if k != "image_size"}
        return value

    # -- layers -----------------------------------------------------------------------

    def search_params(self, layer_names: list[str]) -> list[LayerSearchParam]:
        """The searched units for a model's compressible layers (groups share one (p, bits)), in model order.

        A group stands where its first layer is and takes that layer's ranges. Raises
        ``ConfigError`` listing the real layers when an override, dense entry or group
        member matches nothing, or when every layer is dense.
        """
        layers = self.data["layers"]
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
        for pat in layers["dense"]:
            dense.update(check(pat, "layers.dense entry"))
        for pat in self._overrides:
            check(pat, "layers.overrides key")
        remaining = [n for n in layer_names if n not in dense]
        if not remaining:
            raise ConfigError(
                f"{self.source}: every layer is in layers.dense; leave at least one of {listed} compressible"
            )

        def ranges(name: str) -> tuple[tuple[float, float], tuple[int, int]]:
            if name in self._overrides:
                return self._overrides[name]
            for pat, r in self._overrides.items():
                if matches(pat, name):
                    return r
            return self._default_p, self._default_bits  # type: ignore[return-value]

        out: list[LayerSearchParam] = []
        owner: dict[str, str] = {}  # layer -> its group: a layer is in one group at most
        for group, members in layers["groups"].items():
            where = f"layers.groups.{clip(str(group))}"
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
                owner[n] = str(group)
            names = [n for n in names if n not in dense]
            if not names:
                raise ConfigError(
                    f"{self.source}: every layer of {where} is in layers.dense; remove the group or those dense entries"
                )
            p, b = ranges(names[0])
            out.append(LayerSearchParam(str(group), tuple(names), p, b))
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
        raise ConfigError(f"--set {key}={clip(raw)}: invalid value; expected {schema.kind}")
    node[parts[-1]] = value
    if free is not None and not free[1].check(free[2]):
        raise ConfigError(f"--set {key}={clip(raw)}: invalid value; {free[0]} must be {free[1].kind}")


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
