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

Integrity: a mean file's SHA-256 is recorded in the ``mean`` column (``b"sha256:<hex>"``)
and checked on every read (:class:`StoreError` names the file on a mismatch); replay checks
each logged payload against its recorded digest, and a row that fails any check is moved to
the ``quarantine`` table (round, client, reason) by :meth:`Store.quarantine` instead of
stopping the server. Pushes refused by the norm bound are recorded in ``rejections``.

Permissions: the data directory is 0700 and the log, its WAL and the mean files 0600 (the log
holds every client's payload).

One connection is shared by the server's threads under a lock; SQLite serializes writers
anyway. Pushes are logged by group commit: concurrent :meth:`Store.record_push` calls queue
their rows, and whichever caller holds the write lock next inserts every queued row in one
transaction, so one fsync makes a whole group durable. Each caller returns only once the
transaction holding its row committed (or raises its own row's error).
"""

from __future__ import annotations

import fcntl
import hashlib
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
CREATE TABLE IF NOT EXISTS rejections (
    round_id TEXT NOT NULL,
    client_id TEXT NOT NULL,
    reason TEXT NOT NULL,          -- e.g. the norm bound it exceeded
    PRIMARY KEY (round_id, client_id)
);
CREATE TABLE IF NOT EXISTS quarantine (
    round_id TEXT NOT NULL,
    client_id TEXT NOT NULL,
    reason TEXT NOT NULL,          -- why replay refused the row
    weight REAL,
    sha256 TEXT,
    payload BLOB,
    seq INTEGER
);
"""
_MEAN_TAG = b"sha256:"
_PRIVATE_FILE = 0o600
_PRIVATE_DIR = 0o700


class StoreError(RuntimeError):
    """The log or a mean file is unreadable or corrupt; the message names the file."""


@dataclass(frozen=True)
class LoggedPush:
    """One push as recorded in the log."""

    client_id: int
    weight: float
    sha256: str
    nbytes: int
    payload: bytes  # b"" when read without payloads
    factor: float = 1.0  # clipping factor applied to the update (fedquant.robust)
    key: str = ""  # the client_id column as stored (to quarantine a row whose id is corrupt)


@dataclass(frozen=True)
class LoggedRound:
    """One round as recorded in the log (its config is the JSON the rounds module wrote)."""

    round_id: str
    config: dict | None  # None: the row's config is not valid JSON
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
        try:
            data_dir.mkdir(mode=_PRIVATE_DIR, parents=True, exist_ok=True)
            os.chmod(data_dir, _PRIVATE_DIR)
        except OSError as e:
            raise StoreError(f"{data_dir}: cannot create or restrict the data directory: "
                             f"{e.strerror}") from None
        # One server per data directory; the kernel drops the lock when the process dies.
        self._owner = os.fdopen(os.open(data_dir / "lock", os.O_WRONLY | os.O_CREAT
                                        | os.O_APPEND, _PRIVATE_FILE), "a")
        try:
            fcntl.flock(self._owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._owner.close()
            raise RuntimeError(f"{data_dir} is in use by another fedquant server") from None
        self.path = data_dir / "fedquant.sqlite3"
        self.means = data_dir / "means"
        self.means.mkdir(mode=_PRIVATE_DIR, exist_ok=True)
        os.chmod(self.means, _PRIVATE_DIR)
        self._lock = threading.Lock()  # the connection, and so the single writer
        self._queue: list[_QueuedPush] = []  # pushes waiting for a group commit
        self._queue_lock = threading.Lock()
        # SQLite gives the WAL and shm files the log's own mode: create the log 0600 first.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, _PRIVATE_FILE))
        for path in (self.path, *(self.path.with_name(self.path.name + x)
                                  for x in ("-wal", "-shm"))):
            if path.exists():
                os.chmod(path, _PRIVATE_FILE)
        try:
            self._open_db()
        except sqlite3.DatabaseError as e:
            self._owner.close()
            raise StoreError(f"{self.path}: not a usable fedquant log ({e})") from None

    def _open_db(self) -> None:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one short transaction each.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        # 64 KiB pages for a new log (an existing one keeps its own): a 256 KiB payload is
        # 4 overflow pages instead of 64, which halves the CPU of logging it.
        self._db.execute("PRAGMA page_size=65536")
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"{self.path}: could not enable WAL mode (got {mode!r})")
        # FULL: every commit fsyncs the WAL before returning, so an ack implies durability.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(pushes)")}
        if "factor" not in columns:  # logs written before norm clipping existed
            self._db.execute("ALTER TABLE pushes ADD COLUMN factor REAL NOT NULL DEFAULT 1.0")

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
                    payload: bytes, seq: int, factor: float = 1.0) -> None:
        """Durably log one push; sqlite3.IntegrityError if the client already pushed.

        Group commit: the row is queued; the first caller to get the write lock logs every
        queued row in one transaction (one fsync) and the others find theirs committed.
        """
        mine = _QueuedPush((round_id, str(client_id), weight, sha256, payload, seq, factor))
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
                                     "payload, seq, factor) VALUES (?, ?, ?, ?, ?, ?, ?)",
                                     queued.row)
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

        The mean file is durable (written 0600, fsynced, renamed, directory fsynced) before
        the close commits, and the commit records its SHA-256; a crash in between leaves
        the round open and the file overwritten at the next close."""
        tag = None
        if mean is not None:
            path = self._mean_path(round_id)
            tmp = path.with_name(path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _PRIVATE_FILE)
            with os.fdopen(fd, "wb") as f:
                f.write(mean)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            directory = os.open(self.means, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
            tag = _MEAN_TAG + hashlib.sha256(mean).hexdigest().encode()
        self._write("UPDATE rounds SET state = 'closed', close_reason = ?, mean = ? "
                    "WHERE round_id = ?", (reason, tag, round_id))

    def _mean_path(self, round_id: str) -> pathlib.Path:
        return self.means / f"{round_id}.f32"  # round ids are [A-Za-z0-9_.-]{1,128}

    def set_factor(self, round_id: str, client_id: int, factor: float) -> None:
        """Record the clip factor of a logged push (0: screened out at close)."""
        self._write("UPDATE pushes SET factor = ? WHERE round_id = ? AND client_id = ?",
                    (factor, round_id, str(client_id)))

    def record_rejection(self, round_id: str, client_id: int, reason: str) -> None:
        """Record that a push was refused (e.g. by the norm bound): the round's record."""
        self._write("INSERT OR REPLACE INTO rejections (round_id, client_id, reason) "
                    "VALUES (?, ?, ?)", (round_id, str(client_id), reason))

    def quarantine(self, round_id: str, client_id: int | str, reason: str) -> None:
        """Move a logged push that failed a replay check to the quarantine table
        (`client_id` as an int, or the column's text as stored)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO quarantine (round_id, client_id, reason, weight, sha256, "
                    "payload, seq) SELECT round_id, client_id, ?, weight, sha256, payload, seq "
                    "FROM pushes WHERE round_id = ? AND client_id = ?",
                    (reason, round_id, str(client_id)))
                self._db.execute("DELETE FROM pushes WHERE round_id = ? AND client_id = ?",
                                 (round_id, str(client_id)))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ---- reads -------------------------------------------------------------------------
    def quarantine_round(self, round_id: str, reason: str) -> None:
        """Set aside a round whose row replay cannot use (its pushes stay in the log)."""
        self._write("UPDATE rounds SET state = 'quarantined', close_reason = ? "
                    "WHERE round_id = ?", (reason, round_id))

    def rounds(self, state: str | None = None) -> list[LoggedRound]:
        """Logged rounds (only those in `state` if given). A row whose config is not valid
        JSON is returned with ``config=None`` (the caller reports it)."""
        sql = "SELECT round_id, config, state, close_reason FROM rounds"
        with self._lock:
            rows = self._db.execute(sql + (" WHERE state = ?" if state else ""),
                                    (state,) if state else ()).fetchall()
        return [LoggedRound(r, _json_or_none(c), s, why) for r, c, s, why in rows]

    def round(self, round_id: str) -> LoggedRound | None:
        with self._lock:
            row = self._db.execute("SELECT round_id, config, state, close_reason FROM rounds "
                                   "WHERE round_id = ?", (round_id,)).fetchone()
        return None if row is None else LoggedRound(row[0], _json_or_none(row[1]), *row[2:])

    def round_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM rounds").fetchone()[0]

    def pushes(self, round_id: str, with_payload: bool = True) -> Iterator[LoggedPush]:
        """The round's pushes in arrival order (payloads read one at a time)."""
        with self._lock:
            keys = self._db.execute(
                "SELECT client_id, weight, sha256, length(payload), factor FROM pushes "
                "WHERE round_id = ? ORDER BY seq", (round_id,)).fetchall()
        for client_id, weight, sha256, nbytes, factor in keys:
            payload = b""
            if with_payload:
                with self._lock:
                    row = self._db.execute(
                        "SELECT payload FROM pushes WHERE round_id = ? AND client_id = ?",
                        (round_id, client_id)).fetchone()
                payload = b"" if row is None else row[0]
            yield LoggedPush(_client_id(client_id), weight, sha256, nbytes, payload, factor,
                             str(client_id))

    def rejections(self, round_id: str) -> dict[int, str]:
        """{client: reason} of the round's pushes refused by the norm bound."""
        with self._lock:
            rows = self._db.execute("SELECT client_id, reason FROM rejections "
                                    "WHERE round_id = ?", (round_id,)).fetchall()
        return {_client_id(c): why for c, why in rows}

    def quarantined(self) -> list[tuple[str, str, str]]:
        """(round, client, reason) of every row replay moved to quarantine."""
        with self._lock:
            return [tuple(r) for r in self._db.execute(
                "SELECT round_id, client_id, reason FROM quarantine ORDER BY rowid")]

    def mean(self, round_id: str) -> bytes | None:
        """The closed round's float32 mean bytes, None if it closed with no pushes;
        StoreError (naming the file) if the mean file is missing or fails its checksum."""
        with self._lock:
            row = self._db.execute("SELECT mean FROM rounds WHERE round_id = ?",
                                   (round_id,)).fetchone()
        if row is None or row[0] is None:
            return None
        tag = bytes(row[0])
        if len(tag) and not tag.startswith(_MEAN_TAG):
            return tag  # older logs: the mean itself (float32 bytes: a multiple of 4 long)
        path = self._mean_path(round_id)
        try:
            blob = path.read_bytes()
        except OSError as e:
            raise StoreError(f"{path}: cannot read the mean of round {round_id!r}: "
                             f"{e.strerror}") from None
        if tag and hashlib.sha256(blob).hexdigest().encode() != tag[len(_MEAN_TAG):]:
            raise StoreError(f"{path}: checksum mismatch: the mean of round {round_id!r} is "
                             "corrupt")
        if len(blob) % 4:
            raise StoreError(f"{path}: {len(blob)} bytes is not a whole number of float32")
        return blob


def _json_or_none(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _client_id(text: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return -1  # a corrupt row: replay quarantines it
