"""The HTTP API service: gevent's WSGI server inside the master, serving /RPC2 (XML-RPC,
for lavacli) and /api/v1/ (REST/JSON) on ``[api] listen`` (``HOST:PORT``; port 0 lets
the OS choose). Requests run in greenlets of a bounded pool, so a flood of clients waits
at accept instead of exhausting the process; idle keep-alive connections time out.
"""

import logging
import socket

import gevent.pool
from gevent.pywsgi import LoggingLogAdapter, WSGIServer

from ..api.app import Application
from ..config import ConfigError
from .base import Service

MAX_CONNECTIONS = 256
IDLE_TIMEOUT = 60          # seconds a connection may wait between two requests
STOP_GRACE = 2             # seconds requests in progress get to finish at stop


class _Server(WSGIServer):
    """Keeps its client sockets, so stopping can cut connections a client keeps open or
    feeds slowly (pywsgi would otherwise keep reading them after a kill)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections = set()

    def handle(self, sock, address):
        sock.settimeout(IDLE_TIMEOUT)
        try:
            # pywsgi may write headers and body apart: without this, Nagle's algorithm
            # and the client's delayed ACK add 40 ms to each keep-alive request.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.connections.add(sock)
        try:
            super().handle(sock, address)
        finally:
            self.connections.discard(sock)

    def cut(self):
        for sock in list(self.connections):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def parse_listen(text):
    """``"HOST:PORT"`` (``[v6]:PORT``; ``*`` or empty host: every interface) ->
    (host, port). ConfigError naming the key otherwise."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError("[api] listen: %r is not HOST:PORT" % (text,))
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host in ("*", ""):
        host = "0.0.0.0"
    return host, int(port)


def _url_host(host):
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return "[%s]" % host if ":" in host else host


class ApiService(Service):
    name = "api"

    def __init__(self, master):
        super().__init__(master)
        self.server = None
        self.app = None
        self.address = None
        self.url = None

    def setup(self):
        host, port = parse_listen(self.master.config.api.listen)
        self.app = Application(self.master)
        self.server = _Server(
            (host, port), self.app, backlog=1024, spawn=gevent.pool.Pool(MAX_CONNECTIONS),
            log=None, error_log=LoggingLogAdapter(self.log, logging.INFO),
            # SERVER_NAME given: gevent would otherwise resolve the host name (blocking).
            environ={"SERVER_NAME": _url_host(host).strip("[]")})
        try:
            self.server.init_socket()
        except OSError as exc:
            self.server = None
            raise ConfigError("[api] listen: cannot listen on %s: %s"
                              % (self.master.config.api.listen, exc.strerror or exc)) \
                from None
        self.address = self.server.address[:2]
        self.url = "http://%s:%d" % (_url_host(self.address[0]), self.address[1])
        self.log.info("API listening on %s (XML-RPC %s/RPC2, REST %s/api/v1/)",
                      self.url, self.url, self.url)

    def run(self):
        self.server.start()
        self.stopping.wait()

    def teardown(self):
        server, self.server = self.server, None
        if server is None:
            return
        server.close()  # no new connections; requests in progress may finish
        if self.app is not None:
            self.app.idle.wait(STOP_GRACE)
        server.cut()  # idle keep-alive connections and clients still sending
        if server.pool is not None:
            server.pool.kill(block=True, timeout=1)
