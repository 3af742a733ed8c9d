"""The database commands: ``lavacore db migrate | check | copy --to URL``.

They work on any SQLStorage backend (SQLite, PostgreSQL) through its portable SQL:

- ``db_migrate(storage) -> (old, new)`` creates or upgrades the schema;
- ``db_check(storage) -> [problem, ...]`` reports, one line each, what is wrong: a schema
  that is not this lavacore's, missing tables or columns, and records that contradict
  each other (a device Reserved for no job, a job Running on a device that does not know
  it, test cases of a job that does not exist...). An empty list means all is well;
- ``db_copy(source, target) -> {table: rows}`` copies a whole lab (SQLite -> PostgreSQL,
  or back) with its ids, in one transaction of the target, and checks the counts.

Open the storages without migrating them for ``check`` (so an old schema is reported, not
silently upgraded); ``open_storage_url`` opens a copy target from a URL.
"""

import dataclasses

from .storage import (DEVICE_TYPES, DEVICES, JOBS, SCHEMA_VERSION, TESTCASES, WORKERS,
                      StorageError)
from .accountstore import USER_COLUMNS
from .states import DeviceState, JobHealth, JobState

# Copy order: a table comes after those it refers to. (name, key columns, columns)
TABLES = (
    ("device_types", "name", DEVICE_TYPES.names),
    ("workers", "hostname", WORKERS.names),
    ("devices", "hostname", DEVICES.names),
    ("jobs", "id", JOBS.names),
    ("testcases", "id", TESTCASES.names),
    ("tokens", "id", ("id", "username", "digest", "description", "created", "last_used",
                      "expires")),
    ("history", "id", ("id", "kind", "name", "old", "new", "username", "reason", "time")),
    ("blobs", "kind, name", ("kind", "name", "content")),
    ("users", "username", USER_COLUMNS),
    ("user_groups", "name", ("name",)),
    ("group_members", "group_name, username", ("group_name", "username")),
    ("permissions", "holder_kind, holder, app, model, codename",
     ("holder_kind", "holder", "app", "model", "codename")),
    ("object_permissions", "kind, name, group_name, codename",
     ("kind", "name", "group_name", "codename")),
    ("tags", "name", ("name", "description")),
    ("job_groups", "job_id, group_name", ("job_id", "group_name")),
    ("aliases", "name", ("name", "device_type")),
    ("artifact_tokens", "username, name", ("username", "name", "token")),
    ("audit", "id", ("id", "time", "username", "kind", "name", "action", "before", "after")),
)

BATCH = 2000


class CopyError(StorageError):
    """A copy that could not be made (a one-line reason); nothing was written."""


def db_migrate(storage):
    """Create or upgrade the schema; returns (old version, new version)."""
    return storage.migrate()


# -- check ----------------------------------------------------------------------------------

def _columns(storage, table):
    """The column names of ``table``, or None if it cannot be read."""
    try:
        result = storage._execute("SELECT * FROM %s LIMIT 0" % table)
        return [d[0].lower() for d in result.description]
    except Exception:  # a missing table: sqlite3 and psycopg2 raise different types
        return None


_ACTIVE = (int(JobState.SCHEDULING), int(JobState.SCHEDULED), int(JobState.RUNNING),
           int(JobState.CANCELING))
_BUSY = (int(DeviceState.RESERVED), int(DeviceState.RUNNING))


def _marks(values):
    return ", ".join("?" * len(values))


# (what is wrong, SQL returning one identifying value per bad record, parameters)
CHECKS = (
    ("device %s: its device type does not exist",
     "SELECT d.hostname FROM devices d LEFT JOIN device_types t ON t.name = d.device_type"
     " WHERE t.name IS NULL", ()),
    ("device %s: its worker does not exist",
     "SELECT d.hostname FROM devices d LEFT JOIN workers w ON w.hostname = d.worker"
     " WHERE d.worker IS NOT NULL AND w.hostname IS NULL", ()),
    ("device %s: Reserved or Running for no job, or for a job that is not active on it",
     "SELECT d.hostname FROM devices d LEFT JOIN jobs j ON j.id = d.current_job"
     " WHERE d.state IN (%s) AND (j.id IS NULL OR j.actual_device IS NULL"
     " OR j.actual_device != d.hostname OR j.state NOT IN (%s))"
     % (_marks(_BUSY), _marks(_ACTIVE)), _BUSY + _ACTIVE),
    ("device %s: Idle but its current job is set",
     "SELECT hostname FROM devices WHERE state = ? AND current_job IS NOT NULL",
     (int(DeviceState.IDLE),)),
    ("job %s: active on a device that does not exist",
     "SELECT j.id FROM jobs j LEFT JOIN devices d ON d.hostname = j.actual_device"
     " WHERE j.state IN (%s) AND j.actual_device IS NOT NULL AND d.hostname IS NULL"
     % _marks(_ACTIVE), _ACTIVE),
    ("job %s: active on a device whose current job is another",
     "SELECT j.id FROM jobs j JOIN devices d ON d.hostname = j.actual_device"
     " WHERE j.state IN (%s) AND (d.current_job IS NULL OR d.current_job != j.id)"
     % _marks(_ACTIVE), _ACTIVE),
    ("job %s: Submitted but already placed on a device",
     "SELECT id FROM jobs WHERE state = ? AND actual_device IS NOT NULL",
     (int(JobState.SUBMITTED),)),
    ("job %s: Finished with health Unknown",
     "SELECT id FROM jobs WHERE state = ? AND health = ?",
     (int(JobState.FINISHED), int(JobHealth.UNKNOWN))),
    ("job %s: not Finished but has a health",
     "SELECT id FROM jobs WHERE state != ? AND health != ?",
     (int(JobState.FINISHED), int(JobHealth.UNKNOWN))),
    ("job %s: has test cases but does not exist",
     "SELECT DISTINCT t.job_id FROM testcases t LEFT JOIN jobs j ON j.id = t.job_id"
     " WHERE j.id IS NULL", ()),
)

MAX_LISTED = 20


def db_check(storage):
    """What is wrong with the database behind ``storage``: a list of one-line problems,
    empty when nothing is."""
    problems = []
    try:
        version = storage.schema_version()
    except StorageError as exc:
        return ["cannot read the schema version: %s" % exc]
    if version == 0:
        return ["no lavacore schema in this database: run 'lavacore db migrate'"]
    if version < SCHEMA_VERSION:
        problems.append("schema version %d is older than this lavacore's (%d): run"
                        " 'lavacore db migrate'" % (version, SCHEMA_VERSION))
    elif version > SCHEMA_VERSION:
        return ["schema version %d is newer than this lavacore's (%d): upgrade lavacore"
                % (version, SCHEMA_VERSION)]
    readable = True
    for table, _key, columns in TABLES:
        found = _columns(storage, table)
        if found is None:
            problems.append("table %s: missing" % table)
            readable = False
            continue
        missing = [c for c in columns if c not in found]
        if missing:
            problems.append("table %s: missing column(s) %s" % (table, ", ".join(missing)))
            readable = False
    if not readable:
        return problems
    for what, statement, params in CHECKS:
        rows = storage._all(statement, params)
        for row in rows[:MAX_LISTED]:
            problems.append(what % row[0])
        if len(rows) > MAX_LISTED:
            problems.append("... and %d more like: %s" % (len(rows) - MAX_LISTED,
                                                           what % rows[MAX_LISTED][0]))
    return problems


# -- copy -----------------------------------------------------------------------------------

def _master_running(storage):
    """True if a master runs on ``storage`` (its data could change during a copy)."""
    check = getattr(storage, "master_running", None)
    if check is not None:
        return check()
    try:
        listener = storage.listen_events()
    except StorageError:  # SQLite: the master's notification socket is bound
        return True
    if listener is not None:
        listener.close()
    return False


def _rows(storage, table, key, columns):
    """All rows of ``table`` in key order, read in pages (keyset on single keys)."""
    select = "SELECT %s FROM %s" % (", ".join(columns), table)
    if "," in key:
        yield from storage._all(select + " ORDER BY " + key)
        return
    index = columns.index(key)
    last = None
    while True:
        if last is None:
            page = storage._all("%s ORDER BY %s LIMIT %d" % (select, key, BATCH))
        else:
            page = storage._all("%s WHERE %s > ? ORDER BY %s LIMIT %d"
                                % (select, key, key, BATCH), (last,))
        yield from page
        if len(page) < BATCH:
            return
        last = page[-1][index]


def _insert(target, table, columns, rows):
    bulk = getattr(target, "insert_rows", None)
    if bulk is not None:
        bulk(table, columns, rows)
        return
    statement = target._sql("INSERT INTO %s (%s) VALUES (%s)"
                            % (table, ", ".join(columns), _marks(columns)))
    with target.transaction() as conn:
        conn.cursor().executemany(statement, rows)


def _count(storage, table):
    return storage._one("SELECT COUNT(*) FROM %s" % table)[0]


def db_copy(source, target, check_master=True):
    """Copy every record of ``source`` into ``target`` (both open; the target migrated and
    empty), ids included, in one transaction of the target: all of it or nothing. Returns
    {table: rows copied}. Raises CopyError (one line) when the copy cannot be made.

    Stop the master of the source first (refused otherwise): records it writes during the
    copy would be lost. Job output (logs, START files) is not in the database: it stays in
    [master] output_dir, which the new configuration should keep using."""
    if source.schema_version() != SCHEMA_VERSION:
        raise CopyError("the source database has schema %d, not %d: run 'lavacore db"
                        " migrate' on it first" % (source.schema_version(), SCHEMA_VERSION))
    if target.schema_version() != SCHEMA_VERSION:
        target.migrate()
    if check_master and _master_running(source):
        raise CopyError("a master is running on the source database: stop it first")
    if check_master and _master_running(target):
        raise CopyError("a master is running on the target database")
    for table, _key, _columns in TABLES:
        if _count(target, table):
            raise CopyError("the target database is not empty (table %s has rows): copy"
                            " into a new database or schema" % table)
    counts = {}
    with target.transaction():
        for table, key, columns in TABLES:
            counts[table] = 0
            batch = []
            for row in _rows(source, table, key, list(columns)):
                batch.append(tuple(row))
                if len(batch) >= BATCH:
                    _insert(target, table, columns, batch)
                    counts[table] += len(batch)
                    batch = []
            if batch:
                _insert(target, table, columns, batch)
                counts[table] += len(batch)
        reset = getattr(target, "reset_sequences", None)
        if reset is not None:
            reset()
        for table, _key, _columns in TABLES:
            copied = _count(target, table)
            if copied != counts[table] or copied != _count(source, table):
                raise CopyError("table %s: %d rows read, %d in the target, %d in the"
                                " source now; nothing was copied" % (
                                    table, counts[table], copied, _count(source, table)))
    return counts


def open_storage_url(config, pm, url, options=None):
    """Open (and migrate) the storage a URL names, with this config's plugins:
    postgresql://... or postgres://... -> the "postgres" backend; anything else is an
    SQLite file path (relative to the config file's directory)."""
    from .config import ConfigError, StorageConfig

    backend = "postgres" if url.split(":", 1)[0] in ("postgresql", "postgres") else "sqlite"
    copy = dataclasses.replace(config, storage=StorageConfig(backend, url, dict(options or {})))
    storage = pm.hook.storage(config=copy)
    if storage is None:
        raise ConfigError("--to %s: no storage plugin named %r is installed" % (url, backend))
    storage.open()
    storage.migrate()
    return storage
