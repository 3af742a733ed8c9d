"""XML-RPC at /RPC2: LAVA's method names, arguments and return shapes, as lavacli 3.1
calls them, over the operations of lavacore.api.

The version we report (``LAVA_VERSION``) decides how lavacli talks to us: 2026.10 shows
every command lavacli 3.1 has (``users`` and ``groups`` appear from 2023.03, ``tokens``
from 2025.05) with its newest arguments, and from 2020.09 on lavacli takes ``events listen`` and ``jobs wait``
from the websocket at ``/ws/`` (lavacore.api.websocket) rather than the ZeroMQ publisher,
which older clients still get from ``scheduler.get_publisher_event_socket``. Methods
accept the shorter and longer argument lists lavacli versions send.

Every error is an XML-RPC fault with LAVA's code (404, 400, 401, 403, -32601 for an
unknown method, -32602 for bad arguments, -32700 for a body that is not XML-RPC), never
an HTTP error, which lavacli would retry.
"""

import datetime
import inspect
import logging
import xml.parsers.expat
import xmlrpc.client

import yaml

from .. import __version__
from .. import health as health_mod
from ..states import DeviceHealth, JobHealth, JobState
from . import device_types, devices, jobs, validate, workers
from .errors import (INTERNAL, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND,
                     PARSE_ERROR, ApiError, not_found)

log = logging.getLogger("lavacore.api")

LAVA_VERSION = "2026.10"
VERSION = "%s+lavacore.%s" % (LAVA_VERSION, __version__)
API_VERSION = 2
NEVER = datetime.datetime(1970, 1, 1)

METHODS = {}


def method(name):
    """Register ``fn(caller, *arguments)`` as the XML-RPC method ``name``."""
    def register(fn):
        fn.rpc_name = name
        fn.rpc_signature = inspect.signature(fn)
        METHODS[name] = fn
        return fn
    return register


def _dt(epoch):
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).replace(
        tzinfo=None, microsecond=0)


def _dt_text(epoch):
    """LAVA's ``str(datetime)`` form, used where it sends times as strings."""
    if epoch is None:
        return None
    return str(datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc))


def _binary(text):
    return xmlrpc.client.Binary(text.encode("utf-8"))


def _display_id(job):
    return job.sub_id or job.id


def _visibility(job):
    return {"public": "Public", "personal": "Personal"}.get(job.visibility, "Group")


# -- system -------------------------------------------------------------------------------

@method("system.version")
def system_version(caller):
    return VERSION


@method("system.api_version")
def system_api_version(caller):
    return API_VERSION


@method("system.whoami")
def system_whoami(caller):
    return caller.user


@method("system.listMethods")
def system_list_methods(caller):
    return sorted(METHODS)


@method("system.methodHelp")
def system_method_help(caller, name):
    fn = METHODS.get(name) if isinstance(name, str) else None
    if fn is None:
        raise not_found("No such method: %s" % (str(name)[:100],))
    return "%s%s\n\n%s" % (name, _arguments(fn), inspect.getdoc(fn) or "")


@method("system.methodSignature")
def system_method_signature(caller, name):
    if not isinstance(name, str) or name not in METHODS:
        raise not_found("No such method: %s" % (str(name)[:100],))
    return "undef"


@method("system.get_master_certificate")
def system_get_master_certificate(caller):
    """The master's CURVE public certificate (from ``[auth_curve] master_cert``), which a
    worker needs to connect when encryption is on."""
    from ..certs import CertError, read_key_file

    config = caller.master.config
    path = config.section("auth_curve").get("master_cert")
    if not path or not isinstance(path, str):
        raise not_found("The master has no certificate: encryption is not enabled.")
    try:
        public, _ = read_key_file(config.resolve(path))
    except CertError:
        raise not_found("The master's certificate cannot be read (see [auth_curve]"
                        " master_cert).") from None
    return "metadata\ncurve\n    public-key = \"%s\"\n" % public


# -- scheduler ----------------------------------------------------------------------------

@method("scheduler.get_publisher_event_socket")
def scheduler_get_publisher_event_socket(caller):
    """The event PUB socket, with a wildcard host replaced by the one the client used."""
    endpoint = caller.master.events.endpoint or ""
    scheme, sep, rest = endpoint.partition("://")
    host, colon, port = rest.rpartition(":")
    if sep and colon and caller.host and host in ("*", "0.0.0.0", "[::]", "::", ""):
        host = "[%s]" % caller.host if ":" in caller.host else caller.host
        return "%s://%s:%s" % (scheme, host, port)
    return endpoint


# -- scheduler.jobs -----------------------------------------------------------------------

@method("scheduler.jobs.submit")
def jobs_submit(caller, definition):
    """Queue a job as the token's user; the id, or the ids of a multinode group."""
    return _queued_ids(jobs.submit(caller, definition))


@method("scheduler.jobs.resubmit")
def jobs_resubmit(caller, job_id):
    return _queued_ids(jobs.resubmit(caller, job_id))


def _queued_ids(records):
    """What LAVA answers to a submission: the job id, or the sub ids of a group."""
    if len(records) == 1 and not records[0].target_group:
        return records[0].id
    return [job.sub_id or str(job.id) for job in records]


@method("scheduler.jobs.cancel")
def jobs_cancel(caller, job_id):
    jobs.cancel(caller, job_id)
    return True


@method("scheduler.jobs.validate")
def jobs_validate(caller, definition, strict=False):
    """{} when the definition would be queued, else {"path": ..., "msg": ...}; nothing is
    queued. ``strict`` adds the checks of LAVA's validate call (timeouts within the job
    timeout, namespaces on all actions or none, known deploy and boot methods)."""
    return jobs.check(caller, definition,
                      strict=validate.flag(strict, "strict", default=False))


@method("scheduler.jobs.show")
def jobs_show(caller, job_id):
    job = jobs.find(caller, job_id)
    return {
        "id": _display_id(job), "description": job.description,
        "device": job.actual_device, "device_type": job.requested_device_type,
        "health_check": job.health_check, "pipeline": True,
        "health": job.health.display, "state": job.state.display,
        "submitter": job.submitter, "submit_time": _dt(job.submit_time),
        "start_time": _dt(job.start_time), "end_time": _dt(job.end_time),
        "tags": list(job.tags), "visibility": _visibility(job),
        "failure_comment": job.failure_comment, "error_msg": job.error_msg,
        "error_type": job.error_type, "priority": job.priority, "worker": job.worker,
    }


def _job_row(job, verbose):
    row = {"id": _display_id(job), "description": job.description,
           "device_type": job.requested_device_type, "health": job.health.display,
           "state": job.state.display, "submitter": job.submitter}
    if verbose:
        row.update({"actual_device": job.actual_device,
                    "start_time": _dt_text(job.start_time),
                    "end_time": _dt_text(job.end_time),
                    "error_msg": job.error_msg, "error_type": job.error_type})
    return row


@method("scheduler.jobs.list")
def jobs_list(caller, state=None, health=None, start=0, limit=25, since=0, verbose=False,
              duration=None):
    """Newest first; ``limit`` at most 100; ``since``: ended in the last N minutes;
    ``duration``: running for more than N minutes."""
    found = jobs.listing(
        caller, state=validate.state(JobState, state, "state"),
        health=validate.state(JobHealth, health, "health"),
        offset=validate.integer(start, "start", default=0, minimum=0) or 0,
        limit=min(validate.integer(limit, "limit", default=25, minimum=0), 100),
        since=validate.integer(since, "since", default=0, minimum=0),
        running_for=validate.integer(duration, "duration", default=None, minimum=0))
    verbose = validate.flag(verbose, "verbose", default=False)
    return [_job_row(job, verbose) for job in found]


@method("scheduler.jobs.queue")
def jobs_queue(caller, device_types=None, start=0, limit=25):
    if device_types is not None:
        if isinstance(device_types, str) or not isinstance(device_types, list):
            raise ApiError(400, "device_types: expected a list of names")
        device_types = [validate.name(n, "device type") for n in device_types]
    found = jobs.queue(caller, device_types,
                       validate.integer(start, "start", default=0, minimum=0) or 0,
                       min(validate.integer(limit, "limit", default=25, minimum=0), 100))
    return [{"id": _display_id(job), "description": job.description,
             "requested_device_type": job.requested_device_type,
             "submitter": job.submitter} for job in found]


@method("scheduler.jobs.definition")
def jobs_definition(caller, job_id):
    return jobs.definition(jobs.find(caller, job_id))


@method("scheduler.jobs.configuration")
def jobs_configuration(caller, job_id):
    texts = jobs.configuration(caller.master, jobs.find(caller, job_id))
    return [None if text is None else _binary(text) for text in texts]


@method("scheduler.jobs.logs")
def jobs_logs(caller, job_id, start=0, end=None):
    """(finished, YAML list of log entries from line ``start``): LAVA's shape."""
    job = jobs.find(caller, job_id)
    finished, entries = jobs.logs(caller.master, caller.log_reader, job, start, end)
    return finished, _binary(jobs.dump_entries(entries) if entries else "[]")


@method("scheduler.jobs.logs_count")
def jobs_logs_count(caller, job_id):
    """How many lines the job's log has now."""
    return jobs.log_count(caller.master, jobs.find(caller, job_id))


# -- results ------------------------------------------------------------------------------

def _results_yaml(caller, job_id, suite=None, case=None):
    job = jobs.find(caller, job_id)
    if suite is not None:
        suite = validate.text(suite, "suite", limit=1024)
    if case is not None:
        case = validate.text(case, "case", limit=1024)
    rows = []
    for index, item in enumerate(jobs.results(caller.master, job, suite, case)):
        metadata = item.parsed_metadata()
        rows.append({"id": str(item.id), "job": str(_display_id(job)), "suite": item.suite,
                     "name": item.name, "result": item.result,
                     "measurement": item.measurement, "unit": item.units,
                     "logged": _dt_text(item.logged), "metadata": metadata,
                     "level": "", "url": "/results/testcase/%s" % item.id})
    return yaml.safe_dump(rows, default_flow_style=False, allow_unicode=True)


@method("results.get_testjob_results_yaml")
def results_testjob(caller, job_id):
    return _results_yaml(caller, job_id)


@method("results.get_testsuite_results_yaml")
def results_testsuite(caller, job_id, suite_name):
    return _results_yaml(caller, job_id, suite_name)


@method("results.get_testcase_results_yaml")
def results_testcase(caller, job_id, suite_name, case_name):
    return _results_yaml(caller, job_id, suite_name, case_name)


# -- scheduler.devices --------------------------------------------------------------------

@method("scheduler.devices.list")
def devices_list(caller, show_all=False, offline_info=False):
    found = devices.listing(caller, validate.flag(show_all, "show_all", False))
    return [{"hostname": d.hostname, "type": d.device_type, "health": d.health.display,
             "state": d.state.display, "current_job": d.current_job, "pipeline": True}
            for d in found]


@method("scheduler.devices.show")
def devices_show(caller, hostname):
    master = caller.master
    device = devices.find(caller, hostname)
    try:
        has_dict = master.templates.dictionary(device.hostname) is not None
    except Exception:  # an unreadable file is reported by get_dictionary, not here
        has_dict = False
    return {"hostname": device.hostname, "device_type": device.device_type,
            "health": device.health.display, "state": device.state.display,
            "health_job": health_mod.definition(master, device.device_type) is not None,
            "description": device.description, "pipeline": True,
            "has_device_dict": has_dict, "worker": device.worker,
            "current_job": device.current_job, "tags": sorted(device.tags),
            "public": device.is_public, "permissions": []}


@method("scheduler.devices.add")
def devices_add(caller, hostname, type_name, worker_hostname, user_name=None,
                group_name=None, public=True, health=None, description=None):
    devices.add(caller, hostname, type_name, worker_hostname, health=health,
                description=description, public=public)


@method("scheduler.devices.update")
def devices_update(caller, hostname, worker_hostname=None, user_name=None, group_name=None,
                   public=None, health=None, description=None, device_type=None,
                   reason=None):
    devices.update(caller, hostname, worker=worker_hostname, public=public, health=health,
                   description=description, device_type=device_type, reason=reason)


@method("scheduler.devices.get_dictionary")
def devices_get_dictionary(caller, hostname, render=False, context=None):
    return _binary(devices.get_dictionary(caller, hostname, render, context))


@method("scheduler.devices.set_dictionary")
def devices_set_dictionary(caller, hostname, dictionary):
    return devices.set_dictionary(caller, hostname, dictionary)


@method("scheduler.devices.tags.add")
def devices_tags_add(caller, hostname, name):
    devices.tags_add(caller, hostname, name)


@method("scheduler.devices.tags.list")
def devices_tags_list(caller, hostname):
    return sorted(devices.find(caller, hostname).tags)


@method("scheduler.devices.tags.delete")
def devices_tags_delete(caller, hostname, name):
    devices.tags_delete(caller, hostname, name)


# -- scheduler.device_types ---------------------------------------------------------------

@method("scheduler.device_types.list")
def device_types_list(caller, show_all=False):
    rows = device_types.listing(caller, validate.flag(show_all, "show_all", False))
    return [{"name": name, "devices": count, "installed": record is not None,
             "template": template} for name, record, count, template in rows]


@method("scheduler.device_types.devices")
def device_types_devices(caller, name, health=None):
    """The devices of a type the caller may see (of one health, if given)."""
    record = device_types.find(caller, name)
    health = validate.state(DeviceHealth, health, "health")
    found = devices.listing(caller, show_all=True, device_type=record.name, health=health)
    return [{"hostname": d.hostname, "state": d.state.display, "health": d.health.display,
             "worker": d.worker, "current_job": d.current_job} for d in found]


@method("scheduler.device_types.show")
def device_types_show(caller, name):
    master = caller.master
    record = device_types.find(caller, name)
    hostnames = [d.hostname for d in master.storage.list_devices(device_type=record.name)]
    return {"name": record.name, "description": record.description,
            "display": record.display, "health_disabled": record.health_disabled,
            "health_denominator": record.health_denominator.capitalize(),
            "health_frequency": record.health_frequency, "aliases": [],
            "devices": hostnames,
            "default_template": master.storage.get_blob("device-type", record.name) is None,
            "permissions": []}


@method("scheduler.device_types.add")
def device_types_add(caller, name, description=None, display=True, owners_only=False,
                     health_frequency=24, health_denominator="hours"):
    device_types.add(caller, name, description, display, health_frequency,
                     health_denominator)


@method("scheduler.device_types.update")
def device_types_update(caller, name, description=None, display=None, owners_only=None,
                        health_frequency=None, health_denominator=None,
                        health_disabled=None):
    device_types.update(caller, name, description, display, health_frequency,
                        health_denominator, health_disabled)


@method("scheduler.device_types.get_template")
def device_types_get_template(caller, name):
    return _binary(device_types.get_template(caller, name))


@method("scheduler.device_types.set_template")
def device_types_set_template(caller, name, config):
    device_types.set_template(caller, name, config)


@method("scheduler.device_types.get_health_check")
def device_types_get_health_check(caller, name):
    return _binary(device_types.get_health_check(caller, name))


@method("scheduler.device_types.set_health_check")
def device_types_set_health_check(caller, name, config):
    device_types.set_health_check(caller, name, config)


# -- scheduler.workers --------------------------------------------------------------------

@method("scheduler.workers.list")
def workers_list(caller, show_all=False):
    return [w.hostname for w in workers.listing(caller.master,
                                                validate.flag(show_all, "show_all", False))]


@method("scheduler.workers.show")
def workers_show(caller, hostname):
    """``last_ping`` is 1970-01-01 for a worker never seen (lavacli needs a dateTime)."""
    master = caller.master
    worker = workers.find(master, hostname)
    return {"hostname": worker.hostname, "description": worker.description,
            "state": worker.state.display, "health": worker.health.display,
            "devices": [d.hostname for d in master.storage.list_devices(worker=worker.hostname)],
            "last_ping": _dt(worker.last_ping) or NEVER, "job_limit": 0,
            "version": worker.version,
            "default_config": workers.is_default(master, "config", worker.hostname),
            "default_env": workers.is_default(master, "env", worker.hostname),
            "default_env_dut": workers.is_default(master, "env-dut", worker.hostname)}


@method("scheduler.workers.add")
def workers_add(caller, hostname, description=None, disabled=False):
    workers.add(caller, hostname, description, disabled)


@method("scheduler.workers.update")
def workers_update(caller, hostname, description=None, health=None, job_limit=None):
    workers.update(caller, hostname, description, health, job_limit)


def _file_methods(kind, suffix):
    @method("scheduler.workers.get_%s" % suffix)
    def get(caller, hostname):
        return _binary(workers.get_file(caller, kind, hostname))

    @method("scheduler.workers.set_%s" % suffix)
    def set_(caller, hostname, config):
        return workers.set_file(caller, kind, hostname, config)

    get.__doc__ = "The worker's %s." % workers.FILES[kind][1]
    set_.__doc__ = "Store the worker's %s (an empty text removes it)." % workers.FILES[kind][1]


_file_methods("config", "config")
_file_methods("env", "env")
_file_methods("env-dut", "env_dut")


@method("scheduler.workers.get_certificate")
def workers_get_certificate(caller, hostname):
    return _binary(workers.get_certificate(caller.master, hostname))


@method("scheduler.workers.set_certificate")
def workers_set_certificate(caller, hostname, key):
    return workers.set_certificate(caller, hostname, key)


# -- the codec ----------------------------------------------------------------------------

def _arguments(fn):
    params = list(fn.rpc_signature.parameters.values())[1:]
    return "(%s)" % ", ".join(p.name if p.default is inspect.Parameter.empty
                              else "%s=%r" % (p.name, p.default) for p in params)


def fault(code, message):
    return xmlrpc.client.dumps(xmlrpc.client.Fault(code, message), methodresponse=True,
                               allow_none=True).encode("utf-8")


def parse(body):
    """(method name, params) of a request body; ApiError for anything else."""
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise ApiError(PARSE_ERROR, "parse error: DTDs and entities are not accepted")
    try:
        params, name = xmlrpc.client.loads(body, use_builtin_types=True)
    except xml.parsers.expat.ExpatError as exc:
        raise ApiError(PARSE_ERROR, "parse error: not well formed XML-RPC: %s" % exc) from None
    except (xmlrpc.client.Error, ValueError, TypeError, OverflowError, AttributeError,
            IndexError, KeyError) as exc:
        raise ApiError(PARSE_ERROR, "parse error: invalid XML-RPC request: %s"
                       % (str(exc)[:200] or type(exc).__name__)) from None
    if not isinstance(name, str) or not name:
        raise ApiError(INVALID_REQUEST, "invalid XML-RPC request: no methodName")
    return name, params


def dispatch(caller, name, params):
    """Call a method; returns the response body (a fault for any refusal)."""
    fn = METHODS.get(name)
    if fn is None:
        raise ApiError(METHOD_NOT_FOUND, "No such method: %s" % name[:200])
    try:
        fn.rpc_signature.bind(caller, *params)
    except TypeError:
        raise ApiError(INVALID_PARAMS, "%s%s: called with %d argument(s)"
                       % (name, _arguments(fn), len(params))) from None
    result = fn(caller, *params)
    try:
        return xmlrpc.client.dumps((result,), methodresponse=True,
                                   allow_none=True).encode("utf-8")
    except (OverflowError, TypeError) as exc:
        log.error("%s: cannot encode the answer: %s", name, exc)
        raise ApiError(INTERNAL, "Internal error: the answer cannot be encoded") from None


# The methods of users, groups, permissions, tags and aliases register themselves here.
from . import xmlrpc_auth  # noqa: E402,F401
