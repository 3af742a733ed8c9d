"""The web pages: what a LAVA user finds at scheduler/alljobs, scheduler/job/N,
scheduler/device/NAME, scheduler/allworkers and the queue, on the master's HTTP service.

    /                     overview            /jobs        the job list (filters, pages)
    /jobs/ID              a job, its results and its log (followed live while it runs)
    /jobs/ID/log?start=N  JSON: log lines from N on (what the page's script polls)
    /jobs/ID/cancel       POST, with the CSRF token
    /devices  /devices/NAME  /workers  /workers/NAME  /queue
    /login  /logout       a session from a user name and API token
    /static/NAME          the CSS and the one script
    /scheduler/...        LAVA's addresses, redirected to the ones above

What a visitor may see is decided by the same code as for the API (api/jobs.py,
devices.py, workers.py and the Policy of lavacore/permissions.py): a page shows what an
API call of the same user would answer, and a job the visitor may not see is "not found",
as in the API.
"""

import json
import logging
import os
import re
import time
import urllib.parse

from .. import present, tokens
from ..api import devices, jobs, validate, workers
from ..api.auth import Caller, request_host
from ..api.errors import FORBIDDEN, ApiError, bad_request
from ..states import DeviceHealth, DeviceState, JobHealth, JobState, WorkerHealth, WorkerState
from ..storage import StorageError
from . import render, session
from .logview import LEVEL_CHOICES as LOG_LEVELS
from .logview import LogView

log = logging.getLogger("lavacore.web")

PAGE_SIZE = 50
MAX_PAGE = 200
COUNT_CAP = 2000         # the job list counts this far, then says "more than"
LOG_WINDOW = 500         # log lines on a job page
FOLLOW_LINES = 1000      # log lines per poll of the page's script
FOLLOW_BYTES = 2 << 20
MAX_RESULTS = 1000       # test cases on a job page (all of them: REST's results/)
RECENT = 20
QUEUE_PREVIEW = 10
MAX_FORM = 16 * 1024
ACTIVE_STATES = (JobState.SCHEDULING, JobState.SCHEDULED, JobState.RUNNING, JobState.CANCELING)
HTML = "text/html; charset=utf-8"

ROUTES = []


def route(methods, pattern):
    def register(fn):
        ROUTES.append((tuple(methods.split()), re.compile("^%s$" % pattern), fn))
        return fn
    return register


_JOB = r"(?P<ident>\d{1,18}(?:\.\d{1,6})?)"
_NAME = r"(?P<name>[^/]{1,200})"

# LAVA's addresses of the same pages -> ours.
LAVA_PATHS = [
    (re.compile(r"^/scheduler/?$"), lambda m: "/"),
    (re.compile(r"^/scheduler/(?:alljobs|jobs)$"), lambda m: "/jobs"),
    (re.compile(r"^/scheduler/job/%s$" % _JOB), lambda m: render.job_url(m["ident"])),
    (re.compile(r"^/scheduler/alldevices$"), lambda m: "/devices"),
    (re.compile(r"^/scheduler/device/%s$" % _NAME), lambda m: render.device_url(m["name"])),
    (re.compile(r"^/scheduler/allworkers$"), lambda m: "/workers"),
    (re.compile(r"^/scheduler/worker/%s$" % _NAME), lambda m: render.worker_url(m["name"])),
    (re.compile(r"^/scheduler/job/%s/log_file/plain$" % _JOB),
     lambda m: render.job_url(m["ident"], "/output.yaml")),
    (re.compile(r"^/scheduler/queue$"), lambda m: "/queue"),
    (re.compile(r"^/accounts/login/?$"), lambda m: "/login"),
]


def wants_html(environ):
    return "text/html" in environ.get("HTTP_ACCEPT", "")


# What stays as it is in an address put in a Location header: the characters with a
# meaning in URLs, and "%" (escapes already there). Anything else (non-ASCII, controls,
# spaces, quotes) is percent-encoded from its UTF-8 bytes.
URL_SAFE = "!#$%&'()*+,/:;=?@[]~"


def header_url(url):
    """``url`` as an HTTP header may carry it: ASCII only (a header is latin-1 on the
    wire, and a browser reads non-ASCII bytes there as it pleases)."""
    return urllib.parse.quote(url, safe=URL_SAFE)


def origin_of(url):
    """``scheme://host[:port]`` of an http(s) address as a browser's Origin header
    gives it (host in lower case, default port left out), or None."""
    try:
        parts = urllib.parse.urlsplit(str(url).strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in ("http", "https") or not host:
        return None
    if ":" in host:
        host = "[%s]" % host
    if port is not None and port != {"http": 80, "https": 443}[scheme]:
        host = "%s:%d" % (host, port)
    return "%s://%s" % (scheme, host)


class Redirect(Exception):
    def __init__(self, location, status="303 See Other"):
        super().__init__(location)
        self.location = location
        self.status = status


class Request:
    """One page request: who asks (from the session cookie, or an Authorization header
    as for the API), the query, cookies to set, and the CSRF token of its forms."""

    def __init__(self, pages, environ, method, path):
        from ..api.app import _query

        self.pages = pages
        self.app = pages.app
        self.master = pages.app.master
        self.storage = self.master.storage
        self.environ = environ
        self.method = method
        self.path = path
        self.now = self.master.clock.time()
        self.cookies = session.parse_cookies(environ.get("HTTP_COOKIE"))
        self.headers = []
        self.query = _query(environ)
        self.caller = self._caller()
        self.user = self.caller.user
        self.policy = self.caller.policy

    @property
    def secure(self):
        """Are cookies to be Secure (sent over TLS only)? When the master serves TLS
        itself, or when ``[api] public_url`` is an https address (a reverse proxy ends
        TLS in front of it). Never from X-Forwarded-Proto: anyone can send that."""
        return self.environ.get("wsgi.url_scheme") == "https" or self.pages.secure_cookies

    def _caller(self):
        sessions = self.pages.sessions
        if self.environ.get("HTTP_AUTHORIZATION"):
            return self.app.caller(self.environ)  # 401 for wrong credentials, as the API
        values = self.cookies.get(session.SESSION_COOKIE, [])
        user = sessions.user(values, self.now) if values else None
        if values and user is None:
            self.headers.append(("Set-Cookie", session.cookie(session.SESSION_COOKIE, "", 0,
                                                              self.secure)))
        return Caller(self.master, user, request_host(self.environ), self.app.log_reader)

    def arg(self, name, default=None):
        """A query parameter; an empty one (a form's "any") counts as absent."""
        value = self.query.get(name)
        return default if value in (None, "") else value

    # -- CSRF -------------------------------------------------------------------------------

    def csrf(self):
        """The token this page's forms carry (setting the CSRF cookie if it is not there)."""
        sessions = self.pages.sessions
        seed = sessions.csrf_seed(self.cookies.get(session.CSRF_COOKIE, []))
        if seed is None:
            seed = sessions.new_csrf_seed()
            self.cookies[session.CSRF_COOKIE] = [seed]
            self.headers.append(("Set-Cookie", session.cookie(
                session.CSRF_COOKIE, seed, session.CSRF_AGE, self.secure)))
        return sessions.csrf_token(seed)

    def form(self):
        """The fields of a POSTed form, once its origin and CSRF token are checked."""
        kind = (self.environ.get("CONTENT_TYPE") or "").split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            raise bad_request("a form (application/x-www-form-urlencoded) is expected")
        length = self.environ.get("CONTENT_LENGTH") or ""
        if length.isdigit() and int(length) > MAX_FORM:
            raise ApiError(413, "form too large (at most %d bytes)" % MAX_FORM)
        body = self.app.body(self.environ)
        if len(body) > MAX_FORM:
            raise ApiError(413, "form too large (at most %d bytes)" % MAX_FORM)
        try:
            fields = dict(urllib.parse.parse_qsl(body.decode("utf-8"), max_num_fields=20))
        except (UnicodeDecodeError, ValueError) as exc:
            raise bad_request("invalid form: %s" % exc) from None
        self._same_origin()
        sessions = self.pages.sessions
        seed = sessions.csrf_seed(self.cookies.get(session.CSRF_COOKIE, []))
        if not sessions.csrf_ok(seed, fields.get("csrf")):
            raise ApiError(FORBIDDEN, "The form expired or did not come from this site"
                                      " (CSRF check failed): reload the page and try again.")
        return fields

    def _same_origin(self):
        """A form's ``Origin``, when the browser sends one, must be this site: the
        address of ``[api] public_url`` (what people reach through a reverse proxy, which
        may not pass the Host it was asked for), or the one the request was sent to
        (its Host, whatever the scheme: a proxy that keeps Host may end TLS). The
        X-Forwarded-* headers are not looked at: anyone can send them."""
        origin = self.environ.get("HTTP_ORIGIN")
        if not origin:
            return
        public = self.pages.public_origin
        if public is not None and origin_of(origin) == public:
            return
        host = self.environ.get("HTTP_HOST", "").strip().lower()
        try:
            netloc = urllib.parse.urlsplit(origin.strip()).netloc.lower()
        except ValueError:
            netloc = ""
        if not host or netloc != host:
            raise ApiError(FORBIDDEN, "This form came from another site (%s): refused."
                           % origin[:100])

    # -- answers ----------------------------------------------------------------------------

    def page(self, template, status="200 OK", **context):
        context.setdefault("title", "")
        body = self.pages.renderer.page(
            template, user=self.user, csrf=self.csrf(), path=self.path, now=self.now,
            login_url=render.query_url("/login", next=self.here()), **context)
        return status, [("Content-Type", HTML)] + self.headers, body

    def here(self):
        """This page's address, to come back to (after logging in): ASCII, as sent
        or with what the client sent raw (UTF-8 bytes in the query) percent-encoded."""
        query = self.environ.get("QUERY_STRING", "")
        if query:
            query = urllib.parse.quote(query.encode("latin-1", "replace"), safe=URL_SAFE)
        return urllib.parse.quote(self.path) + ("?" + query if query else "")


class Pages:
    """The pages of one Application (api/app.py), which gives them its master, its
    body reader, its throttle of failed logins and its log reader."""

    def __init__(self, app):
        self.app = app
        self.renderer = render.Renderer()
        self.sessions = session.Sessions(app.master.storage)
        self.logs = LogView()
        # [api] public_url: where people reach the pages through a reverse proxy.
        public_url = getattr(app.master.config.api, "public_url", "") or ""
        self.public_origin = origin_of(public_url) if public_url else None
        self.secure_cookies = bool(self.public_origin) and \
            self.public_origin.startswith("https://")

    def respond(self, environ, method, path):
        """(status, headers, body, note) of a page, a static file, a redirect or an
        error page, with the time it took in a Server-Timing header (which browsers show
        in their developer tools and navigation timings)."""
        started = time.perf_counter()
        status, headers, body, note = self._respond(environ, method, path)
        return status, list(headers) + [("Server-Timing", "page;dur=%.1f" % (
            (time.perf_counter() - started) * 1000))], body, note

    def _respond(self, environ, method, path):
        try:
            path = path.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return self._error(environ, ApiError(404, "no such page"), path)
        if path.startswith("/static/"):
            return self._static(method, path[len("/static/"):])
        for pattern, target in LAVA_PATHS:
            found = pattern.match(path)
            if found:
                query = environ.get("QUERY_STRING", "")
                location = target(found)
                try:
                    pairs = urllib.parse.parse_qsl(query[:4096], max_num_fields=50)
                except ValueError:
                    pairs = []  # not worth keeping: the page without it
                if pairs:
                    location += "?" + urllib.parse.urlencode(pairs)
                return ("301 Moved Permanently", [("Location", header_url(location))] +
                        render.SECURITY_HEADERS, b"", "redirect")
        handler, arguments = self._match(method, path)
        if handler is None:
            return self._error(environ, arguments, path)
        request = None
        try:
            request = Request(self, environ, "GET" if method == "HEAD" else method, path)
            status, headers, body = handler(request, **arguments)
        except Redirect as exc:
            status, headers, body = exc.status, [("Location", header_url(exc.location))] \
                + request.headers, b""
        except ApiError as exc:
            return self._error(environ, exc, path, request)
        except StorageError as exc:
            log.error("page %s: storage: %s", path[:200], exc)
            return self._error(environ, ApiError(503, "storage unavailable: %s" % exc),
                               path, request)
        return status, headers + render.SECURITY_HEADERS + [
            ("Cache-Control", "no-store")], body, request.user or "-"

    def _match(self, method, path):
        allowed = set()
        for methods, pattern, fn in ROUTES:
            found = pattern.match(path)
            if found:
                if method in methods or (method == "HEAD" and "GET" in methods):
                    return fn, found.groupdict()
                allowed.update(methods)
        if "GET" in allowed:
            allowed.add("HEAD")  # answered as GET without the body
        if allowed:
            return None, ApiError(405, "method %s not allowed here (allowed: %s)"
                                  % (method[:20], ", ".join(sorted(allowed))), status=405)
        return None, ApiError(404, "no such resource: %s" % path[:200])

    def _static(self, method, name):
        found = self.renderer.static.files.get(name)
        if found is None:
            return ("404 Not Found", [("Content-Type", "text/plain")] +
                    render.SECURITY_HEADERS, b"no such file\n", "404")
        if method not in ("GET", "HEAD"):
            return ("405 Method Not Allowed", [("Content-Type", "text/plain"),
                                               ("Allow", "GET, HEAD")] +
                    render.SECURITY_HEADERS, b"GET and HEAD only\n", "405")
        data, kind, _ = found
        return ("200 OK", [("Content-Type", kind), ("Cache-Control", "public, max-age=86400")]
                + render.SECURITY_HEADERS, data, "static")

    def _error(self, environ, exc, path, request=None):
        """An error as a page for a browser, as JSON for anything else (as before there
        were pages). ``request``: the page's, when it got that far (its cookies are set,
        its user shown)."""
        status = "%d %s" % (exc.status, _REASONS.get(exc.status, "Error"))
        headers = [("Allow", exc.message.rpartition("allowed: ")[2].rstrip(")"))] \
            if exc.status == 405 else []
        if not wants_html(environ):
            body = (json.dumps({"error": exc.message, "code": exc.code}) + "\n").encode()
            return status, [("Content-Type", "application/json")] + headers + \
                render.SECURITY_HEADERS, body, str(exc.status)
        if request is not None:
            status, page_headers, body = request.page(
                "error.html", status=status, title=_REASONS.get(exc.status, "Error"),
                code=exc.status, message=exc.message)
            headers += page_headers
        else:
            body = self.renderer.page("error.html", title=_REASONS.get(exc.status, "Error"),
                                      code=exc.status, message=exc.message, user=None,
                                      csrf="", path=path, now=0,
                                      login_url=render.query_url("/login", next=path))
            headers.append(("Content-Type", HTML))
        return status, headers + render.SECURITY_HEADERS + [("Cache-Control", "no-store")], \
            body, str(exc.status)


_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
            429: "Too Many Requests", 500: "Internal Server Error",
            503: "Service Unavailable"}


def _state_arg(request, enum, name):
    return validate.state(enum, request.arg(name), name)


def _name_arg(request, name):
    return validate.optional_name(request.arg(name), name)


def _int_arg(request, name, default=None, minimum=0, maximum=None):
    return validate.integer(request.arg(name), name, default=default, minimum=minimum,
                            maximum=maximum)


def _visible_types(request):
    return [t.name for t in request.storage.list_device_types()
            if request.policy.can_view_type(t.name)]


def _job_rows(jobs_found, now):
    return [{"job": job, "duration": present.duration(job, now)} for job in jobs_found]


# -- overview -------------------------------------------------------------------------------

@route("GET", "/")
def overview(request):
    storage, visible = request.storage, request.policy.job_filter()
    found = devices.listing(request.caller)
    by_health = {h.display: 0 for h in DeviceHealth if h != DeviceHealth.RETIRED}
    for device in found:
        by_health[device.health.display] = by_health.get(device.health.display, 0) + 1
    all_workers = workers.listing(request.master)
    online = sum(1 for w in all_workers if w.state == WorkerState.ONLINE)
    return request.page(
        "index.html", title="Overview",
        active=storage.count_jobs_upto(COUNT_CAP + 1, visible, state=list(ACTIVE_STATES)),
        queued=storage.count_jobs_upto(COUNT_CAP + 1, visible, state=JobState.SUBMITTED),
        cap=COUNT_CAP, devices=len(found), by_health=by_health,
        busy=sum(1 for d in found if d.state != DeviceState.IDLE),
        workers=len(all_workers), online=online,
        recent=_job_rows(storage.list_job_summaries(10, visible=visible), request.now))


# -- jobs -------------------------------------------------------------------------------

@route("GET", "/jobs")
def jobs_list(request):
    filters = {"state": _state_arg(request, JobState, "state"),
               "health": _state_arg(request, JobHealth, "health"),
               "device_type": _name_arg(request, "device_type"),
               "device": _name_arg(request, "device"),
               "worker": _name_arg(request, "worker"),
               "submitter": validate.text(request.arg("submitter"), "submitter",
                                          optional=True, limit=255)}
    limit = _int_arg(request, "limit", PAGE_SIZE, 1, MAX_PAGE)
    before = _int_arg(request, "before")
    after = _int_arg(request, "after")
    if before is not None and after is not None:
        raise bad_request("before and after: one or the other")
    criteria = {"state": filters["state"], "health": filters["health"],
                "requested_device_type": filters["device_type"],
                "actual_device": filters["device"], "worker": filters["worker"],
                "submitter": filters["submitter"]}
    criteria = {k: v for k, v in criteria.items() if v is not None}
    storage, visible = request.storage, request.policy.job_filter()
    found = storage.list_job_summaries(limit + 1, before=before, after=after,
                                       visible=visible, **criteria)
    newer = older = False
    if after is not None:
        newer, found = len(found) > limit, found[-limit:]
        older = bool(found) and bool(storage.list_job_summaries(
            1, before=found[-1].id, visible=visible, **criteria))
    else:
        older, found = len(found) > limit, found[:limit]
        newer = before is not None and bool(found) and bool(storage.list_job_summaries(
            1, after=found[0].id, visible=visible, **criteria))
    shown = {key: (value.display if hasattr(value, "display") else value)
             for key, value in filters.items()}
    shown["limit"] = limit if limit != PAGE_SIZE else None

    def link(**where):
        return render.query_url("/jobs", **dict(shown, **where))

    return request.page(
        "jobs.html", title="Jobs", rows=_job_rows(found, request.now), filters=shown,
        total=storage.count_jobs_upto(COUNT_CAP + 1, visible, **criteria), cap=COUNT_CAP,
        states=[s.display for s in JobState], healths=[h.display for h in JobHealth],
        types=_visible_types(request),
        newest=link() if (newer or before is not None) else None,
        newer=link(after=found[0].id) if newer and found else None,
        older=link(before=found[-1].id) if older and found else None,
        oldest=link(after=0) if older else None)


def _log_path(request, job):
    return os.path.join(job.output_dir(request.master.output_root), "output.yaml")


@route("GET", "/jobs/%s" % _JOB)
def job_page(request, ident):
    job = jobs.find(request.caller, ident)
    storage = request.storage
    details = present.job_details(storage, job)
    cases = storage.list_testcases_page(job.id, MAX_RESULTS + 1)
    results = []
    for case in cases[:MAX_RESULTS]:
        metadata = case.parsed_metadata()
        reference = metadata.get("reference")
        results.append({"case": case, "metadata": metadata, "reference": reference,
                        "reference_text": _reference_text(reference)})
    path = _log_path(request, job)
    total = request.pages.logs.count(path)
    start = _int_arg(request, "log_start")
    tail = start is None
    if tail:
        start = max(0, total - LOG_WINDOW)
    lines, total = request.pages.logs.read(path, start, LOG_WINDOW)
    end = start + len(lines)

    def window(at):
        return render.query_url(render.job_url(ident), log_start=at) + "#log"

    can_cancel = request.user is not None and job.state not in (
        JobState.FINISHED, JobState.CANCELING) and request.policy.can_cancel_job(job)
    return request.page(
        "job.html", title="Job %s" % (job.sub_id or job.id), job=job, details=details,
        ident=ident, results=results, more_results=len(cases) > MAX_RESULTS,
        duration=present.duration(job, request.now), lines=lines, log_start=start,
        log_end=end, log_total=total,
        following=job.state != JobState.FINISHED and end >= total,
        log_first=window(0) if start > 0 else None,
        log_previous=window(max(0, start - LOG_WINDOW)) if start > 0 else None,
        log_next=window(end) if end < total else None,
        log_last=render.job_url(ident) + "#log" if end < total else None,
        definition=jobs.definition(job), can_cancel=can_cancel,
        log_url=render.job_url(ident, "/log"), levels=LOG_LEVELS,
        log_file_url=render.job_url(ident, "/output.yaml"), finished=job.state == JobState.FINISHED)


def _reference_text(value):
    """A result's reference as the page shows it: a text as it is, anything else (a
    mapping, a list, a number) as JSON; None when there is none."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


@route("GET", "/jobs/%s/log" % _JOB)
def job_log(request, ident):
    """New lines for the page's follow script: JSON, the lines from ``start`` on."""
    job = jobs.find(request.caller, ident)
    start = _int_arg(request, "start", 0)
    lines, total = request.pages.logs.read(_log_path(request, job), start, FOLLOW_LINES,
                                           FOLLOW_BYTES)
    end = start + len(lines)
    body = json.dumps({"state": job.state.display, "health": job.health.display,
                       "finished": job.state == JobState.FINISHED and end >= total,
                       "start": start, "next": end, "total": total,
                       "lines": lines}, ensure_ascii=False).encode("utf-8")
    return "200 OK", [("Content-Type", "application/json")] + request.headers, body


@route("GET", "/jobs/%s/output.yaml" % _JOB)
def job_log_file(request, ident):
    """The job's whole log as the worker sent it (LAVA's output.yaml), streamed from the
    file: as much of it as was written when the request came."""
    job = jobs.find(request.caller, ident)
    try:
        body = FileBody(open(_log_path(request, job), "rb"))
    except FileNotFoundError:
        body = b""  # no line yet: queued, or ended without starting
    except OSError as exc:
        raise ApiError(503, "the log of job %s cannot be read: %s" % (ident, exc.strerror))
    name = "job-%s-output.yaml" % ident
    return "200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                      ("Content-Disposition", 'attachment; filename="%s"' % name)
                      ] + request.headers, body


class FileBody:
    """A response body read from an open file in chunks as it is sent (app.py hands it
    to the WSGI server as the iterable): the file's first ``len()`` bytes, its size when
    opened, so a log still growing is sent as it was."""

    CHUNK = 256 * 1024

    def __init__(self, handle):
        self.handle = handle
        self.size = os.fstat(handle.fileno()).st_size

    def __len__(self):
        return self.size

    def __iter__(self):
        left = self.size
        try:
            while left > 0:
                chunk = self.handle.read(min(self.CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk
        finally:
            self.close()

    def close(self):
        self.handle.close()


@route("POST", "/jobs/%s/cancel" % _JOB)
def job_cancel(request, ident):
    request.form()
    jobs.cancel(request.caller, ident)
    raise Redirect(render.job_url(ident))


# -- devices ------------------------------------------------------------------------------

@route("GET", "/devices")
def devices_list(request):
    show_all = validate.flag(request.arg("all"), "all", default=False)
    filters = {"device_type": _name_arg(request, "device_type"),
               "worker": _name_arg(request, "worker"),
               "state": _state_arg(request, DeviceState, "state"),
               "health": _state_arg(request, DeviceHealth, "health")}
    found = devices.listing(request.caller, show_all or filters["health"] ==
                            DeviceHealth.RETIRED, **filters)
    shown = {key: (value.display if hasattr(value, "display") else value)
             for key, value in filters.items()}
    return request.page("devices.html", title="Devices", devices=found, filters=shown,
                        show_all=show_all, types=_visible_types(request),
                        states=[s.display for s in DeviceState],
                        healths=[h.display for h in DeviceHealth])


@route("GET", "/devices/%s" % _NAME)
def device_page(request, name):
    device = devices.find(request.caller, name)
    details = present.device_details(request.storage, device, history=50)
    dictionary, problem = None, None
    try:
        dictionary = devices.get_dictionary(request.caller, device.hostname)
    except ApiError as exc:
        problem = exc.message
    recent = request.storage.list_job_summaries(
        RECENT, visible=request.policy.job_filter(), actual_device=device.hostname)
    return request.page("device.html", title=device.hostname, device=device,
                        details=details, dictionary=dictionary, problem=problem,
                        recent=_job_rows(recent, request.now))


# -- workers ------------------------------------------------------------------------------

@route("GET", "/workers")
def workers_list(request):
    show_all = validate.flag(request.arg("all"), "all", default=False)
    found = workers.listing(request.master, show_all,
                            state=_state_arg(request, WorkerState, "state"),
                            health=_state_arg(request, WorkerHealth, "health"))
    counts = {}
    for device in devices.listing(request.caller, show_all=True):
        counts[device.worker] = counts.get(device.worker, 0) + 1
    return request.page("workers.html", title="Workers", workers=found, counts=counts,
                        show_all=show_all)


@route("GET", "/workers/%s" % _NAME)
def worker_page(request, name):
    worker = workers.find(request.master, name)
    details = present.worker_details(request.storage, worker, request.policy, history=50)
    found = [d for d in request.storage.list_devices(worker=worker.hostname)
             if request.policy.can_view_device(d)]
    return request.page("worker.html", title=worker.hostname, worker=worker,
                        details=details, devices=found)


# -- the queue ------------------------------------------------------------------------------

@route("GET", "/queue")
def queue(request):
    storage, visible = request.storage, request.policy.job_filter()
    counts = storage.count_queued_by_type(visible)
    by_type = {}
    for device in devices.listing(request.caller):
        entry = by_type.setdefault(device.device_type, {"devices": 0, "idle": 0})
        entry["devices"] += 1
        if device.state == DeviceState.IDLE and device.health in (
                DeviceHealth.GOOD, DeviceHealth.UNKNOWN):
            entry["idle"] += 1
    chosen = _name_arg(request, "device_type")
    offset = _int_arg(request, "offset", 0)
    types = []
    names = [chosen] if chosen else sorted(counts)
    for name in names:
        count = counts.get(name, 0)
        size = PAGE_SIZE if chosen else QUEUE_PREVIEW
        queued = storage.queued_job_summaries(name, size, offset if chosen else 0,
                                              visible) if count else []
        types.append({"name": name, "count": count, "jobs": queued,
                      "devices": by_type.get(name, {}).get("devices", 0),
                      "idle": by_type.get(name, {}).get("idle", 0),
                      "more": count > (offset if chosen else 0) + len(queued)})
    return request.page(
        "queue.html", title="Queue", types=types, chosen=chosen, offset=offset,
        total=sum(counts.values()), page_size=PAGE_SIZE,
        next_page=render.query_url("/queue", device_type=chosen, offset=offset + PAGE_SIZE)
        if chosen and types and types[0]["more"] else None,
        previous_page=render.query_url("/queue", device_type=chosen,
                                       offset=max(0, offset - PAGE_SIZE) or None)
        if chosen and offset else None)


# -- login --------------------------------------------------------------------------------

def _next(value):
    """Where to go after logging in: a path of this site, never another site."""
    if not isinstance(value, str) or not value.startswith("/") or value.startswith("//") \
            or "\\" in value or any(ord(c) < 0x20 for c in value) or len(value) > 2000:
        return "/"
    return value


@route("GET POST", "/login")
def login(request):
    problem = None
    target = _next(request.arg("next", "/"))
    username = ""
    if request.method == "POST":
        fields = request.form()
        target = _next(fields.get("next", "/"))
        username = fields.get("username", "").strip()[:150]
        token = fields.get("token", "").strip()
        address = request.environ.get("REMOTE_ADDR", "")
        wait = request.app.throttle.retry_after(address)
        if wait:
            # As the API answers credentials from an address that failed too often.
            problem = "Too many failed logins from your address: try again in %d s." % wait
            request.headers.append(("Retry-After", str(wait)))
            return request.page("login.html", title="Log in", problem=problem, next=target,
                                username=username, status="429 Too Many Requests")
        else:
            user = tokens.authenticate(request.storage, username, token, request.now) \
                if username and token else None
            if user is None:
                request.app.auth_failed(request.environ)
                problem = "Login failed: invalid user name or token."
            else:
                record = request.storage.token_record(tokens.digest(token))
                value, age = request.pages.sessions.issue(user, record[0], request.now,
                                                          record[2])
                request.headers.append(("Set-Cookie", session.cookie(
                    session.SESSION_COOKIE, value, age, request.secure)))
                try:
                    request.storage.update_user(user, last_login=request.now)
                except (StorageError, KeyError):
                    pass
                log.info("web: %s logged in from %s", user, address)
                raise Redirect(target)
    return request.page("login.html", title="Log in", problem=problem, next=target,
                        username=username, status="200 OK" if problem is None
                        else "401 Unauthorized")


@route("POST", "/logout")
def logout(request):
    request.form()
    if request.user is not None:
        request.pages.sessions.logout(request.user, request.now)
    request.headers.append(("Set-Cookie", session.cookie(session.SESSION_COOKIE, "", 0,
                                                         request.secure)))
    raise Redirect("/")
