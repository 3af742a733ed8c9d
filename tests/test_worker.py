"""The worker (lava-slave equivalent) against a scripted master on real
sockets: as a subprocess (``python -m lavacore.worker.cli``) and in-process on the gevent
loop, with real runners and a real sqlite job table. Intervals are a tenth of a second."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import zmq.green

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lavacore import protocol  # noqa: E402
from lavacore.worker import procs  # noqa: E402
from lavacore.worker.jobtable import (CANCELING, DONE, FINISHED, RUNNING,  # noqa: E402
                                       JobTable)
from lavacore.worker.slave import Worker  # noqa: E402
from workerutil import (FAST, PY, RUNNER, FakeMaster, acknowledged,  # noqa: E402
                        description_of,
                        fill_filesystem, job_yaml, process_gone, small_filesystem,
                        start_frames, start_worker, stop_process, table_rows, wait_for_file,
                        wait_until, worker_argv)

HOST = "worker1"

# A runner that ignores SIGTERM (counting them) and would run for 30 s.
STUBBORN = textwrap.dedent("""\
    import os, signal, sys, time
    out = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--output-dir=")][0]
    terms = []
    def on_term(signum, frame):
        terms.append(signum)
        with open(os.path.join(out, "terms"), "w") as f:
            f.write(str(len(terms)))
    signal.signal(signal.SIGTERM, on_term)
    with open(os.path.join(out, "ready"), "w") as f:
        f.write(str(os.getpid()))
    end = time.monotonic() + 30
    while time.monotonic() < end:
        time.sleep(0.02)
    """)


@pytest.fixture
def master():
    m = FakeMaster()
    yield m
    m.close()


@pytest.fixture
def workers():
    started = []
    yield started
    for proc in started:
        stop_process(proc)


def spawn(workers, master, work_dir, **kwargs):
    proc = start_worker(master, work_dir, HOST, **kwargs)
    workers.append(proc)
    return proc


def job_dir(work_dir, job_id, prefix=""):
    return os.path.join(str(work_dir), "tmp", "%s%d" % (prefix, job_id))


@pytest.mark.timeout(60)
def test_hello_retry_until_hello_ok_and_earlier_messages_are_discarded(master, workers,
                                                                       tmp_path):
    work = tmp_path / "work"
    spawn(workers, master, work)
    first, host, frames = master.expect("HELLO")
    # lava-slave 2020.04+'s version frame, then the instance token of this process
    assert (host, frames[:3]) == (HOST, [b"HELLO", b"3", b"lavacore 0.1.0"])
    instance = frames[3]
    assert len(instance) == 12
    second, _, frames = master.expect("HELLO_RETRY")
    assert frames == [b"HELLO_RETRY", b"3", b"lavacore 0.1.0", instance]
    third, _, _ = master.expect("HELLO_RETRY")
    assert 0.15 <= second - first < 1.5 and 0.15 <= third - second < 1.5
    # Before HELLO_OK everything else is dropped: this START is lost.
    master.send(HOST, start_frames(1, job_yaml(["echo lost"])))
    master.send(HOST, protocol.status(2))
    master.expect("HELLO_RETRY")
    master.send(HOST, protocol.hello_ok())
    master.send(HOST, protocol.status(3))
    _, _, frames = master.expect("END", job_id=3)
    assert frames[2:] == [b"", b""]
    assert not os.path.exists(job_dir(work, 1))
    assert set(table_rows(work)) == {3}
    count = len(master.messages)
    master.idle(0.5)
    assert "HELLO_RETRY" not in master.actions(count)


@pytest.mark.timeout(60)
def test_ping_follows_the_pong_interval(master, workers, tmp_path):
    spawn(workers, master, tmp_path / "work")
    master.connect(HOST)
    sent = time.monotonic()
    master.send(HOST, protocol.pong(2))
    ping_at, _, frames = master.expect("PING", timeout=10)
    assert frames == [b"PING"]
    assert 1.9 <= ping_at - sent < 5.0  # the 2 s asked for (late on a loaded machine)
    # Below the minimum (1 here) and non-integer intervals are refused: the worker keeps
    # a period of seconds instead of flooding the master.
    master.send(HOST, protocol.pong(0))
    master.send(HOST, [b"PONG", b"abc"])
    start = len(master.messages)
    master.idle(3.5)
    pings = [a for a in master.actions(start) if a == "PING"]
    assert 1 <= len(pings) <= 5


@pytest.mark.timeout(60)
def test_job_lifecycle(master, workers, tmp_path):
    work = tmp_path / "work"
    flag = tmp_path / "go"
    spawn(workers, master, work)
    master.connect(HOST)
    definition = job_yaml([
        "echo hello from the worker",
        wait_for_file(flag),
        "lava-test-case first --result pass",
        "lava-test-case speed --result pass --measurement 12.5 --units MB/s",
        "lava-test-case broken --result fail",
    ])
    device = "device_type: host\nhostname: host01\n"
    dispatcher = "prefix: lab-\n"
    env_dut = "overrides:\n  DUT_VAR: dut\n"
    master.send(HOST, start_frames(11, definition, device, dispatcher, "", env_dut))
    master.expect("START_OK", job_id=11)
    path = job_dir(work, 11, "lab-")
    with open(os.path.join(path, "job.yaml")) as f:
        assert f.read() == definition
    with open(os.path.join(path, "device.yaml")) as f:
        assert f.read() == device
    with open(os.path.join(path, "dispatcher.yaml")) as f:
        assert f.read() == dispatcher
    with open(os.path.join(path, "env.dut.yaml")) as f:
        assert f.read() == env_dut
    pid, status, _, prefix = table_rows(work)[11]
    assert (status, prefix) == (RUNNING, "lab-")
    master.wait_target(11, "hello from the worker")
    # A repeated START while it runs is answered START_OK and starts nothing.
    master.send(HOST, start_frames(11, definition, device, dispatcher, "", env_dut))
    master.expect("START_OK", job_id=11)
    assert table_rows(work)[11][0] == pid
    flag.touch()
    assert master.wait_job_result(11) == {"definition": "lava", "case": "job",
                                          "result": "pass"}
    _, _, end = master.expect("END", job_id=11)
    description = description_of(end)
    assert {"device", "job", "compatibility", "pipeline"} <= set(description)
    results = {r["case"]: r for r in master.results(11) if r["definition"] == "0_smoke"}
    assert results["first"]["result"] == "pass"
    assert results["speed"]["measurement"] == 12.5 and results["speed"]["units"] == "MB/s"
    assert results["broken"]["result"] == "fail"
    # Only one runner ran: its start line is in the log once.
    starts = [l for l in master.lines["11"] if l["lvl"] == "info"
              and l["msg"].startswith("lavacore-run ")]
    assert len(starts) == 1
    # Without END_OK, END comes again; a START for the finished job gets END too.
    master.expect("END", job_id=11)
    master.send(HOST, start_frames(11, definition, device, dispatcher, "", env_dut))
    master.expect("END", job_id=11)
    assert table_rows(work)[11][1] == FINISHED
    master.send(HOST, protocol.end_ok(11))
    # Acknowledged: its directory goes, the job is remembered (DONE) and never run again.
    wait_until(lambda: table_rows(work)[11][1] == DONE and not os.path.exists(path),
               what="END_OK cleanup", master=master)
    count = len(master.messages)
    master.send(HOST, start_frames(11, definition, device, dispatcher, "", env_dut))
    end = master.expect("END", job_id=11)[2]
    while b"already ran" not in end[2]:  # (an END resent before END_OK came may be first)
        end = master.expect("END", job_id=11)[2]
    assert b"job 11 already ran on worker worker1" in end[2] and end[3] == b""
    assert "START_OK" not in master.actions(count)
    assert not os.path.exists(path)
    starts = [l for l in master.lines["11"] if l["lvl"] == "info"
              and l["msg"].startswith("lavacore-run ")]
    assert len(starts) == 1


@pytest.mark.timeout(60)
def test_cancel_during_a_running_step(master, workers, tmp_path):
    work = tmp_path / "work"
    pidfile = tmp_path / "sleep.pid"
    spawn(workers, master, work)
    master.connect(HOST)
    master.send(HOST, start_frames(5, job_yaml([
        "sleep 60 & echo $! > %s; echo started; wait" % pidfile])))
    master.expect("START_OK", job_id=5)
    master.wait_target(5, "started")
    runner_pid = table_rows(work)[5][0]
    sent = time.monotonic()
    master.send(HOST, protocol.cancel(5))
    stamp, _, frames = master.expect("END", job_id=5, timeout=10)
    assert stamp - sent < 5
    result = master.wait_job_result(5)
    assert result["result"] == "fail" and result["error_type"] == "Canceled"
    assert description_of(frames) is not None
    assert table_rows(work)[5][1] == CANCELING
    sleep_pid = int(pidfile.read_text())
    wait_until(lambda: process_gone(sleep_pid) and process_gone(runner_pid),
               what="step and runner gone")
    # A CANCEL for a job already canceling sends nothing new but END keeps coming.
    master.send(HOST, protocol.cancel(5))
    master.expect("END", job_id=5)
    master.send(HOST, protocol.end_ok(5))
    wait_until(lambda: acknowledged(work, 5), master=master, what="job acknowledged")


@pytest.mark.timeout(60)
def test_end_goes_out_as_soon_as_the_runner_exits(master, workers, tmp_path):
    # A job check period far longer than the test: only the child watcher can be quick.
    work = tmp_path / "work"
    flag = tmp_path / "go"
    spawn(workers, master, work, extra=["--job-check", "60"])
    master.connect(HOST)
    master.send(HOST, start_frames(91, job_yaml(["echo up", wait_for_file(flag)])))
    master.expect("START_OK", job_id=91)
    master.wait_target(91, "up")
    master.send(HOST, start_frames(92, job_yaml(["echo up; sleep 60"])))
    master.expect("START_OK", job_id=92)
    master.wait_target(92, "up")
    flag.touch()
    master.wait_job_result(91)
    result_at = time.monotonic()
    stamp, _, frames = master.expect("END", job_id=91, timeout=10)
    assert stamp - result_at < 1.5
    assert description_of(frames)["compatibility"] == 1
    assert table_rows(work)[91][1] == FINISHED
    sent = time.monotonic()
    master.send(HOST, protocol.cancel(92))
    stamp, _, frames = master.expect("END", job_id=92, timeout=10)
    assert stamp - sent < 3
    assert table_rows(work)[92][1] == CANCELING
    # The prompt END is not doubled: the next ones wait for the (long) job check.
    count = len(master.messages)
    master.idle(0.5)
    assert "END" not in master.actions(count)
    master.send(HOST, protocol.end_ok(91))
    master.send(HOST, protocol.end_ok(92))
    wait_until(lambda: acknowledged(work), master=master, what="jobs acknowledged")


@pytest.mark.timeout(60)
def test_runner_ignoring_sigterm_gets_sigkill_and_runner_per_device_type(master, workers,
                                                                         tmp_path):
    work = tmp_path / "work"
    stubborn = tmp_path / "stubborn.py"
    stubborn.write_text(STUBBORN)
    spawn(workers, master, work, extra=[
        "--cancel-term-again", "0.4", "--cancel-kill", "1.0",
        "--runner-for", "stubborn=%s %s" % (PY, stubborn)])
    master.connect(HOST)
    master.send(HOST, start_frames(7, job_yaml(["true"]), device="device_type: stubborn\n"))
    master.expect("START_OK", job_id=7)
    ready = os.path.join(job_dir(work, 7), "ready")
    wait_until(lambda: os.path.exists(ready) and open(ready).read(), what="stub ready")
    pid = int(open(ready).read())
    sent = time.monotonic()
    master.send(HOST, protocol.cancel(7))
    stamp, _, frames = master.expect("END", job_id=7, timeout=10)
    assert 1.0 <= stamp - sent < 4.0
    assert frames[3] == b""  # the stub wrote no description.yaml
    assert int(open(os.path.join(job_dir(work, 7), "terms")).read()) >= 2
    assert process_gone(pid)


@pytest.mark.timeout(60)
def test_worker_killed_and_restarted_keeps_tracking_its_job(master, workers, tmp_path):
    work = tmp_path / "work"
    flag = tmp_path / "go"
    first = spawn(workers, master, work)
    master.connect(HOST)
    master.send(HOST, start_frames(21, job_yaml(["echo running", wait_for_file(flag),
                                                 "lava-test-case after --result pass"])))
    master.expect("START_OK", job_id=21)
    master.wait_target(21, "running")
    runner_pid = table_rows(work)[21][0]
    first.kill()
    first.wait(5)
    assert procs.is_runner(runner_pid, 21)
    spawn(workers, master, work)
    master.connect(HOST)  # a restarted worker says HELLO, not HELLO_RETRY
    master.send(HOST, protocol.status(21))
    master.expect("START_OK", job_id=21)
    flag.touch()
    _, _, frames = master.expect("END", job_id=21, timeout=15)
    assert description_of(frames)["compatibility"] == 1
    assert master.wait_job_result(21)["result"] == "pass"
    master.send(HOST, protocol.end_ok(21))
    wait_until(lambda: acknowledged(work, 21), master=master, what="job acknowledged")


# The worker's command line with jobdir.spawn wrapped: SIGKILL to the worker itself
# before the runner is started ("before") or once it is, before its pid is noted ("after").
KILLED_AT_SPAWN = textwrap.dedent("""\
    import os, signal, sys
    import lavacore.worker.jobdir as jobdir
    real = jobdir.spawn
    def spawn(*args, **kwargs):
        if sys.argv[1] == "after":
            real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    jobdir.spawn = spawn
    from lavacore.worker.cli import main
    sys.exit(main(sys.argv[2:]))
    """)


def killed_at_spawn(workers, master, work_dir, moment):
    argv = worker_argv(master, work_dir, HOST)
    os.makedirs(str(work_dir), exist_ok=True)
    proc = subprocess.Popen([PY, "-c", KILLED_AT_SPAWN, moment] + argv[3:])
    workers.append(proc)
    return proc


@pytest.mark.timeout(60)
@pytest.mark.parametrize("moment", ["before", "after"])
def test_worker_killed_while_starting_a_runner(master, workers, tmp_path, moment):
    """A worker killed between noting a job and noting its runner's pid: the next worker
    process runs the job when START comes again if no runner started ("before"), or
    tracks the one that did ("after"); the job's steps run exactly once either way."""
    work = tmp_path / "work"
    runs, flag = tmp_path / "runs", tmp_path / "go"
    definition = job_yaml(["echo ran >> %s" % runs, wait_for_file(flag),
                           "lava-test-case once --result pass"])
    first = killed_at_spawn(workers, master, work, moment)
    master.connect(HOST)
    master.send(HOST, start_frames(41, definition))
    assert first.wait(10) == -signal.SIGKILL
    assert table_rows(work)[41][:2] == (0, RUNNING)  # noted, no pid: the window
    spawn(workers, master, work)
    master.connect(HOST)
    # START_OK never came: the master sends START again.
    master.send(HOST, start_frames(41, definition))
    master.expect("START_OK", job_id=41)
    wait_until(runs.exists, master=master, what="the job's first step")
    wait_until(lambda: table_rows(work)[41][0] != 0, master=master,
               what="the runner's pid noted")
    flag.touch()
    _, _, frames = master.expect("END", job_id=41, timeout=20)
    assert description_of(frames)["compatibility"] == 1
    assert master.wait_job_result(41)["result"] == "pass"
    assert runs.read_text() == "ran\n"
    master.send(HOST, protocol.end_ok(41))
    wait_until(lambda: acknowledged(work, 41), master=master, what="job acknowledged")


@pytest.mark.timeout(60)
def test_a_leftover_job_dir_without_a_row_is_started_afresh(master, workers, tmp_path):
    """A job dir the table does not know (a lost job table, ids reused after a database
    reset), marked as started by a runner long gone: START runs the job anew."""
    work = tmp_path / "work"
    old = tmp_path / "work" / "tmp" / "43"
    old.mkdir(parents=True)
    for name in ("runner.lock", "runner.started"):
        (old / name).touch()
    (old / "description.yaml").write_text("old_job: true\n")
    runs = tmp_path / "runs"
    spawn(workers, master, work)
    master.connect(HOST)
    master.send(HOST, start_frames(43, job_yaml(["echo ran >> %s" % runs])))
    master.expect("START_OK", job_id=43)
    _, _, frames = master.expect("END", job_id=43, timeout=20)
    assert "old_job" not in description_of(frames)
    assert runs.read_text() == "ran\n"


@pytest.mark.timeout(60)
def test_a_runner_holds_its_jobs_lock_and_a_second_one_never_runs(tmp_path):
    from lavacore.worker import jobdir

    job = tmp_path / "job"
    job.mkdir()
    flag, second = tmp_path / "go", tmp_path / "second-ran"
    assert jobdir.runner_state(str(job)) == "unknown"  # not started by this code
    lock = jobdir.open_run_lock(str(job))
    assert jobdir.runner_state(str(job)) == "never"
    waiting = ("import os, time\nfor _ in range(1500):\n    if os.path.exists(%r): break\n"
               "    time.sleep(0.02)\n" % str(flag))  # (30 s at most, whatever happens)
    try:
        first = jobdir.spawn([PY, "-c", waiting], str(job), dict(os.environ), lock_fd=lock)
    finally:
        os.close(lock)
    try:
        assert jobdir.runner_state(str(job)) == "running"
        lock = jobdir.open_run_lock(str(job))
        try:
            with pytest.raises((OSError, subprocess.SubprocessError)):  # the lock's error
                jobdir.spawn([PY, "-c", "open(%r, 'w')" % str(second)], str(job),
                             dict(os.environ), lock_fd=lock)
        finally:
            os.close(lock)
    finally:
        flag.touch()
    assert first.wait(10) == 0
    assert jobdir.runner_state(str(job)) == "ended"
    assert not second.exists()


@pytest.mark.timeout(60)
def test_sigterm_exits_0_and_leaves_the_job_running(master, workers, tmp_path):
    work = tmp_path / "work"
    flag = tmp_path / "go"
    proc = spawn(workers, master, work)
    master.connect(HOST)
    master.send(HOST, start_frames(31, job_yaml(["echo running", wait_for_file(flag)])))
    master.expect("START_OK", job_id=31)
    master.wait_target(31, "running")
    runner_pid = table_rows(work)[31][0]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert procs.is_runner(runner_pid, 31)
    flag.touch()
    assert master.wait_job_result(31)["result"] == "pass"
    wait_until(lambda: process_gone(runner_pid), what="runner ended")


@pytest.mark.timeout(60)
def test_malformed_messages_are_dropped(master, workers, tmp_path):
    proc = spawn(workers, master, tmp_path / "work")
    master.connect(HOST)
    for frames in ([b"START"], [b"CANCEL"], [b"NOPE", b"1"], [b"STATUS", b"x1"],
                   [b"PONG", b"-5"], [b"END_OK", b"\xff\xfe"], [b"\xff"],
                   [b"START", b"9", b"a", b"b", b"c", b"d"],  # 4 frames after the id
                   [b"START", b"9", b"a", b"b", b"c", b"d", b"e", b"f"],  # 6 frames
                   [b"CANCEL", b"99999999999999999999999"]):
        master.send(HOST, frames)
    master.send(HOST, protocol.status(8))
    master.expect("END", job_id=8)
    assert proc.poll() is None
    assert set(table_rows(tmp_path / "work")) == {8}


@pytest.mark.timeout(60)
def test_master_restart_costs_nothing(master, workers, tmp_path):
    spawn(workers, master, tmp_path / "work")
    master.connect(HOST)
    master.send(HOST, protocol.pong(1))
    master.expect("PING")
    master.unbind()
    master.idle(0.5)
    master.bind()  # same port
    start = len(master.messages)
    master.expect("PING", timeout=5)
    assert "HELLO" not in master.actions(start) and "HELLO_RETRY" not in master.actions(start)
    master.send(HOST, protocol.status(4))
    master.expect("END", job_id=4)


@pytest.mark.timeout(60)
def test_curve_worker_refused_until_its_key_is_allowed(workers, tmp_path):
    from zmq.auth.certs import create_certificates
    from zmq.auth.thread import ThreadAuthenticator

    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    _, master_secret = create_certificates(str(keys), "master")
    worker_public, worker_secret = create_certificates(str(keys), "worker")
    master = FakeMaster(curve_secret=master_secret)
    auth = ThreadAuthenticator(master.ctx)
    auth.start()
    try:
        auth.configure_curve(domain="*", location=str(allowed))
        spawn(workers, master, tmp_path / "work", extra=[
            "--encrypt", "--master-cert", str(keys / "master.key"),
            "--worker-cert", worker_secret])
        master.idle(0.6)
        assert master.messages == []  # refused: nothing gets through
        shutil.copy(worker_public, str(allowed))
        auth.configure_curve(domain="*", location=str(allowed))
        _, host, frames = master.expect("HELLO_RETRY", timeout=10)
        master.send(HOST, protocol.hello_ok())
        master.send(HOST, start_frames(71, job_yaml(["lava-test-case secret --result pass"])))
        master.expect("START_OK", job_id=71)
        # The runner's log socket uses the same keys.
        assert master.wait_job_result(71)["result"] == "pass"
        master.expect("END", job_id=71)
    finally:
        auth.stop()
        master.close()


# -- in-process, on this test's gevent loop ----------------------------------------------

@pytest.fixture
def green_master():
    m = FakeMaster(zmq.green)
    yield m
    m.close()


def in_process(green_master, work_dir, **options):
    kwargs = dict(FAST, runner=RUNNER)
    kwargs.update(options)
    return Worker(green_master.url, green_master.logs_url, HOST, str(work_dir), **kwargs)


@pytest.mark.timeout(60)
def test_in_process_start_and_stop(green_master, tmp_path):
    worker = in_process(green_master, tmp_path / "work")
    assert worker.greenlet is None and not os.path.exists(tmp_path / "work")
    worker.stop()  # before start: nothing to do
    greenlet = worker.start()
    assert worker.start() is greenlet
    green_master.connect(HOST)
    green_master.send(HOST, protocol.status(1))
    green_master.expect("END", job_id=1)
    began = time.monotonic()
    worker.stop()
    worker.stop()
    assert greenlet.dead and time.monotonic() - began < 2
    # Its job table survives for the next worker on the same dir.
    again = in_process(green_master, tmp_path / "work")
    again.start()
    green_master.connect(HOST)
    green_master.send(HOST, protocol.status(1))
    green_master.expect("END", job_id=1)
    again.stop()


@pytest.mark.timeout(60)
def test_status_of_running_finished_and_unknown_jobs(green_master, tmp_path):
    flag = tmp_path / "go"
    worker = in_process(green_master, tmp_path / "work")
    worker.start()
    try:
        green_master.connect(HOST)
        green_master.send(HOST, start_frames(41, job_yaml(["echo up", wait_for_file(flag)])))
        green_master.expect("START_OK", job_id=41)
        green_master.wait_target(41, "up")
        green_master.send(HOST, protocol.status(41))
        green_master.expect("START_OK", job_id=41)
        green_master.send(HOST, protocol.status(42))
        _, _, frames = green_master.expect("END", job_id=42)
        assert frames[2:] == [b"", b""]
        flag.touch()
        green_master.expect("END", job_id=41, timeout=15)
        green_master.send(HOST, protocol.status(41))
        _, _, frames = green_master.expect("END", job_id=41)
        assert description_of(frames) is not None
        rows = table_rows(tmp_path / "work")
        assert rows[41][1] == FINISHED and rows[42][:2] == (0, FINISHED)
    finally:
        worker.stop()


@pytest.mark.timeout(60)
def test_env_frame_purge_removes_overrides(green_master, tmp_path, monkeypatch):
    monkeypatch.setenv("LAVACORE_T_KEEP", "kept")
    monkeypatch.setenv("LAVACORE_T_DROP", "dropped")
    show = 'echo "KEEP=${LAVACORE_T_KEEP:-unset} DROP=${LAVACORE_T_DROP:-unset} ' \
           'NEW=${LAVACORE_T_NEW:-unset} DUT=${DUT_VAR:-unset}"'
    worker = in_process(green_master, tmp_path / "work")
    worker.start()
    try:
        green_master.connect(HOST)
        env = "removes: [LAVACORE_T_DROP, NOT_THERE]\noverrides:\n  LAVACORE_T_NEW: new\n"
        green_master.send(HOST, start_frames(51, job_yaml([show]), env=env,
                                             env_dut="overrides: {DUT_VAR: dut}\n"))
        green_master.send(HOST, start_frames(52, job_yaml([show]), env=(
            "purge: true\noverrides:\n  LAVACORE_T_NEW: only\n  PATH: %s\n"
            % os.environ["PATH"])))
        green_master.wait_target(51, "KEEP=kept DROP=unset NEW=new DUT=dut")
        green_master.wait_target(52, "KEEP=unset DROP=unset NEW=only DUT=unset")
        assert green_master.wait_job_result(52)["result"] == "pass"
    finally:
        worker.stop()


@pytest.mark.timeout(60)
def test_spawn_failure_answers_start_ok_then_end(green_master, tmp_path):
    worker = in_process(green_master, tmp_path / "work", runner="/nonexistent/runner")
    worker.start()
    try:
        green_master.connect(HOST)
        green_master.send(HOST, start_frames(61, job_yaml(["true"])))
        green_master.expect("START_OK", job_id=61)
        _, _, frames = green_master.expect("END", job_id=61)
        assert b"cannot start the runner of job 61" in frames[2] and frames[3] == b""
        assert table_rows(tmp_path / "work")[61][:2] == (0, FINISHED)
        # An env frame that is not a mapping fails the same way.
        green_master.send(HOST, start_frames(62, job_yaml(["true"]), env="- a list\n"))
        green_master.expect("START_OK", job_id=62)
        _, _, frames = green_master.expect("END", job_id=62)
        assert b"must be a YAML mapping" in frames[2]
    finally:
        worker.stop()


@pytest.mark.timeout(60)
def test_default_runner_is_the_builtin_one(green_master, tmp_path):
    worker = Worker(green_master.url, green_master.logs_url, HOST, str(tmp_path / "work"),
                    **FAST)
    assert worker.runner == ["lavacore-run"]
    worker.start()
    try:
        green_master.connect(HOST)
        green_master.send(HOST, start_frames(81, job_yaml(["lava-test-case ok --result pass"])))
        green_master.expect("START_OK", job_id=81)
        assert green_master.wait_job_result(81)["result"] == "pass"
    finally:
        worker.stop()


def test_job_table_keeps_its_rows_while_the_disk_is_full(tmp_path):
    with small_filesystem(tmp_path / "small") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        path = str(tmp_path / "small" / "db.sqlite3")
        table = JobTable(path)
        table.insert(1, 100, RUNNING, 1.0)
        filler = fill_filesystem(tmp_path / "small")
        for job_id in range(2, 60):  # enough rows to need a new page
            table.insert(job_id, 1000 + job_id, RUNNING, 2.0, "p-")
        table.update(1, FINISHED, 3.0)
        table.delete(2)
        assert table.error is not None and "full" in table.error
        assert table.get(1) == (1, 100, FINISHED, 3.0, "")
        assert table.get(2) is None and table.get(59).prefix == "p-"
        assert [row.id for row in table.all()] == [1] + list(range(3, 60))
        assert not table.flush()
        os.unlink(filler)
        assert table.flush() and table.error is None
        table.close()
        again = JobTable(path)
        assert again.all() == [(1, 100, FINISHED, 3.0, "")] + [
            (i, 1000 + i, RUNNING, 2.0, "p-") for i in range(3, 60)]
        again.close()


def test_constructor_checks_arguments(tmp_path):
    with pytest.raises(ValueError):
        Worker("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "bad name", str(tmp_path))
    with pytest.raises(ValueError):
        Worker("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "lava-logs", str(tmp_path))
    with pytest.raises(ValueError):
        Worker("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "w", str(tmp_path), job_check=0)
    with pytest.raises(ValueError):
        Worker("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "w", str(tmp_path), runner="")


@pytest.mark.timeout(30)
def test_cli_refuses_a_second_worker_on_the_same_dir_and_bad_arguments(master, workers,
                                                                        tmp_path):
    from lavacore.worker import cli

    assert cli.main(["--master", master.url]) == 1
    spawn(workers, master, tmp_path / "work")
    master.connect(HOST)
    second = start_worker(master, tmp_path / "work", "worker2")
    workers.append(second)
    assert second.wait(10) == 1
