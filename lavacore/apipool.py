"""A pre-forked pool of API processes: ``lavacore -c config.toml api --processes N``.

The parent binds the listening socket, makes the pool's shared memory
(lavacore/api/shared.py) and starts N children (``python -m lavacore.apiserver``), which
inherit both; each child serves the whole API (lavacore/apiserver.py) and accepts from
the one socket, so the kernel hands a new connection to whichever child is waiting for
one. With ``--reuse-port`` each child binds its own socket to the address instead
(SO_REUSEPORT: the kernel spreads connections over them by their addresses), and other
``lavacore api --reuse-port`` processes of the same user may join the same port.

The parent does nothing else: it never opens the database past a first check, and has no
event loop. It restarts a child that exits, or whose loop has not beaten for
``STALLED`` seconds (killed first); more than ``MAX_RESTARTS`` restarts within
``RESTART_WINDOW`` seconds stop the pool with exit status 1 (something is wrong that a
restart does not mend). SIGTERM or SIGINT stop the children (each finishes its requests
in progress, up to 2 s) and the pool exits 0; SIGHUP reopens the log file, the children's
too. Under systemd (``Type=notify``) READY=1 is sent once every child serves, and
WATCHDOG=1 while the parent runs.
"""

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time

from . import sdnotify
from .config import ConfigError

log = logging.getLogger("lavacore.api")

STARTING = 60.0        # seconds a child has to serve after it is started
STALLED = 30.0         # seconds without a heartbeat before a child is killed
STOP_WAIT = 10.0       # seconds children get to stop before SIGKILL
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
TICK = 0.5


def _die_with_parent():
    """preexec_fn: the child gets SIGTERM if the pool's parent dies (prctl
    PR_SET_PDEATHSIG), so no orphaned child keeps serving."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Pool:
    def __init__(self, config, listen, processes, events_url=None, reuse_port=False,
                 log_file=None, log_level=None):
        self.config = config
        self.listen = listen
        self.processes = processes
        self.events_url = events_url
        self.reuse_port = reuse_port
        self.log_file = log_file
        self.log_level = log_level
        self.children = {}        # index -> (Popen, started monotonic)
        self.ready = set()
        self.restarts = []        # monotonic times of restarts
        self.stopping = False
        self.exit_code = 0
        self.memory = None
        self.socket = None
        self.url = None

    # -- start -------------------------------------------------------------------------------

    def check(self):
        """What a child would refuse, refused here once, in one line: the storage opens
        (and its schema is made current, so children never migrate at once)."""
        from . import apiserver, plugins
        from .master import open_storage

        pm = plugins.build(self.config)
        pm.hook.configure(config=self.config, master=None)
        storage = open_storage(self.config, pm)
        try:
            apiserver.check_storage(storage, self.processes)
        finally:
            storage.close()

    def bind(self):
        from .apiserver import listening_socket
        from .services.api import _url_host, parse_listen

        host, port = parse_listen(self.listen)
        # --reuse-port: the parent only holds the port (bound, not listening: the kernel
        # gives connections to listening sockets only); each child listens on its own.
        self.socket = listening_socket(host, port, self.reuse_port, "--listen",
                                       listen=not self.reuse_port)
        address = self.socket.getsockname()
        self.url = "http://%s:%d" % (_url_host(address[0]), address[1])

    def spawn(self, index, ready_fd):
        spec = {"index": index, "config": os.path.abspath(self.config.path),
                "listen": "%s:%d" % (_bracket(self.socket.getsockname()[0]),
                                     self.socket.getsockname()[1]),
                "socket": None if self.reuse_port else self.socket.fileno(),
                "reuse_port": self.reuse_port, "memory": self.memory.fd,
                "ready": ready_fd, "events": self.events_url,
                "log_file": self.log_file, "log_level": self.log_level}
        fds = [self.memory.fd, ready_fd] + ([] if self.reuse_port else [self.socket.fileno()])
        # systemd's notifications are the parent's: a child's would confuse it.
        env = {key: value for key, value in os.environ.items()
               if key not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        proc = subprocess.Popen([sys.executable, "-m", "lavacore.apiserver",
                                 json.dumps(spec)], pass_fds=fds, env=env,
                                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self.children[index] = (proc, time.monotonic())
        return proc

    # -- run ---------------------------------------------------------------------------------

    def run(self):
        from .api import shared

        self.check()
        self.bind()
        self.memory = shared.PoolMemory.create(self.processes)
        read_fd, ready_fd = os.pipe()
        os.set_blocking(read_fd, False)
        signals = []

        def on_signal(signum, frame):
            # A stop is a flag set at once: a child that exits meanwhile (systemd may
            # signal the whole group) is then not taken for a crash and restarted.
            if signum != signal.SIGHUP:
                self.stopping = True
            signals.append(signum)

        previous = {sig: signal.signal(sig, on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        interval = sdnotify.watchdog_interval()
        pinged = 0.0
        announced = False
        try:
            for index in range(self.processes):
                self.spawn(index, ready_fd)
            log.info("API pool: %d processes starting on %s (%s)", self.processes, self.url,
                     "SO_REUSEPORT" if self.reuse_port else "one shared socket")
            buffered = b""
            while True:
                while signals:
                    self._signal(signals.pop(0))
                if self.stopping:
                    while signals:
                        self._signal(signals.pop(0))
                    break
                try:
                    readable, _, _ = select.select([read_fd], [], [], TICK)
                except InterruptedError:
                    readable = []
                if readable:
                    buffered += _read_all(read_fd)
                    *lines, buffered = buffered.split(b"\n")
                    for line in lines:
                        if line.strip().isdigit():
                            self.ready.add(int(line))
                if not announced and len(self.ready) >= self.processes:
                    announced = True
                    log.info("API pool serving %s with %d processes (XML-RPC %s/RPC2, REST"
                             " %s/api/v1/)", self.url, self.processes, self.url, self.url)
                    sdnotify.ready("serving %s with %d processes" % (self.url,
                                                                     self.processes))
                self._supervise(ready_fd)
                if interval is not None and time.monotonic() - pinged >= interval:
                    sdnotify.notify("WATCHDOG=1")
                    pinged = time.monotonic()
        finally:
            self._stop_children()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(read_fd)
            os.close(ready_fd)
            if self.socket is not None:
                self.socket.close()
        log.info("API pool stopped")
        return self.exit_code

    def _signal(self, signum):
        if signum == signal.SIGHUP:
            from . import logsetup

            logsetup.reopen()
            log.info("SIGHUP: log file reopened; passed on to the API processes")
            for proc, _ in self.children.values():
                _send(proc, signal.SIGHUP)
            return
        log.info("signal %s: stopping the API pool", signal.Signals(signum).name)

    def _supervise(self, ready_fd):
        now = time.monotonic()
        for index, (proc, started) in list(self.children.items()):
            code = proc.poll()
            if code is None:
                beat = self.memory.beat_of(index)
                if index in self.ready and beat and now - beat > STALLED:
                    log.error("API process %d (pid %d): its loop has not run for %d s;"
                              " killed", index, proc.pid, now - beat)
                    proc.kill()
                    proc.wait()
                    code = -signal.SIGKILL
                elif index not in self.ready and now - started > STARTING:
                    log.error("API process %d (pid %d): not serving %d s after its start;"
                              " killed", index, proc.pid, STARTING)
                    proc.kill()
                    proc.wait()
                    code = -signal.SIGKILL
                else:
                    continue
            if self.stopping:
                return
            self.ready.discard(index)
            self.memory.clear_process(index)
            self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW] + [now]
            if len(self.restarts) > MAX_RESTARTS:
                log.critical("API process %d (pid %d) exited (%s): %d restarts within %d s;"
                             " stopping the pool", index, proc.pid, _status(code),
                             len(self.restarts), RESTART_WINDOW)
                self.exit_code = 1
                self.stopping = True
                return
            log.error("API process %d (pid %d) exited (%s); starting it again", index,
                      proc.pid, _status(code))
            self.memory.count_restart()
            self.spawn(index, ready_fd)

    def _stop_children(self):
        sdnotify.stopping()
        for proc, _ in self.children.values():
            _send(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT
        for index, (proc, _) in self.children.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("API process %d (pid %d) did not stop; killed", index, proc.pid)
                proc.kill()
                proc.wait()
            if proc.returncode not in (0, -signal.SIGTERM) and not self.exit_code:
                log.warning("API process %d exited with status %s", index, proc.returncode)


def _send(proc, sig):
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except OSError:
            pass


def _status(code):
    if code is not None and code < 0:
        try:
            return "signal %s" % signal.Signals(-code).name
        except ValueError:
            return "signal %d" % -code
    return "status %s" % code


def _read_all(fd):
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def _bracket(host):
    return "[%s]" % host if ":" in host else host


def run(config, listen, processes, events_url=None, reuse_port=False, log_file=None,
        log_level=None):
    from .api.shared import MAX_PROCESSES

    if not 1 <= processes <= MAX_PROCESSES:
        raise ConfigError("--processes: from 1 to %d" % MAX_PROCESSES)
    return Pool(config, listen, processes, events_url, reuse_port, log_file,
                log_level).run()
