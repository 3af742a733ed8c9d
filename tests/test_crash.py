"""Crashes and faults: a master killed with SIGKILL while jobs run, lost START_OKs, a full
disk under the database and the job output, two workers with one name. Real processes:
`lavacore` (the master), `lavacore worker`, the built-in runner."""

import os

import pytest

from conftest import job_yaml as scripted_job
from crashutil import CrashLab
from workerutil import (acknowledged, fill_filesystem, job_yaml, small_filesystem,
                        table_rows, wait_for_file, wait_until)
from lavacore.worker.jobtable import FINISHED

WAIT = 60


@pytest.fixture
def crash_lab(tmp_path):
    labs = []

    def make(**kwargs):
        lab = CrashLab(tmp_path, **kwargs)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.close()


def numbered(tag, count):
    return "for i in $(seq 1 %d); do echo %s-$i; done" % (count, tag)


@pytest.mark.timeout(120)
def test_master_killed_mid_job_loses_no_line_case_or_result(crash_lab, tmp_path):
    """Lines the runner sends while the master is dead (and the ones in flight when it
    died) would be gone: the worker's copy of the log brings them back."""
    lab = crash_lab()
    lab.start_worker("worker01")
    flag = tmp_path / "go"
    job_id, = lab.submit(job_yaml([
        numbered("before", 300), "lava-test-case before --result pass", wait_for_file(flag),
        numbered("after", 300), "lava-test-case after --result pass"]))
    wait_until(lambda: "before-300" in lab.targets(job_id), timeout=WAIT,
               what="the first half of the log")
    lab.kill_master()
    flag.touch()
    # The job ends while the master is dead; its runner gives up on the lines it could not
    # deliver, and its END is resent in vain.
    wait_until(lambda: lab.rows("worker01").get(job_id, (0, None))[1] == FINISHED,
               timeout=WAIT, what="the job's end on the worker")
    lab.start_master()
    job = lab.finished(job_id)
    assert job["health"] == "Complete", job
    expected = (["before-%d" % n for n in range(1, 301)]
                + ["after-%d" % n for n in range(1, 301)])
    assert [t for t in lab.targets(job_id) if t.startswith(("before-", "after-"))] == expected
    cases = lab.results(job_id)
    assert ("0_smoke", "before", "pass") in cases and ("0_smoke", "after", "pass") in cases
    assert ("lava", "job", "pass") in cases and len(cases) == len(set(cases))
    assert "taking the worker's copy of the log" in lab.master_logs()
    wait_until(lambda: acknowledged(lab.work_dir("worker01")), timeout=WAIT,
               what="END acknowledged")


@pytest.mark.timeout(60)
def test_an_end_without_start_ok_means_the_job_ran(lab):
    """START_OK lost (the master was away): the END that follows makes the job Running
    then Finished, and START is never sent again for it, so it cannot run twice."""
    lab = lab(master={"schedule_interval": 3600})
    worker = lab.worker()
    job_id = lab.submit(text=scripted_job(device_type="qemu"))
    assert worker.expect("START")[1] == str(job_id).encode()
    # No START_OK: the worker's answer was lost. The job runs and ends.
    worker.end(job_id)  # the lava/job result is still on its way
    worker.expect("END_OK")
    job = lab.job(job_id)
    assert job.state.display == "Running" and job.start_time is not None
    lab.master.full_pass()  # what resent START every pass before
    worker.send("PING")
    assert worker.expect("PONG", skip=(b"HELLO_OK",))[0] == b"PONG"  # and no START before
    worker.log(job_id, '{"dt": "2026-12-02T00:00:00", "lvl": "results", "msg": '
                       '{"definition": "lava", "case": "job", "result": "pass"}}')
    lab.wait_for(lambda: lab.job(job_id).state.display == "Finished", timeout=WAIT)
    assert lab.job(job_id).health.display == "Complete"


@pytest.mark.timeout(180)
def test_a_full_disk_under_the_database_and_the_job_output(crash_lab, tmp_path):
    small = tmp_path / "small"
    with small_filesystem(small, size="8m") as mounted:
        assert mounted, "mounting a tmpfs needs root: the tests run as root (.ci/run)"
        lab = crash_lab(storage=['backend = "sqlite"', 'url = "%s"' % (small / "lab.db")],
                        output_dir=small / "job-output")
        lab.start_worker("worker01")
        flag = tmp_path / "go"
        job_id, = lab.submit(job_yaml([
            "echo before", "lava-test-case before --result pass", wait_for_file(flag),
            numbered("after", 2000), "lava-test-case after --result pass"]))
        wait_until(lambda: "before" in lab.targets(job_id), timeout=WAIT, what="first line")
        filler = fill_filesystem(small)
        flag.touch()
        # The job ends on the worker; the master can store neither its lines nor its
        # results, holds them, keeps answering the worker and does not acknowledge END.
        wait_until(lambda: lab.rows("worker01").get(job_id, (0, None))[1] == FINISHED,
                   timeout=WAIT, what="the job's end on the worker")
        wait_until(lambda: "[job %d] END not acknowledged yet" % job_id in lab.master_logs(),
                   timeout=WAIT, what="END held")
        assert lab.master.proc.poll() is None
        assert lab.job(job_id)["state"] == "Running"
        os.unlink(filler)
        job = lab.finished(job_id)
        assert job["health"] == "Complete", job
        targets = lab.targets(job_id)
        assert [t for t in targets if t.startswith("after-")] == [
            "after-%d" % n for n in range(1, 2001)]
        assert ("0_smoke", "after", "pass") in lab.results(job_id)
        logs = lab.master_logs()
        # Each condition said once, and its end said too.
        assert logs.count("cannot write job logs") == 1, logs[-3000:]
        assert logs.count("storage unavailable") == 1, logs[-3000:]
        assert "job logs are written again" in logs and "storage available again" in logs
        assert lab.master.proc.poll() is None


@pytest.mark.timeout(120)
def test_a_second_worker_with_the_same_name_does_not_cut_off_the_first(crash_lab):
    lab = crash_lab()
    first = lab.start_worker("worker01")
    wait_until(lambda: "worker worker01: connected" in lab.master_logs(), timeout=WAIT,
               what="the first worker")
    # Started by mistake with the same hostname (another work dir): it takes the route.
    second = lab.start_worker("worker01", name="second")
    wait_until(lambda: "took this name over" in lab.master_logs(), timeout=WAIT,
               what="the warning about two workers")
    try:
        second.terminate()
        assert second.wait(30) == 0
        # The first one hears nothing on its old connection, reconnects with a fresh
        # socket, and is served again: a job runs on it.
        wait_until(lambda: "reconnecting with a fresh socket" in lab.worker_log("worker01"),
                   timeout=WAIT, what="the first worker reconnecting")
        job_id, = lab.submit(job_yaml(["lava-test-case served --result pass"]))
        job = lab.finished(job_id)
        assert job["health"] == "Complete"
        assert first.poll() is None
        assert job_id in table_rows(lab.work_dir("worker01"))
    finally:
        if second.poll() is None:
            second.kill()
        second.wait(10)


def test_unknown_workers_are_refused_without_auto_register(lab, caplog):
    lab = lab(master={"auto_register": False})
    known = lab.worker("worker1")  # from [[devices]]: registered
    stranger = lab.worker("stranger", connect=False)
    stranger.send("HELLO", "3")
    lab.wait_for(lambda: "worker stranger: refused HELLO: not a registered worker"
                 in caplog.text, timeout=WAIT, what="the refusal")
    stranger.send("PING")
    lab.wait_for(lambda: caplog.text.count("worker stranger: refused") >= 1, timeout=WAIT)
    from lavacore.storage import NotFound
    with pytest.raises(NotFound):
        lab.storage.get_worker("stranger")
    assert "stranger" not in lab.master.controller.seen
    known.send("PING")
    assert known.expect("PONG")[0] == b"PONG"
