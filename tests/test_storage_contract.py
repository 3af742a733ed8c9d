"""The storage contract: every method of the storage interface, run on SQLite and on the
real PostgreSQL server (one schema per test), plus a master-level smoke on both."""

import time

import gevent
import gevent.event
import pytest

from lavacore import dbtools
from lavacore.logformat import make_line, result_line
from lavacore.models import Device, DeviceType, Job, Worker
from lavacore.models import TestCase as Case
from lavacore.states import (DeviceHealth, DeviceState, JobHealth, JobState, WorkerHealth,
                             WorkerState)
from lavacore.storage import SCHEMA_VERSION, NotFound

import pgutil

# The thread method: a test stuck in the gevent hub fails the run instead of hanging it.
pytestmark = pytest.mark.timeout(30, method="thread")

BACKENDS = ["sqlite", "postgres"]


def open_sqlite(path):
    from lavacore_plugins.storage_sqlite import SQLiteStorage

    st = SQLiteStorage(str(path)).open()
    st.migrate()
    return st


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def make_storage(backend, tmp_path):
    """Opens storages on this test's database (several: another process's view)."""
    opened = []
    schema = pgutil.new_schema() if backend == "postgres" else None
    if schema:
        pgutil.hold_server()

    def make():
        if backend == "sqlite":
            st = open_sqlite(tmp_path / "lavacore.db")
        else:
            st = pgutil.storage(schema)
        opened.append(st)
        return st

    try:
        yield make
    finally:
        for st in opened:
            st.close()
        if schema:
            pgutil.drop_schema(schema)
            pgutil.release_server()


@pytest.fixture
def storage(make_storage):
    return make_storage()


def job(device_type="qemu", priority=50, submit_time=None, **kwargs):
    return Job(None, requested_device_type=device_type, priority=priority,
               submit_time=time.time() if submit_time is None else submit_time,
               definition="job_name: x\n", original_definition="job_name: x\n", **kwargs)


def online_device(st, hostname, device_type="qemu", worker="w1", **kwargs):
    kwargs.setdefault("health", DeviceHealth.GOOD)
    st.add_device(Device(hostname, device_type, worker, **kwargs))
    st.update_worker(worker, state=WorkerState.ONLINE)


# -- schema ---------------------------------------------------------------------------------

def test_migrate_creates_schema_and_is_idempotent(storage):
    assert storage.schema_version() == SCHEMA_VERSION
    assert storage.migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)
    assert dbtools.db_check(storage) == []


# -- workers --------------------------------------------------------------------------------

def test_workers(storage):
    created = storage.add_worker(Worker("w1", description="first"))
    assert created == Worker("w1", description="first")
    # Adding again keeps what is there.
    assert storage.add_worker(Worker("w1", description="other")).description == "first"
    storage.add_worker(Worker("w0", health=WorkerHealth.MAINTENANCE))
    assert [w.hostname for w in storage.list_workers()] == ["w0", "w1"]
    storage.update_worker("w1", state=WorkerState.ONLINE, last_ping=123.5, version="2024.01")
    w1 = storage.get_worker("w1")
    assert (w1.state, w1.last_ping, w1.version) == (WorkerState.ONLINE, 123.5, "2024.01")
    assert isinstance(w1.state, WorkerState) and isinstance(w1.health, WorkerHealth)
    assert [w.hostname for w in storage.list_workers(state=WorkerState.ONLINE)] == ["w1"]
    assert [w.hostname for w in storage.list_workers(
        health=[WorkerHealth.MAINTENANCE, WorkerHealth.RETIRED])] == ["w0"]
    storage.set_all_workers_offline()
    assert {w.state for w in storage.list_workers()} == {WorkerState.OFFLINE}
    with pytest.raises(NotFound, match="worker nope does not exist"):
        storage.get_worker("nope")
    with pytest.raises(NotFound):
        storage.update_worker("nope", state=WorkerState.ONLINE)
    with pytest.raises(ValueError):
        storage.update_worker("w1", bogus=1)
    storage.update_worker("w1")  # nothing to change: no error


def test_workers_alive_in_one_batch(storage):
    """The controller's liveness write: unknown workers created, all Online with the
    new last_ping, and only those that were not Online reported (for their events)."""
    storage.add_worker(Worker("known", health=WorkerHealth.MAINTENANCE, description="kept"))
    storage.add_worker(Worker("online", state=WorkerState.ONLINE, last_ping=1.0))
    names = ["w%04d" % i for i in range(1200)]  # more than one chunk of hostnames
    went, created = storage.workers_alive(["known", "online"] + names + ["known"], 50.0,
                                          description="created by lavacore")
    assert sorted(created) == names
    assert sorted(w.hostname for w in went) == sorted(["known"] + names)
    assert all(w.state == WorkerState.ONLINE and w.last_ping == 50.0 for w in went)
    known = storage.get_worker("known")
    assert (known.state, known.health, known.description, known.last_ping) == \
        (WorkerState.ONLINE, WorkerHealth.MAINTENANCE, "kept", 50.0)
    assert storage.get_worker("w0042").description == "created by lavacore"
    assert storage.get_worker("online").last_ping == 50.0
    assert storage.workers_alive(["online", "w0001"], 60.0) == ([], [])
    assert len(storage.list_workers(state=WorkerState.ONLINE)) == 1202


# -- device types and devices ---------------------------------------------------------------

def test_device_types(storage):
    storage.add_device_type(DeviceType("qemu", description="emulated"))
    storage.add_device_type(DeviceType("qemu", description="again"))  # kept as it was
    storage.add_device_type(DeviceType("bbb", display=False, health_disabled=True,
                                       health_frequency=5, health_denominator="jobs"))
    assert storage.get_device_type("qemu") == DeviceType("qemu", description="emulated")
    bbb = storage.get_device_type("bbb")
    assert (bbb.display, bbb.health_disabled, bbb.health_frequency,
            bbb.health_denominator) == (False, True, 5, "jobs")
    assert isinstance(bbb.display, bool)
    assert [t.name for t in storage.list_device_types()] == ["bbb", "qemu"]
    storage.update_device_type("qemu", health_frequency=12)
    assert storage.get_device_type("qemu").health_frequency == 12
    assert [t.name for t in storage.list_device_types(display=True)] == ["qemu"]
    with pytest.raises(NotFound):
        storage.get_device_type("nope")


def test_devices(storage):
    storage.add_device(Device("qemu01", "qemu", "w1", tags=("b", "a", "a"),
                              health=DeviceHealth.GOOD, description="one"))
    storage.add_device(Device("qemu02", "qemu", "w2", is_public=False))
    storage.add_device(Device("bbb01", "bbb", None))
    # add_device made the device type and the workers.
    assert {t.name for t in storage.list_device_types()} == {"qemu", "bbb"}
    assert {w.hostname for w in storage.list_workers()} == {"w1", "w2"}
    d = storage.get_device("qemu01")
    assert d == Device("qemu01", "qemu", "w1", tags=("a", "b"), health=DeviceHealth.GOOD,
                       description="one")
    assert isinstance(d.state, DeviceState) and isinstance(d.health, DeviceHealth)
    assert storage.get_device("qemu02").is_public is False
    assert storage.get_device("bbb01").worker is None
    assert [x.hostname for x in storage.list_devices()] == ["bbb01", "qemu01", "qemu02"]
    assert [x.hostname for x in storage.list_devices(device_type="qemu", worker="w2")] == [
        "qemu02"]
    assert storage.list_devices(worker=[]) == []
    storage.update_device("qemu01", state=DeviceState.RESERVED, current_job=7, tags=["z"],
                          last_health_report_job=3)
    d = storage.get_device("qemu01", lock=True)
    assert (d.state, d.current_job, d.tags, d.last_health_report_job) == (
        DeviceState.RESERVED, 7, ("z",), 3)
    storage.update_device("qemu01", current_job=None)
    assert storage.get_device("qemu01").current_job is None
    with pytest.raises(NotFound, match="device nope does not exist"):
        storage.get_device("nope")
    with pytest.raises(NotFound):
        storage.update_device("nope", state=DeviceState.IDLE)
    with pytest.raises(Exception):
        storage.add_device(Device("qemu01", "qemu", "w1"))
    # The failed insert left the storage usable and changed nothing.
    assert storage.get_device("qemu01").tags == ("z",)


def test_available_devices(storage):
    online_device(storage, "q2", "qemu", "w1")
    online_device(storage, "q1", "qemu", "w1", health=DeviceHealth.UNKNOWN)
    online_device(storage, "a1", "arm", "w1")
    online_device(storage, "busy", "qemu", "w1", state=DeviceState.RUNNING)
    online_device(storage, "bad", "qemu", "w1", health=DeviceHealth.BAD)
    storage.add_device(Device("off", "qemu", "w2", health=DeviceHealth.GOOD))  # w2 Offline
    good = [DeviceHealth.GOOD, DeviceHealth.UNKNOWN]
    assert [d.hostname for d in storage.available_devices(good)] == ["a1", "q1", "q2"]
    assert [d.hostname for d in storage.available_devices([DeviceHealth.BAD])] == ["bad"]
    storage.update_worker("w1", state=WorkerState.OFFLINE)
    assert storage.available_devices(good) == []


# -- jobs -----------------------------------------------------------------------------------

def test_insert_and_get_jobs_round_trip(storage):
    assert storage.insert_jobs([]) == []
    first = job(tags=("x", "a"), submitter="alice", description="d", health_check=True,
                target_group="g1", sub_id="0.1", visibility="personal", priority=80,
                submit_time=1700000000.25)
    ids = storage.insert_jobs([first, job(), job()])
    assert len(ids) == 3 and ids == sorted(ids) and len(set(ids)) == 3
    got = storage.get_job(ids[0])
    expected = first
    expected.id, expected.tags = ids[0], ("a", "x")
    assert got == expected
    assert isinstance(got.state, JobState) and isinstance(got.health, JobHealth)
    assert got.health_check is True and got.infrastructure_error is False
    assert storage.get_job(str(ids[1])).id == ids[1]
    with pytest.raises(NotFound, match="job 999999 does not exist"):
        storage.get_job(999999)


def test_a_pass_claims_and_places_many_jobs_at_once(storage):
    """claim_many reads what a pass decided on, locked, in a few statements (more than
    one chunk here); set_scheduled writes every placement in a few more."""
    devices = ["dev%04d" % i for i in range(620)]
    for hostname in devices:
        online_device(storage, hostname, "qemu", "w1")
    ids = storage.insert_jobs([job() for _ in devices])
    pairs = list(zip(ids, devices)) + [(999999, "dev0000"), (ids[0], "nosuch")]
    with storage.transaction():
        jobs, found = storage.claim_many(pairs)
        assert sorted(jobs) == ids and sorted(found) == devices
        assert jobs[ids[7]] == storage.get_job(ids[7])
        assert found["dev0007"] == storage.get_device("dev0007")
        storage.set_scheduled([(job_id, hostname, "w1")
                               for job_id, hostname in zip(ids, devices)])
    for index in (0, 499, 500, 619):
        placed = storage.get_job(ids[index])
        assert (placed.state, placed.actual_device, placed.worker) == (
            JobState.SCHEDULED, devices[index], "w1")
        device = storage.get_device(devices[index])
        assert (device.state, device.current_job) == (DeviceState.RESERVED, ids[index])
    assert storage.count_jobs(state=JobState.SCHEDULED) == 620


def test_start_ok_marks_the_job_and_its_device_running(storage):
    """mark_running (START_OK): job and device Running at once, the state before
    returned; nothing changed for a job Running or beyond; a job without device alone;
    NotFound for no such job. (PostgreSQL: one statement.)"""
    online_device(storage, "dev1", "qemu", "w1")
    placed, alone, late = storage.insert_jobs([job(), job(), job()])
    storage.set_scheduled([(placed, "dev1", "w1")])
    storage.update_job(alone, state=JobState.SCHEDULED, worker="w1")
    storage.update_job(late, state=JobState.CANCELING, worker="w1")
    got, old, device = storage.mark_running(placed, 1234.5)
    assert (got.id, got.state, got.start_time, old) == (
        placed, JobState.RUNNING, 1234.5, JobState.SCHEDULED)
    assert got == storage.get_job(placed)
    assert (device.hostname, device.state, device.current_job) == (
        "dev1", DeviceState.RUNNING, placed)
    assert device == storage.get_device("dev1")
    assert storage.mark_running(placed, 2000.0) is None
    assert storage.get_job(placed).start_time == 1234.5
    got, old, device = storage.mark_running(alone, 99.0)
    assert (got.state, old, device) == (JobState.RUNNING, JobState.SCHEDULED, None)
    assert storage.mark_running(late, 99.0) is None
    assert storage.get_job(late).state == JobState.CANCELING
    with pytest.raises(NotFound, match="job 999999 does not exist"):
        storage.mark_running(999999, 1.0)
    with pytest.raises(NotFound):
        storage.mark_running(10 ** 20, 1.0)


def test_insert_many_jobs_keeps_order(storage):
    jobs = [job(priority=i % 100, description="job %d" % i) for i in range(1203)]
    ids = storage.insert_jobs(jobs)
    assert len(ids) == 1203 and ids == sorted(ids)
    for index in (0, 499, 500, 1000, 1202):
        assert storage.get_job(ids[index]).description == "job %d" % index
    assert storage.count_jobs() == 1203


def test_update_list_count_jobs(storage):
    ids = storage.insert_jobs([job(submit_time=100 + i) for i in range(6)])
    storage.update_job(ids[0], state=JobState.RUNNING, worker="w1", actual_device="q1",
                       start_time=200.5)
    storage.update_job(ids[1], state=JobState.FINISHED, health=JobHealth.COMPLETE,
                       end_time=300.0, failure_comment="ok", result="pass",
                       infrastructure_error=True, end_seen=299.0)
    done = storage.get_job(ids[1])
    assert (done.state, done.health, done.end_time, done.result, done.infrastructure_error,
            done.end_seen) == (JobState.FINISHED, JobHealth.COMPLETE, 300.0, "pass", True,
                               299.0)
    assert storage.count_jobs() == 6
    assert storage.count_jobs(state=JobState.SUBMITTED) == 4
    assert storage.count_jobs(state=[JobState.RUNNING, JobState.FINISHED]) == 2
    assert [j.id for j in storage.list_jobs(worker="w1")] == [ids[0]]
    assert [j.id for j in storage.list_jobs(order="-id", limit=2)] == [ids[5], ids[4]]
    assert [j.id for j in storage.list_jobs(order="id", limit=2, offset=2)] == ids[2:4]
    assert [j.id for j in storage.list_jobs(order="-submit_time")][0] == ids[5]
    assert storage.list_jobs(state=[]) == []
    with pytest.raises(ValueError):
        storage.list_jobs(order="definition")
    with pytest.raises(NotFound):
        storage.update_job(999999, state=JobState.RUNNING)
    with pytest.raises(ValueError):
        storage.update_job(ids[0], nonsense=1)


def test_queued_jobs_order_and_paging(storage):
    specs = [  # (priority, submit_time, target_group)
        (50, 10, ""), (90, 30, ""), (50, 5, ""), (50, 10, "a"), (90, 30, ""), (10, 1, ""),
    ]
    ids = storage.insert_jobs([job(priority=p, submit_time=t, target_group=g)
                               for p, t, g in specs])
    storage.insert_jobs([job("arm")])
    placed = storage.insert_jobs([job()])[0]
    storage.update_job(placed, actual_device="q1")
    finished = storage.insert_jobs([job()])[0]
    storage.update_job(finished, state=JobState.FINISHED, health=JobHealth.CANCELED)
    expected = [ids[1], ids[4], ids[2], ids[0], ids[3], ids[5]]
    assert [j.id for j in storage.queued_jobs("qemu")] == expected
    assert [j.id for j in storage.queued_jobs("qemu", limit=2)] == expected[:2]
    assert [j.id for j in storage.queued_jobs("qemu", limit=3, offset=4)] == expected[4:]
    assert [j.id for j in storage.queued_group_jobs()] == [ids[3]]
    assert storage.queued_device_types() == {"qemu", "arm"}


def test_queued_tag_sets_and_tagged_streams(storage):
    usb = storage.insert_jobs([job(tags=["usb"], submit_time=t) for t in (3, 1, 2)])
    plain = storage.insert_jobs([job(), job("arm", tags=["gpu"])])
    done = storage.insert_jobs([job(tags=["hdmi"])])[0]
    storage.update_job(done, state=JobState.FINISHED, health=JobHealth.COMPLETE)
    found = storage.queued_tag_sets_by_type()
    assert {t: sorted(sets) for t, sets in found.items()} == \
        {"qemu": sorted(['["usb"]', "[]"]), "arm": ['["gpu"]']}
    assert [j.id for j in storage.queued_jobs_tagged("qemu", '["usb"]', limit=2)] == \
        [usb[1], usb[2]]
    assert [j.id for j in storage.queued_jobs_tagged("qemu", '["usb"]', limit=2,
                                                     offset=2)] == [usb[0]]
    assert [j.id for j in storage.queued_jobs_tagged("qemu", "[]", limit=5)] == [plain[0]]


def test_count_jobs_started_since(storage):
    ids = storage.insert_jobs([job() for _ in range(4)])
    storage.update_job(ids[0], actual_device="q1", start_time=100)
    storage.update_job(ids[1], actual_device="q1", start_time=200)
    storage.update_job(ids[2], actual_device="q1", start_time=300, health_check=True)
    storage.update_job(ids[3], actual_device="q2", start_time=300)
    assert storage.count_jobs_started_since("q1", 150) == 1
    assert storage.count_jobs_started_since("q1", 0) == 2
    assert storage.count_jobs_started_since("q3", 0) == 0


# -- test cases, tokens, history, blobs -----------------------------------------------------

def test_testcases(storage):
    job_id = storage.insert_jobs([job()])[0]
    storage.add_testcases([])
    storage.add_testcases([
        Case(job_id, "0_smoke", "echo", "pass", logged=1.5),
        Case(job_id, "0_smoke", "speed", "pass", measurement="3.5", units="MB/s",
                 metadata='{"extra": 1}'),
        Case(job_id, "lava", "job", "fail")])
    cases = storage.list_testcases(job_id)
    assert [(c.suite, c.name) for c in cases] == [("0_smoke", "echo"), ("0_smoke", "speed"),
                                                  ("lava", "job")]
    assert cases[0].id < cases[1].id < cases[2].id and cases[0].logged == 1.5
    assert (cases[1].measurement, cases[1].units, cases[1].metadata) == (
        "3.5", "MB/s", '{"extra": 1}')
    assert [c.name for c in storage.list_testcases(job_id, suite="lava")] == ["job"]
    assert storage.testcase_counts(job_id) == {"pass": 2, "fail": 1}
    assert storage.testcase_counts(job_id + 1) == {}
    storage.add_testcases([Case(job_id, "s", "c%d" % i, "pass") for i in range(2500)])
    assert storage.testcase_counts(job_id)["pass"] == 2502


def test_tokens(storage):
    first = storage.add_token("alice", "d1", "laptop", 10.0)
    second = storage.add_token("bob", "d2", "", 11.0, expires=100.0)
    assert second > first
    assert storage.token_user("d1") == "alice"
    assert storage.token_user("nope") is None
    assert storage.token_record("d2") == (second, "bob", 100.0, None)
    storage.token_used(second, 50.0)
    rows = storage.list_tokens()
    assert [(r["username"], r["description"], r["created"], r["last_used"], r["expires"])
            for r in rows] == [("alice", "laptop", 10.0, None, None),
                               ("bob", "", 11.0, 50.0, 100.0)]
    assert [r["username"] for r in storage.list_tokens("bob")] == ["bob"]
    assert storage.get_token(second)["description"] == ""
    with pytest.raises(Exception):
        storage.add_token("eve", "d1", "", 12.0)  # digests are unique
    assert storage.delete_token(first) == 1
    assert storage.delete_token(first) == 0
    assert storage.token_user("d1") is None
    with pytest.raises(NotFound):
        storage.get_token(first)


def test_history(storage):
    for i in range(5):
        storage.add_history("device", "q1", "Good", "Bad%d" % i, "alice", "r%d" % i, i)
    storage.add_history("worker", "q1", "Active", "Retired", None, "", 9)
    history = storage.list_history("device", "q1", limit=3)
    assert [h["new"] for h in history] == ["Bad4", "Bad3", "Bad2"]
    assert history[0] == {"old": "Good", "new": "Bad4", "user": "alice", "reason": "r4",
                          "time": 4}
    assert len(storage.list_history("worker", "q1")) == 1


def test_blobs(storage):
    assert storage.blob_names() == set()
    assert storage.get_blob("health-check", "qemu") is None
    storage.set_blob("health-check", "qemu", "one")
    storage.set_blob("health-check", "qemu", "two")
    storage.set_blob("device", "qemu", "other")
    assert storage.get_blob("health-check", "qemu") == "two"
    storage.set_blob("health-check", "qemu", None)
    assert storage.get_blob("health-check", "qemu") is None
    assert storage.get_blob("device", "qemu") == "other"
    assert storage.blob_names() == {("device", "qemu")}


# -- transactions ---------------------------------------------------------------------------

def test_transaction_rolls_back_on_exception(storage):
    with pytest.raises(RuntimeError):
        with storage.transaction():
            storage.add_worker(Worker("w1"))
            storage.insert_jobs([job()])
            raise RuntimeError("boom")
    assert storage.list_workers() == [] and storage.count_jobs() == 0
    # A statement the database refuses rolls back the whole transaction too.
    with pytest.raises(Exception):
        with storage.transaction():
            storage.add_token("a", "same", "", 1.0)
            storage.add_token("b", "same", "", 1.0)
    assert storage.list_tokens() == []
    storage.add_token("c", "other", "", 1.0)  # and the storage is usable afterwards
    assert storage.token_user("other") == "c"


def test_transaction_is_reentrant_one_transaction(storage):
    with storage.transaction():
        storage.add_worker(Worker("a"))
        with storage.transaction():
            storage.add_worker(Worker("b"))
            with storage.transaction():
                storage.add_worker(Worker("c"))
        try:
            with storage.transaction():
                storage.add_worker(Worker("d"))
                raise KeyError("inner")
        except KeyError:
            pass  # no savepoint: d stays, and the transaction goes on
        storage.add_worker(Worker("e"))
    assert [w.hostname for w in storage.list_workers()] == ["a", "b", "c", "d", "e"]
    # An outer failure undoes what inner levels did.
    with pytest.raises(ValueError):
        with storage.transaction():
            with storage.transaction():
                storage.add_worker(Worker("f"))
            raise ValueError("outer")
    assert "f" not in [w.hostname for w in storage.list_workers()]


def test_other_greenlets_never_see_uncommitted_writes(storage):
    storage.add_worker(Worker("w1", description="before"))
    seen = []
    inside = gevent.event.Event()

    def writer():
        with pytest.raises(RuntimeError):
            with storage.transaction():
                storage.update_worker("w1", description="uncommitted")
                inside.set()
                gevent.sleep(0.1)  # a green send inside a transaction yields like this
                raise RuntimeError("rolled back")

    def reader():
        inside.wait(5)
        seen.append(storage.get_worker("w1").description)

    gevent.joinall([gevent.spawn(writer), gevent.spawn(reader)], raise_error=True)
    assert seen == ["before"]
    assert storage.get_worker("w1").description == "before"


def test_locked_read_modify_write_loses_no_update(storage):
    job_id = storage.insert_jobs([job(priority=0)])[0]

    def bump():
        for _ in range(10):
            with storage.transaction():
                current = storage.get_job(job_id, lock=True).priority
                gevent.sleep(0.001)
                storage.update_job(job_id, priority=current + 1)

    gevent.joinall([gevent.spawn(bump) for _ in range(4)], raise_error=True)
    assert storage.get_job(job_id).priority == 40


def test_second_storage_sees_committed_changes(make_storage):
    first, second = make_storage(), make_storage()
    with first.transaction():
        first.add_worker(Worker("w1"))
    assert second.get_worker("w1").hostname == "w1"


# -- notifications between processes --------------------------------------------------------

def test_publish_event_reaches_the_listener(make_storage):
    master_side, cli_side = make_storage(), make_storage()
    listener = master_side.listen_events()
    try:
        assert listener.wait(0.05) == []
        cli_side.publish_event({"kind": "testjob", "data": {"job": 1, "state": "Submitted"}})
        cli_side.publish_event({"kind": "device", "data": {"device": "q1"}})
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            got += listener.wait(0.5)
        assert got == [{"kind": "testjob", "data": {"job": 1, "state": "Submitted"}},
                       {"kind": "device", "data": {"device": "q1"}}]
    finally:
        listener.close()


def test_acquire_leadership_returns_for_the_first_master(storage):
    stopping = gevent.event.Event()
    with gevent.Timeout(5):
        storage.acquire_leadership(stopping)


# -- database check -------------------------------------------------------------------------

def test_db_check_reports_inconsistent_records(storage):
    online_device(storage, "q1")
    online_device(storage, "q2")
    ids = storage.insert_jobs([job(), job(), job()])
    storage.update_device("q1", state=DeviceState.RESERVED)           # for no job
    storage.update_job(ids[0], state=JobState.RUNNING, actual_device="q2")  # q2 Idle
    storage.update_job(ids[1], state=JobState.FINISHED)                # health Unknown
    storage.add_testcases([Case(999999, "lava", "job", "pass")])
    problems = dbtools.db_check(storage)
    assert "device q1: Reserved or Running for no job, or for a job that is not active on" \
           " it" in problems
    assert "job %d: active on a device whose current job is another" % ids[0] in problems
    assert "job %d: Finished with health Unknown" % ids[1] in problems
    assert "job 999999: has test cases but does not exist" in problems
    assert len(problems) == 4, problems


def test_db_check_and_migrate_from_nothing(backend, tmp_path):
    """Opened without migrating (as db check/migrate do): an empty database is reported,
    migrated, and then missing tables and columns are named."""
    if backend == "sqlite":
        from lavacore_plugins.storage_sqlite import SQLiteStorage

        schema = None
        st = SQLiteStorage(str(tmp_path / "new.db")).open()
    else:
        from lavacore_plugins.storage_postgres import PostgresStorage

        schema = pgutil.new_schema()
        pgutil.hold_server()
        pgutil.ready()
        st = PostgresStorage(pgutil.PG_URL, **pgutil.options(schema)).open()
    try:
        assert st.schema_version() == 0
        assert dbtools.db_check(st) == [
            "no lavacore schema in this database: run 'lavacore db migrate'"]
        assert dbtools.db_migrate(st) == (0, SCHEMA_VERSION)
        assert dbtools.db_migrate(st) == (SCHEMA_VERSION, SCHEMA_VERSION)
        assert dbtools.db_check(st) == []
        st._execute("ALTER TABLE jobs DROP COLUMN end_seen")
        st._execute("DROP TABLE blobs")
        assert dbtools.db_check(st) == ["table jobs: missing column(s) end_seen",
                                        "table blobs: missing"]
    finally:
        st.close()
        if schema:
            pgutil.drop_schema(schema)
            pgutil.release_server()


# -- the master on both backends ------------------------------------------------------------

@pytest.fixture
def storage_lines(backend, tmp_path):
    if backend == "sqlite":
        yield {}
        return
    schema = pgutil.new_schema()
    pgutil.hold_server()
    try:
        pgutil.ready()
        yield {"storage": pgutil.storage_lines(schema), "extra": pgutil.plugin_extra()}
        pgutil.drop_schema(schema)
    finally:
        pgutil.release_server()


def test_master_runs_a_job_to_complete(storage_lines, lab):
    lab = lab(**storage_lines)
    worker = lab.worker()
    job_id = lab.submit()
    assert worker.expect("START", timeout=5)[1] == str(job_id).encode()
    worker.send("START_OK", job_id)
    lab.wait_for(lambda: lab.job(job_id).state == JobState.RUNNING, what="Running")
    worker.log(job_id, make_line("info", "hello"))
    worker.log(job_id, result_line("0_smoke", "echo", "pass"))
    worker.log(job_id, result_line("lava", "job", "pass"))
    worker.end(job_id)
    assert worker.expect("END_OK") == [b"END_OK", str(job_id).encode()]
    lab.wait_for(lambda: lab.job(job_id).state == JobState.FINISHED, what="Finished")
    assert lab.job(job_id).health == JobHealth.COMPLETE
    assert lab.storage.get_device("qemu01").state == DeviceState.IDLE
    assert lab.storage.testcase_counts(job_id) == {"pass": 2}
    assert lab.storage.name == ("postgres" if storage_lines else "sqlite")


def test_master_cancels_a_running_job(storage_lines, lab):
    lab = lab(**storage_lines)
    worker = lab.worker()
    job_id = lab.submit()
    worker.expect("START")
    worker.send("START_OK", job_id)
    lab.wait_for(lambda: lab.job(job_id).state == JobState.RUNNING, what="Running")
    lab.master.flow.cancel(job_id, "alice")
    assert worker.expect("CANCEL")[1] == str(job_id).encode()
    worker.end(job_id)
    worker.expect("END_OK")
    lab.wait_for(lambda: lab.job(job_id).state == JobState.FINISHED, what="Finished")
    assert lab.job(job_id).health == JobHealth.CANCELED
