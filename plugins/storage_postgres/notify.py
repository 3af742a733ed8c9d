"""Cross-process wake-ups: LISTEN/NOTIFY.

Another process (the CLI, a second API process) calls ``publish_event(payload)``, a
``pg_notify`` on this database's channel, delivered when its transaction commits. The
master's NotifyService waits in ``Listener.wait(timeout)`` on a dedicated autocommit
connection that LISTENs: ``gevent.socket.wait_read`` on its socket, then ``conn.poll()``
and the payloads of ``conn.notifies``.

If the connection drops, ``wait`` reconnects (at most every ``RETRY`` seconds) and LISTENs
again; notifications sent meanwhile are lost, so the first ``wait`` after a reconnect
returns ``{"kind": "resync"}``: the master should make a full pass (the database has the
changes; only the wake-up was missed).
"""

import logging
import time

import gevent
import gevent.socket
import psycopg2

from lavacore import safeyaml
from lavacore.storage import StorageError

from .pool import close_quietly, first_line

log = logging.getLogger("lavacore.storage")

RETRY = 0.5
RESYNC = {"kind": "resync", "data": {}}


class Listener:
    def __init__(self, storage):
        self.storage = storage
        self.conn = None
        self._lost = False
        self._next_try = 0.0
        self._closed = False
        self.reconnects = 0
        self._open()  # the master fails at start if it cannot listen

    def _open(self):
        conn = self.storage.connect()
        try:
            conn.cursor().execute('LISTEN "%s"' % self.storage.channel)
        except psycopg2.Error as exc:
            close_quietly(conn)
            raise StorageError("PostgreSQL %s: LISTEN failed: %s"
                               % (self.storage.where, first_line(exc))) from None
        self.conn = conn

    def _drop(self, reason):
        if self.conn is not None:
            close_quietly(self.conn)
            self.conn = None
        if not self._lost:
            log.error("notifications: connection to %s lost (%s); listening again as soon"
                      " as it is back", self.storage.where, reason)
        self._lost = True

    def wait(self, timeout=None):
        """Wait (cooperatively) up to ``timeout`` seconds; returns the payloads received,
        [] on timeout."""
        if self._closed:
            return []
        if self.conn is None:
            now = time.monotonic()
            if now < self._next_try:
                gevent.sleep(min(timeout if timeout is not None else RETRY,
                                 self._next_try - now))
                return []
            self._next_try = now + RETRY
            try:
                self._open()
            except StorageError as exc:
                log.debug("notifications: still no connection: %s", exc)
                gevent.sleep(min(timeout if timeout is not None else RETRY, RETRY))
                return []
            self.reconnects += 1
            self._lost = False
            log.warning("notifications: listening on %s again", self.storage.where)
            return [dict(RESYNC)]
        conn = self.conn
        if not conn.notifies:
            try:
                gevent.socket.wait_read(conn.fileno(), timeout)
            except gevent.socket.timeout:
                return []
            except (OSError, ValueError) as exc:
                self._drop(str(exc))
                return []
        try:
            conn.poll()
        except psycopg2.Error as exc:
            self._drop(first_line(exc))
            return []
        result = []
        while conn.notifies:
            notify = conn.notifies.pop(0)
            try:
                result.append(safeyaml.json_loads(notify.payload))
            except ValueError:
                log.warning("dropped a malformed notification (%d bytes)", len(notify.payload))
        if not result and conn.closed:
            self._drop("connection closed")
        return result

    def close(self):
        self._closed = True
        if self.conn is not None:
            close_quietly(self.conn)
            self.conn = None
