"""The real lavacli 3.1.0 (from PyPI, unmodified) against a running master: as a LAVA user
drives LAVA. lavacli runs as a subprocess (gevent.subprocess), so the in-process master
keeps serving while it waits."""

import functools
import json
import re
import sys

import gevent
import gevent.subprocess
import pytest
import yaml

from apiutil import api_labs, lavacli_command, run_job, spawn_lavacli
from conftest import job_yaml
from lavacore.logformat import make_line, result_line
from lavacore.states import DeviceHealth, JobHealth, JobState, WorkerHealth

pytestmark = [pytest.mark.timeout(90)]


@pytest.fixture
def api(tmp_path):
    yield from api_labs(tmp_path)


@pytest.fixture(autouse=True)
def _needs_lavacli():
    lavacli_command()


def ok(result):
    assert result.returncode == 0, "lavacli failed (%d):\n%s\n%s" % (
        result.returncode, result.stdout, result.stderr)
    return result.stdout


def together(*calls):
    """Run several ``(function, args..., {keywords})`` at once; their results in order."""
    greenlets = []
    for fn, *args in calls:
        kwargs = args.pop() if args and isinstance(args[-1], dict) else {}
        greenlets.append(gevent.spawn(fn, *args, **kwargs))
    gevent.joinall(greenlets, raise_error=True)
    return [g.value for g in greenlets]


def test_system_and_lists(api):
    lab = api()
    # A token made the way an administrator makes one: lavacore tokens create USERNAME.
    made = gevent.subprocess.run([sys.executable, "-m", "lavacore.cli", "-c", lab.config_path,
                                  "tokens", "create", "carol"], capture_output=True,
                                 text=True, timeout=30)
    token = made.stdout.strip()
    assert made.returncode == 0 and re.match(r"^[A-Za-z0-9]{20,}$", token), made.stderr
    version, devices, workers, types, whoami, wrong = together(
        (lab.lavacli, "system", "version"),
        (lab.lavacli, "devices", "list", "--json"),
        (lab.lavacli, "workers", "list"),
        (lab.lavacli, "device-types", "list", "--yaml"),
        (lab.lavacli, "system", "whoami", {"user": "carol", "token": token}),
        (lab.lavacli, "system", "version", {"token": "not-the-token"}))
    assert ok(version).strip().startswith("2026.10")
    assert json.loads(ok(devices)) == [{"hostname": "qemu01", "type": "qemu", "health": "Good",
                                        "state": "Idle", "current_job": None,
                                        "pipeline": True}]
    assert "* worker1" in ok(workers)
    assert yaml.safe_load(ok(types))[0]["name"] == "qemu"
    assert ok(whoami).strip() == "carol"
    assert wrong.returncode == 1 and "Unable to connect" in wrong.stderr
    assert "401" in wrong.stderr and "Traceback" not in wrong.stderr


def test_jobs_submit_show_list_wait_logs_cancel(api, tmp_path):
    lab = api()
    worker = lab.worker()
    definition = tmp_path / "job.yaml"
    definition.write_text(job_yaml(name="from lavacli"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(job_yaml().replace("priority: medium", "priority: urgent"))
    submitted, refused, anonymous = together(
        (lab.lavacli, "jobs", "submit", str(definition)),
        (lab.lavacli, "jobs", "submit", str(bad)),
        (lab.lavacli, "jobs", "submit", str(definition), {"anonymous": True}))
    job_id = int(ok(submitted).strip())
    assert refused.returncode == 1 and "line 3: priority" in refused.stderr
    assert anonymous.returncode == 1 and "401" in anonymous.stderr
    assert lab.storage.count_jobs() == 1 and lab.job(job_id).submitter == "alice"
    # jobs wait polls until Finished while the worker runs the job.
    waiting = spawn_lavacli(lab.rpc_url("alice"), "jobs", "wait", str(job_id), "--polling", "1")
    printed = []
    reader = gevent.spawn(lambda: printed.extend(iter(lambda: waiting.stdout.read(1), "")))
    lab.wait_for(lambda: "Scheduled" in "".join(printed), timeout=20, what="jobs wait")
    run_job(lab, worker, job_id, [make_line("info", "hello from the job"),
                                  result_line("0_smoke", "echo", "pass")])
    assert waiting.wait(timeout=15) == 0, waiting.stderr.read()
    reader.join(5)
    assert "".join(printed).startswith("Scheduled")
    shown, human, listed, logs, results = together(
        (lab.lavacli, "jobs", "show", str(job_id), "--json"),
        (lab.lavacli, "jobs", "show", str(job_id)),
        (lab.lavacli, "jobs", "list", "--json"),
        (lab.lavacli, "jobs", "logs", str(job_id)),
        (lab.lavacli, "results", str(job_id), "--yaml"))
    data = json.loads(ok(shown))
    assert (data["id"], data["state"], data["health"]) == (job_id, "Finished", "Complete")
    assert data["submitter"] == "alice" and data["device"] == "qemu01"
    assert re.match(r"^\d{8}T\d\d:\d\d:\d\d$", data["submit_time"])
    assert re.match(r"^\d{8}T\d\d:\d\d:\d\d$", data["end_time"])
    assert "state       : Finished" in ok(human)
    assert [j["id"] for j in json.loads(ok(listed))] == [job_id]
    assert "hello from the job" in ok(logs)
    assert {(r["suite"], r["name"]) for r in yaml.safe_load(ok(results))} == {
        ("0_smoke", "echo"), ("lava", "job")}
    # Cancel a running job: the worker is told at once.
    other = int(ok(lab.lavacli("jobs", "submit", str(definition))).strip())
    worker.expect("START")
    worker.send("START_OK", other)
    lab.wait_for(lambda: lab.job(other).state == JobState.RUNNING)
    canceled, missing = together((lab.lavacli, "jobs", "cancel", str(other)),
                                 (lab.lavacli, "jobs", "show", "424242"))
    ok(canceled)
    assert missing.returncode == 1 and "404" in missing.stderr
    assert worker.expect("CANCEL", skip=(b"PONG", b"START"))[1] == str(other).encode()
    assert lab.job(other).state == JobState.CANCELING
    worker.end(other, description=None)
    lab.wait_for(lambda: lab.job(other).health == JobHealth.CANCELED)


def test_admin_commands_take_effect_in_the_running_master(api, tmp_path):
    lab = api()
    admin = functools.partial(lab.lavacli, user="admin")  # an administrator's commands
    dictionary = tmp_path / "qemu02.jinja2"
    dictionary.write_text("{% extends 'qemu.jinja2' %}\n{% set device_type = 'qemu' %}\n"
                          "{% set role = 'set-by-lavacli' %}\n")
    template = tmp_path / "bbb.jinja2"
    template.write_text("{% extends 'base.jinja2' %}\n")
    check = tmp_path / "bbb.yaml"
    check.write_text(job_yaml(device_type="bbb"))
    config = tmp_path / "dispatcher.yaml"
    config.write_text("dispatcher_ip: 10.0.0.2\n")
    for result in together(
            (admin, "workers", "add", "worker2", "--description", "lab rack 2"),
            (admin, "device-types", "add", "bbb", "--health-frequency", "3"),
            (admin, "device-types", "template", "set", "bbb", str(template)),
            (admin, "device-types", "health-check", "set", "bbb", str(check))):
        ok(result)
    for result in together(
            (admin, "devices", "add", "qemu02", "--type", "qemu", "--worker", "worker2",
             "--health", "GOOD"),
            (admin, "workers", "config", "set", "worker2", str(config))):
        ok(result)
    for result in together(
            (admin, "devices", "dict", "set", "qemu02", str(dictionary)),
            (admin, "devices", "tags", "add", "qemu02", "usb")):
        ok(result)
    shown, worker_json = together(
        (admin, "devices", "show", "qemu02", "--json"),
        (admin, "workers", "show", "worker2", "--json"))
    device = json.loads(ok(shown))
    assert device["worker"] == "worker2" and device["tags"] == ["usb"]
    assert device["has_device_dict"] is True and device["health"] == "Good"
    assert lab.storage.get_blob("device-type", "bbb").startswith("{% extends 'base.jinja2'")
    assert "device_type: bbb" in lab.storage.get_blob("health-check", "bbb")
    assert lab.storage.get_device_type("bbb").health_frequency == 3
    assert json.loads(ok(worker_json))["description"] == "lab rack 2"
    # The new device, its dictionary and its worker's configuration are used at once.
    worker = lab.worker("worker2")
    bad_dict = tmp_path / "bad.jinja2"
    bad_dict.write_text("{% if %}\n")
    updated, refused = together(
        (admin, "devices", "update", "qemu01", "--health", "MAINTENANCE"),
        (admin, "devices", "dict", "set", "qemu02", str(bad_dict)))
    ok(updated)
    assert refused.returncode == 1 and "line 1" in refused.stderr
    assert lab.storage.get_device("qemu01").health == DeviceHealth.MAINTENANCE
    job_id = lab.submit(extra="tags: [usb]\n")
    frames = worker.expect("START", timeout=5)
    assert frames[1] == str(job_id).encode()
    assert yaml.safe_load(frames[3])["role"] == "set-by-lavacli"
    assert yaml.safe_load(frames[4]) == {"dispatcher_ip": "10.0.0.2"}
    # A worker put in maintenance through lavacli: its devices follow, at once.
    ok(admin("workers", "update", "worker2", "--health", "MAINTENANCE"))
    assert lab.storage.get_worker("worker2").health == WorkerHealth.MAINTENANCE
    assert lab.storage.get_device("qemu02").health == DeviceHealth.MAINTENANCE
    assert [d.hostname for d in lab.storage.list_devices()] == ["qemu01", "qemu02"]


def _lines(proc, into):
    for line in proc.stdout:
        into.append(line)


def test_events_listen_and_wait_over_the_websocket(api):
    """lavacli takes events from /ws/ for any server from 2020.09; a personal job's
    events reach another user without what identifies the job."""
    lab = api()
    worker = lab.worker()
    job_id = lab.submit()
    private = lab.submit(text=job_yaml(name="secret job").replace("visibility: public",
                                                                  "visibility: personal"))
    worker.expect("START")
    listen = spawn_lavacli(lab.rpc_url("alice"), "events", "listen")
    wait = spawn_lavacli(lab.rpc_url("alice"), "events", "wait", "job", str(job_id),
                         "--state", "FINISHED")
    other = spawn_lavacli(lab.rpc_url("bob"), "events", "listen")
    heard, waited, bob = [], [], []
    readers = [gevent.spawn(_lines, listen, heard), gevent.spawn(_lines, wait, waited),
               gevent.spawn(_lines, other, bob)]
    try:
        # Connected once the master counts three subscribers: no event is sent before.
        lab.wait_for(lambda: len(lab.master.events.subscribers) == 3, timeout=30,
                     what="three websocket subscribers")
        assert "Connecting to http://<USERNAME>:<TOKEN>@" in heard[0]
        worker.send("START_OK", job_id)
        lab.wait_for(lambda: lab.job(job_id).state == JobState.RUNNING)
        worker.log(job_id, result_line("lava", "job", "pass"))
        worker.end(job_id)
        lab.wait_for(lambda: lab.job(job_id).state == JobState.FINISHED)
        assert wait.wait(timeout=20) == 0
        lab.wait_for(lambda: any("state=Finished health=Complete" in l for l in heard),
                     timeout=10, what="the Finished event")
        text = "".join(heard)
        assert ".testjob alice - [%d] <qemu01> state=Running health=Unknown (test job)" \
            % job_id in text
        assert "[qemu01] <qemu> state=Running health=Good for %d" % job_id in text
        # The private job, canceled (it was started on qemu01): alice sees it whole, bob
        # only that some job moved.
        lab.rpc("alice").scheduler.jobs.cancel(private)
        canceled = "[%d] <" % private

        def found(lines):
            return [l for l in lines if canceled in l and "state=Canceling" in l]

        lab.wait_for(lambda: found(bob) and found(heard), timeout=10,
                     what="the private job's event")
        mine, theirs = found(heard)[0], found(bob)[0]
        assert "alice" in mine and "(secret job)" in mine
        assert "alice" not in theirs and "secret" not in theirs
        assert "(private) - [%d] <??> state=Canceling health=Unknown ()" % private in theirs
    finally:
        for proc in (listen, wait, other):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)
        gevent.killall(readers)
