"""clipq-search: CLIP-Q compression of PyTorch networks with a Bayesian per-layer search."""

from __future__ import annotations

from clipq_search.core.encoding import (
    LayerSize,
    SizeEstimate,
    estimate_size,
    load_compressed,
    read_compressed,
    save_compressed,
)
from clipq_search.core.operator import clipq_quantize, clipq_quantize_with_stats
from clipq_search.core.plan import LayerConfig, Plan, compressible_layers, compressible_tensors
from clipq_search.core.surgery import attach_clipq, attached_configs, strip_clipq
from clipq_search.errors import ClipQError, ConfigError, FormatError

__version__ = "0.1.0"

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
    "compressible_layers",
    "compressible_tensors",
    "estimate_size",
    "load_compressed",
    "read_compressed",
    "save_compressed",
    "strip_clipq",
]
