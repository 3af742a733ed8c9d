"""Fixtures: a real master (in-process on the gevent loop, or as a subprocess) on
OS-chosen ports of 127.0.0.1, with its SQLite file and dispatcher config in tmp_path."""

import os
import shutil
import subprocess
import sys
import textwrap

import gevent
import pytest
import zmq.green as zmq

from lavacore import config as config_mod
from lavacore.clock import FakeClock
from lavacore.master import Master

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scripted import ScriptedWorker  # noqa: E402

HELLO_JOB = textwrap.dedent("""\
    device_type: {device_type}
    job_name: {name}
    priority: {priority}
    visibility: public
    timeouts:
      job:
        minutes: 5
    actions:
    - test:
        timeout:
          minutes: 1
        definitions:
        - from: inline
          name: smoke
          path: inline/smoke.yaml
          repository:
            metadata:
              format: Lava-Test Test Definition 1.0
              name: smoke
            run:
              steps:
              - lava-test-case echo --shell echo hello
    """)


def job_yaml(device_type="qemu", name="test job", priority="medium", extra=""):
    return HELLO_JOB.format(device_type=device_type, name=name, priority=priority) + extra


DEVICE_TYPE = "{% extends 'base.jinja2' %}\n{% block body %}\nrole: {{ role | default('dut') }}\n{% endblock %}\n"


def write_config(tmp_path, devices=(("qemu01", "qemu", "worker1", ()),), master=None,
                 extra="", storage=None, real_types=("host",)):
    """A config.toml in tmp_path with its dispatcher config; returns its path. The device
    types of ``devices`` get a small test template, except ``real_types`` (the shipped
    templates, as under etc/)."""
    etc = tmp_path / "etc"
    if not etc.exists():
        shutil.copytree(os.path.join(ROOT, "etc"), etc)
    types = {d[1] for d in devices}
    for device_type in types - set(real_types):
        path = etc / "dispatcher-config" / "device-types" / ("%s.jinja2" % device_type)
        path.write_text(DEVICE_TYPE)
    for hostname, device_type, _worker, _tags in devices:
        (etc / "dispatcher-config" / "devices" / ("%s.jinja2" % hostname)).write_text(
            "{%% extends '%s.jinja2' %%}\n{%% set device_type = '%s' %%}\n"
            % (device_type, device_type))
    settings = {"listen": "tcp://127.0.0.1:*", "logs": "tcp://127.0.0.1:*",
                "events": "tcp://127.0.0.1:*", "ping_interval": 20, "worker_timeout": 60,
                "schedule_interval": 20, "watchdog_interval": 0.05, "result_grace": 5}
    settings.update(master or {})
    lines = ["[master]"]
    for key, value in settings.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, str):
            value = '"%s"' % value
        lines.append("%s = %s" % (key, value))
    lines.append("[storage]")
    lines.extend(storage or ['backend = "sqlite"', 'url = "var/lavacore.db"'])
    lines.append("[api]\nenabled = false")
    for hostname, device_type, worker, tags in devices:
        lines += ["[[devices]]", 'hostname = "%s"' % hostname,
                  'device_type = "%s"' % device_type, 'worker = "%s"' % worker,
                  "tags = [%s]" % ", ".join('"%s"' % t for t in tags), 'health = "Good"']
    if "[coordinator]" not in extra:
        # An OS-chosen port: masters of several tests may run at once.
        lines.append('[coordinator]\nlisten = "tcp://127.0.0.1:0"')
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return str(path)


class Lab:
    """A running in-process master plus helpers to talk to it."""

    def __init__(self, tmp_path, clock=None, **kwargs):
        self.tmp_path = tmp_path
        self.config_path = write_config(tmp_path, **kwargs)
        self.config = config_mod.load(self.config_path)
        self.clock = clock
        self.master = Master(self.config, clock=clock).start()
        self.context = zmq.Context()
        self.workers = []

    @property
    def storage(self):
        return self.master.storage

    def worker(self, hostname="worker1", connect=True):
        worker = ScriptedWorker(self.context, self.master.controller.endpoint, hostname,
                                self.master.logs.endpoint)
        self.workers.append(worker)
        if connect:
            worker.connect()
        return worker

    def submit(self, text=None, user="alice", **kwargs):
        from lavacore.jobs import submit

        jobs = submit(self.storage, self.master.hook, self.master, text or job_yaml(**kwargs),
                      user, self.master.clock.time())
        self.master.flow.submitted(jobs)
        return jobs[0].id if len(jobs) == 1 else [j.id for j in jobs]

    def job(self, job_id):
        return self.storage.get_job(job_id)

    def wait_for(self, predicate, timeout=5.0, what="condition"):
        """Let the loop run until ``predicate()`` is true (bounded)."""
        deadline = gevent.get_hub().loop.now() + timeout
        while not predicate():
            if gevent.get_hub().loop.now() > deadline:
                raise AssertionError("timed out waiting for %s" % what)
            gevent.sleep(0.005)

    def settled(self, worker, resent=()):
        """What a "nothing happens for 0.3 s" window meant, without the window: once the
        scheduler is idle, a scheduling pass of our own (synchronous: what it sends is
        sent when it returns), then a PING: anything the master sent this worker is ahead
        of the PONG on its connection. Fails on any message but START, CANCEL or STATUS
        resent for the jobs in ``resent``."""
        self.wait_for(self.master.scheduler.idle, timeout=10, what="an idle scheduler")
        self.master.schedule_pass()
        worker.send("PING")
        while True:
            frames = worker.recv(10)
            if frames[0] == b"PONG":
                return
            if frames[0] == b"HELLO_OK":
                continue
            if frames[0] in (b"START", b"CANCEL", b"STATUS") and int(frames[1]) in resent:
                continue
            raise AssertionError("%s: unexpected %r from the master" % (worker.hostname,
                                                                        frames[:2]))

    def close(self):
        for worker in self.workers:
            worker.close()
        self.master.stop()
        # destroy, not term: a socket a failed test left open must not hang teardown.
        self.context.destroy(linger=0)


@pytest.fixture
def lab(tmp_path):
    labs = []

    def make(**kwargs):
        instance = Lab(tmp_path, **kwargs)
        labs.append(instance)
        return instance

    make.clock = FakeClock
    yield make
    for instance in labs:
        instance.close()


def run_cli(config_path, *args, input=None, timeout=30):
    """The real command line in a subprocess."""
    return subprocess.run([sys.executable, "-m", "lavacore.cli", "-c", config_path, *args],
                          capture_output=True, text=True, input=input, timeout=timeout)


class MasterProcess:
    """``lavacore -c CONFIG`` as a real subprocess; endpoints read from its log lines."""

    def __init__(self, config_path, env=None):
        import re
        import threading

        self.config_path = config_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lavacore.cli", "-c", config_path],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, **(env or {})))
        self.lines = []
        self.endpoints = {}
        self._ready = threading.Event()
        pattern = re.compile(r"listening for (workers|job logs) on (\S+)|master started")

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                found = pattern.search(line)
                if found and found.group(1):
                    self.endpoints[found.group(1)] = found.group(2)
                elif found:
                    self._ready.set()
            self._ready.set()

        # A thread, not a greenlet: it only reads the pipe and never touches gevent.
        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not self._ready.wait(30) or self.proc.poll() is not None:
            raise AssertionError("master did not start:\n" + "".join(self.lines))

    @property
    def controller(self):
        return self.endpoints["workers"]

    @property
    def logs(self):
        return self.endpoints["job logs"]

    def log_text(self):
        return "".join(self.lines)

    def stop(self, sig=None):
        import signal as signal_mod

        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal_mod.SIGTERM)
        try:
            return self.proc.wait(15)
        finally:
            self._reader.join(5)

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)


@pytest.fixture
def master_process():
    started = []

    def start(config_path, **kwargs):
        proc = MasterProcess(config_path, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.proc.poll() is None:
            proc.kill()
