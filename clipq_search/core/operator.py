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

import numpy as np
import torch

from clipq_search.core import _numba_kernels as _fused
from clipq_search.core._rules import clip_ranks, fixed_point_bits, partition
from clipq_search.errors import ConfigError, shown

__all__ = [
    "BITS_RANGE",
    "ClipQStats",
    "clipq_quantize",
    "clipq_quantize_with_stats",
    "validate_p_bits",
]

BITS_RANGE = (2, 8)

# Tensors up to this many elements find their thresholds with ``kthvalue``;
# above it the histogram search is cheaper. Tests lower it to cover both paths.
_DIRECT_SELECT_MAX = 4096
# Fine histogram bins per sign window: enough to leave the threshold alone in
# its bin nearly always, few enough for a cheap bincount.
_FINE_BINS = 2048
# Counters per histogram bin (a power of two), see ``_lanes``.
_LANES = 4
# A hinted window spans this many average gaps between sorted weights on each
# side of the previous threshold.
_HINT_GAPS = 64.0
# Histogram rounds (each narrows the window on a miss) before a full ``kthvalue``.
_MAX_ROUNDS = 4
# A bin with more than one but at most this many elements is resolved by extracting them.
_EXTRACT_MAX = 64
# Largest tensor (elements) whose CPU scratch buffers are kept between calls:
# 4 float32 buffers (5 for half-precision weights), at most 40 MiB per thread.
_SCRATCH_MAX = 1 << 21


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


# --------------------------------------------------------------------------- scratch

_local = threading.local()


def _scratch(n: int, device: torch.device, count: int) -> list[torch.Tensor]:
    """``count`` float32 buffers of ``n`` elements, contents undefined.

    On CPU they are views of per-thread buffers kept for the largest tensor
    seen (up to ``_SCRATCH_MAX``), so a training loop touches no new pages;
    elsewhere (CUDA has its own caching allocator) they are fresh.
    """
    if device.type != "cpu" or n > _SCRATCH_MAX:
        return [torch.empty(n, device=device) for _ in range(count)]
    views = getattr(_local, "views", {})
    if (n, count) in views:
        return views[(n, count)]
    bufs: list[torch.Tensor] = getattr(_local, "bufs", [])
    if len(bufs) < count or bufs[0].numel() < n:
        size = max(n, bufs[0].numel() if bufs else 0)
        _local.bufs = bufs = [torch.empty(size) for _ in range(max(count, len(bufs)))]
        _local.views = views = {}
    if len(views) >= 32:  # many layer sizes: forget the views, not the buffers
        views.clear()
    views[(n, count)] = [b[:n] for b in bufs[:count]]
    _local.views = views
    return views[(n, count)]


# --------------------------------------------------------------------------- thresholds


def _select_direct(w: torch.Tensor, p: float) -> tuple[int, int, int, int, int, float, float]:
    """Counts per sign, ranks and thresholds with ``kthvalue`` (small tensors)."""
    n = w.numel()
    n_negative = int((w < 0).sum())
    n_positive = int((w > 0).sum())
    n_zero = n - n_negative - n_positive
    _, _, rank_neg, rank_pos = clip_ranks(p, n_negative, n_zero, n_positive)
    c_neg = float(torch.kthvalue(w, rank_neg).values) if rank_neg else 0.0
    c_pos = float(torch.kthvalue(w, rank_pos).values) if rank_pos else 0.0
    return n_negative, n_zero, n_positive, rank_neg, rank_pos, c_neg, c_pos


def _neg_window(lo: float, hi: float) -> tuple[float, float]:
    """A window [lo, hi'] for the negative side, ending below zero far enough that 0 lies beyond its last bin."""
    width = max(hi - lo, 1e-30)
    hi = min(hi, -4.0 * width / _FINE_BINS)
    if not hi > lo:
        lo = hi - width
    return lo, hi


def _pos_window(lo: float, hi: float) -> tuple[float, float]:
    lo2, hi2 = _neg_window(-hi, -lo)
    return -hi2, -lo2


def _lanes(w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """0.._LANES-1 per weight (float32, into ``out``) from its low mantissa bits.

    ``bincount`` adds serially, and increments of one counter in a row wait on
    each other: a bin holding 90% of the elements costs 3-4x. Spreading each
    bin over ``_LANES`` counters picked pseudo-randomly removes that.
    """
    bits = torch.bitwise_and(w.view(torch.int32), _LANES - 1, out=out.view(torch.int32))
    return out.copy_(bits)  # elementwise in place: each float overwrites its own int32


def _hist_key(w: torch.Tensor, win_n: tuple[float, float], win_p: tuple[float, float], lanes: torch.Tensor,
              a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Histogram bin of every weight into ``a`` (float32), and ``bin + lane * n_bins`` (int32, returned).

    The bin is a monotone (non-decreasing) function of the value, which is all
    exactness needs: an element in a lower bin is never larger than one in a
    higher bin, whatever the rounding. Layout (W = ``_FINE_BINS``): 0 below the
    negative window, 1..W its fine bins, W+1 the other negatives, W+2 exact
    zeros, W+3 positives below the positive window, W+4..2W+3 its fine bins,
    2W+4 above it. ``b`` is scratch; the int32 result is a view of it. None when
    the windows are too narrow or too far out for float32 (extreme magnitudes).
    """
    fine = float(_FINE_BINS)
    (ln, un), (lp, up) = win_n, win_p
    if not (un - ln > 0 and up - lp > 0):
        return None
    s_n, s_p = fine / (un - ln), fine / (up - lp)
    if not max(s_n, s_p, abs(s_n * ln), abs(s_p * lp)) < 1e30:  # also False for inf/nan
        return None
    # Separately rounded sub and mul, not one fused add: the vectorised body and
    # the scalar tail of a kernel may differ on fused multiply-adds, and the
    # bin must be the same function of the value for every element.
    # negatives: 2 + fine bin in [2, W+3]; zero and positives: W+3 (the window ends below 0)
    torch.sub(w, ln - 3.0 / s_n, out=a).mul_(s_n).clamp_(2.0, fine + 3.0)
    # zero and negatives: -1 (the window starts above 0); positives: fine bin - 1 in [-1, W]
    torch.sub(w, lp, out=b).mul_(s_p).clamp_(-1.0, fine)
    a.add_(b)
    a.add_(torch.sign(w, out=b)).floor_()
    torch.add(a, lanes, alpha=2 * _FINE_BINS + 5, out=b)  # exact: small integers
    key = b.view(torch.int32)
    return key.copy_(b)  # elementwise in place: each int32 overwrites its own float


def _bin_window(side: int, j: int, win: tuple[float, float], w_min: float, w_max: float) -> tuple[float, float]:
    """Approximate value range of bin ``j`` of one side (0: before the window, 1..W: fine, W+1: after), widened."""
    lo, hi = win
    step = (hi - lo) / _FINE_BINS
    if side < 0:
        if j <= 0:
            return _neg_window(w_min, lo + step)
        if j > _FINE_BINS:  # between the window and zero
            return _neg_window(hi - step, hi * 0.125)
        return _neg_window(lo + (j - 2) * step, lo + (j + 1) * step)
    if j <= 0:  # between zero and the window
        return _pos_window(lo * 0.125, lo + step)
    if j > _FINE_BINS:
        return _pos_window(hi - step, w_max)
    return _pos_window(lo + (j - 2) * step, lo + (j + 1) * step)


def _select_hist(
    w: torch.Tensor, p: float, hint: tuple[float, float] | None, w_min: float, w_max: float,
    lanes: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
) -> tuple[int, int, int, int, int, float, float]:
    """Counts per sign, ranks and exact thresholds, usually from a single histogram pass.

    Fine bins cover a window around each hinted threshold (or the whole sign
    without a hint). The rank's bin is found from cumulative counts; if it
    holds one element that element is the threshold, read with a 0/1 mask;
    a few elements are extracted and sorted; a crowded or coarse bin narrows
    the window for another round.
    """
    n = w.numel()
    fine = _FINE_BINS
    half = max(w_max - w_min, 1e-30) * _HINT_GAPS / n
    h_neg, h_pos = hint if hint is not None else (math.nan, math.nan)
    if math.isfinite(h_neg) and w_min <= h_neg < 0:
        win_n = _neg_window(max(h_neg - half, w_min), h_neg + half)
    else:
        win_n = _neg_window(min(w_min, -1e-30), 0.0)
    if math.isfinite(h_pos) and 0 < h_pos <= w_max:
        win_p = _pos_window(h_pos - half, min(h_pos + half, w_max))
    else:
        win_p = _pos_window(0.0, max(w_max, 1e-30))

    n_bins = 2 * fine + 5
    counts: tuple[int, int, int] | None = None
    ranks = (0, 0)
    found: dict[int, float] = {}
    for _ in range(_MAX_ROUNDS):
        key = _hist_key(w, win_n, win_p, lanes, a, b)
        if key is None:
            if counts is None:
                return _select_direct(w, p)
            break
        hist = torch.bincount(key, minlength=n_bins * _LANES)
        cum = hist.view(_LANES, n_bins).sum(0).cumsum_(0)
        if counts is None:
            n_negative, n_nonpos = cum[[fine + 1, fine + 2]].tolist()
            counts = (n_negative, n_nonpos - n_negative, n - n_nonpos)
            ranks = clip_ranks(p, *counts)[2:]
            found = {side: 0.0 for side, r in zip((-1, 1), ranks, strict=True) if r == 0}
        todo = [(side, r) for side, r in zip((-1, 1), ranks, strict=True) if side not in found]
        if not todo:
            break
        bins = torch.searchsorted(cum, torch.tensor([r for _, r in todo], device=cum.device)).tolist()
        cums = cum[[i for k in bins for i in (k, max(k - 1, 0))]].tolist()
        for i, ((side, r), k) in enumerate(zip(todo, bins, strict=True)):
            below = cums[2 * i + 1] if k > 0 else 0
            m, j = cums[2 * i] - below, r - below
            if m == 1:  # the bin holds just the threshold: a 0/1 mask dotted with w reads it exactly
                found[side] = float(torch.dot(torch.eq(a, float(k), out=b), w))
            elif m <= _EXTRACT_MAX:
                found[side] = float(torch.kthvalue(w[a == k], j).values)
            elif side < 0:
                win_n = _bin_window(-1, k, win_n, w_min, w_max)
            else:
                win_p = _bin_window(1, k - (fine + 3), win_p, w_min, w_max)
        if len(found) == 2:
            break
    assert counts is not None
    for side, r in zip((-1, 1), ranks, strict=True):
        if side not in found:  # pathological value distribution: plain exact selection
            found[side] = float(torch.kthvalue(w, r).values)
    return (*counts, *ranks, found[-1], found[1])


# --------------------------------------------------------------------------- compiled CPU path

# Window elements kept by one scan; a window holding more is a miss.
_WINDOW_CAP = 4096
# Starting half-width of a hinted window of the compiled path, in average gaps
# between sorted weights. Every element inside is copied, but a miss costs a
# whole extra scan; the kernel then adapts it per layer (``_GAPS_*`` in the kernels): wider
# where thresholds move far between steps (large layers, high learning rates), narrower where
# they barely move.
_FUSED_HINT_GAPS = 64.0


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
        is selected with ``kthvalue`` and given to a second call.
        """
        return self.run_arrays(w.numpy(), out.numpy(), w)

    def run_arrays(self, w_np: np.ndarray, out_np: np.ndarray, w: torch.Tensor) -> float:
        """``run`` on numpy views of ``w`` (flat float32, any shape for the ``kthvalue`` fallback) and ``out``."""
        f, params, result = _fused, self.params, self.result
        threads = f.team_threads(self.n)
        if threads != params[f.P_THREADS]:
            self._use_threads(threads)
        self.kernel(w_np, out_np, self.codes, self.mask, self.buf, self.table, params, result)
        if result[f.R_STATUS] == f.MISSED:
            sides = ((f.R_FOUND_NEG, f.R_RANK_NEG, f.R_C_NEG, f.P_GIVEN_NEG),
                     (f.R_FOUND_POS, f.R_RANK_POS, f.R_C_POS, f.P_GIVEN_POS))
            flat = w.detach().reshape(-1)
            for found, rank, value, given in sides:
                exact = result[value] if result[found] else torch.kthvalue(flat, int(result[rank])).values
                params[given] = float(exact)
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


# --------------------------------------------------------------------------- operator


def _codes(
    w: torch.Tensor, base: torch.Tensor, w_min: float, c_neg: float, c_pos: float, n_neg_int: int, n_levels: int,
    width_neg: float | None, width_pos: float | None, acc: torch.Tensor, tmp: torch.Tensor, mask: torch.Tensor,
) -> torch.Tensor:
    """Interval index per weight (int32, a view of ``mask``): negatives 0.., positives n_neg_int.., clipped ``base``.

    Same float32 arithmetic as the definition, ``clamp(floor((w - start) / width))``
    per side (values on an inner boundary go up, extremes to the last interval),
    chosen per weight with ``lerp`` by a 0/1 mask instead of ``where`` (slow on
    CPU); with weights exactly 0 or 1, lerp returns one of its inputs exactly.
    The negative side is floored by the final truncation (its values are >= 0).
    ``base`` is ``n_levels + lane``: the clipped weights, usually most of them,
    are spread over ``_LANES`` codes whose level is zero, so that ``bincount``
    runs fast.
    """
    if width_neg is not None:
        torch.sub(w, w_min, out=tmp).div_(width_neg).clamp_(0, n_neg_int - 1)
        torch.lerp(base, tmp, torch.lt(w, c_neg, out=mask), out=acc)
    else:
        acc.copy_(base)
    if width_pos is not None:
        n_pos_int = n_levels - n_neg_int
        torch.sub(w, c_pos, out=tmp).div_(width_pos).floor_().clamp_(0, n_pos_int - 1).add_(n_neg_int)
        torch.lerp(acc, tmp, torch.gt(w, c_pos, out=mask), out=acc)
    idx = mask.view(torch.int32)
    return idx.copy_(acc)  # truncation toward zero; elementwise in place


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
    if w.dtype == torch.float32:
        a, b, c, lanes = _scratch(n, w.device, 4)
    else:
        a, b, c, lanes, w32 = _scratch(n, w.device, 5)
        w = w32.copy_(w)
    w_min, w_max = (float(v) for v in torch.aminmax(w))
    if not (math.isfinite(w_min) and math.isfinite(w_max)):
        return _not_finite(weight, n_levels, w_min, w_max)
    _lanes(w, lanes)
    if n <= _DIRECT_SELECT_MAX:
        selected = _select_direct(w, p)
    else:
        selected = _select_hist(w, p, hint[:2] if hint is not None else None, w_min, w_max, lanes, a, b)
    n_negative, n_zero, n_positive, rank_neg, rank_pos, c_neg, c_pos = selected
    k_neg, k_pos, _, _ = clip_ranks(p, n_negative, n_zero, n_positive)
    has_neg, has_pos, n_neg_int, width_neg, width_pos = partition(
        n_levels, n_negative, n_positive, k_neg, k_pos, rank_neg, rank_pos, w_min, w_max, c_neg, c_pos
    )
    if not (has_neg or has_pos):
        levels = torch.full((n_levels,), float("nan"), device=w.device)
        stats = ClipQStats(c_neg, c_pos, 0, levels, rank_neg, rank_pos, w_min, w_max)
        return torch.zeros_like(weight), stats

    # Interval index per weight: uniform bins need no search. Clipped weights
    # go to extra codes (n_levels and up) whose level is zero. Values on an
    # inner boundary belong to the upper interval; the extreme value belongs
    # to the last interval of its side.
    idx = _codes(
        w, lanes.add_(n_levels), w_min, c_neg, c_pos, n_neg_int, n_levels,
        width_neg if has_neg else None,
        width_pos if has_pos else None,
        a, b, c,
    )
    # Exact sums: every weight as an integer multiple of 2**-F (``_rules.fixed_point_bits``), added up
    # in int64, so the levels do not depend on the order of the additions (threads, devices); the
    # level from sum and count in float64 as ``_rules.level`` does (NaN, 0/0, for unused codes).
    n_codes = n_levels + _LANES
    bits_f = fixed_point_bits(n, w_min, w_max)
    fixed = w.to(torch.float64).mul_(math.ldexp(1.0, bits_f)).to(torch.int64)  # truncated toward zero
    sums = torch.zeros(n_codes, dtype=torch.int64, device=w.device).index_add_(0, idx, fixed)
    counts = torch.bincount(idx, minlength=n_codes)
    table = sums.to(torch.float64).div_(counts.to(torch.float64)).mul_(math.ldexp(1.0, -bits_f)).to(torch.float32)
    table[n_levels:] = 0.0  # clipped
    out = table.index_select(0, idx).reshape(weight.shape).to(out_dtype)
    return out, ClipQStats(c_neg, c_pos, n_neg_int, table[:n_levels], rank_neg, rank_pos, w_min, w_max)


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
