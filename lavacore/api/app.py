"""The WSGI application: /RPC2 to XML-RPC, /api/v1/ to REST, the rest to the web pages
(lavacore/web). It authenticates, reads bodies within a size limit, turns every refusal
into an XML-RPC fault, a JSON error or an error page, never shows a traceback, and logs
one line per request at DEBUG.

It runs in the master's gevent loop (or in an API process's: lavacore/apiserver.py):
storage calls are short statements (no transaction is held across network I/O), and
everything else is cooperative.
"""

import collections
import json
import logging
import re
import time
import urllib.parse

import gevent
import gevent.event

from ..storage import StorageError
from ..web import Pages
from ..web.pages import wants_html
from . import jobs, monitoring, rest, xmlrpc
from .auth import Caller, authenticate, request_host
from .errors import BAD_REQUEST, INTERNAL, TOO_LARGE, UNAVAILABLE, ApiError, bad_request

log = logging.getLogger("lavacore.api")

MAX_BODY = 10 * 1024 * 1024
# A body must arrive within this many seconds plus one per BODY_RATE bytes.
BODY_DEADLINE = 30
BODY_RATE = 100 * 1024
# Failed authentications from one client address: past [api] max_auth_failures within
# FAILURE_WINDOW seconds, its requests with credentials get 429 until the window ends.
FAILURE_WINDOW = 60.0
# A larger body is read and dropped (so the client gets the answer) up to this size;
# beyond it the connection is closed without reading more.
DISCARD_LIMIT = 64 * 1024 * 1024
READ_CHUNK = 64 * 1024
_SAFE_HOST = re.compile(r"^[\w.\-]+(:\d{1,5})?$|^\[[0-9a-fA-F:.]+\](:\d{1,5})?$")


class _BodyDeadline(BaseException):
    """Raised by the body timer (not an Exception: nothing on the way may swallow it)."""


class AuthThrottle:
    """Failed authentications per client address, in a bounded table."""

    def __init__(self, clock, limit, window=FAILURE_WINDOW, size=65536):
        self.clock = clock
        self.limit = limit
        self.window = window
        self.size = size
        self._failures = collections.OrderedDict()  # address -> [window start, count]

    def retry_after(self, address):
        """Seconds until ``address`` may try again, or 0."""
        entry = self._failures.get(address)
        if entry is None:
            return 0
        left = entry[0] + self.window - self.clock()
        if left <= 0:
            del self._failures[address]
            return 0
        return int(left) + 1 if entry[1] >= self.limit else 0

    def failed(self, address):
        """Count a failure; True when it is the one that locks the address out."""
        now = self.clock()
        entry = self._failures.get(address)
        if entry is None or now - entry[0] >= self.window:
            entry = self._failures[address] = [now, 0]
        self._failures.move_to_end(address)
        while len(self._failures) > self.size:
            self._failures.popitem(last=False)
        entry[1] += 1
        return entry[1] == self.limit


class Application:
    """``app(environ, start_response)``. ``idle`` is set when no request is being worked
    on (requests still waiting for their body do not count: stopping does not wait for a
    client that sends slowly)."""

    def __init__(self, master, max_body=MAX_BODY, throttle=None, observe=None):
        self.master = master
        self.max_body = max_body
        self.log_reader = jobs.LogReader()
        self.active = 0
        self.reading = 0
        self.idle = gevent.event.Event()
        self.idle.set()
        # A pool of API processes shares its throttle (lavacore/api/shared.py).
        self.throttle = throttle or AuthThrottle(time.monotonic,
                                                 int(master.config.api.max_auth_failures))
        # observe(path, seconds) after each request: an API process's /metrics.
        self.observe = observe
        self.pages = Pages(self)

    def _busy(self, active=0, reading=0):
        self.active += active
        self.reading += reading
        if self.active == self.reading:
            self.idle.set()
        else:
            self.idle.clear()

    def __call__(self, environ, start_response):
        started = time.monotonic()
        self._busy(active=1)
        try:
            status, headers, body, note = self._throttled(environ) or self.respond(environ)
        finally:
            self._busy(active=-1)
        if environ.get("lavacore.close"):
            headers.append(("Connection", "close"))
        if not any(name == "X-Content-Type-Options" for name, _ in headers):
            headers.append(("X-Content-Type-Options", "nosniff"))
        headers.append(("Content-Length", str(len(body))))
        start_response(status, headers)
        if self.observe is not None:
            self.observe(environ.get("PATH_INFO", ""), time.monotonic() - started)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s %s %s -> %s (%.1f ms)", environ.get("REMOTE_ADDR", "-"),
                      environ.get("REQUEST_METHOD", "-"), environ.get("PATH_INFO", "")[:200],
                      note, status.split()[0], (time.monotonic() - started) * 1000)
        streamed = not isinstance(body, bytes)  # pages.FileBody: sent in chunks
        if environ.get("REQUEST_METHOD") == "HEAD":
            if streamed:
                body.close()
            return [b""]  # the length of what GET would send, and no body (pywsgi sends it)
        return body if streamed else [body]

    def _throttled(self, environ):
        """429 for a request with credentials from an address that failed too often."""
        if not environ.get("HTTP_AUTHORIZATION"):
            return None
        wait = self.throttle.retry_after(environ.get("REMOTE_ADDR", ""))
        if not wait:
            return None
        environ["lavacore.close"] = True
        body = (json.dumps({"error": "too many failed authentications from your address;"
                                     " try again in %d s" % wait, "code": 429}) + "\n")
        return ("429 Too Many Requests", [("Content-Type", "application/json"),
                                          ("Retry-After", str(wait))],
                body.encode("utf-8"), "throttled")

    def websocket_refusal(self, environ):
        """None when the websocket request may go on (its user in ``lavacore.user``),
        else the raw HTTP refusal to send."""
        throttled = self._throttled(environ)
        if throttled is not None:
            return ("HTTP/1.1 429 Too Many Requests\r\nRetry-After: %s\r\n"
                    "Connection: close\r\nContent-Length: 0\r\n\r\n"
                    % dict(throttled[1])["Retry-After"]).encode()
        try:
            environ["lavacore.user"] = authenticate(
                self.master.storage, environ.get("HTTP_AUTHORIZATION"))
        except ApiError:
            self.auth_failed(environ)
            return (b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm="
                    b"\"lavacore\"\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        except StorageError:
            return (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 10\r\n"
                    b"Connection: close\r\nContent-Length: 0\r\n\r\n")
        return None

    def auth_failed(self, environ):
        address = environ.get("REMOTE_ADDR", "")
        if self.throttle.failed(address):
            log.warning("client %s: %d failed authentications within %d s; its requests with"
                        " credentials get 429 for the rest of that time", address,
                        self.throttle.limit, FAILURE_WINDOW)

    def respond(self, environ):
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        try:
            if path in ("/RPC2", "/RPC2/"):
                return self.xmlrpc(environ, method)
            if path.startswith(rest.PREFIX) or path == rest.PREFIX[:-1]:
                return self.rest(environ, method, path[len(rest.PREFIX):])
            if path in monitoring.PATHS:
                return monitoring.respond(self, environ, method, path)
            if path == "/" and method == "GET" and not wants_html(environ):
                return _json("200 OK", {"version": xmlrpc.VERSION, "xmlrpc": "/RPC2",
                                        "rest": rest.PREFIX}, "index")
            return self.pages.respond(environ, method, path)
        except Exception:  # a bug: logged here, a one-line answer there
            log.exception("internal error answering %s %s", method, path[:200])
            return ("500 Internal Server Error", [("Content-Type", "text/plain")],
                    b"internal error (see the master's log)\n", "internal error")

    # -- the two protocols ------------------------------------------------------------------

    def caller(self, environ):
        try:
            user = authenticate(self.master.storage, environ.get("HTTP_AUTHORIZATION"))
        except ApiError:
            self.auth_failed(environ)
            raise
        return Caller(self.master, user, request_host(environ), self.log_reader)

    def xmlrpc(self, environ, method):
        if method != "POST":
            text = "lavacore %s: XML-RPC endpoint; POST requests. Methods:\n%s\n" % (
                xmlrpc.VERSION, "\n".join(sorted(xmlrpc.METHODS)))
            return ("200 OK", [("Content-Type", "text/plain; charset=utf-8")],
                    text.encode("utf-8"), "xmlrpc help")
        name, user = "-", "-"
        try:
            caller = self.caller(environ)
            user = caller.user or "-"
            name, params = xmlrpc.parse(self.body(environ))
            out = xmlrpc.dispatch(caller, name, params)
            note = "%s %s" % (user, name)
        except ApiError as exc:
            out = xmlrpc.fault(exc.code, exc.message)
            note = "%s %s fault %s" % (user, name[:100], exc.code)
        except StorageError as exc:
            log.error("XML-RPC %s: storage: %s", name[:100], exc)
            out = xmlrpc.fault(INTERNAL, "storage unavailable: %s" % exc)
            note = "%s %s storage error" % (user, name[:100])
        except Exception:  # a bug: a fault, not an HTTP 500 (lavacli retries those)
            log.exception("XML-RPC %s: internal error", name[:100])
            out = xmlrpc.fault(INTERNAL, "Internal error (see the master's log)")
            note = "%s %s internal error" % (user, name[:100])
        return "200 OK", [("Content-Type", "text/xml; charset=utf-8")], out, note

    def rest(self, environ, method, path):
        extra = []
        user = "-"
        try:
            caller = self.caller(environ)
            user = caller.user or "-"
            handler, arguments = rest.match(method, path)
            request = rest.Request(caller, method, path, _query(environ),
                                   lambda: self.body(environ), environ.get("CONTENT_TYPE"),
                                   _base(environ, self.master.config.api.public_url))
            code, data = handler(request, **arguments)
        except ApiError as exc:
            code, data = exc.status, {"error": exc.message, "code": exc.code}
            if exc.status == 401:
                extra.append(("WWW-Authenticate", 'Basic realm="lavacore"'))
            if exc.status == 405:
                extra.append(("Allow", exc.message.rpartition("allowed: ")[2].rstrip(")")))
        except StorageError as exc:
            log.error("REST %s %s: storage: %s", method, path[:200], exc)
            code, data = 503, {"error": "storage unavailable: %s" % exc, "code": UNAVAILABLE}
        status = "%d %s" % (code, _REASONS.get(code, "Error"))
        note = user
        if isinstance(data, rest.Text):
            return status, [("Content-Type", data.content_type)] + extra, \
                data.text.encode("utf-8"), note
        status, headers, body, _ = _json(status, data, note)
        return status, headers + extra, body, note

    # -- request bodies ---------------------------------------------------------------------

    def body(self, environ):
        """The request body, at most ``max_body`` bytes, arrived within its deadline;
        ApiError 413/400 otherwise."""
        self._busy(reading=1)
        try:
            length = environ.get("CONTENT_LENGTH") or ""
            size = int(length) if length.isdigit() else self.max_body
            deadline = BODY_DEADLINE + min(size, self.max_body) / BODY_RATE
            try:
                with gevent.Timeout(deadline, _BodyDeadline()):
                    return self._read_body(environ)
            except _BodyDeadline:
                _abandon(environ)
                raise ApiError(BAD_REQUEST, "request body not received within %d s"
                               % deadline) from None
        finally:
            self._busy(reading=-1)

    def _read_body(self, environ):
        stream = environ["wsgi.input"]
        length = environ.get("CONTENT_LENGTH") or ""
        if length:
            try:
                size = int(length)
            except ValueError:
                raise bad_request("invalid Content-Length %r" % length[:20]) from None
            if size < 0:
                raise bad_request("invalid Content-Length %r" % length[:20])
            if size > self.max_body:
                if size > DISCARD_LIMIT:
                    _abandon(environ)
                raise _too_large(size, self.max_body)
            try:
                data = stream.read(size)
            except OSError:
                environ["lavacore.close"] = True
                raise bad_request("request body incomplete") from None
            if len(data) != size:
                environ["lavacore.close"] = True
                raise bad_request("request body incomplete (%d of %d bytes)"
                                  % (len(data), size))
            return data
        if "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            return b""
        chunks, size = [], 0
        try:
            while True:
                chunk = stream.read(READ_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > self.max_body:
                    _abandon(environ)
                    raise _too_large(size, self.max_body, "more than ")
                chunks.append(chunk)
        except (OSError, ValueError):
            environ["lavacore.close"] = True
            raise bad_request("request body incomplete") from None
        return b"".join(chunks)


def _too_large(size, limit, more=""):
    return ApiError(TOO_LARGE, "request too large: %s%d bytes (at most %d)"
                    % (more, size, limit))


def _abandon(environ):
    """Do not read the rest of this body (pywsgi would): answer, then close."""
    environ["lavacore.close"] = True
    stream = environ["wsgi.input"]
    if hasattr(stream, "position") and hasattr(stream, "content_length"):
        stream.position = stream.content_length or 0
    if hasattr(stream, "chunked_input"):
        stream.chunked_input = False


def _query(environ):
    text = environ.get("QUERY_STRING", "")
    if len(text) > 4096:
        raise bad_request("query string too long")
    try:
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, max_num_fields=50,
                                       strict_parsing=False)
    except ValueError as exc:
        raise bad_request("invalid query string: %s" % exc) from None
    return dict(pairs)


def _base(environ, public_url=""):
    """The address REST links start with: ``[api] public_url`` when a reverse proxy
    stands in front, else the request's own Host."""
    if public_url:
        return public_url.rstrip("/") + rest.PREFIX
    host = environ.get("HTTP_HOST", "")
    if not _SAFE_HOST.match(host):
        host = "%s:%s" % (environ.get("SERVER_NAME", "localhost"),
                          environ.get("SERVER_PORT", ""))
    return "%s://%s%s" % (environ.get("wsgi.url_scheme", "http"), host, rest.PREFIX)


def _json(status, data, note):
    body = (json.dumps(data, default=str) + "\n").encode("utf-8")
    return status, [("Content-Type", "application/json")], body, note


_REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
            413: "Payload Too Large", 429: "Too Many Requests",
            500: "Internal Server Error",
            503: "Service Unavailable"}
