"""The operator's counting and partition rules, in one place for both implementations.

Plain Python on numbers: ``ops.py`` (the tensor implementation) calls these
functions as they are, and ``_fused.py`` has numba compile the same source
into its kernel, so the two cannot drift apart. The float64 arithmetic is the
same either way.
"""

from __future__ import annotations

import math

F32_TINY = 1.401298464324817e-45  # the smallest positive float32 (a subnormal), exact in float64


def clip_ranks(p: float, n_negative: int, n_zero: int, n_positive: int) -> tuple[int, int, int, int]:
    """How many weights each sign clips, and the 1-based ranks of c- and c+ in the ascending tensor.

    Returns ``(k_neg, k_pos, rank_neg, rank_pos)``; a rank is 0 when that sign
    clips nothing. Project convention: ``round(p * count)``, Python's round
    (half to even).
    """
    k_neg = min(n_negative, round(p * n_negative))
    k_pos = min(n_positive, round(p * n_positive))
    rank_neg = n_negative - k_neg + 1 if k_neg > 0 else 0
    rank_pos = n_negative + n_zero + k_pos if k_pos > 0 else 0
    return k_neg, k_pos, rank_neg, rank_pos


def partition(
    n_levels: int, n_negative: int, n_positive: int, k_neg: int, k_pos: int, rank_neg: int, rank_pos: int,
    w_min: float, w_max: float, c_neg: float, c_pos: float,
) -> tuple[bool, bool, int, float, float]:
    """Which sides keep weights, how many of the ``n_levels`` intervals the negative side gets, the widths.

    Returns ``(has_neg, has_pos, n_neg_int, width_neg, width_pos)``; the width
    of a side that keeps nothing is 1.0 (unused), a width is never below the
    smallest float32 subnormal. A side keeps something iff
    some weight lies strictly beyond its threshold; with ties at the
    threshold that can be none even when fewer than all are clipped. The
    intervals are shared in proportion to the sides' spans, at least one
    for each non-empty side.
    """
    has_neg = n_negative > k_neg and (rank_neg == 0 or w_min < c_neg)
    has_pos = n_positive > k_pos and (rank_pos == 0 or w_max > c_pos)
    span_neg = (c_neg - w_min) if has_neg else 0.0
    span_pos = (w_max - c_pos) if has_pos else 0.0
    if has_neg and has_pos:
        n_neg_int = min(max(round(n_levels * span_neg / (span_neg + span_pos)), 1), n_levels - 1)
    else:
        n_neg_int = n_levels if has_neg else 0
    # At least the smallest float32 subnormal: weights so small that a width would round to zero in
    # float32 would otherwise divide by zero.
    width_neg = max(span_neg / n_neg_int, F32_TINY) if has_neg else 1.0
    width_pos = max(span_pos / (n_levels - n_neg_int), F32_TINY) if has_pos else 1.0
    return has_neg, has_pos, n_neg_int, width_neg, width_pos


def fixed_point_bits(n: int, w_min: float, w_max: float) -> int:
    """F: a tensor of ``n`` weights within [w_min, w_max] is added up as the integers ``trunc(w * 2**F)``.

    The largest F for which no sum of up to ``n`` of them can leave 63 bits:
    each is below ``2**(62 - L)`` in magnitude, where ``n < 2**L``. Integer
    sums are exact, so an interval's sum does not depend on the order of
    the additions (threads, devices); weights from ``2**(E + L - 39)`` on,
    where ``max|w| < 2**E``, are exact on this grid, smaller ones lose their
    bits below ``2**(E + L - 62)``.
    """
    _, e = math.frexp(max(-w_min, w_max))  # max|w| < 2**e
    _, length = math.frexp(float(n))  # n < 2**length
    return 62 - length - e


def level(total: int, count: int, bits: int) -> float:
    """An interval's level from its fixed-point sum ``total`` (``fixed_point_bits`` F = ``bits``) and count.

    float64 arithmetic, in this order, then float32 by the caller: the same
    operations in both implementations (an empty interval: NaN).
    """
    if count == 0:
        return math.nan
    return float(total) / float(count) * math.ldexp(1.0, -bits)
