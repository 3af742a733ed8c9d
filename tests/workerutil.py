"""Helpers for the worker and runner tests: a scripted master on real sockets, job texts,
and worker processes with short intervals.

The scripted master is a plain ROUTER (what the worker talks to) plus a PULL (where the
runners' log lines go), both bound to 127.0.0.1 with OS-chosen ports. Built on a
``zmq.green`` context it can wait inside the gevent loop of an in-process worker.
"""

import contextlib
import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time

import yaml
import zmq

from lavacore import protocol

PY = sys.executable
RUNNER = "%s -m lavacore.worker.runner" % shlex.quote(PY)

# Worker timing for tests: fractions of a second instead of lava-slave's 5 s.
FAST = {"hello_retry": 0.2, "job_check": 0.1, "poll_timeout": 0.1, "min_ping_interval": 1}


class FakeMaster:
    def __init__(self, zmq_module=zmq, port=None, curve_secret=None):
        self.zmq = zmq_module
        self.ctx = zmq_module.Context()
        self.router = None
        self.port = port
        self.curve_secret = curve_secret  # a key pair file: both sockets become CURVE servers
        self.bind()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self._curve(self.pull)
        self.pull.bind("tcp://127.0.0.1:*")
        self.logs_url = self.pull.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.messages = []   # (monotonic time, hostname, [action, args...]) in arrival order
        self._seen = 0       # messages[:_seen] were already returned by expect()
        self.lines = {}      # job id (str) -> parsed log lines

    def bind(self):
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._curve(self.router)
        self.router.bind("tcp://127.0.0.1:%s" % (self.port or "*"))
        endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.port = int(endpoint.rsplit(":", 1)[1])
        self.url = endpoint

    def _curve(self, sock):
        if self.curve_secret:
            from zmq.auth.certs import load_certificate

            sock.curve_publickey, sock.curve_secretkey = load_certificate(self.curve_secret)
            sock.curve_server = True

    def unbind(self):
        self.router.close(linger=0)
        self.router = None

    def close(self):
        if self.router is not None:
            self.router.close(linger=0)
        self.pull.close(linger=0)
        self.ctx.term()

    def send(self, hostname, frames):
        self.router.send_multipart([hostname.encode()] + [
            f if isinstance(f, bytes) else str(f).encode() for f in frames])

    def pump(self, timeout):
        """Wait up to ``timeout`` s for anything; store what arrived."""
        poller = self.zmq.Poller()
        if self.router is not None:
            poller.register(self.router, zmq.POLLIN)
        poller.register(self.pull, zmq.POLLIN)
        events = dict(poller.poll(max(timeout, 0) * 1000))
        if self.router is not None and self.router in events:
            while True:
                try:
                    frames = self.router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.messages.append((time.monotonic(), frames[0].decode(), frames[1:]))
        if self.pull in events:
            for _ in range(10000):
                try:
                    job_id, line = self.pull.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.lines.setdefault(job_id.decode(), []).append(json.loads(line))

    def expect(self, action, job_id=None, timeout=10):
        """The next message (after those already expected) with this action and job id."""
        deadline = time.monotonic() + timeout
        while True:
            while self._seen < len(self.messages):
                stamp, host, frames = self.messages[self._seen]
                self._seen += 1
                if frames and frames[0] == action.encode() and (
                        job_id is None or (len(frames) > 1 and frames[1] == b"%d" % job_id)):
                    return stamp, host, frames
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no %s%s within %s s; got %s" % (
                    action, "" if job_id is None else " %d" % job_id, timeout,
                    [(h, f[:2]) for _, h, f in self.messages[-20:]]))
            self.pump(min(left, 0.05))

    def actions(self, since=0):
        return [f[0].decode() for _, _, f in self.messages[since:]]

    def connect(self, hostname, timeout=10):
        """Wait for the worker's HELLO and answer HELLO_OK."""
        stamp, host, frames = self.expect("HELLO", timeout=timeout)
        assert host == hostname and frames[:2] == [b"HELLO", b"3"], frames
        self.send(hostname, protocol.hello_ok())
        return stamp

    def results(self, job_id):
        return [line["msg"] for line in self.lines.get(str(job_id), [])
                if line["lvl"] == "results"]

    def targets(self, job_id):
        return [line["msg"] for line in self.lines.get(str(job_id), [])
                if line["lvl"] == "target"]

    def wait_line(self, job_id, predicate, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines.get(str(job_id), []):
                if predicate(line):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no matching log line for job %s within %s s; got %s" % (
                    job_id, timeout, self.lines.get(str(job_id), [])[-10:]))
            self.pump(min(left, 0.05))

    def wait_job_result(self, job_id, timeout=15):
        return self.wait_line(job_id, lambda l: l["lvl"] == "results"
                              and l["msg"].get("definition") == "lava"
                              and l["msg"].get("case") == "job", timeout)["msg"]

    def wait_target(self, job_id, text, timeout=10):
        return self.wait_line(job_id, lambda l: l["lvl"] == "target" and text in l["msg"],
                              timeout)

    def idle(self, seconds):
        """Keep receiving for ``seconds`` (no sleeping through messages)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.pump(end - time.monotonic())


def job_yaml(steps, job_seconds=60, action_seconds=None, name="smoke", device_type="host"):
    test = {"definitions": [{
        "from": "inline", "name": name, "path": "inline/%s.yaml" % name,
        "repository": {"metadata": {"format": "Lava-Test Test Definition 1.0", "name": name},
                       "run": {"steps": list(steps)}}}]}
    if action_seconds is not None:
        test["timeout"] = {"seconds": action_seconds}
    return yaml.safe_dump({
        "device_type": device_type, "job_name": "test job", "priority": "medium",
        "visibility": "public", "timeouts": {"job": {"seconds": job_seconds}},
        "actions": [{"test": test}]}, sort_keys=False)


def wait_for_file(path):
    """A shell step waiting (bounded) for ``path`` to exist: lets a test hold a job open."""
    return ("for i in $(seq 1 500); do [ -e %s ] && break; sleep 0.02; done"
            % shlex.quote(str(path)))


def start_frames(job_id, definition, device="device_type: host\n", dispatcher="", env="",
                 env_dut=""):
    return protocol.start(job_id, definition, device, dispatcher, env, env_dut)


def worker_argv(master, work_dir, hostname="worker1", runner=RUNNER, extra=()):
    return [PY, "-m", "lavacore.worker.cli", "--master", master.url, "--logs", master.logs_url,
            "--hostname", hostname, "--work-dir", str(work_dir), "--runner", runner,
            "--hello-retry", "0.2", "--job-check", "0.1", "--poll-timeout", "0.1",
            "--min-ping-interval", "1", "--log-level", "DEBUG", *extra]


def start_worker(master, work_dir, hostname="worker1", runner=RUNNER, extra=(), env=None):
    os.makedirs(work_dir, exist_ok=True)
    log = open(os.path.join(str(work_dir), "..", "%s.log" % hostname), "ab")
    return subprocess.Popen(worker_argv(master, work_dir, hostname, runner, extra),
                            stdout=log, stderr=subprocess.STDOUT, env=env)


def stop_process(proc, timeout=5):
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout)


def table_rows(work_dir):
    path = os.path.join(str(work_dir), "db.sqlite3")
    if not os.path.exists(path):
        return {}
    db = sqlite3.connect(path)
    try:
        return {row[0]: row[1:] for row in db.execute(
            "SELECT id, pid, status, last_update, prefix FROM jobs")}
    finally:
        db.close()


def acknowledged(work_dir, job_id=None):
    """True when the worker's table holds ``job_id`` (every job, by default) as DONE: its
    END acknowledged, its directory gone, remembered so it never runs again."""
    from lavacore.worker.jobtable import DONE

    rows = table_rows(work_dir)
    if job_id is not None:
        return job_id in rows and rows[job_id][1] == DONE
    return all(row[1] == DONE for row in rows.values())


def wait_until(predicate, timeout=10, interval=0.02, what="condition", master=None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("%s not reached within %s s" % (what, timeout))
        if master is not None:
            master.pump(interval)
        else:
            time.sleep(interval)


def process_gone(pid):
    """True once ``pid`` has exited (a zombie waiting for init counts as exited)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def description_of(frames):
    """END's description frame, decompressed and parsed (None for an empty frame)."""
    blob = frames[3]
    if not blob:
        return None
    return yaml.safe_load(protocol.decompress_description(blob))


@contextlib.contextmanager
def small_filesystem(path, size="1m"):
    """A tiny filesystem mounted on ``path`` (a tmpfs; needs root), unmounted at exit.
    Yields False (and mounts nothing) where mounting is not possible."""
    os.makedirs(path, exist_ok=True)
    done = None
    if os.geteuid() == 0:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs",
                               str(path)], capture_output=True, text=True)
    if done is None or done.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_filesystem(directory, name="filler"):
    """Fill the filesystem of ``directory`` to the last byte; returns the filler's path."""
    path = os.path.join(str(directory), name)
    with open(path, "wb") as f:
        chunk = b"\0" * 65536
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    return path
