"""A green ZAP authenticator and the key-directory poll, in one greenlet.

pyzmq has no gevent authenticator, and without a ZAP handler libzmq encrypts but accepts
every client key, so the master always runs this one: a REP socket on
``inproc://zeromq.zap.01`` of the master's zmq.green context (RFC 27, ZAP 1.0), bound when
the first socket is secured, before that socket binds. Handshakes that arrive before the
greenlet runs wait in the REP socket; none slips through unchecked.

The same loop reads a monitor socket per CURVE server, to log connections refused before
ZAP is ever asked (a plaintext peer, a peer using another master's key), and re-reads
``workers_certs`` every ``poll_interval``.
"""

import logging
import time

# from-imports before zmq.green: `import zmq.<sub>` would rebind `zmq` (stack notes)
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

import zmq.green as zmq

from lavacore.services.base import Service

log = logging.getLogger("lavacore.auth_curve")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"
DRAIN = 1000
MONITORED = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL

_PROTOCOL_ERRORS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        "a plaintext client: it does not use CURVE, and encryption is on",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
        "its CURVE handshake does not decrypt (does it use this master's public key?)",
}


class CurveService(Service):
    name = "auth_curve"

    def __init__(self, master, auth):
        super().__init__(master)
        self.auth = auth
        self.zap = None
        self.monitors = {}   # monitor socket -> (role, the CURVE server socket)
        self.answered = 0    # ZAP requests answered (handshakes that reached ZAP)

    # -- called by the secure_socket hook, in the main greenlet, before bind -------------

    def secure(self, role, socket):
        settings = self.auth.settings
        self._bind_zap()
        socket.curve_secretkey = settings.secret_key.encode()
        socket.curve_publickey = settings.public_key.encode()
        socket.curve_server = True
        # Names the socket in each ZAP request, so a refusal says where it happened.
        socket.zap_domain = role.encode()
        self.monitors[socket.get_monitor_socket(MONITORED)] = (role, socket)

    def _bind_zap(self):
        if self.zap is not None:
            return
        sock = self.master.context.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise RuntimeError("auth_curve: cannot bind the ZAP handler %s: %s (another"
                               " authenticator on this context?)" % (ZAP_ENDPOINT, exc)) from None
        self.zap = sock

    # -- the loop -------------------------------------------------------------------------

    def setup(self):
        if self.zap is None:
            # No socket was secured (another plugin owns them?): still refuse by default.
            self._bind_zap()

    def run(self):
        poller = zmq.Poller()
        poller.register(self.zap, zmq.POLLIN)
        for monitor in self.monitors:
            poller.register(monitor, zmq.POLLIN)
        interval = self.auth.settings.poll_interval
        next_scan = time.monotonic() + interval
        while not self.stopping.is_set():
            timeout = max(0.0, next_scan - time.monotonic())
            for sock, _ in poller.poll(timeout * 1000):
                if sock is self.zap:
                    self._serve_zap()
                else:
                    self._read_monitor(sock)
            if time.monotonic() >= next_scan:
                self.auth.scan()
                next_scan = time.monotonic() + interval

    def _serve_zap(self):
        for _ in range(DRAIN):
            try:
                request = self.zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.zap.send_multipart(self.answer(request))
            self.answered += 1

    def answer(self, request):
        """The ZAP reply to one request: version, request id, status, text, user id,
        metadata. The user id of an accepted CURVE peer is its z85 public key; the master
        reads it back from every message (``User-Id``)."""
        if len(request) < 6:
            log.error("malformed ZAP request (%d frames); refused", len(request))
            request_id = request[1] if len(request) > 1 else b""
            return [ZAP_VERSION, request_id, b"500", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _identity, mechanism = request[:6]
        credentials = request[6:]
        if version != ZAP_VERSION:
            return [ZAP_VERSION, request_id, b"500", b"ZAP version 1.0 only", b"", b""]
        if mechanism == b"CURVE" and len(credentials) == 1 and len(credentials[0]) == 32:
            key = z85.encode(credentials[0]).decode("ascii")
            allowed, reason = self.auth.handshake(key, domain.decode("utf-8", "replace"),
                                                  address.decode("utf-8", "replace"))
            if allowed:
                return [ZAP_VERSION, request_id, b"200", b"OK", key.encode(), b""]
            return [ZAP_VERSION, request_id, b"400", reason.encode()[:255], b"", b""]
        if mechanism == b"NULL" and domain.decode("utf-8", "replace") not in self.roles():
            # A plaintext socket of this context that asked for ZAP (a ZAP domain set by
            # someone else): not ours to police.
            return [ZAP_VERSION, request_id, b"200", b"OK", b"", b""]
        self.auth.refused_connection(domain.decode("utf-8", "replace"),
                                     address.decode("utf-8", "replace"),
                                     "mechanism %s is not accepted (CURVE only)"
                                     % mechanism.decode("ascii", "replace"))
        return [ZAP_VERSION, request_id, b"400", b"CURVE only", b"", b""]

    def roles(self):
        return {role for role, _ in self.monitors.values()}

    def _read_monitor(self, monitor):
        role, sock = self.monitors[monitor]
        for _ in range(DRAIN):
            try:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                reason = _PROTOCOL_ERRORS.get(
                    int(event["value"]), "ZMTP protocol error 0x%x" % int(event["value"]))
            elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                # The peer hung up mid-handshake: usually a plaintext client that saw
                # this socket asks for CURVE before the socket saw it does not.
                reason = ("it hung up during the handshake (most likely a plaintext client:"
                          " it does not use CURVE, and encryption is on)")
            else:
                continue
            endpoint = event["endpoint"]
            if isinstance(endpoint, bytes):
                endpoint = endpoint.decode("utf-8", "replace")
            self.auth.refused_connection(role, None, reason, endpoint)

    def teardown(self):
        for monitor, (_, sock) in list(self.monitors.items()):
            if not sock.closed:
                try:
                    sock.disable_monitor()
                except zmq.ZMQError:
                    pass
            monitor.close(linger=0)
        self.monitors.clear()
        if self.zap is not None:
            self.zap.close(linger=0)
            self.zap = None
