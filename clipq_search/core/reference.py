"""The reference implementation of the CLIP-Q operator: the definition, step by step, in plain torch.

Slow on purpose (``kthvalue``, ``where``, a histogram per call): it is what
the fast implementations in :mod:`clipq_search.core.operator` (tensor
implementation, CUDA) and :mod:`clipq_search.core._numba_kernels` (compiled
CPU kernels) are tested against, bit for bit: the same thresholds, codes and
exact (fixed-point) interval sums.
"""

from __future__ import annotations

import math

import torch

__all__ = ["reference_clipq"]


def reference_clipq(weight: torch.Tensor, p: float, bits: int) -> tuple[torch.Tensor, tuple]:
    """CLIP-Q of ``weight`` with (p, bits), written as the definition reads (``docs/method.md``).

    Returns ``(out, (c_neg, c_pos, n_neg_intervals, rank_neg, rank_pos, levels))``:
    ``out`` has ``weight``'s shape and dtype; ``levels`` holds the ``2**bits - 1``
    interval means (NaN for an empty interval).

    1. Clipping: per sign, ``round(p * count)`` of the smallest magnitudes
       become 0; the thresholds c- and c+ are order statistics of the tensor.
    2. Partitioning: [w_min, c-] and [c+, w_max] share the ``2**bits - 1``
       intervals in proportion to their spans (at least one each), equal
       widths within a side, never narrower than the smallest float32 subnormal.
    3. Quantizing: every kept weight becomes the mean of its interval; the
       sums are exact, each weight added as the integer ``trunc(w * 2**F)``.
    """
    w = weight.detach().reshape(-1).float()
    n_levels = 2**bits - 1
    n = w.numel()
    if n == 0:
        return torch.zeros_like(weight), (0.0, 0.0, 0, 0, 0, torch.full((n_levels,), float("nan")))
    w_min, w_max = (float(v) for v in torch.aminmax(w))
    n_negative = int((w < 0).sum())
    n_positive = int((w > 0).sum())
    n_zero = n - n_negative - n_positive
    k_neg = min(n_negative, round(p * n_negative))
    k_pos = min(n_positive, round(p * n_positive))
    rank_neg = n_negative - k_neg + 1 if k_neg > 0 else 0
    rank_pos = n_negative + n_zero + k_pos if k_pos > 0 else 0
    c_neg = float(torch.kthvalue(w, rank_neg).values) if rank_neg else 0.0
    c_pos = float(torch.kthvalue(w, rank_pos).values) if rank_pos else 0.0
    keep_neg = w < c_neg
    keep_pos = w > c_pos
    has_neg = n_negative > k_neg and bool(keep_neg.any())
    has_pos = n_positive > k_pos and bool(keep_pos.any())
    if not (has_neg or has_pos):
        nan = torch.full((n_levels,), float("nan"))
        return torch.zeros_like(weight), (c_neg, c_pos, 0, rank_neg, rank_pos, nan)
    span_neg = (c_neg - w_min) if has_neg else 0.0
    span_pos = (w_max - c_pos) if has_pos else 0.0
    if has_neg and has_pos:
        n_neg_int = min(max(round(n_levels * span_neg / (span_neg + span_pos)), 1), n_levels - 1)
    else:
        n_neg_int = n_levels if has_neg else 0
    n_pos_int = n_levels - n_neg_int
    idx = torch.full((n,), n_levels, dtype=torch.long)
    tiny = float(torch.finfo(torch.float32).smallest_normal * 2.0**-23)  # widths never round to 0 in float32
    if has_neg:
        b = ((w - w_min) / max(span_neg / n_neg_int, tiny)).floor_().clamp_(0, n_neg_int - 1).long()
        idx = torch.where(keep_neg, b, idx)
    if has_pos:
        b = ((w - c_pos) / max(span_pos / n_pos_int, tiny)).floor_().clamp_(0, n_pos_int - 1).long() + n_neg_int
        idx = torch.where(keep_pos, b, idx)
    # exact sums: each weight as a multiple of 2**-F, truncated toward zero, F as large as 63-bit sums of n allow
    f = 62 - math.frexp(float(n))[1] - math.frexp(max(-w_min, w_max))[1]
    sums = torch.zeros(n_levels + 1, dtype=torch.int64).index_add_(0, idx, (w.double() * 2.0**f).long())
    counts = torch.bincount(idx, minlength=n_levels + 1)
    table = (sums.double() / counts.double() * 2.0**-f).float()
    table[n_levels] = 0.0
    out = table[idx].reshape(weight.shape).to(weight.dtype)
    return out, (c_neg, c_pos, n_neg_int, rank_neg, rank_pos, table[:n_levels].clone())
