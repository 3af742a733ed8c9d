"""psycopg2 under gevent: the wait callback.

psycopg2 is a C extension, so monkey patching does nothing for it; without this callback
every query blocks the whole hub. It must be installed
before the first connection is made, and it is process-wide: every psycopg2 connection of
the process then waits cooperatively.

A greenlet killed (or a ``gevent.Timeout`` fired) while its query waits here makes
psycopg2 close that connection; the pool notices (``conn.closed``) and discards it.
"""

import gevent.socket
import psycopg2
import psycopg2.extensions



class NoAnswer(psycopg2.OperationalError):
    """The server sent nothing within the connection's io_timeout."""


class Connection(psycopg2.extensions.connection):
    """A connection with ``io_timeout``: seconds without any byte from the server during
    one statement before it is given up (0: wait forever). A dead network otherwise
    hangs the greenlet until TCP keepalives notice, and a master greenlet stuck there
    answers no PING."""

    io_timeout = 0.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prepared = {}  # statement text -> name of its server-side prepared statement
        self.prepared_count = 0
        self.prepared_pending = None  # prepared by the statement now running, if it succeeds


def wait_callback(conn, timeout=None):
    io_timeout = getattr(conn, "io_timeout", 0.0)
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        if state == psycopg2.extensions.POLL_READ:
            wait = gevent.socket.wait_read
        elif state == psycopg2.extensions.POLL_WRITE:
            wait = gevent.socket.wait_write
        else:
            raise psycopg2.OperationalError("bad result from poll: %r" % state)
        if io_timeout:
            wait(conn.fileno(), io_timeout,
                 NoAnswer("no answer from the server within %gs" % io_timeout))
        else:
            wait(conn.fileno())


def install():
    """Idempotent; called at import of the plugin, before any connection exists."""
    if psycopg2.extensions.get_wait_callback() is not wait_callback:
        psycopg2.extensions.set_wait_callback(wait_callback)
