"""The ``local`` store: counts shared by every worker process of this machine, in LMDB.

Why LMDB (the ``lmdb`` package): a memory-mapped key-value store made for
many processes at once, with transactions (a request's read-decide-write is
one write transaction, serialized across processes by LMDB's own robust
mutex, so N workers never let N times the rate through, and a worker killed
mid-transaction does not leave the lock held). A write transaction costs
about a microsecond. SQLite, the standard library's candidate, was built
first and measured: its ``BEGIN IMMEDIATE`` transaction added ~50 us of CPU to
a proxied request in one process and ~90 us under gunicorn, against the 10%
of a small GET (~30 us) a limit may cost; the standard library has nothing
else that is atomic across processes.

The file lives where only this user can reach it (``paths``), in memory
where there is one, without syncs: counts are meant to be fast and shared,
not to survive a reboot. ``local:PATH`` names another file (for forkproxy
instances on one machine that must not share counts).

Each limit is one record: the key's digest, rate and per (so all of a key's
limits sit side by side, and a charge by key finds them with one cursor),
holding its TAT and stamp (``gcra.State``). The map's size is fixed, so
clients that make up keys must not be able to fill it: a record is swept
out once it is no longer ``live`` (its bucket is full again and ``per`` has
passed since it was written), a few records looked at for each new one; the
store counts as full at ``capacity()`` records, far below what
LMDB itself could hold, so existing records are always updated in place.
While it is full of live records, a new one is refused (``StoreFull``: a
failure of that request alone) and every stored limit stays enforced.
"""
from __future__ import annotations

import os
import struct
import time
from typing import Sequence

import lmdb

from forkproxy.limits import paths
from forkproxy.limits.gcra import Decision, Limit, State, charged, decide, interval_of, key_digest, live

MAP_SIZE = 128 * 1024 * 1024  # sparse: memory is used only as records are written
# Room counted per record: a full LMDB map of these records holds one per ~90-110 bytes
# (measured); the rest is left to LMDB's copy-on-write pages. LMDB_OWN: its own pages
# (meta, free list, branches) whatever the size.
ENTRY_ROOM = 256
LMDB_OWN = 64 * 1024
clock = time.time  # the wall clock: epoch seconds, shared by the workers (tests step it)

_ID = struct.Struct("<16sdd")  # key digest, rate, per
_VALUE = struct.Struct("<dd")  # gcra.State: TAT, stamp
_SWEEP_PER_NEW = 4  # records looked at for each new one: dead ones never outnumber live ones for long
_SWEEP_WHEN_FULL = 512  # records looked at before a new one is refused for want of room


def capacity() -> int:
    """The records the map has room for."""
    return max(0, MAP_SIZE - LMDB_OWN) // ENTRY_ROOM


class StoreFull(Exception):
    """The store holds as many live limits as it has room for: a new one is not stored."""


class LocalStore:
    """The LMDB store shared by one machine's workers; unbounded by ``limits_timeout``: a write waits microseconds."""

    def __init__(self, path: str | None) -> None:
        self.path = path or paths.default_path()
        self._env: lmdb.Environment | None = None
        self._pid = 0
        self._sweep_from = b""

    def _environment(self) -> lmdb.Environment:
        """This process's handle (LMDB handles must not cross fork: a forked child opens its own)."""
        if self._env is None or self._pid != os.getpid():
            paths.prepare(self.path)
            # writemap: a commit writes into the shared map itself, no write() of the pages
            self._env = lmdb.open(self.path, map_size=MAP_SIZE, subdir=False, sync=False, metasync=False,
                                  writemap=True, readahead=False, max_dbs=0, lock=True, mode=0o600)
            self._db, self._capacity, self._pid = self._env.open_db(), capacity(), os.getpid()
        return self._env

    def take(self, limits: Sequence[Limit]) -> Decision:
        ids = [_id(limit) for limit in limits]
        with self._environment().begin(write=True) as txn:
            now = clock()
            stored = {id_: _state(txn.get(id_)) for id_ in ids}
            decision, writes = decide(limits, ids, stored, now)
            self._write(txn, writes, stored, now)
        return decision

    def charge(self, limit: Limit, amount: float) -> None:
        """Take ``amount`` from this very limit (stored if it was not)."""
        id_ = _id(limit)
        with self._environment().begin(write=True) as txn:
            now = clock()
            state = _state(txn.get(id_))
            self._write(txn, {id_: charged(state, limit.interval, amount, now)}, {id_: state}, now)

    def charge_key(self, key: "str | bytes", amount: float) -> int:
        """Take ``amount`` from every live limit stored under ``key``; how many there were."""
        prefix = key_digest(key)
        with self._environment().begin(write=True) as txn:
            now = clock()
            found = []
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for id_, value in cursor:
                    if not id_.startswith(prefix):
                        break
                    found.append((id_, _state(value)))
            taken = 0
            for id_, state in found:
                if not _dead(id_, state, now):
                    _, rate, per = _ID.unpack(id_)
                    txn.put(id_, _VALUE.pack(charged(state, interval_of(rate, per), amount, now), now))
                    taken += 1
        return taken

    def _write(self, txn: lmdb.Transaction, writes: dict, stored: dict, now: float) -> None:
        """Put each TAT by id, stamped ``now``; StoreFull if one not ``stored`` before finds no room."""
        new = [id_ for id_ in writes if stored[id_] is None]
        if new:
            self._make_room(txn, len(new), now)
        try:
            for id_, tat in writes.items():
                txn.put(id_, _VALUE.pack(tat, now))
        except lmdb.MapFullError as exc:  # not expected below the capacity, but never a crash
            raise StoreFull(f"the map is full ({MAP_SIZE} bytes)") from exc

    def _make_room(self, txn: lmdb.Transaction, new: int, now: float) -> None:
        self._sweep(txn, now, _SWEEP_PER_NEW * new)
        if txn.stat(self._db)["entries"] + new > self._capacity:
            self._sweep(txn, now, _SWEEP_WHEN_FULL)
            if txn.stat(self._db)["entries"] + new > self._capacity:
                raise StoreFull(f"{self._capacity} live limits stored, no room for a new one")

    def _sweep(self, txn: lmdb.Transaction, now: float, count: int) -> None:
        """Delete the records no longer live among ``count``, going on from where this process's last sweep ended."""
        cursor = txn.cursor()
        if not cursor.set_range(self._sweep_from) and not cursor.first():
            return
        for _ in range(count):
            id_, value = cursor.item()
            if not id_:  # past the last record
                self._sweep_from = b""
                return
            more = cursor.delete() if _dead(id_, _state(value), now) else cursor.next()
            if not more:
                self._sweep_from = b""
                return
        self._sweep_from = cursor.key()


def _id(limit: Limit) -> bytes:
    return _ID.pack(key_digest(limit.key), limit.rate, limit.per)


def _state(value: bytes | None) -> State | None:
    return _VALUE.unpack(value) if value is not None and len(value) == _VALUE.size else None


def _dead(id_: bytes, state: State | None, now: float) -> bool:
    """Not a live limit: its bucket is full and ``per`` has passed, or it is not a record of this layout at all."""
    return state is None or len(id_) != _ID.size or not live(state, _ID.unpack(id_)[2], now)
