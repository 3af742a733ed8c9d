"""PostgresStorage: the portable SQL of lavacore.storage on PostgreSQL through psycopg2.

Transactions: each greenlet gets its own connection from a small pool for the length of
its outermost ``transaction()`` (re-entrant within the greenlet; commit on success,
rollback on any exception). Unlike the SQLite backend, greenlets of one process do not
wait for each other's transactions: the rows a decision depends on are locked
(``SELECT ... FOR UPDATE``), as they must be anyway with other processes on the database.

Round trips are what a transaction costs here (see bench/storage_bench.py), so:
connections run in autocommit mode and a statement outside any transaction is one round
trip (no BEGIN/COMMIT); a transaction's BEGIN travels with its first statement; statements
are prepared on the server per connection (option ``prepare``); job and test-case inserts
are sent as multi-row INSERTs.

Faults: psycopg2 OperationalError/InterfaceError (server gone, restarted, backend
terminated, no answer) become a one-line ``StorageError``; the connection is dropped with
every idle one, and the next use connects again. Other errors (a constraint, a bug) are
raised as psycopg2 raises them.
"""

import contextlib
import hashlib
import json
import logging
import re

import gevent
import psycopg2
import psycopg2.extensions
import psycopg2.extras

from lavacore.states import DeviceState, JobState
from lavacore.storage import (DDL, DEVICES, JOBS, MAX_JOB_ID, QUEUE_ORDER, QUEUED_JOBS,
                              SCHEMA_VERSION, NotFound, SQLStorage, StorageError,
                              decode_queued_job, upgrade_statements)

from . import green
from .leader import Leadership
from .notify import Listener
from .pool import Pool, close_quietly, first_line, is_connection_error

log = logging.getLogger("lavacore.storage")

CHANNEL = "lavacore_events"
MAX_NOTIFY = 7900  # PostgreSQL refuses NOTIFY payloads of 8000 bytes and more
IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")  # no quoting needed anywhere

TYPES = {"REAL": "DOUBLE PRECISION", "BIGINT": "BIGINT", "SERIAL": "BIGSERIAL PRIMARY KEY"}

# Tables with a SERIAL id, whose sequence must follow ids copied in (dbtools.db_copy).
SERIAL_TABLES = ("jobs", "testcases", "tokens", "history", "audit")


def _key(text):
    """A stable signed 64-bit advisory-lock key for ``text``."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big", signed=True)


class _ConnectTimeout(Exception):
    pass


class _Tx:
    """The connection of one greenlet's transaction. Its BEGIN is sent with the first
    statement; ``cursor()`` sends it at once for code that uses the connection directly."""

    __slots__ = ("conn", "depth", "begun")

    def __init__(self, conn):
        self.conn = conn
        self.depth = 1
        self.begun = False

    def cursor(self):
        cursor = self.conn.cursor()
        if not self.begun:
            self.begun = True
            cursor.execute("BEGIN")
        return cursor

    def __getattr__(self, name):
        return getattr(self.conn, name)


class _Result:
    """A statement's rows and rowcount, read before its connection goes back to the pool."""

    __slots__ = ("rows", "rowcount", "description", "_next")

    def __init__(self, cursor):
        self.rowcount = cursor.rowcount
        self.description = cursor.description
        self.rows = cursor.fetchall() if cursor.description is not None else []
        self._next = 0

    def fetchone(self):
        if self._next >= len(self.rows):
            return None
        self._next += 1
        return self.rows[self._next - 1]

    def fetchall(self):
        rows, self._next = self.rows[self._next:], len(self.rows)
        return rows


class PostgresStorage(SQLStorage):
    name = "postgres"
    placeholder = "%s"
    _for_update = " FOR UPDATE"
    # (clock, observe(seconds)) of a master's metrics (plugins/metrics), or None: each
    # statement's and commit's round trip is observed.
    statement_timer = None

    OPTIONS = {
        # name: (type, default, what)
        "pool_size": (int, 8, "connections per process at most"),
        "pool_timeout": (float, 10.0, "seconds to wait for a free pooled connection"),
        "schema": (str, "", "schema (search_path) holding lavacore's tables"),
        "connect_timeout": (float, 5.0, "seconds to wait for a new connection"),
        "io_timeout": (float, 60.0, "seconds without an answer before a statement fails"),
        "synchronous_commit": (str, "", "PostgreSQL synchronous_commit for lavacore"),
        "application_name": (str, "lavacore", "shown in pg_stat_activity"),
        "leader_poll": (float, 0.5, "seconds between a standby master's lock attempts"),
        "leader_retry": (float, 0.1, "seconds between the active master's reconnects"),
        "takeover_grace": (float, 1.0, "a standby's pause after a database outage"),
        "prepare": (bool, True, "server-side prepared statements (off behind pgbouncer's"
                                " transaction pooling)"),
    }

    def __init__(self, url, **options):
        super().__init__()
        unknown = set(options) - set(self.OPTIONS)
        if unknown:
            raise StorageError("[storage] options: unknown key %s (known: %s)"
                               % (", ".join(sorted(unknown)), ", ".join(sorted(self.OPTIONS))))
        for key, (kind, default, _what) in self.OPTIONS.items():
            value = options.get(key, default)
            try:
                if kind is bool and not isinstance(value, bool):
                    raise TypeError(value)
                value = kind(value)
            except (TypeError, ValueError):
                raise StorageError("[storage] options %s: expected %s, got %r"
                                   % (key, kind.__name__, value)) from None
            setattr(self, key, value)
        if self.pool_size < 1:
            raise StorageError("[storage] options pool_size: must be at least 1")
        if self.schema and not IDENTIFIER.match(self.schema):
            raise StorageError("[storage] options schema: %r is not a plain lower-case SQL"
                               " identifier" % self.schema)
        self.url = url
        self._params = self._connect_params(url)
        self.where = self._describe()
        self.channel = CHANNEL + ("_" + self.schema if self.schema else "")
        self.leader_key = _key("lavacore-master:" + self.schema)
        self._pool = None
        self._txs = {}  # greenlet -> _Tx
        self._listeners = []
        self.leadership = None

    # -- connections --------------------------------------------------------------------

    def _connect_params(self, url):
        if not url:
            raise StorageError("[storage] url: a libpq URL is required for PostgreSQL"
                               " (postgresql://USER@HOST:PORT/DATABASE)")
        try:
            params = psycopg2.extensions.parse_dsn(url)
        except psycopg2.Error:
            raise StorageError("[storage] url: %r is not a libpq URL"
                               " (postgresql://USER@HOST:PORT/DATABASE)" % url) from None
        settings = []
        if self.schema:
            settings.append("-c search_path=%s" % self.schema)
        if self.synchronous_commit:
            settings.append("-c synchronous_commit=%s" % self.synchronous_commit)
        if settings:
            params["options"] = " ".join(filter(None, [params.get("options")] + settings))
        params.setdefault("application_name", self.application_name)
        # A dead peer is noticed in about 25 s even when no statement is running.
        for key, value in (("keepalives", 1), ("keepalives_idle", 10),
                           ("keepalives_interval", 5), ("keepalives_count", 3)):
            params.setdefault(key, value)
        return params

    def _describe(self):
        p = self._params
        text = "%s@%s:%s/%s" % (p.get("user", ""), p.get("host", "localhost"),
                                p.get("port", 5432), p.get("dbname", ""))
        return text + ("?schema=" + self.schema if self.schema else "")

    def connect(self):
        """A new autocommit connection (raises StorageError). The pool, the listener and
        the leadership lock each use their own."""
        green.install()
        try:
            with gevent.Timeout(self.connect_timeout, _ConnectTimeout):
                conn = psycopg2.connect(connection_factory=green.Connection, **self._params)
        except _ConnectTimeout:
            raise StorageError("PostgreSQL %s: cannot connect: no answer within %gs"
                               % (self.where, self.connect_timeout)) from None
        except psycopg2.Error as exc:
            raise StorageError("PostgreSQL %s: cannot connect: %s"
                               % (self.where, first_line(exc))) from None
        conn.autocommit = True
        conn.io_timeout = self.io_timeout
        return conn

    def open(self):
        green.install()
        if self._pool is None:
            self._pool = Pool(self.connect, self.pool_size, self.pool_timeout, self.where)
        # Fail at start, with the reason, rather than at the first statement.
        self._pool.add(self.connect())
        return self

    def close(self):
        if self.leadership is not None:
            self.leadership.close()
            self.leadership = None
        for listener in self._listeners:
            listener.close()
        self._listeners = []
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    @property
    def pool(self):
        if self._pool is None:
            raise StorageError("PostgreSQL %s: the storage is not open" % self.where)
        return self._pool

    def _error(self, exc):
        """psycopg2's exception -> what lavacore raises."""
        if is_connection_error(exc):
            if self._pool is not None:
                self._pool.lost(exc)
            return StorageError("PostgreSQL %s: %s" % (self.where, first_line(exc)))
        return exc

    @contextlib.contextmanager
    def _connection(self):
        conn = self.pool.get()
        try:
            yield conn
        finally:
            self.pool.put(conn)

    def _begin(self, conn):
        conn.cursor().execute("BEGIN")

    # -- transactions -------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self):
        current = gevent.getcurrent()
        tx = self._txs.get(current)
        if tx is not None:
            tx.depth += 1
            try:
                yield tx
            except psycopg2.Error as exc:
                raise self._error(exc) from None
            finally:
                tx.depth -= 1
            return
        pool = self.pool
        conn = pool.get()
        tx = self._txs[current] = _Tx(conn)
        broken = False
        try:
            try:
                yield tx
                if tx.begun:
                    _timed(self.statement_timer, conn.cursor().execute, "COMMIT")
            except BaseException as exc:
                broken = not self._abort(tx)
                if isinstance(exc, psycopg2.Error):
                    raise self._error(exc) from None
                raise
        finally:
            del self._txs[current]
            pool.put(conn, broken)

    def _abort(self, tx):
        """Roll back; False if the connection cannot be used again."""
        conn = tx.conn
        if conn.closed:
            return False
        if not tx.begun:
            return True
        try:
            conn.cursor().execute("ROLLBACK")
            return True
        except BaseException:  # broken, or killed again while rolling back
            close_quietly(conn)
            return False

    def _execute(self, statement, params=()):
        params = tuple(params or ())
        tx = self._txs.get(gevent.getcurrent())
        begin = ""
        if tx is not None and not tx.begun:
            tx.begun = True
            begin = "BEGIN; "

        timer = self.statement_timer

        def run(cursor):
            sql, values = self._prepared(cursor.connection, statement, params)
            _timed(timer, cursor.execute, begin + sql, values)
            return _Result(cursor)

        return self._run(run, tx)

    def _prepared(self, conn, statement, params):
        """The text to send for ``statement`` (``?`` placeholders) and its parameters.

        With ``prepare`` on, each DML statement is prepared on the server the first time
        a connection runs it (PREPARE travels with that first EXECUTE: no extra round
        trip) and executed by name afterwards, which saves parsing and planning on every
        call. A statement whose first run failed is retried under a new name, since PREPARE
        is not undone by a rollback and may or may not have happened."""
        prepared = getattr(conn, "prepared", None)
        if not self.prepare or prepared is None or not _preparable(statement, params):
            return self._sql(statement), (params or None)
        name = prepared.get(statement)
        values = (params or None)
        marks = "(%s)" % ", ".join(["%s"] * len(params)) if params else ""
        if name is not None:
            return "EXECUTE %s %s" % (name, marks), values
        if len(prepared) >= MAX_PREPARED:
            return self._sql(statement), values
        conn.prepared_count += 1
        name = "lc_%d" % conn.prepared_count
        parts = statement.split("?")
        text = parts[0] + "".join("$%d%s" % (n, part) for n, part in
                                  enumerate(parts[1:], 1))
        # Recorded before it runs; _settled() drops the entry if the run fails.
        prepared[statement] = name
        conn.prepared_pending = statement
        if values is not None:
            text = text.replace("%", "%%")
        return "PREPARE %s AS %s; EXECUTE %s %s" % (name, text, name, marks), values

    def _run(self, work, tx=None, alone=True):
        """``work(cursor)`` in this greenlet's transaction ``tx``; without one, alone on a
        pooled connection in autocommit (one statement: atomic, and no BEGIN/COMMIT round
        trips), or in a transaction of its own when not ``alone``."""
        if tx is not None:
            try:
                return _settled(tx.conn, work, tx.conn.cursor() if tx.begun else tx.cursor())
            except psycopg2.Error as exc:
                raise self._error(exc) from None
        if not alone:
            with self.transaction() as tx:
                return _settled(tx.conn, work, tx.cursor())
        pool = self.pool
        conn = pool.get()
        broken = True
        try:
            result = _settled(conn, work, conn.cursor())
            broken = False
            return result
        except psycopg2.Error as exc:
            broken = conn.closed or is_connection_error(exc)
            raise self._error(exc) from None
        finally:
            pool.put(conn, broken)

    def _values(self, statement, rows, fetch=False, page_size=500):
        """A multi-row INSERT (``VALUES %s`` in ``statement``): in the current transaction,
        else alone when it fits one statement, else in a transaction of its own."""
        tx = self._txs.get(gevent.getcurrent())
        return self._run(lambda cursor: _timed(
            self.statement_timer, psycopg2.extras.execute_values, cursor, statement, rows,
            None, page_size, fetch), tx, len(rows) <= page_size)

    # -- schema -------------------------------------------------------------------------

    def schema_version(self):
        row = self._one("SELECT to_regclass('schema_version') IS NOT NULL")
        if not row[0]:
            return 0
        row = self._one("SELECT MAX(version) FROM schema_version")
        return row[0] or 0

    def migrate(self):
        """Create or upgrade the schema; safe when several processes start at once (an
        advisory lock serialises them)."""
        with self.transaction():
            self._execute("SELECT pg_advisory_xact_lock(?)",
                          (_key("lavacore-migrate:" + self.schema),))
            if self.schema:
                self._execute('CREATE SCHEMA IF NOT EXISTS "%s"' % self.schema)
            old = self.schema_version()
            if old > SCHEMA_VERSION:
                raise StorageError("database %s has schema %d, newer than this lavacore (%d)"
                                   % (self.where, old, SCHEMA_VERSION))
            if old == SCHEMA_VERSION:
                return old, old
            for statement in DDL + upgrade_statements(old):
                self._execute(statement.format(**TYPES))
            self._execute("DELETE FROM schema_version")
            self._execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        log.info("database %s: schema version %d -> %d", self.where, old, SCHEMA_VERSION)
        return old, SCHEMA_VERSION

    def reset_sequences(self):
        """After rows were copied in with their ids: the next id follows the largest."""
        with self.transaction():
            for table in SERIAL_TABLES:
                self._execute("SELECT setval(pg_get_serial_sequence('%s', 'id'),"
                              " COALESCE((SELECT MAX(id) FROM %s), 0) + 1, false)"
                              % (table, table))

    def insert_rows(self, table, columns, rows):
        """Bulk insert of raw rows (dbtools.db_copy), in the current transaction."""
        if rows:
            self._values("INSERT INTO %s (%s) VALUES %%s" % (table, ", ".join(columns)),
                         rows, page_size=1000)

    # -- batched writes -----------------------------------------------------------------

    def _insert_job_rows(self, jobs):
        """One multi-row INSERT ... RETURNING id; ids come back in the order of ``jobs``."""
        if not jobs:
            return []
        names = [c for c in JOBS.names if c != "id"]
        rows = [tuple(JOBS.encode(c, getattr(job, c)) for c in names) for job in jobs]
        statement = "INSERT INTO jobs (%s) VALUES %%s RETURNING id" % ", ".join(names)
        ids = []
        with self.transaction() if len(rows) > 500 else contextlib.nullcontext():
            for start in range(0, len(rows), 500):
                # One page per statement, so RETURNING order is the VALUES order.
                ids.extend(r[0] for r in self._values(statement, rows[start:start + 500],
                                                      fetch=True, page_size=500))
        return ids

    def add_testcases(self, cases):
        if not cases:
            return
        self._values(
            "INSERT INTO testcases (job_id, suite, name, result, measurement, units, metadata,"
            " logged) VALUES %s",
            [(c.job_id, c.suite, c.name, c.result, c.measurement, c.units, c.metadata,
              c.logged) for c in cases], page_size=1000)

    # -- the queue, as the scheduler reads it --------------------------------------------

    def queued_tag_sets_by_type(self, device_types=None):
        """Only the ``device_types`` asked for (those with idle devices, often a few of
        many): the same backward index walk, started from each of them instead of
        crossing every queued type."""
        if device_types is None:
            return super().queued_tag_sets_by_type()
        queued = int(JobState.SUBMITTED)
        found = {}
        for device_type, tags in self._all(
                "WITH RECURSIVE streams (device_type, tags) AS ("
                " SELECT t.name, (SELECT tags FROM jobs WHERE state = ?"
                " AND requested_device_type = t.name ORDER BY tags DESC LIMIT 1)"
                " FROM unnest(?::text[]) AS t (name)"
                " UNION ALL"
                " SELECT s.device_type, (SELECT tags FROM jobs WHERE state = ?"
                " AND requested_device_type = s.device_type AND tags < s.tags"
                " ORDER BY tags DESC LIMIT 1) FROM streams s WHERE s.tags IS NOT NULL)"
                " SELECT device_type, tags FROM streams WHERE tags IS NOT NULL",
                (queued, sorted(set(device_types)), queued)):
            found.setdefault(device_type, []).append(tags)
        return found

    def queued_stream_heads(self, streams):
        """The first jobs of every stream in one statement (one round trip instead of one
        per stream): each stream's page is an index scan of jobs_queue_stream, joined
        laterally to the list of streams passed as three arrays (one prepared statement
        whatever their number)."""
        sizes = {}
        for device_type, tags, size in streams:
            sizes[(device_type, tags)] = max(int(size), sizes.get((device_type, tags), 0))
        streams = [key + (size,) for key, size in sizes.items()]
        found = {key: [] for key in sizes}
        if len(streams) < 2:
            return super().queued_stream_heads(streams) if streams else found
        names = ", ".join("j." + column for column in QUEUED_JOBS.names)
        rows = self._all(
            "SELECT s.ord, %s FROM unnest(?::text[], ?::text[], ?::int[]) WITH ORDINALITY"
            " AS s (device_type, tags, size, ord) CROSS JOIN LATERAL (%s WHERE state = ?"
            " AND requested_device_type = s.device_type AND tags = s.tags ORDER BY %s"
            " LIMIT s.size) AS j ORDER BY s.ord, %s"
            % (names, QUEUED_JOBS.select, QUEUE_ORDER,
               ", ".join("j." + column.strip() for column in QUEUE_ORDER.split(","))),
            ([s[0] for s in streams], [s[1] for s in streams],
             [int(s[2]) for s in streams], int(JobState.SUBMITTED)))
        for row in rows:
            device_type, tags, _ = streams[row[0] - 1]
            found[(device_type, tags)].append(decode_queued_job(row[1:]))
        return found

    # -- claims -------------------------------------------------------------------------

    def claim(self, job_id, hostname):
        """Lock a job and a device for a scheduling decision, in one round trip, inside the
        caller's transaction: (job, device), or None when either does not exist or another
        transaction holds it (SKIP LOCKED: a claimer never waits for another)."""
        columns = ", ".join(["j." + c for c in JOBS.names] + ["d." + c for c in DEVICES.names])
        row = self._one("SELECT %s FROM jobs j, devices d WHERE j.id = ? AND d.hostname = ?"
                        " FOR UPDATE OF j, d SKIP LOCKED" % columns, (int(job_id), hostname))
        if row is None:
            return None
        split = len(JOBS.names)
        return JOBS.decode(row[:split]), DEVICES.decode(row[split:])

    def mark_running(self, job_id, now):
        """:meth:`SQLStorage.mark_running` in one statement (one round trip, atomic on its
        own): the job locked, then updated with its device, locked in the same order as
        every other transaction that takes both (job first)."""
        job_id = int(job_id)
        if not 0 < job_id <= MAX_JOB_ID:
            raise NotFound("job %d does not exist" % job_id)
        columns = ", ".join(["j." + c for c in JOBS.names] + ["d." + c for c in DEVICES.names])
        row = self._one(
            "WITH old AS (SELECT id, state FROM jobs WHERE id = ? FOR UPDATE),"
            " j AS (UPDATE jobs SET state = ?, start_time = ? FROM old"
            " WHERE jobs.id = old.id AND old.state < ? RETURNING jobs.*, old.state AS was),"
            " d AS (UPDATE devices SET state = ? FROM j WHERE devices.hostname ="
            " j.actual_device RETURNING devices.*)"
            " SELECT (SELECT COUNT(*) FROM old), j.was, %s FROM (SELECT 1) AS one"
            " LEFT JOIN j ON true LEFT JOIN d ON true" % columns,
            (job_id, int(JobState.RUNNING), now, int(JobState.RUNNING),
             int(DeviceState.RUNNING)))
        if not row[0]:
            raise NotFound("job %d does not exist" % job_id)
        if row[1] is None:
            return None  # Running or beyond already
        split = 2 + len(JOBS.names)
        job = JOBS.decode(row[2:split])
        device = DEVICES.decode(row[split:]) if row[split] is not None else None
        return job, JobState(row[1]), device

    # -- one active master per database ---------------------------------------------------

    def acquire_leadership(self, stopping, on_lost=None):
        """Block (cooperatively) until this process holds the master lock of this database
        and schema (a session advisory lock on a connection kept for the life of the
        storage), or until the gevent Event ``stopping`` is set. Returns True when this
        process is the active master, False when stopped first.

        While another master holds the lock this is a standby: it logs "standby: waiting
        for the active master" once and tries again every ``leader_poll`` seconds; the
        lock is free as soon as the active master's connection ends (exit, crash, kill -9).
        If the database drops the lock connection later, the active master reconnects and
        takes the lock again; if another master got it first, ``on_lost()`` is called (the
        master must then stop: two masters must never schedule)."""
        if self.leadership is None:
            self.leadership = Leadership(self)
        return self.leadership.acquire(stopping, on_lost)

    def master_running(self):
        """True if some process holds the master lock of this database and schema."""
        if self.leadership is not None and self.leadership.held:
            return True
        conn = self.connect()
        try:
            cursor = conn.cursor()
            cursor.execute("SELECT pg_try_advisory_lock(%s)", (self.leader_key,))
            if cursor.fetchone()[0]:
                cursor.execute("SELECT pg_advisory_unlock(%s)", (self.leader_key,))
                return False
            return True
        except psycopg2.Error as exc:
            raise StorageError("PostgreSQL %s: %s" % (self.where, first_line(exc))) from None
        finally:
            close_quietly(conn)

    # -- cross-process notifications ------------------------------------------------------

    def publish_event(self, payload):
        """NOTIFY the master (sent when the caller's transaction commits, if any)."""
        data = _fit(payload)
        if data is None:
            log.warning("event too large to notify the master; dropped (the master's"
                        " periodic pass picks the change up)")
            return False
        try:
            self._execute("SELECT pg_notify(?, ?)", (self.channel, data))
            return True
        except StorageError as exc:
            log.warning("cannot notify the master: %s", exc)
            return False

    def listen_events(self):
        listener = Listener(self)
        self._listeners.append(listener)
        return listener


MAX_PREPARED = 200  # per connection; statements beyond run unprepared


def _timed(timer, fn, *args):
    """``fn(*args)``, its duration observed when there is a ``timer`` (clock, observe)."""
    if timer is None:
        return fn(*args)
    clock, observe = timer
    started = clock()
    try:
        return fn(*args)
    finally:
        observe(clock() - started)
_DML = ("SELECT ", "INSERT ", "UPDATE ", "DELETE ")


def _preparable(statement, params):
    """DML with exactly one parameter per ``?``. ``SELECT *`` is left out: its prepared
    plan would fail once a migration changes the table's columns."""
    return (statement.startswith(_DML) and ";" not in statement
            and "SELECT * " not in statement and statement.count("?") == len(params))


def _settled(conn, work, cursor):
    """Run ``work(cursor)``; a PREPARE sent with it counts only if the whole of it ran."""
    try:
        result = work(cursor)
    except BaseException:
        pending = getattr(conn, "prepared_pending", None)
        if pending is not None:
            conn.prepared.pop(pending, None)  # the next run prepares it under a new name
            conn.prepared_pending = None
        raise
    if getattr(conn, "prepared_pending", None) is not None:
        conn.prepared_pending = None
    return result


_KEEP = ("job", "id", "state", "health", "device", "device_type", "worker", "hostname",
         "sub_id", "target_group")


def _fit(payload):
    """The JSON text of ``payload`` in NOTIFY's size limit: long strings are cut, and as a
    last resort only the fields that identify what changed are kept."""
    data = json.dumps(payload, default=str)
    if len(data.encode()) <= MAX_NOTIFY:
        return data
    inner = payload.get("data")
    if isinstance(inner, dict):
        cut = {k: (v[:500] + "..." if isinstance(v, str) and len(v) > 500 else v)
               for k, v in inner.items()}
        data = json.dumps(dict(payload, data=cut), default=str)
        if len(data.encode()) <= MAX_NOTIFY:
            return data
        kept = {k: v for k, v in cut.items() if k in _KEEP}
        data = json.dumps(dict(payload, data=kept), default=str)
        if len(data.encode()) <= MAX_NOTIFY:
            return data
    return None


__all__ = ["PostgresStorage", "NotFound"]
