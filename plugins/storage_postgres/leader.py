"""One active master per database (and schema): a PostgreSQL session advisory lock.

The lock is held on a connection of its own for the life of the master. PostgreSQL frees
it the moment that connection ends (master stopped, crashed or killed with -9: the server
sees the socket close), and a standby polling ``pg_try_advisory_lock`` takes over.

If the database drops the lock connection (restart, terminated backend) the lock is gone
with it: the active master notices at once (the idle socket turns readable), reconnects
every ``leader_retry`` seconds and takes the lock again. A standby that lived through the
same outage waits ``takeover_grace`` before trying, so the master that was active gets
its lock back first; if it still loses it, ``on_lost`` is called and that master must stop.
"""

import logging

import gevent
import gevent.socket
import psycopg2

from lavacore.storage import StorageError

from .pool import close_quietly, first_line

log = logging.getLogger("lavacore.storage")


class Leadership:
    def __init__(self, storage):
        self.storage = storage
        self.conn = None
        self.held = False
        self.on_lost = None
        self._guard = None
        self._closed = False

    def _connect(self):
        if self.conn is None or self.conn.closed:
            self.conn = self.storage.connect()

    def _try_lock(self):
        cursor = self.conn.cursor()
        cursor.execute("SELECT pg_try_advisory_lock(%s)", (self.storage.leader_key,))
        return bool(cursor.fetchone()[0])

    def _drop(self):
        if self.conn is not None:
            close_quietly(self.conn)
            self.conn = None

    def acquire(self, stopping, on_lost=None):
        if self.held:
            return True
        self.on_lost = on_lost
        where = self.storage.where
        announced = outage = False
        while not stopping.is_set() and not self._closed:
            try:
                fresh = self.conn is None or self.conn.closed
                self._connect()
                if fresh and outage and stopping.wait(self.storage.takeover_grace):
                    break
                got = self._try_lock()
            except (StorageError, psycopg2.Error) as exc:
                self._drop()
                if not outage:
                    log.error("master lock: database %s unreachable: %s; retrying", where,
                              first_line(exc))
                outage = True
                stopping.wait(self.storage.leader_poll)
                continue
            if outage:
                outage = False
                log.warning("master lock: database %s reachable again", where)
            if got:
                self.held = True
                if announced:
                    log.warning("standby: the active master is gone; this master takes over")
                else:
                    log.info("master lock of %s taken: this is the active master", where)
                self._guard = gevent.spawn(self._guard_loop)
                self._guard.name = "master-lock"
                return True
            if not announced:
                announced = True
                log.warning("standby: waiting for the active master (another process holds"
                            " the master lock of %s)", where)
            stopping.wait(self.storage.leader_poll)
        self._drop()
        return False

    def _guard_loop(self):
        """Wait on the idle lock connection; it only turns readable when the server drops
        it (or sends a notice)."""
        while not self._closed:
            conn = self.conn
            try:
                gevent.socket.wait_read(conn.fileno())
                conn.poll()
                if conn.closed:
                    raise psycopg2.InterfaceError("connection closed")
                del conn.notices[:]
                continue
            except (psycopg2.Error, OSError, ValueError) as exc:
                reason = first_line(exc)
            self.held = False
            self._drop()
            log.error("master lock: connection to %s lost (%s); taking the lock again",
                      self.storage.where, reason)
            self._retake()
            if not self.held:
                return

    def _retake(self):
        where = self.storage.where
        while not self._closed:
            # A pause first: the server is likely restarting. It is much shorter than a
            # standby's takeover_grace, so this master normally gets its lock back.
            gevent.sleep(self.storage.leader_retry)
            try:
                self._connect()
                got = self._try_lock()
            except (StorageError, psycopg2.Error):
                self._drop()
                continue
            if got:
                self.held = True
                log.warning("master lock of %s taken again after the outage", where)
                return
            self._drop()
            log.critical("master lock of %s: another master took over during the database"
                         " outage; this master must stop scheduling", where)
            if self.on_lost is not None:
                self.on_lost()
            return

    def close(self):
        self._closed = True
        if self._guard is not None and self._guard is not gevent.getcurrent():
            self._guard.kill(block=True, timeout=5)
        self._guard = None
        self.held = False
        self._drop()  # ends the session: PostgreSQL frees the lock
