"""The ``local`` store: counts shared by every worker process of this machine, in SQLite.

Why SQLite: it is in the standard library, safe across processes (its own
file locking), and one short ``BEGIN IMMEDIATE`` transaction makes a
request's read-decide-write atomic against every other worker. The
database lives in memory-backed ``/dev/shm`` where there is one (the system
temp folder otherwise), in WAL mode without syncs: counts are meant to be
fast and shared, not to survive a reboot. ``local:PATH`` names another file
(forkproxy instances on one machine that should not share counts).

Under gevent a SQLite call does not yield; a transaction takes tens of
microseconds, and the wait for another process's lock is bounded by
``limits_timeout`` (SQLite's busy timeout), after which the store counts as
failed for that request (fail open or closed, as set).
"""
from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from typing import Sequence

from .gcra import Decision, Limit, charged, decide

_SWEEP_EVERY = 300.0  # seconds between deletions of rows whose bucket is full again


def default_path() -> str:
    folder = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return os.path.join(folder, f"forkproxy-limits-{os.getuid()}.sqlite3")


class LocalStore:
    def __init__(self, path: str | None, timeout: float) -> None:
        self.path = path or default_path()
        self.timeout = timeout
        self._db: sqlite3.Connection | None = None
        self._pid = 0
        self._swept = 0.0

    def _connection(self) -> sqlite3.Connection:
        """This process's connection (a forked child opens its own: SQLite connections do not cross fork)."""
        if self._db is None or self._pid != os.getpid():
            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=OFF")
            db.execute("CREATE TABLE IF NOT EXISTS limits (id TEXT PRIMARY KEY, tat REAL NOT NULL, "
                       "interval REAL NOT NULL) WITHOUT ROWID")
            self._db, self._pid, self._swept = db, os.getpid(), time.time()
        return self._db

    def take(self, ids: Sequence[str], limits: Sequence[Limit]) -> Decision:
        db = self._connection()
        now = time.time()
        with _transaction(db):
            marks = ",".join("?" * len(ids))
            found = dict(db.execute(f"SELECT id, tat FROM limits WHERE id IN ({marks})", ids).fetchall())
            decision, tats = decide(limits, [found.get(i) for i in ids], now)
            if decision.allowed:
                db.executemany("INSERT OR REPLACE INTO limits VALUES (?, ?, ?)",
                               [(i, tat, limit.interval) for i, tat, limit in zip(ids, tats, limits) if limit.cost])
        if now - self._swept > _SWEEP_EVERY:
            self._sweep(db, now)
        return decision

    def charge(self, id_: str, interval: float | None, amount: float) -> None:
        db = self._connection()
        now = time.time()
        with _transaction(db):
            row = db.execute("SELECT tat, interval FROM limits WHERE id = ?", (id_,)).fetchone()
            interval = interval if interval is not None else (row[1] if row else None)
            if interval is None:
                return  # a key no request was ever limited by: nothing to charge against
            tat = charged(row[0] if row else None, interval, amount, now)
            db.execute("INSERT OR REPLACE INTO limits VALUES (?, ?, ?)", (id_, tat, interval))

    def _sweep(self, db: sqlite3.Connection, now: float) -> None:
        self._swept = now
        with _transaction(db):
            db.execute("DELETE FROM limits WHERE tat < ?", (now - 1.0,))


class _transaction:
    """``BEGIN IMMEDIATE`` .. ``COMMIT``, rolled back on any error: the write lock from the first statement on."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, error, tb) -> None:
        if kind is None:
            self.db.execute("COMMIT")
        elif self.db.in_transaction:
            self.db.execute("ROLLBACK")
