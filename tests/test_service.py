"""Running as a service and the rough edges of first use: the systemd units, sd_notify
(READY, WATCHDOG, RELOADING, STOPPING) to a NOTIFY_SOCKET bound here, workers shown
Online while no master runs, the worker command in --help, an empty $USER, a queued
job's log, and a device type without a health check."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import pgutil
from conftest import ROOT, job_yaml, run_cli, write_config
from lavacore.models import Worker
from lavacore.states import DeviceHealth, WorkerState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workerutil import wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(120)

UNITS = ("lavacore.service", "lavacore-worker@.service")


# -- systemd ----------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", UNITS)
def test_systemd_units_verify_cleanly(tmp_path, unit):
    """systemd-analyze verify knows every key (it only warns of an unknown one, so its
    output must be empty) and finds the command; ours, in place of /usr/local/bin."""
    text = open(os.path.join(ROOT, "etc", "systemd", unit)).read()
    assert "ExecStart=/usr/local/bin/lavacore " in text
    lavacore = shutil.which("lavacore") or pytest.fail("lavacore is not on PATH")
    (tmp_path / unit).write_text(text.replace("/usr/local/bin/lavacore", lavacore))
    name = unit.replace("@.", "@worker01.")
    done = subprocess.run(["systemd-analyze", "verify", name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == "", done.stdout + done.stderr


def test_worker_unit_runs_what_its_environment_file_says(tmp_path):
    """The ExecStart of lavacore-worker@ with the example environment file, expanded as
    systemd does, is a worker command line lavacore takes."""
    import shlex

    from lavacore.worker.cli import build_parser

    unit = open(os.path.join(ROOT, "etc", "systemd", "lavacore-worker@.service")).read()
    command = unit.split("\nExecStart=", 1)[1].split("\nRestart", 1)[0].replace("\\\n", " ")
    env = dict(line.split("=", 1) for line in open(os.path.join(
        ROOT, "etc", "systemd", "worker.conf")).read().splitlines()
        if line and not line.startswith("#"))
    for name, value in env.items():
        command = command.replace("${%s}" % name, value).replace("$%s" % name, value)
    argv = shlex.split(command.replace("%i", "worker01"))
    assert argv[:2] == ["/usr/local/bin/lavacore", "worker"]
    args = build_parser().parse_args(argv[2:])
    assert (args.hostname, args.master, args.work_dir) == (
        "worker01", "tcp://lavacore.example.org:5556", "/var/lib/lavacore/worker-worker01")


def test_the_service_config_takes_the_files_the_install_steps_copy(tmp_path):
    """README, "Running as a service": dispatcher-config, env.yaml and dispatcher.d go
    next to etc/systemd/config.toml in /etc/lavacore (here a directory of tmp_path)."""
    etc = tmp_path / "etc" / "lavacore"
    etc.mkdir(parents=True)
    for name in ("dispatcher-config", "dispatcher.d"):
        shutil.copytree(os.path.join(ROOT, "etc", name), etc / name)
    shutil.copy(os.path.join(ROOT, "etc", "env.yaml"), etc / "env.yaml")
    shutil.copy(os.path.join(ROOT, "etc", "systemd", "config.toml"), etc / "config.toml")
    done = run_cli(str(etc / "config.toml"), "config", "--json")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    data = json.loads(done.stdout)
    assert data["storage"]["url"] == "/var/lib/lavacore/lavacore.db"
    assert data["master"]["dispatcher_config"] == str(etc / "dispatcher-config")


class NotifySocket:
    """The systemd end of sd_notify: a datagram socket in tmp_path."""

    def __init__(self, tmp_path):
        self.path = str(tmp_path / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(20)
        self.messages = []

    def expect(self, field):
        """Messages until one holding ``field`` (a line such as READY=1); returns it."""
        while True:
            message = self.sock.recv(4096).decode()
            self.messages.append(message)
            if field in message.split("\n"):
                return message

    def close(self):
        self.sock.close()


def test_master_tells_systemd_ready_watchdog_reloading_and_stopping(tmp_path,
                                                                    master_process):
    notify = NotifySocket(tmp_path)
    try:
        master = master_process(write_config(tmp_path), env={
            "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"})
        ready = notify.expect("READY=1")
        assert "STATUS=serving workers on tcp://127.0.0.1:" in ready
        assert "master started" in master.log_text()  # READY comes once it serves
        notify.expect("WATCHDOG=1")
        notify.expect("WATCHDOG=1")
        master.proc.send_signal(signal.SIGHUP)
        reloading = notify.expect("RELOADING=1")
        assert "MONOTONIC_USEC=" in reloading
        notify.expect("READY=1")
        master.proc.send_signal(signal.SIGTERM)
        notify.expect("STOPPING=1")
        assert master.proc.wait(30) == 0
    finally:
        notify.close()


def test_worker_tells_systemd_ready_without_waiting_for_its_master(tmp_path):
    notify = NotifySocket(tmp_path)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))  # a port where no master answers
    port = busy.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lavacore.cli", "worker", "--master",
         "tcp://127.0.0.1:%d" % port, "--logs", "tcp://127.0.0.1:%d" % port,
         "--hostname", "worker01", "--work-dir", str(tmp_path / "work")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, NOTIFY_SOCKET=notify.path))
    try:
        assert "STATUS=worker worker01" in notify.expect("READY=1")
        proc.send_signal(signal.SIGTERM)
        notify.expect("STOPPING=1")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        busy.close()
        notify.close()


def test_a_standby_master_is_ready_as_a_standby_then_as_the_active_one(
        tmp_path, master_process, pg_schema):
    config_path = write_config(tmp_path, storage=pgutil.storage_lines(pg_schema),
                               extra=pgutil.plugin_extra())
    active = master_process(config_path)
    notify = NotifySocket(tmp_path)
    standby = subprocess.Popen([sys.executable, "-m", "lavacore.cli", "-c", config_path],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, NOTIFY_SOCKET=notify.path,
                                        WATCHDOG_USEC="400000"))
    try:
        ready = notify.expect("READY=1")
        assert "STATUS=standby: waiting for the active master" in ready
        notify.expect("WATCHDOG=1")  # alive while it waits
        assert active.stop() == 0
        assert "STATUS=serving workers on tcp://127.0.0.1:" in notify.expect("READY=1")
        standby.send_signal(signal.SIGTERM)
        assert standby.wait(30) == 0
    finally:
        if standby.poll() is None:
            standby.kill()
            standby.wait()
        notify.close()


# -- workers while no master runs -------------------------------------------------------

def _workers(config_path, *options):
    done = run_cli(config_path, "workers", "list", *options)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_workers_are_not_shown_online_when_no_master_runs(tmp_path, master_process):
    from scripted import ScriptedWorker
    import zmq.green as zmq

    config_path = write_config(tmp_path)
    context = zmq.Context()
    try:
        for stop in ("SIGTERM", "SIGKILL"):
            master = master_process(config_path)
            worker = ScriptedWorker(context, master.controller, "worker1", master.logs)
            worker.connect()
            try:
                wait_until(lambda: " Online " in _workers(config_path), what="Online")
                assert "master not running" not in _workers(config_path)
                if stop == "SIGTERM":
                    # A clean stop: the master marks its workers Offline.
                    assert master.stop() == 0
                    assert "1 worker(s) marked Offline: the master stops (worker1)" in \
                        master.log_text()
                    assert " Offline " in _workers(config_path)
                else:
                    master.kill()
                    assert "Online (master not running)" in _workers(config_path)
                    rows = json.loads(_workers(config_path, "--json"))
                    assert (rows[0]["state"], rows[0]["stale"]) == ("Online", True)
            finally:
                worker.close()
    finally:
        context.term()


@pytest.fixture
def pg_schema():
    yield from pgutil.schema_for_test()


def test_a_worker_no_master_pinged_for_long_is_stale_on_postgresql(tmp_path, pg_schema):
    """PostgreSQL cannot say whether a master listens: a worker Online whose last ping is
    older than a running master would let it be is shown stale."""
    config_path = write_config(tmp_path, storage=pgutil.storage_lines(pg_schema),
                               extra=pgutil.plugin_extra())
    storage = pgutil.storage(pg_schema)
    try:
        now = time.time()
        for name, ping in (("fresh", now - 5), ("old", now - 3600)):
            storage.add_worker(Worker(name))
            storage.update_worker(name, state=WorkerState.ONLINE, last_ping=ping)
    finally:
        storage.close()
    text = _workers(config_path)
    lines = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert "Online  " in lines["fresh"] and "stale" not in lines["fresh"]
    assert "Online (no ping recorded for 36" in lines["old"]
    assert "is the master running?)" in lines["old"]


# -- rough edges ------------------------------------------------------------------------

def test_help_lists_every_command_including_worker(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lavacore.cli", "--help"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    for command in ("master", "worker", "config", "submit", "jobs", "devices", "workers"):
        assert "\n    %s " % command in done.stdout, command
    # "worker" after the global options, as the other commands take them.
    done = run_cli(str(tmp_path / "none.toml"), "worker", "--help")
    assert done.returncode == 0 and "--master URL" in done.stdout


def test_an_empty_user_submits_as_the_login_name(tmp_path, master_process):
    import pwd

    config_path = write_config(tmp_path)
    master_process(config_path)  # it creates the devices of config.toml
    definition = tmp_path / "job.yaml"
    definition.write_text(job_yaml())
    env = dict(os.environ, USER="")
    done = subprocess.run([sys.executable, "-m", "lavacore.cli", "-c", config_path,
                           "submit", str(definition)], capture_output=True, text=True,
                          env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    job = json.loads(run_cli(config_path, "jobs", "show", done.stdout.strip(),
                             "--json").stdout)
    assert job["submitter"] == pwd.getpwuid(os.getuid()).pw_name
    done = run_cli(config_path, "submit", str(definition), "--user", " ")
    assert (done.returncode, done.stderr) == (1, "lavacore: --user: must not be empty\n")


def test_following_the_log_of_a_queued_job_says_why_it_waits(tmp_path, master_process):
    config_path = write_config(tmp_path, devices=(("qemu01", "qemu", "worker1", ("usb",)),))
    master_process(config_path)  # and no worker
    definition = tmp_path / "job.yaml"
    definition.write_text(job_yaml())
    job_id = run_cli(config_path, "submit", str(definition)).stdout.strip()
    follow = subprocess.Popen([sys.executable, "-m", "lavacore.cli", "-c", config_path,
                               "jobs", "logs", job_id, "--follow"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        first = follow.stderr.readline()
        assert first == ("job %s: Submitted, no log yet: waiting for a device of type qemu:"
                         " none of the 1 is Good or Unknown on an Online worker\n" % job_id)
        assert run_cli(config_path, "jobs", "cancel", job_id).returncode == 0
        out, err = follow.communicate(timeout=30)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert follow.returncode == 0 and out == ""
    assert err == ("job %s: Finished, Canceled (canceled before it was scheduled); it has"
                   " no log\n" % job_id)
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text(job_yaml(extra="tags: [usb]\n"))
    job_id = run_cli(config_path, "submit", str(tagged)).stdout.strip()
    done = run_cli(config_path, "jobs", "logs", job_id)
    assert done.returncode == 0 and done.stdout == ""
    assert done.stderr == ("job %s: Submitted, no log yet: waiting for a device of type"
                           " qemu with tags usb: none of the 1 is Good or Unknown on an"
                           " Online worker\n" % job_id)


def test_a_device_type_without_health_check_makes_its_unknown_devices_good(lab):
    lab = lab()
    lab.storage.update_device("qemu01", health=DeviceHealth.UNKNOWN)
    lab.worker()
    lab.master.scheduler.wake()
    lab.wait_for(lambda: lab.storage.get_device("qemu01").health == DeviceHealth.GOOD,
                 what="Good")
    entry = lab.storage.list_history("device", "qemu01")[0]
    assert (entry["old"], entry["new"], entry["user"]) == ("Unknown", "Good", "lava-health")
    assert entry["reason"].startswith("device type qemu has no health check (%s" % (
        lab.tmp_path / "etc" / "dispatcher-config" / "health-checks" / "qemu.yaml"))
    # Checks disabled for the type say so too.
    from lavacore.models import DeviceType

    lab.storage.update_device_type("qemu", health_disabled=True)
    lab.storage.update_device("qemu01", health=DeviceHealth.UNKNOWN)
    lab.master.scheduler.wake()
    lab.wait_for(lambda: lab.storage.get_device("qemu01").health == DeviceHealth.GOOD,
                 what="Good")
    assert lab.storage.list_history("device", "qemu01")[0]["reason"] == \
        "health checks are disabled for device type qemu"
    assert DeviceType  # (the record the flag belongs to)
