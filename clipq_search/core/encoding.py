"""The sparse encoding of CLIP-Q layers and the ``.clipq`` file format.

Layout (all little-endian; see ``docs/clipq-format.md``)::

    header   : magic b"CLIPQ\\0" | u16 version (=1) | u32 record count
    record*  : u16 name length | name (utf-8) | u8 kind | u8 dtype | u8 ndim | u32 dims[ndim]
      dense  : numel values of dtype (float tensors as float32)
      sparse : u8 bits | u8 k | f32 p | u32 entries | f32 codebook[2**bits - 1] | packed entries
    trailer  : u32 CRC-32 of everything before it

A sparse layer stores, in row-major order, one entry per surviving weight:
its level code (``bits`` bits, 1-based into the codebook; 0 is the zero code)
and its index difference from the previous entry (``k`` bits, storing d - 1 for
d in [1, 2**k]). A gap larger than ``2**k`` is bridged by filler entries that
carry the zero code. ``k`` is chosen per layer in 1..16 to minimise the layer.
``estimate_size`` computes the exact byte count of that file without writing.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clipq_search._io import read_regular, write_bytes
from clipq_search.core.operator import clipq_quantize
from clipq_search.core.plan import CompressibleTensor, LayerConfig, Plan, compressible_tensors, require_module
from clipq_search.core.surgery import attached_configs
from clipq_search.errors import ClipQError, FormatError, clip, shown

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "LayerSize",
    "SizeEstimate",
    "estimate_size",
    "load_compressed",
    "read_compressed",
    "save_compressed",
    "sparse_layer_bytes",
]

MAGIC = b"CLIPQ\0"
FORMAT_VERSION = 1
K_RANGE = range(1, 17)
_HEADER = struct.Struct("<6sHI")
_SPARSE_HEAD = struct.Struct("<BBfI")
_KIND_DENSE, _KIND_SPARSE = 0, 1
_FLAG_BUFFER = 0x80
_DTYPES: dict[int, tuple[torch.dtype, str]] = {
    0: (torch.float32, "<f4"),
    1: (torch.int64, "<i8"),
    2: (torch.bool, "|b1"),
}
_DTYPE_CODE = {torch.int64: 1, torch.bool: 2}


@dataclass(frozen=True)
class LayerSize:
    """Size of one tensor in the file (``bytes`` includes its record header)."""

    name: str
    shape: tuple[int, ...]
    numel: int
    is_parameter: bool
    compressed: bool
    p: float | None
    bits: int | None
    k: int | None
    kept: int
    entries: int
    bytes: int

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.numel if self.numel else 0.0

    @property
    def rate(self) -> float:
        return 4.0 * self.numel / self.bytes if self.bytes else float("inf")


@dataclass(frozen=True)
class SizeEstimate:
    """Size of a whole ``.clipq`` file: per tensor and in total, and the compression rate."""

    layers: tuple[LayerSize, ...]
    total_bytes: int
    original_bytes: int

    @property
    def rate(self) -> float:
        """(32 bits x every parameter of the original model) / (bits of the file)."""
        return self.original_bytes / self.total_bytes

    def layer(self, name: str) -> LayerSize:
        return next(layer for layer in self.layers if layer.name == name)

    def to_rows(self) -> list[dict[str, object]]:
        return [
            {
                "name": s.name,
                "shape": "x".join(map(str, s.shape)) or "scalar",
                "p": s.p,
                "bits": s.bits,
                "k": s.k,
                "kept": s.kept_fraction,
                "bytes": s.bytes,
                "rate": s.rate if s.is_parameter else None,
            }
            for s in self.layers
        ]


# -- the encoding ------------------------------------------------------------------------


def _record_head_size(name: str, ndim: int) -> int:
    return 2 + len(name.encode("utf-8")) + 3 + 4 * ndim


def _gaps(nz: np.ndarray) -> np.ndarray:
    """Index gaps of the non-zeros at positions ``nz`` (the first from position -1)."""
    return np.diff(nz, prepend=-1).astype(np.int64)


def _levels(vals: np.ndarray, bits: int, name: str) -> np.ndarray:
    """The distinct non-zero values ``vals`` of a layer, sorted; at most 2**bits - 1 of them."""
    levels = np.unique(vals)
    if levels.size > 2**bits - 1:
        raise ValueError(f"layer {name!r} has {levels.size} distinct non-zero values, more than 2**{bits} - 1")
    return levels


def _codes_and_gaps(flat: np.ndarray, bits: int, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codebook (2**bits - 1, zero padded), 1-based codes and index gaps of the non-zeros."""
    nz = np.flatnonzero(flat)
    vals = flat[nz]
    levels = _levels(vals, bits, name)
    n_levels = 2**bits - 1
    codebook = np.zeros(n_levels, dtype=np.float32)
    codebook[: levels.size] = levels
    codes = np.searchsorted(levels, vals).astype(np.int64) + 1
    return codebook, codes, _gaps(nz)


def _tail(gaps: np.ndarray, numel: int) -> int:
    """Zero positions after the last non-zero (bridged by trailing fillers, see ``_pack``)."""
    return numel - int(gaps.sum())


def _best_k(gaps: np.ndarray, bits: int, tail: int) -> tuple[int, int]:
    """The k in 1..16 that makes the layer smallest, and its entry count (fillers included)."""
    best: tuple[int, int, int] | None = None
    g = gaps[gaps > 1] - 1  # (gap - 1) >> k of the others is 0 for every k
    shift = 0
    for k in K_RANGE:
        g = g >> (k - shift)  # each k's shifted gaps from the last k's; the zeros dropped as they appear
        g, shift = g[g > 0], k
        entries = int(g.sum()) + int(gaps.size) + (tail >> k)
        nbytes = math.ceil(entries * (bits + k) / 8)
        if best is None or nbytes < best[0]:
            best = (nbytes, k, entries)
    assert best is not None
    return best[1], best[2]


def _sparse_size(name: str, ndim: int, bits: int, k: int, entries: int) -> int:
    return _record_head_size(name, ndim) + _SPARSE_HEAD.size + 4 * (2**bits - 1) + math.ceil(entries * (bits + k) / 8)


def sparse_layer_bytes(name: str, weight: torch.Tensor, bits: int) -> int:
    """Bytes of one compressed layer's record for an already pruned-quantized ``weight``."""
    flat = weight.detach().float().cpu().reshape(-1).numpy()
    nz = np.flatnonzero(flat)
    _levels(flat[nz], bits, name)
    gaps = _gaps(nz)
    k, entries = _best_k(gaps, bits, _tail(gaps, flat.size))
    return _sparse_size(name, weight.dim(), bits, k, entries)


def _pack(codes: np.ndarray, gaps: np.ndarray, bits: int, k: int, tail: int) -> bytes:
    """Bit-pack the entries, LSB first: fillers bridge gaps over 2**k and the zero tail to within 2**k of the end.

    The trailing fillers make every file's entries reach (to within one span)
    the end of the tensor: a reader can tell from the header alone that a
    record's entries can fill the shape it declares.
    """
    span = 1 << k
    fillers = (gaps - 1) >> k
    per = fillers + 1
    total = int(per.sum()) + (tail >> k)
    last = np.cumsum(per) - 1
    diffs = np.full(total, span, dtype=np.int64)
    diffs[last] = gaps - fillers * span
    all_codes = np.zeros(total, dtype=np.int64)
    all_codes[last] = codes
    values = (all_codes | ((diffs - 1) << bits)).astype("<u4")
    width = bits + k
    out = io.BytesIO()
    chunk = 1 << 20  # a multiple of 8 entries keeps every chunk byte-aligned
    for start in range(0, total, chunk):
        v = values[start : start + chunk]
        bitmat = np.unpackbits(v.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")[:, :width]
        out.write(np.packbits(bitmat.reshape(-1), bitorder="little").tobytes())
    return out.getvalue()


_UNPACK_CHUNK = 1 << 13  # entries decoded at a time: the temporaries stay small whatever the layer


def _unpack(payload: memoryview, entries: int, bits: int, k: int, numel: int, codebook: np.ndarray) -> np.ndarray:
    """The flat tensor of a sparse record, decoded a chunk of entries at a time.

    Entry i's ``bits + k`` bits (at most 24) start at stream bit ``i * (bits + k)``;
    they are read from the 4 bytes from that bit's byte, so nothing larger than a
    chunk is made besides the result.
    """
    width = bits + k
    flat = np.zeros(numel, dtype=np.float32)
    if entries == 0:
        return flat
    stream = np.frombuffer(payload, dtype=np.uint8)
    code_mask = (1 << bits) - 1
    at = -1  # position of the last entry decoded
    for first in range(0, entries, _UNPACK_CHUNK):
        n = min(_UNPACK_CHUNK, entries - first)
        start_bit = first * width
        lo = start_bit >> 3
        hi = min(len(stream), ((start_bit + n * width + 7) >> 3) + 3)
        window = np.zeros(hi - lo + 3, dtype=np.uint32)
        window[: hi - lo] = stream[lo:hi]
        offsets = np.arange(n, dtype=np.int64) * width + (start_bit & 7)
        byte, shift = offsets >> 3, (offsets & 7).astype(np.uint32)
        word = window[byte] | (window[byte + 1] << 8) | (window[byte + 2] << 16) | (window[byte + 3] << 24)
        values = (word >> shift) & np.uint32((1 << width) - 1)
        codes = (values & np.uint32(code_mask)).astype(np.int64)
        positions = at + np.cumsum((values >> np.uint32(bits)).astype(np.int64) + 1)
        at = int(positions[-1])
        if at >= numel:
            raise FormatError("sparse layer entries point outside the tensor")
        real = codes > 0
        flat[positions[real]] = codebook[codes[real] - 1]
    return flat


# -- what gets compressed ------------------------------------------------------------------


def _layer_configs(
    model: nn.Module, plan: Plan | Mapping[str, object] | None, tensors: dict[str, CompressibleTensor]
) -> tuple[dict[str, LayerConfig], set[str], set[str]]:
    """The config of every compressed layer (attached ones', then the ``plan``'s); the layers whose forward
    weight their operator already pruned-quantized with that config (its levels need no check); and the
    attached layers the plan gives another setting."""
    attached = dict(attached_configs(model))
    configs = dict(attached)
    if plan is not None:
        plan = plan if isinstance(plan, Plan) else Plan.from_dict(plan)
        configs.update(plan.resolve_names(list(tensors)))
    quantized = {name for name, cfg in configs.items() if attached.get(name) == cfg}
    return configs, quantized, set(attached) - quantized


def _source_weight(t: CompressibleTensor, reset: bool) -> torch.Tensor:
    """What a layer's compressed weight is made from: the forward weight, but the full-precision one of an
    attached layer the plan gives another setting (``reset``: quantizing its quantized weight would prune it
    twice)."""
    return t.module.parametrizations[t.attr].original if reset else t.tensor()


def _compressed_weights(
    model: nn.Module, plan: Plan | Mapping[str, object] | None
) -> dict[str, tuple[LayerConfig, np.ndarray, tuple[int, ...]]]:
    """The compressed weight of every compressed tensor by state-dict key: its config, flat float32, shape.

    Attached layers give their pruned-quantized weight. A layer the ``plan``
    names (a plain model's weight, or an attached one's full-precision weight
    when the plan gives it another setting) that already has at most
    2**bits - 1 distinct non-zero values (a stripped model) is taken as is;
    otherwise the operator is applied first. Non-finite weights are refused.
    """
    tensors = compressible_tensors(model)
    configs, quantized, reset = _layer_configs(model, plan, tensors)
    out = {}
    for name, cfg in configs.items():
        with torch.no_grad():
            w = _source_weight(tensors[name], name in reset).detach().float().cpu()
        flat = w.reshape(-1).numpy()
        if not np.isfinite(flat).all():
            raise ClipQError(
                f"layer {name!r} has NaN or infinite weights (a diverged training?); nothing to compress: "
                "fix or reload the model's weights"
            )
        # NaNs counted one by one, as torch.unique does on the device path
        if name not in quantized and np.unique(flat[flat != 0], equal_nan=False).size > 2**cfg.bits - 1:
            w = clipq_quantize(w, cfg.p, cfg.bits)
            flat = w.reshape(-1).numpy()
        out[tensors[name].key] = (cfg, flat, tuple(w.shape))
    return out


def _dense_tensors(model: nn.Module, skip: set[str]) -> list[tuple[str, torch.Tensor, bool]]:
    """Every state-dict entry but the ``skip`` keys: (key, tensor, whether it is a parameter)."""
    params = {n for n, _ in model.named_parameters()}
    # a parametrized weight's parameter is ``<module>.parametrizations.<attr>.original``; its key is ``<module>.<attr>``
    params |= {re.sub(r"\.parametrizations\.([^.]+)\.original$", r".\1", n) for n in params}
    out = []
    for key, t in model.state_dict().items():
        if key not in skip:
            out.append((key, t.detach().cpu(), key in params))
    return out


def _dense_dtype(t: torch.Tensor) -> int:
    return 0 if t.is_floating_point() else _DTYPE_CODE.get(t.dtype, 1)


def _plan_file(
    model: nn.Module, plan: Plan | Mapping[str, object] | None, *, write: bool
) -> tuple[SizeEstimate, bytes]:
    require_module(model)
    compressed = _compressed_weights(model, plan)
    buf = io.BytesIO() if write else None
    sizes: list[LayerSize] = []
    original = 0
    order: list[tuple[str, object]] = []
    dense = {d[0]: d for d in _dense_tensors(model, set(compressed))}
    for key in model.state_dict():
        if key in compressed:
            order.append((key, compressed[key]))
        elif key in dense:
            order.append((key, dense[key]))
    if buf is not None:
        buf.write(_HEADER.pack(MAGIC, FORMAT_VERSION, len(order)))
    for key, item in order:
        name_b = key.encode("utf-8")
        if isinstance(item, tuple) and isinstance(item[0], LayerConfig):
            cfg, flat, shape = item  # type: ignore[misc]
            if buf is not None:
                codebook, codes, gaps = _codes_and_gaps(flat, cfg.bits, key)
            else:  # sizing alone needs only where the non-zeros are
                gaps = _gaps(np.flatnonzero(flat))
            tail = _tail(gaps, flat.size)
            k, entries = _best_k(gaps, cfg.bits, tail)
            nbytes = _sparse_size(key, len(shape), cfg.bits, k, entries)
            sizes.append(
                LayerSize(key, shape, flat.size, True, True, cfg.p, cfg.bits, k, int(gaps.size), entries, nbytes)
            )
            original += 4 * flat.size
            if buf is not None:
                buf.write(struct.pack("<H", len(name_b)) + name_b)
                buf.write(struct.pack("<BBB", _KIND_SPARSE, 0, len(shape)) + struct.pack(f"<{len(shape)}I", *shape))
                buf.write(_SPARSE_HEAD.pack(cfg.bits, k, cfg.p, entries))
                buf.write(codebook.astype("<f4").tobytes())
                payload = _pack(codes, gaps, cfg.bits, k, tail)
                assert len(payload) == math.ceil(entries * (cfg.bits + k) / 8)
                buf.write(payload)
        else:
            _, t, is_param = item  # type: ignore[misc]
            code = _dense_dtype(t)
            shape = tuple(t.shape)
            data_bytes = t.numel() * np.dtype(_DTYPES[code][1]).itemsize
            nbytes = _record_head_size(key, len(shape)) + data_bytes
            sizes.append(LayerSize(key, shape, t.numel(), is_param, False, None, None, None, t.numel(), 0, nbytes))
            if is_param:
                original += 4 * t.numel()
            if buf is not None:
                flags = 0 if is_param else _FLAG_BUFFER
                buf.write(struct.pack("<H", len(name_b)) + name_b)
                buf.write(
                    struct.pack("<BBB", _KIND_DENSE | flags, code, len(shape)) + struct.pack(f"<{len(shape)}I", *shape)
                )
                arr = t.to(_DTYPES[code][0]).contiguous().numpy().astype(_DTYPES[code][1], copy=False)
                buf.write(arr.tobytes())
    total = _HEADER.size + sum(s.bytes for s in sizes) + 4
    data = b""
    if buf is not None:
        body = buf.getvalue()
        data = body + struct.pack("<I", zlib.crc32(body))
        assert len(data) == total, (len(data), total)
    return SizeEstimate(tuple(sizes), total, original), data


def _layer_counts(w: torch.Tensor) -> torch.Tensor:
    """What sizes one compressed layer, computed where ``w`` lives: int64 ``(19,)``.

    ``[distinct non-zero values, non-zeros, zeros after the last non-zero,
    sum((gap - 1) >> k) for k in 1..16]``, the gaps being those of
    ``_gaps``. No value is read back to the host here.
    """
    flat = w.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.zeros(3 + len(K_RANGE), dtype=torch.int64, device=flat.device)
    nonzero = flat != 0
    ordered = torch.sort(flat.float()).values
    distinct = (ordered[:1] != 0).sum() + ((ordered[1:] != ordered[:-1]) & (ordered[1:] != 0)).sum()
    index = torch.arange(n, device=flat.device)
    last = torch.cummax(torch.where(nonzero, index, -1), dim=0).values  # latest non-zero at or before each index
    previous = torch.cat([last.new_full((1,), -1), last[:-1]])
    g1 = torch.where(nonzero, index - previous - 1, 0)  # gap - 1 at the non-zeros, 0 elsewhere
    shifted = [(g1 >> k).sum() for k in K_RANGE]
    return torch.stack([distinct, nonzero.sum(), (n - 1 - last[-1]), *shifted]).to(torch.int64)


def _size_from_counts(key: str, shape: tuple[int, ...], cfg: LayerConfig, counts: list[int]) -> LayerSize:
    """A compressed layer's :class:`LayerSize` from :func:`_layer_counts` (the k choice of ``_best_k``)."""
    distinct, kept, tail, *shifted = counts
    n_levels = 2**cfg.bits - 1
    if distinct > n_levels:
        raise ValueError(f"layer {key!r} has {distinct} distinct non-zero values, more than 2**{cfg.bits} - 1")
    best: tuple[int, int, int] | None = None
    for k, s in zip(K_RANGE, shifted, strict=True):
        entries = s + kept + (tail >> k)
        nbytes = math.ceil(entries * (cfg.bits + k) / 8)
        if best is None or nbytes < best[0]:
            best = (nbytes, k, entries)
    assert best is not None
    _, k, entries = best
    numel = math.prod(shape)
    nbytes = _sparse_size(key, len(shape), cfg.bits, k, entries)
    return LayerSize(key, shape, numel, True, True, cfg.p, cfg.bits, k, kept, entries, nbytes)


def _estimate(model: nn.Module, plan: Plan | Mapping[str, object] | None) -> SizeEstimate:
    """``estimate_size`` on the model's own device: one read of all layers' counts at the end.

    Attached layers are counted from their pruned-quantized weight as it is
    (their operator guarantees the levels); a layer the ``plan`` names, unless
    with its attached setting, is checked first, as ``_compressed_weights``
    does (one read for it).
    """
    require_module(model)
    tensors = compressible_tensors(model)
    configs, quantized, reset = _layer_configs(model, plan, tensors)
    compressed: dict[str, tuple[LayerConfig, tuple[int, ...]]] = {}
    counts: list[torch.Tensor] = []
    with torch.no_grad():
        for name, cfg in configs.items():
            w = _source_weight(tensors[name], name in reset).detach()
            if name not in quantized and torch.unique(w[w != 0]).numel() > 2**cfg.bits - 1:
                w = clipq_quantize(w.float(), cfg.p, cfg.bits)
            compressed[tensors[name].key] = (cfg, tuple(w.shape))
            counts.append(_layer_counts(w))
    # the one wait for the device: every layer's numbers at once
    read = torch.stack([c.to(counts[0].device) for c in counts]).tolist() if counts else []
    by_key = dict(zip(compressed, read, strict=True))
    params = {n for n, _ in model.named_parameters()}
    params |= {re.sub(r"\.parametrizations\.([^.]+)\.original$", r".\1", n) for n in params}
    sizes: list[LayerSize] = []
    original = 0
    for key, t in model.state_dict().items():
        if key in compressed:
            cfg, shape = compressed[key]
            sizes.append(_size_from_counts(key, shape, cfg, by_key[key]))
            original += 4 * sizes[-1].numel
            continue
        code = _dense_dtype(t)
        shape = tuple(t.shape)
        nbytes = _record_head_size(key, len(shape)) + t.numel() * np.dtype(_DTYPES[code][1]).itemsize
        is_param = key in params
        sizes.append(LayerSize(key, shape, t.numel(), is_param, False, None, None, None, t.numel(), 0, nbytes))
        original += 4 * t.numel() if is_param else 0
    total = _HEADER.size + sum(s.bytes for s in sizes) + 4
    return SizeEstimate(tuple(sizes), total, original)


def estimate_size(model: nn.Module, plan: Plan | Mapping[str, object] | None = None) -> SizeEstimate:
    """Bytes of the ``.clipq`` file ``save_compressed(model, path, plan)`` would write, without writing it.

    A model on a GPU is sized there (the host reads all layers' numbers
    once); on the CPU, numpy's path of the writer is as fast. Both give the
    writer's byte counts.
    """
    require_module(model)
    if any(p.device.type != "cpu" for p in model.parameters()):
        return _estimate(model, plan)
    return _plan_file(model, plan, write=False)[0]


def save_compressed(
    model: nn.Module, path: str | Path, plan: Plan | Mapping[str, object] | None = None
) -> SizeEstimate:
    """Write ``model`` as a ``.clipq`` file (atomically) and return its sizes.

    Compressed layers are those carrying CLIP-Q (``attach_clipq``) plus those
    the ``plan`` names; every other tensor of the state dict is stored dense.
    """
    est, data = _plan_file(model, plan, write=True)
    write_bytes(path, data)
    return est


# -- reading -------------------------------------------------------------------------------


CLIPQ_FILE_LIMIT = 64 << 30  # the largest .clipq file read (its bytes are held in memory while decoding)
_MAX_NDIM = 32


class _Reader:
    def __init__(self, data: memoryview, path: str) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise FormatError(f"{self.path} is truncated (while reading {what}); re-copy or re-create the file")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple:
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size, what))


@dataclass(frozen=True)
class _Record:
    """One record's header and where its data lies in the file (nothing decoded yet)."""

    name: str
    kind: int
    dtype_code: int
    shape: tuple[int, ...]
    numel: int
    start: int  # offset of the record in the file
    end: int  # offset after it
    data: memoryview  # dense values, or a sparse record's packed entries
    sparse: tuple[int, int, float, int] | None = None  # bits, k, p, entries
    codebook: np.ndarray | None = None


def _check_fits_in_memory(path: Path, name: str, shape: tuple[int, ...], numel: int) -> None:
    """A sparse record's dense tensor is not in the file: refuse one larger than the free memory, in one line
    (a corrupted or crafted shape would otherwise take the machine's memory)."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not on this platform: no check
        return
    need = 4 * numel  # the decoded values (the tensor shares their memory)
    if need > free:
        raise FormatError(
            f"{path}: record {shown(name)} has shape {clip(str(list(shape)))}, {need / 2**30:.1f} GiB to decode with "
            f"{free / 2**30:.1f} GiB of memory free; the file is corrupted, or needs a larger machine"
        )


def _layout(body: memoryview, count: int, path: Path) -> list[_Record]:
    """Every record's header, checked against the file before anything is allocated.

    The records must exactly fill the body; a dense record's values must be in
    the file; a sparse record's entries must be able to reach the end of the
    shape it declares (``numel <= (entries + 1) * 2**k``, which the writer's
    trailing fillers guarantee), so a few bytes can never ask for gigabytes.
    """
    r = _Reader(body, str(path))
    r.pos = _HEADER.size
    if count > (len(body) - _HEADER.size) // 5:  # a record takes at least 5 bytes
        raise FormatError(f"{path} declares {count:,} records, more than its size holds; the file is corrupted")
    out: list[_Record] = []
    seen: set[str] = set()
    for _ in range(count):
        start = r.pos
        (n,) = r.unpack("<H", "a name length")
        name = bytes(r.take(n, "a name")).decode("utf-8")
        if name in seen:
            raise FormatError(f"{path} holds record {shown(name)} twice; the file is corrupted")
        seen.add(name)
        kind, dtype_code, ndim = r.unpack("<BBB", "a record header")
        if ndim > _MAX_NDIM:
            raise FormatError(f"{path}: record {shown(name)} has {ndim} dimensions; the file is corrupted")
        shape = tuple(r.unpack(f"<{ndim}I", "a shape")) if ndim else ()
        numel = math.prod(shape)
        if kind & 0x7F == _KIND_SPARSE:
            bits, k, p, entries = r.unpack(_SPARSE_HEAD.format, "a sparse header")
            if not 2 <= bits <= 8 or k not in K_RANGE:
                raise FormatError(f"{path}: record {shown(name)} has bits={bits}, k={k}; the file is corrupted")
            reach = (entries + 1) << k
            if numel > reach:
                raise FormatError(
                    f"{path}: record {shown(name)} declares shape {clip(str(list(shape)))} ({numel:,} values) but "
                    f"its {entries:,} entries reach at most {reach:,}; the file is corrupted"
                )
            codebook = np.frombuffer(r.take(4 * (2**bits - 1), "a codebook"), dtype="<f4")
            payload = r.take(math.ceil(entries * (bits + k) / 8), "packed entries")
            out.append(_Record(name, kind, 0, shape, numel, start, r.pos, payload, (bits, k, p, entries), codebook))
        elif kind & 0x7F == _KIND_DENSE and dtype_code in _DTYPES:
            raw = r.take(numel * np.dtype(_DTYPES[dtype_code][1]).itemsize, "tensor data")
            out.append(_Record(name, kind, dtype_code, shape, numel, start, r.pos, raw))
        else:
            raise FormatError(
                f"{path}: record {shown(name)} has unknown kind {kind}/{dtype_code}; the file is corrupted"
            )
    if r.pos != len(body):
        raise FormatError(f"{path} has {len(body) - r.pos} unexpected trailing bytes; the file is corrupted")
    for rec in out:
        if rec.sparse is not None:
            _check_fits_in_memory(path, rec.name, rec.shape, rec.numel)
    return out


def read_compressed(path: str | Path) -> tuple[dict[str, torch.Tensor], SizeEstimate]:
    """Decode a ``.clipq`` file into a state dict and its per-tensor sizes.

    Raises ``FormatError`` (one line) for a foreign, truncated or corrupted
    file. Only a regular file is read, and the whole layout is checked before
    any tensor is made: memory use is the file plus the tensors it holds.
    """
    path = Path(path)
    try:
        data = read_regular(path, CLIPQ_FILE_LIMIT, ".clipq file")
    except FileNotFoundError:
        raise FormatError(f"{path} does not exist; give the path of a .clipq file") from None
    except IsADirectoryError:
        raise FormatError(f"{path} is a directory; give the path of a .clipq file") from None
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise FormatError(f"{path} is not a .clipq file (wrong magic); write one with save_compressed or `final`")
    if len(data) < _HEADER.size + 4:
        raise FormatError(f"{path} is truncated ({len(data)} bytes); re-copy or re-create the file")
    _, version, count = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise FormatError(f"{path} has format version {version}; this clipq-search reads version {FORMAT_VERSION}")
    body = memoryview(data)[:-4]
    (crc,) = struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        raise FormatError(f"{path} is corrupted or truncated (checksum mismatch); re-copy or re-create the file")
    state: dict[str, torch.Tensor] = {}
    sizes: list[LayerSize] = []
    original = 0
    try:
        for rec in _layout(body, count, path):
            if rec.sparse is not None:
                bits, k, p, entries = rec.sparse
                assert rec.codebook is not None
                flat = _unpack(rec.data, entries, bits, k, rec.numel, rec.codebook)
                state[rec.name] = torch.from_numpy(flat.reshape(rec.shape))
                kept = int(np.count_nonzero(flat))
                sizes.append(
                    LayerSize(
                        rec.name, rec.shape, rec.numel, True, True, round(p, 6), bits, k, kept, entries,
                        rec.end - rec.start,
                    )
                )
                original += 4 * rec.numel
            else:
                torch_dtype, np_dtype = _DTYPES[rec.dtype_code]
                arr = np.frombuffer(rec.data, dtype=np_dtype).reshape(rec.shape).copy()
                state[rec.name] = torch.from_numpy(arr).to(torch_dtype)
                is_param = not rec.kind & _FLAG_BUFFER
                sizes.append(
                    LayerSize(
                        rec.name, rec.shape, rec.numel, is_param, False, None, None, None, rec.numel, 0,
                        rec.end - rec.start,
                    )
                )
                original += 4 * rec.numel if is_param else 0
    except (UnicodeDecodeError, ValueError, struct.error) as exc:
        if isinstance(exc, FormatError):
            raise
        raise FormatError(f"{path} is corrupted ({clip(str(exc))}); re-copy or re-create the file") from None
    return state, SizeEstimate(tuple(sizes), len(data), original)


def load_compressed(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict (float tensors as float32) that loads with ``strict=True`` into the original architecture."""
    return read_compressed(path)[0]
