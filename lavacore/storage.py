"""The storage interface, and its implementation in portable SQL.

A backend plugin answers the ``storage`` hook with an object of this interface. The SQL
here is written once, with ``?`` placeholders, in the subset SQLite and PostgreSQL share
(``RETURNING``, ``ON CONFLICT``); a backend supplies its connection handling, its DDL, its
placeholder style and its row locks. Everything the master knows is written here before it
acts on it, so a master killed at any moment restarts from this state.

Values are stored as INTEGER (states, booleans), REAL/DOUBLE (epoch seconds) and TEXT (YAML,
and tags as JSON arrays), so the same statements work on both engines.
"""

import contextlib
import dataclasses
import functools
import json

import gevent.lock

from .accountstore import AccountStorage
from .models import Device, DeviceType, Job, TestCase, Worker
from .states import DeviceHealth, DeviceState, JobHealth, JobState, WorkerHealth, WorkerState

SCHEMA_VERSION = 5
MAX_JOB_ID = 2 ** 63 - 1
ALIVE_CHUNK = 500  # hostnames per statement in workers_alive


class StorageError(Exception):
    """The database could not be reached or refused a statement (a one-line message)."""


class NotFound(KeyError):
    def __str__(self):
        return self.args[0] if self.args else "not found"


def _tags_out(tags):
    return json.dumps(sorted(set(tags or ())))


@functools.lru_cache(maxsize=4096)
def _tags_in(text):
    # A lab has few distinct tag sets; rows are decoded by the thousand per pass.
    return tuple(json.loads(text)) if text else ()


# column -> (to database, from database). Only these columns may be written through the
# generic update methods, so a field name never reaches SQL unchecked.
_INT = (int, int)
_BOOL = (int, bool)
_TEXT = (None, None)
_REAL = (None, None)

JOB_COLUMNS = {
    "id": _INT, "state": (int, JobState), "health": (int, JobHealth), "submitter": _TEXT,
    "description": _TEXT, "requested_device_type": _TEXT, "actual_device": _TEXT,
    "worker": _TEXT, "tags": (_tags_out, _tags_in), "priority": _INT, "visibility": _TEXT,
    "submit_time": _REAL, "start_time": _REAL, "end_time": _REAL, "definition": _TEXT,
    "original_definition": _TEXT, "failure_comment": _TEXT, "health_check": _BOOL,
    "target_group": _TEXT, "sub_id": _TEXT, "infrastructure_error": _BOOL, "result": _TEXT,
    "error_type": _TEXT, "error_msg": _TEXT, "end_seen": _REAL,
    "viewing_groups": (_tags_out, _tags_in),
}
DEVICE_COLUMNS = {
    "hostname": _TEXT, "device_type": _TEXT, "worker": _TEXT,
    "state": (int, DeviceState), "health": (int, DeviceHealth),
    "tags": (_tags_out, _tags_in), "is_public": _BOOL, "description": _TEXT,
    "last_health_report_job": _INT, "current_job": _INT,
}
WORKER_COLUMNS = {
    "hostname": _TEXT, "state": (int, WorkerState), "health": (int, WorkerHealth),
    "last_ping": _REAL, "description": _TEXT, "version": _TEXT,
}
DEVICE_TYPE_COLUMNS = {
    "name": _TEXT, "description": _TEXT, "display": _BOOL, "health_disabled": _BOOL,
    "health_frequency": _INT, "health_denominator": _TEXT,
}
TESTCASE_COLUMNS = {
    "id": _INT, "job_id": _INT, "suite": _TEXT, "name": _TEXT, "result": _TEXT,
    "measurement": _TEXT, "units": _TEXT, "metadata": _TEXT, "logged": _REAL,
}


class Table:
    """How one record type maps to one table."""

    def __init__(self, name, model, columns, key):
        self.name = name
        self.model = model
        self.columns = columns
        self.key = key
        self.names = tuple(columns)
        self.select = "SELECT %s FROM %s" % (", ".join(self.names), name)
        self._decoders = tuple((column, columns[column][1]) for column in self.names)

    def encode(self, column, value):
        if column not in self.columns:
            raise ValueError("%s has no field %r" % (self.name, column))
        convert = self.columns[column][0]
        return value if value is None or convert is None else convert(value)

    def decode(self, row):
        return self.model(**{column: value if value is None or convert is None
                             else convert(value)
                             for (column, convert), value in zip(self._decoders, row)})


JOBS = Table("jobs", Job, JOB_COLUMNS, "id")
# What a scheduler needs of a queued job: no definition texts, which are most of a row.
QUEUED_JOBS = Table("jobs", Job, {c: JOB_COLUMNS[c] for c in (
    "id", "state", "submitter", "requested_device_type", "tags", "priority", "submit_time",
    "health_check", "target_group", "sub_id")}, "id")
DEVICES = Table("devices", Device, DEVICE_COLUMNS, "hostname")
WORKERS = Table("workers", Worker, WORKER_COLUMNS, "hostname")
DEVICE_TYPES = Table("device_types", DeviceType, DEVICE_TYPE_COLUMNS, "name")
TESTCASES = Table("testcases", TestCase, TESTCASE_COLUMNS, "id")

# A job as lists show it: everything but the definition texts, which are most of a row.
JOB_SUMMARIES = Table("jobs", Job, {c: t for c, t in JOB_COLUMNS.items()
                                    if c not in ("definition", "original_definition")}, "id")

QUEUED = (int(JobState.SUBMITTED),)

# LAVA's queue order; the queue indexes (DDL) hold their columns in this order, so a page
# of a queue is read from the index without sorting the queue.
QUEUE_ORDER = "priority DESC, submit_time, target_group, id"

# A scheduling pass decodes thousands of queued jobs and idle devices: these two build
# the records straight from their field dictionaries, about three times faster than
# through the dataclass constructors (Table.decode). Same records, same types.
_JOB_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Job)}
_JOB_STATES = dict(JobState._value2member_map_)
_DEVICE_STATES = dict(DeviceState._value2member_map_)
_DEVICE_HEALTHS = dict(DeviceHealth._value2member_map_)


def decode_queued_job(row):
    """A QUEUED_JOBS row -> Job (what QUEUED_JOBS.decode returns)."""
    (job_id, state, submitter, device_type, tags, priority, submit_time, health_check,
     group, sub_id) = row
    fields = _JOB_DEFAULTS.copy()
    fields.update(id=job_id, state=_JOB_STATES[state], submitter=submitter,
                  requested_device_type=device_type, tags=_tags_in(tags), priority=priority,
                  submit_time=submit_time, health_check=bool(health_check),
                  target_group=group, sub_id=sub_id)
    job = object.__new__(Job)
    job.__dict__ = fields
    return job


def _device(row):
    """A DEVICES row -> Device (what DEVICES.decode returns)."""
    (hostname, device_type, worker, state, health, tags, is_public, description, last_check,
     current_job) = row
    device = object.__new__(Device)
    device.__dict__ = {
        "hostname": hostname, "device_type": device_type, "worker": worker,
        "state": _DEVICE_STATES[state], "health": _DEVICE_HEALTHS[health],
        "tags": _tags_in(tags), "is_public": bool(is_public), "description": description,
        "last_health_report_job": last_check, "current_job": current_job}
    return device
TOKEN_FIELDS = ("id", "username", "description", "created", "last_used", "expires")


def _visible(job_filter):
    return None if job_filter is None else job_filter.sql()


class SQLStorage(AccountStorage):
    """The storage interface over a DB-API connection. Subclasses provide:

    ``_connection()`` (a context manager yielding a connection for this greenlet),
    ``_ddl`` (the CREATE statements of SCHEMA_VERSION), ``placeholder`` ("?" or "%s"),
    ``_for_update`` (row-lock suffix of a SELECT: "" on SQLite), ``_begin(conn)``, and
    optionally ``publish_event``/``listen_events`` for cross-process notifications.
    """

    placeholder = "?"
    _for_update = ""
    name = "sql"

    def __init__(self):
        self._tx_lock = gevent.lock.RLock()
        self._tx_conn = None
        self._tx_depth = 0

    # -- connection and transactions ----------------------------------------------------

    def open(self):
        raise NotImplementedError

    def close(self):
        raise NotImplementedError

    def _sql(self, statement):
        if self.placeholder != "?":
            return statement.replace("?", self.placeholder)
        return statement

    @contextlib.contextmanager
    def transaction(self):
        """All statements inside run in one transaction of one connection. Re-entrant.

        A gevent lock serialises transactions of this process, so a greenlet that yields
        inside one (a green socket send) never lets another greenlet interleave statements.
        """
        with self._tx_lock:
            if self._tx_depth:
                self._tx_depth += 1
                try:
                    yield self._tx_conn
                finally:
                    self._tx_depth -= 1
                return
            with self._connection() as conn:
                self._begin(conn)
                self._tx_conn, self._tx_depth = conn, 1
                try:
                    yield conn
                except BaseException:
                    self._tx_conn, self._tx_depth = None, 0
                    self._rollback(conn)
                    raise
                self._tx_conn, self._tx_depth = None, 0
                timer = getattr(self, "statement_timer", None)
                if timer is None:
                    conn.commit()
                else:
                    clock, observe = timer
                    started = clock()
                    try:
                        conn.commit()
                    finally:
                        observe(clock() - started)

    def _rollback(self, conn):
        try:
            conn.rollback()
        except Exception:  # the connection may be the thing that failed
            pass

    def _execute(self, statement, params=()):
        # statement_timer (clock, observe), when a master's metrics set it (plugins/
        # metrics): the time the database took, not the wait for the transaction lock.
        timer = getattr(self, "statement_timer", None)
        with self.transaction() as conn:
            cursor = conn.cursor()
            if timer is None:
                cursor.execute(self._sql(statement), params)
                return cursor
            clock, observe = timer
            started = clock()
            try:
                cursor.execute(self._sql(statement), params)
            finally:
                observe(clock() - started)
            return cursor

    def _all(self, statement, params=()):
        return self._execute(statement, params).fetchall()

    def _one(self, statement, params=()):
        return self._execute(statement, params).fetchone()

    def _where(self, table, filters, extra=None):
        clauses, params = [], []
        if extra is not None:
            clauses.append(extra[0])
            params.extend(extra[1])
        for column, value in filters.items():
            if value is None:
                continue
            if isinstance(value, (list, tuple, set, frozenset)):
                values = [table.encode(column, v) for v in value]
                if not values:
                    clauses.append("1 = 0")
                    continue
                clauses.append("%s IN (%s)" % (column, ", ".join("?" * len(values))))
                params.extend(values)
            else:
                clauses.append("%s = ?" % column)
                params.append(table.encode(column, value))
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def _get(self, table, key, lock=False):
        row = self._one("%s WHERE %s = ?%s" % (table.select, table.key,
                                                self._for_update if lock else ""), (key,))
        if row is None:
            raise NotFound("%s %s does not exist" % (table.name.rstrip("s").replace("_", " "),
                                                     key))
        return table.decode(row)

    def _list(self, table, order, limit=None, offset=0, extra=None, **filters):
        where, params = self._where(table, filters, extra)
        statement = "%s%s ORDER BY %s" % (table.select, where, order)
        if limit is not None:
            statement += " LIMIT %d OFFSET %d" % (int(limit), int(offset))
        return [table.decode(row) for row in self._all(statement, params)]

    def _count(self, table, extra=None, **filters):
        where, params = self._where(table, filters, extra)
        return self._one("SELECT COUNT(*) FROM %s%s" % (table.name, where), params)[0]

    def _update(self, table, key, fields):
        if not fields:
            return
        sets = ", ".join("%s = ?" % column for column in fields)
        params = [table.encode(column, value) for column, value in fields.items()]
        cursor = self._execute("UPDATE %s SET %s WHERE %s = ?" % (table.name, sets, table.key),
                               params + [key])
        if cursor.rowcount == 0:
            raise NotFound("%s %s does not exist" % (table.name.rstrip("s"), key))

    def _insert(self, table, record, returning=False):
        values = {column: getattr(record, column) for column in table.names
                  if not (returning and column == table.key)}
        statement = "INSERT INTO %s (%s) VALUES (%s)" % (
            table.name, ", ".join(values), ", ".join("?" * len(values)))
        if returning:
            statement += " RETURNING %s" % table.key
        params = [table.encode(column, value) for column, value in values.items()]
        cursor = self._execute(statement, params)
        return cursor.fetchone()[0] if returning else None

    # -- schema -------------------------------------------------------------------------

    def schema_version(self):
        raise NotImplementedError

    def migrate(self):
        """Create or upgrade the schema to SCHEMA_VERSION; returns (old, new)."""
        raise NotImplementedError

    # -- workers ------------------------------------------------------------------------

    def get_worker(self, hostname):
        return self._get(WORKERS, hostname)

    def list_workers(self, **filters):
        return self._list(WORKERS, "hostname", **filters)

    def add_worker(self, worker):
        with self.transaction():
            self._execute(
                "INSERT INTO workers (hostname, state, health, last_ping, description, version)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (hostname) DO NOTHING",
                (worker.hostname, int(worker.state), int(worker.health), worker.last_ping,
                 worker.description, worker.version))
            return self.get_worker(worker.hostname)

    def update_worker(self, hostname, **fields):
        self._update(WORKERS, hostname, fields)

    def workers_alive(self, hostnames, now, description=""):
        """Workers heard from: each created if unknown, then Online with ``last_ping``
        ``now``; three statements per 500 hostnames, in one transaction. Returns
        (records of those that were not Online before, now Online; hostnames created)."""
        went_online, created = [], []
        hostnames = list(dict.fromkeys(hostnames))
        with self.transaction():
            for start in range(0, len(hostnames), ALIVE_CHUNK):
                chunk = hostnames[start:start + ALIVE_CHUNK]
                marks = ", ".join("?" * len(chunk))
                known = {w.hostname: w for w in (WORKERS.decode(row) for row in self._all(
                    "%s WHERE hostname IN (%s)" % (WORKERS.select, marks), chunk))}
                new = [Worker(h, description=description) for h in chunk if h not in known]
                if new:
                    self._execute(
                        "INSERT INTO workers (hostname, state, health, last_ping, description)"
                        " VALUES %s ON CONFLICT (hostname) DO NOTHING"
                        % ", ".join(["(?, ?, ?, ?, ?)"] * len(new)),
                        [value for w in new for value in (
                            w.hostname, int(w.state), int(w.health), w.last_ping,
                            w.description)])
                    created.extend(w.hostname for w in new)
                    known.update((w.hostname, w) for w in new)
                self._execute("UPDATE workers SET state = ?, last_ping = ? WHERE hostname"
                              " IN (%s)" % marks, [int(WorkerState.ONLINE), now] + chunk)
                for hostname in chunk:
                    worker = known[hostname]
                    if worker.state != WorkerState.ONLINE:
                        worker.state = WorkerState.ONLINE
                        went_online.append(worker)
                    worker.last_ping = now
        return went_online, created

    def set_all_workers_offline(self):
        self._execute("UPDATE workers SET state = ?", (int(WorkerState.OFFLINE),))

    # -- device types -------------------------------------------------------------------

    def get_device_type(self, name):
        return self._get(DEVICE_TYPES, name)

    def list_device_types(self, **filters):
        return self._list(DEVICE_TYPES, "name", **filters)

    def add_device_type(self, device_type):
        self._execute(
            "INSERT INTO device_types (name, description, display, health_disabled,"
            " health_frequency, health_denominator) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (name) DO NOTHING",
            (device_type.name, device_type.description, int(device_type.display),
             int(device_type.health_disabled), device_type.health_frequency,
             device_type.health_denominator))

    def update_device_type(self, name, **fields):
        self._update(DEVICE_TYPES, name, fields)

    # -- devices ------------------------------------------------------------------------

    def get_device(self, hostname, lock=False):
        return self._get(DEVICES, hostname, lock)

    def list_devices(self, **filters):
        return self._list(DEVICES, "hostname", **filters)

    def add_device(self, device):
        with self.transaction():
            self.add_device_type(DeviceType(device.device_type))
            if device.worker:
                self.add_worker(Worker(device.worker))
            self._insert(DEVICES, device)

    def update_device(self, hostname, **fields):
        self._update(DEVICES, hostname, fields)

    def available_devices(self, healths):
        """Idle devices of Online workers whose health is one of ``healths``."""
        marks = ", ".join("?" * len(healths))
        rows = self._all(
            "SELECT %s FROM devices d JOIN workers w ON w.hostname = d.worker"
            " WHERE d.state = ? AND w.state = ? AND d.health IN (%s)"
            " ORDER BY d.device_type, d.hostname"
            % (", ".join("d." + c for c in DEVICES.names), marks),
            [int(DeviceState.IDLE), int(WorkerState.ONLINE)] + [int(h) for h in healths])
        return [_device(row) for row in rows]

    # -- jobs ---------------------------------------------------------------------------

    def insert_jobs(self, jobs):
        """Queue ``jobs`` (Job records without ids) in one transaction; returns their ids.
        The groups that may see a group-visible job go to job_groups, where a listing can
        check "member of every one" in SQL."""
        if not any(job.viewing_groups for job in jobs):
            return self._insert_job_rows(jobs)
        with self.transaction() as conn:
            ids = self._insert_job_rows(jobs)
            conn.cursor().executemany(
                self._sql("INSERT INTO job_groups (job_id, group_name) VALUES (?, ?)"),
                [(job_id, group) for job_id, job in zip(ids, jobs)
                 for group in job.viewing_groups])
        return ids

    def _insert_job_rows(self, jobs):
        ids = []
        with self.transaction():
            for job in jobs:
                ids.append(self._insert(JOBS, job, returning=True))
        return ids

    def get_job(self, job_id, lock=False):
        job_id = int(job_id)
        if not 0 < job_id <= MAX_JOB_ID:
            # Not a value either engine can hold: no such job (never OverflowError).
            raise NotFound("job %d does not exist" % job_id)
        return self._get(JOBS, job_id, lock)

    def list_jobs(self, limit=None, offset=0, order="id", visible=None, **filters):
        """Jobs matching ``filters``; ``visible`` (a permissions.JobFilter) keeps those its
        user may see."""
        if order not in ("id", "-id", "submit_time", "-submit_time", "end_time", "-end_time"):
            raise ValueError("cannot order jobs by %r" % order)
        sql_order = order.lstrip("-") + (" DESC" if order.startswith("-") else "")
        return self._list(JOBS, sql_order, limit, offset, extra=_visible(visible), **filters)

    def count_jobs(self, visible=None, **filters):
        return self._count(JOBS, extra=_visible(visible), **filters)

    def list_job_summaries(self, limit, before=None, after=None, visible=None, **filters):
        """A page of jobs (without definitions) by id, for lists that page by key: newest
        first, with ids below ``before`` when given; with ``after``, the ``limit`` jobs
        just above it, still newest first. ``visible`` as in list_jobs."""
        extra = _visible(visible)
        clauses, params = ([extra[0]], list(extra[1])) if extra else ([], [])
        if before is not None:
            clauses.append("id < ?")
            params.append(int(before))
        if after is not None:
            clauses.append("id > ?")
            params.append(int(after))
        where, params = self._where(JOB_SUMMARIES, filters, (
            " AND ".join(clauses) or "1 = 1", params))
        statement = "%s%s ORDER BY id %s LIMIT %d" % (
            JOB_SUMMARIES.select, where, "ASC" if after is not None else "DESC", int(limit))
        found = [JOB_SUMMARIES.decode(row) for row in self._all(statement, params)]
        return found[::-1] if after is not None else found

    def count_jobs_upto(self, cap, visible=None, **filters):
        """How many jobs match, counting no further than ``cap`` (a bounded cost on a big
        table: a caller shows "more than cap")."""
        where, params = self._where(JOBS, filters, _visible(visible))
        return self._one("SELECT COUNT(*) FROM (SELECT 1 FROM jobs%s LIMIT %d) AS upto"
                         % (where, int(cap)), params)[0]

    def count_queued_by_type(self, visible=None):
        """{device type: number of queued (Submitted) jobs}, of those ``visible``."""
        where, params = self._where(JOBS, {"state": JobState.SUBMITTED}, _visible(visible))
        return dict(self._all("SELECT requested_device_type, COUNT(*) FROM jobs%s AND"
                              " requested_device_type IS NOT NULL GROUP BY"
                              " requested_device_type" % where, params))

    def queued_job_summaries(self, device_type, limit, offset=0, visible=None):
        """Queued jobs of ``device_type`` in the scheduler's order (see queued_jobs), of
        those ``visible``, without definitions."""
        where, params = self._where(JOBS, {"state": JobState.SUBMITTED,
                                           "requested_device_type": device_type},
                                    _visible(visible))
        rows = self._all("%s%s ORDER BY priority DESC, submit_time, target_group, id"
                         " LIMIT %d OFFSET %d" % (JOB_SUMMARIES.select, where, int(limit),
                                                  int(offset)), params)
        return [JOB_SUMMARIES.decode(row) for row in rows]

    def update_job(self, job_id, **fields):
        self._update(JOBS, int(job_id), fields)

    def advance_job(self, job_id, state, **fields):
        """Inside the caller's transaction: the job locked and moved to ``state`` (and
        ``fields``) unless it is there or beyond already. (job, its state before), or
        None when nothing changed; NotFound for no such job."""
        job = self.get_job(job_id, lock=True)
        if job.state >= state:
            return None
        old = job.state
        job.state = state
        for name, value in fields.items():
            setattr(job, name, value)
        self.update_job(job.id, state=state, **fields)
        return job, old

    def mark_running(self, job_id, now):
        """START_OK: the job Running since ``now`` and its device (if any) Running, in one
        transaction, unless the job is Running or beyond already. Returns (job, its state
        before, device or None), or None when nothing changed; NotFound for no such job."""
        with self.transaction():
            found = self.advance_job(job_id, JobState.RUNNING, start_time=now)
            if found is None:
                return None
            job, old = found
            device = None
            if job.actual_device:
                device = self.get_device(job.actual_device, lock=True)
                device.state = DeviceState.RUNNING
                self.update_device(device.hostname, state=device.state)
        return job, old, device

    # -- placing many jobs at once (a scheduling pass) ----------------------------------

    def claim_many(self, pairs):
        """For a scheduling decision, inside the caller's transaction: the jobs and the
        devices of ``pairs`` [(job id, hostname)], read and locked in a few statements:
        ({job id: Job}, {hostname: Device}), without those that do not exist."""
        ids = sorted({int(job_id) for job_id, _ in pairs if 0 < int(job_id) <= MAX_JOB_ID})
        names = sorted({hostname for _, hostname in pairs})
        jobs, devices = {}, {}
        with self.transaction():
            for start in range(0, len(ids), ALIVE_CHUNK):
                chunk = ids[start:start + ALIVE_CHUNK]
                for row in self._all("%s WHERE id IN (%s) ORDER BY id%s" % (
                        JOBS.select, ", ".join("?" * len(chunk)), self._for_update), chunk):
                    job = JOBS.decode(row)
                    jobs[job.id] = job
            for start in range(0, len(names), ALIVE_CHUNK):
                chunk = names[start:start + ALIVE_CHUNK]
                for row in self._all("%s WHERE hostname IN (%s) ORDER BY hostname%s" % (
                        DEVICES.select, ", ".join("?" * len(chunk)), self._for_update),
                        chunk):
                    device = _device(row)
                    devices[device.hostname] = device
        return jobs, devices

    def set_scheduled(self, placements):
        """``placements`` [(job id, hostname, worker)]: each job Scheduled on its device
        and worker, each device Reserved for its job; two statements however many."""
        with self.transaction():
            for start in range(0, len(placements), ALIVE_CHUNK):
                chunk = placements[start:start + ALIVE_CHUNK]
                # (typed: a prepared statement's parameters have no type of their own)
                rows = ", ".join(["(CAST(? AS BIGINT), CAST(? AS TEXT), CAST(? AS TEXT))"]
                                 * len(chunk))
                values = [value for job_id, hostname, worker in chunk
                          for value in (int(job_id), hostname, worker)]
                # UPDATE ... FROM (VALUES ...): one statement (one round trip) per chunk
                # on both engines; a VALUES list's columns are column1, column2, ...
                self._execute("UPDATE jobs SET state = ?, actual_device = v.column2,"
                              " worker = v.column3 FROM (VALUES %s) AS v WHERE jobs.id ="
                              " v.column1" % rows, [int(JobState.SCHEDULED)] + values)
                self._execute("UPDATE devices SET state = ?, current_job = v.column1 FROM"
                              " (VALUES %s) AS v WHERE devices.hostname = v.column2" % rows,
                              [int(DeviceState.RESERVED)] + values)

    def queued_jobs(self, device_type, limit=None, offset=0):
        """Submitted jobs for ``device_type`` in LAVA's order: priority first,
        then submit time, then group and id. Records without their definition texts."""
        statement = ("%s WHERE state = ? AND requested_device_type = ? AND actual_device IS NULL"
                     " ORDER BY %s" % (QUEUED_JOBS.select, QUEUE_ORDER))
        params = [int(JobState.SUBMITTED), device_type]
        if limit is not None:
            # Parameters, not text: one prepared statement (PostgreSQL) for every page.
            statement += " LIMIT ? OFFSET ?"
            params += [int(limit), int(offset)]
        return [decode_queued_job(row) for row in self._all(statement, params)]

    def jobs_awaiting_result(self):
        """Unfinished jobs whose END came with a description, waiting for their result."""
        rows = self._all("%s WHERE end_seen IS NOT NULL AND state != ?" % JOBS.select,
                         (int(JobState.FINISHED),))
        return [JOBS.decode(row) for row in rows]

    def queued_group_jobs(self):
        """Submitted members of multinode groups, in queue order (without definitions)."""
        # "> ''" rather than "!= ''": the target_group index then skips single jobs; and
        # "+state" so that SQLite's planner does not prefer the queue index on state, which
        # reads every queued job (100,000 queued: 110 ms instead of well under 1 ms).
        rows = self._all("%s WHERE target_group > '' AND +state = ?"
                         " ORDER BY priority DESC, submit_time, id" % QUEUED_JOBS.select,
                         (int(JobState.SUBMITTED),))
        return [QUEUED_JOBS.decode(row) for row in rows]

    def count_jobs_started_since(self, hostname, since):
        """Normal (not health-check) jobs started on ``hostname`` at or after ``since``."""
        return self._one("SELECT COUNT(*) FROM jobs WHERE actual_device = ? AND"
                         " health_check = 0 AND start_time >= ?", (hostname, since))[0]

    def queued_tag_sets_by_type(self, device_types=None):
        """{device type: [distinct tag sets (JSON text) of its queued jobs]}, in one
        statement (a scheduling pass asks for every type with idle devices):
        ``device_types`` only those types (a backend may read them alone), None every
        type.

        A loose index scan of the stream index: each step jumps to the next (type, tag
        set) present, so the cost follows the number of streams, not of queued jobs
        (100,000 queued in 200 streams: 2 ms on PostgreSQL, 0.4 ms on SQLite, against 25
        and 8 ms for SELECT DISTINCT, which reads every queued job's index entry). It
        walks backwards, landing on the last job of each stream: the first ones are those
        a pass just scheduled, whose index entries PostgreSQL keeps until a vacuum and
        checks against the table one by one."""
        queued = int(JobState.SUBMITTED)
        found = {}
        for device_type, tags in self._all(
                "WITH RECURSIVE streams (device_type, tags) AS ("
                " SELECT * FROM (SELECT requested_device_type, tags FROM jobs"
                " WHERE state = ? AND requested_device_type IS NOT NULL"
                " ORDER BY requested_device_type DESC, tags DESC LIMIT 1) AS last"
                " UNION ALL"
                " SELECT j.requested_device_type, j.tags FROM streams s, jobs j"
                " WHERE j.id = COALESCE("
                "(SELECT id FROM jobs WHERE state = ? AND requested_device_type = s.device_type"
                " AND tags < s.tags ORDER BY tags DESC LIMIT 1),"
                " (SELECT id FROM jobs WHERE state = ? AND requested_device_type < s.device_type"
                " ORDER BY requested_device_type DESC, tags DESC LIMIT 1)))"
                " SELECT device_type, tags FROM streams", (queued, queued, queued)):
            if device_types is None or device_type in device_types:
                found.setdefault(device_type, []).append(tags)
        return found

    def queued_jobs_tagged(self, device_type, tags, limit, offset=0):
        """Like queued_jobs, only the jobs whose tag set is exactly ``tags`` (JSON text)."""
        rows = self._all("%s WHERE state = ? AND requested_device_type = ? AND tags = ?"
                         " ORDER BY %s LIMIT ? OFFSET ?" % (QUEUED_JOBS.select, QUEUE_ORDER),
                         (int(JobState.SUBMITTED), device_type, tags, int(limit), int(offset)))
        return [decode_queued_job(row) for row in rows]

    def queued_stream_heads(self, streams):
        """The first jobs of several streams at once: ``streams`` lists (device type, tag
        set as JSON text, how many); returns {(device type, tags): [Job, ...]}, each list
        what queued_jobs_tagged(device type, tags, how many) returns (a stream listed
        twice: the larger). A backend whose statements cost a round trip reads them all
        in one."""
        sizes = {}
        for device_type, tags, size in streams:
            sizes[(device_type, tags)] = max(int(size), sizes.get((device_type, tags), 0))
        return {(device_type, tags): self.queued_jobs_tagged(device_type, tags, size)
                for (device_type, tags), size in sizes.items()}

    def queued_device_types(self):
        rows = self._all("SELECT DISTINCT requested_device_type FROM jobs WHERE state = ?"
                         " AND requested_device_type IS NOT NULL", (int(JobState.SUBMITTED),))
        return {row[0] for row in rows}

    # -- test results -------------------------------------------------------------------

    def add_testcases(self, cases):
        if not cases:
            return
        statement = self._sql(
            "INSERT INTO testcases (job_id, suite, name, result, measurement, units, metadata,"
            " logged) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
        with self.transaction() as conn:
            conn.cursor().executemany(statement, [
                (c.job_id, c.suite, c.name, c.result, c.measurement, c.units, c.metadata,
                 c.logged) for c in cases])

    def replace_testcases(self, job_id, cases):
        """The test cases of ``job_id`` become ``cases``, in one transaction."""
        with self.transaction():
            self._execute("DELETE FROM testcases WHERE job_id = ?", (int(job_id),))
            self.add_testcases(cases)

    def list_testcases(self, job_id, suite=None):
        return self._list(TESTCASES, "id", job_id=int(job_id), suite=suite)

    def list_testcases_page(self, job_id, limit, offset=0):
        return self._list(TESTCASES, "id", limit, offset, job_id=int(job_id))

    def testcase_counts(self, job_id):
        rows = self._all("SELECT result, COUNT(*) FROM testcases WHERE job_id = ?"
                         " GROUP BY result", (int(job_id),))
        return {result: count for result, count in rows}

    # -- tokens -------------------------------------------------------------------------

    def add_token(self, username, digest, description, now, expires=None):
        """Store a token's hash; returns its id."""
        with self.transaction():  # RETURNING's row is read before the commit
            return self._execute(
                "INSERT INTO tokens (username, digest, description, created, expires)"
                " VALUES (?, ?, ?, ?, ?) RETURNING id",
                (username, digest, description, now, expires)).fetchone()[0]

    def token_record(self, digest):
        """(id, username, expires, last_used) of the token with this hash, or None."""
        row = self._one("SELECT id, username, expires, last_used FROM tokens WHERE digest = ?",
                        (digest,))
        return tuple(row) if row else None

    def token_user(self, digest):
        record = self.token_record(digest)
        return record[1] if record else None

    def token_used(self, token_id, now):
        self._execute("UPDATE tokens SET last_used = ? WHERE id = ?", (now, int(token_id)))

    def list_tokens(self, username=None):
        """[{id, username, description, created, last_used, expires}] (never the hash)."""
        where, params = ("WHERE username = ?", (username,)) if username else ("", ())
        return [dict(zip(TOKEN_FIELDS, row)) for row in self._all(
            "SELECT %s FROM tokens %s ORDER BY id" % (", ".join(TOKEN_FIELDS), where), params)]

    def get_token(self, token_id):
        row = self._one("SELECT %s FROM tokens WHERE id = ?" % ", ".join(TOKEN_FIELDS),
                        (int(token_id),))
        if row is None:
            raise NotFound("token %s does not exist" % token_id)
        return dict(zip(TOKEN_FIELDS, row))

    def delete_token(self, token_id):
        return self._execute("DELETE FROM tokens WHERE id = ?", (int(token_id),)).rowcount

    # -- health and state history ---------------------------------------------------------

    def add_history(self, kind, name, old, new, username, reason, now):
        self._execute("INSERT INTO history (kind, name, old, new, username, reason, time)"
                      " VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (kind, name, old, new, username, reason, now))

    def list_history(self, kind, name, limit=100):
        rows = self._all("SELECT old, new, username, reason, time FROM history"
                         " WHERE kind = ? AND name = ? ORDER BY id DESC LIMIT %d" % int(limit),
                         (kind, name))
        return [{"old": r[0], "new": r[1], "user": r[2], "reason": r[3], "time": r[4]}
                for r in rows]

    # -- configuration kept in the database (set through the API) ------------------------

    def get_blob(self, kind, name):
        row = self._one("SELECT content FROM blobs WHERE kind = ? AND name = ?", (kind, name))
        return row[0] if row else None

    def blob_names(self):
        """{(kind, name)} of every blob stored."""
        return {(row[0], row[1]) for row in self._all("SELECT kind, name FROM blobs")}

    def blob_default(self, kind, name, content):
        """The stored blob, stored as ``content`` first if there is none: processes
        sharing the database that ask at once all get the one that was stored first."""
        with self.transaction():
            self._execute("INSERT INTO blobs (kind, name, content) VALUES (?, ?, ?)"
                          " ON CONFLICT (kind, name) DO NOTHING", (kind, name, content))
            return self.get_blob(kind, name)

    def set_blob(self, kind, name, content):
        with self.transaction():
            self._execute("DELETE FROM blobs WHERE kind = ? AND name = ?", (kind, name))
            if content is not None:
                self._execute("INSERT INTO blobs (kind, name, content) VALUES (?, ?, ?)",
                              (kind, name, content))

    # -- one active master per database ------------------------------------------------

    def acquire_leadership(self, stopping, on_lost=None):
        """Block (cooperatively) until this process may be the active master (True), or
        until the gevent Event ``stopping`` is set (False). ``on_lost()`` is called if the
        leadership is lost later. Backends with one process: True at once."""
        return True

    # -- cross-process notifications ------------------------------------------------------

    def publish_event(self, payload):
        """Hand an event (a JSON-able dict) to the running master; no-op by default."""

    def listen_events(self):
        """Return a listener with ``wait(timeout) -> [payload, ...]`` and ``close()``, or
        None when this backend has no cross-process channel."""
        return None


# The tables as portable DDL; backends adapt the types (see each backend's _ddl).
DDL = [
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS workers (
        hostname TEXT PRIMARY KEY, state INTEGER NOT NULL DEFAULT 1,
        health INTEGER NOT NULL DEFAULT 0, last_ping {REAL}, description TEXT NOT NULL
        DEFAULT '', version TEXT)""",
    """CREATE TABLE IF NOT EXISTS device_types (
        name TEXT PRIMARY KEY, description TEXT NOT NULL DEFAULT '',
        display INTEGER NOT NULL DEFAULT 1, health_disabled INTEGER NOT NULL DEFAULT 0,
        health_frequency INTEGER NOT NULL DEFAULT 24,
        health_denominator TEXT NOT NULL DEFAULT 'hours')""",
    """CREATE TABLE IF NOT EXISTS devices (
        hostname TEXT PRIMARY KEY, device_type TEXT NOT NULL REFERENCES device_types(name),
        worker TEXT REFERENCES workers(hostname), state INTEGER NOT NULL DEFAULT 0,
        health INTEGER NOT NULL DEFAULT 4, tags TEXT NOT NULL DEFAULT '[]',
        is_public INTEGER NOT NULL DEFAULT 1, description TEXT NOT NULL DEFAULT '',
        last_health_report_job {BIGINT}, current_job {BIGINT})""",
    """CREATE TABLE IF NOT EXISTS jobs (
        id {SERIAL}, state INTEGER NOT NULL DEFAULT 0,
        health INTEGER NOT NULL DEFAULT 0, submitter TEXT NOT NULL DEFAULT '',
        description TEXT NOT NULL DEFAULT '', requested_device_type TEXT,
        actual_device TEXT, worker TEXT, tags TEXT NOT NULL DEFAULT '[]',
        priority INTEGER NOT NULL DEFAULT 50, visibility TEXT NOT NULL DEFAULT 'public',
        submit_time {REAL}, start_time {REAL}, end_time {REAL}, definition TEXT NOT NULL,
        original_definition TEXT NOT NULL, failure_comment TEXT,
        health_check INTEGER NOT NULL DEFAULT 0, target_group TEXT NOT NULL DEFAULT '',
        sub_id TEXT NOT NULL DEFAULT '', infrastructure_error INTEGER NOT NULL DEFAULT 0,
        result TEXT, error_type TEXT, error_msg TEXT, end_seen {REAL},
        viewing_groups TEXT NOT NULL DEFAULT '[]')""",
    # Schema 5: the queue of a type, and each queued tag set of a type (the scheduler's
    # streams), in the queue's order (QUEUE_ORDER), so that a page is read in index
    # order, with no sort of the rest of the queue. The stream index also holds the
    # other columns the scheduler reads (QUEUED_JOBS): SQLite then never reads the rows,
    # where these columns come after the definition texts. They replace jobs_queue and
    # jobs_queue_tags (schema 1 and 2), whose order was not the queue's.
    "CREATE INDEX IF NOT EXISTS jobs_queue_order ON jobs"
    " (state, requested_device_type, priority DESC, submit_time, target_group, id)",
    "CREATE INDEX IF NOT EXISTS jobs_queue_stream ON jobs"
    " (state, requested_device_type, tags, priority DESC, submit_time, target_group, id,"
    " health_check, submitter, sub_id)",
    "CREATE INDEX IF NOT EXISTS jobs_worker ON jobs (worker, state)",
    "CREATE INDEX IF NOT EXISTS jobs_group ON jobs (target_group)",
    # Schema 4: the job list's filters, each walked newest first (the web pages page by
    # id), and a device's recent jobs.
    "CREATE INDEX IF NOT EXISTS jobs_state_id ON jobs (state, id)",
    "CREATE INDEX IF NOT EXISTS jobs_health_id ON jobs (health, id)",
    "CREATE INDEX IF NOT EXISTS jobs_type_id ON jobs (requested_device_type, id)",
    "CREATE INDEX IF NOT EXISTS jobs_submitter_id ON jobs (submitter, id)",
    "CREATE INDEX IF NOT EXISTS jobs_device_id ON jobs (actual_device, id)",
    """CREATE TABLE IF NOT EXISTS testcases (
        id {SERIAL}, job_id {BIGINT} NOT NULL, suite TEXT NOT NULL, name TEXT NOT NULL,
        result TEXT NOT NULL, measurement TEXT, units TEXT, metadata TEXT, logged {REAL})""",
    "CREATE INDEX IF NOT EXISTS testcases_job ON testcases (job_id)",
    """CREATE TABLE IF NOT EXISTS tokens (
        id {SERIAL}, username TEXT NOT NULL, digest TEXT NOT NULL UNIQUE,
        description TEXT NOT NULL DEFAULT '', created {REAL}, last_used {REAL},
        expires {REAL})""",
    """CREATE TABLE IF NOT EXISTS history (
        id {SERIAL}, kind TEXT NOT NULL, name TEXT NOT NULL, old TEXT, new TEXT,
        username TEXT, reason TEXT, time {REAL})""",
    "CREATE INDEX IF NOT EXISTS history_name ON history (kind, name)",
    """CREATE TABLE IF NOT EXISTS blobs (
        kind TEXT NOT NULL, name TEXT NOT NULL, content TEXT, PRIMARY KEY (kind, name))""",
    # Schema 3: who may do what (lavacore/permissions.py), and the audit trail.
    """CREATE TABLE IF NOT EXISTS users (
        username TEXT PRIMARY KEY, first_name TEXT NOT NULL DEFAULT '',
        last_name TEXT NOT NULL DEFAULT '', email TEXT NOT NULL DEFAULT '',
        is_active INTEGER NOT NULL DEFAULT 1, is_staff INTEGER NOT NULL DEFAULT 0,
        is_superuser INTEGER NOT NULL DEFAULT 0, date_joined {REAL}, last_login {REAL})""",
    "CREATE TABLE IF NOT EXISTS user_groups (name TEXT PRIMARY KEY)",
    """CREATE TABLE IF NOT EXISTS group_members (
        group_name TEXT NOT NULL, username TEXT NOT NULL, PRIMARY KEY (group_name, username))""",
    "CREATE INDEX IF NOT EXISTS group_members_user ON group_members (username)",
    # Model-wide permissions (LAVA's Django permissions: app, model, codename) of a user
    # or a group.
    """CREATE TABLE IF NOT EXISTS permissions (
        holder_kind TEXT NOT NULL, holder TEXT NOT NULL, app TEXT NOT NULL,
        model TEXT NOT NULL, codename TEXT NOT NULL,
        PRIMARY KEY (holder_kind, holder, app, model, codename))""",
    # Per-object permissions of groups (LAVA's GroupDeviceTypePermission and
    # GroupDevicePermission): kind 'devicetype' or 'device'.
    """CREATE TABLE IF NOT EXISTS object_permissions (
        kind TEXT NOT NULL, name TEXT NOT NULL, group_name TEXT NOT NULL,
        codename TEXT NOT NULL, PRIMARY KEY (kind, name, group_name, codename))""",
    "CREATE TABLE IF NOT EXISTS tags (name TEXT PRIMARY KEY, description TEXT NOT NULL DEFAULT '')",
    """CREATE TABLE IF NOT EXISTS job_groups (
        job_id {BIGINT} NOT NULL, group_name TEXT NOT NULL, PRIMARY KEY (job_id, group_name))""",
    "CREATE TABLE IF NOT EXISTS aliases (name TEXT PRIMARY KEY, device_type TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS artifact_tokens (
        username TEXT NOT NULL, name TEXT NOT NULL, token TEXT NOT NULL,
        PRIMARY KEY (username, name))""",
    """CREATE TABLE IF NOT EXISTS audit (
        id {SERIAL}, time {REAL}, username TEXT, kind TEXT NOT NULL, name TEXT NOT NULL,
        action TEXT NOT NULL, before TEXT, after TEXT)""",
    "CREATE INDEX IF NOT EXISTS audit_object ON audit (kind, name)",
    "CREATE INDEX IF NOT EXISTS audit_time ON audit (time)",
]

# Columns added to tables of an earlier schema, by the version that added them; applied
# (after DDL) to a database of an older version only, since DDL creates new tables whole.
UPGRADES = {
    3: ["ALTER TABLE tokens ADD COLUMN last_used {REAL}",
        "ALTER TABLE tokens ADD COLUMN expires {REAL}",
        "ALTER TABLE jobs ADD COLUMN viewing_groups TEXT NOT NULL DEFAULT '[]'",
        # Token holders were users without a record: now plain users.
        "INSERT INTO users (username) SELECT DISTINCT username FROM tokens"
        " ON CONFLICT (username) DO NOTHING"],
    # 4 added indexes only: they are in DDL, which runs on every upgrade too.
    4: [],
    # 5: the queue indexes in the queue's order (in DDL) replace these.
    5: ["DROP INDEX IF EXISTS jobs_queue", "DROP INDEX IF EXISTS jobs_queue_tags"],
}


def upgrade_statements(old):
    """The UPGRADES a database at schema ``old`` needs (none for a new one)."""
    if old <= 0:
        return []
    return [statement for version in sorted(UPGRADES) if version > old
            for statement in UPGRADES[version]]
