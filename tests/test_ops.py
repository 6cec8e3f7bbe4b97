from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from clipq_search import clipq_quantize, clipq_quantize_with_stats
from clipq_search.core.reference import reference_clipq

FIG2_W = [
    [0.1, -0.1, 0.7, -0.4],
    [0.7, -0.5, 0.9, -0.1],
    [-1.0, -0.6, -1.6, 0.8],
    [-0.5, 1.1, 0.2, 1.2],
]
FIG2_OUT = [
    [0.0, 0.0, 0.9, -0.5],
    [0.9, -0.5, 0.9, 0.0],
    [-1.3, -0.5, -1.3, 0.9],
    [-0.5, 0.9, 0.0, 0.9],
]


def test_paper_fig2_golden_example() -> None:
    out = clipq_quantize(torch.tensor(FIG2_W), 0.25, 2)
    torch.testing.assert_close(out, torch.tensor(FIG2_OUT), rtol=0, atol=1e-6)
    levels = sorted({round(v, 6) for v in out.flatten().tolist()} - {0.0})
    assert levels == [-1.3, -0.5, 0.9]


def _check_properties(w: torch.Tensor, p: float, bits: int, out: torch.Tensor) -> None:
    w, out = w.double().flatten(), out.double().flatten()
    # at most 2^b - 1 distinct non-zero values
    assert torch.unique(out[out != 0]).numel() <= 2**bits - 1
    # signs never mix, and zeros stay zero
    assert torch.all(out * w >= 0)
    assert torch.all(out[w == 0] == 0)
    for sign in (1.0, -1.0):
        side = w * sign > 0
        n = int(side.sum())
        k = round(p * n)
        clipped = side & (out == 0)
        # at least the specified fraction is clipped; more only through exact ties at the threshold
        assert int(clipped.sum()) >= k
        if int(clipped.sum()) > k:
            thr = (w[clipped].abs()).max()
            assert int((side & (w.abs() == thr)).sum()) > 1
        # the clipped ones are the smallest in magnitude
        if clipped.any() and (side & ~clipped).any():
            assert w[clipped].abs().max() <= w[side & ~clipped].abs().min()
    # each level is the mean of the full-precision weights mapped to it
    for level in torch.unique(out[out != 0]):
        members = w[out == level]
        assert abs(members.mean().item() - level.item()) <= 1e-5 * max(1.0, abs(level.item()))


@pytest.mark.parametrize("seed", range(40))
def test_properties_on_random_tensors(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    shape = [(1000,), (37, 53), (8, 3, 5, 5), (64, 1, 3, 3), (2, 7)][seed % 5]
    w = torch.randn(*shape, generator=g) * float(torch.rand(1, generator=g) * 2 + 0.01)
    if seed % 3 == 0:
        w = w + 0.3  # skewed: unequal numbers of each sign
    if seed % 7 == 0:
        w[w.abs() < 0.1] = 0.0  # exact zeros
    p = float(torch.rand(1, generator=g) * 0.98)
    bits = int(torch.randint(2, 9, (1,), generator=g))
    out = clipq_quantize(w, p, bits)
    assert out.shape == w.shape and out.dtype == w.dtype
    _check_properties(w, p, bits, out)


def test_intervals_never_straddle_zero_band_and_are_uniform() -> None:
    w = torch.linspace(-2.0, 1.0, 3001)
    out, st = clipq_quantize_with_stats(w, 0.5, 3)
    # spans: neg [-2, c-], pos [c+, 1]; 7 intervals shared 2:... in proportion
    span_neg, span_pos = st.c_neg + 2.0, 1.0 - st.c_pos
    assert st.n_neg_intervals == round(7 * span_neg / (span_neg + span_pos))
    assert torch.all(out[w < st.c_neg] < 0) and torch.all(out[w > st.c_pos] > 0)


def test_hint_gives_identical_result() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 784, generator=g) * 0.05
    _, st = clipq_quantize_with_stats(w, 0.9, 3)
    w2 = w + torch.randn(w.shape, generator=g) * 1e-3
    a = clipq_quantize(w2, 0.9, 3)
    b, _ = clipq_quantize_with_stats(w2, 0.9, 3, hint=(st.c_neg, st.c_pos))
    far, _ = clipq_quantize_with_stats(w2, 0.9, 3, hint=(-5.0, 7.0))  # a useless hint still gives the exact result
    assert torch.equal(a, b) and torch.equal(a, far)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(dtype: torch.dtype) -> None:
    w = torch.randn(50, 60).to(dtype)
    out = clipq_quantize(w, 0.6, 4)
    assert out.dtype == dtype
    assert torch.unique(out[out != 0]).numel() <= 15
    _check_properties(w.float(), 0.6, 4, clipq_quantize(w.float(), 0.6, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(200, 300), (64, 64, 3, 3), (2048, 512), (7,)])
def test_cuda_matches_the_reference_bit_for_bit(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(len(shape))
    w = torch.randn(shape, generator=g)
    for p, bits in ((0.7, 3), (0.0, 8), (0.95, 5)):
        out = clipq_quantize(w.cuda(), p, bits).cpu()
        ref = reference_clipq(w, p, bits)[0]
        assert torch.equal(out.view(torch.int32), ref.view(torch.int32))


# The tensor implementation's budget per layer and step: operations that compute (views and other metadata
# changes excluded), of which those that pass over every weight; and no read of a device value by the host.
_CALLS_BUDGET = 73
_FULL_PASSES_BUDGET = 12
_METADATA_OPS = ("view", "slice", "select", "unsqueeze", "alias", "detach", "expand", "t.default")


class _CountingMode(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten operations that compute, and how many of them write ``n`` elements or more."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls, self.full, self.host_reads = n, [], 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if "_local_scalar_dense" in name or name.startswith("aten.item"):
            self.host_reads += 1
        if not any(m in name for m in _METADATA_OPS):
            self.calls.append(name)
            outputs = [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]
            if any(t.numel() >= self.n for t in outputs):
                self.full += 1
        return out


@pytest.mark.parametrize("bits", [2, 8])
def test_tensor_implementation_keeps_to_its_budget_and_never_reads_the_device(bits: int) -> None:
    """What a CUDA training step costs per layer: a bounded number of launches, and no wait for the device."""
    from clipq_search.core.operator import quantize_on_device

    n = 50_000
    w = torch.randn(n, generator=torch.Generator().manual_seed(1))
    quantize_on_device(w, 0.6, bits)  # the layer's constants are made once
    w = w * 1.01  # the next step's weights
    mode = _CountingMode(n)
    with mode:
        out, _ = quantize_on_device(w, 0.6, bits)
    assert mode.host_reads == 0
    assert len(mode.calls) <= _CALLS_BUDGET, mode.calls
    assert mode.full <= _FULL_PASSES_BUDGET, mode.full
    assert torch.equal(out, reference_clipq(w, 0.6, bits)[0])
    # A read of any device value would fail on the meta device, where tensors have no values.
    meta_out, stats = quantize_on_device(torch.empty(64, 9, device="meta"), 0.6, bits)
    assert meta_out.shape == (64, 9) and stats.levels.shape == (2 * (2**bits - 1) + 1,)


def test_tensor_implementation_traces_whole_under_torch_compile() -> None:
    """No graph break: nothing in it depends on a value read from the device."""
    from clipq_search.core.operator import quantize_on_device

    w = torch.randn(3000, generator=torch.Generator().manual_seed(2))
    quantize_on_device(w, 0.5, 4)
    compiled = torch.compile(lambda t: quantize_on_device(t, 0.5, 4)[0], backend="eager", fullgraph=True)
    assert torch.equal(compiled(w), reference_clipq(w, 0.5, 4)[0])


def test_edge_cases() -> None:
    assert torch.equal(clipq_quantize(torch.zeros(10), 0.5, 3), torch.zeros(10))
    only_pos = torch.rand(100) + 0.1
    out = clipq_quantize(only_pos, 0.5, 2)
    assert torch.all(out >= 0) and torch.unique(out[out != 0]).numel() <= 3
    assert clipq_quantize(torch.empty(0), 0.5, 3).numel() == 0
    same = torch.full((10,), 0.5)
    out = clipq_quantize(same, 0.0, 3)  # no clipping: every weight keeps its (only) level
    assert torch.equal(out, same)


@pytest.mark.parametrize(
    ("p", "bits", "match"),
    [
        (1.0, 3, "p=1.0"),
        (-0.1, 3, "p=-0.1"),
        (float("nan"), 3, "p=nan"),
        (0.5, 1, "bits=1"),
        (0.5, 9, "bits=9"),
        (0.5, 3.5, "bits=3.5"),
    ],
)
def test_invalid_arguments_raise_value_error(p: float, bits: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        clipq_quantize(torch.randn(10), p, bits)


def test_wrong_weight_types_raise_type_error() -> None:
    from clipq_search import attach_clipq, estimate_size

    with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
        clipq_quantize([1.0, -2.0], 0.5, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dtype torch.int64; CLIP-Q quantizes floating-point"):
        clipq_quantize(torch.arange(10), 0.5, 3)
    with pytest.raises(TypeError, match="torch.nn.Module .* got str"):
        attach_clipq("model", {"default": {"p": 0.5, "bits": 3}})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="torch.nn.Module .* got int"):
        estimate_size(42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- fast path == definition
#
# The operator in clipq_search.core.operator is optimised (compiled kernels on CPU; in
# the tensor implementation a histogram threshold search, scratch buffers, no
# `where`); clipq_search.core.reference is the plain definition. The two must
# agree bit for bit: same thresholds, same codes, same exact (fixed-point) sums.


def _assert_matches_reference(w: torch.Tensor, p: float, bits: int, hint: tuple[float, float] | None = None) -> None:
    ref_out, (c_neg, c_pos, n_neg_int, rank_neg, rank_pos, levels) = reference_clipq(w, p, bits)
    out, st = clipq_quantize_with_stats(w, p, bits, hint=hint)
    assert (st.c_neg, st.c_pos, st.n_neg_intervals, st.rank_neg, st.rank_pos) == (
        c_neg, c_pos, n_neg_int, rank_neg, rank_pos
    ), (w.shape, p, bits, hint)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    assert torch.equal(out, ref_out), (w.shape, p, bits, hint, int((out != ref_out).sum()))
    assert torch.equal(st.levels.nan_to_num(7.0), levels.nan_to_num(7.0))


def _awkward_tensor(kind: int, n: int, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, generator=g) * float(torch.rand(1, generator=g) * 2 + 1e-3)
    if kind == 1:
        w = w + 0.3  # skewed
    elif kind == 2:
        w[w.abs() < 0.1] = 0.0  # exact zeros
    elif kind == 3:
        w = (w * 8).round() / 8  # heavy ties, also at the thresholds
    elif kind == 4:
        w = w.abs() + 0.01  # one sign only
    elif kind == 5:
        w = -w.abs()  # no positives
    elif kind == 6:
        w = w * 1e-30  # tiny magnitudes
    elif kind == 7:
        w = torch.exp(w * 5) * torch.sign(torch.randn(n, generator=g))  # very wide range
    return w


@pytest.fixture(params=["compiled", "compiled-one", "compiled-team", "compiled-narrow", "tensor"])
def select_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run a test on every CPU implementation.

    ``compiled``: the numba kernels as they run by default on CPU (on
    torch's OpenMP threads from ``TEAM_MIN`` elements on); ``compiled-one``:
    on this thread alone; ``compiled-team``: on a team of three threads at
    every size (slices of uneven length, and empty ones for tiny tensors);
    ``compiled-narrow``: on the team too, with tiny windows and a tiny window
    buffer, so that misses, widening, full slices of the buffer and the
    full-selection fallback (``_select``) all run; ``tensor``: the tensor implementation
    (what runs on CUDA).
    """
    import clipq_search.core._numba_kernels as fused
    import clipq_search.core.operator as ops

    threads = torch.get_num_threads()
    if request.param.startswith("compiled"):
        if not fused.AVAILABLE:
            pytest.skip("numba is not installed")
        monkeypatch.setenv("CLIPQ_SEARCH_KERNEL", "numba")
        if request.param == "compiled-one":
            monkeypatch.setattr(fused, "_team_enabled", False)
        if request.param in ("compiled-team", "compiled-narrow"):
            if fused.team() is None:
                pytest.skip("torch runs no OpenMP team here")
            monkeypatch.setattr(fused, "TEAM_MIN", 1)
            torch.set_num_threads(3)
        if request.param == "compiled-narrow":
            monkeypatch.setattr(ops, "_FUSED_HINT_GAPS", 0.5)
            monkeypatch.setattr(ops, "_WINDOW_CAP", 3)
    else:
        monkeypatch.setenv("CLIPQ_SEARCH_KERNEL", "torch")
    yield request.param
    torch.set_num_threads(threads)


def test_compiled_kernels_are_the_default_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """With numba installed the CPU operator runs the compiled kernels, and the switch turns them off."""
    import clipq_search.core._numba_kernels as fused

    monkeypatch.delenv("CLIPQ_SEARCH_KERNEL", raising=False)
    assert fused.AVAILABLE, "numba is a dependency: the compiled CPU path must be available"
    assert fused.enabled()
    calls = []
    real = fused.kernels()
    monkeypatch.setattr(fused, "kernels", lambda: calls.append(1) or real)
    clipq_quantize(torch.randn(3000), 0.8, 3)
    assert calls
    calls.clear()
    monkeypatch.setenv("CLIPQ_SEARCH_KERNEL", "torch")
    clipq_quantize(torch.randn(3000), 0.8, 3)
    assert not calls


@pytest.mark.parametrize("seed", range(24))
def test_matches_reference_bit_for_bit(seed: int, select_path: str) -> None:
    g = torch.Generator().manual_seed(1000 + seed)
    n = int(torch.randint(1, 12000, (1,), generator=g))
    w = _awkward_tensor(seed % 8, n, g)
    p = [0.0, 0.001, 0.5, 0.9, 0.97, float(torch.rand(1, generator=g) * 0.99)][seed % 6]
    bits = int(torch.randint(2, 9, (1,), generator=g))
    _assert_matches_reference(w, p, bits)
    _, ref = reference_clipq(w, p, bits)
    inf, nan = float("inf"), float("nan")
    hints = [(ref[0], ref[1]), (-1e-3, 1e-3), (nan, inf), (1.0, -1.0), (0.0, 0.0), (-1.5, inf), (-inf, 0.5),
             (-0.5, inf, -1.0, 1.0), (ref[0], ref[1], -inf, inf), (-1e300, 1e300, nan, nan), (-1e-3, 1e-3, 5.0, -5.0)]
    for hint in hints:
        _assert_matches_reference(w, p, bits, hint)


def test_matches_reference_along_a_training_run(select_path: str) -> None:
    """Many steps of small updates with the previous thresholds as hint, as ClipQWeight does."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(40, 200, generator=g) * 0.05
    hint = None
    for step in range(20):
        w = w + torch.randn(w.shape, generator=g) * (1e-4 if step % 10 else 1e-2)  # a big jump now and then
        _assert_matches_reference(w, 0.9, 4, hint)
        _, st = clipq_quantize_with_stats(w, 0.9, 4, hint=hint)
        hint = (st.c_neg, st.c_pos)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_reference(dtype: torch.dtype, select_path: str) -> None:
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(40, 130, generator=g) * 0.05).to(dtype)
    _assert_matches_reference(w, 0.8, 5)
    _assert_matches_reference(w, 0.8, 5, hint=(-0.05, 0.05))


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_weights_in_the_subnormal_range_match_reference(bits: int, select_path: str) -> None:
    """Widths that would round to zero in float32 are the smallest subnormal instead: no division by zero."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randint(-50, 50, (20000,), generator=g).float() * 1e-45
    for p in (0.0, 0.5, 0.9):
        _assert_matches_reference(w, p, bits)


def test_results_do_not_alias_scratch_buffers(select_path: str) -> None:
    """Outputs and levels stay valid after later calls of other sizes reuse the scratch space."""
    g = torch.Generator().manual_seed(5)
    big, small = torch.randn(9000, generator=g), torch.randn(5000, generator=g)
    out_big, st_big = clipq_quantize_with_stats(big, 0.7, 3)
    kept_out, kept_levels = out_big.clone(), st_big.levels.clone()
    clipq_quantize_with_stats(small, 0.5, 6)
    clipq_quantize_with_stats(big * 2, 0.2, 8)
    assert torch.equal(out_big, kept_out) and torch.equal(st_big.levels, kept_levels)
    _assert_matches_reference(small, 0.5, 6)


def test_threads_get_their_own_scratch(select_path: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(11)
    tensors = [torch.randn(int(torch.randint(5000, 20000, (1,), generator=g)), generator=g) for _ in range(8)]

    def run(w: torch.Tensor) -> torch.Tensor:
        return clipq_quantize(w, 0.9, 4)

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(run, tensors * 3))
    for w, out in zip(tensors * 3, outs, strict=True):
        assert torch.equal(out, reference_clipq(w, 0.9, 4)[0])


def test_compiled_path_finds_moving_thresholds_without_full_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Along a training-like run the hinted window (widened on a miss) finds every threshold: no full selection."""
    import clipq_search.core._numba_kernels as fused
    from clipq_search.core import operator

    if not fused.AVAILABLE:
        pytest.skip("numba is not installed")
    monkeypatch.setenv("CLIPQ_SEARCH_KERNEL", "numba")
    real_select = operator._select
    calls: list[int] = []

    def counting_select(*args, **kwargs):
        calls.append(1)
        return real_select(*args, **kwargs)

    monkeypatch.setattr(operator, "_select", counting_select)
    g = torch.Generator().manual_seed(21)
    w = torch.randn(300, 784, generator=g) * 0.05
    _, st = clipq_quantize_with_stats(w, 0.9, 4)  # no hint: full selection of both thresholds
    assert len(calls) == 2
    calls.clear()
    for step in range(12):
        # small steps, and now and then a jump far beyond the window (forces widening)
        w = w + torch.randn(w.shape, generator=g) * (3e-3 if step % 4 == 3 else 1e-4)
        out, st2 = clipq_quantize_with_stats(w, 0.9, 4, hint=(st.c_neg, st.c_pos))
        n = len(calls)
        _assert_matches_reference(w, 0.9, 4)  # may select in full itself (no hint): not counted
        del calls[n:]
        st = st2
    assert not calls


def test_without_numba_the_tensor_implementation_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import clipq_search.core._numba_kernels as fused

    monkeypatch.delenv("CLIPQ_SEARCH_KERNEL", raising=False)
    monkeypatch.setattr(fused, "AVAILABLE", False)
    assert not fused.enabled()
    monkeypatch.setattr(fused, "kernels", lambda: pytest.fail("compiled kernels used without numba"))
    g = torch.Generator().manual_seed(4)
    _assert_matches_reference(torch.randn(5000, generator=g), 0.7, 3)


def test_kernels_that_fail_to_compile_fall_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import clipq_search.core._numba_kernels as fused

    if not fused.AVAILABLE:
        pytest.skip("numba is not installed")
    monkeypatch.delenv("CLIPQ_SEARCH_KERNEL", raising=False)

    def broken():
        raise ImportError("numba needs a newer NumPy")

    monkeypatch.setattr(fused, "kernels", broken)
    fused._ready.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="compiled CLIP-Q kernels are unavailable.*numba needs a newer NumPy"):
            assert not fused.enabled()
        g = torch.Generator().manual_seed(8)
        _assert_matches_reference(torch.randn(6000, generator=g), 0.9, 4)  # the tensor implementation
    finally:
        fused._ready.cache_clear()


def test_the_kernels_name_the_rules_they_compile_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """numba's cache is keyed on the kernels' file: it is only used for the _rules.py that file names."""
    import clipq_search.core._numba_kernels as fused

    assert fused.rules_digest() == fused.RULES_DIGEST, "update RULES_DIGEST after changing _rules.py"
    assert fused.rules_cached()
    monkeypatch.setattr(fused, "RULES_DIGEST", "0" * 16)
    with pytest.warns(RuntimeWarning, match="compiling without numba's cache"):
        assert not fused.rules_cached()


def test_the_kernels_can_be_compiled_ahead_of_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """``make setup`` compiles them once, so that a run's processes load them from numba's cache."""
    import clipq_search.core._numba_kernels as fused
    from clipq_search.core.operator import compile_cpu_kernels

    monkeypatch.setenv("CLIPQ_SEARCH_KERNEL", "torch")
    assert not compile_cpu_kernels()  # switched off: nothing to compile
    monkeypatch.delenv("CLIPQ_SEARCH_KERNEL")
    if not fused.enabled():
        pytest.skip("compiled kernels unavailable")
    assert compile_cpu_kernels()
    assert fused.kernels().clipq_cpu.signatures  # the operator's kernel is compiled in this process


def test_order_keys_sort_as_the_floats_do() -> None:
    """The compiled scan compares int32 order keys: they must order every float32 as the values do."""
    import clipq_search.core._numba_kernels as fused

    if not fused.enabled():
        pytest.skip("compiled kernels unavailable")
    k = fused.kernels()
    scratch = np.empty(1, np.float32)
    g = np.random.default_rng(0)
    special = [0.0, -0.0, 1e-45, -1e-45, 1.2e-38, -1.2e-38, 3.4e38, -3.4e38, float("inf"), float("-inf"), 1.0, -1.0]
    spread = g.standard_normal(2000) * 10.0 ** g.integers(-40, 38, 2000)
    values = np.concatenate([np.array(special, np.float32), spread.astype(np.float32)])
    for key, unkey in ((k.f32_key, k.f32_unkey), (fused.f32_key, fused.f32_unkey)):  # compiled, and as Python
        keys = np.array([int(key(float(v), scratch)) for v in values])
        assert keys.min() >= -(2**31) and keys.max() < 2**31
        order = np.argsort(keys, kind="stable")
        assert np.all(np.diff(values[order].astype(np.float64)) >= 0)
        assert int(key(-0.0, scratch)) == int(key(0.0, scratch)) - 1  # -0.0 just below +0.0
        assert all(unkey(key(float(v), scratch), scratch) == float(v) for v in values)


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 640, 1000, 4099])
def test_kept_into_adds_exactly_the_kept_codes(n: int) -> None:
    """The sparse sums (mostly clipped layers) add exactly the weights with a code below 128, as trunc(w * 2**F)."""
    import clipq_search.core._numba_kernels as fused
    from clipq_search.core._rules import fixed_point_bits

    if not fused.enabled():
        pytest.skip("compiled kernels unavailable")
    kept_into = fused.kernels().kept_into
    g = np.random.default_rng(n)
    w = (g.standard_normal(n) * 10.0 ** g.integers(-3, 3, n)).astype(np.float32)  # mixed magnitudes
    bits = fixed_point_bits(max(n, 1), float(w.min(initial=0.0)), float(w.max(initial=0.0)))
    for kept_fraction in (0.0, 0.03, 0.5, 1.0):
        kept = g.random(n) < kept_fraction
        codes = np.where(kept, g.integers(0, 127, n), g.integers(128, 144, n)).astype(np.uint8)
        sums, counts = np.zeros(fused._SLOTS, np.int64), np.zeros(fused._SLOTS, np.int64)
        assert kept_into(w, codes, sums, counts, math.ldexp(1.0, bits)) == int(kept.sum())
        ref_sums, ref_counts = [0] * fused._SLOTS, [0] * fused._SLOTS
        for i in np.flatnonzero(kept):
            ref_sums[codes[i]] += int(math.ldexp(float(w[i]), bits))  # Python ints: exact, truncated toward zero
            ref_counts[codes[i]] += 1
        assert sums.tolist() == ref_sums and counts.tolist() == ref_counts


def test_fixed_point_sums_cannot_overflow_and_levels_are_the_means() -> None:
    """F keeps any sum of n weights within 63 bits at the extremes of float32, and a level is the rounded mean."""
    from clipq_search.core._rules import fixed_point_bits, level

    below_one = float(np.nextafter(np.float32(1.0), np.float32(0.0)))  # the worst case under a power of two
    for n in (1, 2, 1000, 2**20 - 1, 2**20, 2**31 - 1):
        for top in (float(np.finfo(np.float32).max), 1.0, below_one, 2.0**-149, 1e-30):
            bits = fixed_point_bits(n, -top, top / 2)
            assert abs(int(math.ldexp(top, bits))) * n < 2**63
            assert abs(int(math.ldexp(top, bits + 2))) * n >= 2**62  # not needlessly coarse
    values = [0.1, 0.2, 0.3000001, 0.7]
    bits = fixed_point_bits(4, 0.0, 0.7)
    total = sum(int(math.ldexp(v, bits)) for v in values)
    assert float(np.float32(level(total, 4, bits))) == float(np.float32(sum(values) / 4))
    assert math.isnan(level(0, 0, bits))


@pytest.mark.parametrize("n", [0, 5, 16, 17, 1000, 4099])
def test_both_level_loops_write_the_table_entries_of_the_codes(n: int) -> None:
    """The levels pass (16 weights per AVX-512 permute where the CPU has it, else one at a time) writes table[code]."""
    from numba import njit

    import clipq_search.core._numba_kernels as fused

    if not fused.enabled():
        pytest.skip("compiled kernels unavailable")
    loops = {"plain": njit(fused.levels_into)}
    if fused._avx512():
        loops["wide"] = njit(fused.levels_into_wide)
        assert fused._levels_into.py_func is fused.levels_into_wide  # what the operator uses here
    g = np.random.default_rng(n)
    for n_levels in (3, 7, 15, 31, 255):
        clipped = 255 if n_levels == 255 else g.integers(128, 144, n)
        codes = np.where(g.random(n) < 0.3, g.integers(0, n_levels, n), clipped).astype(np.uint8)
        table = np.zeros(256, np.float32)
        table[:n_levels] = g.standard_normal(n_levels)
        for name, loop in loops.items():
            out = np.full(n, np.nan, np.float32)
            loop(codes, table, out, n_levels)
            assert np.array_equal(out, table[codes]), (name, n_levels)


def test_select_finds_every_rank_as_sorting_would() -> None:
    """The window's threshold is picked by quickselect: every rank of many small arrays, ties and sizes 1..70."""
    import clipq_search.core._numba_kernels as fused

    if not fused.enabled():
        pytest.skip("compiled kernels unavailable")
    select = fused.kernels().select
    g = np.random.default_rng(5)
    for size in list(range(1, 71)) + [257, 1000]:
        for values in (g.standard_normal(size), g.integers(-3, 3, size), np.full(size, 2.5), np.arange(size)[::-1]):
            a = np.asarray(values, np.float32)
            want = np.sort(a)
            lo = int(g.integers(0, 3))  # a range that does not start at 0
            for k in range(size):
                buf = np.concatenate([np.full(lo, np.nan, np.float32), a, np.full(2, np.nan, np.float32)])
                assert select(buf, lo, lo + size, lo + k) == want[k]
                assert np.array_equal(np.sort(buf[lo:lo + size]), want)  # only reordered, within the range


@pytest.mark.parametrize("p", [0.3, 0.5, 0.9])
def test_compiled_operator_dense_and_sparse_sums_agree_with_reference(p: float) -> None:
    """Both sum loops of the compiled operator (dense below p = 0.5, sparse from it) are bit-identical."""
    import clipq_search.core._numba_kernels as fused
    from clipq_search.core.operator import CompiledOperator

    if not fused.enabled():
        pytest.skip("compiled kernels unavailable")
    g = torch.Generator().manual_seed(31)
    w = torch.randn(20011, generator=g) * 0.05
    for bits in (2, 4, 7, 8):  # 8 bits: no room for spread codes, the dense loop always
        op, out = CompiledOperator(w.numel(), p, bits), torch.empty_like(w)
        assert op.run(w, out) == fused.DONE
        ref_out, ref = reference_clipq(w, p, bits)
        assert torch.equal(out, ref_out)
        assert torch.equal(op.stats().levels.nan_to_num(7.0), ref[5].nan_to_num(7.0))


def test_compiled_operator_window_follows_how_far_the_thresholds_move() -> None:
    """The hinted window narrows a little after each hit (down to _GAPS_MIN) and doubles after a miss; exact always."""
    import clipq_search.core._numba_kernels as fused
    from clipq_search.core.operator import CompiledOperator

    if not fused.enabled():
        pytest.skip("compiled kernels unavailable")
    g = torch.Generator().manual_seed(32)
    w = torch.randn(60000, generator=g) * 0.05
    op, out = CompiledOperator(w.numel(), 0.9, 4), torch.empty_like(w)
    start = op.params[fused.P_GAPS]
    assert op.run(w, out) == fused.DONE and op.params[fused.P_GAPS] == start  # no hint yet: nothing to learn
    for _ in range(200):  # small moves: hits
        w.add_(torch.randn(w.shape, generator=g), alpha=1e-5)
        assert op.run(w, out) == fused.DONE and op.result[fused.R_SCANS] == 1
    narrow = op.params[fused.P_GAPS]
    assert fused._GAPS_MIN <= narrow < start
    w.mul_(1.2)  # the thresholds jump far outside the window: a miss
    assert op.run(w, out) == fused.DONE and op.result[fused.R_SCANS] > 1
    assert op.params[fused.P_GAPS] == 2 * narrow
    assert torch.equal(out, reference_clipq(w, 0.9, 4)[0])


def test_compiled_operator_keeps_its_hint_and_scans_once() -> None:
    """After a first call, the next call on slightly moved weights finds both thresholds in its first scan."""
    import clipq_search.core._numba_kernels as fused
    from clipq_search.core.operator import CompiledOperator

    if not fused.enabled():
        pytest.skip("compiled kernels unavailable")
    g = torch.Generator().manual_seed(30)
    w = torch.randn(60000, generator=g) * 0.05
    op = CompiledOperator(w.numel(), 0.9, 4)
    out = torch.empty_like(w)
    assert op.run(w, out) == fused.DONE  # no hint: counts, then an exact selection
    ref_out, ref = reference_clipq(w, 0.9, 4)
    assert torch.equal(out, ref_out)
    st = op.stats()
    assert op.params[fused.P_HINT_NEG:fused.P_MAX + 1].tolist() == [st.c_neg, st.c_pos, st.w_min, st.w_max]
    assert (st.w_min, st.w_max) == (float(w.min()), float(w.max()))
    for _ in range(5):
        w += torch.randn(w.shape, generator=g) * 1e-4
        assert op.run(w, out) == fused.DONE
        assert op.result[fused.R_SCANS] == 1
        assert torch.equal(out, reference_clipq(w, 0.9, 4)[0])
        assert torch.equal(op.stats().levels.nan_to_num(7.0), reference_clipq(w, 0.9, 4)[1][5].nan_to_num(7.0))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_weights_give_all_nan(bad: float, select_path: str) -> None:
    """A diverged training's weights (NaN, infinity) come out all NaN on every path, so that the loss shows it."""
    g = torch.Generator().manual_seed(31)
    w = torch.randn(9000, generator=g)
    w[123] = bad
    out, st = clipq_quantize_with_stats(w, 0.5, 3, hint=(-0.5, 0.5))
    assert out.shape == w.shape and bool(out.isnan().all())
    assert math.isnan(st.c_neg) and math.isnan(st.c_pos) and bool(st.levels.isnan().all())


def test_out_tensor_is_written_and_returned_when_it_fits(select_path: str) -> None:
    g = torch.Generator().manual_seed(32)
    w = torch.randn(50, 80, generator=g)
    ref_out = reference_clipq(w, 0.7, 4)[0]
    out = torch.full_like(w, 5.0)
    got, _ = clipq_quantize_with_stats(w, 0.7, 4, out=out)
    assert torch.equal(got, ref_out)
    if select_path.startswith("compiled"):
        assert got.data_ptr() == out.data_ptr() and torch.equal(out, ref_out)
    unfits = (torch.full((80, 50), 5.0), torch.full((50, 80), 5.0, dtype=torch.float64), torch.full((80, 50), 5.0).t())
    for unfit in unfits:
        got, _ = clipq_quantize_with_stats(w, 0.7, 4, out=unfit)
        assert torch.equal(got, ref_out) and bool((unfit == 5.0).all())  # not written


def _team_or_skip():
    import clipq_search.core._numba_kernels as fused

    if not fused.enabled() or fused.team() is None:
        pytest.skip("compiled kernels or torch's OpenMP team unavailable here")
    return fused


def test_team_is_available_where_torch_runs_on_libgomp() -> None:
    """On Linux with torch on OpenMP (its wheels ship libgomp) the team must come up, not silently fall back."""
    import os
    import sys

    import clipq_search.core._numba_kernels as fused

    if not sys.platform.startswith("linux") or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch is not on OpenMP here")
    if fused._torch_libgomp(os.path.dirname(torch.__file__)) is None:
        pytest.skip("torch's libgomp is not among the loaded libraries")
    assert fused.enabled()
    assert fused.team() is not None  # None: it failed its check against one thread (see the warning)


def test_big_layers_run_on_torchs_threads_and_small_ones_on_one() -> None:
    """In training, a layer from TEAM_MIN elements on uses torch's intra-op threads; a small one does not."""
    fused = _team_or_skip()
    from clipq_search import attach_clipq
    from clipq_search.core.surgery import _clipq_param

    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("torch runs one thread here")
    model = torch.nn.Sequential(torch.nn.Linear(784, 300), torch.nn.Linear(300, 10))
    attach_clipq(model, {"default": {"p": 0.9, "bits": 4}})
    for _ in range(2):  # the first call sets the layers' compiled operators up
        model(torch.randn(4, 784)).sum().backward()
        with torch.no_grad():  # an optimizer step
            for module in model:
                module.parametrizations.weight.original.add_(0.001)
    big, small = (_clipq_param(m)._state["op"] for m in model)
    assert big.params[fused.P_THREADS] == min(threads, fused.TEAM_MAX)
    assert small.params[fused.P_THREADS] == 1


def test_team_that_gets_fewer_threads_still_does_every_slice() -> None:
    """When OpenMP hands out fewer threads than slices (nested, or OMP_DYNAMIC), each does several."""
    import ctypes


    fused = _team_or_skip()
    body_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

    def one_thread_fork(body: int, data: int, threads: int, flags: int) -> None:  # GOMP_parallel, a team of one
        body_type(body)(data)

    fork = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)(one_thread_fork)
    zero, one = (ctypes.CFUNCTYPE(ctypes.c_int)(lambda v=v: v) for v in (0, 1))
    addresses = [float(ctypes.cast(f, ctypes.c_void_p).value) for f in (fork, zero, one)]
    addresses.insert(1, float(fused.kernels().team_body.address))
    g = np.random.default_rng(5)
    n = 64 * 7 + 3
    w = (g.standard_normal(n) * 0.05).astype(np.float32)
    ordered = np.sort(w)
    results = []
    for slices in (1, 3):
        hint = (ordered[150], ordered[330], ordered[0], ordered[-1])
        params = fused.make_params(0.6, 7, hint, threads=slices, team=tuple(addresses))
        out, table, result = np.zeros(n, np.float32), np.zeros(256, np.float32), np.zeros(fused.RESULT_SIZE)
        fused.kernels().clipq_cpu(w, out, np.empty(n, np.uint8), np.empty(n, np.uint8),
                                  np.empty(4096 * slices, np.float32), table, params, result)
        assert result[fused.R_STATUS] == fused.DONE
        results.append((out.view(np.int32), table.view(np.int32), result))
    (o1, t1, r1), (o3, t3, r3) = results
    head = fused._RESULT_HEAD  # (a team's job follows: its slots differ with the number of slices)
    assert np.array_equal(o1, o3) and np.array_equal(t1, t3) and np.array_equal(r1[:head], r3[:head])
    assert np.count_nonzero(o3) > 0


def test_libgomp_is_torchs_own_copy_or_the_only_one() -> None:
    from clipq_search.core._numba_kernels import libgomp_for

    torch_dir = "/site/torch"
    own, repaired = "/site/torch/lib/libgomp.so.1", "/site/torch.libs/libgomp-a34b3233.so.1"
    system, other = "/usr/lib/x86_64-linux-gnu/libgomp.so.1", "/site/sklearn.libs/libgomp-f7e3.so.1"
    assert libgomp_for({own, system, other}, torch_dir) == own
    assert libgomp_for({repaired, other}, torch_dir + "/") == repaired
    assert libgomp_for({system, "/site/torch/lib/libtorch_cpu.so"}, torch_dir) == system
    assert libgomp_for({system, other}, torch_dir) is None  # whose is it? one thread rather than a guess
    assert libgomp_for(set(), torch_dir) is None
    assert libgomp_for({"/site/torch-extra/libgomp.so.1"}, torch_dir) == "/site/torch-extra/libgomp.so.1"


def _threads_in_child(queue) -> None:  # runs in a forked child
    import clipq_search.core._numba_kernels as fused

    queue.put(fused.team_threads(10**6))


def test_forked_child_runs_on_one_thread() -> None:
    """A forked process has none of its parent's OpenMP threads: its operator runs on one."""
    import multiprocessing

    fused = _team_or_skip()
    assert fused.team_threads(10**6) == min(torch.get_num_threads(), fused.TEAM_MAX)
    assert fused.team_threads(fused.TEAM_MIN - 1) == 1
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_threads_in_child, args=(queue,))
    child.start()
    child.join(60)
    assert queue.get(timeout=10) == 1


def test_switch_keeps_the_operator_on_one_thread() -> None:
    import subprocess
    import sys

    code = "import clipq_search.core._numba_kernels as f; print(f.enabled(), f.team(), f.team_threads(10**6))"
    env = {**__import__("os").environ, "CLIPQ_SEARCH_KERNEL_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[1:] == ["None", "1"]
