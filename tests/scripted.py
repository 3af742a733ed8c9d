"""A scripted protocol v3 worker for tests: a real ROUTER socket that says exactly what the
test tells it to, as lava-slave would, and records what the master sent.
Green (zmq.green) so it can share the gevent loop with an in-process master."""

import lzma

import gevent
import zmq.green as zmq

from lavacore import protocol


class ScriptedWorker:
    def __init__(self, context, url, hostname, logs_url=None):
        self.hostname = hostname
        self.sock = context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.IDENTITY, hostname.encode())
        self.sock.setsockopt(zmq.CONNECT_RID, protocol.MASTER_IDENTITY)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)
        self.held = []
        self.push = None
        if logs_url:
            self.push = context.socket(zmq.PUSH)
            self.push.setsockopt(zmq.LINGER, 0)
            self.push.connect(logs_url)

    def send(self, *frames):
        self.sock.send_multipart([protocol.MASTER_IDENTITY] + [
            f if isinstance(f, bytes) else str(f).encode() for f in frames])

    def recv(self, timeout=5.0):
        """The next message from the master as a list of frames (without 'master'); first
        those an ``expect`` held back."""
        if self.held:
            return self.held.pop(0)
        with gevent.Timeout(timeout, AssertionError("%s: nothing from the master within %ss"
                                                    % (self.hostname, timeout))):
            frames = self.sock.recv_multipart()
        assert frames[0] == protocol.MASTER_IDENTITY
        return frames[1:]

    def expect(self, action, timeout=5.0, skip=(b"PONG", b"HELLO_OK"), hold=None):
        """Wait for ``action``, skipping the listed routine messages; messages for which
        ``hold(frames)`` is true are kept for the next ``recv``/``expect``."""
        held = []
        try:
            return self._expect(action, timeout, skip, hold, held)
        finally:
            self.held[:0] = held

    def _expect(self, action, timeout, skip, hold, held):
        deadline = gevent.get_hub().loop.now() + timeout
        while True:
            remaining = deadline - gevent.get_hub().loop.now()
            if remaining <= 0:
                raise AssertionError("%s: no %s from the master" % (self.hostname, action))
            frames = self.recv(remaining)
            if frames[0] == action.encode():
                return frames
            if hold is not None and hold(frames):
                held.append(frames)
            elif frames[0] not in skip:
                raise AssertionError("%s: expected %s, got %r" % (self.hostname, action,
                                                                   frames[:2]))

    def no_reply(self):
        """Assert nothing from the master is waiting now. Use it once something observable
        (a log line, a state) shows the master handled what this worker sent."""
        if self.held or self.sock.poll(0):
            raise AssertionError("unexpected message from the master: %r" % self.recv()[:2])

    def connect(self):
        """HELLO until HELLO_OK, as lava-slave bootstraps."""
        self.send("HELLO", "3")
        for _ in range(20):
            try:
                frames = self.recv(0.5)
            except AssertionError:
                self.send("HELLO_RETRY", "3")
                continue
            if frames == [b"HELLO_OK"]:
                return
        raise AssertionError("%s: no HELLO_OK" % self.hostname)

    def log(self, job_id, line):
        self.push.send_multipart([str(job_id).encode(), line.encode()])

    def end(self, job_id, errors="", description="job: {}\n"):
        blob = lzma.compress(description.encode()) if description is not None else b""
        self.send("END", str(job_id), errors, blob)

    def close(self):
        self.sock.close(linger=0)
        if self.push is not None:
            self.push.close(linger=0)
