"""The real PostgreSQL server for tests: one schema per test, its backends, the server.

The server is 127.0.0.1:5432, user postgres (trust), database test, unless
LAVACORE_TEST_PG_URL names another. Tests that need it fail (never skip) when it cannot be
reached: ``.ci/run`` starts it first.

Each test gets a schema of its own (``t_<random>``) and every connection lavacore opens
for it carries the application_name ``lavacore-<schema>``, so a test can terminate exactly
its own backends and concurrent runs do not collide.
"""

import glob
import importlib.metadata
import os
import subprocess
import time
import uuid

import gevent
import gevent.subprocess
import psycopg2
import pytest

PG_URL = os.environ.get("LAVACORE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
PLUGIN = "lavacore_plugins.storage_postgres"


def _connect(timeout):
    # libpq's connect_timeout does not apply under the gevent wait callback: bound it here.
    with gevent.Timeout(timeout, psycopg2.OperationalError("no answer within %ss" % timeout)):
        return psycopg2.connect(PG_URL, application_name="lavacore-tests")


def admin():
    """An autocommit connection to the test database (a failure fails the test)."""
    try:
        conn = _connect(10)
    except psycopg2.OperationalError as exc:
        pytest.fail("PostgreSQL test server %s unreachable (start it; .ci/run does): %s"
                    % (PG_URL, str(exc).strip().splitlines()[0]), pytrace=False)
    conn.autocommit = True
    return conn


def sql(statement, params=None, timeout=60):
    """Run one statement on a fresh admin connection; returns its rows (or [])."""
    conn = admin()
    try:
        with gevent.Timeout(timeout):
            cursor = conn.cursor()
            cursor.execute(statement, params)
            return cursor.fetchall() if cursor.description else []
    finally:
        conn.close()


def new_schema():
    return "t_" + uuid.uuid4().hex[:12]


def app_name(schema):
    return "lavacore-" + schema


def options(schema, **extra):
    opts = {"schema": schema, "application_name": app_name(schema)}
    opts.update(extra)
    return opts


def terminate(schema=None, application_name=None):
    """Terminate the backends of one test's lavacore connections; returns how many."""
    name = application_name or app_name(schema)
    rows = sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
               " WHERE application_name = %s AND pid <> pg_backend_pid()", (name,))
    return sum(1 for (done,) in rows if done)


def backends(schema=None, application_name=None):
    name = application_name or app_name(schema)
    return sql("SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = %s",
               (name,))[0][0]


def drop_schema(schema):
    ready()
    terminate(schema)
    sql('DROP SCHEMA IF EXISTS "%s" CASCADE' % schema)


def storage(schema, **extra):
    """An open, migrated PostgresStorage in ``schema``."""
    from lavacore_plugins.storage_postgres import PostgresStorage

    ready()
    st = PostgresStorage(PG_URL, **options(schema, **extra)).open()
    st.migrate()
    return st


def _entry_point_installed():
    return any(ep.name == "storage_postgres"
               for ep in importlib.metadata.entry_points(group="lavacore.plugins"))


def storage_lines(schema, **extra):
    """The [storage] lines of conftest.write_config for PostgreSQL in ``schema``."""
    opts = ", ".join("%s = %s" % (k, '"%s"' % v if isinstance(v, str) else v)
                     for k, v in options(schema, **extra).items())
    return ['backend = "postgres"', 'url = "%s"' % PG_URL, "options = { %s }" % opts]


def plugin_extra():
    """A [plugins] table loading the plugin by module path while its entry point is not
    installed yet (registering it both ways would be an error)."""
    if _entry_point_installed():
        return ""
    return '[plugins]\nmodules = ["%s"]\n' % PLUGIN


def schema_for_test():
    """Body of a test module's ``pg_schema`` fixture: a new schema, dropped afterwards
    (with the server brought back up first if the test stopped it)."""
    schema = new_schema()
    hold_server()
    try:
        ready()
        yield schema
        ensure_up()
        drop_schema(schema)
    finally:
        release_server()


# -- the server -----------------------------------------------------------------------------

# Runs of these tests at the same time on this machine (a CI run and a developer's) share
# the server: every PostgreSQL test holds a shared lock on this file, and a test that
# stops the server takes it exclusively first, so it never pulls the server from under
# another run's test (bounded: after LOCK_WAIT seconds it goes ahead anyway).
LOCK_PATH = os.path.join(os.environ.get("TMPDIR", "/tmp"), "lavacore-pg-tests.lock")
LOCK_WAIT = 60
_lock = {"fd": None, "depth": 0}


def hold_server():
    """Shared hold for one test (re-entrant within the process)."""
    import fcntl

    if _lock["depth"] == 0:
        _lock["fd"] = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
        _wait_flock(fcntl.LOCK_SH)
    _lock["depth"] += 1


def release_server():
    if _lock["depth"] == 0:
        return
    _lock["depth"] -= 1
    if _lock["depth"] == 0:
        os.close(_lock["fd"])  # releases the lock
        _lock["fd"] = None


def _wait_flock(mode):
    import fcntl

    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(_lock["fd"], mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            gevent.sleep(0.1)


class exclusive_server:
    """``with exclusive_server():`` around stopping the server (inside a held test)."""

    def __enter__(self):
        import fcntl

        hold_server()
        _wait_flock(fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl

        _wait_flock(fcntl.LOCK_SH)
        release_server()


def _cluster():
    versions = sorted(os.path.basename(p) for p in glob.glob("/etc/postgresql/*"))
    if not versions:
        pytest.fail("no PostgreSQL cluster in /etc/postgresql", pytrace=False)
    return versions[-1]


def _ctl(action, *args):
    cmd = ["pg_ctlcluster", "--skip-systemctl-redirect", _cluster(), "main", action, *args]
    proc = gevent.subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 and action != "start":
        raise AssertionError("%s failed: %s" % (" ".join(cmd), proc.stderr.strip()))
    return proc


def is_up():
    try:
        _connect(2).close()
        return True
    except psycopg2.OperationalError:
        return False


def ready(timeout=30):
    """Before a test: the server answers (another run's restart test may have it down for
    a few seconds); fails the test, with the reason, if it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not is_up() and time.monotonic() < deadline:
        gevent.sleep(0.2)
    sql("SELECT 1")


def wait_up(timeout=30):
    deadline = time.monotonic() + timeout
    while not is_up():
        if time.monotonic() > deadline:
            raise AssertionError("PostgreSQL did not come back within %ss" % timeout)
        gevent.sleep(0.1)


def stop_server():
    """Stop the server now (fast shutdown: every session is terminated)."""
    _ctl("stop", "-m", "fast")


def start_server():
    _ctl("start")
    wait_up()


def ensure_up():
    """The server is up again when a test ends, whatever happened in it."""
    if not is_up():
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", _cluster(), "main",
                        "start"], capture_output=True, timeout=60)
        wait_up()
