"""Model surgery: attach CLIP-Q to layers, and strip it to bake compressed weights in.

Built on ``torch.nn.utils.parametrize``: the full-precision weight stays the
trainable parameter (``<layer>.parametrizations.weight.original``) while every
read of ``<layer>.weight`` returns it pruned-quantized, recomputed from the
current full-precision values. The gradient flows straight through to the
full-precision weight, clipped entries included. State dicts keep the ordinary
``<layer>.weight`` key (the full-precision values) in both directions.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

from clipq_search.core._numba_kernels import DONE, NOT_FINITE
from clipq_search.core.operator import (
    ClipQStats,
    CompiledOperator,
    PendingStats,
    clipq_quantize_with_stats,
    compiled_for,
    quantize_on_device,
)
from clipq_search.core.plan import LayerConfig, Plan, compressible_tensors, require_module

__all__ = ["ClipQWeight", "attach_clipq", "attached_configs", "clipq_weight", "strip_clipq", "use_cuda_graphs"]



class _StraightThrough(torch.autograd.Function):
    """Forward returns the quantized tensor; backward hands the gradient to the original unchanged."""

    @staticmethod
    def forward(ctx: Any, original: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return quantized.view_as(quantized)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def straight_through(original: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized``'s values, with the gradient handed to ``original`` unchanged (straight-through)."""
    return _StraightThrough.apply(original, quantized)


def _fresh_state() -> dict[str, Any]:
    # "written": the buffer (its address and version) as this module last wrote it: a write from elsewhere (an
    # in-place edit of ``layer.weight``) makes the next call compute it again
    return {"stats": None, "key": None, "op": None, "source": None, "graph": None, "written": None,
            "lock": threading.Lock()}


# --------------------------------------------------------------------------- CUDA graphs

_cuda_graphs = {"on": False}
_graph_pools: dict[int | None, Any] = {}


def use_cuda_graphs(on: bool = True) -> None:
    """Replay each CUDA layer's operator as one recorded CUDA graph: one launch a step instead of about 73.

    The tensor implementation reads nothing back from the device and its
    sizes are fixed, so it can be recorded once per layer (on the first step,
    for the layer's weight and buffer) and replayed. All layers' recordings
    share one memory pool per device. Off by default (``resources.cuda_graphs``
    in a space); a recording that fails gives one warning and the operator
    runs without graphs from then on.
    """
    _cuda_graphs["on"] = bool(on)


def _record(original: torch.Tensor, buf: torch.Tensor, p: float, bits: int) -> tuple[Any, Any] | None:
    """A CUDA graph that writes the operator on ``original`` into ``buf``, and its statistics; None if it fails."""
    device = original.device
    try:
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # warm-up outside the recording: constants made, kernels loaded
            quantize_on_device(original, p, bits, out=buf)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        pool = _graph_pools.setdefault(device.index, torch.cuda.graph_pool_handle())
        with torch.cuda.graph(graph, pool=pool):
            pending = quantize_on_device(original, p, bits, out=buf)[1]
    except Exception as exc:  # noqa: BLE001 - a driver, a stream or an allocator can each refuse to record
        _cuda_graphs["on"] = False
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        warnings.warn(f"CLIP-Q runs without CUDA graphs: recording one failed ({first})", stacklevel=3)
        return None
    return graph, pending


def _replay(state: dict[str, Any], original: torch.Tensor, buf: torch.Tensor, p: float, bits: int) -> Any:
    """The layer's statistics after replaying its graph into ``buf`` (recorded on first use); None: no graph."""
    key = (original.data_ptr(), buf.data_ptr(), original.shape, original.dtype, original.device, p, bits)
    record = state["graph"]
    if record is None or record[0] != key:
        made = _record(original, buf, p, bits)
        if made is None:
            return None
        record = state["graph"] = (key, *made)
    record[1].replay()
    torch.autograd.graph.increment_version(buf)  # written by the graph: tell autograd, as an in-place op would
    return record[2]


def _compilable(t: torch.Tensor) -> bool:
    """Whether the compiled CPU operator can run on ``t`` in place (no conversion, no copy)."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def _fits(op: CompiledOperator, t: torch.Tensor, p: float, bits: int) -> bool:
    """Whether ``op`` computes the operator for ``t`` with (p, bits)."""
    return _compilable(t) and t.numel() == op.n and op.p == p and op.bits == bits


# The full-precision weights CLIP-Q has quantized, by id (a tensor's ``==`` is elementwise: no set of tensors).
_originals: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
_step_hook: list[Any] = []


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Fused optimizers (``fused=True``) update weights without bumping autograd's version counter, which is
    what tells a layer its weight changed: bump it for them, after every optimizer's step."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if _originals.get(id(param)) is param:
                torch.autograd.graph.increment_version(param)


def _track_original(original: torch.Tensor) -> None:
    if isinstance(original, nn.Parameter) and _originals.get(id(original)) is not original:
        _originals[id(original)] = original
        if not _step_hook:
            _step_hook.append(register_optimizer_step_post_hook(_after_optimizer_step))


class ClipQWeight(nn.Module):
    """Parametrization computing the CLIP-Q weight from the full-precision one.

    The contract of ``torch.ao.pruning``'s ``FakeSparsity``: the result lives
    in a buffer owned by this module (``quantized``, not saved in state
    dicts), rewritten in place under ``no_grad`` whenever the full-precision
    weight has changed (an optimizer step bumps its version). Evaluation over
    many batches therefore quantizes once, and no step allocates. A tensor
    read from ``layer.weight`` is that buffer: it shows the new values after
    the next step, and autograd's version counter makes a graph that saved
    the old values refuse its backward pass ("modified by an inplace
    operation") instead of using them silently. The previous thresholds are
    kept as a hint that makes the next exact search fast.
    """

    quantized: torch.Tensor

    def __init__(self, p: float, bits: int) -> None:
        super().__init__()
        cfg = LayerConfig(p, bits)
        self.p, self.bits = cfg.p, cfg.bits
        self.register_buffer("quantized", torch.empty(0), persistent=False)
        # Per-step state lives in a plain dict: nn.Module.__setattr__ costs more than the operator
        # on a small layer. "op": the compiled CPU operator with its scratch, set up after the first
        # call; "stats": a ClipQStats, or that operator (its latest result, read on demand);
        # "source": numpy views of the weight and the buffer for the compiled operator.
        self._state = _fresh_state()
        # Decided here, not while torch.compile traces forward (tracing the check would trace its caches).
        self._compiled_cpu = compiled_for(1)

    def __getstate__(self) -> dict[str, Any]:
        # Copies (deepcopy) start afresh: the compiled operator's scratch and the lock belong to
        # this layer alone.
        state = dict(super().__getstate__())
        del state["_state"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._state = _fresh_state()

    @property
    def config(self) -> LayerConfig:
        return LayerConfig(self.p, self.bits)

    @property
    def last_stats(self) -> ClipQStats | None:
        """Thresholds and levels of the latest computation (None before the first)."""
        stats = self._state["stats"]
        if isinstance(stats, (CompiledOperator, PendingStats)):
            with self._state["lock"]:  # not while another thread's call is filling it
                stats = self._state["stats"] = stats.stats() if isinstance(stats, CompiledOperator) else stats.read()
        return stats

    def invalidate(self) -> None:
        """Forget the computed result (after p or bits changed)."""
        self._state["key"] = self._state["op"] = self._state["source"] = self._state["graph"] = None

    def _buffer_for(self, original: torch.Tensor) -> torch.Tensor:
        """The ``quantized`` buffer, made anew when ``original``'s shape, dtype or device changed, or when it is
        no longer contiguous (``model.to(memory_format=torch.channels_last)`` converts buffers too) or an
        inference tensor (the model was moved under ``inference_mode``)."""
        buf = self.quantized
        if (buf.shape != original.shape or buf.dtype != original.dtype or buf.device != original.device
                or not buf.is_contiguous() or buf.is_inference()):
            # An ordinary tensor even when first made under inference_mode: training reuses it.
            with torch.inference_mode(False):
                buf = torch.empty_like(original, memory_format=torch.contiguous_format)
            self.quantized = buf
            self._state["source"] = None
        return buf

    def quantize(self, original: torch.Tensor) -> torch.Tensor:
        """The pruned-quantized weight (the ``quantized`` buffer, no autograd graph), recomputed on change."""
        state = self._state
        key = (original.data_ptr(), original._version, id(original), original.dtype, original.shape,
               self.p, self.bits)
        buf = self.quantized
        if (key == state["key"] and buf.is_contiguous() and not buf.is_inference()
                and state["written"] == (buf.data_ptr(), buf._version)):
            return buf
        _track_original(original)
        buf = self._compute(original, key)
        state["written"] = (buf.data_ptr(), buf._version)
        return buf

    def _compute(self, original: torch.Tensor, key: tuple[Any, ...]) -> torch.Tensor:
        """Write the pruned-quantized ``original`` into the buffer (made anew if it does not fit) and return it."""
        state = self._state
        buf = self._buffer_for(original)
        with state["lock"], torch.no_grad():
            op = state["op"]
            if op is not None and _fits(op, original, self.p, self.bits):
                # the training step's path: one compiled call into the buffer's memory, the hint kept in ``op``
                source = state["source"]
                if source is None or source[0] != key[0] or source[2] is not buf:
                    source = state["source"] = (key[0], original.detach().view(-1).numpy(), buf,
                                                buf.view(-1).numpy())
                status = op.run_arrays(source[1], source[3])
                if status != NOT_FINITE:  # else the general path below makes the all-NaN result
                    if status != DONE:  # every weight clipped
                        buf.zero_()
                    else:  # written through numpy: tell autograd, as an in-place torch operation would
                        torch.autograd.graph.increment_version(buf)
                    state["stats"], state["key"] = op, key
                    return buf
            n = original.numel()
            if not (_compilable(original) and compiled_for(n)):
                # CUDA, half precision, no numba: the tensor implementation, which never waits for the device
                pending = None
                if _cuda_graphs["on"] and original.is_cuda and n:
                    pending = _replay(state, original, buf, self.p, self.bits)
                if pending is None and n:
                    pending = quantize_on_device(original, self.p, self.bits, out=buf)[1]
                state["stats"], state["key"] = pending, key
                return buf
            stats = state["stats"]
            if isinstance(stats, CompiledOperator):
                stats = stats.stats()
            hint = stats.hint if isinstance(stats, ClipQStats) else None
            q, stats = clipq_quantize_with_stats(original, self.p, self.bits, hint=hint)
            buf.copy_(q)
            state["stats"], state["key"] = stats, key
            if op is None or not _fits(op, original, self.p, self.bits):
                op = state["op"] = CompiledOperator(n, self.p, self.bits)
            op.set_hint(stats.hint, original)
        return buf

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            q = self.quantize(original)
        elif original.device.type != "cpu" or not self._compiled_cpu:
            # The tensor implementation reads nothing back from the device: it joins the model's graph.
            q = quantize_on_device(original, self.p, self.bits)[0]
        else:
            # The compiled CPU operator and its bookkeeping run as they are, outside the graph: traced,
            # their per-step state would become guards and recompile the model at every step.
            q = _quantize_outside_graphs(self, original)
        # While torch.jit.trace records, also without gradients: its check traces again under no_grad
        # and compares the two graphs.
        if (original.requires_grad and torch.is_grad_enabled()) or torch.jit.is_tracing():
            return straight_through(original, q)
        return q

    def extra_repr(self) -> str:
        return f"p={self.p}, bits={self.bits}"


_outside_graphs: dict[str, Any] = {}


def _quantize_outside_graphs(layer: ClipQWeight, original: torch.Tensor) -> torch.Tensor:
    """``layer.quantize(original)`` run by Python, not traced (``torch.compiler.disable``).

    Made on first use: ``torch.compiler.disable`` imports the compiler (about
    a second), which a process that never compiles should not pay for.
    """
    quantize = _outside_graphs.get("quantize")
    if quantize is None:
        quantize = _outside_graphs["quantize"] = torch.compiler.disable(ClipQWeight.quantize)
    return quantize(layer, original)


def _clipq_param(module: nn.Module, attr: str = "weight") -> ClipQWeight | None:
    if not parametrize.is_parametrized(module, attr):
        return None
    for par in module.parametrizations[attr]:  # type: ignore[union-attr,index]
        if isinstance(par, ClipQWeight):
            return par
    return None


def _clipq_attrs(module: nn.Module) -> list[str]:
    """The parameters of ``module`` that carry CLIP-Q (``weight``, ``in_proj_weight``, ...)."""
    if not parametrize.is_parametrized(module):
        return []
    return [attr for attr in module.parametrizations if _clipq_param(module, attr) is not None]  # type: ignore[union-attr]


def _save_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    # Save the ordinary keys: `<layer>.weight` (or `<module>.in_proj_weight`) holds the full-precision weight.
    for attr in _clipq_attrs(module):
        key = f"{prefix}parametrizations.{attr}.original"
        if key in state_dict:
            state_dict[prefix + attr] = state_dict.pop(key)


def _load_pre_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # Accept an ordinary state dict: map `<layer>.weight` onto the original.
    for attr in _clipq_attrs(module):
        original = f"{prefix}parametrizations.{attr}.original"
        if prefix + attr in state_dict and original not in state_dict:
            state_dict[original] = state_dict.pop(prefix + attr)


def attach_clipq(model: nn.Module, plan: Plan | Mapping[str, Any]) -> dict[str, LayerConfig]:
    """Make the plan's layers of ``model`` train with CLIP-Q, in place; return what was attached.

    ``plan`` is a :class:`Plan` or its JSON dict; its names are those of
    :func:`compressible_tensors` (layers by module name, attention projections
    as ``<module>.in_proj_weight``). Layers that already carry CLIP-Q get the
    new setting. Raises ``ConfigError`` for unknown layer names.

    The model's ``state_dict()`` keeps the full-precision weights: to deploy,
    use ``save_compressed`` or ``strip_clipq`` (then ``state_dict()``).
    """
    require_module(model)
    if not isinstance(plan, Plan):
        plan = Plan.from_dict(plan)
    tensors = compressible_tensors(model)
    resolved = plan.resolve_names(list(tensors))
    for name, cfg in resolved.items():
        module, attr = tensors[name].module, tensors[name].attr
        if cfg.bits >= FULL_PRECISION_BITS:
            _keep_full_precision(module)
        existing = _clipq_param(module, attr)
        if existing is not None:
            existing.p, existing.bits = cfg.p, cfg.bits
            existing.invalidate()
            continue
        hooked = bool(_clipq_attrs(module))
        if parametrize.is_parametrized(module):  # its class may be shared with a deep copy (``_own_class``)
            _own_class(module)
        parametrize.register_parametrization(module, attr, ClipQWeight(cfg.p, cfg.bits), unsafe=True)
        if not hooked:  # one pair of hooks serves every parametrized weight of the module
            module.register_state_dict_post_hook(_save_hook)
            module.register_load_state_dict_pre_hook(_load_pre_hook)
    return resolved


#: From this many bits on, bfloat16 (8 significant bits) cannot keep a layer's levels apart: under bfloat16
#: autocast such a layer computes in float32, so training sees the weights the file holds.
FULL_PRECISION_BITS = 7
_autocast_exits = threading.local()


def _needs_full_precision(module: nn.Module, device_type: str) -> bool:
    """Under bfloat16 autocast: whether a float32 CLIP-Q weight of the module has 7 or 8 bits (a weight that
    is itself of lower precision has no float32 levels to keep)."""
    if not torch.is_autocast_enabled(device_type) or torch.get_autocast_dtype(device_type) != torch.bfloat16:
        return False
    return any(par.bits >= FULL_PRECISION_BITS and module.parametrizations[attr].original.dtype == torch.float32
               for attr in _clipq_attrs(module) if (par := _clipq_param(module, attr)) is not None)


def _full_precision_pre_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Under bfloat16 autocast, a layer with a CLIP-Q weight of 7 or 8 bits runs without autocast, in float32
    (its inputs too, given by position or by name)."""
    stack = _autocast_exits.__dict__.setdefault("stack", [])
    device_type = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    if device_type is None or not _needs_full_precision(module, device_type):
        stack.append(None)
        return None
    off = torch.autocast(device_type, enabled=False)
    off.__enter__()
    stack.append(off)

    def up(a: Any) -> Any:
        return a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    return tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}


def _full_precision_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    off = _autocast_exits.stack.pop()
    if off is not None:
        off.__exit__(None, None, None)


def _keep_full_precision(module: nn.Module) -> None:
    """Give ``module`` the hooks that keep its 7- and 8-bit CLIP-Q weight out of bfloat16 (once)."""
    if getattr(module, "_clipq_full_precision", False):
        return
    module.register_forward_pre_hook(_full_precision_pre_hook, with_kwargs=True)
    module.register_forward_hook(_full_precision_hook, always_call=True)  # also when the forward raises
    module._clipq_full_precision = True


def attached_configs(model: nn.Module) -> dict[str, LayerConfig]:
    """The (p, bits) of every weight that currently carries CLIP-Q, by plan name, in model order."""
    out = {}
    for name, module in model.named_modules():
        for attr in _clipq_attrs(module):
            par = _clipq_param(module, attr)
            out[name if attr == "weight" else f"{name}.{attr}"] = par.config  # type: ignore[union-attr]
    return out


def clipq_weight(module: nn.Module) -> torch.Tensor:
    """The weight as the forward pass sees it (pruned-quantized when CLIP-Q is attached)."""
    with torch.no_grad():
        return module.weight.detach()


def strip_clipq(model: nn.Module) -> Plan:
    """Bake the pruned-quantized weights in and drop the full-precision copies, in place.

    Returns the stripped layers' plan: ``estimate_size(model, plan)`` and
    ``save_compressed(model, path, plan)`` take it to size or write the
    stripped model, and ``model.state_dict()`` now holds the compressed
    weights (an attached model's state dict holds the full-precision ones).
    """
    stripped = attached_configs(model)
    for module in model.modules():
        attrs = _clipq_attrs(module)
        if attrs:
            _own_class(module)
        for attr in attrs:
            with torch.no_grad():
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    return Plan(layers=stripped)


def _own_class(module: nn.Module) -> None:
    """Give ``module`` a class of its own, equal to its parametrized class.

    ``copy.deepcopy`` of a parametrized module shares the class that
    parametrize made for the original, and registering or removing a
    parametrization adds or deletes a property on that class: stripping a
    copy would leave the original without a weight (and the other way
    round), attaching CLIP-Q to a copy would give the original a weight
    property it cannot serve.
    """
    cls = module.__class__
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)

