"""A small pool of psycopg2 connections for the greenlets of one process.

One connection serves one greenlet at a time (psycopg2 refuses two concurrent queries on
one connection). A connection goes back to the pool only if it is open and idle, outside
any transaction; anything else (closed by a kill during a query, dropped by the server, in
a failed transaction) is discarded, so a broken connection is never handed out again. An
idle connection the server has written to (the notice it sends before it terminates the
backend, or EOF after a restart) is discarded when taken, so the first statement after a
restart normally runs on a fresh connection instead of failing.
"""

import logging
import select

import gevent
import gevent.lock
import psycopg2
import psycopg2.extensions

from lavacore.storage import StorageError

log = logging.getLogger("lavacore.storage")

IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE


def first_line(exc):
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].strip()


def is_connection_error(exc):
    """Errors that say the connection or the server is gone (retry later), as opposed to
    a statement the server refused (a bug or a constraint)."""
    return isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError))


def readable(conn):
    """True if the server sent something to an idle connection (a termination notice or
    EOF): such a connection is about to fail and must not be used."""
    try:
        ready, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg2.Error):
        return True
    return bool(ready)


def usable(conn):
    return (conn.closed == 0 and conn.info.transaction_status == IDLE
            and not readable(conn))


def close_quietly(conn):
    try:
        conn.close()
    except Exception:  # already broken: nothing more to release
        pass


class Pool:
    """``connect()`` makes a new connection (raising StorageError); ``size`` bounds the
    connections out at once; ``timeout`` bounds the wait for a free one."""

    def __init__(self, connect, size, timeout, where):
        self._connect = connect
        self.size = int(size)
        self.timeout = float(timeout)
        self.where = where
        self._idle = []  # most recently used last, so few connections stay warm
        self._slots = gevent.lock.BoundedSemaphore(self.size)
        self._out = set()
        self._closed = False
        self.down = False  # the last attempt failed; logged once per outage
        self.connects = 0
        self.discarded = 0

    def get(self):
        if self._closed:
            raise StorageError("PostgreSQL %s: the storage is closed" % self.where)
        if not self._slots.acquire(timeout=self.timeout):
            raise StorageError("PostgreSQL %s: no free connection within %gs (pool_size %d)"
                               % (self.where, self.timeout, self.size))
        try:
            conn = None
            while self._idle:
                candidate = self._idle.pop()
                if usable(candidate):
                    conn = candidate
                    break
                self._discard(candidate)
            if conn is None:
                conn = self._new()
        except BaseException:
            self._slots.release()
            raise
        self._out.add(conn)
        return conn

    def add(self, conn):
        """A connection made elsewhere joins the idle ones."""
        self.connects += 1
        self._idle.append(conn)

    def put(self, conn, broken=False):
        """Give a connection back; ``broken`` (or a closed or unfinished one) is dropped."""
        self._out.discard(conn)
        try:
            if broken or self._closed or conn.closed or \
                    conn.info.transaction_status != IDLE:
                self._discard(conn)
            else:
                self._idle.append(conn)
        except Exception:
            self._discard(conn)
        finally:
            self._slots.release()

    def _new(self):
        try:
            conn = self._connect()
        except StorageError as exc:
            if not self.down:
                log.error("database %s unreachable: %s; retrying on each use", self.where,
                          exc)
            self.down = True
            raise
        self.connects += 1
        if self.down:
            self.down = False
            log.warning("database %s reachable again: reconnected", self.where)
        return conn

    def _discard(self, conn):
        self.discarded += 1
        close_quietly(conn)

    def lost(self, exc):
        """A connection error happened on a pooled connection: drop every idle one (they
        most likely share its fate) and log the outage once."""
        if not self.down:
            log.error("database %s connection lost: %s; reconnecting on next use",
                      self.where, first_line(exc))
            self.down = True
        while self._idle:
            self._discard(self._idle.pop())

    def close(self):
        self._closed = True
        while self._idle:
            close_quietly(self._idle.pop())
        for conn in list(self._out):
            # Greenlets still holding one finish or fail on a closed connection.
            close_quietly(conn)
        self._out.clear()
