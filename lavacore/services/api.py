"""The HTTP API service: gevent's WSGI server inside the master, serving /RPC2 (XML-RPC,
for lavacli), /api/v1/ (REST/JSON), /metrics, /health and the web pages on ``[api]
listen`` (``HOST:PORT``; port 0 lets the OS choose).

Connections are bounded three ways, so that no set of clients can take the service from
the others, and a load balancer's ``/health`` always gets an answer:

- one client address holds at most ``[api] max_client_connections`` (503 past that);
- all clients together hold at most ``[api] max_connections``. When that many are open,
  a new connection closes the one that has waited longest without a request in progress
  (an idle keep-alive connection, or one still sending its request head): slow or silent
  clients cannot fill the server, whatever the number of their addresses;
- requests in progress (past their head: reading a body, answering, a websocket) may use
  all connections but a few, kept for ``/health``; past that, other requests get 503.

What clients do wrong (a malformed request, 101 headers) is one WARNING line naming the
peer, at most a few a minute per peer and kind of fault (lavacore/ratelog.py), never a
traceback. A bug of ours met while answering is one ERROR line followed by its traceback,
in the master's log, at most a few a minute per kind of error.
"""

import collections
import logging
import socket
import sys
import time

import gevent
import gevent.pool
from gevent.pywsgi import WSGIHandler, WSGIServer

from ..api import websocket
from ..api.app import Application
from ..config import ConfigError
from ..ratelog import RateLimitedLog
from .base import Service

MAX_CONNECTIONS = 1024     # [api] max_connections when none is given (its default)
SPARE = 32                 # greenlets beyond max_connections: a newcomer being admitted
HEALTH_RESERVE = 8         # connections requests other than /health cannot take
HEALTH_PATHS = ("/health",)
IDLE_TIMEOUT = 60          # seconds a connection may wait between two requests
STOP_GRACE = 2             # seconds requests in progress get to finish at stop

log = logging.getLogger("lavacore.api")


def _answer(status, text, *headers):
    """A whole HTTP/1.1 answer that closes the connection, as bytes."""
    body = text.encode("ascii")
    head = ["HTTP/1.1 %s" % status, "Connection: close", "Content-Type: text/plain",
            "Content-Length: %d" % len(body)] + list(headers)
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


_BUSY = _answer("503 Service Unavailable", "too many connections from your address\n",
                "Retry-After: 10")
_FULL = _answer("503 Service Unavailable", "the server is busy: try again shortly\n",
                "Retry-After: 5")
_SLOW = _answer("408 Request Timeout", "request headers not received in time\n")
_BAD = _answer("400 Bad Request", "malformed request\n")


class _HeaderDeadline(BaseException):
    """Raised by the header timer; a BaseException so that pywsgi's handling of bad
    requests (``except Exception``) does not take it for one."""


class _Evicted(BaseException):
    """The connection was closed to make room while its head was being read."""


class _Full(BaseException):
    """Every connection but the reserve has a request in progress."""


class _TracebackLog:
    """The part of a logger RateLimitedLog uses, adding the exception being handled to
    each line it lets through: the traceback of a bug of ours follows its line."""

    def __init__(self, logger):
        self.logger = logger
        self.exc_info = None

    def isEnabledFor(self, level):
        return self.logger.isEnabledFor(level)

    def log(self, level, msg, *args):
        self.logger.log(level, msg, *args, exc_info=self.exc_info)


class _ErrorStream:
    """pywsgi's ``error_log`` (and the requests' ``wsgi.errors``): whatever is written
    to it goes to the master's log, a line per write, rate limited like the rest."""

    def __init__(self, drops):
        self.drops = drops

    def write(self, text):
        text = str(text).strip()
        if text:
            self.drops.warning(("wsgi",), "HTTP: %s", text[:500])

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        pass


def _fault(ex):
    """What a malformed request did wrong, in a few words of one line."""
    text = getattr(ex, "formatted_message", None) or str(ex) or type(ex).__name__
    return text[:200]


class _Handler(WSGIHandler):
    """pywsgi's handler with a deadline on the request head: a client waits for its next
    request up to the idle timeout, but once the request's first byte came, its request
    line and headers must be whole within ``[api] header_timeout``. A slowloris client (one
    header line every few seconds) is cut off instead of holding a greenlet forever.
    The body has its own deadline, set by the application from its length.

    Each connection says where it is (``phase``: ``idle`` between requests, ``head``
    while its request head comes in, ``busy`` past that) and since when it has been
    without a request in progress (``since``: when it was opened, or its last answer
    sent), for the server to choose which one makes room for a newcomer."""

    phase = "new"
    since = 0.0
    evicted = False
    _head_timer = None

    @property
    def peer(self):
        address = self.client_address
        return address[0] if isinstance(address, tuple) else str(address)

    def _enter(self, phase):
        if phase == self.phase:
            return
        server = self.server
        if self.phase == "busy":
            server.busy -= 1
            self.since = time.monotonic()  # waiting again, from now on
        if phase == "busy":
            server.busy += 1
        self.phase = phase

    def handle(self):
        server = self.server
        if not server.admit(self):
            try:
                self.socket.sendall(_FULL)
            except OSError:
                pass
            return
        try:
            super().handle()
        except OSError:
            pass  # the client went away while it was answered: nothing to say
        except Exception:  # noqa: BLE001 - a bug of ours: logged, the connection closed
            server.bug(("handler",), "HTTP: internal error on a connection from %s",
                       self.peer)
        finally:
            self._enter("gone")
            server.release(self)

    def handle_one_request(self):
        if self.rfile.closed or self.evicted:
            return None
        self._enter("idle")
        try:
            if not self.rfile.peek(1):  # waits up to the idle timeout
                return None
        except (OSError, ValueError):
            return None
        if self.evicted:
            return None
        self._enter("head")
        timer = gevent.Timeout(self.server.header_timeout, _HeaderDeadline())
        self._head_timer = timer
        timer.start()
        try:
            return super().handle_one_request()
        except _HeaderDeadline:
            self.server.drops.warning(("slow", self.peer),
                                      "client %s: request headers not whole within %d s;"
                                      " connection closed", self.peer,
                                      self.server.header_timeout)
            return ("408", _SLOW)
        except _Evicted:
            return None
        except _Full:
            server = self.server
            server.drops.warning(("full", self.peer),
                                 "client %s: %s %s refused with 503: %d requests in"
                                 " progress, the most there may be besides /health", self.peer,
                                 str(self.command)[:20], str(self.path)[:200],
                                 server.busy_limit)
            return ("503", _FULL)
        finally:
            timer.close()

    def read_request(self, raw_requestline):
        try:
            parsed = super().read_request(raw_requestline)
        finally:
            self._head_timer.cancel()
        if self.evicted:
            raise _Evicted()
        server = self.server
        if server.busy >= server.busy_limit and \
                str(self.path).split("?", 1)[0] not in HEALTH_PATHS:
            raise _Full()
        self._enter("busy")
        return parsed

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

    # -- what pywsgi would print to stderr -----------------------------------------------

    def _handle_client_error(self, ex):
        """A malformed request (bad request line, 101 headers, a header line too long, a
        bad chunk): one line, no traceback, and 400."""
        if self.evicted or (isinstance(ex, OSError) and (
                ex.errno is not None or isinstance(ex, TimeoutError))):
            return None  # the connection broke while the head came: nothing to answer
        self.server.drops.warning(("bad request", self.peer),
                                  "client %s: malformed request (%s); answered 400",
                                  self.peer, _fault(ex))
        return ("400", _BAD)

    def log_error(self, msg, *args):
        try:
            text = msg % args if args else msg
        except (TypeError, ValueError):
            text = "%r %r" % (msg, args)
        self.server.drops.warning(("http", self.peer), "client %s: %s", self.peer,
                                  str(text)[:500])

    def _log_error(self, t, v, tb):
        if issubclass(t, gevent.GreenletExit):
            return
        environ = getattr(self, "environ", None) or {}
        self.server.bug(("internal", t.__name__), "HTTP %s %s from %s: internal error"
                        " (%s: %s); answered 500", str(environ.get("REQUEST_METHOD", "-"))[:20],
                        str(environ.get("PATH_INFO", "-"))[:200], self.peer, t.__name__,
                        str(v)[:300], exc_info=(t, v, tb))


class _Server(WSGIServer):
    """Keeps its connections, so stopping can cut those a client keeps open or feeds
    slowly (pywsgi would otherwise keep reading them after a kill), counts them per
    client address (past ``[api] max_client_connections`` a client gets 503 at once, so
    one address cannot take every connection), and bounds them all together (see the
    module's description). ``max_connections``: the pool's size less SPARE when not
    given; the pool must hold SPARE greenlets more than that."""

    handler_class = _Handler

    def __init__(self, *args, header_timeout, max_per_client, max_connections=None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.connections = set()
        self.per_client = collections.Counter()
        self.header_timeout = header_timeout
        self.max_per_client = max_per_client
        size = self.pool.size if self.pool is not None else MAX_CONNECTIONS + SPARE
        self.max_connections = max(1, int(max_connections or size - SPARE))
        self.reserve = min(HEALTH_RESERVE, self.max_connections // 8)
        self.busy_limit = self.max_connections - self.reserve
        self.live = collections.OrderedDict()  # handler -> None: open connections
        self.busy = 0                           # those with a request in progress
        self.leaving = 0                        # those closed to make room, not yet gone
        self.drops = RateLimitedLog(log)
        self._bug_log = _TracebackLog(log)
        self._bugs = RateLimitedLog(self._bug_log)
        # Whatever pywsgi or an application writes as an error: into the log, limited.
        self.error_log = _ErrorStream(self.drops)
        self.environ["wsgi.errors"] = self.error_log

    def bug(self, key, msg, *args, exc_info=True):
        """An ERROR line with the traceback being handled (or ``exc_info``), at most a
        few a minute per ``key``."""
        self._bug_log.exc_info = sys.exc_info() if exc_info is True else exc_info
        try:
            self._bugs.error(key, msg, *args)
        finally:
            self._bug_log.exc_info = None

    # -- all connections together -----------------------------------------------------

    def admit(self, handler):
        """Count ``handler``'s connection in, closing the longest waiting connection
        without a request in progress when all are taken; False when none could be
        closed (every connection is in a request): the newcomer is refused."""
        if len(self.live) - self.leaving >= self.max_connections:
            victim = self._oldest_waiting()
            if victim is None:
                self.drops.warning(("no room", handler.peer),
                                   "client %s: refused with 503: %d connections open, all"
                                   " with a request in progress", handler.peer,
                                   len(self.live))
                return False
            self._evict(victim)
        handler.since = time.monotonic()
        self.live[handler] = None
        return True

    def release(self, handler):
        if handler in self.live:
            del self.live[handler]
            if handler.evicted:
                self.leaving -= 1

    def _oldest_waiting(self):
        oldest = None
        for handler in self.live:
            if handler.phase in ("new", "idle", "head") and not handler.evicted and \
                    (oldest is None or handler.since < oldest.since):
                oldest = handler
        return oldest

    def _evict(self, victim):
        victim.evicted = True
        self.leaving += 1
        waited = time.monotonic() - victim.since if victim.since else 0.0
        self.drops.warning(("evicted", victim.peer),
                           "client %s: connection closed to make room for a new one (the"
                           " %d connections [api] max_connections allows are open); it had"
                           " sent no whole request for %.0f s%s", victim.peer,
                           self.max_connections, waited,
                           " (part of a request head)" if victim.phase == "head" else "")
        sock = getattr(victim, "socket", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes its greenlet, which ends
            except OSError:
                pass

    # -- per client address -----------------------------------------------------------

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
    """The host part of a URL that reaches a server bound to ``host`` from this machine
    (a wildcard address is reached on the loopback one)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return "[%s]" % host if ":" in host else host


def _v6_only(sock):
    try:
        return bool(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    except (OSError, AttributeError):
        return False


def listen_text(host, port, sock=None):
    """Where a server bound to (host, port) listens, as the start line says it: the
    URL, and for a wildcard address, which addresses that covers."""
    if host in ("0.0.0.0", ""):
        return "http://*:%d (every IPv4 address of this host)" % port
    if host == "::":
        return "http://[::]:%d (every %saddress of this host)" % (
            port, "IPv6 " if sock is not None and _v6_only(sock) else "IPv6 and IPv4 ")
    return "http://%s:%d" % ("[%s]" % host if ":" in host else host, port)


class ApiService(Service):
    name = "api"

    def __init__(self, master):
        super().__init__(master)
        self.server = None
        self.app = None
        self.address = None
        self.url = None

    def setup(self):
        api = self.master.config.api
        host, port = parse_listen(api.listen)
        self.app = Application(self.master)
        max_connections = int(getattr(api, "max_connections", MAX_CONNECTIONS))
        self.server = _Server(
            (host, port), self.app, backlog=1024,
            spawn=gevent.pool.Pool(max_connections + SPARE), log=None,
            # SERVER_NAME given: gevent would otherwise resolve the host name (blocking).
            environ={"SERVER_NAME": _url_host(host).strip("[]")},
            header_timeout=api.header_timeout,
            max_per_client=int(api.max_client_connections),
            max_connections=max_connections)
        try:
            self.server.init_socket()
        except OSError as exc:
            self.server = None
            raise ConfigError("[api] listen: cannot listen on %s: %s"
                              % (api.listen, exc.strerror or exc)) from None
        self.address = self.server.address[:2]
        self.url = "http://%s:%d" % (_url_host(self.address[0]), self.address[1])
        where = listen_text(self.address[0], self.address[1], self.server.socket)
        if where.startswith(self.url):
            self.log.info("API listening on %s (XML-RPC %s/RPC2, REST %s/api/v1/)",
                          where, self.url, self.url)
        else:
            self.log.info("API listening on %s (XML-RPC at /RPC2, REST at /api/v1/; from"
                          " this host: %s)", where, self.url)

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
