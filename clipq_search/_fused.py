"""Compiled CPU kernels for the CLIP-Q operator (numba), three passes over the weights.

The tensor implementation in ``ops.py`` needs some 35 elementwise passes, three
``bincount``s and a gather per call; on a CPU that is several times the cost of
a small layer's training step. These kernels do the same work in three passes
(``docs/method.md``, "Speed"):

1. ``window_scan``: per-sign counts and the elements inside a narrow window
   around each previous threshold. Thresholds move little between steps, so
   the exact order statistic is almost always among them (a miss falls back
   to an exact selection);
2. ``quantize_into``: interval code per weight with the same float32
   arithmetic as the definition, per-interval float32 sums and counts in
   element order (so levels are bit-identical to ``torch.index_add_``);
3. (same call) every weight replaced by its interval's level.

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

__all__ = ["AVAILABLE", "CLIPPED", "enabled", "kernels"]

# numba is a dependency, but the operator keeps working without it. It is
# imported on first use, not with the package: the command line stays quick.
AVAILABLE = importlib.util.find_spec("numba") is not None
# Code of a clipped weight; its sums go to one of 16 dummy slots after the
# real ones, chosen by position, so that runs of clipped weights (most of a
# tensor at high p) do not wait on each other's additions.
CLIPPED = 255
_DUMMY_MASK = 15
_SLOTS = 256 + _DUMMY_MASK + 1


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
    """The compiled ``window_scan`` and ``quantize_into`` (compiled once, cached on disk by numba)."""
    from numba import njit

    def compiled(cache: bool) -> SimpleNamespace:
        jit = njit(cache=cache, nogil=True, boundscheck=False, error_model="numpy")
        return SimpleNamespace(window_scan=jit(window_scan), quantize_into=jit(quantize_into))

    try:
        return compiled(cache=True)
    except RuntimeError:  # no writable place for numba's cache: compile in every process
        return compiled(cache=False)


@functools.cache
def _ready() -> bool:
    f32 = np.float32
    w = np.array([-2.0, -1.0, 0.0, 1.0, 2.0], np.float32)
    try:
        k = kernels()
        k.window_scan(w, f32(-1.5), f32(-0.5), f32(0.5), f32(1.5), np.empty(8, np.float32), np.empty(5, np.bool_))
        k.quantize_into(w, np.empty(5, np.uint8), np.empty(5, np.float32), np.empty(256, np.float32), f32(-2.0),
                        f32(-1.0), f32(1.0), f32(1.0), f32(1.0), 1, 3, True, True)
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
    w: np.ndarray, lo_n: np.float32, hi_n: np.float32, lo_p: np.float32, hi_p: np.float32,
    buf: np.ndarray, mask: np.ndarray,
) -> tuple[int, int, int, int, int, int]:  # pragma: no cover - compiled
    """Counts (negatives, non-positives, below lo_n, below lo_p) and the window elements.

    ``w`` is float32; the windows are [lo_n, hi_n] (hi_n < 0) and [lo_p, hi_p]
    (lo_p > 0), float32 bounds, an empty window when lo > hi. The elements
    inside either window are copied to ``buf`` and sorted when they fit; the
    last two values returned are how many there were (more than ``buf`` holds:
    not copied) and how many of them are negative. ``mask`` is bool scratch
    of ``w``'s length.
    """
    n = w.shape[0]
    cap = buf.shape[0]
    zero = np.float32(0.0)
    neg = 0
    nonpos = 0
    below_n = 0
    below_p = 0
    for i in range(n):  # branch-free: vectorised
        x = w[i]
        neg += x < zero
        nonpos += x <= zero
        below_n += x < lo_n
        below_p += x < lo_p
        mask[i] = ((x >= lo_n) & (x <= hi_n)) | ((x >= lo_p) & (x <= hi_p))
    # The window holds a few dozen elements: find them eight mask bytes at a time.
    whole = n - n % 8
    words = mask[:whole].view(np.uint64)
    m = 0
    for k in range(words.shape[0]):
        if words[k]:
            for i in range(8 * k, 8 * k + 8):
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
        while m_neg < m and buf[m_neg] < zero:
            m_neg += 1
    return neg, nonpos, below_n, below_p, m, m_neg


def quantize_into(
    w: np.ndarray, codes: np.ndarray, out: np.ndarray, table: np.ndarray, w_min: np.float32,
    c_neg: np.float32, c_pos: np.float32, width_neg: np.float32, width_pos: np.float32,
    n_neg_int: int, n_levels: int, has_neg: bool, has_pos: bool,
) -> None:  # pragma: no cover - compiled
    """Interval codes, interval means into ``table`` and the quantized weights into ``out``.

    Codes (uint8 scratch, ``CLIPPED`` when clipped): negatives below ``c_neg``
    get ``clamp((w - w_min) / width_neg, 0, n_neg_int - 1)`` truncated,
    positives above ``c_pos`` get ``n_neg_int + clamp(floor((w - c_pos) /
    width_pos), 0, n_pos_int - 1)``, float32 throughout as in the definition.
    Each level is the float32 sum of its interval, added in element order (as
    ``index_add_`` does), over the count; NaN for an empty interval.
    ``table`` has 256 float32 entries; ``table[CLIPPED]`` is 0.
    """
    n = w.shape[0]
    zero = np.float32(0.0)
    top_n = np.float32(max(n_neg_int - 1, 0))
    top_p = np.float32(max(n_levels - n_neg_int - 1, 0))
    base = np.float32(n_neg_int)
    clipped = np.float32(CLIPPED)
    sums = np.zeros(_SLOTS, np.float32)
    counts = np.zeros(_SLOTS, np.int64)
    for i in range(n):  # branch-free: vectorised
        x = w[i]
        tn = min(max((x - w_min) / width_neg, zero), top_n)
        tp = min(max(np.floor((x - c_pos) / width_pos), zero), top_p) + base
        r = tn if (has_neg & (x < c_neg)) else clipped
        r = tp if (has_pos & (x > c_pos)) else r
        codes[i] = np.uint8(r)
    for i in range(n):  # serial: each sum in element order
        c = np.int64(codes[i])
        j = c if c != CLIPPED else 256 + (i & _DUMMY_MASK)
        sums[j] += w[i]
        counts[j] += 1
    for j in range(256):
        table[j] = sums[j] / np.float32(counts[j]) if j < n_levels else zero
    for i in range(n):
        out[i] = table[codes[i]]
