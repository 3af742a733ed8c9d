"""What every scenario shares: a workspace (config, dispatcher config, database), the
master and the bare echo server as real subprocesses, the simulated-worker processes, and
result rows.

The master runs exactly as in production: ``python -m lavacore.cli -c CONFIG``, its log
going to a file (read for its endpoints), never to a pipe this process would have to
drain while it measures.
"""

import contextlib
import itertools
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PG_URL = os.environ.get("LAVACORE_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ("sqlite", "postgres")
# Workspaces (database, job output) live here. File creation on this project's machines
# is slow and varies over minutes (0.1-5 ms per file): scenario 4 reports the rate it saw.
WORK_DIR = os.environ.get("LAVACORE_BENCH_DIR", "/var/tmp")

JOB_TEXT = """\
device_type: {device_type}
job_name: bench {name}
priority: {priority}
visibility: public
timeouts:
  job:
    minutes: 5
actions:
- test:
    timeout:
      minutes: 1
    definitions: []
"""

DEVICE_TYPE = """\
{% extends 'base.jinja2' %}
{% block body %}
role: {{ role | default('dut') }}
commands:
  connect: {{ connection_command }}
  hard_reset: {{ hard_reset_command }}
  power_off: {{ power_off_command }}
  power_on: {{ power_on_command }}
parameters:
  kernel_args: {{ extra_kernel_args }}
{% endblock %}
"""

DICTIONARY = """\
{{% extends '{device_type}.jinja2' %}}
{{% set device_type = '{device_type}' %}}
{{% set connection_command = 'telnet serial-server {port}' %}}
{{% set hard_reset_command = 'pduclient --hostname pdu{pdu} --port {outlet} --command reboot' %}}
{{% set power_off_command = 'pduclient --hostname pdu{pdu} --port {outlet} --command off' %}}
{{% set power_on_command = 'pduclient --hostname pdu{pdu} --port {outlet} --command on' %}}
{{% set extra_kernel_args = 'console=ttyS0,115200' %}}
"""

_counter = itertools.count()


class BenchError(RuntimeError):
    """A scenario could not be measured (the message says what went wrong)."""


def raise_fd_limit():
    """Sockets are files: 10,000 workers need more than the usual 1,024 descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def postgres_problem():
    """None when PostgreSQL rows can run, else why not (one line)."""
    try:
        import lavacore_plugins.storage_postgres as plugin
    except ImportError as exc:
        return "the storage_postgres plugin does not import: %s" % exc
    if not hasattr(plugin, "storage") and not hasattr(plugin, "PostgresStorage"):
        return "plugins/storage_postgres is not written yet (an empty package)"
    try:
        import psycopg2

        psycopg2.connect(PG_URL, connect_timeout=3).close()
    except Exception as exc:  # any failure to reach the server means: no rows
        return "cannot connect to %s: %s" % (PG_URL, str(exc).strip().splitlines()[0])
    return None


def _entry_point(name):
    import importlib.metadata

    return any(ep.name == name
               for ep in importlib.metadata.entry_points(group="lavacore.plugins"))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values, q):
    """The q-th percentile (0-100) by linear interpolation between closest ranks."""
    data = sorted(values)
    if not data:
        return float("nan")
    k = (len(data) - 1) * q / 100.0
    low = int(k)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (k - low)


def row(scenario, measure, backend, value, unit, target=None, ok=None, note="", **extra):
    """One line of the results table. ``ok`` is True/False against ``target``, None when
    the row has no target (a reference or a detail)."""
    data = {"scenario": scenario, "measure": measure, "backend": backend,
            "value": value, "unit": unit, "target": target, "ok": ok, "note": note}
    data.update(extra)
    return data


# -- workspace ----------------------------------------------------------------------------

class Workspace:
    """A directory with config.toml, the dispatcher config and the database (a SQLite file
    in it, or a fresh schema on the PostgreSQL server, dropped at close)."""

    def __init__(self, backend, label, keep=False):
        if backend not in BACKENDS:
            raise BenchError("unknown backend %r" % backend)
        self.backend = backend
        self.keep = keep
        os.makedirs(WORK_DIR, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="lavacore-bench-%s-%s-" % (label, backend),
                                    dir=WORK_DIR)
        shutil.copytree(os.path.join(ROOT, "etc"), os.path.join(self.dir, "etc"))
        self.config_path = os.path.join(self.dir, "config.toml")
        self.output_root = os.path.join(self.dir, "var", "job-output")
        self.schema = None
        if backend == "postgres":
            # A schema of its own (created by the plugin's migrate, dropped at close).
            self.schema = "bench_%s_%d_%d" % (label, os.getpid(), next(_counter))
        self.write_config()

    def _pg(self, statement):
        import psycopg2

        conn = psycopg2.connect(PG_URL)
        try:
            conn.autocommit = True
            conn.cursor().execute(statement)
        finally:
            conn.close()

    def write_config(self, master=None):
        settings = {"listen": "tcp://127.0.0.1:*", "logs": "tcp://127.0.0.1:*",
                    "events": "tcp://127.0.0.1:*", "ping_interval": 20,
                    "worker_timeout": 600, "schedule_interval": 20,
                    "watchdog_interval": 1, "result_grace": 10}
        settings.update(master or {})
        lines = ["[master]"]
        for key, value in settings.items():
            lines.append("%s = %s" % (key, json.dumps(value)))
        lines.append("[storage]")
        if self.backend == "sqlite":
            lines += ['backend = "sqlite"', 'url = "var/lavacore.db"']
        else:
            lines += ['backend = "postgres"', "url = %s" % json.dumps(PG_URL),
                      "[storage.options]", "schema = %s" % json.dumps(self.schema)]
        lines += ["[api]", "enabled = false"]
        if self.backend == "postgres" and not _entry_point("storage_postgres"):
            # Until setup.py registers it (and the package is reinstalled).
            lines += ["[plugins]", 'modules = ["lavacore_plugins.storage_postgres"]']
        with open(self.config_path, "w") as handle:
            handle.write("\n".join(lines) + "\n")

    def config(self):
        from lavacore import config as config_mod

        return config_mod.load(self.config_path)

    def storage(self):
        """A storage of this workspace's database for this process (close it after)."""
        from lavacore import plugins
        from lavacore.master import open_storage

        config = self.config()
        pm = plugins.build(config)
        pm.hook.configure(config=config, master=None)
        return open_storage(config, pm)

    def device_files(self, devices):
        """Device-type templates and device dictionaries for (hostname, type, ...) rows."""
        root = os.path.join(self.dir, "etc", "dispatcher-config")
        for device_type in sorted({d[1] for d in devices}):
            path = os.path.join(root, "device-types", "%s.jinja2" % device_type)
            if not os.path.exists(path):
                with open(path, "w") as handle:
                    handle.write(DEVICE_TYPE)
        for number, device in enumerate(devices):
            # As a lab's dictionaries are: the same type, but each device its own serial
            # console and power port, so no two render alike.
            with open(os.path.join(root, "devices", "%s.jinja2" % device[0]), "w") as handle:
                handle.write(DICTIONARY.format(hostname=device[0], device_type=device[1],
                                               port=7000 + number % 1000,
                                               pdu=number // 24, outlet=number % 24 + 1))
        # A lab's dictionaries were written long before: on disk, not still being written
        # back while the master reads them (which makes each open wait, measured at
        # 0.3 ms instead of 10 us on this machine).
        os.sync()

    def close(self):
        if self.schema is not None:
            try:
                self._pg("DROP SCHEMA IF EXISTS %s CASCADE" % self.schema)
            except Exception as exc:  # never hide the measurement behind a cleanup error
                print("bench: cannot drop schema %s: %s" % (self.schema, exc), file=sys.stderr)
            self.schema = None
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def add_devices(storage, devices):
    """(hostname, device_type, worker, tags) rows -> Good, Idle devices (and their types
    and workers), through the storage API."""
    from lavacore.models import Device
    from lavacore.states import DeviceHealth

    with storage.transaction():
        for hostname, device_type, worker, tags in devices:
            storage.add_device(Device(hostname, device_type, worker, health=DeviceHealth.GOOD,
                                      tags=tuple(tags)))


def job_record(device_type, tags=(), priority=50, now=None, name="job"):
    from lavacore.models import Job

    text = JOB_TEXT.format(device_type=device_type, name=name, priority=priority)
    return Job(id=None, submitter="bench", description="bench %s" % name,
               requested_device_type=device_type, tags=tuple(tags), priority=priority,
               submit_time=now if now is not None else time.time(), definition=text,
               original_definition=text)


def queue_jobs(storage, records, batch=5000):
    """Insert Job records through the storage API, ``batch`` per transaction."""
    ids = []
    for start in range(0, len(records), batch):
        ids.extend(storage.insert_jobs(records[start:start + batch]))
    return ids


# -- processes ----------------------------------------------------------------------------

def _proc_stat(pid):
    with open("/proc/%d/stat" % pid) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_mb(pid, peak=False):
    """Resident memory of ``pid`` in MB, now or (``peak``) at its highest."""
    field = "VmHWM:" if peak else "VmRSS:"
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _pin(cpus):
    """A preexec_fn keeping a child (and every thread it starts) on ``cpus``."""
    if not cpus:
        return None
    cpus = set(cpus) & os.sched_getaffinity(0)
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


class ServerProcess:
    """A subprocess whose log (stderr) goes to a file, ready once ``ready`` is seen."""

    ENDPOINT = re.compile(r"listening for (workers|job logs) on (\S+)")
    ready_pattern = "master started"

    def __init__(self, argv, log_path, cwd=None, timeout=60, profile=None, cpus=None):
        self.log_path = log_path
        self.endpoints = {}
        self.profile = profile
        self.spy = None
        self._log = open(log_path, "w")
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.t_spawn = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._log, cwd=cwd or ROOT, env=env,
                                     preexec_fn=_pin(cpus))
        try:
            self.t_ready = self._wait_ready(timeout)
        except BaseException:
            self.proc.kill()  # never left running behind a failed start
            self.proc.wait()
            raise
        if profile:
            self.spy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(self.proc.pid), "--rate", "250",
                 "--format", "raw", "--output", profile, "--nonblocking", "--idle"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        offset = 0
        text = ""
        while time.monotonic() < deadline:
            with open(self.log_path) as handle:
                handle.seek(offset)
                chunk = handle.read()
            if chunk:
                offset += len(chunk.encode())
                text += chunk
                for kind, endpoint in self.ENDPOINT.findall(text):
                    self.endpoints[kind] = endpoint
                if self.ready_pattern in text:
                    return time.monotonic()
            if self.proc.poll() is not None:
                break
            time.sleep(0.005)
        self.kill()
        raise BenchError("%s did not start:\n%s" % (self.__class__.__name__,
                                                    self.log_text()[-3000:]))

    @property
    def pid(self):
        return self.proc.pid

    @property
    def controller(self):
        return self.endpoints["workers"]

    @property
    def logs(self):
        return self.endpoints["job logs"]

    def cpu_seconds(self):
        return _proc_stat(self.proc.pid)

    def rss_mb(self):
        return rss_mb(self.proc.pid)

    def log_text(self):
        try:
            with open(self.log_path) as handle:
                return handle.read()
        except OSError:
            return ""

    def _stop_spy(self):
        if self.spy is not None and self.spy.poll() is None:
            self.spy.send_signal(signal.SIGINT)
            try:
                self.spy.wait(30)
            except subprocess.TimeoutExpired:
                self.spy.kill()
        self.spy = None

    def stop(self, timeout=20):
        self._stop_spy()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def kill(self):
        self._stop_spy()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


_masters = []


def master_crashes():
    """One line per master of this scenario that stopped by itself with an error (the
    master is crash-only: a bug in a service stops it with exit status 1)."""
    found = []
    for master in _masters:
        code = master.proc.poll()
        if code is not None and code > 0:
            lines = [line for line in master.log_text().splitlines() if "CRITICAL" in line]
            found.append("the master exited with status %d: %s"
                         % (code, lines[0].split(": ", 1)[-1] if lines else "(see its log)"))
    _masters.clear()
    return found


class MasterProcess(ServerProcess):
    """``python -m lavacore.cli -c CONFIG``, as an operator runs it."""

    def __init__(self, workspace, profile=None, timeout=60, cpus=None):
        _masters.append(self)
        self.workspace = workspace
        log_path = os.path.join(workspace.dir, "master-%d.log" % next(_counter))
        super().__init__([sys.executable, "-m", "lavacore.cli", "-c", workspace.config_path],
                         log_path, cwd=workspace.dir, timeout=timeout, profile=profile,
                         cpus=cpus)


class EchoProcess(ServerProcess):
    """``python -m bench.echo``: the bare zmq.green ROUTER."""

    ready_pattern = "listening for workers on"

    def __init__(self, directory, cpus=None, logs_dir=None):
        super().__init__([sys.executable, "-m", "bench.echo"]
                         + (["--logs-dir", logs_dir] if logs_dir else []),
                         os.path.join(directory, "echo-%d.log" % next(_counter)), cpus=cpus)


class SimError(BenchError):
    pass


class SimProcess:
    """``python -m bench.simworkers``: simulated workers in a process of their own."""

    def __init__(self, cpus=None):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.simworkers"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=ROOT, env=env, preexec_fn=_pin(cpus))
        self._buf = b""

    def send(self, cmd, **args):
        args["cmd"] = cmd
        self.proc.stdin.write((json.dumps(args) + "\n").encode())
        self.proc.stdin.flush()

    def receive(self, timeout=120):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SimError("simulated workers: no answer within %ss" % timeout)
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready and any(m.proc.poll() not in (None, 0) and m.proc.returncode > 0
                                 for m in _masters):
                raise BenchError("; ".join(master_crashes()))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise SimError("simulated workers exited (status %s)" % self.proc.wait())
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        data = json.loads(line)
        if "error" in data:
            raise SimError("simulated workers: %s (%s)" % (data["error"], data))
        return data

    def call(self, cmd, **args):
        """One command and its answer; ``timeout`` (if any) is the simulator's own."""
        self.send(cmd, **args)
        wait = args.get("timeout", 60) + args.get("duration", 0) + args.get("warmup", 0)
        return self.receive(wait + 60)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.send("close")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)


def call_all(sims, cmd, args_list, timeout=None):
    """Send one command to several sim processes at once, then collect every answer."""
    for sim, args in zip(sims, args_list):
        sim.send(cmd, **args)
    return [sim.receive(timeout or 120) for sim in sims]


@contextlib.contextmanager
def cleanup():
    """Close whatever was registered, last first, even when the scenario failed."""
    items = []
    try:
        yield items.append
    finally:
        for item in reversed(items):
            try:
                item()
            except Exception as exc:
                print("bench: cleanup failed: %s" % exc, file=sys.stderr)


def wait_until(predicate, timeout, interval=0.005, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)


def hostnames(prefix, count):
    return ["%s%05d" % (prefix, i) for i in range(count)]
