"""PostgreSQL only: gevent behaviour, faults (terminated backends, a restarted server),
several processes on one database (CLI wake-ups, a standby master), and db copy/check.

Everything runs against the real server (see pgutil); a test that cannot reach it fails.
"""

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import gevent
import gevent.event
import gevent.subprocess
import psycopg2
import pytest
import zmq.green as zmq

from conftest import ScriptedWorker, job_yaml, write_config
from lavacore import config as config_mod
from lavacore import dbtools, plugins
from lavacore.config import ConfigError
from lavacore.logformat import make_line, result_line
from lavacore.models import Device, Job, Worker
from lavacore.models import TestCase as Case
from lavacore.states import DeviceHealth, DeviceState, JobHealth, JobState
from lavacore.storage import SCHEMA_VERSION, StorageError

import pgutil
from pgutil import PG_URL

# The thread method: a test stuck in the gevent hub fails the run instead of hanging it.
pytestmark = pytest.mark.timeout(60, method="thread")

ROUTINE = (b"PONG", b"HELLO_OK", b"START", b"STATUS")  # resent or routine: not asserted on


@pytest.fixture
def pg_schema():
    yield from pgutil.schema_for_test()


def pg_lab(lab, schema, master=None, **storage_options):
    return lab(storage=pgutil.storage_lines(schema, **storage_options),
               extra=pgutil.plugin_extra(), master=master)


def safe(fn, default=None):
    """A read from the test's side that may meet the database away."""
    try:
        return fn()
    except StorageError:
        return default


def output_text(lab, job_id):
    job = lab.job(job_id)
    path = os.path.join(job.output_dir(lab.master.output_root), "output.yaml")
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


def until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        gevent.sleep(0.02)


# -- configuration and connections ----------------------------------------------------------

def test_config_errors_are_one_line(tmp_path):
    def storage_for(lines):
        path = write_config(tmp_path, storage=lines, extra=pgutil.plugin_extra())
        config = config_mod.load(path)
        return plugins.build(config).hook.storage(config=config)

    with pytest.raises(ConfigError, match=r"^\[storage\] url: 'var/x.db' is not a libpq URL"):
        storage_for(['backend = "postgres"', 'url = "var/x.db"'])
    with pytest.raises(ConfigError, match=r"^\[storage\] options: unknown key poolsize"):
        storage_for(['backend = "postgres"', 'url = "%s"' % PG_URL,
                     "options = { poolsize = 3 }"])
    with pytest.raises(ConfigError, match=r"^\[storage\] options schema: 'a-b' is not"):
        storage_for(['backend = "postgres"', 'url = "%s"' % PG_URL,
                     'options = { schema = "a-b" }'])
    st = storage_for(['backend = "postgresql"', 'url = "%s"' % PG_URL,
                      'options = { pool_size = 3, schema = "x1" }'])
    assert (st.name, st.pool_size, st.schema) == ("postgres", 3, "x1")


def test_unreachable_server_is_a_one_line_error_at_once(tmp_path):
    from lavacore_plugins.storage_postgres import PostgresStorage

    st = PostgresStorage("postgresql://postgres@127.0.0.1:1/test")
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        st.open()
    assert time.monotonic() - started < 3
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        "PostgreSQL postgres@127.0.0.1:1/test: cannot connect:")
    # The command line says it the same way, without a traceback.
    path = write_config(tmp_path, storage=['backend = "postgres"',
                                           'url = "postgresql://postgres@127.0.0.1:1/test"'],
                        extra=pgutil.plugin_extra())
    proc = subprocess.run([sys.executable, "-m", "lavacore.cli", "-c", path, "jobs", "list"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "cannot connect" in proc.stderr


def test_queries_wait_cooperatively(pg_schema):
    st = pgutil.storage(pg_schema, pool_size=5)
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(1000)])
    try:
        started = time.monotonic()
        sleepers = [gevent.spawn(st._one, "SELECT pg_sleep(1)") for _ in range(5)]
        gevent.joinall(sleepers, raise_error=True)
        elapsed = time.monotonic() - started
    finally:
        ticker.kill()
        st.close()
    assert elapsed < 3.5, elapsed       # five 1 s queries at once, not one after another
    assert len(ticks) >= 20             # and the hub kept running meanwhile


def test_a_killed_query_never_leaves_a_broken_connection_in_the_pool(pg_schema):
    st = pgutil.storage(pg_schema, pool_size=2)
    try:
        busy = gevent.spawn(st._one, "SELECT pg_sleep(5)")
        gevent.sleep(0.1)
        busy.kill()
        with pytest.raises(gevent.Timeout):
            with gevent.Timeout(0.1):
                with st.transaction():
                    st._one("SELECT pg_sleep(5)")
        assert all(conn.closed == 0 for conn in st.pool._idle)
        assert st.pool.discarded >= 2
        # Both slots came back: two transactions at once still work.
        results = gevent.joinall([gevent.spawn(st._one, "SELECT 1") for _ in range(2)],
                                 raise_error=True)
        assert [g.value for g in results] == [(1,), (1,)]
    finally:
        st.close()


def test_no_answer_within_io_timeout_is_a_storage_error(pg_schema):
    st = pgutil.storage(pg_schema, io_timeout=0.3)
    job_id = st.insert_jobs([Job(None, requested_device_type="qemu", definition="x",
                                 original_definition="x")])[0]
    holder = pgutil.admin()
    try:
        cursor = holder.cursor()
        cursor.execute('BEGIN; SELECT id FROM "%s".jobs WHERE id = %%s FOR UPDATE' % pg_schema,
                       (job_id,))
        with pytest.raises(StorageError, match="no answer from the server within 0.3s"):
            with st.transaction():
                st.get_job(job_id, lock=True)
        cursor.execute("ROLLBACK")
    finally:
        holder.close()
    assert st.get_job(job_id, lock=True).id == job_id
    st.close()


def test_terminated_backends_reconnect(pg_schema, caplog):
    st = pgutil.storage(pg_schema)
    try:
        st.add_worker(Worker("w1"))
        # Idle connections killed by the server are noticed when taken: no error at all.
        assert pgutil.terminate(pg_schema) >= 1
        until(lambda: pgutil.backends(pg_schema) == 0, 5, "backends gone")
        assert st.get_worker("w1").hostname == "w1"
        # Killed inside a transaction: one line, rolled back, and the next use reconnects.
        with pytest.raises(StorageError) as info:
            with st.transaction():
                st.update_worker("w1", description="lost")
                pgutil.terminate(pg_schema)
                st.update_worker("w1", version="lost too")
        assert "\n" not in str(info.value) and "PostgreSQL" in str(info.value)
        worker = st.get_worker("w1")
        assert (worker.description, worker.version) == ("", None)
        assert "connection lost" in caplog.text
    finally:
        st.close()


def test_prepared_statements_survive_failures_and_reconnects(pg_schema):
    st = pgutil.storage(pg_schema, pool_size=1)
    other = pgutil.storage(pg_schema, prepare=False)
    try:
        other.add_token("alice", "taken", "", 1.0)
        # The first run of this INSERT on the connection fails after its PREPARE went out:
        # the next run prepares it again under another name instead of failing for ever.
        with pytest.raises(psycopg2.IntegrityError):
            st.add_token("bob", "taken", "", 2.0)
        st.add_token("bob", "free", "", 2.0)
        st.add_token("carol", "free too", "", 3.0)
        assert other.token_user("free too") == "carol"
        conn = st.pool._idle[0]
        assert len(conn.prepared) >= 1 and not other.pool._idle[0].prepared
        pgutil.terminate(pg_schema)
        assert st.token_user("free") == "bob"  # a new connection prepares afresh
        assert st.pool._idle[0] is not conn
    finally:
        st.close()
        other.close()


def test_claim_skips_rows_locked_by_another_process(pg_schema):
    st = pgutil.storage(pg_schema)
    other = pgutil.storage(pg_schema)
    try:
        st.add_device(Device("q1", "qemu", "w1", health=DeviceHealth.GOOD))
        ids = st.insert_jobs([Job(None, requested_device_type="qemu", definition="x",
                                  original_definition="x") for _ in range(2)])
        holding = gevent.event.Event()
        release = gevent.event.Event()

        def hold():
            with other.transaction():
                assert other.claim(ids[0], "q1") is not None
                holding.set()
                release.wait(5)

        holder = gevent.spawn(hold)
        holding.wait(5)
        with st.transaction():
            started = time.monotonic()
            assert st.claim(ids[0], "q1") is None      # locked: skipped, not waited for
            assert st.claim(ids[1], "q1") is None      # the device is locked too
            assert time.monotonic() - started < 1
        release.set()
        holder.join(5)
        with st.transaction():
            job, device = st.claim(ids[1], "q1")
        assert (job.id, device.hostname) == (ids[1], "q1")
        with st.transaction():
            assert st.claim(999999, "q1") is None
    finally:
        st.close()
        other.close()


def test_large_events_are_cut_to_fit_notify(pg_schema):
    st = pgutil.storage(pg_schema)
    listener = st.listen_events()
    try:
        assert st.publish_event({"kind": "testjob", "data": {
            "job": 7, "state": "Finished", "failure_comment": "x" * 50000}})
        got = []
        until(lambda: got.extend(listener.wait(0.2)) or got, 5, "the notification")
        assert got[0]["data"]["job"] == 7 and got[0]["data"]["state"] == "Finished"
        assert len(got[0]["data"]["failure_comment"]) < 1000
    finally:
        st.close()


def test_listener_listens_again_after_its_connection_drops(pg_schema, caplog):
    st = pgutil.storage(pg_schema, application_name="lavacore-%s-cli" % pg_schema)
    master_side = pgutil.storage(pg_schema)
    listener = master_side.listen_events()
    try:
        pgutil.terminate(pg_schema)  # the master's backends, the listener's among them
        got = []
        until(lambda: got.extend(listener.wait(0.2)) or got, 5, "the resync")
        assert got == [{"kind": "resync", "data": {}}]
        st.publish_event({"kind": "testjob", "data": {"job": 1}})
        got = []
        until(lambda: got.extend(listener.wait(0.2)) or got, 5, "the notification")
        assert got == [{"kind": "testjob", "data": {"job": 1}}]
    finally:
        st.close()
        master_side.close()


# -- the master when the database goes away -------------------------------------------------

def _resend_end_until_ok(worker, job_id, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.end(job_id)
        try:
            frames = worker.expect("END_OK", timeout=1.0, skip=(b"PONG", b"HELLO_OK",
                                                                 b"START", b"STATUS"))
        except AssertionError:
            continue
        if frames[1] == str(job_id).encode():
            return
    raise AssertionError("no END_OK for job %d" % job_id)


def _down_while_the_job_ends(lab, worker, job_id, caplog):
    try:
        pgutil.stop_server()
        assert not pgutil.is_up()
        worker.send("PING")
        worker.expect("PONG", timeout=2)
        for number in range(50):
            worker.log(job_id, make_line("info", "while down %d" % number))
        worker.log(job_id, result_line("0_smoke", "echo", "pass"))
        worker.log(job_id, result_line("lava", "job", "pass"))
        worker.end(job_id)
        gevent.sleep(0.5)
        worker.send("PING")
        frames = worker.expect("PONG", timeout=2, skip=())  # and no END_OK before it
        assert frames[0] == b"PONG"
        assert not lab.master._stopped.is_set()
        assert "unreachable" in caplog.text or "connection lost" in caplog.text
    finally:
        pgutil.start_server()


@pytest.mark.timeout(90, method="thread")
def test_server_restart_loses_no_job_end_or_log_line(pg_schema, lab, caplog, tmp_path):
    """PostgreSQL stopped while a job runs and its worker talks: PINGs are answered, END
    is not acknowledged until it is stored, log lines and results are kept and stored
    once the server is back; the job ends Complete with every line."""
    caplog.set_level(logging.INFO)
    lab = pg_lab(lab, pg_schema, master={"schedule_interval": 1})
    definition = tmp_path / "job.yaml"
    definition.write_text(job_yaml())
    worker = lab.worker()
    job_id = lab.submit()
    worker.expect("START")
    worker.send("START_OK", job_id)
    lab.wait_for(lambda: lab.job(job_id).state == JobState.RUNNING, what="Running")
    worker.log(job_id, make_line("info", "before the restart"))
    lab.wait_for(lambda: "before the restart" in output_text(lab, job_id), what="first line")
    with pgutil.exclusive_server():
        _down_while_the_job_ends(lab, worker, job_id, caplog)
    _resend_end_until_ok(worker, job_id)
    lab.wait_for(lambda: safe(lambda: lab.job(job_id).state) == JobState.FINISHED,
                 timeout=15, what="Finished")
    job = lab.job(job_id)
    assert job.health == JobHealth.COMPLETE, job.failure_comment
    text = output_text(lab, job_id)
    assert all("while down %d" % n in text for n in range(50))
    assert lab.storage.testcase_counts(job_id) == {"pass": 2}
    assert lab.storage.get_device("qemu01").state == DeviceState.IDLE
    assert "reachable again" in caplog.text
    # The master still holds its lock, and its listener listens again: a change made by
    # another process reaches it at once.
    until(lambda: lab.storage.leadership.held, 5, "the master lock taken again")
    proc = _cli(lab.config_path, "submit", str(definition))
    assert proc.returncode == 0, proc.stderr
    second = int(proc.stdout.split()[0])
    assert worker.expect("START", timeout=3)[1] == str(second).encode()


def test_terminated_backends_during_a_workload_lose_nothing(pg_schema, lab, caplog):
    """The master's connections are killed again and again while jobs run: every job ends
    Complete with every log line and result, and the workers hear PONG throughout."""
    devices = [("qemu%02d" % n, "qemu", "worker1", ()) for n in range(3)]
    lab = lab(storage=pgutil.storage_lines(pg_schema), extra=pgutil.plugin_extra(),
              devices=devices, master={"schedule_interval": 0.5})
    worker = lab.worker()
    ids = [lab.submit(name="job %d" % n) for n in range(9)]
    stop = gevent.event.Event()
    kills = []

    def terminator():
        while not stop.wait(0.03):
            kills.append(pgutil.terminate(pg_schema))

    killer = gevent.spawn(terminator)
    started, ended, acked = set(), {}, set()
    deadline = time.monotonic() + 25
    try:
        while len(acked) < len(ids):
            if time.monotonic() > deadline:
                states = {i: safe(lambda: (lab.job(i).state.display,
                                           lab.job(i).failure_comment)) for i in ids}
                raise AssertionError("jobs acknowledged: %s; states: %s"
                                     % (sorted(acked), states))
            try:
                frames = worker.recv(0.2)
            except AssertionError:
                frames = None
            if frames and frames[0] == b"START":
                job_id = int(frames[1])
                worker.send("START_OK", job_id)
                if job_id not in started:  # a resent START: the job already runs here
                    started.add(job_id)
                    for n in range(10):
                        worker.log(job_id, make_line("info", "job %d line %d" % (job_id, n)))
                    worker.log(job_id, result_line("lava", "job", "pass"))
                    worker.end(job_id)
                    ended[job_id] = time.monotonic()
            elif frames and frames[0] == b"END_OK":
                acked.add(int(frames[1]))
            elif frames and frames[0] == b"STATUS":
                pass
            for job_id, when in list(ended.items()):  # lava-slave resends END until END_OK
                if job_id not in acked and time.monotonic() - when > 0.5:
                    worker.end(job_id)
                    ended[job_id] = time.monotonic()
            if not frames:
                worker.send("PING")
                assert not lab.master._stopped.is_set(), "the master stopped"
                failed = safe(lambda: [(j.id, j.failure_comment) for j in lab.storage.list_jobs(
                    state=JobState.FINISHED) if j.health != JobHealth.COMPLETE], [])
                assert not failed, "jobs lost: %s" % failed
    finally:
        stop.set()
        killer.join(5)
    assert sum(kills) >= 3, kills
    lab.wait_for(lambda: all(safe(lambda: lab.job(i).state) == JobState.FINISHED
                             for i in ids), timeout=15, what="all Finished")
    for job_id in ids:
        job = lab.job(job_id)
        assert job.health == JobHealth.COMPLETE, (job_id, job.failure_comment)
        text = output_text(lab, job_id)
        assert all("job %d line %d" % (job_id, n) in text for n in range(10)), job_id
        assert lab.storage.testcase_counts(job_id) == {"pass": 1}


# -- other processes on the same database ---------------------------------------------------

def _cli(config_path, *args, input=None):
    return gevent.subprocess.run([sys.executable, "-m", "lavacore.cli", "-c", config_path,
                                  *args], capture_output=True, text=True, input=input,
                                 timeout=30)


def test_cli_changes_reach_the_master_at_once(pg_schema, lab, tmp_path):
    lab = pg_lab(lab, pg_schema, master={"schedule_interval": 600})
    worker = lab.worker()
    definition = tmp_path / "job.yaml"
    definition.write_text(job_yaml())
    proc = _cli(lab.config_path, "submit", str(definition))
    assert proc.returncode == 0, proc.stderr
    submitted = time.monotonic()
    job_id = int(proc.stdout.split()[0])
    assert worker.expect("START", timeout=3)[1] == str(job_id).encode()
    assert time.monotonic() - submitted < 2  # the wake-up, not the 600 s pass
    worker.send("START_OK", job_id)
    lab.wait_for(lambda: lab.job(job_id).state == JobState.RUNNING, what="Running")
    proc = _cli(lab.config_path, "jobs", "cancel", str(job_id))
    assert proc.returncode == 0, proc.stderr
    assert worker.expect("CANCEL", timeout=3)[1] == str(job_id).encode()


def test_another_process_storage_wakes_the_master(pg_schema, lab):
    """What a second API process does: write through its own storage, then notify."""
    from lavacore.flow import Flow
    from lavacore.jobs import submit

    lab = pg_lab(lab, pg_schema, master={"schedule_interval": 600})
    worker = lab.worker()
    api = pgutil.storage(pg_schema, application_name="lavacore-%s-api" % pg_schema)
    try:
        flow = Flow(api, lab.master.clock, lambda kind, data, username=None:
                    api.publish_event({"kind": kind, "data": data, "username": username}))
        jobs = submit(api, lab.master.hook, None, job_yaml(), "bob", time.time())
        flow.submitted(jobs)
        assert worker.expect("START", timeout=3)[1] == str(jobs[0].id).encode()
    finally:
        api.close()


def test_leadership_lost_to_another_master_calls_on_lost(pg_schema):
    first = pgutil.storage(pg_schema, application_name="lavacore-%s-a" % pg_schema,
                           leader_retry=1.0)
    second = pgutil.storage(pg_schema, application_name="lavacore-%s-b" % pg_schema,
                            leader_poll=0.05, takeover_grace=0)
    stopping = gevent.event.Event()
    lost = gevent.event.Event()
    try:
        assert first.acquire_leadership(stopping, on_lost=lost.set) is True
        standby = gevent.spawn(second.acquire_leadership, stopping)
        gevent.sleep(0.2)
        assert not standby.ready() and second.master_running()
        pgutil.terminate(application_name="lavacore-%s-a" % pg_schema)
        assert standby.get(timeout=5) is True
        assert lost.wait(5), "the first master was not told"
        assert not first.leadership.held and second.leadership.held
        # A standby stops waiting when its master is stopped.
        third = pgutil.storage(pg_schema)
        waiting = gevent.spawn(third.acquire_leadership, stopping)
        gevent.sleep(0.1)
        stopping.set()
        assert waiting.get(timeout=2) is False
        third.close()
    finally:
        first.close()
        second.close()


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


class Proc:
    """``lavacore -c CONFIG`` in a subprocess, its log lines collected by a thread."""

    def __init__(self, config_path):
        self.proc = subprocess.Popen([sys.executable, "-m", "lavacore.cli", "-c", config_path],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def text(self):
        return "".join(self.lines)

    def wait_for(self, pattern, timeout):
        until(lambda: re.search(pattern, self.text()) or self.proc.poll() is not None,
              timeout, pattern)
        assert re.search(pattern, self.text()), "%s not in:\n%s" % (pattern, self.text())

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(5)


@pytest.mark.timeout(90, method="thread")
def test_standby_master_takes_over_when_the_active_one_dies(pg_schema, tmp_path):
    listen, logs, events = _free_ports(3)
    config_path = write_config(
        tmp_path, storage=pgutil.storage_lines(pg_schema, leader_poll=0.2),
        extra=pgutil.plugin_extra(),
        master={"listen": "tcp://127.0.0.1:%d" % listen, "logs": "tcp://127.0.0.1:%d" % logs,
                "events": "tcp://127.0.0.1:%d" % events})
    definition = tmp_path / "job.yaml"
    definition.write_text(job_yaml())
    context = zmq.Context()
    masters = []
    worker = None
    try:
        active = Proc(config_path)
        masters.append(active)
        active.wait_for("master started", 30)
        standby = Proc(config_path)
        masters.append(standby)
        standby.wait_for("standby: waiting for the active master", 30)
        worker = ScriptedWorker(context, "tcp://127.0.0.1:%d" % listen, "worker1",
                                "tcp://127.0.0.1:%d" % logs)
        worker.connect()
        # Only the active master schedules: the job's START comes from it.
        first = int(_cli(config_path, "submit", str(definition)).stdout.split()[0])
        assert worker.expect("START", timeout=5)[1] == str(first).encode()
        worker.send("START_OK", first)
        worker.log(first, result_line("lava", "job", "pass"))
        worker.end(first)
        worker.expect("END_OK", timeout=5, skip=ROUTINE)
        assert "listening for workers" not in standby.text()
        assert standby.proc.poll() is None
        # The active master dies hard; a job is submitted while nobody schedules.
        active.proc.kill()
        active.proc.wait(10)
        died = time.monotonic()
        second = int(_cli(config_path, "submit", str(definition)).stdout.split()[0])
        standby.wait_for("this master takes over", 10)
        standby.wait_for("master started", 10)
        assert time.monotonic() - died < 5
        worker.connect()  # lava-slave greets the master again when PONGs stop
        frames = worker.expect("START", timeout=10)
        assert frames[1] == str(second).encode()
        worker.send("START_OK", second)
        worker.log(second, result_line("lava", "job", "pass"))
        worker.end(second)
        worker.expect("END_OK", timeout=5, skip=ROUTINE)
        check = pgutil.storage(pg_schema, application_name="lavacore-%s-check" % pg_schema)
        try:
            until(lambda: check.get_job(second).state == JobState.FINISHED, 10, "Finished")
            assert [check.get_job(i).health for i in (first, second)] == [
                JobHealth.COMPLETE, JobHealth.COMPLETE]
        finally:
            check.close()
    finally:
        if worker is not None:
            worker.close()
        for proc in masters:
            proc.stop()
        context.term()


# -- db copy and db check -------------------------------------------------------------------

def _fill(st):
    """A small lab with a record in every table and jobs in every state."""
    st.add_device(Device("q1", "qemu", "w1", health=DeviceHealth.GOOD, tags=("a", "b")))
    st.add_device(Device("q2", "qemu", "w1", health=DeviceHealth.BAD, is_public=False))
    st.add_worker(Worker("w2", description="spare"))
    ids = st.insert_jobs([Job(None, requested_device_type="qemu", definition="d%d" % n,
                              original_definition="o%d" % n, submit_time=1000.5 + n,
                              submitter="alice", tags=("a",) if n % 2 else ())
                          for n in range(6)])
    st.update_job(ids[0], state=JobState.FINISHED, health=JobHealth.COMPLETE,
                  actual_device="q1", worker="w1", start_time=1001, end_time=1002,
                  result="pass")
    st.update_job(ids[1], state=JobState.RUNNING, actual_device="q1", worker="w1")
    st.update_device("q1", state=DeviceState.RUNNING, current_job=ids[1])
    st.update_job(ids[2], state=JobState.FINISHED, health=JobHealth.CANCELED,
                  failure_comment="canceled\nby alice")
    st.add_testcases([Case(ids[0], "lava", "job", "pass", logged=1002.25),
                      Case(ids[0], "0_smoke", "speed", "pass", measurement="3.5",
                               units="MB/s", metadata='{"k": "v"}')])
    st.add_token("alice", "digest-a", "laptop", 900.0)
    st.add_history("device", "q2", "Good", "Bad", "alice", "broken", 950.0)
    st.set_blob("health-check", "qemu", "job_name: check\n")
    st.delete_token(st.list_tokens()[0]["id"])  # a gap in the ids
    st.add_token("bob", "digest-b", "", 901.0, expires=5000.0)
    # Who may do what, and what was done.
    st.ensure_user("bob", 800.0)
    st.update_user("bob", is_staff=True, email="bob@lab")
    st.add_group("kernel")
    st.add_member("kernel", "bob")
    st.add_permission("group", "kernel", "lava_scheduler_app", "device", "change_device")
    st.add_object_permission("devicetype", "qemu", "kernel", "view_devicetype")
    st.add_tag("usb", "a USB port")
    st.add_alias("kvm", "qemu")
    st.add_artifact_token("bob", "gitlab", "secret")
    st.add_audit(960.0, "admin", "device", "q1", "update", {"health": "Good"},
                 {"health": "Bad"})
    ids += st.insert_jobs([Job(None, requested_device_type="qemu", definition="g",
                               original_definition="g", submit_time=1010.0,
                               visibility="group", viewing_groups=("kernel",))])
    return ids


def _dump(st):
    return {table: [tuple(row) for row in st._all("SELECT %s FROM %s ORDER BY %s"
                                                    % (", ".join(columns), table, key))]
            for table, key, columns in dbtools.TABLES}


def test_db_copy_sqlite_to_postgres_and_back_loses_nothing(pg_schema, tmp_path):
    from lavacore_plugins.storage_sqlite import SQLiteStorage

    path = write_config(tmp_path, extra=pgutil.plugin_extra())
    config = config_mod.load(path)
    pm = plugins.build(config)
    source = SQLiteStorage(str(tmp_path / "var" / "lavacore.db")).open()
    source.migrate()
    ids = _fill(source)
    url = "%s?options=-csearch_path%%3D%s&application_name=%s" % (
        PG_URL, pg_schema, pgutil.app_name(pg_schema))
    target = pgutil.storage(pg_schema)
    back = None
    try:
        counts = dbtools.db_copy(source, target)
        assert counts == {"device_types": 1, "workers": 2, "devices": 2, "jobs": 7,
                          "testcases": 2, "tokens": 1, "history": 1, "blobs": 1,
                          "users": 1, "user_groups": 1, "group_members": 1,
                          "permissions": 1, "object_permissions": 1, "tags": 1,
                          "job_groups": 1, "aliases": 1, "artifact_tokens": 1, "audit": 1}
        assert _dump(target) == _dump(source)
        assert dbtools.db_check(target) == []
        assert target.get_job(ids[2]).failure_comment == "canceled\nby alice"
        # New records continue the ids, as they would have in the source.
        assert target.insert_jobs([Job(None, definition="x", original_definition="x")]) == [
            ids[-1] + 1]
        assert target.add_testcases([Case(ids[0], "s", "c", "pass")]) is None
        assert max(c.id for c in target.list_testcases(ids[0])) == 3
        # Copying twice into the same database is refused: nothing is merged.
        with pytest.raises(dbtools.CopyError, match="target database is not empty"):
            dbtools.db_copy(source, target)
        # And back to a new SQLite file, through a URL as the command line gives it.
        back = dbtools.open_storage_url(config, pm, str(tmp_path / "back.db"))
        assert back.name == "sqlite"
        dbtools.db_copy(target, back)
        assert _dump(back) == _dump(target)
        reopened = dbtools.open_storage_url(config, pm, url)
        try:
            assert reopened.name == "postgres" and reopened.count_jobs() == 8
        finally:
            reopened.close()
    finally:
        source.close()
        target.close()
        if back is not None:
            back.close()


def test_db_copy_refuses_while_a_master_runs_on_the_source(pg_schema, tmp_path):
    from lavacore_plugins.storage_sqlite import SQLiteStorage

    source = SQLiteStorage(str(tmp_path / "lab.db")).open()
    source.migrate()
    running = source.listen_events()  # what a running master holds
    target = pgutil.storage(pg_schema)
    try:
        with pytest.raises(dbtools.CopyError, match="a master is running on the source"):
            dbtools.db_copy(source, target)
        running.close()
        other_schema = pgutil.new_schema()
        pg_source = pgutil.storage(other_schema)
        try:
            assert pg_source.acquire_leadership(gevent.event.Event())
            with pytest.raises(dbtools.CopyError, match="a master is running on the source"):
                dbtools.db_copy(pg_source, target)
        finally:
            pg_source.close()
            pgutil.drop_schema(other_schema)
        assert dbtools.db_copy(source, target)["jobs"] == 0
    finally:
        source.close()
        target.close()


def test_migrations_from_several_processes_at_once(pg_schema):
    from lavacore_plugins.storage_postgres import PostgresStorage

    stores = [PostgresStorage(PG_URL, **pgutil.options(pg_schema)).open() for _ in range(4)]
    try:
        results = gevent.joinall([gevent.spawn(st.migrate) for st in stores],
                                 raise_error=True)
        v = SCHEMA_VERSION
        assert sorted(g.value for g in results) == [(0, v), (v, v), (v, v), (v, v)]
    finally:
        for st in stores:
            st.close()
