"""The master against a scripted protocol v3 worker, in-process."""

import lzma
import os
import time

import gevent
import pytest
import yaml

from lavacore.states import DeviceState, JobHealth, JobState, WorkerState
from lavacore.logformat import make_line, result_line

pytestmark = pytest.mark.timeout(60)


def test_hello_gets_hello_ok_and_worker_goes_online(lab):
    lab = lab()
    assert lab.storage.get_worker("worker1").state == WorkerState.OFFLINE
    worker = lab.worker("worker1", connect=False)
    worker.send("HELLO", "3")
    assert worker.recv() == [b"HELLO_OK"]
    lab.wait_for(lambda: lab.storage.get_worker("worker1").state == WorkerState.ONLINE)


def test_hello_retry_and_2020_version_frame_accepted(lab):
    lab = lab()
    worker = lab.worker("worker1", connect=False)
    worker.send("HELLO_RETRY", "3", "2020.04")
    assert worker.recv() == [b"HELLO_OK"]
    # The version it gave is what `workers show` and the API report.
    lab.wait_for(lambda: lab.storage.get_worker("worker1").version == "2020.04",
                 what="the worker's version stored")


def test_version_mismatch_gets_no_answer(lab, caplog):
    lab = lab()
    worker = lab.worker("worker1", connect=False)
    worker.send("HELLO", "2")
    lab.wait_for(lambda: "protocol version 2" in caplog.text, what="the refusal")
    assert lab.storage.get_worker("worker1").state == WorkerState.OFFLINE
    worker.send("PING")  # handled after the HELLO: a HELLO_OK would come first
    assert worker.recv() == [b"PONG", b"20"]


def test_ping_gets_pong_with_interval(lab):
    lab = lab(master={"ping_interval": 7})
    worker = lab.worker()
    worker.send("PING")
    assert worker.recv() == [b"PONG", b"7"]


@pytest.mark.parametrize("frames", [
    [b""],                                # an empty action frame
    ["START_OK"],                         # missing job id
    ["START_OK", "abc"],                  # not an integer
    ["END", "1"],                         # too few frames
    ["HELLO", "x"],                       # bad version
    ["BOGUS", "1"],                       # unknown action
    [b"\xff\xfe"],                        # not UTF-8
])
def test_malformed_messages_are_dropped_not_fatal(lab, frames, caplog):
    lab = lab()
    worker = lab.worker()
    worker.sock.send_multipart([b"master"] + [f if isinstance(f, bytes) else f.encode()
                                             for f in frames])
    worker.send("PING")
    assert worker.expect("PONG")[0] == b"PONG"
    assert "worker1" in caplog.text and "malformed" in caplog.text
    assert not lab.master._stopped.is_set()


def test_submit_starts_job_on_idle_device_at_once(lab):
    lab = lab()
    worker = lab.worker()
    job_id = lab.submit()
    frames = worker.expect("START", timeout=2)
    assert len(frames) == 7  # START, id and exactly five frames
    assert frames[1] == str(job_id).encode()
    definition = yaml.safe_load(frames[2])
    assert definition["job_name"] == "test job"
    device = yaml.safe_load(frames[3])
    assert device["device_type"] == "qemu"
    job = lab.job(job_id)
    assert job.state == JobState.SCHEDULED and job.actual_device == "qemu01"
    assert lab.storage.get_device("qemu01").state == DeviceState.RESERVED
    # The files START was built from are kept; the worker files only when not empty, as
    # LAVA does (this lab has an env.yaml only).
    assert lab.master.files.flush(5)
    out = job.output_dir(lab.master.output_root)
    names = ("job.yaml", "device.yaml", "dispatcher.yaml", "env.yaml", "env.dut.yaml")
    assert [bool(f) for f in frames[2:]] == [True, True, False, True, False]
    for name, sent in zip(names, frames[2:]):
        path = os.path.join(out, name)
        assert os.path.exists(path) == bool(sent), name
        if sent:
            with open(path) as handle:
                assert handle.read().encode() == sent, name


def test_a_blocking_disk_does_not_stall_the_master(lab):
    """The job files are written by a thread: while a write hangs (here a FIFO nobody
    reads yet stands where device.yaml goes), PINGs are answered, START goes out and the
    API's jobs.configuration answers from what is queued."""
    lab = lab()
    job_id = lab.submit()  # no worker yet: it waits in the queue
    out = lab.job(job_id).output_dir(lab.master.output_root)
    os.makedirs(out)
    os.mkfifo(os.path.join(out, "device.yaml"))
    worker = lab.worker()
    frames = worker.expect("START", timeout=5)
    worker.send("PING")
    worker.expect("PONG")
    from lavacore.api.jobs import configuration
    texts = configuration(lab.master, lab.job(job_id))
    assert texts[0].encode() == frames[2] and texts[1].encode() == frames[3]
    assert not os.path.exists(os.path.join(out, "job.yaml"))  # written after device.yaml
    assert not lab.master.files.flush(0.2)
    with open(os.path.join(out, "device.yaml")) as fifo:  # the disk answers
        assert fifo.read().encode() == frames[3]
    assert lab.master.files.flush(5)
    with open(os.path.join(out, "job.yaml")) as handle:
        assert handle.read().encode() == frames[2]


def test_full_lifecycle_complete(lab):
    lab = lab()
    worker = lab.worker()
    job_id = lab.submit()
    worker.expect("START")
    worker.send("START_OK", job_id)
    lab.wait_for(lambda: lab.job(job_id).state == JobState.RUNNING, what="Running")
    assert lab.storage.get_device("qemu01").state == DeviceState.RUNNING
    worker.log(job_id, make_line("info", "hello"))
    worker.log(job_id, result_line("0_smoke", "echo", "pass"))
    worker.log(job_id, result_line("0_smoke", "speed", "pass", measurement=3.5, units="MB/s"))
    worker.log(job_id, result_line("lava", "job", "pass"))
    worker.end(job_id)
    assert worker.expect("END_OK") == [b"END_OK", str(job_id).encode()]
    lab.wait_for(lambda: lab.job(job_id).state == JobState.FINISHED, what="Finished")
    job = lab.job(job_id)
    assert job.health == JobHealth.COMPLETE
    assert lab.storage.get_device("qemu01").state == DeviceState.IDLE
    cases = {(c.suite, c.name): c for c in lab.storage.list_testcases(job_id)}
    assert cases[("0_smoke", "speed")].measurement == "3.5"
    assert cases[("0_smoke", "speed")].units == "MB/s"
    assert cases[("lava", "job")].result == "pass"
    out = job.output_dir(lab.master.output_root)
    with open(os.path.join(out, "output.yaml")) as handle:
        logged = yaml.safe_load(handle)
    assert logged[0]["msg"] == "hello"
    assert lab.master.files.flush(5)
    assert os.path.exists(os.path.join(out, "description.yaml"))
    # A duplicate END is acknowledged and changes nothing.
    worker.end(job_id)
    worker.expect("END_OK")
    assert lab.job(job_id).health == JobHealth.COMPLETE


def test_failed_job_result_incomplete_with_reason(lab):
    lab = lab()
    worker = lab.worker()
    job_id = lab.submit()
    worker.expect("START")
    worker.send("START_OK", job_id)
    worker.log(job_id, result_line("lava", "job", "fail", error_type="Infrastructure",
                                   error_msg="board did not boot"))
    worker.end(job_id)
    worker.expect("END_OK")
    lab.wait_for(lambda: lab.job(job_id).state == JobState.FINISHED)
    job = lab.job(job_id)
    assert job.health == JobHealth.INCOMPLETE
    assert "board did not boot" in job.failure_comment
    assert job.infrastructure_error
    # The device went Unknown to be checked; its type has no health check, so the next
    # pass makes it Good again, saying why (lavacore/health.py).
    lab.wait_for(lambda: lab.storage.get_device("qemu01").health.display == "Good")
    history = lab.storage.list_history("device", "qemu01")
    assert [(h["old"], h["new"]) for h in history[:2]] == [("Unknown", "Good"),
                                                            ("Good", "Unknown")]
    assert "no health check" in history[0]["reason"]
    assert "infrastructure error" in history[1]["reason"]


def test_end_without_description_is_incomplete_with_stderr(lab):
    lab = lab()
    worker = lab.worker()
    job_id = lab.submit()
    worker.expect("START")
    worker.send("START_OK", job_id)
    worker.end(job_id, errors="Traceback: lava-run exploded", description=None)
    worker.expect("END_OK")
    job = lab.job(job_id)
    assert job.state == JobState.FINISHED and job.health == JobHealth.INCOMPLETE
    assert "lava-run exploded" in job.failure_comment


def test_end_with_description_but_no_result_finishes_after_grace(lab):
    lab = lab(master={"result_grace": 0.2})
    worker = lab.worker()
    job_id = lab.submit()
    worker.expect("START")
    worker.send("START_OK", job_id)
    worker.end(job_id)
    worker.expect("END_OK")
    assert lab.job(job_id).state == JobState.RUNNING
    lab.wait_for(lambda: lab.job(job_id).state == JobState.FINISHED, what="grace expiry")
    job = lab.job(job_id)
    assert job.health == JobHealth.INCOMPLETE
    assert "no lava/job result" in job.failure_comment


def test_result_after_end_within_grace_decides(lab):
    lab = lab(master={"result_grace": 5})
    worker = lab.worker()
    job_id = lab.submit()
    worker.expect("START")
    worker.send("START_OK", job_id)
    worker.end(job_id)
    worker.expect("END_OK")
    worker.log(job_id, result_line("lava", "job", "pass"))
    lab.wait_for(lambda: lab.job(job_id).state == JobState.FINISHED)
    assert lab.job(job_id).health == JobHealth.COMPLETE


def test_end_for_unknown_job_is_acked(lab):
    lab = lab()
    worker = lab.worker()
    worker.end(4242)
    assert worker.expect("END_OK") == [b"END_OK", b"4242"]


def test_end_with_corrupt_lzma_is_treated_as_crash(lab):
    lab = lab()
    worker = lab.worker()
    job_id = lab.submit()
    worker.expect("START")
    worker.send("START_OK", job_id)
    worker.send("END", job_id, "", b"not lzma at all")
    worker.expect("END_OK")
    assert lab.job(job_id).health == JobHealth.INCOMPLETE


def test_start_resent_every_full_pass_until_start_ok(lab):
    lab = lab(master={"schedule_interval": 0.1})
    worker = lab.worker()
    job_id = lab.submit()
    first = worker.expect("START")
    again = worker.expect("START", timeout=2)
    assert again == first
    worker.send("START_OK", job_id)
    lab.wait_for(lambda: lab.job(job_id).state == JobState.RUNNING)
    # A START resent before START_OK arrived may still be queued ahead of this PONG...
    worker.send("PING")
    worker.expect("PONG", skip=(b"START",))
    # ...but none is sent once the job is Running, by a full pass either.
    lab.wait_for(lab.master.scheduler.idle, what="an idle scheduler")
    lab.master.full_pass()
    lab.settled(worker)


def test_a_periodic_pass_leaves_a_fresh_start_alone(lab):
    """A master behind on its messages has START_OKs waiting in its queue, not lost: the
    periodic pass resends only a START older than half a schedule_interval, so a busy
    master does not add work; a worker coming back Online gets its STARTs at once."""
    clock = lab.clock()
    lab = lab(master={"schedule_interval": 600, "worker_timeout": 100000}, clock=clock)
    worker = lab.worker()
    job_id = lab.submit()
    first = worker.expect("START")
    lab.wait_for(lab.master.scheduler.idle, what="an idle scheduler")
    lab.master.full_pass()  # the START is younger than 300 s: left alone
    worker.send("PING")
    assert worker.expect("PONG", skip=(b"HELLO_OK",))[0] == b"PONG"
    clock.advance(301)
    lab.master.full_pass()
    assert worker.expect("START", skip=(b"PONG",)) == first
    lab.master.workers_online(["worker1"])  # back Online: whatever its START's age
    assert worker.expect("START", skip=(b"PONG",)) == first
    worker.send("START_OK", job_id)
    lab.wait_for(lambda: lab.job(job_id).state == JobState.RUNNING)


def test_a_pass_woken_while_placing_jobs_leaves_the_loop_a_gap(lab):
    """Wake-ups faster than passes (devices freed one after another under load): the
    next pass waits as long as the last one took, so what frees meanwhile goes in one
    pass instead of one pass, with its fixed cost, per device."""
    lab = lab()
    worker = lab.worker()
    master = lab.master
    real = master.schedule_pass
    passes = []

    def timed():
        started = time.monotonic()
        placed = real()
        if placed and not any(p[2] for p in passes):
            master.scheduler.wake()  # woken again while this pass placed a job...
            gevent.sleep(0.03)       # ...and the pass took 30 ms or more
        passes.append((started, time.monotonic(), placed))
        return placed

    master.schedule_pass = timed
    lab.submit()
    worker.expect("START")
    lab.wait_for(lambda: any(p[2] for p in passes[:-1]), what="a pass after the placing one")
    index = next(i for i, p in enumerate(passes) if p[2])
    assert passes[index + 1][0] - passes[index][1] >= 0.03


def test_cancel_running_job_sends_cancel_until_end(lab):
    lab = lab(master={"schedule_interval": 0.1})
    worker = lab.worker()
    job_id = lab.submit()
    worker.expect("START")
    worker.send("START_OK", job_id)
    lab.wait_for(lambda: lab.job(job_id).state == JobState.RUNNING)
    lab.master.flow.cancel(job_id, "alice")
    # A START resent before START_OK was processed may still be on its way: skip it.
    skip = (b"PONG", b"HELLO_OK", b"START")
    assert worker.expect("CANCEL", timeout=1, skip=skip) == [b"CANCEL", str(job_id).encode()]
    assert worker.expect("CANCEL", timeout=2, skip=skip) == [b"CANCEL", str(job_id).encode()]
    worker.end(job_id, description=None)
    worker.expect("END_OK", skip=(b"PONG", b"CANCEL"))
    job = lab.job(job_id)
    assert job.state == JobState.FINISHED and job.health == JobHealth.CANCELED
    assert lab.storage.get_device("qemu01").state == DeviceState.IDLE


def test_cancel_submitted_job_finishes_canceled(lab):
    lab = lab()
    job_id = lab.submit()  # no worker online: stays Submitted
    assert lab.job(job_id).state == JobState.SUBMITTED
    lab.master.flow.cancel(job_id, "alice")
    job = lab.job(job_id)
    assert job.state == JobState.FINISHED and job.health == JobHealth.CANCELED


def test_status_for_running_jobs_of_worker_unknown_to_restarted_master(tmp_path, lab):
    first = lab()
    worker = first.worker()
    job_id = first.submit()
    worker.expect("START")
    worker.send("START_OK", job_id)
    first.wait_for(lambda: first.job(job_id).state == JobState.RUNNING)
    worker.close()
    first.close()
    # A new master on the same database and ports chosen anew: the worker's first
    # message (a PING, not a HELLO) makes the master ask for the status of its jobs.
    second = lab()
    worker = second.worker(connect=False)
    worker.send("PING")
    worker.expect("PONG", skip=())
    assert worker.expect("STATUS") == [b"STATUS", str(job_id).encode()]
    worker.send("START_OK", job_id)
    worker.log(job_id, result_line("lava", "job", "pass"))
    worker.end(job_id)
    worker.expect("END_OK")
    second.wait_for(lambda: second.job(job_id).state == JobState.FINISHED)
    assert second.job(job_id).health == JobHealth.COMPLETE


def test_silent_worker_goes_offline_and_is_not_scheduled(lab):
    clock = lab.clock()
    lab = lab(clock=clock, master={"worker_timeout": 60})
    worker = lab.worker()
    lab.wait_for(lambda: lab.storage.get_worker("worker1").state == WorkerState.ONLINE)
    clock.advance(61)
    lab.wait_for(lambda: lab.storage.get_worker("worker1").state == WorkerState.OFFLINE,
                 what="Offline")
    job_id = lab.submit()
    lab.wait_for(lab.master.scheduler.idle, what="an idle scheduler")
    lab.master.schedule_pass()  # (a PING would bring the worker back: no settled() here)
    assert lab.job(job_id).state == JobState.SUBMITTED
    # Any valid message brings it back, and the queued job starts.
    worker.send("PING")
    worker.expect("START", timeout=2)


def test_job_from_other_worker_is_ignored(lab):
    lab = lab(devices=(("qemu01", "qemu", "worker1", ()), ("qemu02", "qemu", "worker2", ())))
    w1 = lab.worker("worker1")
    w2 = lab.worker("worker2")
    job_id = lab.submit()
    # Whichever worker got it, the other may not speak for it.
    lab.wait_for(lambda: lab.job(job_id).worker is not None)
    owner, other = (w1, w2) if lab.job(job_id).worker == "worker1" else (w2, w1)
    owner.expect("START")
    other.send("START_OK", job_id)
    other.end(job_id, description=None)
    other.expect("END_OK")
    assert lab.job(job_id).state == JobState.SCHEDULED


def test_broken_device_template_fails_only_that_job(lab):
    lab = lab(devices=(("qemu01", "qemu", "worker1", ()), ("bbb01", "bbb", "worker1", ())))
    (lab.tmp_path / "etc/dispatcher-config/devices/bbb01.jinja2").write_text(
        "{% extends 'bbb.jinja2' %}\n{% if %}\n")
    worker = lab.worker()
    bad = lab.submit(device_type="bbb")
    good = lab.submit(device_type="qemu")
    lab.wait_for(lambda: lab.job(bad).state == JobState.FINISHED)
    job = lab.job(bad)
    assert job.health == JobHealth.INCOMPLETE and job.infrastructure_error
    assert "bbb01.jinja2" in job.failure_comment
    cases = lab.storage.list_testcases(bad)
    assert [(c.suite, c.name, c.result) for c in cases] == [("lava", "job", "fail")]
    frames = worker.expect("START")
    assert frames[1] == str(good).encode()


def test_invalid_env_yaml_fails_the_job(lab):
    lab = lab()
    (lab.tmp_path / "etc/env.yaml").write_text("overrides: [unclosed\n")
    lab.worker()
    job_id = lab.submit()
    lab.wait_for(lambda: lab.job(job_id).state == JobState.FINISHED)
    assert "env.yaml" in lab.job(job_id).failure_comment


def test_priority_then_submit_order(lab):
    lab = lab()
    low = lab.submit(priority="low")
    high = lab.submit(priority="high")
    medium = lab.submit(priority=50)
    worker = lab.worker()
    order = []
    for _ in range(3):
        frames = worker.expect("START")
        job_id = int(frames[1])
        order.append(job_id)
        worker.send("START_OK", job_id)
        worker.end(job_id, description=None)
        worker.expect("END_OK", skip=(b"PONG", b"HELLO_OK", b"START"))
    assert order == [high, medium, low]


def test_tags_must_be_subset_of_device_tags(lab):
    lab = lab(devices=(("qemu01", "qemu", "worker1", ()),
                       ("qemu02", "qemu", "worker1", ("usb", "hdmi"))))
    worker = lab.worker()
    job_id = lab.submit(extra="tags: [usb]\n")
    worker.expect("START")
    assert lab.job(job_id).actual_device == "qemu02"


def test_description_file_is_lzma_decoded(lab):
    lab = lab()
    worker = lab.worker()
    job_id = lab.submit()
    worker.expect("START")
    worker.send("START_OK", job_id)
    worker.log(job_id, result_line("lava", "job", "pass"))
    worker.send("END", job_id, "", lzma.compress(b"compatibility: 7\n"))
    worker.expect("END_OK")
    out = lab.job(job_id).output_dir(lab.master.output_root)
    assert lab.master.files.flush(5)
    with open(os.path.join(out, "description.yaml")) as handle:
        assert yaml.safe_load(handle) == {"compatibility": 7}
