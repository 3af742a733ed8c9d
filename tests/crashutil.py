"""A lab for crash tests: a master process on fixed ports (so it can be killed with
SIGKILL and started again where its workers look for it), `lavacore worker` processes
with the real runner, and readers of what the master stored."""

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import time

from conftest import MasterProcess, write_config
from lavacore import cli, config as config_mod, logformat
from lavacore.worker import procs
from workerutil import PY, table_rows, wait_until

# Fast worker timing: ENDs resent every 0.2 s, a master silent for 5 s is reconnected to.
WORKER_TIMING = ["--hello-retry", "0.2", "--job-check", "0.2", "--poll-timeout", "0.2",
                 "--ping-interval", "1", "--min-ping-interval", "1", "--master-timeout", "5",
                 "--cancel-term-again", "3", "--cancel-kill", "6"]


def free_ports(count):
    """Ports the OS just gave out and took back (bound and closed at once)."""
    socks, ports = [], []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        socks.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in socks:
        sock.close()
    return ports


def host_devices(count, workers):
    return tuple(("host%02d" % (n + 1), "host", workers[n % len(workers)], ())
                 for n in range(count))


class CrashLab:
    def __init__(self, tmp_path, workers=("worker01",), devices=1, storage=None, extra="",
                 master=None, output_dir=None):
        self.tmp_path = tmp_path
        self.worker_names = list(workers)
        listen, logs, events = free_ports(3)
        settings = {"listen": "tcp://127.0.0.1:%d" % listen,
                    "logs": "tcp://127.0.0.1:%d" % logs,
                    "events": "tcp://127.0.0.1:%d" % events,
                    "ping_interval": 1, "worker_timeout": 10, "schedule_interval": 2,
                    "result_grace": 10}
        if output_dir is not None:
            settings["output_dir"] = str(output_dir)
        settings.update(master or {})
        self.config = write_config(tmp_path, devices=host_devices(devices, self.worker_names),
                                   master=settings, storage=storage, extra=extra)
        self.controller = settings["listen"]
        self.logs = settings["logs"]
        self.master = None
        self.masters = []
        self.workers = {}
        self.start_master()

    # -- processes ----------------------------------------------------------------------

    def start_master(self):
        self.master = MasterProcess(self.config)
        self.masters.append(self.master)
        return self.master

    def kill_master(self):
        self.master.proc.send_signal(signal.SIGKILL)
        self.master.proc.wait(10)
        self.master._reader.join(5)

    def work_dir(self, hostname):
        return self.tmp_path / ("work-%s" % hostname)

    def start_worker(self, hostname, extra=(), work_dir=None, name=None):
        """``lavacore worker --hostname HOSTNAME``; ``name`` tells apart two processes
        given one hostname (their logs and work dirs)."""
        name = name or hostname
        work = work_dir or self.work_dir(name)
        os.makedirs(work, exist_ok=True)
        log = open(self.tmp_path / ("%s.log" % name), "ab")
        proc = subprocess.Popen(
            [PY, "-m", "lavacore.worker.cli", "--master", self.controller, "--logs",
             self.logs, "--hostname", hostname, "--work-dir", str(work), "--log-level",
             "DEBUG", *WORKER_TIMING, *extra], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.workers[name] = proc
        return proc

    def kill_worker(self, hostname):
        proc = self.workers[hostname]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def worker_log(self, hostname):
        path = self.tmp_path / ("%s.log" % hostname)
        return path.read_text(errors="replace") if path.exists() else ""

    def master_logs(self):
        return "".join(m.log_text() for m in self.masters)

    def close(self):
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        for pid in runners_under(str(self.tmp_path)):
            procs.kill_session(pid)
        for master in self.masters:
            if master.proc.poll() is None:
                master.stop()
        (self.tmp_path / "master.log").write_text(self.master_logs())

    # -- reading what the master stored ---------------------------------------------------

    def quick(self, *args):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli.main(["-c", self.config, *args]) == 0, args
        return out.getvalue()

    def submit(self, text):
        path = self.tmp_path / ("job-%d.yaml" % time.monotonic_ns())
        path.write_text(text)
        return [int(x) for x in self.quick("submit", str(path)).split()]

    def job(self, job_id):
        return json.loads(self.quick("jobs", "show", str(job_id), "--json"))

    def finished(self, job_id, timeout=60):
        """The job once Finished (bounded wait); the master's log tail in the failure."""
        state = {}

        def check():
            state.update(self.job(job_id))
            return state["state"] == "Finished"

        try:
            wait_until(check, timeout=timeout, interval=0.05, what="Finished")
        except AssertionError:
            raise AssertionError("job %d not Finished: %s\n--- master ---\n%s" % (
                job_id, state, self.master_logs()[-4000:])) from None
        return dict(state)

    def jobs(self):
        return {job["id"]: job for job in json.loads(self.quick("jobs", "list", "--json",
                                                               "--limit", "100000"))}

    def results(self, job_id):
        data = json.loads(self.quick("jobs", "results", str(job_id), "--json"))
        return [(suite["name"], case["name"], case["result"])
                for suite in data["suites"] for case in suite["tests"]]

    def output_yaml(self, job_id):
        config = config_mod.load(self.config)
        for dirpath, _, filenames in os.walk(config.resolve(config.master.output_dir)):
            if os.path.basename(dirpath) == str(job_id) and "output.yaml" in filenames:
                return os.path.join(dirpath, "output.yaml")
        return None

    def targets(self, job_id):
        path = self.output_yaml(job_id)
        if path is None:
            return []
        with open(path, encoding="utf-8") as handle:
            lines = [logformat.parse_line(line[2:]) for line in handle.read().splitlines()]
        return [line["msg"] for line in lines if line.get("lvl") == "target"]

    def rows(self, hostname):
        return table_rows(self.work_dir(hostname))


def runners_under(directory):
    prefix = ("--output-dir=%s" % directory).encode()
    return [int(name) for name in os.listdir("/proc") if name.isdigit() and any(
        arg.startswith(prefix) for arg in procs.cmdline(int(name)))]
