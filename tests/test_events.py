"""The publisher role: LAVA's event frames on the PUB socket, and event_url (an external
LAVA publisher) waking the master."""

import datetime
import json
import uuid

import gevent
import pytest
import zmq.green as zmq

from conftest import job_yaml
from lavacore.jobs import submit
from lavacore.logformat import result_line
from lavacore.services.events import encode_event

pytestmark = pytest.mark.timeout(60)


def _subscribe(lab):
    sub = lab.context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(lab.master.events.endpoint)
    gevent.sleep(0.2)  # the subscription must reach the PUB socket before events flow
    return sub


def _events(sub, until, timeout=5):
    seen = []
    with gevent.Timeout(timeout, AssertionError("events seen: %r" % seen)):
        while True:
            frames = sub.recv_multipart()
            seen.append(frames)
            if until(frames):
                return seen


def test_job_device_worker_events_in_lava_format(lab):
    lab = lab()
    sub = _subscribe(lab)
    worker = lab.worker()
    job_id = lab.submit(user="alice")
    worker.expect("START")
    worker.send("START_OK", job_id)
    worker.log(job_id, result_line("lava", "job", "pass"))
    worker.end(job_id)
    seen = _events(sub, lambda f: f[0].endswith(b".device") and
                   json.loads(f[4])["state"] == "Idle")
    for frames in seen:
        assert len(frames) == 5
        topic, ident, stamp, _user, data = frames
        assert topic.decode().startswith("org.linaro.validation.")
        uuid.UUID(ident.decode())
        datetime.datetime.fromisoformat(stamp.decode())
        json.loads(data)
    jobs = [json.loads(f[4]) for f in seen if f[0].endswith(b".testjob")]
    assert [j["state"] for j in jobs] == ["Submitted", "Scheduled", "Running", "Finished"]
    assert jobs[-1]["health"] == "Complete"
    assert all(j["job"] == str(job_id) and j["description"] == "test job" for j in jobs)
    assert {f[3] for f in seen if f[0].endswith(b".testjob")} == {b"alice"}
    devices = [json.loads(f[4]) for f in seen if f[0].endswith(b".device")]
    assert [d["state"] for d in devices] == ["Reserved", "Running", "Idle"]
    assert all(d["device"] == "qemu01" and d["device_type"] == "qemu" for d in devices)
    workers = [json.loads(f[4]) for f in seen if f[0].endswith(b".worker")]
    assert workers[0]["hostname"] == "worker1" and workers[0]["state"] == "Online"
    sub.close()


def test_external_publisher_wakes_the_master(lab):
    external = None
    context = zmq.Context()
    try:
        external = context.socket(zmq.PUB)
        external.bind("tcp://127.0.0.1:*")
        url = external.getsockopt_string(zmq.LAST_ENDPOINT)
        lab = lab(master={"schedule_interval": 3600, "event_url": url})
        worker = lab.worker()
        lab.wait_for(lambda: lab.storage.get_worker("worker1").state.display == "Online")
        lab.wait_for(lab.master.scheduler.idle, what="an idle scheduler")
        # Another writer queues a job without telling this master...
        job = submit(lab.storage, None, None, job_yaml(), "bob", lab.master.clock.time())[0]
        # ...which it does not know of: nothing was sent for it (a START would come before
        # this PONG on the connection).
        worker.send("PING")
        assert worker.recv() == [b"PONG", b"20"]
        # ...then the external publisher announces it, as LAVA's did.
        for _ in range(50):  # PUB/SUB joins late on a loaded machine
            external.send_multipart(encode_event(
                "org.linaro.validation.testjob", "bob",
                {"job": str(job.id), "state": "Submitted", "device_type": "qemu"}))
            try:
                frames = worker.expect("START", timeout=0.2)
                break
            except AssertionError:
                continue
        assert int(frames[1]) == job.id
        # Malformed external events are ignored.
        external.send_multipart([b"org.linaro.validation.testjob", b"only two"])
        worker.send("PING")
        worker.expect("PONG")
    finally:
        if external is not None:
            external.close()
        context.term()


def test_lava_logs_ping_gets_pong_without_a_worker_row(lab):
    lab = lab()
    logs = lab.worker("lava-logs", connect=False)
    logs.send("PING")
    assert logs.expect("PONG", skip=()) == [b"PONG", b"20"]
    assert "lava-logs" not in [w.hostname for w in lab.storage.list_workers()]
