"""Compiled CPU kernels for the CLIP-Q operator (numba).

The tensor implementation in ``ops.py`` needs some 35 elementwise passes, three
``bincount``s and a gather per call; on a CPU that is several times the cost of
a small layer's training step. ``clipq_cpu`` does the whole operator in one
call (``docs/method.md``, "Speed"):

1. ``window_scan``: one vectorised pass over the weights' int32 order keys:
   per-sign counts, extremes, and the elements inside a narrow window around
   each previous threshold. Thresholds move little between steps, so the
   exact order statistic is almost always among them (a miss widens the
   window for another scan, or the caller selects it exactly);
2. the partition (how many intervals per side, their widths): the rules of
   ``_rules.py``, compiled, the same code the tensor implementation runs;
3. ``quantize_into``: interval code per weight with the same float32
   arithmetic as the definition, per-interval float32 sums and counts in
   element order (so levels are bit-identical to ``torch.index_add_``; only
   over the kept weights when most are clipped, ``kept_sums``), and every
   weight replaced by its interval's level.

numba compiles them on first use and caches the machine code next to this file
(or under ``NUMBA_CACHE_DIR``); without numba, or with
``CLIPQ_SEARCH_KERNEL=torch``, the tensor implementation runs instead.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from types import SimpleNamespace

import numpy as np

from . import _rules

__all__ = ["AVAILABLE", "CLIPPED", "enabled", "kernels"]

# numba is a dependency, but the operator keeps working without it. It is
# imported on first use, not with the package: the command line stays quick.
AVAILABLE = importlib.util.find_spec("numba") is not None
# Codes of clipped weights (see ``quantize_into``): 128.. when the levels
# (at most 127 below 8 bits) leave room, else 255 with spare sum slots.
CLIPPED = 255
_SPREAD_BASE = 128
_SPREAD = 16
_SLOTS = 256 + _SPREAD

# ``clipq_cpu``'s parameters and results (float64 arrays: one argument each,
# since numba's dispatch costs about a microsecond per argument).
P_P, P_LEVELS, P_HINT_NEG, P_HINT_POS, P_MIN, P_MAX, P_GAPS, P_ROUNDS, P_GIVEN_NEG, P_GIVEN_POS = range(10)
(R_STATUS, R_NEG, R_ZERO, R_POS, R_RANK_NEG, R_RANK_POS, R_C_NEG, R_C_POS, R_MIN, R_MAX, R_N_NEG_INT,
 R_FOUND_NEG, R_FOUND_POS, R_SCANS) = range(14)
RESULT_SIZE = 16
DONE, MISSED, NOT_FINITE, NOTHING_KEPT = range(4)
_F32_TINY = float(np.finfo(np.float32).smallest_subnormal)
# compiled, set by ``kernels()``
_window_scan = _quantize_into = _kept_sums = _trailing_zeros = _key32 = _unkey32 = _clip_ranks = _partition = None


def enabled() -> bool:
    """Whether the compiled kernels are used for CPU tensors.

    True when numba is installed, ``CLIPQ_SEARCH_KERNEL`` is not ``torch``, and
    the kernels compiled (checked once, on tiny inputs). A numba that cannot
    import or compile here gives one warning and the tensor implementation.
    """
    if not AVAILABLE or os.environ.get("CLIPQ_SEARCH_KERNEL", "numba").lower() == "torch":
        return False
    return _ready()


@functools.cache
def kernels() -> SimpleNamespace:
    """The compiled kernels: ``clipq_cpu`` (what the operator calls) and the pieces it is made of.

    Compiled once per process from numba's on-disk cache (compiled and cached
    on first use).
    """
    from numba import njit

    def compiled(cache: bool) -> SimpleNamespace:
        jit = njit(cache=cache, nogil=True, boundscheck=False, error_model="numpy")
        # ``clipq_cpu`` calls the others through these module globals.
        global _window_scan, _quantize_into, _kept_sums, _trailing_zeros, _key32, _unkey32, _clip_ranks, _partition
        from numba.cpython.unsafe.numbers import trailing_zeros as _trailing_zeros

        _key32, _unkey32 = jit(f32_key), jit(f32_unkey)
        _kept_sums = jit(kept_sums)
        _clip_ranks, _partition = jit(_rules.clip_ranks), jit(_rules.partition)
        _window_scan, _quantize_into = jit(window_scan), jit(quantize_into)
        return SimpleNamespace(window_scan=_window_scan, quantize_into=_quantize_into, kept_sums=_kept_sums,
                               clipq_cpu=jit(clipq_cpu), f32_key=_key32, f32_unkey=_unkey32)

    try:
        return compiled(cache=True)
    except RuntimeError:  # no writable place for numba's cache: compile in every process
        return compiled(cache=False)


@functools.cache
def _ready() -> bool:
    w = np.array([-2.0, -1.0, 0.0, 1.0, 2.0], np.float32)
    try:
        k = kernels()
        params = np.array([0.5, 3, -1.0, 1.0, -2.0, 2.0, 64.0, 4, np.nan, np.nan])
        k.clipq_cpu(w, np.empty(5, np.float32), np.empty(5, np.uint8), np.empty(5, np.uint8), np.empty(8, np.float32),
                    np.empty(256, np.float32), params, np.empty(RESULT_SIZE))
    except Exception as exc:  # noqa: BLE001 - any failure: the tensor implementation still works
        warnings.warn(
            f"clipq_search: the compiled CLIP-Q kernels are unavailable ({type(exc).__name__}: {exc}); "
            "using the slower tensor implementation",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def window_scan(
    w: np.ndarray, klo_n: np.int32, khi_n: np.int32, klo_p: np.int32, khi_p: np.int32,
    buf: np.ndarray, mask: np.ndarray,
) -> tuple[int, int, int, int, int, int, int, int]:  # pragma: no cover - compiled
    """Counts, extremes and window elements of float32 ``w`` in one vectorised pass.

    Works on order keys (``key``: the float32 bits as int32, negatives
    reflected), so every comparison and the minimum and maximum are int32
    operations. The windows are [klo_n, khi_n] and [klo_p, khi_p] in keys
    (empty when lo > hi). Returns the counts of negatives, of non-positives,
    of keys below ``klo_n`` and below ``klo_p``, the smallest and largest key,
    how many elements lie inside either window and how many of those are
    negative. The window elements are copied to ``buf`` and sorted when they
    fit (``m <= len(buf)``). ``mask`` is uint8 scratch of ``w``'s length.
    """
    b = w.view(np.int32)
    n = b.shape[0]
    cap = buf.shape[0]
    i32 = np.int32
    zero, one, minus_one = i32(0), i32(1), i32(-1)
    sign, reflect = i32(31), i32(0x7FFFFFFF)
    kmin, kmax = i32(0x7FFFFFFF), i32(-0x80000000)
    neg = nonpos = below_n = below_p = zero
    # int32 everywhere (numba widens int arithmetic to int64, which halves the
    # vector width), so that LLVM vectorises the loop.
    for i in range(n):
        k = b[i]
        k = i32(k ^ i32(i32(k >> sign) & reflect))
        kmin = k if k < kmin else kmin
        kmax = k if k > kmax else kmax
        neg = i32(neg + (one if k < minus_one else zero))  # key(-0.0) is -1
        nonpos = i32(nonpos + (one if k <= zero else zero))
        below_n = i32(below_n + (one if k < klo_n else zero))
        below_p = i32(below_p + (one if k < klo_p else zero))
        mask[i] = np.uint8(((k >= klo_n) & (k <= khi_n)) | ((k >= klo_p) & (k <= khi_p)))
    # The windows hold a few dozen elements: find them eight mask bytes at a time.
    whole = n - n % 8
    words = mask[:whole].view(np.uint64)
    m = 0
    for q in range(words.shape[0]):
        if words[q]:
            for i in range(8 * q, 8 * q + 8):
                if mask[i]:
                    if m < cap:
                        buf[m] = w[i]
                    m += 1
    for i in range(whole, n):
        if mask[i]:
            if m < cap:
                buf[m] = w[i]
            m += 1
    m_neg = 0
    if m <= cap:
        buf[:m].sort()
        while m_neg < m and buf[m_neg] < np.float32(0.0):
            m_neg += 1
    return neg, nonpos, below_n, below_p, kmin, kmax, m, m_neg


def quantize_into(
    w: np.ndarray, codes: np.ndarray, out: np.ndarray, table: np.ndarray, w_min: np.float32,
    c_neg: np.float32, c_pos: np.float32, width_neg: np.float32, width_pos: np.float32,
    n_neg_int: int, n_levels: int, has_neg: bool, has_pos: bool, sparse: bool,
) -> None:  # pragma: no cover - compiled
    """Interval codes, interval means into ``table`` and the quantized weights into ``out``.

    Codes (uint8 scratch): negatives below ``c_neg`` get ``clamp((w - w_min) /
    width_neg, 0, n_neg_int - 1)`` truncated, positives above ``c_pos`` get
    ``n_neg_int + clamp((w - c_pos) / width_pos, 0, n_pos_int - 1)`` truncated,
    float32 throughout as in the definition (one division per weight, the
    side picked by a select). Each level is the float32 sum of its interval,
    added in element order (as ``index_add_`` does), over the count; NaN for
    an empty interval. ``table`` has 256 float32 entries, zero from
    ``n_levels`` on.

    A clipped weight gets a code whose level is zero: one of ``_SPREAD``
    codes from 128 on (picked by its low mantissa bits) when the levels leave
    room, else ``CLIPPED``; its sum then goes to one of ``_SPREAD`` spare
    slots. Most weights are usually clipped, and additions into one slot in
    a row would wait on each other. With ``sparse`` (worth it when at most
    about half the weights are kept) and room for the spread codes, only the
    kept weights are added up (``_kept_sums``): a clipped weight's level is
    zero whatever its slot's sum.
    """
    n = w.shape[0]
    b = w.view(np.int32)
    f32, i32 = np.float32, np.int32
    zero = f32(0.0)
    top_n = f32(max(n_neg_int - 1, 0))
    top_p = f32(max(n_levels - n_neg_int - 1, 0))
    base_p = i32(n_neg_int)
    roomy = n_levels < _SPREAD_BASE
    clipped = i32(_SPREAD_BASE) if roomy else i32(CLIPPED)
    spread = i32(_SPREAD - 1) if roomy else i32(0)
    lim_n = c_neg if has_neg else f32(-np.inf)
    lim_p = c_pos if has_pos else f32(np.inf)
    for i in range(n):  # vectorised
        x = w[i]
        pos = x > zero
        start = c_pos if pos else w_min
        width = width_pos if pos else width_neg
        top = top_p if pos else top_n
        base = base_p if pos else i32(0)
        # clamp, then truncate: the floor of the clamped value, as the definition has it
        code = i32(i32(min(max(f32(f32(x - start) / width), zero), top)) + base)
        kept = (x < lim_n) | (x > lim_p)
        codes[i] = np.uint8(code if kept else i32(clipped + i32(b[i] & spread)))
    sums = np.zeros(_SLOTS, np.float32)
    counts = np.zeros(_SLOTS, np.int64)
    if roomy and sparse:
        _kept_sums(w, codes, sums, counts)
    elif roomy:
        for i in range(n):  # serial: each sum in element order
            j = codes[i]
            sums[j] += w[i]
            counts[j] += 1
    else:
        for i in range(n):
            c = i32(codes[i])
            j = c + (i32(1) + i32(b[i] & i32(_SPREAD - 1)) if c == CLIPPED else i32(0))
            sums[j] += w[i]
            counts[j] += 1
    for j in range(256):
        table[j] = sums[j] / f32(counts[j]) if j < n_levels else zero
    for i in range(n):
        out[i] = table[codes[i]]


def kept_sums(w: np.ndarray, codes: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> None:  # pragma: no cover
    """Add every kept weight (code below 128) into its code's sum and count, in element order.

    Eight codes are read at a time as one uint64; their high bits (set for
    the clipped codes, 128 and up) become, inverted and gathered by one
    multiplication, a 64-bit mask of the kept weights among 64 consecutive
    ones, and only those are visited, lowest index first. Summing only the
    kept weights is what makes this faster than ``quantize_into``'s dense
    loop when most weights are clipped.
    """
    n = w.shape[0]
    whole = n - n % 64
    words = codes[:whole].view(np.uint64)
    u64 = np.uint64
    high, gather, one = u64(0x8080808080808080), u64(0x0102040810204080), u64(1)
    for chunk in range(whole // 64):
        kept = u64(0)
        for q in range(8):  # byte q's inverted high bit -> bit q of the top byte
            flags = (~words[8 * chunk + q] & high) >> u64(7)
            kept |= ((flags * gather) >> u64(56)) << u64(8 * q)
        base = 64 * chunk
        while kept:
            i = base + _trailing_zeros(kept)
            j = codes[i]
            sums[j] += w[i]
            counts[j] += 1
            kept &= kept - one
    for i in range(whole, n):
        j = codes[i]
        if j < _SPREAD_BASE:
            sums[j] += w[i]
            counts[j] += 1


def f32_key(x: float, scratch: np.ndarray) -> np.int32:  # pragma: no cover - compiled
    """Order key of ``x`` rounded to float32: an int32 that sorts as the floats do (-0.0 just below +0.0).

    ``scratch`` is a float32 array of at least one element.
    """
    scratch[0] = np.float32(x)
    k = scratch.view(np.int32)[0]
    return np.int32(k ^ 0x7FFFFFFF) if k < 0 else k


def f32_unkey(k: np.int32, scratch: np.ndarray) -> float:  # pragma: no cover - compiled
    """The float32 value (as a float) whose order key is ``k``."""
    ints = scratch.view(np.int32)
    ints[0] = np.int32(k ^ 0x7FFFFFFF) if k < 0 else k
    return float(scratch[0])


def clipq_cpu(
    w: np.ndarray, out: np.ndarray, codes: np.ndarray, mask: np.ndarray, buf: np.ndarray, table: np.ndarray,
    params: np.ndarray, result: np.ndarray,
) -> None:  # pragma: no cover - compiled
    """The whole operator on float32 ``w`` in one call: thresholds, partition, codes, levels, ``out``.

    ``params`` (``P_*``): p, the number of levels, the hinted thresholds and
    extremes (NaN: none), the window half-width in average gaps, the most
    scans, and thresholds already known (NaN: search). The thresholds are
    searched in windows around the hinted ones (``window_scan``); a miss
    widens the window toward the rank by the element density just seen.
    ``result`` (``R_*``) gets the status (``DONE``; ``MISSED``: a threshold
    was not found within the scans, the caller selects it and calls again
    with it given; ``NOT_FINITE``: a NaN or infinity; ``NOTHING_KEPT``: every
    weight clipped), the counts per sign, ranks, thresholds, extremes, the
    number of negative intervals and of scans; once the thresholds are known
    they and the extremes become ``params``' hint for the next call. ``table`` (256 float32) gets
    the levels, ``out`` the quantized weights when done. ``codes`` and
    ``mask`` are uint8 scratch of ``w``'s length, ``buf`` float32 scratch
    for window elements.
    """
    n = w.shape[0]
    scratch = np.empty(1, np.float32)
    p, n_levels = params[P_P], int(params[P_LEVELS])
    h_neg, h_pos = params[P_HINT_NEG], params[P_HINT_POS]
    span = params[P_MAX] - params[P_MIN]
    half = (span if span > 0.0 else 1e-30) * params[P_GAPS] / n
    tiny = _F32_TINY
    inf = np.inf
    none_lo, none_hi = np.int32(0x7FFFFFFF), np.int32(-0x80000000)  # lo > hi: an empty window
    # windows: float32-rounded bounds, each on its own side of zero
    use_n, use_p = -inf < h_neg < 0.0, 0.0 < h_pos < inf  # False for NaN
    use_n, use_p = use_n and half < inf, use_p and half < inf
    lo_n, hi_n = max(h_neg - half, -inf), min(h_neg + half, -tiny)
    lo_p, hi_p = max(h_pos - half, tiny), min(h_pos + half, inf)
    found_n, found_p = False, False
    c_neg = c_pos = 0.0
    k_neg = k_pos = rank_neg = rank_pos = 0
    negatives = zeros = positives = 0
    w_min = w_max = 0.0
    scans = 0
    for scan in range(int(params[P_ROUNDS])):
        want_n, want_p = use_n and not found_n, use_p and not found_p
        kn0 = _key32(lo_n, scratch) if want_n else none_lo
        kn1 = _key32(hi_n, scratch) if want_n else none_hi
        kp0 = _key32(lo_p, scratch) if want_p else none_lo
        kp1 = _key32(hi_p, scratch) if want_p else none_hi
        neg, nonpos, below_n, below_p, kmin, kmax, m, m_neg = _window_scan(w, kn0, kn1, kp0, kp1, buf, mask)
        scans += 1
        if scan == 0:
            w_min, w_max = _unkey32(kmin, scratch), _unkey32(kmax, scratch)
            if not (np.isfinite(w_min) and np.isfinite(w_max)):
                result[R_STATUS] = NOT_FINITE
                return
            negatives, zeros, positives = neg, nonpos - neg, n - nonpos
            k_neg, k_pos, rank_neg, rank_pos = _clip_ranks(p, negatives, zeros, positives)
            found_n, found_p = rank_neg == 0, rank_pos == 0
            if not found_n and not np.isnan(params[P_GIVEN_NEG]):
                c_neg, found_n = params[P_GIVEN_NEG], True
            if not found_p and not np.isnan(params[P_GIVEN_POS]):
                c_pos, found_p = params[P_GIVEN_POS], True
        if m > buf.shape[0]:
            break
        if want_n and not found_n:
            if below_n < rank_neg <= below_n + m_neg:
                c_neg, found_n = float(buf[rank_neg - below_n - 1]), True
            else:  # miss: widen toward the rank by twice the expected distance
                gap = (hi_n - lo_n) / max(m_neg, 1)
                if rank_neg <= below_n:
                    lo_n -= 2.0 * (below_n - rank_neg + 1) * gap + (hi_n - lo_n)
                else:
                    hi_n = min(hi_n + 2.0 * (rank_neg - below_n - m_neg) * gap + (hi_n - lo_n), -tiny)
        if want_p and not found_p:
            k = m - m_neg
            if below_p < rank_pos <= below_p + k:
                c_pos, found_p = float(buf[m_neg + rank_pos - below_p - 1]), True
            else:
                gap = (hi_p - lo_p) / max(k, 1)
                if rank_pos <= below_p:
                    lo_p = max(lo_p - 2.0 * (below_p - rank_pos + 1) * gap - (hi_p - lo_p), tiny)
                else:
                    hi_p += 2.0 * (rank_pos - below_p - k) * gap + (hi_p - lo_p)
        # a window grown beyond the finite range is no use: the caller selects exactly
        use_n = use_n and -inf < lo_n and hi_n < inf
        use_p = use_p and -inf < lo_p and hi_p < inf
        if (found_n or not use_n) and (found_p or not use_p):
            break
    result[R_NEG], result[R_ZERO], result[R_POS] = negatives, zeros, positives
    result[R_RANK_NEG], result[R_RANK_POS] = rank_neg, rank_pos
    result[R_C_NEG], result[R_C_POS] = c_neg, c_pos
    result[R_MIN], result[R_MAX] = w_min, w_max
    result[R_FOUND_NEG], result[R_FOUND_POS], result[R_SCANS] = found_n, found_p, scans
    if not (found_n and found_p):
        result[R_STATUS] = MISSED
        return
    has_neg, has_pos, n_neg_int, width_neg, width_pos = _partition(
        n_levels, negatives, positives, k_neg, k_pos, rank_neg, rank_pos, w_min, w_max, c_neg, c_pos
    )
    # what the next call on the slightly changed tensor starts from
    params[P_HINT_NEG], params[P_HINT_POS], params[P_MIN], params[P_MAX] = c_neg, c_pos, w_min, w_max
    if not (has_neg or has_pos):
        result[R_STATUS] = NOTHING_KEPT
        return
    f32 = np.float32
    kept = (negatives - k_neg) + (positives - k_pos)  # at most: ties at a threshold are clipped too
    _quantize_into(w, codes, out, table, f32(w_min), f32(c_neg), f32(c_pos), f32(width_neg), f32(width_pos),
                   n_neg_int, n_levels, has_neg, has_pos, 2 * kept <= n)
    result[R_N_NEG_INT] = n_neg_int
    result[R_STATUS] = DONE
