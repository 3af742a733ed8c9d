"""The runner's log stream to the master: a PUSH socket sending ``[job_id, line]``.

Two promises pull against each other: no line may be dropped while the master reads, and
the runner must never hang when the master is down. So the high-water mark is high (a
burst of output queues instead of blocking), a full queue waits a bounded time for room,
and the socket lingers only a few seconds at exit.
"""

import os
import sys

import zmq

from .. import logformat
from ..netaddr import needs_ipv6

# The built-in runner's copy of every log line it sends, in output.yaml's form, in its
# output dir: what the master lacks after a crash is taken from it (protocol.LogInfo).
LOG_COPY = "lavacore-log.yaml"


class LogSender:
    """``copy``: a file that gets every line before it is sent (lavacore's worker sends
    the master what it lacks from it after a crash). A copy that cannot be written is
    removed rather than left short, since the master would take it as the whole log."""

    def __init__(self, url, job_id, *, hwm=100_000, linger=5.0, stall=10.0, ipv6=False,
                 master_cert=None, worker_cert=None, copy=None):
        self.url = url
        self.job_id = str(job_id).encode()
        self.hwm = hwm
        self.linger = linger
        self.stall = stall
        self.ipv6 = ipv6
        self.master_cert = master_cert
        self.worker_cert = worker_cert
        self.dropped = 0
        self.copy = copy
        self._copy_fd = None
        self._degraded = False
        self._ctx = None
        self._sock = None

    def connect(self):
        """Open the PUSH socket; without a URL the lines go to stdout (manual runs)."""
        if not self.url:
            return self
        if self.copy:
            try:
                self._copy_fd = os.open(self.copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                                        | os.O_APPEND | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                self._drop_copy(exc)
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.PUSH)
        # LINGER before anything is sent: the runner must not hang at exit on a dead master.
        sock.setsockopt(zmq.LINGER, int(self.linger * 1000))
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        if self.ipv6 or needs_ipv6(self.url):  # a [v6] address needs the option
            sock.setsockopt(zmq.IPV6, 1)
        if self.master_cert and self.worker_cert:
            from zmq.auth.certs import load_certificate
            public, secret = load_certificate(self.worker_cert)
            server_public, _ = load_certificate(self.master_cert)
            sock.curve_publickey = public
            sock.curve_secretkey = secret
            sock.curve_serverkey = server_public
        try:
            sock.connect(self.url)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self._sock = sock
        return self

    def send(self, line):
        if self._sock is None:
            sys.stdout.write("- " + line + "\n")
            return
        data = line.encode("utf-8", errors="replace")
        if self._copy_fd is not None:
            try:
                os.write(self._copy_fd, b"- " + data.replace(b"\n", b" ") + b"\n")
            except OSError as exc:
                self._drop_copy(exc)
        frames = [self.job_id, data]
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK)
            self._degraded = False
            return
        except zmq.Again:
            pass
        # The queue is full: the master is slow or gone. Wait for room once, then give up
        # on waiting (and drop lines) until a send goes through again.
        if not self._degraded and self._sock.poll(int(self.stall * 1000), zmq.POLLOUT):
            try:
                self._sock.send_multipart(frames, zmq.NOBLOCK)
                return
            except zmq.Again:
                pass
        self._degraded = True
        self.dropped += 1

    def log(self, lvl, msg):
        self.send(logformat.make_line(lvl, msg))

    def result(self, definition, case, result, measurement=None, units=None, **extra):
        self.send(logformat.result_line(definition, case, result, measurement, units, **extra))

    def _drop_copy(self, exc):
        print("lavacore-run: cannot keep a copy of the log in %s (%s): the log lines sent"
              " while the master is away cannot be recovered" % (self.copy, exc),
              file=sys.stderr)
        if self._copy_fd is not None:
            os.close(self._copy_fd)
            self._copy_fd = None
        try:
            os.unlink(self.copy)
        except OSError:
            pass

    def close(self):
        if self._copy_fd is not None:
            os.close(self._copy_fd)
            self._copy_fd = None
        if self._sock is not None:
            self._sock.close()  # waits up to LINGER for queued lines to leave
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        else:
            sys.stdout.flush()


def run_with_sender(program, args, run):
    """What a runner's main does around its job (lava-run's arguments in ``args``):
    connect a LogSender to the master's log socket, keeping the local copy in the
    output directory, call ``run(sender)`` (true when the job ran to its end), close,
    and say on stderr what could not be sent. Returns the exit status."""
    sender = LogSender(args.logging_url, args.job_id, ipv6=args.ipv6,
                       master_cert=args.master_cert, worker_cert=args.slave_cert,
                       copy=os.path.join(args.output_dir, LOG_COPY))
    try:
        sender.connect()
    except Exception as exc:
        print("%s: cannot connect to %s: %s" % (program, args.logging_url, exc),
              file=sys.stderr)
        return 1
    try:
        ok = run(sender)
    finally:
        sender.close()
    if sender.dropped:
        print("%s: %d log line(s) dropped: the master did not read them"
              % (program, sender.dropped), file=sys.stderr)
    return 0 if ok else 1
