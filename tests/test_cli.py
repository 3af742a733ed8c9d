"""The command line (README, "Command line") against real SQLite files and a real master process."""

import json
import os
import signal

import pytest
import zmq.green as zmq

from conftest import ScriptedWorker, job_yaml, run_cli, write_config
from lavacore.logformat import result_line

pytestmark = pytest.mark.timeout(90)

JOB_FIELDS = {"id", "state", "health", "device_type", "device", "worker", "priority",
              "submit_time", "start_time", "end_time", "failure_comment"}


@pytest.fixture
def config_path(tmp_path):
    return write_config(tmp_path)


def _submit(config_path, tmp_path, text, name="job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return run_cli(config_path, "submit", str(path))


def test_submit_show_list_cancel(config_path, tmp_path):
    # devices come from config.toml; the master creates them at start, so run a CLI
    # command that syncs them first: submitting needs the device type to exist.
    from lavacore import config as config_mod
    from lavacore.master import Master

    master = Master(config_mod.load(config_path))
    master.start()
    master.stop()
    done = _submit(config_path, tmp_path, job_yaml())
    assert done.returncode == 0, done.stderr
    job_id = int(done.stdout.strip())
    shown = run_cli(config_path, "jobs", "show", str(job_id), "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert JOB_FIELDS <= set(data)
    assert data["state"] == "Submitted" and data["health"] == "Unknown"
    assert data["priority"] == 50 and data["device_type"] == "qemu"
    listed = json.loads(run_cli(config_path, "jobs", "list", "--json").stdout)
    assert [j["id"] for j in listed] == [job_id]
    listed = json.loads(run_cli(config_path, "jobs", "list", "--state", "Running",
                                "--json").stdout)
    assert listed == []
    canceled = run_cli(config_path, "jobs", "cancel", str(job_id))
    assert canceled.returncode == 0, canceled.stderr
    data = json.loads(run_cli(config_path, "jobs", "show", str(job_id), "--json").stdout)
    assert (data["state"], data["health"]) == ("Finished", "Canceled")
    devices = json.loads(run_cli(config_path, "devices", "list", "--json").stdout)
    assert devices[0]["hostname"] == "qemu01"
    assert {"hostname", "device_type", "worker", "state", "health", "tags"} <= set(devices[0])
    workers = json.loads(run_cli(config_path, "workers", "list", "--json").stdout)
    assert workers[0]["hostname"] == "worker1" and "last_ping" in workers[0]


@pytest.mark.parametrize("text,expected", [
    ("job_name: x\n  bad: [indent\n", "line 2"),
    ("- just\n- a list\n", "must be a YAML mapping"),
    (job_yaml().replace("priority: medium", "priority: urgent"), "line 3: priority"),
    (job_yaml().replace("device_type: qemu", "device_type: nosuch"),
     "line 1: device_type: unknown device type 'nosuch'"),
    (job_yaml().replace("visibility: public\n", ""), "visibility: missing"),
    (job_yaml(extra="tags: [nosuchtag]\n"), "no qemu device carries all of nosuchtag"),
])
def test_invalid_job_is_refused_with_line_and_nothing_queued(config_path, tmp_path, text,
                                                             expected):
    from lavacore import config as config_mod
    from lavacore.master import Master

    Master(config_mod.load(config_path)).start().stop()
    done = _submit(config_path, tmp_path, text)
    assert done.returncode == 1
    assert expected in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, "one line, no traceback"
    assert json.loads(run_cli(config_path, "jobs", "list", "--json").stdout) == []


def test_user_errors_are_one_line(config_path, tmp_path):
    for args, expected in [(("jobs", "show", "999"), "job 999: no such job"),
                           (("jobs", "show", "abc"), "not a number"),
                           (("jobs", "list", "--state", "Dancing"), "--state"),
                           (("submit", str(tmp_path / "missing.yaml")), "cannot read")]:
        done = run_cli(config_path, *args)
        assert done.returncode == 1, args
        assert expected in done.stderr and "Traceback" not in done.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[master]\nping_interval = 'often'\n")
    done = run_cli(str(bad), "jobs", "list")
    assert done.returncode == 1
    assert "[master] ping_interval: expected a number" in done.stderr


def test_tokens_create_prints_url_safe_token(config_path):
    done = run_cli(config_path, "tokens", "create", "alice")
    assert done.returncode == 0
    token = done.stdout.strip()
    assert len(token) >= 32 and token.isalnum()


def test_cli_submission_wakes_running_master_at_once(tmp_path, master_process):
    """A job submitted by another process starts on an idle device right away, not at
    the next schedule pass (schedule_interval is an hour here)."""
    config_path = write_config(tmp_path, master={"schedule_interval": 3600})
    master = master_process(config_path)
    context = zmq.Context()
    worker = ScriptedWorker(context, master.controller, "worker1", master.logs)
    try:
        worker.connect()
        done = _submit(config_path, tmp_path, job_yaml())
        assert done.returncode == 0, done.stderr
        job_id = int(done.stdout)
        frames = worker.expect("START", timeout=5)
        assert int(frames[1]) == job_id
        worker.send("START_OK", job_id)
        worker.log(job_id, result_line("smoke", "a", "pass"))
        worker.log(job_id, result_line("smoke", "b", "fail"))
        worker.log(job_id, result_line("lava", "job", "pass"))
        worker.end(job_id)
        worker.expect("END_OK")
        follow = run_cli(config_path, "jobs", "logs", str(job_id), "--follow")
        assert follow.returncode == 0
        assert "Complete" in follow.stderr
        data = json.loads(run_cli(config_path, "jobs", "show", str(job_id), "--json").stdout)
        assert data["health"] == "Complete"
        assert data["results"]["pass"] == 2 and data["results"]["fail"] == 1
        results = json.loads(run_cli(config_path, "jobs", "results", str(job_id),
                                     "--json").stdout)
        names = {(s["name"], t["name"]) for s in results["suites"] for t in s["tests"]}
        assert {("smoke", "a"), ("smoke", "b"), ("lava", "job")} <= names
        # CLI cancel of a queued job on a running master: published as an event.
        assert master.stop() == 0
    finally:
        worker.close()
        context.term()


def test_master_killed_and_restarted_while_job_runs(tmp_path, master_process):
    config_path = write_config(tmp_path, master={"schedule_interval": 3600})
    master = master_process(config_path)
    context = zmq.Context()
    worker = ScriptedWorker(context, master.controller, "worker1", master.logs)
    try:
        worker.connect()
        job_id = int(_submit(config_path, tmp_path, job_yaml()).stdout)
        worker.expect("START")
        worker.send("START_OK", job_id)
        for _ in range(50):
            data = json.loads(run_cli(config_path, "jobs", "show", str(job_id),
                                      "--json").stdout)
            if data["state"] == "Running":
                break
        assert data["state"] == "Running"
        master.kill()  # SIGKILL: no clean-up at all
        worker.close()
        second = master_process(config_path)
        worker = ScriptedWorker(context, second.controller, "worker1", second.logs)
        worker.send("PING")  # lava-slave does not say HELLO again after a master restart
        worker.expect("PONG", skip=())
        assert worker.expect("STATUS") == [b"STATUS", str(job_id).encode()]
        worker.send("START_OK", job_id)
        worker.log(job_id, result_line("lava", "job", "pass"))
        worker.end(job_id)
        worker.expect("END_OK")
        for _ in range(100):
            data = json.loads(run_cli(config_path, "jobs", "show", str(job_id),
                                      "--json").stdout)
            if data["state"] == "Finished":
                break
        assert (data["state"], data["health"]) == ("Finished", "Complete")
        assert second.stop(signal.SIGINT) == 0
    finally:
        worker.close()
        context.term()


def test_sigterm_exits_zero_and_closes_sockets(tmp_path, master_process):
    config_path = write_config(tmp_path)
    master = master_process(config_path)
    assert master.stop(signal.SIGTERM) == 0
    assert "master stopped" in master.log_text()
    # The database is consistent and usable after the stop.
    assert run_cli(config_path, "workers", "list", "--json").returncode == 0


def test_second_master_on_same_sqlite_file_is_refused(tmp_path, master_process):
    config_path = write_config(tmp_path)
    master_process(config_path)
    second = run_cli(config_path, "master", timeout=30)
    assert second.returncode == 1
    assert "another master already runs" in second.stderr
    assert os.path.exists(tmp_path / "var" / "lavacore.db")


def test_sighup_reloads_device_dictionaries_without_restart(tmp_path, master_process):
    config_path = write_config(tmp_path, master={"schedule_interval": 3600})
    master = master_process(config_path)
    context = zmq.Context()
    worker = ScriptedWorker(context, master.controller, "worker1", master.logs)
    try:
        worker.connect()
        dictionary = tmp_path / "etc/dispatcher-config/devices/qemu01.jinja2"
        dictionary.write_text("{% extends 'qemu.jinja2' %}\n{% set device_type = 'qemu' %}\n"
                              "{% set role = 'reloaded' %}\n")
        master.proc.send_signal(signal.SIGHUP)
        job_id = int(_submit(config_path, tmp_path, job_yaml()).stdout)
        frames = worker.expect("START")
        assert int(frames[1]) == job_id
        assert b"role: reloaded" in frames[3]
        assert master.proc.poll() is None
        assert master.stop() == 0
        assert "reloading device dictionaries" in master.log_text()
    finally:
        worker.close()
        context.term()


def test_port_in_use_is_a_one_line_error(tmp_path):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        config_path = write_config(tmp_path, master={"listen": "tcp://127.0.0.1:%d" % port})
        done = run_cli(config_path, "master")
        assert done.returncode == 1
        assert "[master] listen: cannot bind tcp://127.0.0.1:%d" % port in done.stderr
        assert "Traceback" not in done.stderr
    finally:
        busy.close()
