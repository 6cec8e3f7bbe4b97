"""Per-layer compression plans: which layers get which (p, bits).

A plan maps module names to :class:`LayerConfig`. Keys are exact module
names, glob patterns (``features.*``) or regular expressions (``re:...``,
full match). Precedence: an exact name wins, then the first matching pattern
in the order written, then ``default``; layers matching ``dense`` are left
uncompressed whatever else matches. JSON form::

    {"layers": {"fc1": {"p": 0.9, "bits": 3}, "conv*": {"p": 0.5, "bits": 5}},
     "default": {"p": 0.5, "bits": 5}, "dense": ["fc3"]}
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipq_search._io import MiB, read_regular
from clipq_search.errors import ConfigError, shown

if TYPE_CHECKING:
    from torch import Tensor, nn

# torch is imported where a model is handled, not here: reading and checking a space or a plan file needs none.

__all__ = [
    "BITS_RANGE",
    "CompressibleTensor",
    "LayerConfig",
    "Plan",
    "compressible_layers",
    "compressible_tensors",
    "dense_summary",
    "validate_p_bits",
]

BITS_RANGE = (2, 8)
PLAN_FILE_LIMIT = 4 * MiB  # the largest plan file read (a plan of a thousand layers is about 100 kB)


def validate_p_bits(p: float, bits: int, *, where: str = "") -> None:
    """Raise ``ConfigError`` (a ``ValueError``) for p outside [0, 1) or bits outside [2, 8]."""
    at = f" for {where}" if where else ""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 <= p < 1.0:
        raise ConfigError(f"p={shown(p)}{at} is invalid: p is the clipped fraction per sign, a number in [0, 1)")
    if isinstance(bits, bool) or not isinstance(bits, int) or not BITS_RANGE[0] <= bits <= BITS_RANGE[1]:
        raise ConfigError(
            f"bits={shown(bits)}{at} is invalid: bits must be an integer in [{BITS_RANGE[0]}, {BITS_RANGE[1]}]"
        )


@dataclass(frozen=True)
class LayerConfig:
    """CLIP-Q setting of one layer: clipped fraction per sign ``p`` and ``bits``."""

    p: float
    bits: int

    def __post_init__(self) -> None:
        validate_p_bits(self.p, self.bits)

    def to_dict(self) -> dict[str, float | int]:
        return {"p": self.p, "bits": self.bits}

    @classmethod
    def from_obj(cls, obj: Any, *, where: str) -> LayerConfig:
        if isinstance(obj, LayerConfig):
            return obj
        if isinstance(obj, Mapping) and set(obj) == {"p", "bits"}:
            p, bits = obj["p"], obj["bits"]
        elif isinstance(obj, (list, tuple)) and len(obj) == 2:
            p, bits = obj
        else:
            raise ConfigError(f"{where}: expected {{'p': float, 'bits': int}}, got {shown(obj)}")
        if isinstance(bits, float) and bits.is_integer():
            bits = int(bits)
        validate_p_bits(p, bits, where=where)
        return cls(float(p), bits)


def require_module(model: object) -> None:
    """A ``TypeError`` naming what was given instead of a model (not an AttributeError from deep inside)."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (the model), got {type(model).__name__}")


# Weight parameters that are not a layer's ``weight``: attention's input projections.
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass(frozen=True)
class CompressibleTensor:
    """One weight tensor CLIP-Q can compress, and the name a plan calls it by.

    ``name`` is the module's name for a layer's ``weight`` (``features.0``),
    and ``<module>.<parameter>`` for a weight parameter of another kind
    (``encoder.layers.0.self_attn.in_proj_weight``). ``key`` is its key in the
    model's state dict.
    """

    name: str
    module: nn.Module
    attr: str

    @property
    def key(self) -> str:
        return f"{self.name}.weight" if self.attr == "weight" else self.name

    def tensor(self) -> Tensor:
        """The tensor the forward pass uses (pruned-quantized when CLIP-Q is attached)."""
        return getattr(self.module, self.attr)


def compressible_tensors(model: nn.Module) -> dict[str, CompressibleTensor]:
    """Every compressible weight of ``model`` by plan name, in model order.

    The ``weight`` of every ``nn.Linear`` / ``nn.Conv1d/2d/3d`` (and of
    Hugging Face's ``Conv1D``), and the input projections of every
    ``nn.MultiheadAttention`` (``in_proj_weight``, or ``q/k/v_proj_weight``),
    which are bare parameters, not layers.
    """
    from torch import Tensor, nn

    require_module(model)
    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    out: dict[str, CompressibleTensor] = {}
    for name, mod in model.named_modules():
        if not name:
            continue
        # Hugging Face's GPT-2 ``Conv1D`` is a linear layer with a transposed weight of its own class.
        hf_conv1d = type(mod).__name__ == "Conv1D" and isinstance(getattr(mod, "weight", None), Tensor)
        if isinstance(mod, layers) or hf_conv1d:
            out[name] = CompressibleTensor(name, mod, "weight")
        elif isinstance(mod, nn.MultiheadAttention):
            for attr in _ATTENTION_WEIGHTS:
                if isinstance(getattr(mod, attr, None), Tensor):
                    out[f"{name}.{attr}"] = CompressibleTensor(f"{name}.{attr}", mod, attr)
    return out


def dense_summary(model: nn.Module, compressed: Iterable[str]) -> dict[str, Any]:
    """What stays dense when the plan names ``compressed`` are compressed: its share of the fp32 parameter bytes.

    ``{"tensors": n, "bytes": b, "share": b / all parameter bytes, "largest": [[key, bytes], ...]}`` (the
    three largest), from the parameters only, each counted at 4 bytes per value as in the rate.
    """
    tensors = compressible_tensors(model)
    keys = {tensors[name].key for name in compressed if name in tensors}
    sizes = {k: 4 * v.numel() for k, v in model.state_dict().items() if v.is_floating_point()}
    params = {n for n, _ in model.named_parameters()}
    dense = {k: b for k, b in sizes.items() if k in params and k not in keys}
    total = sum(b for k, b in sizes.items() if k in params)
    largest = sorted(dense.items(), key=lambda kv: -kv[1])[:3]
    return {"tensors": len(dense), "bytes": sum(dense.values()), "share": sum(dense.values()) / max(total, 1),
            "largest": [[k, b] for k, b in largest]}


def compressible_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The module holding each compressible weight (``compressible_tensors``), by plan name, in model order."""
    return {name: t.module for name, t in compressible_tensors(model).items()}


def _is_pattern(key: str) -> bool:
    return key.startswith("re:") or any(ch in key for ch in "*?[")


def matches(key: str, name: str) -> bool:
    if key.startswith("re:"):
        return re.fullmatch(key[3:], name) is not None
    return fnmatch.fnmatchcase(name, key)


def check_pattern(key: str, what: str) -> None:
    """A ``re:`` key must compile: a ``ConfigError`` naming it, not a traceback when it is first used."""
    if key.startswith("re:"):
        try:
            re.compile(key[3:])
        except re.error as exc:
            raise ConfigError(f"{what} {shown(key)} is not a valid regular expression: {exc}") from None


def _list_names(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(names[:30])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 30 else "")


@dataclass(frozen=True)
class Plan:
    """A per-layer plan: ``layers`` (name or pattern -> config), ``default``, ``dense``."""

    layers: Mapping[str, LayerConfig] = field(default_factory=dict)
    default: LayerConfig | None = None
    dense: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        layers = {str(k): LayerConfig.from_obj(v, where=f"plan layer {shown(k)}") for k, v in dict(self.layers).items()}
        object.__setattr__(self, "layers", layers)
        if self.default is not None:
            object.__setattr__(self, "default", LayerConfig.from_obj(self.default, where="plan default"))
        if isinstance(self.dense, str):
            raise ConfigError(f"plan dense={shown(self.dense)}: expected a list of layer names or patterns")
        object.__setattr__(self, "dense", tuple(str(d) for d in self.dense))
        for key in [*layers, *self.dense]:
            check_pattern(key, "plan key")

    # -- resolution -----------------------------------------------------------------

    def resolve(self, model: nn.Module) -> dict[str, LayerConfig]:
        """The config of every layer to compress, keyed by module name, in model order.

        Raises ``ConfigError`` listing the real layer names when a key matches
        no compressible layer, or when every layer ends up dense.
        """
        return self.resolve_names(list(compressible_tensors(model)))

    def resolve_names(self, names: list[str]) -> dict[str, LayerConfig]:
        if not names:
            raise ConfigError(
                "the model has no compressible layer (nn.Linear, nn.Conv1d/2d/3d, attention projections) below its "
                "top module; "
                "to compress a single layer, wrap it: nn.Sequential(layer)"
            )
        for key in [*self.layers, *self.dense]:
            if _is_pattern(key):
                if not any(matches(key, n) for n in names):
                    raise ConfigError(
                        f"plan pattern {shown(key)} matches no compressible layer; layers are: {_list_names(names)}"
                    )
            elif key not in names:
                raise ConfigError(
                    f"plan names unknown layer {shown(key)}; compressible layers are: {_list_names(names)}"
                )
        patterns = [(k, v) for k, v in self.layers.items() if _is_pattern(k)]
        out: dict[str, LayerConfig] = {}
        for name in names:
            if any(d == name or (_is_pattern(d) and matches(d, name)) for d in self.dense):
                continue
            cfg = self.layers.get(name)
            if cfg is None:
                cfg = next((v for k, v in patterns if matches(k, name)), self.default)
            if cfg is not None:
                out[name] = cfg
        if not out:
            raise ConfigError(
                "the plan compresses no layer (all excluded or unmatched); "
                f"name at least one of: {_list_names(names)}, or give a default"
            )
        return out

    # -- serialisation --------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"layers": {k: v.to_dict() for k, v in self.layers.items()}}
        if self.default is not None:
            d["default"] = self.default.to_dict()
        if self.dense:
            d["dense"] = list(self.dense)
        return d

    @classmethod
    def from_dict(cls, obj: Any, *, where: str = "plan") -> Plan:
        if not isinstance(obj, Mapping):
            raise ConfigError(f"{where}: expected a mapping with key 'layers', got {type(obj).__name__}")
        unknown = set(obj) - {"layers", "default", "dense", "metrics", "source", "format", "version"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: layers, default, dense")
        layers = obj.get("layers", {})
        if not isinstance(layers, Mapping):
            raise ConfigError(f"{where}: 'layers' must map layer names to {{'p': .., 'bits': ..}}")
        dense = obj.get("dense", [])
        if not isinstance(dense, (list, tuple)):
            raise ConfigError(f"{where}: 'dense' must be a list of layer names or patterns")
        return cls(layers=layers, default=obj.get("default"), dense=tuple(dense))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan JSON file (as written by ``export``)."""
        path = Path(path)
        try:
            obj = json.loads(read_regular(path, PLAN_FILE_LIMIT, "plan file").decode("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"plan file {path} does not exist; write one with `run_search.py export`") from None
        except IsADirectoryError:
            fix = "give a plan JSON file from `run_search.py export`"
            raise ConfigError(f"plan file {path} is a directory; {fix}") from None
        except OSError as exc:
            reason = exc.strerror or exc
            raise ConfigError(f"cannot read plan file {path} ({reason}); check the path and its permissions") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f'plan file {path} is not valid JSON ({exc}); expected {{"layers": {{...}}}}') from None
        except RecursionError:
            expected = 'expected {"layers": {...}}'
            raise ConfigError(f"plan file {path} nests too deeply to be a plan; {expected}") from None
        where = f"plan file {path}"
        try:
            return cls.from_dict(obj, where=where)
        except ConfigError as exc:  # name the file in every message about its content
            if str(exc).startswith(where):
                raise
            raise ConfigError(f"{where}: {exc}") from None

    @classmethod
    def uniform(cls, p: float, bits: int) -> Plan:
        """The same (p, bits) for every compressible layer."""
        return cls(default=LayerConfig(p, bits))
