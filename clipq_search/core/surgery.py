"""Model surgery: attach CLIP-Q to layers, and strip it to bake compressed weights in.

Built on ``torch.nn.utils.parametrize``: the full-precision weight stays the
trainable parameter (``<layer>.parametrizations.weight.original``) while every
read of ``<layer>.weight`` returns it pruned-quantized, recomputed from the
current full-precision values. The gradient flows straight through to the
full-precision weight, clipped entries included. State dicts keep the ordinary
``<layer>.weight`` key (the full-precision values) in both directions.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as _torch_module
from torch.nn.utils import parametrize

from clipq_search.core._numba_kernels import DONE, NOT_FINITE
from clipq_search.core.operator import ClipQStats, CompiledOperator, clipq_quantize_with_stats, compiled_for
from clipq_search.core.plan import LayerConfig, Plan, require_module

__all__ = ["ClipQWeight", "attach_clipq", "attached_configs", "clipq_weight", "strip_clipq"]

_ORIGINAL = "parametrizations.weight.original"


class _StraightThrough(torch.autograd.Function):
    """Forward returns the quantized tensor; backward hands the gradient to the original unchanged."""

    @staticmethod
    def forward(ctx: Any, original: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return quantized

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def straight_through(original: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized``'s values, with the gradient handed to ``original`` unchanged.

    A view of ``original`` (a native identity in the backward pass) that is
    given ``quantized``'s memory: the same values and gradient as
    ``_StraightThrough``, without two Python calls per layer and step, which
    cost a small model's training step several percent. As a view it shares
    ``original``'s version counter, so a graph kept across an optimizer step
    refuses its backward pass exactly as a plain layer's does. While
    ``torch.jit.trace``, ``torch.compile`` or ``torch.export`` record the
    operations (they would record the view, not the swap of its memory, and
    compute with the full-precision weight) and for tensors whose memory
    cannot be swapped (another dtype, device or tensor type) it is
    ``_StraightThrough``.
    """
    if quantized.dtype == original.dtype and quantized.device == original.device:
        return _same_kind_straight_through(original, quantized)
    return _StraightThrough.apply(original, quantized)


def _same_kind_straight_through(original: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``straight_through`` for a ``quantized`` of ``original``'s dtype and device (the compiled path's result)."""
    if not _recording():
        view = original.view_as(original)
        try:
            view.data = quantized
        except RuntimeError:  # e.g. a wrapper tensor (torch.func): incompatible for .data
            pass
        else:
            return view
    return _StraightThrough.apply(original, quantized)


# torch.jit.is_tracing() is this C function behind a Python check for scripting, which never holds
# where this Python code runs; torch.compiler.is_compiling is called as it is (dynamo traces that call).
_is_tracing = getattr(torch._C, "_is_tracing", None) or torch.jit.is_tracing
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


def _recording() -> bool:
    """Whether torch.jit.trace, torch.compile or torch.export is recording the operations run."""
    return _is_tracing() or _is_compiling()


# torch's registries of global module hooks (dicts it fills and empties, never replaces); a torch
# without one of them: always call as usual.
_GLOBAL_HOOKS = tuple(getattr(_torch_module, name, {None: None}) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


def _unhooked(chain: nn.Module, clipq: nn.Module) -> bool:
    """Whether calling ``chain`` and ``clipq`` would run no hook of theirs and no global module hook."""
    forward, forward_pre, backward, backward_pre = _GLOBAL_HOOKS
    return not (forward or forward_pre or backward or backward_pre or chain._forward_hooks
                or chain._forward_pre_hooks or chain._backward_hooks or chain._backward_pre_hooks
                or clipq._forward_hooks or clipq._forward_pre_hooks or clipq._backward_hooks
                or clipq._backward_pre_hooks)


def _fresh_state() -> dict[str, Any]:
    return {"stats": None, "key": None, "cache": None, "op": None, "source": None, "out": None,
            "lock": threading.Lock()}


# Whether a result's memory can be written again: torch's own reference counts of a tensor and of its
# memory (``Tensor._use_count``, which ``torch.utils.swap_tensors`` relies on, and
# ``torch._C._storage_Use_Count``). Without them (another torch), every result gets fresh memory.
_tensor_use_count = getattr(torch.Tensor, "_use_count", None)
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _result_holder(shape: torch.Size, inference: bool) -> list[Any]:
    """A fresh result: ``[tensor, its numpy memory, made in inference mode]``.

    numpy memory, so that the compiled operator needs no tensor-to-numpy view
    per step; shaped by numpy (a torch view costs several times more).
    """
    flat = np.empty(math.prod(shape), np.float32)
    return [torch.from_numpy(flat.reshape(shape)), flat, inference]


def _counts(holder: list[Any]) -> tuple[int, int, int, int, int]:
    # torch keeps one Python object per storage: someone holding it (``untyped_storage()``) shows in
    # its Python reference count, not in the storage's own use count
    storage = holder[0].untyped_storage()
    return (sys.getrefcount(holder[0]), sys.getrefcount(holder[1]), holder[0]._use_count(),
            _storage_use_count(storage._cdata), sys.getrefcount(storage))


def _alone(holder: list[Any]) -> bool:
    """Whether nothing but ``holder`` refers to its result ``holder[0]`` or the result's memory.

    No Python reference elsewhere (a variable, a list, an array from
    ``Tensor.numpy()``), no other C++ holder (a graph's saved tensor), no
    other tensor on the memory (a view, the straight-through weight, a
    tensor saved for backward). The counts are compared with those of a
    holder known to be alone (``_ALONE``), measured once by this same code,
    so that the interpreter's own way of counting cancels out.
    """
    return _counts(holder) == _ALONE


# What can hold a result besides its holder: another reference, a view, a numpy array, its storage,
# the straight-through weight, a graph that saved it for backward.
_SHARES = (lambda t: t, lambda t: t.view(8), lambda t: t.numpy(), lambda t: t.untyped_storage(),  # noqa: E731
           lambda t: straight_through(torch.zeros(2, 4, requires_grad=True), t),
           lambda t: torch.ones(3, 2, requires_grad=True) @ t)


def _alone_while_shared(share: Any) -> bool:
    holder = _result_holder(torch.Size((2, 4)), False)
    other = share(holder[0])  # noqa: F841 - alive during the check
    return _alone(holder)


def _alone_counts() -> tuple[int, ...] | None:
    """The counts ``_alone`` expects; None (never reuse) where they cannot tell a shared result from
    one that is alone. Measured with gradients on whatever mode the importer is in (under no_grad a
    graph would save nothing, and that sharing would go unseen)."""
    global _ALONE
    if _tensor_use_count is None or _storage_use_count is None or _increment_version is None:
        return None
    try:
        with torch.inference_mode(False), torch.enable_grad():
            _ALONE = _counts(_result_holder(torch.Size((2, 4)), False))
            alone = _alone(_result_holder(torch.Size((2, 4)), False))
            if alone and not any(map(_alone_while_shared, _SHARES)):
                return _ALONE
    except Exception:  # noqa: BLE001 - any failure: fresh memory for every result
        pass
    return None


_ALONE: tuple[int, ...] | None = None
# A result written again is the same tensor with new values: its version goes up, as after any
# in-place change (for whatever keeps its id, a weak reference or its version).
_increment_version = getattr(getattr(torch.autograd, "graph", None), "increment_version", None)


def _compilable(t: torch.Tensor) -> bool:
    """Whether the compiled CPU operator can run on ``t`` in place (no conversion, no copy)."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def _fits(op: CompiledOperator, t: torch.Tensor, p: float, bits: int) -> bool:
    """Whether ``op`` computes the operator for ``t`` with (p, bits)."""
    return _compilable(t) and t.numel() == op.n and op.p == p and op.bits == bits


class ClipQWeight(nn.Module):
    """Parametrization computing the CLIP-Q weight from the full-precision one.

    The result is cached per version of the full-precision tensor, so
    evaluation over many batches quantizes once; any optimizer step (an
    in-place update) bumps the version and forces a recompute. The previous
    thresholds are kept as a hint that makes the next exact search fast.
    """

    def __init__(self, p: float, bits: int) -> None:
        super().__init__()
        cfg = LayerConfig(p, bits)
        self.p, self.bits = cfg.p, cfg.bits
        # Per-step state lives in a plain dict: nn.Module.__setattr__ costs
        # more than the operator on a small layer. "op": the compiled CPU
        # operator with its scratch, set up after the first call; "stats": a
        # ClipQStats, or that operator (its latest result, read on demand).
        self._state = _fresh_state()

    def __getstate__(self) -> dict[str, Any]:
        # Copies (deepcopy) start afresh: the cached result, the compiled
        # operator's scratch and the lock belong to this layer alone.
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
        if isinstance(stats, CompiledOperator):
            with self._state["lock"]:  # not while another thread's call is filling it
                stats = self._state["stats"] = stats.stats()
        return stats

    def invalidate(self) -> None:
        """Forget the cached result (after p or bits changed)."""
        self._state["cache"] = self._state["op"] = self._state["source"] = self._state["out"] = None

    def quantize(self, original: torch.Tensor) -> torch.Tensor:
        """The pruned-quantized weight (no autograd graph), from cache when unchanged."""
        state = self._state
        # A result made under inference_mode cannot take part in autograd: not reused outside it.
        key = (original.data_ptr(), original._version, id(original), original.dtype, torch.is_inference_mode_enabled())
        if state["cache"] is not None and key == state["key"]:
            return state["cache"]
        # Let go of the previous result first: when nothing else holds it, its memory takes the new
        # one (below), or the allocator hands it straight back.
        state["cache"] = None
        op, source = state["op"], state["source"]
        # ``source`` is reset whenever ``op`` is: the same tensor (memory, object, dtype, shape), p and
        # bits as when ``op`` was last checked need no new check
        checked = (key[0], key[2], key[3], self.p, self.bits, original.shape)
        same = source is not None and source[0] == checked
        usable = op is not None and (same or _fits(op, original, self.p, self.bits))
        if usable and state["lock"].acquire(blocking=False):
            # the training step's path: one compiled call, the hint kept inside ``op``
            try:
                if not same:  # a numpy view of the weight, made once
                    source = state["source"] = (checked, original.detach().view(-1).numpy())
                    state["out"] = None
                # The previous result's memory when nothing else holds it any more (``_alone``): a fresh
                # result costs an allocation, a free and a tensor made from numpy memory, some 10-15
                # microseconds a layer inside a training step (40 a step for LeNet-300-100).
                out = state["out"]
                if out is None or out[2] != key[4] or _ALONE is None or not _alone(out):
                    out = state["out"] = _result_holder(original.shape, key[4])
                elif not key[4]:  # (inference tensors have no version)
                    _increment_version(out[0])
                status = op.run_arrays(source[1], out[1], original)
                q = out[0]  # held before the lock is let go: another thread's call then takes fresh memory
            finally:
                state["lock"].release()
            if status != NOT_FINITE:  # else the general path below makes the all-NaN result
                q = q if status == DONE else torch.zeros_like(original)
                state["stats"], state["cache"], state["key"] = op, q, key
                return q
        stats = self.last_stats
        hint = stats.hint if stats is not None else None
        with torch.no_grad():
            q, stats = clipq_quantize_with_stats(original, self.p, self.bits, hint=hint)
        state["stats"], state["cache"], state["key"] = stats, q, key
        state["source"] = None  # no view kept of memory the layer may have left
        n = original.numel()
        if _compilable(original) and compiled_for(n):
            if op is None or not _fits(op, original, self.p, self.bits):
                op = state["op"] = CompiledOperator(n, self.p, self.bits)
            with state["lock"]:
                op.set_hint(stats.hint, original)
        return q

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        q = self.quantize(original)
        # While torch.jit.trace records, also without gradients: its check traces again under no_grad
        # and compares the two graphs.
        if (original.requires_grad and torch.is_grad_enabled()) or _recording():
            out = self._state["out"]
            if out is not None and q is out[0]:  # the compiled path's: original's dtype and device by construction
                return _same_kind_straight_through(original, q)
            return straight_through(original, q)
        return q

    def extra_repr(self) -> str:
        return f"p={self.p}, bits={self.bits}"


def _quick_weight(module: nn.Module) -> None:
    """Make reading ``module.weight`` call the ``ClipQWeight`` directly when it is the only parametrization.

    ``register_parametrization`` gives the module a class of its own whose
    ``weight`` property goes through ``ParametrizationList`` and two module
    calls: some 10 microseconds per read, a few percent of a small model's
    training step. This property reads the same tensor the same way, and
    hands over to parametrize's own whenever it would do more: caching
    (``parametrize.cached()``), another parametrization chained on the
    weight, module hooks (on the parametrization, its list, or global), a
    weight that is a buffer, or scripting.
    """
    cls = module.__class__
    general = cls.weight  # parametrize's property

    def weight(self: nn.Module) -> torch.Tensor:
        chain = self._modules["parametrizations"]._modules["weight"]
        if len(chain._modules) != 1 or parametrize._cache_enabled or torch.jit.is_scripting():
            return general.fget(self)
        clipq, original = chain._modules["0"], chain._parameters.get("original")
        if type(clipq) is not ClipQWeight or original is None or not _unhooked(chain, clipq):
            return general.fget(self)
        return clipq.forward(original)

    cls.weight = property(weight, general.fset)


def _clipq_param(module: nn.Module) -> ClipQWeight | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for par in module.parametrizations["weight"]:  # type: ignore[union-attr,index]
        if isinstance(par, ClipQWeight):
            return par
    return None


def _save_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    # Save the ordinary key: `<layer>.weight` holds the full-precision weight.
    key = prefix + _ORIGINAL
    if key in state_dict and _clipq_param(module) is not None:
        state_dict[prefix + "weight"] = state_dict.pop(key)


def _load_pre_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # Accept an ordinary state dict: map `<layer>.weight` onto the original.
    if _clipq_param(module) is not None and prefix + "weight" in state_dict and prefix + _ORIGINAL not in state_dict:
        state_dict[prefix + _ORIGINAL] = state_dict.pop(prefix + "weight")


def attach_clipq(model: nn.Module, plan: Plan | Mapping[str, Any]) -> dict[str, LayerConfig]:
    """Make the plan's layers of ``model`` train with CLIP-Q, in place; return what was attached.

    ``plan`` is a :class:`Plan` or its JSON dict. Layers that already carry
    CLIP-Q get the new setting. Raises ``ConfigError`` for unknown layer names.
    """
    require_module(model)
    if not isinstance(plan, Plan):
        plan = Plan.from_dict(plan)
    resolved = plan.resolve(model)
    modules = dict(model.named_modules())
    for name, cfg in resolved.items():
        module = modules[name]
        existing = _clipq_param(module)
        if existing is not None:
            existing.p, existing.bits = cfg.p, cfg.bits
            existing.invalidate()
            continue
        if parametrize.is_parametrized(module):  # its class may be shared with a deep copy (``_own_class``)
            _own_class(module)
        parametrize.register_parametrization(module, "weight", ClipQWeight(cfg.p, cfg.bits), unsafe=True)
        _quick_weight(module)
        module.register_state_dict_post_hook(_save_hook)
        module.register_load_state_dict_pre_hook(_load_pre_hook)
    return resolved


def attached_configs(model: nn.Module) -> dict[str, LayerConfig]:
    """The (p, bits) of every layer that currently carries CLIP-Q, by module name."""
    out = {}
    for name, module in model.named_modules():
        par = _clipq_param(module)
        if par is not None:
            out[name] = par.config
    return out


def clipq_weight(module: nn.Module) -> torch.Tensor:
    """The weight as the forward pass sees it (pruned-quantized when CLIP-Q is attached)."""
    with torch.no_grad():
        return module.weight.detach()


def strip_clipq(model: nn.Module) -> dict[str, LayerConfig]:
    """Bake the pruned-quantized weights in and drop the full-precision copies, in place.

    Returns the configs of the stripped layers (what ``save_compressed`` needs).
    """
    stripped = attached_configs(model)
    for name, module in model.named_modules():
        if name in stripped:
            _own_class(module)
            with torch.no_grad():
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return stripped


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


_ALONE = _alone_counts()
