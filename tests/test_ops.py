from __future__ import annotations

import pytest
import torch

from clipq_search import clipq_quantize, clipq_quantize_with_stats

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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    w = torch.randn(200, 300)
    assert torch.allclose(clipq_quantize(w.cuda(), 0.7, 3).cpu(), clipq_quantize(w, 0.7, 3), atol=1e-6)


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
