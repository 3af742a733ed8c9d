"""The default storage: one SQLite file in WAL mode, embedded in the master.

One connection per process. sqlite3 calls block the gevent hub while they run (they are
C calls, not gevent-aware I/O); the statements here are short, so that costs
microseconds. Other processes (the CLI) open the same file and wake the master through a
Linux abstract unix datagram socket named after the database file, which also keeps two
masters from running on one file.
"""

import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import sqlite3
import struct

from lavacore import safeyaml
from lavacore.hookspecs import hookimpl
from lavacore.storage import (DDL, SCHEMA_VERSION, SQLStorage, StorageError,
                              upgrade_statements)

log = logging.getLogger("lavacore.storage")

MAX_DATAGRAM = 65000
_UCRED = struct.Struct("3i")  # pid, uid, gid
_CREDENTIALS = socket.CMSG_SPACE(_UCRED.size)
# What says "the database cannot do it now" rather than "this statement is wrong".
_UNAVAILABLE = (sqlite3.OperationalError, sqlite3.InternalError, sqlite3.DatabaseError)


class SQLiteStorage(SQLStorage):
    name = "sqlite"
    # (clock, observe(seconds)) of a master's metrics (plugins/metrics), or None: each
    # statement and commit of lavacore.storage is observed.
    statement_timer = None

    def __init__(self, path, synchronous="NORMAL", busy_timeout=5.0):
        super().__init__()
        self.path = os.path.abspath(path)
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self._conn = None

    def open(self):
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout,
                                   isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=%s" % self.synchronous)
            conn.execute("PRAGMA foreign_keys=ON")
        except (OSError, sqlite3.Error) as exc:
            raise StorageError("[storage] url: cannot open SQLite database %s: %s"
                               % (self.path, exc)) from None
        self._conn = conn
        return self

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def _connection(self):
        if self._conn is None:
            raise StorageError("SQLite database %s is not open" % self.path)
        try:
            yield self._conn
        except _UNAVAILABLE as exc:
            if type(exc) not in _UNAVAILABLE:
                raise  # IntegrityError, ProgrammingError...: a bug or a conflict
            # A full disk, a lock held too long, an I/O error: the database, not the
            # statement. The callers' retry paths take StorageError.
            raise StorageError("SQLite %s: %s" % (self.path, exc)) from None

    def _begin(self, conn):
        # IMMEDIATE takes the write lock at once, so two processes never both read and then
        # fail to upgrade (SQLITE_BUSY in the middle of a claim).
        conn.execute("BEGIN IMMEDIATE")

    def schema_version(self):
        row = self._conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name='schema_version'"
        ).fetchone()
        if row is None:
            return 0
        row = self._conn.execute("SELECT version FROM schema_version").fetchone()
        return row[0] if row else 0

    def migrate(self):
        old = self.schema_version()
        if old > SCHEMA_VERSION:
            raise StorageError("database %s has schema %d, newer than this lavacore (%d)"
                               % (self.path, old, SCHEMA_VERSION))
        if old == SCHEMA_VERSION:
            return old, old
        types = dict(REAL="REAL", BIGINT="INTEGER", SERIAL="INTEGER PRIMARY KEY AUTOINCREMENT")
        with self.transaction() as conn:
            for statement in DDL + upgrade_statements(old):
                conn.execute(statement.format(**types))
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        return old, SCHEMA_VERSION

    # -- wake-ups from other processes --------------------------------------------------

    def _address(self):
        digest = hashlib.sha1(self.path.encode()).hexdigest()[:20]
        return "\0lavacore-%s" % digest

    def publish_event(self, payload):
        data = json.dumps(payload).encode()
        if len(data) > MAX_DATAGRAM:
            log.warning("event too large to notify the master (%d bytes); dropped", len(data))
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.sendto(data, self._address())
            return True
        except OSError as exc:
            # No master running (ECONNREFUSED) or its queue is full: the master's periodic
            # pass picks the change up from the database anyway.
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN):
                log.warning("cannot notify the master: %s", exc)
            return False
        finally:
            sock.close()

    def listen_events(self):
        return _DatagramListener(self._address(), self.path)


class _DatagramListener:
    """The master's end of the wake-up channel. An abstract socket has no file mode, so
    any local user can send to it: each datagram carries its sender's credentials
    (SO_PASSCRED), and only this user's and root's are taken."""

    def __init__(self, address, path):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self._sock.bind(address)
        except OSError as exc:
            self._sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise StorageError("another master already runs on %s" % path) from None
            raise
        self._refused = 0

    def wait(self, timeout=None):
        """Wait (cooperatively) for notifications; returns their payloads, [] on timeout."""
        import gevent.socket

        try:
            gevent.socket.wait_read(self._sock.fileno(), timeout)
        except gevent.socket.timeout:
            return []
        result = []
        while True:
            try:
                data, ancillary, _, _ = self._sock.recvmsg(MAX_DATAGRAM + 1, _CREDENTIALS)
            except BlockingIOError:
                return result
            uid = _sender_uid(ancillary)
            if uid not in (0, os.getuid()):  # (the master may have dropped root since)
                self._refused += 1
                if self._refused in (1, 10, 100, 1000) or self._refused % 10000 == 0:
                    log.warning("dropped a notification from uid %s, not this master's user"
                                " (%d so far)", uid, self._refused)
                continue
            try:
                result.append(safeyaml.json_loads(data))
            except ValueError:
                log.warning("dropped a malformed notification (%d bytes)", len(data))

    def close(self):
        self._sock.close()


# [storage] options of this backend: name -> (check, default, what it is).
SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
OPTIONS = {
    "synchronous": (SYNCHRONOUS, "NORMAL", "SQLite's PRAGMA synchronous"),
    "busy_timeout": (float, 5.0, "seconds a statement waits for another process's lock"),
}


def options_of(config):
    """The [storage] options for SQLite, checked: StorageError naming the key."""
    options = dict(config.storage.options)
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise StorageError("[storage] options: unknown key %s for SQLite (known: %s)"
                           % (", ".join(sorted(unknown)), ", ".join(sorted(OPTIONS))))
    checked = {}
    for key, (kind, default, _what) in OPTIONS.items():
        value = options.get(key, default)
        if isinstance(kind, tuple):
            if not isinstance(value, str) or value.upper() not in kind:
                raise StorageError("[storage] options %s: one of %s, got %r"
                                   % (key, ", ".join(kind), value))
            value = value.upper()
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise StorageError("[storage] options %s: a number of seconds, got %r"
                               % (key, value))
        checked[key] = value
    return checked


@hookimpl(trylast=True)
def storage(config):
    if config.storage.backend != "sqlite":
        return None
    options = options_of(config)
    return SQLiteStorage(config.resolve(config.storage.url),
                         synchronous=options["synchronous"],
                         busy_timeout=float(options["busy_timeout"]))


def _sender_uid(ancillary):
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and \
                len(data) >= _UCRED.size:
            return _UCRED.unpack_from(data)[1]
    return None
