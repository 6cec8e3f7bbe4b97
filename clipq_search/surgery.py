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
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as _torch_module
from torch.nn.utils import parametrize

from ._fused import DONE, NOT_FINITE
from .ops import ClipQStats, CompiledOperator, clipq_quantize_with_stats, compiled_for
from .plan import LayerConfig, Plan, require_module

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
    if quantized.dtype == original.dtype and quantized.device == original.device and not _recording():
        view = original.view_as(original)
        try:
            view.data = quantized
        except RuntimeError:  # e.g. a wrapper tensor (torch.func): incompatible for .data
            pass
        else:
            return view
    return _StraightThrough.apply(original, quantized)


def _recording() -> bool:
    """Whether torch.jit.trace, torch.compile or torch.export is recording the operations run."""
    compiler = getattr(torch, "compiler", None)
    return torch.jit.is_tracing() or (compiler is not None and compiler.is_compiling())


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _unhooked(chain: nn.Module, clipq: nn.Module) -> bool:
    """Whether calling ``chain`` and ``clipq`` would run no hook of theirs and no global module hook."""
    for name in _GLOBAL_HOOKS:
        if getattr(_torch_module, name, True):  # a hook, or a torch without this registry: call as usual
            return False
    return not (chain._forward_hooks or chain._forward_pre_hooks or chain._backward_hooks
                or chain._backward_pre_hooks or clipq._forward_hooks or clipq._forward_pre_hooks
                or clipq._backward_hooks or clipq._backward_pre_hooks)


def _fresh_state() -> dict[str, Any]:
    return {"stats": None, "key": None, "cache": None, "op": None, "source": None, "lock": threading.Lock()}


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
        self._state["cache"] = self._state["op"] = self._state["source"] = None

    def quantize(self, original: torch.Tensor) -> torch.Tensor:
        """The pruned-quantized weight (no autograd graph), from cache when unchanged."""
        state = self._state
        # A result made under inference_mode cannot take part in autograd: not reused outside it.
        key = (original.data_ptr(), original._version, id(original), original.dtype, torch.is_inference_mode_enabled())
        if state["cache"] is not None and key == state["key"]:
            return state["cache"]
        # Let go of the previous result first: when nothing else holds it, the
        # allocator hands its (warm) memory straight back for the new one.
        state["cache"] = None
        op, source = state["op"], state["source"]
        # ``source`` is reset whenever ``op`` is: the same tensor (memory, object, dtype), p and bits as
        # when ``op`` was last checked need no new check
        checked = (key[0], key[2], key[3], self.p, self.bits)
        same = source is not None and source[0] == checked
        usable = op is not None and (same or _fits(op, original, self.p, self.bits))
        if usable and state["lock"].acquire(blocking=False):
            # the training step's path: one compiled call, the hint kept inside ``op``
            try:
                if not same:  # a numpy view of the weight, made once
                    source = state["source"] = (checked, original.detach().view(-1).numpy())
                flat = np.empty(op.n, np.float32)  # numpy memory: no tensor-to-numpy view to make per step
                status = op.run_arrays(source[1], flat, original)
            finally:
                state["lock"].release()
            if status != NOT_FINITE:  # else the general path below makes the all-NaN result
                # shaped by numpy (a torch view costs several times more, a few microseconds a layer and step)
                q = torch.from_numpy(flat.reshape(original.shape)) if status == DONE else torch.zeros_like(original)
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
