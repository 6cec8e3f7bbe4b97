"""The CLIP-Q operator: per-sign clipping, uniform partitioning, interval means.

Pure tensor math (see ``docs/method.md``); nothing here knows about models,
Optuna or Ray. All work is vectorised and runs on any device and for float32,
float16 and bfloat16 weights (statistics are computed in float32 and the result
is cast back to the weight's dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ConfigError

__all__ = [
    "BITS_RANGE",
    "ClipQStats",
    "clipq_quantize",
    "clipq_quantize_with_stats",
    "validate_p_bits",
]

BITS_RANGE = (2, 8)


def validate_p_bits(p: float, bits: int, *, where: str = "") -> None:
    """Raise ``ConfigError`` (a ``ValueError``) for p outside [0, 1) or bits outside [2, 8]."""
    at = f" for {where}" if where else ""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 <= p < 1.0:
        raise ConfigError(f"p={p!r}{at} is invalid: p is the clipped fraction per sign, a number in [0, 1)")
    if isinstance(bits, bool) or not isinstance(bits, int) or not BITS_RANGE[0] <= bits <= BITS_RANGE[1]:
        raise ConfigError(
            f"bits={bits!r}{at} is invalid: bits must be an integer in [{BITS_RANGE[0]}, {BITS_RANGE[1]}]"
        )


@dataclass(frozen=True)
class ClipQStats:
    """Thresholds and levels chosen for one tensor.

    ``levels`` has ``2**bits - 1`` entries (negative intervals first, ascending);
    an empty interval's level is NaN. ``rank_neg`` / ``rank_pos`` are the
    1-based ranks of the thresholds in the ascending flattened tensor (0 when
    that sign clips nothing); they let the next call find the thresholds fast.
    """

    c_neg: float
    c_pos: float
    n_neg_intervals: int
    levels: torch.Tensor
    rank_neg: int
    rank_pos: int


def _clip_count(p: float, n: int) -> int:
    # Project convention: round(p * count); Python's round (half to even).
    return min(n, round(p * n))


def _kth_smallest(flat: torch.Tensor, rank: int, hint: float | None, value_range: float) -> float:
    """Exact ``rank``-th smallest value (1-based) of ``flat``.

    With a ``hint`` (the threshold of the previous training step) the value is
    found in a narrow window around it with two comparison passes and a tiny
    ``kthvalue``; weights move little per step, so the window almost always
    holds the answer. Otherwise (or if it does not) a full ``kthvalue`` runs.
    """
    n = flat.numel()
    if hint is not None and math.isfinite(hint):
        # Window half-width: a small multiple of the typical gap between
        # neighbouring values near the threshold, widened on a miss.
        half = max(value_range * 64.0 / max(n, 1), 1e-12)
        for _ in range(3):
            lo, hi = hint - half, hint + half
            below = int((flat < lo).sum())
            if below < rank:
                window = flat[(flat >= lo) & (flat <= hi)]
                if below + window.numel() >= rank:
                    return float(torch.kthvalue(window, rank - below).values)
            half *= 16.0
    return float(torch.kthvalue(flat, rank).values)


def clipq_quantize_with_stats(
    weight: torch.Tensor,
    p: float,
    bits: int,
    *,
    hint: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, ClipQStats]:
    """Prune-quantize ``weight`` (any shape) and return it with the chosen statistics.

    ``hint`` is ``(c_neg, c_pos)`` from a previous call on slowly changing
    weights; it only speeds up the threshold search, the result is exact.
    """
    validate_p_bits(p, bits)
    out_dtype = weight.dtype
    w = weight.detach().reshape(-1)
    if w.dtype != torch.float32:
        w = w.float()
    n_levels = 2**bits - 1
    n = w.numel()

    if n == 0:
        levels = torch.full((n_levels,), float("nan"), device=w.device)
        return torch.zeros_like(weight), ClipQStats(0.0, 0.0, 0, levels, 0, 0)
    w_min, w_max = (float(v) for v in torch.aminmax(w))
    n_negative = int((w < 0).sum())
    n_positive = int((w > 0).sum())
    n_zero = n - n_negative - n_positive
    k_neg = _clip_count(p, n_negative)
    k_pos = _clip_count(p, n_positive)

    # Ranks in the ascending tensor: negatives, then zeros, then positives.
    rank_neg = n_negative - k_neg + 1 if k_neg > 0 else 0
    rank_pos = n_negative + n_zero + k_pos if k_pos > 0 else 0
    value_range = w_max - w_min
    c_neg = _kth_smallest(w, rank_neg, hint[0] if hint else None, value_range) if rank_neg else 0.0
    c_pos = _kth_smallest(w, rank_pos, hint[1] if hint else None, value_range) if rank_pos else 0.0

    keep_neg = w < c_neg
    keep_pos = w > c_pos
    has_neg = n_negative > k_neg and bool(keep_neg.any())
    has_pos = n_positive > k_pos and bool(keep_pos.any())

    if not (has_neg or has_pos):
        levels = torch.full((n_levels,), float("nan"), device=w.device)
        stats = ClipQStats(c_neg, c_pos, 0, levels, rank_neg, rank_pos)
        return torch.zeros_like(weight), stats

    span_neg = (c_neg - w_min) if has_neg else 0.0
    span_pos = (w_max - c_pos) if has_pos else 0.0
    if has_neg and has_pos:
        n_neg_int = round(n_levels * span_neg / (span_neg + span_pos))
        n_neg_int = min(max(n_neg_int, 1), n_levels - 1)
    else:
        n_neg_int = n_levels if has_neg else 0
    n_pos_int = n_levels - n_neg_int

    # Interval index per weight: uniform bins need no search. Clipped weights
    # go to an extra bin (index n_levels) whose level is forced to zero.
    # Values on an inner boundary belong to the upper interval; the extreme
    # value belongs to the last interval of its side.
    idx = torch.full((n,), n_levels, dtype=torch.long, device=w.device)
    if has_neg:
        width = span_neg / n_neg_int
        b = ((w - w_min) / width).floor_().clamp_(0, n_neg_int - 1).long()
        idx = torch.where(keep_neg, b, idx)
    if has_pos:
        width = span_pos / n_pos_int
        b = ((w - c_pos) / width).floor_().clamp_(0, n_pos_int - 1).long() + n_neg_int
        idx = torch.where(keep_pos, b, idx)

    sums = torch.zeros(n_levels + 1, dtype=torch.float32, device=w.device).index_add_(0, idx, w)
    counts = torch.bincount(idx, minlength=n_levels + 1).to(torch.float32)
    table = sums / counts  # NaN for empty intervals (0/0): those codes are unused
    table[n_levels] = 0.0
    out = table[idx].reshape(weight.shape).to(out_dtype)
    stats = ClipQStats(c_neg, c_pos, n_neg_int, table[:n_levels].clone(), rank_neg, rank_pos)
    return out, stats


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
