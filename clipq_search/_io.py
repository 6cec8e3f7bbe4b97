"""Atomic file writes, and bounded reads of files a user names.

Writes go to a temporary name in the same folder, then are renamed: a crash
never leaves a truncated file where a good one was; readers see either the old
complete file or the new complete file. A temporary left by a killed process
is removed by the next write of the same file.

Reads of user-named files (:func:`read_regular`) take only regular files of a
bounded size: a device such as ``/dev/zero``, a named pipe, or a file larger
than its kind ever is, is one clear error instead of a hang or a MemoryError.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()
_HOST = socket.gethostname().replace("/", "_") or "host"
# A temporary's name: .NAME.PID@HOST.RANDOM.tmp (RANDOM from mkstemp); before PID@HOST: .NAME.RANDOM.tmp
_TEMP_NEW = re.compile(r"(\d+)@(.+)\.[a-z0-9_]+")
_TEMP_OLD = re.compile(r"[a-z0-9_]{8}")
_OLD_TEMP_SECONDS = 3600


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike[str]) -> int:
    """Remove temporaries of ``path`` left by writers that were killed; the number removed.

    A temporary is stale when its writer (the process id and host in its name)
    no longer runs on this host; one named before names held a process id, when
    it is an hour old. Another live writer's temporary is never touched.
    """
    path = Path(path)
    head = f".{path.name}."
    removed = 0
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return 0
    for entry in entries:
        name = entry.name
        if not (name.startswith(head) and name.endswith(".tmp")):
            continue
        middle = name[len(head) : -len(".tmp")]
        new = _TEMP_NEW.fullmatch(middle)
        try:
            if new:
                stale = new.group(2) == _HOST and not _alive(int(new.group(1)))
            else:
                stale = bool(_TEMP_OLD.fullmatch(middle)) and time.time() - entry.stat().st_mtime > _OLD_TEMP_SECONDS
            if stale and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
        except (OSError, ValueError):
            continue
    return removed


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}@{_HOST}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


MiB = 1 << 20
_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
)


def read_regular(path: str | os.PathLike[str], limit: int, what: str) -> bytes:
    """The bytes of the regular file ``path``, of at most ``limit`` bytes.

    A missing file or a folder raises ``FileNotFoundError`` / ``IsADirectoryError``
    (callers word those); anything else that is not a regular file, or a file
    over ``limit``, raises ``ClipQError`` naming ``what`` the file should have been.
    Opening never blocks (a named pipe with no writer is refused, not waited on).
    """
    from clipq_search.errors import ClipQError

    path = Path(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    mode = st.st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise ClipQError(f"{what} {path} is {kind}, not a regular file; give the path of a file")
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(min(st.st_size, limit) + 1)
        parts = [data]
        size = len(data)
        while st.st_size < size <= limit:  # the file grew since it was opened: read on, bounded all the same
            more = fh.read(min(64 * 1024, limit + 1 - size))
            if not more:
                break
            parts.append(more)
            size += len(more)
        if len(parts) > 1:
            data = b"".join(parts)
    if len(data) > limit:
        raise ClipQError(
            f"{what} {path} is larger than {_size(limit)}, more than any {what} holds; check that it is the right file"
        )
    return data


def _size(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n:,} bytes"
