"""The scheduling pass on SQLite and on the real PostgreSQL server: which queued jobs go to
which idle devices (LAVA's order, tags, one job per device, groups left to the multinode
plugin), how the queue is read (streams per tag set, their heads in one call), and changes
made by other processes seen by the next pass."""

import json
import random
import sys
import time

import gevent.subprocess
import pytest

from conftest import job_yaml
from lavacore.models import Device, Job
from lavacore.scheduling import SchedulingView, job_fits, queue_rank
from lavacore.states import CHECKABLE_HEALTH, DeviceHealth, DeviceState, JobState, WorkerState
from lavacore.storage import SCHEMA_VERSION
from lavacore_plugins.scheduler_fifo import fifo

import pgutil

pytestmark = pytest.mark.timeout(120, method="thread")

BACKENDS = ["sqlite", "postgres"]
TAG_SETS = [(), ("usb",), ("usb", "fast"), ("gpu",), ("fast",)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def storage(backend, tmp_path):
    if backend == "sqlite":
        from lavacore_plugins.storage_sqlite import SQLiteStorage

        st = SQLiteStorage(str(tmp_path / "lavacore.db")).open()
        st.migrate()
        yield st
        st.close()
        return
    schema = pgutil.new_schema()
    pgutil.hold_server()
    st = pgutil.storage(schema)
    try:
        yield st
    finally:
        st.close()
        pgutil.drop_schema(schema)
        pgutil.release_server()


def queued(device_type, priority=50, submit_time=100.0, tags=(), **kwargs):
    return Job(None, requested_device_type=device_type, priority=priority,
               submit_time=submit_time, tags=tuple(tags), definition="job_name: x\n",
               original_definition="job_name: x\n", **kwargs)


def add_devices(st, specs):
    """(hostname, type, tags, public) -> Good, Idle devices of Online worker w1."""
    with st.transaction():
        for hostname, device_type, tags, public in specs:
            st.add_device(Device(hostname, device_type, "w1", health=DeviceHealth.GOOD,
                                 tags=tuple(tags), is_public=public))
        st.update_worker("w1", state=WorkerState.ONLINE)


def reference(st, view):
    """The pass as the rules say it, written plainly: per type, every queued job sorted by
    priority, submit time, group and id; group members skipped; each job on the first
    free device (fewest tags first) that job_fits."""
    everything = st.list_jobs(state=JobState.SUBMITTED)
    assignments = []
    for device_type in view.device_types():
        free = sorted(view.devices(device_type), key=lambda d: len(d.tags))
        for job in sorted((j for j in everything if j.requested_device_type == device_type),
                          key=queue_rank):
            if not free:
                break
            if job.target_group:
                continue
            for index, device in enumerate(free):
                if job_fits(job, device):
                    assignments.append((job.id, device.hostname))
                    del free[index]
                    break
    return assignments


def random_lab(st, rng, types=4, devices=40, jobs=700):
    specs = []
    for i in range(devices):
        specs.append(("d%03d" % i, "t%d" % (i % types), rng.choice(TAG_SETS),
                      rng.random() > 0.1))
    add_devices(st, specs)
    groups = ["%032x" % rng.getrandbits(128) for _ in range(6)]
    records = []
    for _ in range(jobs):
        group = rng.choice(groups) if rng.random() < 0.15 else ""
        records.append(queued(
            "t%d" % rng.randrange(types), priority=rng.choice((0, 10, 50, 50, 90, 100)),
            # Few distinct submit times: ties are decided by group, then id.
            submit_time=float(rng.randrange(30)), tags=rng.choice(TAG_SETS[:4]),
            target_group=group, health_check=rng.random() < 0.03))
    st.insert_jobs(records)
    return [s[0] for s in specs]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fifo_places_jobs_in_lavas_order(storage, seed):
    """Priority, then submit time, then id; tags a subset of the device's; private
    devices only for health checks; one job per device; the same with devices taken out
    of the pass (health checks, groups), and on both backends."""
    rng = random.Random(seed)
    hostnames = random_lab(storage, rng)
    for removed in ([], rng.sample(hostnames, 15)):
        view = SchedulingView(storage, rng=random.Random(seed), healths=CHECKABLE_HEALTH)
        view.remove(removed)
        expected = reference(storage, view)
        assert len(expected) > 10
        assert fifo(view) == expected


def test_group_members_ahead_do_not_hide_the_jobs_behind_them(storage):
    """A stream whose first jobs belong to groups (left to the multinode plugin) is read
    on past them, as far as its devices need."""
    add_devices(storage, [("q%d" % i, "qemu", (), True) for i in range(3)] +
                [("u0", "qemu", ("usb",), True)])
    groups = storage.insert_jobs([queued("qemu", priority=100, target_group="%032x" % g,
                                         submit_time=float(i))
                                  for i, g in enumerate(range(1200))])
    singles = storage.insert_jobs([queued("qemu", submit_time=200.0 + i) for i in range(5)])
    usb = storage.insert_jobs([queued("qemu", tags=("usb",), submit_time=150.0)])
    view = SchedulingView(storage, rng=random.Random(0))
    placed = dict(fifo(view))
    assert set(placed) == {usb[0]} | set(singles[:3])
    assert placed[usb[0]] == "u0"
    assert not set(placed) & set(groups)


def test_stream_heads_are_the_streams_first_pages(storage):
    """The heads of several streams read at once are what each stream's own page is
    (PostgreSQL reads them in one statement), tag sets found by the index scan included
    when jobs without a device type (dynamic connections) are queued too."""
    rng = random.Random(5)
    records = [queued(rng.choice(("a", "b", "c", None)), priority=rng.choice((0, 50, 100)),
                      submit_time=float(rng.randrange(10)), tags=rng.choice(TAG_SETS))
               for _ in range(400)]
    ids = storage.insert_jobs(records)
    for job_id in ids[::7]:
        storage.update_job(job_id, state=JobState.SCHEDULED, actual_device="x")
    found = storage.queued_tag_sets_by_type()
    expected = {}
    for job in storage.list_jobs(state=JobState.SUBMITTED):
        if job.requested_device_type is not None:
            expected.setdefault(job.requested_device_type, set()).add(job.tags)
    assert {t: {tuple(json.loads(s)) for s in sets} for t, sets in found.items()} == expected
    assert all(len(sets) == len(set(sets)) for sets in found.values())
    some = storage.queued_tag_sets_by_type(["c", "a", "zzz", "a"])
    assert {t: sorted(sets) for t, sets in some.items()} == \
        {t: sorted(found[t]) for t in ("a", "c")}
    streams = [(t, s, rng.randrange(1, 40)) for t, sets in sorted(found.items())
               for s in sets] + [("a", '["nothing"]', 3), ("zzz", "[]", 2)]
    heads = storage.queued_stream_heads(streams + [streams[0][:2] + (1,)])
    assert set(heads) == {(t, s) for t, s, _ in streams}
    for device_type, tags, size in streams:
        page = storage.queued_jobs_tagged(device_type, tags, size)
        assert heads[(device_type, tags)] == page
        assert [j.id for j in page] == [j.id for j in sorted(
            (j for j in storage.list_jobs(state=JobState.SUBMITTED,
                                          requested_device_type=device_type)
             if list(j.tags) == json.loads(tags)), key=queue_rank)][:size]
    assert storage.queued_stream_heads([]) == {}


def test_candidates_of_a_type_with_devices_of_the_callers_own(storage):
    """A scheduler may ask for the queue of a type the pass has no idle device of, with
    devices of its own choosing: it gets that type's jobs that fit them, in order."""
    add_devices(storage, [("q1", "qemu", (), True), ("b1", "bbb", ("usb",), False)])
    storage.update_device("b1", state=DeviceState.RUNNING)
    ids = storage.insert_jobs([queued("bbb", tags=tags, priority=p)
                               for tags, p in (((), 10), (("usb",), 90), (("gpu",), 99))])
    storage.insert_jobs([queued("qemu")])
    view = SchedulingView(storage, rng=random.Random(0))
    assert view.device_types() == ["qemu"]
    assert [j.requested_device_type for j in view.candidates("qemu")] == ["qemu"]
    mine = [storage.get_device("b1")]
    assert [j.id for j in view.candidates("bbb", mine)] == [ids[1], ids[0]]


def test_queued_records_are_the_tables_records(storage):
    """The scheduler's fast row decoding gives the records the storage gives elsewhere."""
    add_devices(storage, [("d1", "qemu", ("usb", "fast"), False), ("d2", "qemu", (), True)])
    storage.update_device("d1", last_health_report_job=7, current_job=None)
    ids = storage.insert_jobs([queued("qemu", tags=("usb",), health_check=True,
                                      target_group="g", submitter="ann", sub_id="1.0"),
                               queued("qemu", submit_time=None)])
    for job in storage.queued_jobs("qemu"):
        full = storage.get_job(job.id)
        for field in ("id", "state", "submitter", "requested_device_type", "tags",
                      "priority", "submit_time", "health_check", "target_group", "sub_id"):
            assert getattr(job, field) == getattr(full, field)
            assert type(getattr(job, field)) is type(getattr(full, field))
    assert sorted(j.id for j in storage.queued_jobs("qemu")) == sorted(ids)
    for device in storage.available_devices(CHECKABLE_HEALTH):
        full = storage.get_device(device.hostname)
        assert device == full
        assert [type(v) for v in vars(device).values()] == [type(v) for v in vars(full).values()]


def test_upgrade_from_schema_4_keeps_the_queue(storage, backend):
    """A database of the previous schema gets the queue indexes in the queue's order and
    keeps its jobs, in the same order."""
    ids = storage.insert_jobs([queued("qemu", priority=p, submit_time=t)
                               for p, t in ((50, 3.0), (100, 5.0), (50, 1.0))])
    with storage.transaction():
        storage._execute("DROP INDEX jobs_queue_order")
        storage._execute("DROP INDEX jobs_queue_stream")
        storage._execute("CREATE INDEX jobs_queue ON jobs (state, requested_device_type,"
                         " priority)")
        storage._execute("CREATE INDEX jobs_queue_tags ON jobs (state, requested_device_type,"
                         " tags, priority, submit_time, id)")
        storage._execute("UPDATE schema_version SET version = 4")
    assert storage.migrate() == (4, SCHEMA_VERSION)
    if backend == "sqlite":
        names = {r[0] for r in storage._all("SELECT name FROM sqlite_master"
                                            " WHERE type = 'index'")}
    else:
        names = {r[0] for r in storage._all("SELECT indexname FROM pg_indexes"
                                            " WHERE schemaname = current_schema()")}
    assert {"jobs_queue_order", "jobs_queue_stream"} <= names
    assert not {"jobs_queue", "jobs_queue_tags"} & names
    assert [j.id for j in storage.queued_jobs("qemu")] == [ids[1], ids[2], ids[0]]
    assert [j.id for j in storage.queued_jobs_tagged("qemu", "[]", 5)] == \
        [ids[1], ids[2], ids[0]]


# -- other processes ------------------------------------------------------------------------

def _lab(lab, backend, schema):
    devices = (("qemu01", "qemu", "worker1", ()),)
    master = {"schedule_interval": 600}  # only wake-ups: no periodic pass in the test
    if backend == "sqlite":
        return lab(devices=devices, master=master)
    return lab(devices=devices, master=master, storage=pgutil.storage_lines(schema),
               extra=pgutil.plugin_extra())


@pytest.fixture
def lab_schema(backend):
    if backend == "sqlite":
        yield None
        return
    yield from pgutil.schema_for_test()


def _cli(config_path, *args):
    proc = gevent.subprocess.run([sys.executable, "-m", "lavacore.cli", "-c", config_path,
                                  *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_jobs_submitted_and_canceled_by_another_process(lab_schema, lab, backend, tmp_path):
    """``lavacore submit`` and ``lavacore jobs cancel`` (other processes) while the master
    runs: the next pass places the queued jobs in order, never the canceled one."""
    lab = _lab(lab, backend, lab_schema)
    worker = lab.worker()
    path = tmp_path / "job.yaml"
    submitted = []
    for priority in ("low", "high", "medium", "high"):
        path.write_text(job_yaml(priority=priority))
        submitted.append(int(_cli(lab.config_path, "submit", str(path)).split()[0]))
    low, first_high, medium, second_high = submitted
    # The first job took the only device at once; cancel the first high while it runs.
    order = [int(worker.expect("START", timeout=10)[1])]
    _cli(lab.config_path, "jobs", "cancel", str(first_high))
    for _ in range(2):
        job_id = order[-1]
        worker.send("START_OK", job_id)
        worker.end(job_id, description=None)
        order.append(int(worker.expect("START", timeout=10,
                                       skip=(b"PONG", b"HELLO_OK", b"END_OK"))[1]))
    assert order == [low, second_high, medium]
    canceled = lab.job(first_high)
    assert canceled.state == JobState.FINISHED and canceled.actual_device is None


def test_a_pass_sees_jobs_another_storage_queued_meanwhile(lab_schema, lab, backend):
    """Another process's storage (the API in a second process) queues jobs without
    telling the master: the next pass, whatever starts it, places the first in order."""
    from lavacore.jobs import submit

    lab = _lab(lab, backend, lab_schema)
    if backend == "sqlite":
        from lavacore_plugins.storage_sqlite import SQLiteStorage

        other = SQLiteStorage(lab.master.storage.path).open()
    else:
        other = pgutil.storage(lab_schema, application_name="lavacore-%s-api" % lab_schema)
    try:
        # Written by the other process and not announced: nothing wakes the master, and
        # the pass run here must find both in the database.
        later = submit(other, lab.master.hook, None, job_yaml(priority="low"), "bob",
                       time.time())[0].id
        first = submit(other, lab.master.hook, None, job_yaml(priority="high"), "bob",
                       time.time())[0].id
        lab.storage.update_worker("worker1", state=WorkerState.ONLINE)
        assert lab.master.schedule_pass() == [first]
        assert lab.job(later).state == JobState.SUBMITTED
    finally:
        other.close()
