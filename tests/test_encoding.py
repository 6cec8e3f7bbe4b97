from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from clipq_search import (
    ClipQError,
    FormatError,
    attach_clipq,
    clipq_quantize,
    estimate_size,
    load_compressed,
    read_compressed,
    save_compressed,
    strip_clipq,
)
from clipq_search.cli import main as cli_main
from clipq_search.training.models import build_model

from .test_surgery import GroupedNet


def _perturb(model: nn.Module) -> None:
    # Give biases and BN statistics non-trivial values so they must round-trip too.
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not name.endswith("weight"):
                t.add_(torch.rand_like(t))


@pytest.mark.parametrize(
    ("factory", "x_shape", "plan"),
    [
        (
            lambda: build_model("lenet5"),
            (4, 1, 28, 28),
            {"layers": {"conv1": {"p": 0.3, "bits": 6}}, "default": {"p": 0.9, "bits": 3}},
        ),
        (GroupedNet, (2, 3, 8, 8), {"default": {"p": 0.6, "bits": 4}, "dense": ["stem"]}),
    ],
)
def test_round_trip_gives_identical_outputs(tmp_path: Path, factory, x_shape, plan) -> None:
    torch.manual_seed(0)
    model = factory()
    _perturb(model)
    attach_clipq(model, plan)
    model.eval()
    x = torch.randn(*x_shape)
    path = tmp_path / "m.clipq"
    written = save_compressed(model, path)
    strip_clipq(model)
    expected = model(x)
    fresh = factory()
    fresh.load_state_dict(load_compressed(path), strict=True)
    fresh.eval()
    assert torch.equal(fresh(x), expected)
    assert written.total_bytes == path.stat().st_size
    _, sizes = read_compressed(path)
    assert [s.bytes for s in sizes.layers] == [s.bytes for s in written.layers]


def test_saving_a_stripped_model_with_its_plan_gives_the_same_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("lenet300")
    configs = attach_clipq(model, {"default": {"p": 0.8, "bits": 4}})
    save_compressed(model, tmp_path / "a.clipq")
    strip_clipq(model)
    save_compressed(model, tmp_path / "b.clipq", plan={"layers": {k: v.to_dict() for k, v in configs.items()}})
    assert (tmp_path / "a.clipq").read_bytes() == (tmp_path / "b.clipq").read_bytes()


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
@pytest.mark.parametrize(("p", "bits"), [(0.0, 8), (0.5, 5), (0.95, 2), (0.99, 3)])
def test_estimate_matches_file_bytes_per_layer_and_total(tmp_path: Path, name: str, p: float, bits: int) -> None:
    torch.manual_seed(1)
    model = build_model(name)
    assert sum(t.numel() for t in model.parameters()) >= 100_000
    plan = {"default": {"p": p, "bits": bits}}
    est = estimate_size(model, plan)
    path = tmp_path / "m.clipq"
    assert not path.exists()  # estimate writes nothing
    save_compressed(model, path, plan)
    _, read = read_compressed(path)
    assert est.total_bytes == path.stat().st_size
    for a, b in zip(est.layers, read.layers, strict=True):
        assert a.name == b.name
        assert abs(a.bytes - b.bytes) <= 0.01 * b.bytes
    assert est.original_bytes == 4 * sum(t.numel() for t in model.parameters())
    assert read.rate == pytest.approx(est.rate)


@pytest.mark.parametrize("plan", [{"p": 0.3, "bits": 5}, {"p": 0.9, "bits": 2}])
def test_a_plan_that_re_sets_an_attached_layer_compresses_its_full_precision_weight(
    tmp_path: Path, plan: dict
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4))
    attach_clipq(model, {"default": {"p": 0.5, "bits": 3}})
    save_compressed(model, tmp_path / "m.clipq", {"layers": {"0": plan}})
    state = load_compressed(tmp_path / "m.clipq")
    with torch.no_grad():
        expected = clipq_quantize(model[0].parametrizations.weight.original, plan["p"], plan["bits"])
        assert torch.equal(state["0.weight"], expected)  # not the attached (0.5, 3) weight quantized again
        assert torch.equal(state["2.weight"], model[2].weight)  # as attached
    assert estimate_size(model, {"layers": {"0": plan}}).total_bytes == (tmp_path / "m.clipq").stat().st_size


def test_a_weight_under_another_parametrization_is_sized_and_saved_as_before(tmp_path: Path) -> None:
    # only a CLIP-Q layer's full-precision weight is its source; weight_norm's has no single ``original``
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30))
    nn.utils.parametrizations.weight_norm(model[0])
    plan = {"default": {"p": 0.5, "bits": 3}}
    written = save_compressed(model, tmp_path / "m.clipq", plan)
    assert estimate_size(model, plan).total_bytes == written.total_bytes == (tmp_path / "m.clipq").stat().st_size


def test_a_model_with_non_finite_weights_is_not_saved(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(20, 30))
    with torch.no_grad():
        model[0].weight[3, 4] = float("nan")
    attach_clipq(model, {"default": {"p": 0.5, "bits": 3}})
    for call in (lambda: save_compressed(model, tmp_path / "m.clipq"), lambda: estimate_size(model)):
        with pytest.raises(ClipQError, match="layer '0' has NaN or infinite weights"):
            call()
    assert not (tmp_path / "m.clipq").exists()


def test_k_is_chosen_to_minimise_each_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dense_ish = nn.Sequential(nn.Linear(100, 200))
    sparse_ish = nn.Sequential(nn.Linear(100, 200))
    ks = {}
    for tag, model, p in (("dense", dense_ish, 0.05), ("sparse", sparse_ish, 0.995)):
        est = estimate_size(model, {"default": {"p": p, "bits": 3}})
        ks[tag] = est.layer("0.weight").k
    assert ks["dense"] < ks["sparse"]  # sparser layers need longer index differences


def test_higher_compression_gives_smaller_files() -> None:
    model = build_model("lenet300")
    sizes = [estimate_size(model, {"default": {"p": p, "bits": 4}}).total_bytes for p in (0.2, 0.6, 0.9)]
    assert sizes[0] > sizes[1] > sizes[2]
    rate = estimate_size(model, {"default": {"p": 0.95, "bits": 3}}).rate
    assert rate > 30


def _good_file(tmp_path: Path) -> Path:
    model = build_model("lenet300")
    path = tmp_path / "good.clipq"
    save_compressed(model, path, {"default": {"p": 0.9, "bits": 3}})
    return path


def test_corrupt_files_are_rejected(tmp_path: Path) -> None:
    good = _good_file(tmp_path).read_bytes()
    cases = {
        "truncated": good[: len(good) // 2],
        "tiny": good[:8],
        "magic": b"PK\x03\x04" + good[4:],
        "flipped": good[:100] + bytes([good[100] ^ 0xFF]) + good[101:],
        "version": good[:6] + struct.pack("<H", 99) + good[8:],
    }
    messages = {
        "truncated": "checksum",
        "tiny": "truncated",
        "magic": "not a .clipq file",
        "flipped": "checksum",
        "version": "format version 99",
    }
    for tag, data in cases.items():
        path = tmp_path / f"{tag}.clipq"
        path.write_bytes(data)
        with pytest.raises(FormatError, match=messages[tag]):
            load_compressed(path)
    # A file whose checksum is recomputed over garbage is still caught by the structure checks.
    body = good[:-4]
    bad = body[:20] + b"\xff" * 8 + body[28:]
    path = tmp_path / "garbage.clipq"
    path.write_bytes(bad + struct.pack("<I", zlib.crc32(bad)))
    with pytest.raises(FormatError):
        load_compressed(path)


def test_inspect_cli_prints_table_and_totals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _good_file(tmp_path)
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for word in ("fc1.weight", "300x784", "0.900", "compression rate", "original fp32 parameters"):
        assert word in out
    size = path.stat().st_size
    assert f"file: {size:,} bytes" in out


@pytest.mark.parametrize("corruption", ["truncate", "foreign", "missing"])
def test_inspect_cli_rejects_bad_files_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], corruption: str
) -> None:
    path = _good_file(tmp_path)
    if corruption == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    elif corruption == "foreign":
        path.write_text("hello, this is not a model\n")
    else:
        path = tmp_path / "nope.clipq"
    assert cli_main(["inspect", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("error: ")


def test_a_shape_larger_than_memory_is_refused_before_decoding(tmp_path: Path) -> None:
    """A sparse record's dense size is not in the file: a forged shape must not take the machine's memory."""
    good = _good_file(tmp_path).read_bytes()
    body = bytearray(good[:-4])
    name = b"fc1.weight"
    at = body.index(struct.pack("<H", len(name)) + name) + 2 + len(name)
    kind, dtype, ndim = struct.unpack_from("<BBB", body, at)
    assert ndim == 2
    struct.pack_into("<II", body, at + 3, 4_000_000_000, 4_000_000)  # 16e15 weights
    path = tmp_path / "huge.clipq"
    path.write_bytes(bytes(body) + struct.pack("<I", zlib.crc32(bytes(body))))
    # its entries cannot reach that far: refused from the header alone
    reach = r"'fc1.weight' declares shape \[4000000000, 4000000\].*entries reach at most"
    with pytest.raises(FormatError, match=reach):
        load_compressed(path)
    assert cli_main(["inspect", str(path)]) == 2


def test_a_zero_layer_larger_than_memory_is_refused_before_decoding(tmp_path: Path) -> None:
    """Entries that do reach a shape larger than the free memory: refused in one line, nothing allocated."""
    from clipq_search.core.encoding import _HEADER, _SPARSE_HEAD, MAGIC, _pack

    numel = 200_000 * 100_000  # 80 GB of float32, all zero: only trailing fillers (k = 16)
    payload = _pack(np.zeros(0, np.int64), np.zeros(0, np.int64), 2, 16, numel)
    name = b"w"
    entries = numel >> 16
    body = (
        _HEADER.pack(MAGIC, 1, 1)
        + struct.pack("<H", len(name)) + name + struct.pack("<BBB", 1, 0, 2) + struct.pack("<II", 200_000, 100_000)
        + _SPARSE_HEAD.pack(2, 16, 0.5, entries) + bytes(4 * 3) + payload
    )
    path = tmp_path / "zeros.clipq"
    path.write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    with pytest.raises(FormatError, match=r"'w' has shape \[200000, 100000\].*GiB of memory free"):
        load_compressed(path)
