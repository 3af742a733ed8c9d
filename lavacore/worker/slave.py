"""The worker: lava-slave's side of protocol v3 as a gevent service.

One greenlet owns the ROUTER socket and does everything in turn, as lava-slave's loop did:
poll, handle what the master sent, PING when due, check the jobs. The job table lives in
sqlite in the work dir, so a restarted worker keeps tracking the runners it started (they
run in their own sessions and outlive it).

A runner this process started is watched with gevent's child watcher (libev's SIGCHLD
handling): its exit wakes the loop, which sends END at once, so a job's end costs
milliseconds instead of up to one job check. The job check stays the fallback, as in
lava-slave: it notices runners adopted from a previous worker process (not our children),
resends END until END_OK and escalates cancels.

The class is usable on its own (``lavacore worker``) and inside the master's gevent loop
(``[local_worker]``): the constructor only checks its arguments; ``start()`` spawns the
greenlet, ``stop()`` ends it (graceful, idempotent) and ``run()`` is the loop itself.
"""

import fcntl
import functools
import itertools
import logging
import operator
import os
import shlex
import shutil
import signal
import socket as stdsocket
import subprocess
import time
import urllib.parse
import uuid

# from-imports before zmq.green: a plain `import zmq.<sub>` would rebind `zmq` (stack notes)
from zmq.auth.certs import load_certificate
from zmq.utils.monitor import parse_monitor_message

import gevent
import gevent.event
import gevent.socket
import gevent.subprocess
import zmq.green as zmq

from .. import __version__, protocol
from ..netaddr import needs_ipv6
from . import environ, jobdir, procs, proctree
from .jobdir import DEFAULT_RUNNER, LAVA_RUN_BRIDGE
from .jobtable import (CANCELING, DONE, FINISHED, RUNNING, STATUS_NAMES, JobTable,
                       JobTableError)

log = logging.getLogger("lavacore.worker")

MASTER = protocol.MASTER_IDENTITY
# Seconds a runner may hold its lock without being found by its command line (see
# Worker._starting) before the job counts as ended: a restarted worker can only meet a
# child of the dead one between the moment it closes the worker's descriptors and its
# exec, so this is ample; what holds the lock longer is a process an ended runner left.
STARTING_GRACE = 10.0

_wake_ids = itertools.count()
_EVENT_NAMES = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication failed",
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol error",
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed"}
_HANDSHAKE_FAILED = functools.reduce(operator.or_, _EVENT_NAMES)


class WorkerError(Exception):
    """The worker cannot run as configured; the text says why (one line)."""


def _positive(name, value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError("%s must be a number of seconds, got %r" % (name, value)) from None
    if value <= 0:
        raise ValueError("%s must be > 0 seconds, got %r" % (name, value))
    return value


class Worker:
    """A protocol v3 worker (lava-slave equivalent).

    ``master``: the master's ROUTER URL; ``logs``: the master's log PULL URL, handed to each
    runner as ``--logging-url``; ``hostname``: this worker's identity; ``work_dir``: holds
    ``db.sqlite3`` and ``tmp/<prefix><job id>``. ``runner``: the default runner command (a
    shell-style string, e.g. ``"nice lava-run"``); ``runners``: ``{device_type: command}``.
    ``lava_run_for``: device types whose jobs run with LAVA's current lava-run (LAVA
    2020.09 and later, which logs over HTTP), through lavacore's bridge
    (lavacore/worker/lavarun.py); ``"*"`` stands for every type but ``host``. A type in
    ``runners`` keeps its own command. ``lava_run``: lava-run's command (default
    ``lava-run``; ``"nice lava-run"`` as lava-worker runs it). The protocol v3 era lava-run
    (2018-2020), which logs to the master's ZeroMQ socket itself, is a plain runner:
    ``runners={"beaglebone-black": "lava-run"}``.
    ``context``: a ``zmq.green`` Context to share (the master's, say); by default the worker
    makes its own and terminates it at the end. Intervals are seconds, lava-slave's values by
    default: ``poll_timeout`` (longest wait in one poll), ``hello_retry``, ``job_check``,
    ``ping_interval`` (until a PONG sets it), ``min_ping_interval`` (smaller PONGs are
    refused), ``cancel_term_again`` and ``cancel_kill`` (counted from the CANCEL).
    """

    def __init__(self, master, logs, hostname, work_dir, *, runner=DEFAULT_RUNNER,
                 runners=None, lava_run_for=(), lava_run="lava-run", context=None,
                 poll_timeout=5.0, hello_retry=5.0,
                 job_check=5.0, ping_interval=5.0, min_ping_interval=5,
                 cancel_term_again=60.0, cancel_kill=120.0, send_hwm=10, ipv6=False,
                 encrypt=False, master_cert=None, worker_cert=None, dns_check=True,
                 master_timeout=None, run_as=None, clock=time.time, on_ready=None):
        if not master:
            raise ValueError("a master URL is needed (--master)")
        if not logs:
            raise ValueError("a log URL is needed (--logs)")
        protocol.check_hostname(hostname)
        if hostname == "lava-logs":
            raise ValueError("hostname 'lava-logs' is reserved by the protocol")
        self.master = master
        self.logs = logs
        self.hostname = hostname
        self.work_dir = os.path.realpath(work_dir)
        self.tmp_dir = os.path.join(self.work_dir, "tmp")
        self.runner = self._command("runner", runner)
        self.runners = {str(k): self._command("runner for %s" % k, v)
                        for k, v in (runners or {}).items()}
        if isinstance(lava_run_for, str):
            lava_run_for = [lava_run_for]
        self.lava_run_for = frozenset(str(t).strip() for t in lava_run_for or ())
        if "" in self.lava_run_for:
            raise ValueError("lava_run_for: empty device type")
        lava_run = self._command("lava_run", lava_run)
        if self.lava_run_for:
            # Found with the worker's PATH, as runners are: a job's env may change PATH.
            found = shutil.which(lava_run[0])
            if found is None:
                log.warning("lava-run command %r not found on PATH: jobs of device type(s)"
                            " %s will fail until it is installed (Debian package"
                            " lava-dispatcher)", lava_run[0], ", ".join(sorted(
                                self.lava_run_for)))
            else:
                lava_run = [found] + lava_run[1:]
        # The bridge takes lava-run's command as one word: a shell-style string.
        self.lava_run_bridge = [LAVA_RUN_BRIDGE,
                                "--lava-run=%s" % " ".join(shlex.quote(a) for a in lava_run)]
        self.context = context
        self.poll_timeout = _positive("poll_timeout", poll_timeout)
        self.hello_retry = _positive("hello_retry", hello_retry)
        self.job_check = _positive("job_check", job_check)
        self.ping_interval = _positive("ping_interval", ping_interval)
        self.min_ping_interval = int(min_ping_interval)
        self.cancel_term_again = _positive("cancel_term_again", cancel_term_again)
        self.cancel_kill = _positive("cancel_kill", cancel_kill)
        self.send_hwm = int(send_hwm)
        # A [v6] address needs ZeroMQ's IPv6 option (here, and in the runners: --ipv6).
        self.ipv6 = bool(ipv6) or needs_ipv6(master) or needs_ipv6(logs)
        self.encrypt = bool(encrypt)
        if self.encrypt and not (master_cert and worker_cert):
            raise ValueError("encryption needs both master_cert and worker_cert")
        self.master_cert = master_cert
        self.worker_cert = worker_cert
        self.dns_check = dns_check
        # No word from the master for this long (default: 4 ping intervals, lava-slave's
        # "master goes OFFLINE"): the connection is replaced by a fresh socket, which
        # takes the name back if another process of this name took it over.
        self.master_timeout = (None if master_timeout is None
                               else _positive("master_timeout", master_timeout))
        self.clock = clock
        # Called once the work dir is ours and the socket open (systemd's READY=1).
        self.on_ready = on_ready
        # Runners (job steps) run as this user; only a worker running as root can.
        self.run_as = None
        if run_as:
            if os.geteuid() != 0:
                raise ValueError("run_as %s: the worker must run as root to run its jobs as"
                                 " another user" % run_as)
            self.run_as = jobdir.identity(run_as)
        # New at each start: lets the master tell a restart from a second worker process
        # using this hostname (an extra HELLO frame LAVA's master does not read).
        self.instance = uuid.uuid4().hex[:12]

        self.connected = False      # HELLO_OK seen
        self.master_online = False  # lava-slave's "Master is ONLINE" flag
        self.table = None
        self.greenlet = None
        self._sock = None
        self._own_context = None
        self._wake_rx = self._wake_tx = None
        self._poller = None
        self._monitor = None
        self._reconnect_at = None   # when to replace a socket whose handshake was refused
        self._lock_fd = None
        self._procs = {}            # job id -> Popen of runners this process started
        self._spawn_errors = {}     # job id -> why its runner could not start
        self._crash_logged = set()  # job ids whose missing description.yaml was logged
        self._exited = []           # job ids whose runner (our child) exited, not handled yet
        self._end_sent = {}         # job id -> monotonic time of the last END sent
        self._copies = {}           # job id -> lzma'd log copy attached to END resends
        self._infos = {}            # job id -> protocol.LogInfo of its log copy
        self._stopping = False
        self._running = False
        self._loop_greenlet = None
        self._done = gevent.event.Event()
        self._last_master_msg = 0.0
        self._last_ping = 0.0
        self._last_reconnect = 0.0

    @staticmethod
    def _command(what, command):
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not argv:
            raise ValueError("%s: empty command" % what)
        return argv

    # -- lifecycle ----------------------------------------------------------------------

    def start(self):
        """Spawn the worker's greenlet and return it; no-op if already started."""
        if self.greenlet is None:
            self.greenlet = gevent.spawn(self.run)
            self.greenlet.name = "worker %s" % self.hostname
        return self.greenlet

    def stop(self, timeout=10):
        """Ask the loop to end and wait for it (at most ``timeout`` s). Idempotent; a
        no-op before ``start()``/``run()``."""
        if self.greenlet is None and not self._running:
            return
        self._stopping = True
        self._wake()
        if gevent.getcurrent() is self._loop_greenlet:
            return
        if self.greenlet is not None:
            self.greenlet.join(timeout)
        elif self._running:
            self._done.wait(timeout)

    def join(self, timeout=None):
        return self._done.wait(timeout)

    def _wake(self):
        """Make the loop's poll return now. Never blocks, so it may run in the hub."""
        if self._wake_tx is not None:
            try:
                self._wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # a wake-up is already pending (or the loop is closing)

    def run(self):
        """The worker loop; returns once ``stop()`` was called."""
        if self._running:
            raise RuntimeError("worker %s is already running" % self.hostname)
        self._running = True
        self._loop_greenlet = gevent.getcurrent()
        try:
            if self._stopping:
                return
            self._open()
            log.info("worker %s: master %s, logs %s, work dir %s%s", self.hostname,
                     self.master, self.logs, self.work_dir, " (IPv6)" if self.ipv6 else "")
            if self.on_ready is not None:
                self.on_ready()
            self._bootstrap()
            next_check = time.monotonic()  # report jobs that ended while we were away
            while not self._stopping:
                mono = time.monotonic()
                wait = min(self.poll_timeout, next_check - mono, self._ping_due() - mono)
                self._poll(wait)
                if self._stopping:
                    break
                self._handle_exits()
                self._ping()
                self._watch_master()
                if time.monotonic() >= next_check:
                    self.check_jobs()
                    next_check = time.monotonic() + self.job_check
        except WorkerError:
            raise
        except Exception:
            log.exception("worker %s crashed", self.hostname)
            raise
        finally:
            self._close()
            self._running = False
            self._done.set()
            log.info("worker %s stopped", self.hostname)

    def _open(self):
        try:
            os.makedirs(self.tmp_dir, exist_ok=True)
            # Two workers sharing one job table would fight over the same runners.
            self._lock_fd = os.open(os.path.join(self.work_dir, "worker.lock"),
                                    os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise WorkerError("work dir %s: %s" % (self.work_dir, exc.strerror or exc)) from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise WorkerError("work dir %s is in use by another worker" % self.work_dir) from None
        try:
            self.table = JobTable(os.path.join(self.work_dir, "db.sqlite3"))
        except JobTableError as exc:
            raise WorkerError(str(exc)) from None
        if self.context is None:
            self._own_context = zmq.Context()
        ctx = self.context or self._own_context
        address = "inproc://lavacore-worker-wake-%d-%d" % (os.getpid(), next(_wake_ids))
        self._wake_rx = ctx.socket(zmq.PAIR)
        self._wake_rx.bind(address)
        self._wake_tx = ctx.socket(zmq.PAIR)
        self._wake_tx.setsockopt(zmq.LINGER, 0)
        self._wake_tx.connect(address)
        self._poller = zmq.Poller()
        self._poller.register(self._wake_rx, zmq.POLLIN)
        self._open_control()

    def _open_control(self):
        ctx = self.context or self._own_context
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.IDENTITY, self.hostname.encode())
        # The master's name is known up front, so messages can be queued before the TCP
        # connection exists (this must be set before connect).
        sock.setsockopt(zmq.CONNECT_ROUTING_ID, MASTER)
        sock.setsockopt(zmq.SNDHWM, self.send_hwm)
        sock.setsockopt(zmq.LINGER, 0)
        if self.ipv6:
            sock.setsockopt(zmq.IPV6, 1)
        if self.encrypt:
            public, secret = load_certificate(self.worker_cert)
            server_public, _ = load_certificate(self.master_cert)
            sock.curve_publickey = public
            sock.curve_secretkey = secret
            sock.curve_serverkey = server_public
            # libzmq never retries a handshake the master refused (stack notes, CURVE):
            # watch for that and come back later on a fresh socket, or a worker whose
            # key was allowed a moment too late would stay locked out for good.
            self._monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED)
            self._poller.register(self._monitor, zmq.POLLIN)
        sock.connect(self.master)
        self._sock = sock
        self._poller.register(self._sock, zmq.POLLIN)

    def _close_control(self):
        if self._monitor is not None:
            self._poller.unregister(self._monitor)
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        self._poller.unregister(self._sock)
        self._sock.close(linger=0)
        self._sock = None

    def _check_handshake(self):
        failed = None
        while True:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            failed = event
        if failed is not None and self._reconnect_at is None:
            self._reconnect_at = time.monotonic() + self.hello_retry
            log.error("the master refused our CURVE handshake (%s, %s): trying again with a "
                      "fresh socket in %.1f s", _EVENT_NAMES.get(failed["event"], failed["event"]),
                      failed["value"], self.hello_retry)

    def _maybe_reconnect(self):
        if self._reconnect_at is not None and time.monotonic() >= self._reconnect_at:
            self._reconnect_at = None
            self._close_control()
            self._open_control()
            # Before HELLO_OK the bootstrap's next HELLO_RETRY goes out on the new socket.
            log.info("reconnected to %s with a fresh socket", self.master)

    def _close(self):
        if self._sock is not None:
            self._close_control()
        for name in ("_wake_tx", "_wake_rx"):
            sock = getattr(self, name)
            if sock is not None:
                sock.close(linger=0)
                setattr(self, name, None)
        if self._own_context is not None:
            self._own_context.term()
            self._own_context = None
        if self.table is not None:
            self.table.close()
            self.table = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- socket -------------------------------------------------------------------------

    def _send(self, frames):
        # A ROUTER never blocks on send: without a route or over the HWM the message is
        # dropped, and the protocol's resends (END, START, CANCEL) cover the loss.
        self._sock.send_multipart([MASTER] + frames, zmq.NOBLOCK)

    def _poll(self, seconds):
        """Wait up to ``seconds`` for the master and handle what arrived."""
        events = dict(self._poller.poll(max(seconds, 0.001) * 1000))
        if self._wake_rx in events:
            while True:
                try:
                    self._wake_rx.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
        if self._monitor is not None and self._monitor in events:
            self._check_handshake()
        self._maybe_reconnect()
        if self._sock not in events:
            return
        # Drain what is waiting, but not forever: pings and job checks must still run.
        for _ in range(1000):
            if self._stopping:
                return
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = self._decode(frames)
            if msg is None:
                continue
            if self.connected:
                self._dispatch(msg)
            elif msg.action == protocol.HELLO_OK:
                self.connected = True
                log.info("HELLO_OK received")
                self._mark_alive()
            else:
                # lava-slave discards everything before HELLO_OK; the master resends.
                log.info("discarded %s received before HELLO_OK", msg.action)

    def _decode(self, frames):
        if not frames or frames[0] != MASTER:
            log.warning("dropped a message from unexpected peer %s",
                        protocol.peer_name(frames[0]) if frames else "(none)")
            return None
        try:
            return protocol.decode_from_master(frames[1:])
        except protocol.ProtocolError as exc:
            log.warning("dropped a malformed message from the master: %s", exc)
            return None

    _HANDLERS = {
        protocol.HELLO_OK: "_on_hello_ok",
        protocol.PONG: "_on_pong",
        protocol.START: "_on_start",
        protocol.CANCEL: "_on_cancel",
        protocol.STATUS: "_on_status",
        protocol.END_OK: "_on_end_ok",
    }

    def _dispatch(self, msg):
        getattr(self, self._HANDLERS[msg.action])(*msg.args)

    # -- bootstrap and liveness ---------------------------------------------------------

    def _bootstrap(self):
        """HELLO, then HELLO_RETRY every ``hello_retry`` s until HELLO_OK."""
        self._send(self._hello())
        log.info("HELLO sent to %s", self.master)
        retry_at = time.monotonic() + self.hello_retry
        while not self._stopping and not self.connected:
            self._poll(retry_at - time.monotonic())
            if not self.connected and time.monotonic() >= retry_at:
                if self._master_resolves():
                    self._send(self._hello(retry=True))
                    log.info("no HELLO_OK yet: HELLO_RETRY sent")
                retry_at = time.monotonic() + self.hello_retry

    def _hello(self, retry=False):
        return protocol.hello(retry=retry, version="lavacore %s" % __version__,
                              instance=self.instance)

    def _master_resolves(self):
        # lava-slave checks DNS before each HELLO_RETRY so that a typo in the master's
        # name shows up in the log instead of as silence (LAVA-648).
        if not self.dns_check:
            return True
        url = urllib.parse.urlsplit(self.master)
        if url.scheme not in ("tcp",):
            return True
        host, _, port = url.netloc.rpartition(":")
        host = host.strip("[]")
        if not host or host == "*":
            return True
        try:
            gevent.socket.getaddrinfo(host, port or None)
        except (stdsocket.gaierror, OSError) as exc:
            log.error("cannot resolve the master's host %r: %s", host, exc)
            return False
        return True

    def _mark_alive(self):
        self._last_master_msg = time.monotonic()
        if not self.master_online:
            self.master_online = True
            log.info("master %s is ONLINE", self.master)

    def _ping_due(self):
        return max(self._last_master_msg, self._last_ping) + self.ping_interval

    def _ping(self):
        if time.monotonic() >= self._ping_due():
            self._send(protocol.ping())
            self._last_ping = time.monotonic()
            log.debug("PING sent")

    def _master_silence(self):
        return self.master_timeout or 4 * self.ping_interval

    def _watch_master(self):
        """The master said nothing (no PONG to our PINGs) for too long: lava-slave's
        "Master goes OFFLINE", and a fresh socket. ZeroMQ reconnects a dead TCP connection
        by itself, but not one whose route the master handed to another process of the
        same name (ROUTER_HANDOVER): that one stays open and is never read again."""
        silent = time.monotonic() - max(self._last_master_msg, self._last_reconnect)
        if silent <= self._master_silence():
            return
        if self.master_online:
            self.master_online = False
            log.warning("master %s goes OFFLINE (silent for %.1f s)", self.master, silent)
        log.warning("no answer from the master for %.1f s: reconnecting with a fresh socket",
                    silent)
        self._close_control()
        self._open_control()
        self._last_reconnect = time.monotonic()
        self._send(self._hello())

    # -- messages from the master -------------------------------------------------------

    def _on_hello_ok(self):
        log.info("HELLO_OK received again (already connected)")

    def _on_pong(self, interval):
        if interval < self.min_ping_interval:
            log.error("PONG with interval %d < %d: ignored", interval, self.min_ping_interval)
            return
        if interval != self.ping_interval:
            log.info("ping interval is now %d s", interval)
        self.ping_interval = interval
        self._mark_alive()

    def _on_start(self, job_id, definition, device, dispatcher, env, env_dut):
        self._mark_alive()
        row = self._settled(self.table.get(job_id))
        if row is not None:
            if row.status == DONE:
                # lava-slave would have forgotten the job and run it again.
                log.warning("job %d: START for a job that already ran here (its END was"
                            " acknowledged): not run again, END sent", job_id)
                self._send_done(job_id)
            elif row.status == FINISHED:
                log.info("job %d: START for a finished job: END sent again", job_id)
                self._send_end(job_id, row.prefix)
            else:
                # Quirk 1: a CANCELING job is answered START_OK too.
                log.info("job %d: START for a %s job: START_OK sent again", job_id,
                         STATUS_NAMES[row.status])
                self._send(protocol.start_ok(job_id))
            return
        prefix = jobdir.prefix(job_id, dispatcher)
        job_dir = self._job_dir(prefix, job_id)
        if procs.find_runner(job_id, job_dir) is not None:
            self._runner_already_there(job_id, prefix)
            return
        lock = None
        try:
            jobdir.write_files(job_dir, definition, device, dispatcher, env_dut)
            env = environ.apply(os.environ, env, "env of job %d" % job_id)
            command = self.runner_for(jobdir.device_type(job_id, definition, device))
            argv = jobdir.runner_argv(
                command, job_id, job_dir, self.logs, bool(env_dut), self.ipv6,
                (self.master_cert, self.worker_cert) if self.encrypt else None)
            lock = jobdir.open_run_lock(job_dir)
            # The row first (pid 0: starting), so that a worker killed around the spawn
            # finds its runner again (by its command line), or learns from the runner's
            # lock that none started (_settled), instead of starting a second one or
            # reporting a job that never ran as ended.
            self.table.insert(job_id, 0, RUNNING, self.clock(), prefix)
            proc = jobdir.spawn(argv, job_dir, env, self.run_as, lock)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            # Spec 4.4 step 5-6: START_OK anyway; the END that follows carries the reason.
            reason = "cannot start the runner of job %d: %s" % (job_id, exc)
            log.error("job %d not started: %s", job_id, reason)
            self._spawn_errors[job_id] = reason
            jobdir.append_stderr(job_dir, reason)
            self.table.insert(job_id, 0, FINISHED, self.clock(), prefix)
            self._send(protocol.start_ok(job_id))
            self._send_end(job_id, prefix)
            return
        finally:
            if lock is not None:
                os.close(lock)  # the runner holds its own copy
        self._procs[job_id] = proc
        self.table.insert(job_id, proc.pid, RUNNING, self.clock(), prefix)
        proc.rawlink(functools.partial(self._child_exited, job_id))
        self._send(protocol.start_ok(job_id))
        log.info("job %d started: runner pid %d in %s: %s", job_id, proc.pid, job_dir,
                 " ".join(shlex.quote(a) for a in argv))

    def runner_for(self, device_type):
        """The runner command for a job on ``device_type`` (None: unknown)."""
        if device_type in self.runners:
            return self.runners[device_type]
        if device_type is not None and (device_type in self.lava_run_for or (
                "*" in self.lava_run_for and device_type != "host")):
            return self.lava_run_bridge
        return self.runner

    def _runner_already_there(self, job_id, prefix):
        """START for a job this worker has no row for, whose runner (started by an
        earlier worker process) runs: tracked again (its pid is found by the job
        check), never started twice."""
        log.warning("job %d: START for a job whose runner an earlier worker process"
                    " started and still runs: START_OK sent, its runner is tracked again",
                    job_id)
        self.table.insert(job_id, 0, RUNNING, self.clock(), prefix)
        self._send(protocol.start_ok(job_id))

    def _settled(self, row):
        """``row``, or None when it is the row of a runner that never started: a worker
        killed between noting the job (pid 0) and the runner taking its lock. Its START
        was never acknowledged, so the master sends it again, and that START runs it."""
        if row is None or row.pid != 0 or row.status not in (RUNNING, CANCELING):
            return row
        if self._alive(row):
            return self.table.get(row.id)  # its runner found: the row has its pid now
        if jobdir.runner_state(self._job_dir(row.prefix, row.id)) != "never":
            return row
        self.table.delete(row.id)
        log.warning("job %d: its runner never started (the worker stopped while starting"
                    " it): forgotten until the master's next START, which runs it", row.id)
        return None

    def _on_cancel(self, job_id):
        self._mark_alive()
        row = self._settled(self.table.get(job_id))
        if row is None:
            self._end_unknown(job_id, "CANCEL")
        elif row.status == DONE:
            self._send_done(job_id)
        elif row.status == RUNNING:
            pid = self._alive(row)
            if not pid and self._starting(row):
                log.info("job %d: CANCEL while its runner starts: left to the master's next"
                         " CANCEL", job_id)
            elif pid:
                procs.signal_group(pid, signal.SIGTERM)
                self.table.update(job_id, CANCELING, self.clock())
                log.info("job %d canceled by the master: SIGTERM sent to process group %d",
                         job_id, pid)
            else:
                self._reap(job_id)
                self.table.update(job_id, FINISHED, self.clock())
                log.info("job %d canceled by the master, but its runner had already ended:"
                         " END sent", job_id)
                self._send_end(job_id, row.prefix)
        else:
            log.info("job %d: CANCEL for a %s job: nothing to do", job_id,
                     STATUS_NAMES[row.status])

    def _end_unknown(self, job_id, action):
        """``action`` for a job this worker never ran: it is over as far as we know (the
        END is resent until END_OK, as for any job)."""
        log.info("job %d: %s for an unknown job: END sent", job_id, action)
        self.table.insert(job_id, 0, FINISHED, self.clock(), "")
        self._send_end(job_id, "")

    def _on_status(self, job_id):
        self._mark_alive()
        row = self._settled(self.table.get(job_id))
        if row is None:
            self._end_unknown(job_id, "STATUS")
        elif row.status == DONE:
            log.info("job %d: STATUS: already acknowledged, END sent again", job_id)
            self._send_done(job_id)
        elif row.status == FINISHED:
            log.info("job %d: STATUS: finished, END sent", job_id)
            self._send_end(job_id, row.prefix)
        else:
            log.info("job %d: STATUS: %s, START_OK sent", job_id, STATUS_NAMES[row.status])
            self._send(protocol.start_ok(job_id))

    def _on_end_ok(self, job_id):
        row = self.table.get(job_id)
        if row is None or row.status == DONE:
            log.info("job %d: END_OK for an unknown job: ignored", job_id)
            return
        if row.status != FINISHED and self._alive(row):
            # Forgetting a live runner would leave it untracked; a sane master only sends
            # END_OK after our END, so this is a confused peer.
            log.warning("job %d: END_OK while its runner (pid %d) still runs: ignored",
                        job_id, row.pid)
            return
        self._reap(job_id)
        # Remembered (DONE) rather than deleted: a START crossing the END must not run it
        # again. Pruned after a while (jobtable.DONE_KEEP).
        self.table.update(job_id, DONE, self.clock())
        shutil.rmtree(self._job_dir(row.prefix, job_id), ignore_errors=True)
        self._spawn_errors.pop(job_id, None)
        self._crash_logged.discard(job_id)
        self._end_sent.pop(job_id, None)
        self._copies.pop(job_id, None)
        self._infos.pop(job_id, None)
        log.info("job %d done: END_OK received, its directory removed", job_id)

    # -- jobs -----------------------------------------------------------------------------

    def _child_exited(self, job_id, proc):
        # A child watcher's callback, run in the hub: it may not block, and the socket
        # belongs to the loop greenlet, so only note the job and wake the loop.
        if not self._running or self._stopping:
            return  # the next worker on this work dir finds the row at its first check
        self._exited.append(job_id)
        self._wake()

    def _handle_exits(self):
        """END at once for the jobs whose runner (a child of ours) just exited."""
        while self._exited:
            job_id = self._exited.pop(0)
            row = self.table.get(job_id)
            rc = self._reap(job_id)
            if row is None or row.status == FINISHED:
                continue  # already reported (a CANCEL or a job check got there first)
            ended = "" if rc is None else " (exit code %d)" % rc
            if row.status == RUNNING:
                self.table.update(job_id, FINISHED, self.clock())
                log.info("job %d ended: runner ended%s: END sent", job_id, ended)
            else:
                # Stays CANCELING, as lava-slave does: the job check resends END.
                log.info("job %d ended after its cancel: runner ended%s: END sent", job_id,
                         ended)
            self._send_end(job_id, row.prefix)

    def check_jobs(self):
        """lava-slave's periodic job check."""
        self.table.flush()  # catch up on writes a full disk refused
        now = self.clock()
        self.table.prune(now)
        for row in self.table.all():
            if row.status == DONE:
                continue
            row = self._settled(row)
            if row is None:
                continue  # never started: the master's next START runs it
            if row.pid == 0 and row.status != FINISHED and self._starting(row):
                continue  # between fork and exec: found at a later check
            if row.status == FINISHED:
                # lava-slave does not refresh last_update, so END goes out at every check
                # until END_OK; the 10% slack absorbs timer jitter between two checks.
                if now - row.last_update >= 0.9 * self.job_check:
                    self._send_end(row.id, row.prefix, again=True)
            elif row.status == RUNNING:
                if not self._alive(row):
                    rc = self._reap(row.id)
                    self.table.update(row.id, FINISHED, now)
                    log.info("job %d ended: runner ended%s: END sent", row.id,
                             "" if rc is None else " (exit code %d)" % rc)
                    self._send_end(row.id, row.prefix)
            elif row.status == CANCELING:
                if not self._alive(row):
                    self._reap(row.id)
                    # Stays CANCELING, as lava-slave does: END repeats until END_OK (not
                    # twice within one period when the exit itself already sent it).
                    sent = self._end_sent.get(row.id)
                    if sent is None or time.monotonic() - sent >= 0.9 * self.job_check:
                        self._send_end(row.id, row.prefix, again=True)
                    continue
                elapsed = now - row.last_update
                if elapsed >= self.cancel_kill:
                    # Its tree first, read while the parent links hold: what a runner
                    # started in sessions of their own (lava-run's qemu) is in no group
                    # or session of the runner's.
                    tree = proctree.kill_tree(row.pid)
                    procs.signal_group(row.pid, signal.SIGKILL)
                    swept = procs.kill_session(row.pid)
                    log.warning("job %d: still running %.1f s after CANCEL: SIGKILL sent "
                                "(%d process(es) of its session, %d below it)", row.id,
                                elapsed, swept, len(tree))
                elif elapsed >= self.cancel_term_again:
                    procs.signal_group(row.pid, signal.SIGTERM)
                    log.warning("job %d: still running %.1f s after CANCEL: SIGTERM sent "
                                "again", row.id, elapsed)

    def _alive(self, row):
        """The pid of ``row``'s runner while it runs, else 0."""
        job_dir = self._job_dir(row.prefix, row.id)
        if row.pid == 0 and row.status != FINISHED:
            # Started by a worker killed before it noted the runner's pid.
            pid = procs.find_runner(row.id, job_dir)
            if pid is None:
                return 0
            self.table.insert(row.id, pid, row.status, row.last_update, row.prefix)
            log.info("job %d: found its runner (pid %d) started before a worker restart",
                     row.id, pid)
            return pid
        return row.pid if procs.is_runner(row.pid, row.id, job_dir) else 0

    def _starting(self, row):
        """True for a row without pid whose runner holds its lock but is not found by its
        command line yet: between fork and exec, a matter of milliseconds; after
        STARTING_GRACE what holds the lock is what an ended runner left behind."""
        return (0 <= self.clock() - row.last_update < STARTING_GRACE and
                jobdir.runner_state(self._job_dir(row.prefix, row.id)) == "running")

    def _reap(self, job_id):
        # Only our own children can be waited for; runners inherited from a previous
        # worker process are reaped by init, and /proc already told us they are gone.
        proc = self._procs.pop(job_id, None)
        if proc is None:
            return None
        try:
            return proc.wait(timeout=1)
        except gevent.subprocess.TimeoutExpired:
            log.warning("job %d: runner pid %d looks gone but was not reaped", job_id, proc.pid)
            return None

    def _send_end(self, job_id, prefix, again=False):
        job_dir = self._job_dir(prefix, job_id)
        errors = jobdir.read_stderr(job_dir)
        if not errors and job_id in self._spawn_errors:
            errors = (self._spawn_errors[job_id] + "\n").encode()
        description = jobdir.description(job_dir)
        if description is None:
            description = b""
            if job_id not in self._crash_logged:
                self._crash_logged.add(job_id)
                log.warning("job %d: no description.yaml: the runner crashed or never ran",
                            job_id)
        # What LAVA's END cannot say: how much log the runner sent, and, once the master
        # did not acknowledge the first END, the log itself (see protocol.LogInfo).
        if job_id not in self._infos:  # the runner is gone: its copy is final
            self._infos[job_id] = jobdir.log_info(job_dir)
        info = self._infos[job_id]
        copy = self._log_copy(job_id, job_dir) if again and info is not None else None
        self._send(protocol.end(job_id, errors, description, info, copy))
        self._end_sent[job_id] = time.monotonic()
        if again:
            log.debug("job %d: END sent again%s", job_id, " with the log" if copy else "")

    def _log_copy(self, job_id, job_dir):
        """The runner's log copy, compressed once (off the loop: a big log takes a while)
        and kept until END_OK."""
        if job_id not in self._copies:
            blob = gevent.get_hub().threadpool.apply(jobdir.log_copy, (job_dir,))
            if blob is None and os.path.exists(os.path.join(job_dir, jobdir.LOG_COPY)):
                log.warning("job %d: the log copy is too large to send with END", job_id)
            self._copies[job_id] = blob
        return self._copies[job_id]

    def _send_done(self, job_id):
        """END for a job whose END the master already acknowledged."""
        self._send(protocol.end(job_id, "job %d already ran on worker %s (its END was"
                                " acknowledged); not run again\n" % (job_id, self.hostname),
                                b""))

    def _job_dir(self, prefix, job_id):
        return os.path.join(self.tmp_dir, "%s%d" % (prefix, job_id))
