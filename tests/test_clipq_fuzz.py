"""The .clipq reader under corrupted and crafted files: one clear error or a good read, never more.

Random mutations of real files (with the CRC fixed, so the structure checks
are what stands in the way) and hand-made headers that declare huge shapes.
Every read either returns or raises ``FormatError``; none hangs; none
allocates more than a few times the file plus the tensors the genuine file
holds (measured with tracemalloc, which sees numpy's buffers).
"""

from __future__ import annotations

import random
import signal
import struct
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from clipq_search.cli import main as cli_main
from clipq_search.core.encoding import read_compressed, save_compressed
from clipq_search.core.plan import Plan
from clipq_search.errors import FormatError
from clipq_search.training.models import build_model

MiB = 1 << 20
SECONDS = 10  # per read: a hang is a failure, not a stuck test run


class _Hang(BaseException):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Hang


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 20), nn.Linear(20, 5)
    )


def _good_files(tmp: Path) -> dict[str, bytes]:
    small = tmp / "small.clipq"
    save_compressed(_small_model(), small, Plan.uniform(0.7, 3))
    torch.manual_seed(0)
    lenet = tmp / "lenet300.clipq"
    save_compressed(build_model("lenet300"), lenet, {"layers": {"fc1": {"p": 0.95, "bits": 2}}, "default": (0.8, 4)})
    return {"small": small.read_bytes(), "lenet300": lenet.read_bytes()}


def _decoded_bytes(data: bytes, tmp: Path) -> int:
    path = tmp / "probe.clipq"
    path.write_bytes(data)
    state, _ = read_compressed(path)
    return sum(t.numel() * t.element_size() for t in state.values())


_INTERESTING_U32 = (0, 1, 2, 7, 8, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1)


def _mutations(data: bytes, rng: random.Random, n: int) -> Iterator[tuple[str, bytes]]:
    """``n`` mutated copies of ``data`` (CRC refreshed in most)."""
    body = data[:-4]
    for i in range(n):
        b = bytearray(body)
        how = rng.choice(("bits", "bytes", "u32", "u16", "u8", "cut", "grow", "splice"))
        if how == "bits":
            for _ in range(rng.randint(1, 8)):
                at = rng.randrange(len(b))
                b[at] ^= 1 << rng.randrange(8)
        elif how == "bytes":
            at = rng.randrange(len(b))
            b[at : at + rng.randint(1, 16)] = rng.randbytes(rng.randint(1, 16))
        elif how == "u32":
            at = rng.randrange(max(1, len(b) - 4))
            b[at : at + 4] = struct.pack("<I", rng.choice(_INTERESTING_U32))
        elif how == "u16":
            at = rng.randrange(max(1, len(b) - 2))
            b[at : at + 2] = struct.pack("<H", rng.choice((0, 1, 255, 256, 65535)))
        elif how == "u8":
            b[rng.randrange(len(b))] = rng.choice((0, 1, 2, 8, 9, 16, 17, 32, 33, 127, 128, 129, 255))
        elif how == "cut":
            del b[rng.randrange(len(b)) :]
        elif how == "grow":
            at = rng.randrange(len(b))
            b[at:at] = rng.randbytes(rng.randint(1, 64))
        else:
            a, c = sorted(rng.randrange(len(b)) for _ in range(2))
            b[a:a] = b[a:c][:256]
        out = _with_crc(bytes(b)) if i % 10 else bytes(b) + data[-4:]  # every tenth keeps the stale CRC
        yield how, out


def _crafted() -> Iterator[tuple[str, bytes]]:
    """Headers written by hand: each declares more than its bytes can hold, or breaks a rule."""

    def record(name: bytes, kind: int, dtype: int, shape: tuple[int, ...], rest: bytes) -> bytes:
        return struct.pack("<H", len(name)) + name + struct.pack("<BBB", kind, dtype, len(shape)) + \
            struct.pack(f"<{len(shape)}I", *shape) + rest

    def file(*records: bytes, count: int | None = None) -> bytes:
        head = b"CLIPQ\0" + struct.pack("<HI", 1, len(records) if count is None else count)
        return _with_crc(head + b"".join(records))

    def sparse(bits: int, k: int, entries: int, payload: bytes = b"") -> bytes:
        return struct.pack("<BBfI", bits, k, 0.5, entries) + bytes(4 * (2**bits - 1)) + payload

    # the issue's files of about 50 bytes: a sparse layer of 1.5e9 and of 4e8 values with no entries
    yield "sparse-50000x30000", file(record(b"w", 1, 0, (50000, 30000), sparse(2, 4, 0)))
    yield "sparse-20000x20000", file(record(b"w", 1, 0, (20000, 20000), sparse(2, 4, 0)))
    yield "sparse-k16-few-entries", file(record(b"w", 1, 0, (20000, 20000), sparse(2, 16, 4, bytes(9))))
    yield "dense-huge-shape", file(record(b"w", 0, 0, (2**32 - 1, 2**32 - 1), b""))
    yield "dense-int64-huge", file(record(b"w", 0, 1, (1 << 30,), bytes(64)))
    yield "ndim-255", file(record(b"w", 0, 0, (1,) * 255, bytes(4)))
    yield "count-4e9", file(record(b"w", 0, 0, (1,), bytes(4)), count=2**32 - 1)
    yield "name-65535", file(struct.pack("<H", 65535) + b"x" * 100)
    yield "name-not-utf8", file(record(b"\xff\xfe", 0, 0, (1,), bytes(4)))
    yield "twice", file(record(b"w", 0, 0, (1,), bytes(4)), record(b"w", 0, 0, (1,), bytes(4)))
    yield "bits-1", file(record(b"w", 1, 0, (4,), sparse(1, 2, 0)))
    yield "bits-9", file(record(b"w", 1, 0, (4,), struct.pack("<BBfI", 9, 2, 0.5, 0)))
    yield "k-0", file(record(b"w", 1, 0, (4,), sparse(2, 0, 0)))
    yield "k-17", file(record(b"w", 1, 0, (4,), sparse(2, 17, 0)))
    yield "entries-4e9", file(record(b"w", 1, 0, (4,), sparse(2, 2, 2**32 - 1)))
    yield "entries-past-the-end", file(record(b"w", 1, 0, (4,), sparse(2, 4, 8, b"\xff" * 6)))
    yield "kind-unknown", file(record(b"w", 5, 0, (4,), bytes(16)))
    yield "dtype-unknown", file(record(b"w", 0, 9, (4,), bytes(16)))
    yield "trailing-bytes", file(record(b"w", 0, 0, (1,), bytes(4) + b"junk"))
    yield "no-records-but-bytes", file(b"\x00" * 40, count=0)


def _read(path: Path) -> tuple[str, int, float]:
    """(outcome, peak bytes allocated, seconds) of one read."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, SECONDS)
    tracemalloc.start()
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    try:
        read_compressed(path)
        outcome = "read"
    except FormatError:
        outcome = "refused"
    except _Hang:
        outcome = "hang"
    finally:
        seconds = time.perf_counter() - t0
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return outcome, peak, seconds


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes], dict[str, int]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    files = _good_files(tmp)
    return tmp, files, {k: _decoded_bytes(v, tmp) for k, v in files.items()}


@pytest.mark.parametrize(("which", "n", "seed"), [("small", 600, 1), ("lenet300", 60, 2)])
def test_mutated_files_are_read_or_refused_within_bounds(good, which: str, n: int, seed: int) -> None:
    tmp, files, decoded = good
    rng = random.Random(seed)
    path = tmp / f"mutant-{which}.clipq"
    outcomes: dict[str, int] = {}
    worst = 0.0
    for how, data in _mutations(files[which], rng, n):
        path.write_bytes(data)
        outcome, peak, seconds = _read(path)  # anything but FormatError propagates: a crash fails the test
        assert outcome != "hang", f"{how}: the read did not end within {SECONDS} s"
        # the file itself (held while decoding), the tensors the genuine file holds, small working space
        allowed = 2 * len(data) + 3 * decoded[which] + 2 * MiB
        assert peak <= allowed, f"{how}: {peak:,} bytes allocated for a {len(data):,}-byte file ({outcome})"
        assert seconds < SECONDS
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        worst = max(worst, peak / (len(data) + decoded[which]))
    assert outcomes.get("refused", 0) > n // 2, outcomes  # the mutations do reach the checks


@pytest.mark.parametrize(("name", "data"), list(_crafted()), ids=[n for n, _ in _crafted()])
def test_crafted_headers_are_refused_without_allocating(tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / f"{name}.clipq"
    path.write_bytes(data)
    outcome, peak, seconds = _read(path)
    assert outcome == "refused", f"{name}: {outcome}"
    assert peak <= 4 * len(data) + 256 * 1024, f"{name}: {peak:,} bytes allocated for {len(data)} bytes"
    assert seconds < 2


def test_the_issues_tiny_huge_file_is_one_line_through_inspect(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """It used to pass the free-memory check and end in a MemoryError traceback (or report a 30,188,679x rate)."""
    name, data = next(_crafted())
    assert len(data) < 60
    path = tmp_path / "crafted.clipq"
    path.write_bytes(data)
    assert cli_main(["inspect", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "entries reach at most" in lines[0], captured.err
