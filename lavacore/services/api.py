"""The HTTP API service: gevent's WSGI server inside the master, serving /RPC2 (XML-RPC,
for lavacli) and /api/v1/ (REST/JSON) on ``[api] listen`` (``HOST:PORT``; port 0 lets
the OS choose). Requests run in greenlets of a bounded pool, so a flood of clients waits
at accept instead of exhausting the process; idle keep-alive connections time out.
"""

import collections
import logging
import socket

import gevent
import gevent.pool
from gevent.pywsgi import LoggingLogAdapter, WSGIHandler, WSGIServer

from ..api import websocket
from ..api.app import Application
from ..config import ConfigError
from ..ratelog import RateLimitedLog
from .base import Service

MAX_CONNECTIONS = 256
IDLE_TIMEOUT = 60          # seconds a connection may wait between two requests
STOP_GRACE = 2             # seconds requests in progress get to finish at stop

_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 10\r\nConnection: close\r\n"
         b"Content-Type: text/plain\r\nContent-Length: 38\r\n\r\n"
         b"too many connections from your address\n")
_SLOW = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
         b"Content-Type: text/plain\r\nContent-Length: 37\r\n\r\n"
         b"request headers not received in time\n")


class _HeaderDeadline(BaseException):
    """Raised by the header timer; a BaseException so that pywsgi's handling of bad
    requests (``except Exception``) does not take it for one."""


class _Handler(WSGIHandler):
    """pywsgi's handler with a deadline on the request head: a client waits for its next
    request up to the idle timeout, but once the request's first byte came, its request
    line and headers must be whole within ``[api] header_timeout``. A slowloris client (one
    header line every few seconds) is cut off instead of holding a greenlet forever.
    The body has its own deadline, set by the application from its length."""

    def handle_one_request(self):
        if self.rfile.closed:
            return None
        try:
            if not self.rfile.peek(1):  # waits up to the idle timeout
                return None
        except (OSError, ValueError):
            return None
        timer = gevent.Timeout(self.server.header_timeout, _HeaderDeadline())
        self._head_timer = timer
        timer.start()
        try:
            return super().handle_one_request()
        except _HeaderDeadline:
            self.server.drops.warning(("slow", self.client_address[0]),
                                      "client %s: request headers not whole within %d s;"
                                      " connection closed", self.client_address[0],
                                      self.server.header_timeout)
            return ("408", _SLOW)
        finally:
            timer.close()

    def read_request(self, raw_requestline):
        try:
            return super().read_request(raw_requestline)
        finally:
            self._head_timer.cancel()

    def handle_one_response(self):
        """A request to upgrade ``/ws/`` becomes the event stream (api/websocket.py),
        which holds the connection until the client goes; the rest is WSGI."""
        path = self.path.split("?", 1)[0]
        if path not in ("/ws", "/ws/") or \
                self.headers.get("Upgrade", "").lower() != "websocket":
            return super().handle_one_response()
        self.close_connection = True
        app = self.application
        refused = app.websocket_refusal(self.environ)
        if refused is not None:
            self.socket.sendall(refused)
            return None
        websocket.serve(self, app.master, self.environ.get("lavacore.user"))
        return None


class _Server(WSGIServer):
    """Keeps its client sockets, so stopping can cut connections a client keeps open or
    feeds slowly (pywsgi would otherwise keep reading them after a kill), and counts them
    per client address: past ``[api] max_client_connections`` a client gets 503 at once, so one address
    cannot take every connection the pool serves."""

    handler_class = _Handler

    def __init__(self, *args, header_timeout, max_per_client, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections = set()
        self.per_client = collections.Counter()
        self.header_timeout = header_timeout
        self.max_per_client = max_per_client
        self.drops = RateLimitedLog(logging.getLogger("lavacore.api"))

    def handle(self, sock, address):
        client = address[0] if isinstance(address, tuple) else str(address)
        if self.per_client[client] >= self.max_per_client:
            self.drops.warning(("busy", client), "client %s: more than %d connections open;"
                               " refused", client, self.max_per_client)
            try:
                sock.sendall(_BUSY)
            except OSError:
                pass
            sock.close()
            return
        sock.settimeout(IDLE_TIMEOUT)
        try:
            # pywsgi may write headers and body apart: without this, Nagle's algorithm
            # and the client's delayed ACK add 40 ms to each keep-alive request.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.connections.add(sock)
        self.per_client[client] += 1
        try:
            super().handle(sock, address)
        finally:
            self.connections.discard(sock)
            self.per_client[client] -= 1
            if self.per_client[client] <= 0:
                del self.per_client[client]

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
            environ={"SERVER_NAME": _url_host(host).strip("[]")},
            header_timeout=self.master.config.api.header_timeout,
            max_per_client=int(self.master.config.api.max_client_connections))
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
