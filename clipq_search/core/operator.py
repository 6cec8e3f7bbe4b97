"""The CLIP-Q operator: per-sign clipping, uniform partitioning, interval means.

Pure tensor math (see ``docs/method.md``); nothing here knows about models,
Optuna or Ray. All work is vectorised and runs on any device and for float32,
float16 and bfloat16 weights (statistics are computed in float32 and the result
is cast back to the weight's dtype).

The operator runs before every training step, so it is written for speed
(``benchmarks/bench_overhead.py``) without giving up exactness. On CPU it runs
as one compiled call (``_fused.clipq_cpu``, numba: a scan for the counts,
extremes and thresholds, then codes, sums and levels), driven by a
``CompiledOperator`` that a layer keeps from step to step; the tensor
implementation below serves CUDA and machines without numba:

- thresholds are exact order statistics, read from a histogram whose bin is a
  monotone function of the value (so counting bins never misplaces an
  element), with fine bins around the previous step's thresholds;
- interval codes come from the same float32 operations as the definition,
  and the sums are exact (fixed-point integers, ``_rules.fixed_point_bits``),
  so the result matches the reference (``core.reference.reference_clipq``)
  and the compiled one bit for bit, on any device;
- no ``where``/boolean masks/``long`` indices in the hot path (slow on CPU):
  comparisons write 0/1 floats and indices are int32;
- on CPU, scratch buffers are reused between calls (``_scratch``): fresh
  megabyte-sized tensors cost more in page faults than the arithmetic.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clipq_search.core import _numba_kernels as _fused
from clipq_search.core._rules import F32_TINY
from clipq_search.core.plan import BITS_RANGE, validate_p_bits

__all__ = [
    "BITS_RANGE",
    "ClipQStats",
    "clipq_quantize",
    "clipq_quantize_with_stats",
    "compile_cpu_kernels",
    "validate_p_bits",
]


# Largest tensor (elements) whose CPU prefix-sum buffer is kept between calls (8 bytes each).
_SCRATCH_MAX = 1 << 21


@dataclass(frozen=True)
class ClipQStats:
    """Thresholds and levels chosen for one tensor.

    ``levels`` has ``2**bits - 1`` entries (negative intervals first, ascending);
    an empty interval's level is NaN. ``rank_neg`` / ``rank_pos`` are the
    1-based ranks of the thresholds in the ascending flattened tensor (0 when
    that sign clips nothing). ``w_min`` / ``w_max`` are the tensor's extremes.
    ``hint`` lets the next call find the thresholds fast.
    """

    c_neg: float
    c_pos: float
    n_neg_intervals: int
    levels: torch.Tensor
    rank_neg: int
    rank_pos: int
    w_min: float = math.nan
    w_max: float = math.nan

    @property
    def hint(self) -> tuple[float, float, float, float]:
        """What the next call on the slightly changed tensor takes as ``hint``."""
        return (self.c_neg, self.c_pos, self.w_min, self.w_max)


# --------------------------------------------------------------------------- compiled CPU path

# Window elements kept by one scan; a window holding more is a miss.
_WINDOW_CAP = 4096
# Starting half-width of a hinted window of the compiled path, in average gaps
# between sorted weights. Every element inside is copied, but a miss costs a
# whole extra scan; the kernel then adapts it per layer (``_GAPS_*`` in the kernels): wider
# where thresholds move far between steps (large layers, high learning rates), narrower where
# they barely move.
_FUSED_HINT_GAPS = 64.0
# Scans with a narrowed window before the compiled path selects a missed threshold in full (``_select``).
_MAX_ROUNDS = 4
_local = threading.local()


def _select(flat: np.ndarray, rank: int) -> float:
    """The ``rank``-th smallest (1-based) value of ``flat``: a missed threshold selected in full.

    numpy's introselect; ``torch.kthvalue`` does the same on the CPU several times slower.
    """
    return float(np.partition(flat, rank - 1)[rank - 1])


# The compiled kernels count in int32.
_COMPILED_MAX_ELEMENTS = 2**31 - 1


def compiled_for(n: int) -> bool:
    """Whether a CPU tensor of ``n`` elements runs the compiled operator (numba available, not switched off)."""
    return n <= _COMPILED_MAX_ELEMENTS and _fused.enabled()


class CompiledOperator:
    """The compiled CPU operator (``_fused.clipq_cpu``) for one (size, p, bits), reusable step after step.

    Holds the kernel's parameters, result and scratch arrays, so that a
    training step runs one compiled call and a few lines of Python per layer
    (``ClipQWeight`` keeps one per layer: a training step is the part of the
    program that must be fast, and there the interpreter runs cold, so every
    line costs). After each call the thresholds and extremes it found are
    the hint of the next one.
    """

    __slots__ = ("n", "p", "bits", "n_levels", "params", "result", "table", "buf", "codes", "mask", "kernel")

    def __init__(self, n: int, p: float, bits: int, *, scratch: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        validate_p_bits(p, bits)
        f = _fused
        self.n, self.p, self.bits, self.n_levels = n, p, bits, 2**bits - 1
        self.params = f.make_params(p, self.n_levels, gaps=_FUSED_HINT_GAPS, rounds=_MAX_ROUNDS)
        self.result = np.zeros(f.RESULT_SIZE)
        self.table = np.empty(256, np.float32)
        self.buf = np.empty(_WINDOW_CAP, np.float32)
        self.codes, self.mask = scratch if scratch is not None else (np.empty(n, np.uint8), np.empty(n, np.uint8))
        self.kernel = f.kernels().clipq_cpu

    def set_hint(self, hint: tuple[float, ...] | None, w: torch.Tensor) -> None:
        """Use ``hint`` (see ``clipq_quantize_with_stats``) for the next call on ``w``."""
        f, nan = _fused, math.nan
        if hint is None:
            hint = (nan, nan, nan, nan)
        elif len(hint) < 4:
            hint = (hint[0], hint[1], *(float(v) for v in torch.aminmax(w)))
        self.params[f.P_HINT_NEG:f.P_MAX + 1] = hint[:4]

    def run(self, w: torch.Tensor, out: torch.Tensor) -> float:
        """Quantize flat contiguous float32 CPU ``w`` into ``out`` (same); return the status (``_fused.DONE``...).

        ``NOTHING_KEPT``: ``out`` is untouched, the result is all zeros;
        ``NOT_FINITE``: ``w`` holds a NaN or an infinity, nothing was computed.
        A threshold that the hinted windows miss within ``_MAX_ROUNDS`` scans
        is selected in full (``_select``) and given to a second call.
        """
        return self.run_arrays(w.numpy(), out.numpy())

    def run_arrays(self, w_np: np.ndarray, out_np: np.ndarray) -> float:
        """``run`` on flat float32 numpy arrays (views of the tensors, or arrays of their own)."""
        f, params, result = _fused, self.params, self.result
        threads = f.team_threads(self.n)
        if threads != params[f.P_THREADS]:
            self._use_threads(threads)
        self.kernel(w_np, out_np, self.codes, self.mask, self.buf, self.table, params, result)
        if result[f.R_STATUS] == f.MISSED:
            sides = ((f.R_FOUND_NEG, f.R_RANK_NEG, f.R_C_NEG, f.P_GIVEN_NEG),
                     (f.R_FOUND_POS, f.R_RANK_POS, f.R_C_POS, f.P_GIVEN_POS))
            for found, rank, value, given in sides:
                params[given] = float(result[value]) if result[found] else _select(w_np, int(result[rank]))
            rounds, params[f.P_ROUNDS] = params[f.P_ROUNDS], 1
            try:
                self.kernel(w_np, out_np, self.codes, self.mask, self.buf, self.table, params, result)
            finally:
                params[f.P_ROUNDS], params[f.P_GIVEN_NEG], params[f.P_GIVEN_POS] = rounds, math.nan, math.nan
        return result[f.R_STATUS]

    def _use_threads(self, threads: int) -> None:
        """Run on ``threads`` threads of torch's OpenMP team from now on (``_fused.team``); 1: this one."""
        f = _fused
        if threads > 1:
            self.params[f.P_FORK:f.P_TEAM_SIZE + 1] = f.team()
            if len(self.buf) < _WINDOW_CAP * threads:  # a part of the window buffer per thread
                self.buf = np.empty(_WINDOW_CAP * threads, np.float32)
        self.params[f.P_THREADS] = threads

    def stats(self) -> ClipQStats:
        """The statistics of the latest call (after ``DONE`` or ``NOTHING_KEPT``)."""
        f, r = _fused, self.result
        done = r[f.R_STATUS] == f.DONE
        n_levels = self.n_levels
        levels = torch.from_numpy(self.table[:n_levels].copy()) if done else torch.full((n_levels,), math.nan)
        return ClipQStats(
            float(r[f.R_C_NEG]), float(r[f.R_C_POS]), int(r[f.R_N_NEG_INT]) if done else 0, levels,
            int(r[f.R_RANK_NEG]), int(r[f.R_RANK_POS]), float(r[f.R_MIN]), float(r[f.R_MAX]),
        )


def _byte_scratch(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two uint8 scratch arrays of ``n`` bytes, kept per thread for the largest size seen."""
    have = getattr(_local, "bytes", None)
    if have is None or have.shape[1] < n:
        have = np.empty((2, n), np.uint8)
        if n <= _SCRATCH_MAX:
            _local.bytes = have
    return have[0, :n], have[1, :n]


# --------------------------------------------------------------------------- tensor implementation

_FLOAT32_MAX_EXP = 127  # the largest power of two a float32 holds: 2**127


class _Constants:
    """The small constant tensors of one (device, size, p, bits), made once and kept on the device.

    Copying them from the host at every call would wait for the device; kept,
    a training step only launches work.
    """

    def __init__(self, device: torch.device, n: int, p: float, bits: int) -> None:
        inf, levels = math.inf, 2**bits - 1

        def f64(*v: float) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.float64, device=device)

        def f32(*v: float) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.float32, device=device)

        # Count queries: weights below -inf (none), below the smallest subnormal (<= 0), below 0, below -inf.
        self.count_queries = f32(-inf, F32_TINY, 0.0, -inf)
        self.count_offsets = torch.tensor([0, n, 0, 0], dtype=torch.int64, device=device)
        self.fractions = f64(0.0, p, p, 0.0)
        self.index_base = f64(0.0, n - 1.0, 0.0, n - 1.0)
        self.index_sign = f64(0.0, -1.0, 1.0, 0.0)
        self.always = f64(1.0, 0.0, 0.0, 1.0)
        self.side_sign = f64(1.0, -1.0)
        self.side_base = f64(0.0, float(levels))
        self.query_shift = f32(-inf, 0.0, 0.0, inf)
        self.query_towards = f32(-inf, inf, 0.0, inf)
        self.magnitude_sign = f64(-1.0, 0.0, 0.0, 1.0)
        self.interval_queries = torch.arange(levels + 1, dtype=torch.float32, device=device).repeat(2, 1)
        self.not_clipped = torch.ones(2 * levels + 1, dtype=torch.bool, device=device)
        self.not_clipped[levels] = False
        self.float32_max_exp = torch.tensor(_FLOAT32_MAX_EXP, dtype=torch.int32, device=device)
        self.zero_exp = torch.zeros((), dtype=torch.int32, device=device)
        self.n_bits = math.frexp(float(n))[1]  # n < 2**n_bits (``_rules.fixed_point_bits``)


_constants: dict[tuple[Any, ...], _Constants] = {}
_constants_lock = threading.Lock()
# Distinct (device, size, p, bits) kept at most: a model's layers, a few times over.
_CONSTANTS_MAX = 4096


def _constants_for(device: torch.device, n: int, p: float, bits: int) -> _Constants:
    if torch.compiler.is_compiling():  # traced into a graph: they become the graph's constants
        return _Constants(device, n, p, bits)
    key = (device, n, p, bits)
    found = _constants.get(key)
    if found is None:
        found = _Constants(device, n, p, bits)
        with _constants_lock:
            if len(_constants) >= _CONSTANTS_MAX:
                _constants.clear()
            _constants[key] = found
    return found


def _prefix_buffer(n: int, device: torch.device) -> torch.Tensor:
    """``n + 1`` int64, the first 0: the running sums go after it. Kept per thread on CPU for small sizes."""
    if device.type != "cpu" or n > _SCRATCH_MAX:
        return torch.zeros(n + 1, dtype=torch.int64, device=device)
    have = getattr(_local, "prefix", None)
    if have is None or have.numel() < n + 1:
        have = _local.prefix = torch.zeros(max(n + 1, 1024), dtype=torch.int64)
    return have[: n + 1]


def _power_of_two(exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2**exponent`` exactly (int32 tensor of exponents in the dtype's normal range), from its bit pattern."""
    if dtype == torch.float64:
        return torch.bitwise_left_shift(exponent.to(torch.int64) + 1023, 52).view(torch.float64)
    return torch.bitwise_left_shift(exponent + _FLOAT32_MAX_EXP, 23).view(torch.float32)


@dataclass(frozen=True)
class PendingStats:
    """The statistics of one ``quantize_on_device`` call, still on the device; ``read()`` brings them over."""

    n: int
    bits: int
    ends: torch.Tensor  # float64 [w_min, c_pos, c_neg, w_max]
    clipped: torch.Tensor  # float64 [0, k_pos, k_neg, 0]
    index: torch.Tensor  # int64 [0, index of c_pos, index of c_neg, n - 1] in the ascending tensor
    spans: torch.Tensor  # float64 [span_neg, span_pos]; 0 for a side that keeps nothing
    n_neg_intervals: torch.Tensor  # float64, 1 element
    levels: torch.Tensor  # float32, 2 * n_levels + 1: the negative side's, the clipped (0), the positive side's

    def read(self) -> ClipQStats:
        """A ``ClipQStats`` (one read from the device)."""
        n_levels = 2**self.bits - 1
        small = torch.cat([self.ends, self.clipped, self.index.double(), self.spans, self.n_neg_intervals])
        w_min, c_pos, c_neg, w_max, _, k_pos, k_neg, _, _, i_pos, i_neg, _, span_neg, span_pos, n_neg = small.tolist()
        rank_neg = int(i_neg) + 1 if k_neg > 0 else 0
        rank_pos = int(i_pos) + 1 if k_pos > 0 else 0
        nan = math.nan
        if not (math.isfinite(w_min) and math.isfinite(w_max)):
            levels = torch.full((n_levels,), nan, device=self.levels.device)
            return ClipQStats(nan, nan, 0, levels, 0, 0, w_min, w_max)
        if not (span_neg > 0 or span_pos > 0):  # every weight clipped
            levels = torch.full((n_levels,), nan, device=self.levels.device)
            return ClipQStats(c_neg, c_pos, 0, levels, rank_neg, rank_pos, w_min, w_max)
        n_neg = int(n_neg)
        levels = torch.cat([self.levels[:n_neg], self.levels[n_levels + 1: 2 * n_levels + 1 - n_neg]])
        return ClipQStats(c_neg, c_pos, n_neg, levels, rank_neg, rank_pos, w_min, w_max)


def quantize_on_device(
    weight: torch.Tensor, p: float, bits: int, *, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, PendingStats]:
    """The CLIP-Q operator as a fixed sequence of tensor operations that never reads a value back to the host.

    The tensor implementation: what runs on CUDA (and on CPU without numba).
    Every size is known before the call, so no step waits for the device,
    and ``torch.compile`` can trace it whole. Bit for bit the reference:

    - one sort gives the counts per sign, the ranks' thresholds and the
      extremes as order statistics (ties at a threshold are clipped);
    - the partition rules (``_rules.clip_ranks``, ``_rules.partition``) run
      as float64 arithmetic on two- and four-element tensors;
    - in sorted order every interval is a contiguous run: its bounds are
      where ``floor((w - start) / width)``, computed in float32 as the
      definition does, first reaches each code (a search in the sorted
      codes), and its exact fixed-point sum is a difference of running sums;
    - the levels go back to each weight's place through the sort's permutation.

    ``weight`` must be non-empty and floating point; ``out`` (optional) is a
    contiguous tensor of its shape and dtype that receives the result.
    Returns the result and the statistics, still on the device.
    """
    device, n, levels_n = weight.device, weight.numel(), 2**bits - 1
    k = _constants_for(device, n, p, bits)
    w = weight.detach().reshape(-1)
    if w.dtype != torch.float32:
        w = w.float()
    s, order = torch.sort(w)
    # counts [0, n_nonpositive, n_negative, 0] -> per sign [0, n_positive, n_negative, 0]
    per_sign = torch.searchsorted(s, k.count_queries).sub_(k.count_offsets).abs_()
    clipped = torch.mul(per_sign, k.fractions).round_()  # round(p * count), half to even as Python's round
    # indices [0, n - 1 - kept positives, kept-candidate negatives, n - 1] of w_min, c+, c-, w_max
    index = torch.addcmul(k.index_base, per_sign - clipped, k.index_sign).clamp_(0, n - 1).long()
    # [w_min, c+, c-, w_max]; a threshold is 0 where its sign clips nothing
    ends = s.take(index) * torch.add(clipped, k.always).sign_()
    ends32 = ends.float()
    pairs = ends.view(2, 2)  # [[w_min, c+], [c-, w_max]]
    spans = torch.sub(pairs[1], pairs[0]).clamp_min_(0.0)  # [c- - w_min, w_max - c+]
    # intervals of the negative side: round(n_levels * span- / (span- + span+)), at least 1 for a side
    # that keeps weights, at most n_levels - 1 when the other side keeps some too
    has = spans.sign()
    share = torch.mul(spans, float(levels_n)).div_(spans.sum()).round_()
    n_neg = share.clamp_(has, torch.rsub(has.flip(0), float(levels_n)))[:1]
    intervals = torch.addcmul(k.side_base, n_neg, k.side_sign).float()  # [n_neg, n_levels - n_neg]
    widths = torch.div(spans, intervals).clamp_min_(F32_TINY).float()
    # Codes in sorted order per side, capped at the side's last interval: floor(code) >= j iff code >= j.
    codes = torch.sub(s, ends32[:2, None]).div_(widths[:, None]).clamp_max_((intervals - 1.0)[:, None])
    bounds = torch.searchsorted(codes, k.interval_queries)
    # each side's run: [0, a) kept negatives, [b, n) kept positives, from [-inf, next(c+), c-, +inf]
    runs = torch.searchsorted(s, torch.nextafter(ends32 + k.query_shift, ends32 + k.query_towards)).view(2, 2)
    edges = bounds.clamp_(runs[0, :, None], runs[1, :, None]).view(-1)  # runs: neg 0..n_neg, clipped, pos
    # Exact sums (``_rules.fixed_point_bits``): trunc(w * 2**F) in int64; 2**F in two float32 factors,
    # each exact, so that no float64 copy of the weights is made.
    magnitude = torch.mul(ends, k.magnitude_sign).amax()  # max(-w_min, w_max)
    exp_f = torch.rsub(torch.frexp(magnitude).exponent, 62 - k.n_bits)
    exp_hi = torch.clamp_max(exp_f, k.float32_max_exp)
    fixed = torch.mul(s, _power_of_two(exp_hi, torch.float32))
    fixed = fixed.mul_(_power_of_two(torch.sub(exp_f, exp_hi), torch.float32)).to(torch.int64)
    prefix = _prefix_buffer(n, device)
    torch.cumsum(fixed, 0, out=prefix[1:])
    at_edges = prefix.take(edges)
    sums = at_edges[1:] - at_edges[:-1]
    counts = edges[1:] - edges[:-1]
    # level = sum / count * 2**-F in float64 (``_rules.level``); the clipped run's level is 0; a weight
    # that is NaN or infinite makes every level NaN (magnitude * 0)
    levels = sums.double().div_(counts).mul_(_power_of_two(torch.neg(exp_f), torch.float64))
    levels = torch.where(k.not_clipped, levels, 0.0).add_(magnitude * 0.0).float()
    run = torch.searchsorted(edges[1:-1], torch.arange(n, device=device), right=True)
    target = out.view(-1) if out is not None else torch.empty(n, dtype=weight.dtype, device=device)
    target.index_copy_(0, order, levels.to(weight.dtype).take(run))
    stats = PendingStats(n, bits, ends, clipped, index, spans, n_neg, levels)
    return target.view(weight.shape), stats


# --------------------------------------------------------------------------- operator


def _not_finite(weight: torch.Tensor, n_levels: int, w_min: float, w_max: float) -> tuple[torch.Tensor, ClipQStats]:
    """All NaN: weights holding a NaN or an infinity (a diverged training) have no meaningful thresholds."""
    nan = math.nan
    levels = torch.full((n_levels,), nan, device=weight.device)
    return torch.full_like(weight, nan), ClipQStats(nan, nan, 0, levels, 0, 0, w_min, w_max)


def clipq_quantize_with_stats(
    weight: torch.Tensor,
    p: float,
    bits: int,
    *,
    hint: tuple[float, ...] | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ClipQStats]:
    """Prune-quantize ``weight`` (any shape) and return it with the chosen statistics.

    ``hint`` is ``(c_neg, c_pos)`` or ``(c_neg, c_pos, w_min, w_max)`` from a
    previous call on slowly changing weights (``ClipQStats.hint``); it only
    speeds up the threshold search, the result is exact. ``out`` is a tensor
    that the result may be written into and returned as (used when it is a
    contiguous float32 CPU tensor of the weight's shape and the weight is
    float32); its contents are overwritten, so it must be memory that
    nothing else still reads (no saved autograd graph, no alias).

    Weights holding a NaN or an infinity (a diverged training) give an
    all-NaN result, so that the loss shows it.
    """
    validate_p_bits(p, bits)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight has dtype {weight.dtype}; CLIP-Q quantizes floating-point weights (e.g. float32)")
    out_dtype = weight.dtype
    n_levels = 2**bits - 1
    n = weight.numel()
    if n == 0:
        levels = torch.full((n_levels,), float("nan"), device=weight.device)
        return torch.zeros_like(weight), ClipQStats(0.0, 0.0, 0, levels, 0, 0)

    w = weight.detach().reshape(-1)
    if w.device.type == "cpu" and compiled_for(n):
        reuse = (
            out is not None and out.device.type == "cpu" and out.dtype == torch.float32 == out_dtype
            and out.shape == weight.shape and out.is_contiguous()
        )
        w32 = w.to(torch.float32).contiguous()
        op = CompiledOperator(n, p, bits, scratch=_byte_scratch(n))
        op.set_hint(hint, w32)
        flat = out.view(-1) if reuse else torch.empty(n)
        status = op.run(w32, flat)
        if status == _fused.NOT_FINITE:
            return _not_finite(weight, n_levels, float(w32.min()), float(w32.max()))
        if status == _fused.DONE:
            result = flat.view(weight.shape).to(out_dtype)
        else:
            result = torch.zeros_like(weight)
        return result, op.stats()
    result, pending = quantize_on_device(weight, p, bits)
    return result, pending.read()


def clipq_quantize(weight: torch.Tensor, p: float, bits: int) -> torch.Tensor:
    """CLIP-Q pruning-quantization of one weight tensor (any shape, same dtype back).

    1. per sign, zero the fraction ``p`` of the smallest-magnitude weights
       (``round(p * count)`` of each sign; ties at the threshold are zeroed too);
    2. split the surviving value range into ``2**bits - 1`` uniform intervals,
       shared between the negative and positive sides in proportion to their
       spans, never straddling the zero band;
    3. replace each surviving weight by the mean of the full-precision weights
       in its interval.

    Raises ``ValueError`` for p outside [0, 1) or bits outside [2, 8].
    """
    return clipq_quantize_with_stats(weight, p, bits)[0]


def compile_cpu_kernels() -> bool:
    """Compile the CPU kernels now, or load them from numba's on-disk cache; False when they are not in use.

    numba compiles them on a process' first call (some 20 s of CPU) and caches them beside their source.
    Processes that start together with a cold cache each compile them; done once beforehand (``make setup``
    does), the trial workers of a search load them instead. The check that decides whether they are used
    (``_fused.enabled``) runs them once, which compiles them.
    """
    return _fused.enabled()
