"""/health, as a load balancer or a service manager polls it: 200 while the master
serves, 503 with Retry-After and one line per problem when its loop stalled, a service
or a socket is gone, or its storage hangs or cannot be written. A real in-process master
over real HTTP; faults are real ones (a blocking SQLite statement, a killed greenlet, a
closed socket, a full filesystem, a PostgreSQL lock)."""

import json
import os
import time

import pytest

import pgutil
from apiutil import api_labs, wait_for
from lavacore import metrics
from lavacore.api import monitoring
from workerutil import fill_filesystem, small_filesystem


@pytest.fixture
def api(tmp_path):
    yield from api_labs(tmp_path)


def health(lab, method="GET"):
    status, headers, body = lab.http(method, "/health")
    return status, headers, (json.loads(body) if body else None)


def until_healthy(lab, timeout=10):
    wait_for(lambda: health(lab)[0] == 200, timeout=timeout, what="/health 200 again")


def test_a_serving_master_is_healthy(api):
    lab = api()
    status, headers, body = health(lab)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert body["status"] == "ok" and body["role"] == "active"
    assert body["storage"] == "sqlite" and body["storage_seconds"] < 1
    status, headers, body = health(lab, "HEAD")
    assert status == 200 and body is None
    # Asked often, the storage is probed at most once per probe_every.
    probes = metrics.of(lab.master).statements.count
    for _ in range(5):
        assert health(lab)[0] == 200
    assert metrics.of(lab.master).statements.count - probes <= 2


def test_only_get_and_head_without_a_body(api):
    lab = api()
    status, headers, body = lab.http("DELETE", "/health")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, _, body = lab.http("POST", "/health", body=b"{}")
    assert status == 405
    status, headers, body = lab.http("GET", "/health", body=b"{}")
    assert status == 400 and body == b"/health takes no request body\n"
    status, _, _ = lab.http("GET", "/health?verbose=1&%00")
    assert status == 200


def test_a_stalled_loop_is_503_then_healthy_again(api):
    """A statement that holds the loop (SQLite blocks it while it runs) is reported by
    the next request, and forgotten once the lag window is over."""
    lab = api()
    checks = monitoring.health(lab.master)
    checks.max_lag = 0.1
    metrics.of(lab.master).loop.window = 1.0
    assert health(lab)[0] == 200
    # Half a second of real SQLite work, never yielding to the loop.
    started = time.monotonic()
    while time.monotonic() - started < 0.5:
        lab.storage._one("WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n"
                         " WHERE x < 100000) SELECT COUNT(*) FROM n")
    status, headers, body = health(lab)
    assert status == 503, body
    assert headers["Retry-After"] == monitoring.RETRY_AFTER
    assert body["status"] == "unavailable"
    assert [p for p in body["problems"] if p.startswith("event loop: ")], body
    assert body["loop_lag_seconds"] >= 0.3
    until_healthy(lab)


def test_a_dead_service_is_named(api):
    lab = api()
    lab.master.scheduler.greenlet.kill()  # its loop ends; the master does not stop
    status, _, body = health(lab)
    assert status == 503
    assert "service scheduler: not running (its loop ended)" in body["problems"]


def test_a_closed_zmq_socket_is_named(api):
    lab = api()
    lab.master.events.socket.close(linger=0)
    status, _, body = health(lab)
    assert status == 503
    assert body["problems"] == ["service events: its ZeroMQ socket is closed"]


@pytest.mark.timeout(60)
def test_a_full_disk_under_sqlite_is_503_until_a_write_goes_through(api, tmp_path):
    small = tmp_path / "small"
    with small_filesystem(small, size="8m") as mounted:
        assert mounted, "mounting a tmpfs needs root: the tests run as root (.ci/run)"
        lab = api(storage=['backend = "sqlite"', 'url = "%s"' % (small / "lab.db")])
        monitoring.health(lab.master).probe_every = 0
        assert health(lab)[0] == 200
        filler = fill_filesystem(small)
        worker = lab.worker()  # its liveness cannot be written
        lab.wait_for(lambda: getattr(lab.master, "_storage_fault", None) is not None,
                     what="the master's failed write")
        status, _, body = health(lab)
        assert status == 503
        problem, = body["problems"]
        assert problem.startswith("storage: writes failing for ")
        os.unlink(filler)
        worker.send("PING")  # its liveness is written with the next message
        worker.expect("PONG")
        until_healthy(lab)
        lab.close()


@pytest.fixture
def pg_schema():
    yield from pgutil.schema_for_test()


@pytest.mark.timeout(60)
def test_postgresql_that_does_not_answer_is_503_within_the_bound(pg_schema, api):
    lab = api(storage=pgutil.storage_lines(pg_schema), extra=pgutil.plugin_extra())
    checks = monitoring.health(lab.master)
    checks.probe_every = 0
    checks.storage_timeout = 0.5
    status, _, body = health(lab)
    assert status == 200 and body["storage"] == "postgres"
    blocker = pgutil.admin()
    blocker.autocommit = False
    try:
        blocker.cursor().execute('LOCK TABLE "%s".schema_version IN ACCESS EXCLUSIVE MODE'
                                 % pg_schema)
        started = time.monotonic()
        status, _, body = health(lab)
        took = time.monotonic() - started
        assert status == 503
        assert body["problems"] == ["storage: no answer within 0.5 s"]
        assert took < 5, took
    finally:
        blocker.rollback()
        blocker.close()
    until_healthy(lab)


@pytest.mark.timeout(90, method="thread")
def test_a_stopped_postgresql_server_is_503_until_it_is_back_and_written(pg_schema, api):
    """The server stops: the probe cannot connect and the master lock is gone with its
    connection. Back up, the master takes its lock again; /health is 200 once the
    master's writes go through again (a worker's PING writes its liveness)."""
    lab = api(storage=pgutil.storage_lines(pg_schema, connect_timeout=1),
              extra=pgutil.plugin_extra())
    checks = monitoring.health(lab.master)
    checks.probe_every = 0
    worker = lab.worker()
    assert health(lab)[0] == 200
    with pgutil.exclusive_server():
        try:
            pgutil.stop_server()
            status, _, body = health(lab)
            assert status == 503
            problems = body["problems"]
            assert [p for p in problems if p.startswith("storage: PostgreSQL ")], problems
            lab.wait_for(lambda: not lab.storage.leadership.held, what="the lock lost")
            assert any(p.startswith("master lock: lost") for p in health(lab)[2]["problems"])
        finally:
            pgutil.start_server()
    lab.wait_for(lambda: lab.storage.leadership.held, timeout=20, what="the lock again")

    def written():
        worker.send("PING")
        worker.expect("PONG")
        return health(lab)[0] == 200

    lab.wait_for(written, timeout=20, what="/health 200 after the outage")


def test_systemd_watchdog_is_fed_only_while_every_service_runs(api, monkeypatch):
    """Under systemd (WatchdogSec=), WATCHDOG=1 goes out while every service of the
    master runs, and stops once one is gone, so systemd restarts the master."""
    import socket
    import uuid

    from lavacore import sdnotify

    name = "lavacore-test-%s" % uuid.uuid4().hex
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    monkeypatch.setenv("WATCHDOG_USEC", "20000")  # a beat every 10 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    lab = api()
    asked = []

    def alive():
        asked.append(lab.master.services_run())
        return asked[-1]

    fed = []
    feeder = sdnotify.start_watchdog(alive=alive)
    try:
        wait_for(lambda: fed.extend(_pending(sock)) or fed.count("WATCHDOG=1") >= 2,
                 timeout=10, what="two WATCHDOG=1")
        assert all(asked) and set(fed) == {"WATCHDOG=1"}
        lab.master.scheduler.greenlet.kill()
        assert not lab.master.services_run()
        _pending(sock)
        # Two more beats ask, and find a service gone: datagrams are queued on sendto,
        # so any WATCHDOG=1 sent by them would be waiting here now.
        seen = len(asked)
        wait_for(lambda: len(asked) >= seen + 2, timeout=10, what="two more beats")
        assert asked[-2:] == [False, False]
        assert _pending(sock) == []
    finally:
        feeder.kill()
        sock.close()


def _pending(sock):
    """The datagrams waiting on ``sock`` now, in order."""
    got = []
    while True:
        try:
            got.append(sock.recv(4096).decode())
        except BlockingIOError:
            return got
