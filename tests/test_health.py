"""Health checks, maintenance and retirement, with a fake clock."""

import json
import textwrap

import pytest

from conftest import job_yaml, run_cli
from lavacore import health
from lavacore.logformat import result_line
from lavacore.states import DeviceHealth, JobHealth, JobState, WorkerHealth

pytestmark = pytest.mark.timeout(60)


def _with_check(lab, device_type="qemu", text=None, **kwargs):
    instance = lab(**kwargs)
    path = instance.tmp_path / "etc/dispatcher-config/health-checks"
    path.mkdir(parents=True, exist_ok=True)
    (path / ("%s.yaml" % device_type)).write_text(text or job_yaml(device_type, "health"))
    return instance


def _run(lab, worker, result="pass", error_type=None):
    """Answer the next START as a worker would and finish the job; returns the job."""
    frames = worker.expect("START", skip=(b"PONG", b"HELLO_OK", b"START_OK"))
    job_id = int(frames[1])
    worker.send("START_OK", job_id)
    extra = {"error_type": error_type, "error_msg": "boom"} if error_type else {}
    worker.log(job_id, result_line("lava", "job", result, **extra))
    worker.end(job_id)
    # END_OK follows description.yaml on disk: the next job's START may come first.
    worker.expect("END_OK", skip=(b"PONG", b"HELLO_OK", b"START"),
                  hold=lambda frames: frames[0] == b"START" and int(frames[1]) != job_id)
    lab.wait_for(lambda: lab.job(job_id).state == JobState.FINISHED)
    return lab.job(job_id)


def test_unknown_device_is_checked_before_normal_jobs(lab):
    lab = _with_check(lab)
    lab.storage.update_device("qemu01", health=DeviceHealth.UNKNOWN)
    normal = lab.submit()
    worker = lab.worker()
    check = _run(lab, worker)
    assert check.health_check and check.submitter == health.HEALTH_USER
    assert check.id != normal and check.health == JobHealth.COMPLETE
    device = lab.storage.get_device("qemu01")
    assert device.health == DeviceHealth.GOOD
    assert device.last_health_report_job == check.id
    assert _run(lab, worker).id == normal


def test_failed_check_makes_device_bad_and_keeps_jobs_away(lab):
    lab = _with_check(lab)
    normal = lab.submit()
    worker = lab.worker()  # never checked: a check is due
    check = _run(lab, worker, result="fail", error_type="Infrastructure")
    assert check.health == JobHealth.INCOMPLETE
    assert lab.storage.get_device("qemu01").health == DeviceHealth.BAD
    lab.settled(worker)
    assert lab.job(normal).state == JobState.SUBMITTED
    history = lab.storage.list_history("device", "qemu01")
    assert history[0]["new"] == "Bad" and "health check" in history[0]["reason"]


def test_every_n_jobs_rule(lab):
    lab = _with_check(lab)
    lab.storage.update_device_type("qemu", health_denominator="jobs", health_frequency=2)
    worker = lab.worker()
    assert _run(lab, worker).health_check  # first: never checked
    lab.submit()
    lab.submit()
    lab.submit()
    assert not _run(lab, worker).health_check
    assert not _run(lab, worker).health_check
    assert _run(lab, worker).health_check  # two jobs since the last check
    assert not _run(lab, worker).health_check


def test_every_n_hours_rule_with_fake_clock(lab):
    clock = lab.clock()
    lab = _with_check(lab, clock=clock)
    worker = lab.worker()
    assert _run(lab, worker).health_check
    lab.submit()
    assert not _run(lab, worker).health_check
    clock.advance(25 * 3600)
    worker.send("PING")  # keep the worker Online across the jump
    lab.submit()
    assert _run(lab, worker).health_check
    assert not _run(lab, worker).health_check


def test_looping_device_runs_only_checks_and_stays_looping(lab):
    lab = _with_check(lab)
    lab.storage.update_device("qemu01", health=DeviceHealth.LOOPING)
    normal = lab.submit()
    worker = lab.worker()
    check = _run(lab, worker, result="fail")
    assert check.health_check
    assert lab.storage.get_device("qemu01").health == DeviceHealth.LOOPING
    check = _run(lab, worker, result="pass")
    assert check.health_check
    assert lab.job(normal).state == JobState.SUBMITTED


def test_infrastructure_error_sends_device_back_to_check(lab):
    lab = _with_check(lab)
    worker = lab.worker()
    assert _run(lab, worker).health_check
    lab.submit()
    job = _run(lab, worker, result="fail", error_type="Infrastructure")
    assert job.infrastructure_error and not job.health_check
    assert lab.storage.get_device("qemu01").health == DeviceHealth.UNKNOWN
    assert _run(lab, worker).health_check


def test_back_from_maintenance_is_checked_first(lab):
    lab = _with_check(lab)
    worker = lab.worker()
    assert _run(lab, worker).health_check
    health.set_device_health(lab.master, "qemu01", DeviceHealth.MAINTENANCE, "admin", "repair")
    normal = lab.submit()
    lab.settled(worker)
    device = health.set_device_health(lab.master, "qemu01", DeviceHealth.GOOD, "admin",
                                      "fixed")
    assert device.health == DeviceHealth.UNKNOWN
    assert _run(lab, worker).health_check
    assert _run(lab, worker).id == normal
    history = lab.storage.list_history("device", "qemu01")
    assert [(h["new"], h["user"]) for h in history[:3]] == [
        ("Good", "lava-health"), ("Unknown", "admin"), ("Maintenance", "admin")]


def test_maintenance_while_running_finishes_the_job_first(lab):
    lab = lab()
    worker = lab.worker()
    job_id = lab.submit()
    worker.expect("START")
    worker.send("START_OK", job_id)
    lab.wait_for(lambda: lab.job(job_id).state == JobState.RUNNING)
    health.set_device_health(lab.master, "qemu01", DeviceHealth.MAINTENANCE, "admin", "")
    assert lab.job(job_id).state == JobState.RUNNING
    worker.log(job_id, result_line("lava", "job", "pass"))
    worker.end(job_id)
    worker.expect("END_OK")
    lab.wait_for(lambda: lab.job(job_id).state == JobState.FINISHED)
    assert lab.job(job_id).health == JobHealth.COMPLETE
    assert lab.storage.get_device("qemu01").health == DeviceHealth.MAINTENANCE
    lab.submit()
    lab.settled(worker)


def test_worker_maintenance_cascades_and_comes_back(lab):
    lab = _with_check(lab, devices=(("qemu01", "qemu", "worker1", ()),
                                    ("qemu02", "qemu", "worker1", ())))
    lab.storage.update_device("qemu02", health=DeviceHealth.BAD)
    lab.master.flow.set_worker_health("worker1", WorkerHealth.MAINTENANCE, "admin", "move")
    assert lab.storage.get_device("qemu01").health == DeviceHealth.MAINTENANCE
    assert lab.storage.get_device("qemu02").health == DeviceHealth.BAD  # left alone
    normal = lab.submit()
    worker = lab.worker()
    lab.settled(worker)
    lab.master.flow.set_worker_health("worker1", WorkerHealth.ACTIVE, "admin", "back")
    assert lab.storage.get_device("qemu01").health == DeviceHealth.UNKNOWN
    assert _run(lab, worker).health_check
    assert _run(lab, worker).id == normal


def test_retired_devices_refuse_submissions(lab):
    from lavacore.jobs import JobError

    lab = lab()
    health.set_device_health(lab.master, "qemu01", DeviceHealth.RETIRED, "admin", "dead")
    with pytest.raises(JobError, match="retired"):
        lab.submit()


def test_invalid_health_check_definition_makes_device_bad(lab):
    lab = _with_check(lab, text="job_name: [broken\n")
    normal = lab.submit()
    lab.worker()
    lab.wait_for(lambda: lab.storage.get_device("qemu01").health == DeviceHealth.BAD)
    assert "invalid health-check definition" in \
        lab.storage.list_history("device", "qemu01")[0]["reason"]
    assert lab.job(normal).state == JobState.SUBMITTED


def test_plugin_decides_when_checks_run(lab, tmp_path, monkeypatch):
    module = tmp_path / "night_checks.py"
    module.write_text(textwrap.dedent("""
        from lavacore.hookspecs import hookimpl

        @hookimpl
        def health_check_due(master, device, device_type, last_check, jobs_since, now):
            return False  # this site never checks during the test
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    lab = _with_check(lab, extra='[plugins]\nmodules = ["night_checks"]\n')
    normal = lab.submit()
    worker = lab.worker()
    assert _run(lab, worker).id == normal


def test_health_cli_history_and_events(lab):
    import gevent
    import zmq.green as zmq

    lab = lab()
    sub = lab.context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(lab.master.events.endpoint)
    gevent.sleep(0.2)  # let the subscription reach the PUB socket (slow joiner)
    done = gevent.get_hub().threadpool.spawn(
        run_cli, lab.config_path, "devices", "set-health", "qemu01", "Maintenance",
        "--reason", "new cable", "--user", "bob").get()
    assert done.returncode == 0, done.stderr
    with gevent.Timeout(5):
        while True:
            topic, _, _, user, data = sub.recv_multipart()
            if topic.endswith(b".device"):
                break
    event = json.loads(data)
    assert (event["device"], event["health"], user) == ("qemu01", "Maintenance", b"bob")
    shown = json.loads(run_cli(lab.config_path, "devices", "show", "qemu01", "--json").stdout)
    assert shown["health"] == "Maintenance"
    assert shown["history"][0]["reason"] == "new cable"
    assert shown["history"][0]["user"] == "bob"
    done = run_cli(lab.config_path, "devices", "set-health", "qemu01", "Sleepy")
    assert done.returncode == 1 and "Sleepy" in done.stderr
    done = run_cli(lab.config_path, "workers", "set-health", "worker1", "Retired")
    assert done.returncode == 0
    assert lab.storage.get_device("qemu01").health == DeviceHealth.RETIRED
    sub.close()


def test_a_device_whose_configuration_cannot_be_made_is_bad_not_a_job_sink(lab):
    """Without its dictionary a device could take and fail every job (no health check
    would stop it): the first job fails with the reason and the device goes Bad. A job
    whose own context breaks the rendering fails alone; the device stays Good."""
    lab = lab()
    worker = lab.worker()
    dictionary = lab.tmp_path / "etc" / "dispatcher-config" / "devices" / "qemu01.jinja2"
    text = dictionary.read_text()
    # The job's context makes the template fail (a type template refusing a value).
    (lab.tmp_path / "etc" / "dispatcher-config" / "device-types" / "strict.jinja2"
     ).write_text("{% if memory is defined and memory > 4096 %}{{ 1 / 0 }}{% endif %}\n"
                  "device_type: qemu\n")
    dictionary.write_text("{% extends 'strict.jinja2' %}\n")
    lab.master.templates.reload()
    job = lab.submit(job_yaml("qemu", extra="context:\n  memory: 8192\n"))
    lab.wait_for(lambda: lab.job(job).state == JobState.FINISHED, what="job failed")
    assert lab.job(job).health == JobHealth.INCOMPLETE
    assert lab.storage.get_device("qemu01").health != DeviceHealth.BAD
    # The dictionary gone: Bad, with why.
    dictionary.unlink()
    lab.master.templates.reload()
    job = lab.submit()
    lab.wait_for(lambda: lab.job(job).state == JobState.FINISHED, what="job failed")
    assert "qemu01.jinja2: not found" in lab.job(job).failure_comment
    lab.wait_for(lambda: lab.storage.get_device("qemu01").health == DeviceHealth.BAD,
                 what="device Bad")
    entry = lab.storage.list_history("device", "qemu01")[0]
    assert entry["user"] == "lava-health"
    assert entry["reason"].startswith("its configuration cannot be made: device dictionary")
    waiting = lab.submit()
    dictionary.write_text(text)
    lab.master.templates.reload()
    run_cli(lab.config_path, "devices", "set-health", "qemu01", "Good")
    assert int(worker.expect("START")[1]) == waiting
