"""REST/JSON at /api/v1/: the same operations as /RPC2, for scripts.

    GET    jobs/?state=&health=&device_type=&device=&worker=&submitter=&ordering=&limit=&offset=
    POST   jobs/                       {"definition": YAML} or the YAML itself -> 201 {"job_ids"}
    POST   jobs/validate/              -> {"valid", "path", "msg"}
    GET    jobs/ID/                    details with result counts
    POST   jobs/ID/cancel/   jobs/ID/resubmit/
    GET    jobs/ID/logs/?start=&end=   {"finished", "start", "end", "logs": [entries]}
    GET    jobs/ID/definition/  jobs/ID/results/  jobs/ID/configuration/
    GET    devices/?state=&health=&device_type=&worker=&all=&limit=&offset=   POST devices/
    GET    devices/NAME/     PATCH devices/NAME/ {"health", "worker", "device_type", ...}
    GET|PUT|DELETE devices/NAME/dictionary/          (text; GET ?render=true&context=YAML)
    GET    workers/ ...      POST workers/    GET|PATCH workers/NAME/
    GET|PUT|DELETE workers/NAME/config/ env/ env-dut/ certificate/
    GET    device-types/     POST device-types/   GET|PATCH device-types/NAME/
    GET|PUT|DELETE device-types/NAME/template/ health-check/

Lists are pages: ``{"count", "next", "previous", "results"}``. Errors are
``{"error": message, "code": LAVA code}`` with the matching HTTP status.
"""

import re
import urllib.parse

from .. import models, present, safeyaml
from ..states import DeviceHealth, DeviceState, JobHealth, JobState, WorkerHealth, WorkerState
from . import device_types, devices, jobs, validate, workers
from .errors import ApiError, bad_request
from .xmlrpc import VERSION

PREFIX = "/api/v1/"
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
JOB_ORDERS = ("id", "-id", "submit_time", "-submit_time", "end_time", "-end_time")

ROUTES = []


class Text:
    """A plain-text answer (a definition, a template, a dictionary)."""

    def __init__(self, text, content_type="text/plain; charset=utf-8"):
        self.text = text
        self.content_type = content_type


def route(methods, pattern):
    def register(fn):
        ROUTES.append((tuple(methods.split()), re.compile("^%s$" % pattern), fn))
        return fn
    return register


class Request:
    """What a handler sees: the caller, the HTTP method, the query and the body."""

    def __init__(self, caller, method, path, query, read_body, content_type, base):
        self.caller = caller
        self.master = caller.master
        self.method = method
        self.path = path
        self.query = query
        self._read_body = read_body
        self.content_type = (content_type or "").split(";")[0].strip().lower()
        self.base = base

    def arg(self, name, default=None):
        return self.query.get(name, default)

    def only(self, *names):
        unknown = sorted(set(self.query) - set(names))
        if unknown:
            raise bad_request("unknown query parameter %s (known: %s)"
                              % (unknown[0][:50], ", ".join(names) or "none"))

    def text(self):
        return validate.text(self._read_body(), "request body")

    def json(self, required=True):
        body = self._read_body()
        if not body.strip():
            if required:
                raise bad_request("a JSON object is expected in the request body")
            return {}
        try:
            data = safeyaml.json_loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad_request("request body: invalid JSON: %s" % exc) from None
        if not isinstance(data, dict):
            raise bad_request("request body: a JSON object is expected")
        return data


def _fields(data, allowed):
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise bad_request("unknown field %s (known: %s)" % (str(unknown[0])[:50],
                                                            ", ".join(allowed)))
    return data


def _paging(request):
    limit = validate.integer(request.arg("limit"), "limit", default=DEFAULT_LIMIT, minimum=0,
                             maximum=MAX_LIMIT)
    offset = validate.integer(request.arg("offset"), "offset", default=0, minimum=0)
    return limit, offset


def _page(request, total, results, limit, offset):
    def link(new_offset):
        query = dict(request.query, limit=str(limit), offset=str(new_offset))
        return "%s%s?%s" % (request.base, request.path, urllib.parse.urlencode(query))

    return {"count": total,
            "next": link(offset + limit) if offset + limit < total else None,
            "previous": link(max(0, offset - limit)) if offset > 0 else None,
            "results": results}


def _slice(request, items, render):
    limit, offset = _paging(request)
    return _page(request, len(items), [render(i) for i in items[offset:offset + limit]],
                 limit, offset)


# -- index --------------------------------------------------------------------------------

@route("GET", "")
def index(request):
    return 200, {"version": VERSION, "xmlrpc": "/RPC2",
                 "jobs": PREFIX + "jobs/", "devices": PREFIX + "devices/",
                 "workers": PREFIX + "workers/", "device-types": PREFIX + "device-types/"}


# -- jobs ---------------------------------------------------------------------------------

@route("GET", "jobs/")
def jobs_list(request):
    request.only("state", "health", "device_type", "device", "worker", "submitter",
                 "ordering", "limit", "offset")
    criteria = {"state": validate.state(JobState, request.arg("state"), "state"),
                "health": validate.state(JobHealth, request.arg("health"), "health"),
                "requested_device_type": validate.optional_name(request.arg("device_type"),
                                                                "device_type"),
                "actual_device": validate.optional_name(request.arg("device"), "device"),
                "worker": validate.optional_name(request.arg("worker"), "worker"),
                "submitter": validate.text(request.arg("submitter"), "submitter",
                                           optional=True, limit=255)}
    criteria = {k: v for k, v in criteria.items() if v is not None}
    criteria["visible"] = request.caller.policy.job_filter()
    order = request.arg("ordering", "-id")
    if order not in JOB_ORDERS:
        raise bad_request("ordering: one of %s" % ", ".join(JOB_ORDERS))
    limit, offset = _paging(request)
    storage = request.master.storage
    found = storage.list_jobs(limit=limit, offset=offset, order=order, **criteria)
    return 200, _page(request, storage.count_jobs(**criteria),
                      [job.to_dict() for job in found], limit, offset)


def _submitted(records):
    return 201, {"job_ids": [job.id for job in records],
                 "message": "job(s) successfully submitted"}


@route("POST", "jobs/")
def jobs_submit(request):
    if request.content_type == "application/json":
        definition = _fields(request.json(), ("definition",)).get("definition")
    else:
        definition = request.text()
    return _submitted(jobs.submit(request.caller, definition))


@route("POST", "jobs/validate/")
def jobs_validate(request):
    if request.content_type == "application/json":
        definition = _fields(request.json(), ("definition",)).get("definition")
    else:
        definition = request.text()
    problem = jobs.check(request.caller, definition)
    return 200, dict(problem, valid=not problem)


@route("GET", r"jobs/(?P<job>[^/]+)/")
def jobs_show(request, job):
    return 200, present.job_details(request.master.storage, jobs.find(request.caller, job))


@route("POST", r"jobs/(?P<job>[^/]+)/cancel/")
def jobs_cancel(request, job):
    canceled = jobs.cancel(request.caller, job)
    return 200, present.job_details(request.master.storage, canceled)


@route("POST", r"jobs/(?P<job>[^/]+)/resubmit/")
def jobs_resubmit(request, job):
    return _submitted(jobs.resubmit(request.caller, job))


@route("GET", r"jobs/(?P<job>[^/]+)/logs/")
def jobs_logs(request, job):
    request.only("start", "end")
    record = jobs.find(request.caller, job)
    start = validate.integer(request.arg("start"), "start", default=0, minimum=0)
    finished, entries = jobs.logs(request.master, request.caller.log_reader, record, start,
                                  request.arg("end"))
    return 200, {"job": record.id, "finished": finished, "start": start,
                 "end": start + len(entries), "logs": entries}


@route("GET", r"jobs/(?P<job>[^/]+)/definition/")
def jobs_definition(request, job):
    return 200, Text(jobs.definition(jobs.find(request.caller, job)),
                     "application/yaml; charset=utf-8")


@route("GET", r"jobs/(?P<job>[^/]+)/results/")
def jobs_results(request, job):
    record = jobs.find(request.caller, job)
    return 200, [case.to_dict() for case in jobs.results(request.master, record)]


@route("GET", r"jobs/(?P<job>[^/]+)/configuration/")
def jobs_configuration(request, job):
    texts = jobs.configuration(request.master, jobs.find(request.caller, job))
    return 200, dict(zip(("definition", "device", "dispatcher", "env", "env_dut"), texts))


# -- devices ------------------------------------------------------------------------------

def _device(master, device):
    return present.device_details(master.storage, device, history=20)


@route("GET", "devices/")
def devices_list(request):
    request.only("state", "health", "device_type", "worker", "all", "limit", "offset")
    found = devices.listing(
        request.caller, validate.flag(request.arg("all"), "all", default=False),
        state=validate.state(DeviceState, request.arg("state"), "state"),
        health=validate.state(DeviceHealth, request.arg("health"), "health"),
        device_type=validate.optional_name(request.arg("device_type"), "device_type"),
        worker=validate.optional_name(request.arg("worker"), "worker"))
    return 200, _slice(request, found, lambda d: d.to_dict())


@route("POST", "devices/")
def devices_add(request):
    data = _fields(request.json(), ("hostname", "device_type", "worker", "health",
                                    "description", "public", "tags"))
    device = devices.add(request.caller, data.get("hostname"), data.get("device_type"),
                         data.get("worker"), health=data.get("health"),
                         description=data.get("description"),
                         public=data.get("public", True), tags=data.get("tags") or ())
    return 201, _device(request.master, device)


def _audit(request, kind, name):
    """The object's audit trail, for staff and superusers (others: not shown)."""
    p = request.caller.principal
    if not (p.is_active and (p.is_staff or p.is_superuser)):
        return {}
    return {"audit": [dict(row, time=models.iso(row["time"])) for row in
                      request.master.storage.list_audit(kind=kind, name=name, limit=20)]}


@route("GET", r"devices/(?P<name>[^/]+)/")
def devices_show(request, name):
    device = devices.find(request.caller, name)
    return 200, dict(_device(request.master, device),
                     **_audit(request, "device", device.hostname))


@route("PATCH", r"devices/(?P<name>[^/]+)/")
def devices_update(request, name):
    data = _fields(request.json(), ("worker", "device_type", "description", "public",
                                    "health", "tags", "reason"))
    device = devices.update(request.caller, name, **data)
    return 200, _device(request.master, device)


@route("GET PUT DELETE", r"devices/(?P<name>[^/]+)/dictionary/")
def devices_dictionary(request, name):
    if request.method == "GET":
        request.only("render", "context")
        return 200, Text(devices.get_dictionary(request.caller, name, request.arg("render"),
                                                request.arg("context")))
    text = request.text() if request.method == "PUT" else ""
    devices.set_dictionary(request.caller, name, text)
    return 200, {"hostname": name, "stored": bool(text.strip())}


# -- workers ------------------------------------------------------------------------------

def _worker(request, worker):
    # Only the devices the caller may see are named.
    return present.worker_details(request.master.storage, worker, request.caller.policy,
                                  history=20)


@route("GET", "workers/")
def workers_list(request):
    request.only("state", "health", "all", "limit", "offset")
    found = workers.listing(
        request.master, validate.flag(request.arg("all"), "all", default=False),
        state=validate.state(WorkerState, request.arg("state"), "state"),
        health=validate.state(WorkerHealth, request.arg("health"), "health"))
    return 200, _slice(request, found, lambda w: w.to_dict())


@route("POST", "workers/")
def workers_add(request):
    data = _fields(request.json(), ("hostname", "description", "disabled"))
    worker = workers.add(request.caller, data.get("hostname"), data.get("description"),
                         data.get("disabled", False))
    return 201, _worker(request, worker)


@route("GET", r"workers/(?P<name>[^/]+)/")
def workers_show(request, name):
    worker = workers.find(request.master, name)
    return 200, dict(_worker(request, worker),
                     **_audit(request, "worker", worker.hostname))


@route("PATCH", r"workers/(?P<name>[^/]+)/")
def workers_update(request, name):
    data = _fields(request.json(), ("description", "health", "reason"))
    worker = workers.update(request.caller, name, data.get("description"), data.get("health"),
                            reason=data.get("reason"))
    return 200, _worker(request, worker)


@route("GET PUT DELETE", r"workers/(?P<name>[^/]+)/(?P<kind>config|env|env-dut)/")
def workers_file(request, name, kind):
    if request.method == "GET":
        return 200, Text(workers.get_file(request.caller, kind, name),
                         "application/yaml; charset=utf-8")
    text = request.text() if request.method == "PUT" else ""
    workers.set_file(request.caller, kind, name, text)
    return 200, {"hostname": name, "file": kind, "stored": bool(text.strip())}


@route("GET PUT", r"workers/(?P<name>[^/]+)/certificate/")
def workers_certificate(request, name):
    if request.method == "GET":
        return 200, Text(workers.get_certificate(request.master, name))
    workers.set_certificate(request.caller, name, request.text())
    return 200, {"hostname": name, "stored": True}


# -- device types -------------------------------------------------------------------------

def _device_type(master, record, count=None, template=None):
    data = record.to_dict()
    if count is None:
        count = len(master.storage.list_devices(device_type=record.name))
    data["devices"] = count
    data["template"] = device_types.has_template(master, record.name) if template is None \
        else template
    return data


@route("GET", "device-types/")
def device_types_list(request):
    request.only("all", "limit", "offset")
    rows = device_types.listing(request.caller,
                                validate.flag(request.arg("all"), "all", default=False))

    def render(row):
        name, record, count, template = row
        if record is None:
            return {"name": name, "installed": False, "devices": 0, "template": True}
        return dict(_device_type(request.master, record, count, template), installed=True)

    return 200, _slice(request, rows, render)


@route("POST", "device-types/")
def device_types_add(request):
    data = _fields(request.json(), ("name", "description", "display", "health_frequency",
                                    "health_denominator", "health_disabled"))
    record = device_types.add(request.caller, data.get("name"), data.get("description"),
                              data.get("display", True), data.get("health_frequency", 24),
                              data.get("health_denominator", "hours"),
                              data.get("health_disabled", False))
    return 201, _device_type(request.master, record)


@route("GET", r"device-types/(?P<name>[^/]+)/")
def device_types_show(request, name):
    record = device_types.find(request.caller, name)
    return 200, dict(_device_type(request.master, record),
                     **_audit(request, "devicetype", record.name))


@route("PATCH", r"device-types/(?P<name>[^/]+)/")
def device_types_update(request, name):
    data = _fields(request.json(), ("description", "display", "health_frequency",
                                    "health_denominator", "health_disabled"))
    record = device_types.update(request.caller, name, **data)
    return 200, _device_type(request.master, record)


@route("GET PUT DELETE", r"device-types/(?P<name>[^/]+)/(?P<kind>template|health-check)/")
def device_types_file(request, name, kind):
    if request.method == "GET":
        if kind == "template":
            return 200, Text(device_types.get_template(request.caller, name))
        return 200, Text(device_types.get_health_check(request.caller, name),
                         "application/yaml; charset=utf-8")
    text = request.text() if request.method == "PUT" else ""
    if kind == "template":
        device_types.set_template(request.caller, name, text)
    else:
        device_types.set_health_check(request.caller, name, text)
    return 200, {"name": name, "file": kind, "stored": bool(text.strip())}


# -- dispatch -----------------------------------------------------------------------------

def match(method, path):
    """(handler, arguments) for a path under /api/v1/; ApiError 404/405 otherwise."""
    allowed = set()
    for methods, pattern, fn in ROUTES:
        found = pattern.match(path)
        if found:
            if method in methods:
                return fn, found.groupdict()
            allowed.update(methods)
    if allowed:
        raise ApiError(405, "method %s not allowed here (allowed: %s)"
                       % (method[:20], ", ".join(sorted(allowed))), status=405)
    raise ApiError(404, "no such resource: %s%s" % (PREFIX, path[:200]))


# The routes of users, groups, tokens, tags, aliases and the audit trail.
from . import rest_accounts  # noqa: E402,F401
