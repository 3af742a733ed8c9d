"""The runner's log stream to the master: a PUSH socket sending ``[job_id, line]``.

Two promises pull against each other: no line may be dropped while the master reads, and
the runner must never hang when the master is down. So the high-water mark is high (a
burst of output queues instead of blocking), a full queue waits a bounded time for room,
and the socket lingers only a few seconds at exit.
"""

import sys

import zmq

from .. import logformat


class LogSender:
    def __init__(self, url, job_id, *, hwm=100_000, linger=5.0, stall=10.0, ipv6=False,
                 master_cert=None, worker_cert=None):
        self.url = url
        self.job_id = str(job_id).encode()
        self.hwm = hwm
        self.linger = linger
        self.stall = stall
        self.ipv6 = ipv6
        self.master_cert = master_cert
        self.worker_cert = worker_cert
        self.dropped = 0
        self._degraded = False
        self._ctx = None
        self._sock = None

    def connect(self):
        """Open the PUSH socket; without a URL the lines go to stdout (manual runs)."""
        if not self.url:
            return self
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.PUSH)
        # LINGER before anything is sent: the runner must not hang at exit on a dead master.
        sock.setsockopt(zmq.LINGER, int(self.linger * 1000))
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        if self.ipv6:
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
        frames = [self.job_id, line.encode("utf-8", errors="replace")]
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

    def close(self):
        if self._sock is not None:
            self._sock.close()  # waits up to LINGER for queued lines to leave
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        else:
            sys.stdout.flush()
