"""clipq-search: CLIP-Q compression of PyTorch networks with a Bayesian per-layer search.

The library's names below are imported on first use (PEP 562), so that the
command line reads its arguments and input files, and names what is wrong
with them, before it pays for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from clipq_search.errors import ClipQError, ConfigError, FormatError

__version__ = "0.1.0"

_LAZY = {
    "LayerSize": "clipq_search.core.encoding",
    "SizeEstimate": "clipq_search.core.encoding",
    "estimate_size": "clipq_search.core.encoding",
    "load_compressed": "clipq_search.core.encoding",
    "read_compressed": "clipq_search.core.encoding",
    "save_compressed": "clipq_search.core.encoding",
    "clipq_quantize": "clipq_search.core.operator",
    "clipq_quantize_with_stats": "clipq_search.core.operator",
    "compile_cpu_kernels": "clipq_search.core.operator",
    "LayerConfig": "clipq_search.core.plan",
    "Plan": "clipq_search.core.plan",
    "compressible_layers": "clipq_search.core.plan",
    "compressible_tensors": "clipq_search.core.plan",
    "attach_clipq": "clipq_search.core.surgery",
    "attached_configs": "clipq_search.core.surgery",
    "strip_clipq": "clipq_search.core.surgery",
}

__all__ = [
    "ClipQError",
    "ConfigError",
    "FormatError",
    "LayerConfig",
    "LayerSize",
    "Plan",
    "SizeEstimate",
    "attach_clipq",
    "attached_configs",
    "clipq_quantize",
    "clipq_quantize_with_stats",
    "compile_cpu_kernels",
    "compressible_layers",
    "compressible_tensors",
    "estimate_size",
    "load_compressed",
    "read_compressed",
    "save_compressed",
    "strip_clipq",
]

if TYPE_CHECKING:
    from clipq_search.core.encoding import (
        LayerSize,
        SizeEstimate,
        estimate_size,
        load_compressed,
        read_compressed,
        save_compressed,
    )
    from clipq_search.core.operator import clipq_quantize, clipq_quantize_with_stats, compile_cpu_kernels
    from clipq_search.core.plan import LayerConfig, Plan, compressible_layers, compressible_tensors
    from clipq_search.core.surgery import attach_clipq, attached_configs, strip_clipq


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'clipq_search' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
