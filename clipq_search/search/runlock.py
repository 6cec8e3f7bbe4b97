"""One command at a time per run: a lock row kept in the run's own storage.

Two ``search`` commands on one run would both count its finished trials and
run the missing ones, mark each other's running trials interrupted and finish
more trials than asked. The lock lives in the same database as the study (a
table ``clipq_run_locks`` beside Optuna's), so it holds across machines when
that database is a server:

- taken by inserting the run's row (primary key: the run's name), with who
  holds it (host, pid) and since when;
- kept alive by a background thread that refreshes the row's heartbeat every
  quarter of the expiry;
- released by deleting the row when the command ends, however it ends short
  of being killed;
- taken over when its heartbeat is older than the expiry
  (``CLIPQ_LOCK_EXPIRY_S``, default 60 s), or at once when the holder ran on
  this machine and its process is gone (a ``kill -9``).

Heartbeats are the holders' wall clocks: the machines' clocks must agree to
well within the expiry (NTP does).
"""

from __future__ import annotations

import contextvars
import functools
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from clipq_search.errors import ClipQError

__all__ = ["DEFAULT_EXPIRY_S", "EXPIRY_ENV", "RunLock", "RunLocked", "hold_run", "releasing_locks"]

TABLE = "clipq_run_locks"
EXPIRY_ENV = "CLIPQ_LOCK_EXPIRY_S"
DEFAULT_EXPIRY_S = 60.0

F = TypeVar("F", bound=Callable[..., Any])


class RunLocked(ClipQError):
    """Another command holds the run."""


def _boot_id() -> str:
    """Tells this machine's running kernel apart from another's (a pid is only meaningful within one)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()[:8]
    except OSError:
        return "-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def expiry_seconds() -> float:
    raw = os.environ.get(EXPIRY_ENV)
    if not raw:
        return DEFAULT_EXPIRY_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ClipQError(f"{EXPIRY_ENV}={raw!r} is not a positive number of seconds; unset it or give e.g. 60")
    return value


def _table(meta: Any) -> Any:
    import sqlalchemy as sa

    return sa.Table(
        TABLE,
        meta,
        sa.Column("name", sa.String(512), primary_key=True),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("boot", sa.String(16), nullable=False),
        sa.Column("command", sa.String(32), nullable=False),
        sa.Column("since", sa.Float, nullable=False),
        sa.Column("heartbeat", sa.Float, nullable=False),
    )


class RunLock:
    """The lock of run ``name`` in the database at ``url``: :meth:`acquire`, then :meth:`release`."""

    def __init__(
        self,
        url: str,
        name: str,
        *,
        command: str = "search",
        host: str | None = None,
        expiry_s: float | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.url, self.name, self.command = url, name, command
        self.host = host or socket.gethostname()
        self.pid = os.getpid()
        self.boot = _boot_id()
        self.holder = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:12]}"
        self.expiry_s = expiry_seconds() if expiry_s is None else expiry_s
        self.log = log or (lambda msg: None)
        self.lost = False
        self._engine: Any = None
        self._table: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- database -------------------------------------------------------------------------

    def _connect(self) -> None:
        import sqlalchemy as sa
        from sqlalchemy.pool import NullPool

        args = {"timeout": 30} if self.url.startswith("sqlite") else {}
        self._engine = sa.create_engine(self.url, poolclass=NullPool, connect_args=args)
        meta = sa.MetaData()
        self._table = _table(meta)
        for attempt in range(3):
            try:
                meta.create_all(self._engine, checkfirst=True)
                return
            except sa.exc.DBAPIError:
                if attempt == 2:  # the table kept failing to appear: a real problem, not a race
                    raise
                time.sleep(0.2)  # two commands creating the table at once: one wins, the other sees it

    def _row(self) -> Any:
        import sqlalchemy as sa

        with self._engine.connect() as conn:
            return conn.execute(sa.select(self._table).where(self._table.c.name == self.name)).first()

    def _try_insert(self, now: float) -> bool:
        import sqlalchemy as sa

        values = {
            "name": self.name, "holder": self.holder, "host": self.host, "pid": self.pid, "boot": self.boot,
            "command": self.command, "since": now, "heartbeat": now,
        }
        try:
            with self._engine.begin() as conn:
                conn.execute(sa.insert(self._table).values(**values))
            return True
        except sa.exc.IntegrityError:
            return False

    def _try_take_over(self, row: Any, now: float) -> bool:
        """Replace ``row``'s holder, only if the row is still that holder's (another taker may be first)."""
        import sqlalchemy as sa

        t = self._table
        with self._engine.begin() as conn:
            res = conn.execute(
                sa.update(t)
                .where(t.c.name == self.name, t.c.holder == row.holder, t.c.heartbeat == row.heartbeat)
                .values(holder=self.holder, host=self.host, pid=self.pid, boot=self.boot, command=self.command,
                        since=now, heartbeat=now)
            )
            return res.rowcount == 1

    def _stale(self, row: Any, now: float) -> str | None:
        """Why ``row``'s holder no longer holds the run, or None while it does."""
        if now - row.heartbeat > self.expiry_s:
            return f"its last heartbeat was {now - row.heartbeat:.0f} s ago"
        if row.host == self.host and row.boot == self.boot and row.pid != self.pid and not _alive(row.pid):
            return f"its process {row.pid} on this machine is gone"
        return None

    # -- the lock ----------------------------------------------------------------------------

    def acquire(self) -> RunLock:
        """Take the run's lock, or raise :class:`RunLocked` naming who holds it; starts the heartbeat."""
        try:
            self._connect()
            for _ in range(5):
                now = time.time()
                if self._try_insert(now):
                    break
                row = self._row()
                if row is None:
                    continue  # released in between: insert again
                why = self._stale(row, now)
                if why is None:
                    raise RunLocked(self._held_message(row, now))
                if self._try_take_over(row, now):
                    self.log(
                        f"took over run {self.name!r} from `{row.command}` (pid {row.pid} on {row.host}): {why}"
                    )
                    break
            else:
                raise RunLocked(f"run {self.name!r} keeps changing hands; try again in a moment")
        except ClipQError:
            self._dispose()
            raise
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy/driver errors vary by backend
            self._dispose()
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise ClipQError(
                f"cannot lock run {self.name!r} in its storage ({first}); check that the database answers "
                "and this user may create tables in it"
            ) from None
        self._thread = threading.Thread(target=self._beat, name=f"runlock-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _held_message(self, row: Any, now: float) -> str:
        since = datetime.fromtimestamp(row.since).strftime("%Y-%m-%d %H:%M:%S")
        return (
            f"run {self.name!r} is in use: `{row.command}` by pid {row.pid} on {row.host} since {since} "
            f"(heartbeat {max(0.0, now - row.heartbeat):.0f} s ago); wait for it to end, or stop it "
            f"(a stopped command's lock expires {self.expiry_s:g} s after its last heartbeat)"
        )

    def _beat(self) -> None:
        import sqlalchemy as sa

        t = self._table
        interval = max(0.1, self.expiry_s / 4)
        while not self._stop.wait(interval):
            try:
                with self._engine.begin() as conn:
                    res = conn.execute(
                        sa.update(t).where(t.c.name == self.name, t.c.holder == self.holder)
                        .values(heartbeat=time.time())
                    )
                if res.rowcount == 0 and not self.lost:
                    self.lost = True
                    self.log(
                        f"warning: run {self.name!r} was taken over by another command (this one's heartbeat "
                        "lapsed); stop one of them"
                    )
            except Exception:  # noqa: BLE001, S112 - a database hiccup: the next beat tries again
                continue

    def release(self) -> None:
        """Stop the heartbeat and delete the row if it is still this command's; never raises."""
        import sqlalchemy as sa

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._engine is not None:
            try:
                t = self._table
                with self._engine.begin() as conn:
                    conn.execute(sa.delete(t).where(t.c.name == self.name, t.c.holder == self.holder))
            except Exception:  # noqa: BLE001 - the lock then expires on its own
                pass
        self._dispose()

    def _dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- holding a lock for the length of a command ---------------------------------------------------------

_held: contextvars.ContextVar[list[RunLock] | None] = contextvars.ContextVar("clipq_run_locks", default=None)


def releasing_locks(fn: F) -> F:
    """Decorate a command: every lock :func:`hold_run` takes inside it is released when it returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = _held.set([])
        try:
            return fn(*args, **kwargs)
        finally:
            for lock in reversed(_held.get() or []):
                lock.release()
            _held.reset(token)

    return wrapper  # type: ignore[return-value]


def hold_run(url: str, name: str, command: str, log: Callable[[str], None] | None = None) -> RunLock:
    """Take run ``name``'s lock in ``url`` until the enclosing :func:`releasing_locks` function ends."""
    held = _held.get()
    if held is None:
        raise RuntimeError("hold_run must be called inside a function decorated with releasing_locks")
    lock = RunLock(url, name, command=command, log=log).acquire()
    held.append(lock)
    return lock
