"""The durable log of rounds and pushes: SQLite in WAL mode with ``synchronous=FULL``.

A push is acknowledged only after :meth:`Store.record_push` has committed it: in WAL mode
with ``synchronous=FULL`` the commit returns after the write-ahead log is fsynced, so an
acknowledged push survives ``kill -9`` (and a power cut). The payload itself is logged, so
on restart the server rebuilds every open round's running sum by decoding the logged
pushes; the primary key (round_id, client_id) makes it impossible to count a push twice.
Closing a round stores its float32 mean, so a closed round needs no re-decoding: in the file
``means/<round_id>.f32`` (fsynced before the close commits; a 4 MiB blob cost SQLite
~20 ms of CPU, a file write ~2 ms), marked in the ``mean`` column by an empty blob (logs
written before that hold the mean in the column itself).

One connection is shared by the server's threads under a lock; SQLite serializes writers
anyway. Pushes are logged by group commit: concurrent :meth:`Store.record_push` calls queue
their rows, and whichever caller holds the write lock next inserts every queued row in one
transaction, so one fsync makes a whole group durable. Each caller returns only once the
transaction holding its row committed (or raises its own row's error).
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    round_id TEXT PRIMARY KEY,
    config TEXT NOT NULL,          -- JSON of RoundConfig
    state TEXT NOT NULL,           -- 'open' or 'closed'
    close_reason TEXT NOT NULL DEFAULT '',
    mean BLOB                      -- b'': in means/<round_id>.f32; older logs: the bytes
);
CREATE TABLE IF NOT EXISTS pushes (
    round_id TEXT NOT NULL,
    client_id TEXT NOT NULL,       -- decimal uint64 (SQLite integers are signed)
    weight REAL NOT NULL,
    sha256 TEXT NOT NULL,
    payload BLOB NOT NULL,         -- the serialized EncodedUpdate, exactly as received
    seq INTEGER NOT NULL,          -- arrival order within the round
    PRIMARY KEY (round_id, client_id)
);
"""


@dataclass(frozen=True)
class LoggedPush:
    """One push as recorded in the log."""

    client_id: int
    weight: float
    sha256: str
    nbytes: int
    payload: bytes  # b"" when read without payloads


@dataclass(frozen=True)
class LoggedRound:
    """One round as recorded in the log (its config is the JSON the rounds module wrote)."""

    round_id: str
    config: dict
    state: str
    close_reason: str


@dataclass
class _QueuedPush:
    """A row waiting for the next group commit; `error` is set if it was not logged."""

    row: tuple
    committed: bool = False
    error: BaseException | None = field(default=None, repr=False)


class Store:
    """The SQLite log under ``data_dir/fedquant.sqlite3``."""

    __slots__ = ("path", "means", "_db", "_lock", "_owner", "_queue", "_queue_lock")

    def __init__(self, data_dir: str | pathlib.Path):
        data_dir = pathlib.Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        # One server per data directory; the kernel drops the lock when the process dies.
        self._owner = open(data_dir / "lock", "a")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(self._owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._owner.close()
            raise RuntimeError(f"{data_dir} is in use by another fedquant server") from None
        self.path = data_dir / "fedquant.sqlite3"
        self.means = data_dir / "means"
        self.means.mkdir(exist_ok=True)
        self._lock = threading.Lock()  # the connection, and so the single writer
        self._queue: list[_QueuedPush] = []  # pushes waiting for a group commit
        self._queue_lock = threading.Lock()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one short transaction each.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        # 64 KiB pages for a new log (an existing one keeps its own): a 256 KiB payload is
        # 4 overflow pages instead of 64, which halves the CPU of logging it.
        self._db.execute("PRAGMA page_size=65536")
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: could not enable WAL mode (got {mode!r})")
        # FULL: every commit fsyncs the WAL before returning, so an ack implies durability.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._owner.close()

    def _write(self, sql: str, args: tuple) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(sql, args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ---- writes (each one a durable transaction) -------------------------------------
    def add_round(self, round_id: str, config: dict) -> None:
        """Record a new open round; sqlite3.IntegrityError if the id exists."""
        self._write("INSERT INTO rounds (round_id, config, state) VALUES (?, ?, 'open')",
                    (round_id, json.dumps(config, sort_keys=True)))

    def record_push(self, round_id: str, client_id: int, weight: float, sha256: str,
                    payload: bytes, seq: int) -> None:
        """Durably log one push; sqlite3.IntegrityError if the client already pushed.

        Group commit: the row is queued; the first caller to get the write lock logs every
        queued row in one transaction (one fsync) and the others find theirs committed.
        """
        mine = _QueuedPush((round_id, str(client_id), weight, sha256, payload, seq))
        with self._queue_lock:
            self._queue.append(mine)
        with self._lock:
            if not mine.committed and mine.error is None:
                with self._queue_lock:
                    group, self._queue = self._queue, []
                self._commit_group(group)
        if mine.error is not None:
            raise mine.error

    def _commit_group(self, group: list[_QueuedPush]) -> None:
        """Insert the rows in one transaction (caller holds the write lock). A row that
        fails (duplicate key) fails alone; a failed COMMIT fails the whole group."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for queued in group:
                try:
                    self._db.execute("INSERT INTO pushes (round_id, client_id, weight, sha256, "
                                     "payload, seq) VALUES (?, ?, ?, ?, ?, ?)", queued.row)
                except sqlite3.IntegrityError as e:  # this statement alone was undone
                    queued.error = e
            self._db.execute("COMMIT")
        except BaseException as e:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            for queued in group:
                queued.error = queued.error or e
            return
        for queued in group:
            queued.committed = queued.error is None

    def close_round(self, round_id: str, reason: str, mean: bytes | None) -> None:
        """Mark a round closed and store its mean (float32 bytes, None if no pushes).

        The mean file is durable (written, fsynced, renamed, directory fsynced) before the
        close commits; a crash in between leaves the round open and the file overwritten at
        the next close."""
        if mean is not None:
            path = self._mean_path(round_id)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(mean)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            directory = os.open(self.means, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        self._write("UPDATE rounds SET state = 'closed', close_reason = ?, mean = ? "
                    "WHERE round_id = ?", (reason, None if mean is None else b"", round_id))

    def _mean_path(self, round_id: str) -> pathlib.Path:
        return self.means / f"{round_id}.f32"  # round ids are [A-Za-z0-9_.-]{1,128}

    # ---- reads -------------------------------------------------------------------------
    def rounds(self) -> list[LoggedRound]:
        with self._lock:
            rows = self._db.execute(
                "SELECT round_id, config, state, close_reason FROM rounds").fetchall()
        return [LoggedRound(r, json.loads(c), s, why) for r, c, s, why in rows]

    def pushes(self, round_id: str, with_payload: bool = True) -> Iterator[LoggedPush]:
        """The round's pushes in arrival order (payloads read one at a time)."""
        with self._lock:
            keys = self._db.execute(
                "SELECT client_id, weight, sha256, length(payload) FROM pushes "
                "WHERE round_id = ? ORDER BY seq", (round_id,)).fetchall()
        for client_id, weight, sha256, nbytes in keys:
            payload = b""
            if with_payload:
                with self._lock:
                    payload = self._db.execute(
                        "SELECT payload FROM pushes WHERE round_id = ? AND client_id = ?",
                        (round_id, client_id)).fetchone()[0]
            yield LoggedPush(int(client_id), weight, sha256, nbytes, payload)

    def mean(self, round_id: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT mean FROM rounds WHERE round_id = ?",
                                   (round_id,)).fetchone()
        if row is None or row[0] is None:
            return None
        return row[0] if len(row[0]) else self._mean_path(round_id).read_bytes()
