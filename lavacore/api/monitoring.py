"""/metrics (Prometheus) and /health, on the API's HTTP listener.

Both answer GET and HEAD only (405 otherwise), take no request body (400), and ignore
query strings. Neither needs a token.

**/metrics** is the Prometheus exposition of the master's metrics (lavacore/metrics.py),
as text (0.0.4) or OpenMetrics when the scraper asks for it, gzipped when it accepts
gzip. A rendering is reused for ``metrics.MAX_AGE`` (1 s): scrapers asking faster cost
the loop nothing more. It shows what its caller may see: device types hidden from the caller (restricted
for view, lavacore/permissions.py) are counted under the device type ``(hidden)``, their
numbers merged, so totals stay right and no hidden name shows. Anonymous scrapers see
the public types' names; a scraper with a token (``Authorization: Token ...``, or basic
``user:token``) sees the names its user may see, all of them for a superuser.

**/health** is 200 ``{"status": "ok", ...}`` when the master is serving, 503 with
``Retry-After`` and one line per problem when not: its event loop stalled (the
watchdog's heartbeat late by more than ``max_lag``, now or within the last seconds), a
service's greenlet gone, a ZeroMQ socket or the context closed, a scheduling pass
running for minutes, the master lock (PostgreSQL) lost, the master stopping, the
storage not answering a one-row read within ``storage_timeout``, or the master's writes
failing (a full disk: until one goes through again). The storage is asked at most once
per ``probe_every`` seconds however many clients ask; everything else is read from
memory.
A standby master binds nothing until it takes over, so it does not answer at all: a
load balancer sends it no traffic.

An API process (``lavacore api``, lavacore/apiserver.py) answers both about itself:
/health with ``"role": "api"``, its pid and its place in its pool, and the problems of
its own loop, services and storage; /metrics with its pool's ``lavacore_api_*`` numbers
(lavacore/api/procmetrics.py), never the master's.
"""

import gzip
import json
import logging
import time
import weakref

import gevent
import gevent.lock
import zmq

from .. import metrics
from ..storage import StorageError
from .errors import ApiError

log = logging.getLogger("lavacore.api")

PATHS = ("/metrics", "/health")
ALLOWED = "GET, HEAD"

MAX_LAG = 2.0          # seconds the loop may lag before /health says it stalled
STORAGE_TIMEOUT = 2.0  # seconds the storage has to answer /health's read
PROBE_EVERY = 1.0      # seconds a storage probe's answer is reused
STUCK_PASS = 300.0     # seconds after which a running scheduling pass is a problem
RETRY_AFTER = "5"
GZIP_LEVEL = 6
RENDERINGS = 16        # renderings of /metrics kept (by viewer, format and encoding)
CORE_SOCKETS = ("controller", "logs", "events")


def respond(app, environ, method, path):
    """(status, headers, body, note) for ``path`` (one of PATHS)."""
    if method not in ("GET", "HEAD"):
        return _text("405 Method Not Allowed", "%s answers GET and HEAD only\n" % path,
                     "405", [("Allow", ALLOWED)])
    if _has_body(environ):
        from .app import _abandon

        _abandon(environ)  # answered without reading it, then the connection closes
        return _text("400 Bad Request", "%s takes no request body\n" % path, "body refused")
    if path == "/health":
        return health(app.master).respond(method)
    return scrape(app, environ, method)


# -- /metrics ---------------------------------------------------------------------------

def metrics_of(master):
    """The numbers /metrics and /health read: the master's (lavacore/metrics.py), or an
    API process's own (lavacore/api/procmetrics.py)."""
    own = getattr(master, "api_metrics", None)
    return own if own is not None else metrics.of(master)


def scrape(app, environ, method):
    master = app.master
    try:
        caller = app.caller(environ)
    except ApiError as exc:
        return _text("401 Unauthorized", exc.message + "\n", "metrics refused",
                     [("WWW-Authenticate", 'Basic realm="lavacore"')])
    except StorageError as exc:
        return _text("503 Service Unavailable", "storage unavailable: %s\n" % exc,
                     "metrics: storage", [("Retry-After", RETRY_AFTER)])
    encoder, content_type = _encoder(environ.get("HTTP_ACCEPT", ""))
    headers = [("Content-Type", content_type), ("Cache-Control", "no-store"),
               ("Vary", "Accept, Accept-Encoding, Authorization")]
    if method == "HEAD":
        return "200 OK", headers, b"", "metrics HEAD"
    zipped = _accepts_gzip(environ.get("HTTP_ACCEPT_ENCODING", ""))
    if zipped:
        headers.append(("Content-Encoding", "gzip"))
    counted = metrics_of(master)
    key = (caller.user, content_type, zipped)
    cached = counted.rendered.get(key)
    if cached is not None and time.monotonic() - cached[0] < counted.max_age:
        return "200 OK", headers, cached[1], "metrics %s (reused)" % (caller.user or "-")
    try:
        policy = master.anonymous_policy() if caller.user is None else caller.policy
    except StorageError:
        policy = None  # who may see what cannot be read now: no type is named
    body = encoder(_Families(visible(list(counted.registry.collect()), policy)))
    if zipped:
        body = gzip.compress(body, GZIP_LEVEL)
    counted.rendered.pop(key, None)
    counted.rendered[key] = (time.monotonic(), body)
    while len(counted.rendered) > RENDERINGS:
        counted.rendered.pop(next(iter(counted.rendered)))
    return "200 OK", headers, body, "metrics %s" % (caller.user or "-")


def visible(families, policy):
    """``families`` as ``policy``'s principal may see them: samples of device types it
    may not see are renamed ``(hidden)`` and added up. Without a policy (None), or if who
    may see what cannot be read now, every device type's name is withheld."""
    names = {sample.labels["device_type"] for family in families
             for sample in family.samples if "device_type" in sample.labels}
    try:
        hidden = names if policy is None else {
            name for name in names if not policy.can_view_type(name)}
    except StorageError:
        hidden = names
    if not hidden:
        return families
    return [_renamed(family, hidden) if any(
        sample.labels.get("device_type") in hidden for sample in family.samples)
        else family for family in families]


def _renamed(family, hidden):
    merged = {}
    for sample in family.samples:
        labels = sample.labels
        if labels.get("device_type") in hidden:
            labels = dict(labels, device_type=metrics.HIDDEN)
        key = (sample.name, tuple(sorted(labels.items())))
        seen = merged.get(key)
        if seen is None:
            merged[key] = sample._replace(labels=labels)
        else:
            merged[key] = seen._replace(value=seen.value + sample.value)
    from prometheus_client.metrics_core import Metric

    copy = Metric(family.name, family.documentation, family.type, family.unit)
    copy.samples = list(merged.values())
    return copy


class _Families:
    """What prometheus_client's encoders read: ``collect()``."""

    def __init__(self, families):
        self._families = families

    def collect(self):
        return self._families


def _encoder(accept):
    from prometheus_client import exposition

    try:
        return exposition.choose_encoder(accept[:1024])
    except Exception:  # a hostile Accept header gets the plain text format
        return exposition.choose_encoder("")


def _accepts_gzip(header):
    for item in header[:1024].split(","):
        name, _, params = item.partition(";")
        if name.strip().lower() == "gzip":
            return params.replace(" ", "").lower() not in ("q=0", "q=0.0", "q=0.00",
                                                           "q=0.000")
    return False


# -- /health ----------------------------------------------------------------------------

class _Late(Exception):
    """The storage probe ran out of time."""


class Health:
    """The checks of one master. ``max_lag``, ``storage_timeout``, ``probe_every`` and
    ``stuck_pass`` come from ``[api] health_max_lag`` and ``health_storage_timeout`` where
    the configuration has them, else from the defaults above."""

    def __init__(self, master):
        self._master = weakref.ref(master)
        api = master.config.api
        self.max_lag = float(getattr(api, "health_max_lag", MAX_LAG))
        self.storage_timeout = float(getattr(api, "health_storage_timeout",
                                             STORAGE_TIMEOUT))
        self.probe_every = PROBE_EVERY
        self.stuck_pass = STUCK_PASS
        self._probe = None           # (when, problem or None, seconds it took)
        self._probing = gevent.lock.Semaphore()
        self._said = ()              # the problems last logged

    def respond(self, method):
        problems, details = self.check()
        self._log(problems)
        if problems:
            body = {"status": "unavailable", "problems": problems}
            body.update(details)
            status, headers = "503 Service Unavailable", [("Retry-After", RETRY_AFTER)]
        else:
            body = dict({"status": "ok"}, **details)
            status, headers = "200 OK", []
        headers += [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
        data = b"" if method == "HEAD" else (json.dumps(body) + "\n").encode("utf-8")
        return status, headers, data, "health %s" % status.split()[0]

    def check(self):
        """(problems: one line each, details: what a healthy answer reports too)."""
        master = self._master()
        problems = []
        if master is None:
            return ["master: gone"], {}
        counted = metrics_of(master)
        watch = counted.loop
        now = time.monotonic()
        late, worst = watch.lag_now(now), watch.recent_worst(now)
        details = {"role": getattr(master, "role", "active"),
                   "storage": getattr(master.storage, "name", None),
                   "uptime_seconds": round(now - counted.started, 1),
                   "loop_lag_seconds": round(max(late, worst), 4)}
        more = getattr(master, "health_details", None)
        if more is not None:
            details.update(more())
        services = list(master.services)
        if any(service.stopping.is_set() for service in services if
               hasattr(service, "stopping")):
            problems.append("%s: stopping" % ("API process" if details["role"] == "api"
                                              else "master"))
        leadership = getattr(master.storage, "leadership", None)
        if leadership is not None and not leadership.held:
            problems.append("master lock: lost with its database connection; taking it"
                            " again (another master may take over)")
        if late > self.max_lag:
            problems.append("event loop: the heartbeat is %.1f s late (limit %g s)"
                            % (late, self.max_lag))
        elif worst > self.max_lag:
            problems.append("event loop: stalled for %.1f s within the last %g s (limit"
                            " %g s)" % (worst, watch.window, self.max_lag))
        problems += self._services(master, services)
        scheduler = getattr(master, "scheduler", None)
        started = getattr(scheduler, "pass_started", None)
        if started is not None and now - started > self.stuck_pass:
            problems.append("scheduler: a pass has been running for %d s" % (now - started))
        problem, seconds = self._storage(master)
        if seconds is not None:
            details["storage_seconds"] = round(seconds, 6)
        if problem:
            problems.append(problem)
        # The master's own record of writes that failed (a full disk still answers
        # reads; a test write could still fit in SQLite's WAL): cleared by the master's
        # next write that goes through.
        failing = getattr(master, "_storage_fault", None)
        if failing is not None:
            problems.append("storage: writes failing for %d s; what cannot be stored is"
                            " held and retried" % (master.clock.monotonic() - failing))
        return [_one_line(p) for p in problems], details

    def _services(self, master, services):
        problems = []
        watchdog = getattr(master, "watchdog", None)
        heartbeat = getattr(watchdog, "heartbeat", None)
        if heartbeat is not None and heartbeat.dead:
            problems.append("watchdog: its heartbeat is not running")
        for service in services:
            name = getattr(service, "name", type(service).__name__)
            greenlet = getattr(service, "greenlet", None)
            if greenlet is not None and greenlet.dead:
                exc = greenlet.exception
                problems.append("service %s: not running (%s)" % (
                    name, "%s: %s" % (type(exc).__name__, exc) if exc is not None
                    else "its loop ended"))
                continue
            sock = getattr(service, "socket", None)
            if isinstance(sock, zmq.Socket):
                if sock.closed:
                    problems.append("service %s: its ZeroMQ socket is closed" % name)
            elif sock is None and name in CORE_SOCKETS and hasattr(service, "socket"):
                problems.append("service %s: it has no ZeroMQ socket" % name)
        context = master.context
        if context is None or context.closed:
            problems.append("ZeroMQ: the %s's context is closed" % (
                "API process" if getattr(master, "role", None) == "api" else "master"))
        return problems

    def _storage(self, master):
        """(problem or None, seconds the probe took or None); probed at most once per
        ``probe_every`` (concurrent requests share one probe)."""
        cached = self._probe
        if cached is not None and time.monotonic() - cached[0] < self.probe_every:
            return cached[1], cached[2]
        with self._probing:
            cached = self._probe
            if cached is not None and time.monotonic() - cached[0] < self.probe_every:
                return cached[1], cached[2]
            started = time.monotonic()
            problem = self._probe_storage(master)
            done = time.monotonic()
            self._probe = (done, problem, done - started)
            return problem, done - started

    def _probe_storage(self, master):
        storage = master.storage
        if storage is None:
            return "storage: not open"
        try:
            with gevent.Timeout(self.storage_timeout, _Late):
                storage._one("SELECT version FROM schema_version")
        except _Late:
            return "storage: no answer within %g s" % self.storage_timeout
        except StorageError as exc:
            return "storage: %s" % exc
        except Exception as exc:  # the driver's own refusal: still the storage's fault
            return "storage: %s: %s" % (type(exc).__name__, exc)
        return None

    def _log(self, problems):
        """One line when the answer changes (what is wrong, not by how much)."""
        said = tuple(problem.split(":", 1)[0] for problem in problems)
        if said == self._said:
            return
        if problems:
            log.warning("health: 503: %s", "; ".join(problems))
        elif self._said:
            log.warning("health: ok again")
        self._said = said


def _one_line(text, limit=300):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


_HEALTH = weakref.WeakKeyDictionary()


def health(master):
    """The :class:`Health` of ``master``, made on first use."""
    checks = _HEALTH.get(master)
    if checks is None:
        checks = _HEALTH[master] = Health(master)
    return checks


# -- small answers ------------------------------------------------------------------------

def _has_body(environ):
    length = (environ.get("CONTENT_LENGTH") or "").strip()
    if length and length != "0":
        return True
    return "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()


def _text(status, text, note, extra=()):
    return (status, [("Content-Type", "text/plain; charset=utf-8")] + list(extra),
            text.encode("utf-8"), note)
