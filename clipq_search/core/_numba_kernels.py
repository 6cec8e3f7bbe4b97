"""Compiled CPU kernels for the CLIP-Q operator (numba).

The tensor implementation in ``ops.py`` needs some 35 elementwise passes, two
``bincount``s, an ``index_add_`` and a gather per call; on a CPU that is several times the cost of
a small layer's training step. ``clipq_cpu`` does the whole operator in one
call (``docs/method.md``, "Speed"):

1. ``window_scan``: one vectorised pass over the weights' int32 order keys:
   per-sign counts, extremes, and the elements inside a narrow window around
   each previous threshold. Thresholds move little between steps, so the
   exact order statistic is almost always among them (a miss widens the
   window for another scan, or the caller selects it exactly);
2. the partition (how many intervals per side, their widths): the rules of
   ``_rules.py``, compiled, the same code the tensor implementation runs;
3. ``codes_into``: interval code per weight with the same float32
   arithmetic as the definition; ``slice_sums``: per-interval sums of the
   weights as fixed-point integers (``_rules.fixed_point_bits``: exact, so
   the order of the additions does not matter) and counts, only over the
   kept weights when most are clipped (``kept_into``); ``means_into``: the
   levels (``_rules.level``); ``levels_into``: every weight replaced by its
   interval's level (``levels_into_wide``: 16 at a time on AVX-512F).

For tensors of ``TEAM_MIN`` elements or more the scan, the codes with their
slice's sums, and the levels run in slices on torch's own OpenMP threads
(``team``, ``team_body``: ``GOMP_parallel`` of torch's libgomp, called by
address); the slices' exact sums add up to the same levels on any number of
threads.

numba compiles them on first use and caches the machine code next to this file
(or under ``NUMBA_CACHE_DIR``); without numba, or with
``CLIPQ_SEARCH_KERNEL=torch``, the tensor implementation runs instead.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
import warnings
from types import SimpleNamespace

import numpy as np

from clipq_search.core import _rules

__all__ = ["AVAILABLE", "CLIPPED", "enabled", "kernels"]

# numba is a dependency, but the operator keeps working without it. It is
# imported on first use, not with the package: the command line stays quick.
AVAILABLE = importlib.util.find_spec("numba") is not None
# Codes of clipped weights (see ``codes_into``): 128.. when the levels
# (at most 127 below 8 bits) leave room, else 255 with spare sum slots.
CLIPPED = 255
_SPREAD_BASE = 128
_SPREAD = 16
_SLOTS = 256 + _SPREAD

# ``clipq_cpu``'s parameters and results (float64 arrays: one argument each,
# since numba's dispatch costs about a microsecond per argument). The team
# entries: threads to use (1: this thread alone) and the addresses of
# ``GOMP_parallel``, ``team_body``, ``omp_get_thread_num`` and
# ``omp_get_num_threads`` (see ``team``).
(P_P, P_LEVELS, P_HINT_NEG, P_HINT_POS, P_MIN, P_MAX, P_GAPS, P_ROUNDS, P_GIVEN_NEG, P_GIVEN_POS,
 P_THREADS, P_FORK, P_BODY, P_THREAD_NUM, P_TEAM_SIZE) = range(15)
(R_STATUS, R_NEG, R_ZERO, R_POS, R_RANK_NEG, R_RANK_POS, R_C_NEG, R_C_POS, R_MIN, R_MAX, R_N_NEG_INT,
 R_FOUND_NEG, R_FOUND_POS, R_SCANS) = range(14)
DONE, MISSED, NOT_FINITE, NOTHING_KEPT = range(4)
# A team's job (float64, addresses included: exact below 2**53): what every
# thread reads, then ``_RESULT_SLOTS`` per thread for what it found.
(J_PHASE, J_N, J_THREADS, J_THREAD_NUM, J_W, J_OUT, J_CODES, J_MASK, J_BUF, J_TABLE, J_KEYS) = range(11)
J_CAP, J_TEAM_SIZE = 14, 24  # J_CAP after the four keys
(J_W_MIN, J_C_NEG, J_C_POS, J_WIDTH_NEG, J_WIDTH_POS, J_N_NEG_INT, J_LEVELS, J_HAS_NEG, J_HAS_POS) = range(15, 24)
J_SPARSE = 25  # codes phase: add up only the kept weights (``slice_sums``)
J_SUMS, J_SCALE = 26, 27  # ... into slice s's int64 sums and counts at J_SUMS + 16 * _SLOTS * s, times J_SCALE
J_RESULTS = 28
_RESULT_SLOTS = 8  # a slice's scan results (slots 0-6; 7 is spare, keeping a slice's block 8 wide)
TEAM_MAX = 64
# ``result`` also holds the job of a team of up to TEAM_MAX threads, after the R_* entries: no
# allocation per call (each costs a layer a microsecond or more inside a training step).
_RESULT_HEAD = 16
RESULT_SIZE = _RESULT_HEAD + J_RESULTS + _RESULT_SLOTS * TEAM_MAX
PHASE_SCAN, PHASE_CODES, PHASE_LEVELS = range(3)
# The hinted windows' half-width (``P_GAPS``, in average gaps between sorted weights) adapts per layer:
# doubled after a miss, times _GAPS_SHRINK after a hit, so that it settles where about one call in 70
# misses (an extra scan), between _GAPS_MIN and _GAPS_MAX.
_GAPS_MIN, _GAPS_MAX, _GAPS_SHRINK = 16.0, 65536.0, 0.99
# Threads split work in slices of whole 64-element blocks (cache lines of
# every array, and the mask's uint64 words).
_BLOCK = 64


def make_params(
    p: float, n_levels: int, hint: tuple[float, float, float, float] = (np.nan,) * 4, *, gaps: float = 64.0,
    rounds: int = 4, threads: int = 1, team: tuple[float, float, float, float] = (0.0,) * 4,
) -> np.ndarray:
    """``clipq_cpu``'s parameter array (``P_*``): no thresholds given; the team's addresses from ``team()``."""
    return np.array([p, n_levels, *hint, gaps, rounds, np.nan, np.nan, threads, *team])


# compiled, set by ``kernels()``
_window_scan = _scan_into = _codes_into = _slice_sums = _levels_into = _trailing_zeros = None
_kept_into = _means_into = _slice_bounds = _select = None
_key32 = _unkey32 = _clip_ranks = _partition = _fixed_point_bits = _level = _team_run = None
_fork = _call_i32 = _f32_at = _u8_at = _i64_at = _lookup16 = _carray = None


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
    from numba import cfunc, njit, types

    def compiled(cache: bool) -> SimpleNamespace:
        jit = njit(cache=cache, nogil=True, boundscheck=False, error_model="numpy")
        # ``clipq_cpu`` calls the others through these module globals.
        global _window_scan, _scan_into, _codes_into, _slice_sums, _levels_into, _trailing_zeros
        global _kept_into, _means_into, _slice_bounds, _select, _thresholds_into, _levels_from
        global _key32, _unkey32, _clip_ranks, _partition, _fixed_point_bits, _level, _team_run
        global _fork, _call_i32, _f32_at, _u8_at, _i64_at, _lookup16
        global _carray
        from numba import carray as _carray
        from numba.cpython.unsafe.numbers import trailing_zeros as _trailing_zeros

        _fork, _call_i32, _f32_at, _u8_at, _i64_at, _lookup16 = _intrinsics()
        _key32, _unkey32 = jit(f32_key), jit(f32_unkey)
        _kept_into, _means_into, _slice_bounds = jit(kept_into), jit(means_into), jit(slice_bounds)
        _select = jit(select)
        _clip_ranks, _partition = jit(_rules.clip_ranks), jit(_rules.partition)
        _fixed_point_bits, _level = jit(_rules.fixed_point_bits), jit(_rules.level)
        _scan_into, _codes_into, _levels_into = jit(scan_into), jit(codes_into), _levels_kernel(jit)
        _slice_sums, _team_run = jit(slice_sums), jit(team_run)
        _window_scan = jit(window_scan)
        _thresholds_into, _levels_from = jit(thresholds_into), jit(levels_from)
        body = cfunc(types.void(types.voidptr), cache=cache, nogil=True, boundscheck=False,
                     error_model="numpy")(team_body)
        return SimpleNamespace(window_scan=_window_scan, scan_into=_scan_into, kept_into=_kept_into, select=_select,
                               clipq_cpu=jit(clipq_cpu), team_body=body, f32_key=_key32, f32_unkey=_unkey32)

    cache = rules_cached()
    try:
        return compiled(cache=cache)
    except RuntimeError:  # no writable place for numba's cache: compile in every process
        return compiled(cache=False)


# The SHA-256 (first 16 hex digits) of ``_rules.py``. numba keys its on-disk cache of ``clipq_cpu`` on
# this file alone, although the kernel compiles the rules in: a changed ``_rules.py`` must come with
# a new digest here, which changes this file and so invalidates the cache (the tests check the digest).
RULES_DIGEST = "718ed53d4c02d9a5"


def rules_digest() -> str | None:
    """The digest of the ``_rules.py`` next to this file, or None where it cannot be read."""
    import hashlib

    try:
        with open(_rules.__file__, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()[:16]
    except (OSError, TypeError):
        return None


def rules_cached() -> bool:
    """Whether numba's cache may serve the kernels: ``_rules.py`` is the one ``RULES_DIGEST`` names.

    Otherwise the kernels compile afresh in every process, with one warning: a
    cached kernel could hold the previous rules.
    """
    digest = rules_digest()
    if digest == RULES_DIGEST:
        return True
    warnings.warn(
        f"clipq_search/core/_rules.py (digest {digest}) differs from the one the cached CLIP-Q kernels were "
        f"built from ({RULES_DIGEST}): compiling without numba's cache; set RULES_DIGEST in _numba_kernels.py",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


def _intrinsics() -> tuple:
    """numba intrinsics for calling into the OpenMP runtime by address, and arrays at raw addresses.

    Addresses travel as numbers (float64 parameters), not as ctypes objects,
    so that the kernels stay cacheable across processes.
    """
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    body_type = ir.FunctionType(ir.VoidType(), [i8p]).as_pointer()

    @intrinsic
    def fork(typingctx, fn, body, data, threads):  # noqa: ARG001
        """``GOMP_parallel(body, data, threads, 0)`` at address ``fn``: ``body(data)`` on each thread, joined."""
        sig = types.void(types.int64, types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):  # noqa: ARG001
            fn_, body_, data_, threads_ = args
            fn_type = ir.FunctionType(ir.VoidType(), [body_type, i8p, i32, i32]).as_pointer()
            builder.call(builder.inttoptr(fn_, fn_type), [
                builder.inttoptr(body_, body_type), builder.inttoptr(data_, i8p),
                builder.trunc(threads_, i32), ir.Constant(i32, 0),
            ])
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def call_i32(typingctx, fn):  # noqa: ARG001
        """The int of the argument-less C function at address ``fn`` (``omp_get_thread_num``)."""
        def codegen(context, builder, signature, args):  # noqa: ARG001
            return builder.call(builder.inttoptr(args[0], ir.FunctionType(i32, []).as_pointer()), [])

        return types.int32(types.int64), codegen

    def pointer_at(element):
        @intrinsic
        def at(typingctx, address):  # noqa: ARG001
            pointer = types.CPointer(element)

            def codegen(context, builder, signature, args):  # noqa: ARG001
                return builder.inttoptr(args[0], context.get_value_type(pointer))

            return pointer(types.int64), codegen

        return at

    @intrinsic
    def lookup16(typingctx, table, codes, out, start):  # noqa: ARG001
        """``out[start:start + 16] = table[min(codes[start:start + 16], 15)]``: one ``vpermps`` (AVX-512F)."""
        sig = types.void(table, codes, out, types.int64)

        def codegen(context, builder, signature, args):
            table_, codes_, out_, start_ = (context.make_array(t)(context, builder, a) if i < 3 else a
                                            for i, (t, a) in enumerate(zip(signature.args, args, strict=True)))
            f32, i32 = ir.FloatType(), ir.IntType(32)
            floats, ints, bytes_ = ir.VectorType(f32, 16), ir.VectorType(i32, 16), ir.VectorType(ir.IntType(8), 16)
            levels = builder.load(builder.bitcast(table_.data, floats.as_pointer()), align=4)
            index = builder.zext(builder.load(builder.bitcast(builder.gep(codes_.data, [start_]),
                                                              bytes_.as_pointer()), align=1), ints)
            top = ir.Constant(ints, [ir.Constant(i32, 15)] * 16)
            index = builder.select(builder.icmp_unsigned(">", index, top), top, index)
            permute = builder.module.declare_intrinsic("llvm.x86.avx512.permvar.sf.512",
                                                       fnty=ir.FunctionType(floats, [floats, ints]))
            builder.store(builder.call(permute, [levels, index]),
                          builder.bitcast(builder.gep(out_.data, [start_]), floats.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return (fork, call_i32, pointer_at(types.float32), pointer_at(types.uint8), pointer_at(types.int64),
            lookup16)


def _avx512() -> bool:
    """Whether numba compiles for this machine's CPU and it has AVX-512F (``levels_into_wide``).

    Not when numba is told another CPU or features (``NUMBA_CPU_NAME``,
    ``NUMBA_CPU_FEATURES``, e.g. for a cache shared between machines): an
    instruction the target lacks would stop the process in code generation.
    """
    import platform

    from numba.core import config

    if platform.machine().lower() not in ("x86_64", "amd64") or config.CPU_NAME or config.CPU_FEATURES:
        return False
    try:
        import llvmlite.binding as llvm

        return "+avx512f" in llvm.get_host_cpu_features().flatten().split(",")
    except Exception:  # noqa: BLE001 - unknown: the scalar loop
        return False


def _levels_kernel(jit):
    """``levels_into_wide`` compiled where AVX-512F is available and it agrees with ``levels_into``, else that."""
    plain = jit(levels_into)
    if not _avx512():  # (a choice by the CPU alone: numba's cache keeps one build per CPU and its features)
        return plain
    wide = jit(levels_into_wide)
    rng = np.random.default_rng(0)
    codes = np.where(rng.random(83) < 0.5, rng.integers(0, 15, 83), rng.integers(128, 144, 83)).astype(np.uint8)
    table = np.zeros(256, np.float32)
    table[:15] = rng.standard_normal(15)
    got, want = np.empty(83, np.float32), np.empty(83, np.float32)
    try:
        wide(codes, table, got, 15)
    except Exception:  # noqa: BLE001 - any failure: the scalar loop
        return plain
    plain(codes, table, want, 15)
    return wide if np.array_equal(got, want) else plain


@functools.cache
def _ready() -> bool:
    w = np.array([-2.0, -1.0, 0.0, 1.0, 2.0], np.float32)
    try:
        k = kernels()
        params = make_params(0.5, 3, (-1.0, 1.0, -2.0, 2.0))
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


def scan_into(
    w: np.ndarray, klo_n: np.int32, khi_n: np.int32, klo_p: np.int32, khi_p: np.int32,
    buf: np.ndarray, mask: np.ndarray,
) -> tuple[int, int, int, int, int, int, int]:  # pragma: no cover - compiled
    """Counts, extremes and window elements of float32 ``w`` in one vectorised pass.

    Works on order keys (``key``: the float32 bits as int32, negatives
    reflected), so every comparison and the minimum and maximum are int32
    operations. The windows are [klo_n, khi_n] and [klo_p, khi_p] in keys
    (empty when lo > hi). Returns the counts of negatives, of non-positives,
    of keys below ``klo_n`` and below ``klo_p``, the smallest and largest key
    (``0x7FFFFFFF`` and ``-0x80000000`` for no element) and how many elements
    lie inside either window; those are copied to ``buf`` (unsorted) as far
    as it holds them. ``mask`` is uint8 scratch of ``w``'s length.
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
    return neg, nonpos, below_n, below_p, kmin, kmax, m


# Tensors from this many elements on are split over the team; below it one
# thread is quicker than the three fork-joins (a few microseconds each).
TEAM_MIN = 16384
_team_enabled = True
_get_num_threads = None


def _no_team_after_fork() -> None:
    # A forked child has no OpenMP threads of its parent's team.
    global _team_enabled
    _team_enabled = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_no_team_after_fork)


def team_threads(n: int) -> int:
    """How many threads the compiled operator uses for a tensor of ``n`` elements: torch's intra-op
    threads (``torch.get_num_threads()``, at most ``TEAM_MAX``) when the team is available and
    ``n >= TEAM_MIN``, else 1."""
    global _get_num_threads
    if n < TEAM_MIN or not _team_enabled or team() is None:
        return 1
    if _get_num_threads is None:  # torch's, looked up once: this runs every training step
        import torch

        _get_num_threads = torch.get_num_threads
    return max(1, min(_get_num_threads(), TEAM_MAX))


@functools.cache
def team() -> tuple[float, float, float, float] | None:
    """Addresses of ``GOMP_parallel``, ``team_body``, ``omp_get_thread_num`` and ``omp_get_num_threads``, or None.

    The big passes of the operator (scan, codes, levels) run on torch's own
    OpenMP threads: ``GOMP_parallel`` of the libgomp that torch's intra-op
    parallelism uses, found among the libraries this process has loaded,
    with ``team_body`` (a compiled C callback) as the work. torch's threads
    are already running (and spinning between torch's own parallel
    regions), so handing them work costs a few microseconds, and no second
    pool of threads competes with them for the cores. None (one thread)
    when: not Linux, torch not on OpenMP, no such libgomp found, the
    kernels unavailable, ``CLIPQ_SEARCH_KERNEL_THREADS=1``, or the team's
    result on a test tensor differing from one thread's (with a warning).
    """
    if os.environ.get("CLIPQ_SEARCH_KERNEL_THREADS", "") == "1" or not sys.platform.startswith("linux"):
        return None
    import torch

    if "parallel backend: OpenMP" not in torch.__config__.parallel_info() or not enabled():
        return None
    path = _torch_libgomp(os.path.dirname(torch.__file__))
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
        addresses = (float(ctypes.cast(lib.GOMP_parallel, ctypes.c_void_p).value),
                     float(kernels().team_body.address),
                     float(ctypes.cast(lib.omp_get_thread_num, ctypes.c_void_p).value),
                     float(ctypes.cast(lib.omp_get_num_threads, ctypes.c_void_p).value))
        ok = _team_agrees(addresses)
    except Exception as exc:  # noqa: BLE001 - any failure: one thread still works
        ok, addresses = False, None
        reason = f"{type(exc).__name__}: {exc}"
    else:
        reason = "its result differed from one thread's"
    if not ok:
        warnings.warn(f"clipq_search: the compiled CLIP-Q operator runs on one thread ({reason})",
                      RuntimeWarning, stacklevel=2)
        return None
    return addresses


def _torch_libgomp(torch_dir: str) -> str | None:
    """Path of the libgomp loaded in this process that torch uses (``libgomp_for``), from /proc/self/maps."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split(None, 5)[5].strip() for line in maps if "libgomp" in line and line.count(" ") >= 5}
    except OSError:
        return None
    return libgomp_for(paths, torch_dir)


def libgomp_for(paths: set[str], torch_dir: str) -> str | None:
    """Which of the loaded ``paths`` is torch's libgomp: the one torch ships (inside its package
    folder ``torch_dir``, or ``torch_dir + ".libs"`` as repaired wheels have it), else the only
    libgomp loaded (torch then links the system's); None when there is none or the choice is
    ambiguous."""
    gomp = {p for p in paths if os.path.basename(p).startswith("libgomp")}
    roots = tuple(d.rstrip(os.sep) + os.sep for d in (torch_dir, torch_dir.rstrip(os.sep) + ".libs"))
    own = [p for p in gomp if p.startswith(roots)]
    if len(own) == 1:
        return own[0]
    return next(iter(gomp)) if len(gomp) == 1 and not own else None


def _team_agrees(addresses: tuple[float, float, float, float]) -> bool:
    """Whether two threads of the team give exactly one thread's result on a test tensor."""
    rng = np.random.default_rng(0)
    n = 3 * _BLOCK * 40 + 17
    w = (rng.standard_normal(n) * 0.05).astype(np.float32)
    ordered = np.sort(w)
    negatives, positives = int(np.count_nonzero(w < 0)), int(np.count_nonzero(w > 0))
    _, _, rank_neg, rank_pos = _rules.clip_ranks(0.7, negatives, n - negatives - positives, positives)
    # hinted near the exact thresholds, as in training
    hint = (ordered[rank_neg - 1 + 5], ordered[rank_pos - 1 - 5], ordered[0], ordered[-1])
    runs = []
    for threads in (1, 2):
        params = make_params(0.7, 15, hint, threads=threads, team=addresses)
        result, out, table = np.zeros(RESULT_SIZE), np.empty(n, np.float32), np.empty(256, np.float32)
        kernels().clipq_cpu(w, out, np.empty(n, np.uint8), np.empty(n, np.uint8), np.empty(4096 * threads, np.float32),
                            table, params, result)
        runs.append((out, table, result))
    (o1, t1, r1), (o2, t2, r2) = runs
    return r1[R_STATUS] == DONE and np.array_equal(o1.view(np.int32), o2.view(np.int32)) and np.array_equal(
        t1.view(np.int32), t2.view(np.int32)) and np.array_equal(r1[:_RESULT_HEAD], r2[:_RESULT_HEAD])


def window_scan(
    w: np.ndarray, klo_n: np.int32, khi_n: np.int32, klo_p: np.int32, khi_p: np.int32,
    buf: np.ndarray, mask: np.ndarray, job: np.ndarray, params: np.ndarray,
) -> tuple[int, int, int, int, int, int, int, int]:  # pragma: no cover - compiled
    """``scan_into`` over all of ``w``, on the team when ``job`` says so; the negative window elements first.

    Returns ``scan_into``'s results and how many of the window elements are
    negative (``buf`` holds those first, then the positive ones, each group
    in no particular order: ``select`` finds a rank among them); the element
    count exceeds ``len(buf)`` when they did not fit. On a team of T
    threads each scans its own slice and collects into its own ``len(buf)
    // T`` of ``buf``; the counts add up, the extremes combine, and the
    elements are moved together.
    """
    threads = int(job[J_THREADS])
    cap = buf.shape[0]
    if threads <= 1:
        neg, nonpos, below_n, below_p, kmin, kmax, m = _scan_into(w, klo_n, khi_n, klo_p, khi_p, buf, mask)
    else:
        job[J_KEYS], job[J_KEYS + 1], job[J_KEYS + 2], job[J_KEYS + 3] = klo_n, khi_n, klo_p, khi_p
        _team_run(params, job, PHASE_SCAN)
        share = cap // threads
        neg = nonpos = below_n = below_p = m = 0
        kmin, kmax = np.int32(0x7FFFFFFF), np.int32(-0x80000000)
        for t in range(threads):
            r = J_RESULTS + _RESULT_SLOTS * t
            neg += int(job[r])
            nonpos += int(job[r + 1])
            below_n += int(job[r + 2])
            below_p += int(job[r + 3])
            kmin = min(kmin, np.int32(job[r + 4]))
            kmax = max(kmax, np.int32(job[r + 5]))
            mt = int(job[r + 6])
            if m <= cap and mt <= share:
                for j in range(mt):  # to the left, never over what is still to move
                    buf[m + j] = buf[share * t + j]
                m += mt
            else:
                m = cap + 1
    m_neg = 0
    if m <= cap:  # negatives to the front (the windows hold no zero)
        for j in range(m):
            if buf[j] < np.float32(0.0):
                buf[j], buf[m_neg] = buf[m_neg], buf[j]
                m_neg += 1
    return neg, nonpos, below_n, below_p, kmin, kmax, m, m_neg


def select(a: np.ndarray, lo: int, hi: int, k: int) -> float:  # pragma: no cover - compiled
    """The value sorting ``a[lo:hi]`` would put at index ``k`` (lo <= k < hi), by quickselect; reorders ``a[lo:hi]``.

    The window holds a few hundred elements: selecting one is linear, sorting
    them all would cost a large share of a small layer's operator.
    """
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2  # median of three as the pivot
        x, y, z = a[lo], a[mid], a[hi - 1]
        pivot = max(min(x, y), min(max(x, y), z))
        i, j = lo, hi - 1
        while i <= j:  # Hoare partition: a[lo:i] <= pivot <= a[j + 1:hi]
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j + 1
        elif k >= i:
            lo = i
        else:  # j < k < i: a[k] equals the pivot
            return float(a[k])
    return float(a[lo])


def codes_into(
    w: np.ndarray, codes: np.ndarray, w_min: np.float32, c_neg: np.float32, c_pos: np.float32,
    width_neg: np.float32, width_pos: np.float32, n_neg_int: int, n_levels: int, has_neg: bool, has_pos: bool,
) -> None:  # pragma: no cover - compiled
    """Interval code of every weight into ``codes`` (uint8), one vectorised pass.

    Negatives below ``c_neg`` get ``clamp((w - w_min) / width_neg, 0,
    n_neg_int - 1)`` truncated, positives above ``c_pos`` get ``n_neg_int +
    clamp((w - c_pos) / width_pos, 0, n_pos_int - 1)`` truncated, the
    quotient in float32 as in the definition (one division per weight, the
    side picked by a select).

    A clipped weight gets a code whose level is zero: one of ``_SPREAD``
    codes from 128 on (picked by its low mantissa bits) when the levels leave
    room, else ``CLIPPED`` (see ``interval_means``).
    """
    n = w.shape[0]
    b = w.view(np.int32)
    f32, i32 = np.float32, np.int32
    zero = f32(0.0)
    base_p = i32(n_neg_int)
    # int32 arithmetic on int32 values: selected per weight as int32 (from int64, the selection
    # would be made on 64-bit lanes and narrowed after)
    top_n = i32(max(i32(base_p - i32(1)), i32(0)))
    top_p = i32(max(i32(i32(n_levels) - base_p - i32(1)), i32(0)))
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
        # A kept weight lies at or beyond its side's start (x >= w_min, x > c_pos), so its quotient is
        # >= 0 and truncating it, then taking the top interval at most, is the definition's clamp then
        # floor. Clamping in int32 after the conversion (a clipped weight's code, out of int32's range
        # or not, is replaced below) makes this loop a third quicker than clamping in float32.
        code = i32(min(i32(f32(f32(x - start) / width)), top) + base)
        kept = (x < lim_n) | (x > lim_p)
        codes[i] = np.uint8(code if kept else i32(clipped + i32(b[i] & spread)))


def slice_sums(
    w: np.ndarray, codes: np.ndarray, sums: np.ndarray, counts: np.ndarray, scale: float, n_levels: int,
    sparse: bool,
) -> None:  # pragma: no cover - compiled
    """Add the weights of ``w`` into the int64 ``sums`` (``_SLOTS``) by their ``codes``, as ``trunc(w * scale)``.

    ``scale`` is ``2**F`` (``_rules.fixed_point_bits``): integer sums are
    exact, so each thread adds up its own slice and the slices' sums add up
    to the same totals in any order. With ``sparse`` (worth it when at most
    about half the weights are kept) and room for the spread codes, only the
    kept weights are visited (``kept_into``). Otherwise every weight is
    added, a clipped one into one of ``_SPREAD`` spare slots (its spread
    code, or by its low mantissa bits after ``CLIPPED``) that no level reads:
    additions into one slot in a row would wait on each other.
    """
    n = w.shape[0]
    b = w.view(np.int32)
    i32, i64, f64 = np.int32, np.int64, np.float64
    if n_levels < _SPREAD_BASE and sparse:
        _kept_into(w, codes, sums, counts, scale)
    elif n_levels < _SPREAD_BASE:
        for i in range(n):
            j = codes[i]
            sums[j] += i64(f64(w[i]) * scale)
            counts[j] += 1
    else:
        for i in range(n):
            c = i32(codes[i])
            j = c + (i32(1) + i32(b[i] & i32(_SPREAD - 1)) if c == CLIPPED else i32(0))
            sums[j] += i64(f64(w[i]) * scale)
            counts[j] += 1


def means_into(
    sums: np.ndarray, counts: np.ndarray, table: np.ndarray, n_levels: int, bits: int
) -> None:  # pragma: no cover - compiled
    """``table`` (256 float32): the ``n_levels`` levels from the fixed-point sums (``_rules.level``:
    NaN for an empty interval), zero after (the clipped codes)."""
    f32 = np.float32
    for j in range(256):
        table[j] = f32(_level(sums[j], counts[j], bits)) if j < n_levels else f32(0.0)


def levels_into(codes: np.ndarray, table: np.ndarray, out: np.ndarray, n_levels: int) -> None:  # pragma: no cover
    """Every weight replaced by its interval's level: ``out[i] = table[codes[i]]``."""
    for i in range(codes.shape[0]):
        out[i] = table[codes[i]]


def levels_into_wide(
    codes: np.ndarray, table: np.ndarray, out: np.ndarray, n_levels: int
) -> None:  # pragma: no cover - compiled
    """``levels_into`` 16 weights at a time by one AVX-512 permute of the table's first 16 entries.

    For at most 15 levels (4 bits and fewer): a kept weight's code is its
    level's index, a clipped one's (128 and up) becomes 15, whose entry is
    zero (``means_into``). Twice as fast as the scalar loop, which numba does
    not vectorise (a gather). More levels: the scalar loop.
    """
    n = codes.shape[0]
    whole = n - n % 16 if n_levels < 16 else 0
    for start in range(0, whole, 16):
        _lookup16(table, codes, out, start)
    for i in range(whole, n):
        out[i] = table[codes[i]]


def kept_into(
    w: np.ndarray, codes: np.ndarray, sums: np.ndarray, counts: np.ndarray, scale: float
) -> int:  # pragma: no cover - compiled
    """Add every kept weight (code below 128) into its code's ``sums`` (as ``trunc(w * scale)``) and
    ``counts``; return how many there are.

    Eight codes are read at a time as one uint64; their high bits (set for
    the clipped codes, 128 and up) become, inverted and gathered by one
    multiplication, a 64-bit mask of the kept weights among 64 consecutive
    ones, and only those are visited. Summing only the kept weights is what
    makes this faster than a dense loop when most weights are clipped.
    """
    n = w.shape[0]
    whole = n - n % 64
    words = codes[:whole].view(np.uint64)
    u64, i64, f64 = np.uint64, np.int64, np.float64
    high, spread_bits, one = u64(0x8080808080808080), u64(0x0102040810204080), u64(1)
    m = 0
    for chunk in range(whole // 64):
        kept = u64(0)
        for q in range(8):  # byte q's inverted high bit -> bit q of the top byte
            flags = (~words[8 * chunk + q] & high) >> u64(7)
            kept |= ((flags * spread_bits) >> u64(56)) << u64(8 * q)
        base = 64 * chunk
        while kept:
            i = base + _trailing_zeros(kept)
            j = codes[i]
            sums[j] += i64(f64(w[i]) * scale)
            counts[j] += 1
            m += 1
            kept &= kept - one
    for i in range(whole, n):
        j = codes[i]
        if j < _SPREAD_BASE:
            sums[j] += i64(f64(w[i]) * scale)
            counts[j] += 1
            m += 1
    return m


def slice_bounds(n: int, slices: int, s: int) -> tuple[int, int]:  # pragma: no cover - compiled
    """Start and length of slice ``s`` of ``slices`` over ``n`` elements: whole ``_BLOCK``s, the last one short."""
    per = ((n + slices - 1) // slices + _BLOCK - 1) // _BLOCK * _BLOCK
    lo = min(s * per, n)
    return lo, min(lo + per, n) - lo


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


def team_run(params: np.ndarray, job: np.ndarray, phase: int) -> None:  # pragma: no cover - compiled
    """Run ``phase`` of ``job`` on ``job[J_THREADS]`` threads of the OpenMP team (``team_body``), joined."""
    job[J_PHASE] = phase
    _fork(np.int64(params[P_FORK]), np.int64(params[P_BODY]), np.int64(job.ctypes.data), np.int64(job[J_THREADS]))


def team_body(data) -> None:  # pragma: no cover - compiled (a C callback)
    """One thread's share of a job (``team_run``): slices of the weights in whole blocks of ``_BLOCK``.

    The job has ``job[J_THREADS]`` slices; thread t of a team of T does
    slices t, t + T, ... (one each when the team is as large as asked; all
    of them when OpenMP gave fewer threads, nested in a parallel region say).
    ``PHASE_SCAN``: ``scan_into`` on the slice, collecting into the slice's
    part of the window buffer, results in the slice's slots.
    ``PHASE_CODES``: ``codes_into`` on the slice, then ``slice_sums`` into
    the slice's own fixed-point sums and counts (exact: the order in which
    the slices are added up later does not matter). ``PHASE_LEVELS``:
    ``levels_into`` on the slice.
    """
    head = _carray(data, J_RESULTS, dtype=np.float64)
    slices = np.int64(head[J_THREADS])
    job = _carray(data, J_RESULTS + _RESULT_SLOTS * slices, dtype=np.float64)
    t = np.int64(_call_i32(np.int64(job[J_THREAD_NUM])))
    team_size = max(np.int64(_call_i32(np.int64(job[J_TEAM_SIZE]))), np.int64(1))
    n = np.int64(job[J_N])
    phase = np.int64(job[J_PHASE])
    for s in range(t, slices, team_size):
        lo, size = _slice_bounds(n, slices, s)
        w = _carray(_f32_at(np.int64(job[J_W]) + 4 * lo), size)
        codes = _carray(_u8_at(np.int64(job[J_CODES]) + lo), size)
        if phase == PHASE_SCAN:
            share = np.int64(job[J_CAP]) // slices
            buf = _carray(_f32_at(np.int64(job[J_BUF]) + 4 * share * s), share)
            mask = _carray(_u8_at(np.int64(job[J_MASK]) + lo), size)
            i32 = np.int32
            neg, nonpos, below_n, below_p, kmin, kmax, m = _scan_into(
                w, i32(job[J_KEYS]), i32(job[J_KEYS + 1]), i32(job[J_KEYS + 2]), i32(job[J_KEYS + 3]), buf, mask)
            r = J_RESULTS + _RESULT_SLOTS * s
            job[r], job[r + 1], job[r + 2], job[r + 3] = neg, nonpos, below_n, below_p
            job[r + 4], job[r + 5], job[r + 6] = kmin, kmax, m
        elif phase == PHASE_CODES:
            f32 = np.float32
            _codes_into(w, codes, f32(job[J_W_MIN]), f32(job[J_C_NEG]), f32(job[J_C_POS]), f32(job[J_WIDTH_NEG]),
                        f32(job[J_WIDTH_POS]), np.int64(job[J_N_NEG_INT]), np.int64(job[J_LEVELS]),
                        job[J_HAS_NEG] != 0.0, job[J_HAS_POS] != 0.0)
            acc = np.int64(job[J_SUMS]) + 16 * _SLOTS * s  # this slice's sums, then its counts
            _slice_sums(w, codes, _carray(_i64_at(acc), _SLOTS), _carray(_i64_at(acc + 8 * _SLOTS), _SLOTS),
                        job[J_SCALE], np.int64(job[J_LEVELS]), job[J_SPARSE] != 0.0)
        else:
            table = _carray(_f32_at(np.int64(job[J_TABLE])), 256)
            out = _carray(_f32_at(np.int64(job[J_OUT]) + 4 * lo), size)
            _levels_into(codes, table, out, np.int64(job[J_LEVELS]))


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
    for window elements (then the slices' sums). ``result`` of ``RESULT_SIZE``
    also holds a team's job after the ``R_*`` entries (a shorter one: the
    job is allocated).
    """
    n = w.shape[0]
    scratch = table[255:256]  # for ``f32_key``: that level slot is written last (``means_into``)
    threads = max(int(params[P_THREADS]), 1)
    size = J_RESULTS + _RESULT_SLOTS * threads
    job = result[_RESULT_HEAD:_RESULT_HEAD + size] if result.shape[0] >= _RESULT_HEAD + size else np.empty(size)
    if threads > 1:
        job[J_N], job[J_THREADS] = n, threads
        job[J_THREAD_NUM], job[J_TEAM_SIZE] = params[P_THREAD_NUM], params[P_TEAM_SIZE]
        job[J_W], job[J_OUT], job[J_CODES] = w.ctypes.data, out.ctypes.data, codes.ctypes.data
        job[J_MASK], job[J_BUF], job[J_TABLE] = mask.ctypes.data, buf.ctypes.data, table.ctypes.data
        job[J_CAP] = buf.shape[0]
    else:
        job[J_THREADS] = 1
    status = _thresholds_into(w, buf, mask, job, params, result, scratch)
    if status != DONE:
        result[R_STATUS] = status
        return
    result[R_STATUS] = _levels_from(w, out, codes, buf, table, params, result, job, threads)


def thresholds_into(
    w: np.ndarray, buf: np.ndarray, mask: np.ndarray, job: np.ndarray, params: np.ndarray, result: np.ndarray,
    scratch: np.ndarray,
) -> float:  # pragma: no cover - compiled
    """``clipq_cpu``'s first phase: counts per sign, extremes and both thresholds, into ``result``.

    Returns ``DONE`` when both thresholds are known, ``MISSED`` when one was
    not found within the scans, ``NOT_FINITE`` for a NaN or infinity.
    """
    n = w.shape[0]
    p = params[P_P]
    h_neg, h_pos = params[P_HINT_NEG], params[P_HINT_POS]
    span = params[P_MAX] - params[P_MIN]
    half = (span if span > 0.0 else 1e-30) * params[P_GAPS] / n
    tiny = _rules.F32_TINY
    inf = np.inf
    none_lo, none_hi = np.int32(0x7FFFFFFF), np.int32(-0x80000000)  # lo > hi: an empty window
    # windows: float32-rounded bounds, each on its own side of zero
    use_n, use_p = -inf < h_neg < 0.0, 0.0 < h_pos < inf  # False for NaN
    use_n, use_p = use_n and half < inf, use_p and half < inf
    lo_n, hi_n = max(h_neg - half, -inf), min(h_neg + half, -tiny)
    lo_p, hi_p = max(h_pos - half, tiny), min(h_pos + half, inf)
    hinted = use_n or use_p
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
        neg, nonpos, below_n, below_p, kmin, kmax, m, m_neg = _window_scan(
            w, kn0, kn1, kp0, kp1, buf, mask, job, params)
        scans += 1
        if scan == 0:
            w_min, w_max = _unkey32(kmin, scratch), _unkey32(kmax, scratch)
            if not (np.isfinite(w_min) and np.isfinite(w_max)):
                return NOT_FINITE
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
                c_neg, found_n = _select(buf, 0, m_neg, rank_neg - below_n - 1), True
            else:  # miss: widen toward the rank by twice the expected distance
                gap = (hi_n - lo_n) / max(m_neg, 1)
                if rank_neg <= below_n:
                    lo_n -= 2.0 * (below_n - rank_neg + 1) * gap + (hi_n - lo_n)
                else:
                    hi_n = min(hi_n + 2.0 * (rank_neg - below_n - m_neg) * gap + (hi_n - lo_n), -tiny)
        if want_p and not found_p:
            k = m - m_neg
            if below_p < rank_pos <= below_p + k:
                c_pos, found_p = _select(buf, m_neg, m, m_neg + rank_pos - below_p - 1), True
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
    if hinted:
        # The window follows how far this layer's thresholds move from step to step: twice as wide
        # after a miss, a little narrower after each hit (the selection among fewer weights is
        # quicker), never narrower than _GAPS_MIN through hits alone.
        gaps = params[P_GAPS]
        if scans > 1 or not (found_n and found_p):
            params[P_GAPS] = min(2.0 * gaps, _GAPS_MAX)
        else:
            params[P_GAPS] = max(gaps * _GAPS_SHRINK, min(gaps, _GAPS_MIN))
    result[R_NEG], result[R_ZERO], result[R_POS] = negatives, zeros, positives
    result[R_RANK_NEG], result[R_RANK_POS] = rank_neg, rank_pos
    result[R_C_NEG], result[R_C_POS] = c_neg, c_pos
    result[R_MIN], result[R_MAX] = w_min, w_max
    result[R_FOUND_NEG], result[R_FOUND_POS], result[R_SCANS] = found_n, found_p, scans
    if not (found_n and found_p):
        return MISSED
    return DONE


def levels_from(
    w: np.ndarray, out: np.ndarray, codes: np.ndarray, buf: np.ndarray, table: np.ndarray, params: np.ndarray,
    result: np.ndarray, job: np.ndarray, threads: int,
) -> float:  # pragma: no cover - compiled
    """``clipq_cpu``'s second phase, from the thresholds in ``result``: partition, codes, exact sums, levels.

    Returns ``DONE``, or ``NOTHING_KEPT`` when every weight is clipped.
    """
    n = w.shape[0]
    p, n_levels = params[P_P], int(params[P_LEVELS])
    negatives, zeros, positives = int(result[R_NEG]), int(result[R_ZERO]), int(result[R_POS])
    k_neg, k_pos, rank_neg, rank_pos = _clip_ranks(p, negatives, zeros, positives)
    c_neg, c_pos, w_min, w_max = result[R_C_NEG], result[R_C_POS], result[R_MIN], result[R_MAX]
    has_neg, has_pos, n_neg_int, width_neg, width_pos = _partition(
        n_levels, negatives, positives, k_neg, k_pos, rank_neg, rank_pos, w_min, w_max, c_neg, c_pos
    )
    # what the next call on the slightly changed tensor starts from
    params[P_HINT_NEG], params[P_HINT_POS], params[P_MIN], params[P_MAX] = c_neg, c_pos, w_min, w_max
    if not (has_neg or has_pos):
        return NOTHING_KEPT
    f32 = np.float32
    kept = (negatives - k_neg) + (positives - k_pos)  # at most: ties at a threshold are clipped too
    sparse = 2 * kept <= n  # mostly clipped: add up only the kept weights
    bits = _fixed_point_bits(n, w_min, w_max)
    scale = np.ldexp(1.0, bits)
    # per slice: fixed-point sums, counts; in the window buffer, free now, when it is large enough
    # (an allocation here costs a large layer some microseconds inside a training step)
    words = threads * 2 * _SLOTS
    if buf.shape[0] >= 2 * words + 1:
        skip = (8 - buf.ctypes.data % 8) % 8 // 4
        acc = buf[skip:skip + 2 * words].view(np.int64).reshape((threads, 2, _SLOTS))
        acc[:] = 0
    else:
        acc = np.zeros((threads, 2, _SLOTS), np.int64)
    if threads > 1:
        job[J_W_MIN], job[J_C_NEG], job[J_C_POS] = f32(w_min), f32(c_neg), f32(c_pos)
        job[J_WIDTH_NEG], job[J_WIDTH_POS] = f32(width_neg), f32(width_pos)
        job[J_N_NEG_INT], job[J_LEVELS], job[J_HAS_NEG], job[J_HAS_POS] = n_neg_int, n_levels, has_neg, has_pos
        job[J_SPARSE], job[J_SUMS], job[J_SCALE] = sparse, acc.ctypes.data, scale
        _team_run(params, job, PHASE_CODES)
        for t in range(1, threads):
            for j in range(n_levels):
                acc[0, 0, j] += acc[t, 0, j]
                acc[0, 1, j] += acc[t, 1, j]
    else:
        _codes_into(w, codes, f32(w_min), f32(c_neg), f32(c_pos), f32(width_neg), f32(width_pos),
                    n_neg_int, n_levels, has_neg, has_pos)
        _slice_sums(w, codes, acc[0, 0], acc[0, 1], scale, n_levels, sparse)
    _means_into(acc[0, 0], acc[0, 1], table, n_levels, bits)
    if threads > 1:
        _team_run(params, job, PHASE_LEVELS)
    else:
        _levels_into(codes, table, out, n_levels)
    result[R_N_NEG_INT] = n_neg_int
    return DONE
