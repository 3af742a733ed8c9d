"""Job submission: parse and check a LAVA job definition before anything is queued.

The checks are LAVA 2020.05's (:mod:`lavacore.jobschema`), then the site's own
(``validate_job`` hook), then the split into the Job records to queue (``split_job``:
MultiNode) with the devices they need. Errors are one line naming where the problem is
(``line 7: priority: ...``): the line numbers come from the YAML node tree, so a person
can go straight to the spot.
"""

import yaml

from . import jobschema, safeyaml, states
from .models import Job

try:
    _Loader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _Loader = yaml.SafeLoader

MAX_DEFINITION = 4 * 1024 * 1024


class JobError(ValueError):
    """A submission refused, with a one-line reason; ``path`` names the place in the job
    (``actions[2].deploy``) when there is one."""

    def __init__(self, message, path=""):
        super().__init__(message)
        self.path = path


class JobForbidden(JobError):
    """A submission the submitter may not make (a device type of restricted groups)."""


class Located:
    """A parsed definition together with its YAML node tree, for line numbers."""

    def __init__(self, text):
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise JobError("not UTF-8 text (byte %d)" % exc.start) from None
        if len(text) > MAX_DEFINITION:
            raise JobError("definition too large (%d bytes, at most %d)"
                           % (len(text), MAX_DEFINITION))
        self.text = text
        try:
            self.node = safeyaml.compose(text)
            # Built from the node tree: the text is parsed once.
            self.data = None if self.node is None else \
                _Loader("").construct_document(self.node)
        except safeyaml.InputError as exc:
            raise JobError("invalid YAML: %s" % exc) from None
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = "line %d, column %d: " % (mark.line + 1, mark.column + 1) if mark else ""
            raise JobError("%sinvalid YAML: %s" % (where, exc.problem or exc.context)) from None
        except yaml.YAMLError as exc:
            raise JobError("invalid YAML: %s" % " ".join(str(exc).split())) from None
        if not isinstance(self.data, dict):
            raise JobError("line 1: a job definition must be a YAML mapping, not %s"
                           % ("empty" if self.data is None else type(self.data).__name__))

    def line(self, *path):
        """The line of a key (or of a path of keys and list indices)."""
        return jobschema.locate(self.node, list(path))

    def error(self, key, message):
        return JobError("line %d: %s: %s" % (self.line(key), key, message), key)

    def error_at(self, path, message):
        """A JobError naming the line of ``path`` (a list of keys and indices)."""
        where = jobschema.format_path(path)
        return JobError("line %d: %s: %s" % (jobschema.locate(self.node, path), where,
                                               message), where)


def parse_priority(value):
    if isinstance(value, bool):
        raise ValueError("must be 0-100 or low/medium/high, got %r" % value)
    if isinstance(value, int):
        if 0 <= value <= 100:
            return value
    elif isinstance(value, str) and value.lower() in states.PRIORITY_NAMES:
        return states.PRIORITY_NAMES[value.lower()]
    raise ValueError("must be 0-100 or low/medium/high, got %r" % (value,))


def context_variables(config):
    """The lab's extra context variables (``[jobs] extra_context_variables``), which jobs
    may set besides LAVA's own (LAVA's EXTRA_CONTEXT_VARIABLES)."""
    if config is None:
        return ()
    names = config.section("jobs").get("extra_context_variables", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise JobError("config.toml [jobs] extra_context_variables: expected an array of"
                       " strings")
    return tuple(names)


def check_common(doc, extra_context=(), strict=False):
    """LAVA's checks of a job definition (single or MultiNode), which need nothing but
    the definition; raises JobError naming the line of the first problem."""
    try:
        jobschema.check(doc.data, doc.node, extra_context, strict)
    except jobschema.SchemaError as exc:
        raise JobError(str(exc), exc.path) from None


def check_device_type(storage, doc, device_type, tags, submitter, where=()):
    """The requested type must exist with at least one usable device carrying the tags.
    ``where`` is the path of the mapping holding ``device_type`` and ``tags`` (a
    MultiNode role's), for the line of the error."""
    from .storage import NotFound
    from .states import DeviceHealth

    where = list(where)
    try:
        storage.get_device_type(device_type)
    except NotFound:
        raise doc.error_at(where + ["device_type"], "unknown device type %r"
                           % device_type) from None
    devices = [d for d in storage.list_devices(device_type=device_type)
               if d.health != DeviceHealth.RETIRED]
    if not devices:
        raise doc.error_at(where + ["device_type"], "every device of type %r is retired"
                           " or none exists" % device_type)
    if submitter != "lava-health" and not any(d.is_public for d in devices):
        raise doc.error_at(where + ["device_type"], "no device of type %r accepts jobs"
                           " from %s" % (device_type, submitter or "anonymous users"))
    wanted = set(tags)
    if wanted and not any(wanted <= set(d.tags) for d in devices):
        raise doc.error_at(where + ["tags"], "no %s device carries all of %s"
                           % (device_type, ", ".join(sorted(wanted))))


def single_job(storage, doc, submitter, now, health_check=False):
    """The Job record for a single-node definition (already checked by check_common)."""
    data = doc.data
    device_type = data["device_type"]
    tags = data.get("tags", [])
    check_device_type(storage, doc, device_type, tags, submitter)
    return Job(id=None, submitter=submitter or "", description=data["job_name"],
               requested_device_type=device_type, tags=tuple(tags),
               priority=parse_priority(data.get("priority", 50)),
               visibility=data["visibility"] if isinstance(data["visibility"], str)
               else "group", submit_time=now, definition=doc.text,
               original_definition=doc.text, health_check=health_check)


def prepare(storage, hook, master, text, submitter, now, health_check=False, config=None,
            strict=False, policy=None):
    """Check a definition and build the Job records it would queue, without queueing
    anything (``submit --dry-run`` and ``scheduler.jobs.validate`` stop here).

    ``config`` is the lab's (the master's when ``master`` is given); ``policy`` (a
    permissions.Policy) says whether the submitter may submit to each device type (None:
    the master itself or the command line on its host, who may); raises JobError."""
    doc = Located(text)
    if master is not None:
        config = master.config
    check_common(doc, context_variables(config), strict)
    written = {where: name for where, name in _requested_types(doc.data)}
    _resolve_aliases(storage, doc.data)
    if policy is not None:
        for where, name in _requested_types(doc.data):
            if not policy.can_view_type(name):
                # A type the submitter may not see does not exist for them: the error
                # of an unknown name (the one they wrote, not what an alias gave),
                # before anything tells it exists (its devices, their tags).
                raise doc.error_at(list(where) + ["device_type"], "unknown device type %r"
                                   % written.get(where, name))
    problems = []
    if hook is not None:
        for found in hook.validate_job(master=master, definition=doc.data, submitter=submitter):
            problems.extend(found or ())
    if problems:
        raise JobError(str(problems[0]))
    records = None
    if hook is not None:
        records = hook.split_job(master=master, storage=storage, definition=doc,
                                 submitter=submitter, now=now)
    if records is None:
        if "lava-multinode" in (doc.data.get("protocols") or {}):
            raise doc.error("protocols", "multinode jobs need the multinode plugin, which is"
                            " not loaded")
        records = [single_job(storage, doc, submitter, now, health_check)]
    groups = _viewing_groups(storage, doc)
    for record in records:
        record.viewing_groups = groups
        if policy is not None and record.requested_device_type and \
                not policy.can_submit_type(record.requested_device_type):
            # The same words whether the type is hidden or only closed to this user.
            raise JobForbidden("Permission denied: you may not submit jobs to device type"
                               " %r" % record.requested_device_type, "device_type")
    return records


def _requested_types(data):
    """(path of the mapping, device type name) of a definition and of its MultiNode
    roles."""
    places = [((), data)]
    roles = ((data.get("protocols") or {}).get("lava-multinode") or {}).get("roles")
    if isinstance(roles, dict):
        places += [(("protocols", "lava-multinode", "roles", name), role)
                   for name, role in roles.items()]
    return [(where, holder["device_type"]) for where, holder in places
            if isinstance(holder, dict) and isinstance(holder.get("device_type"), str)]


def _resolve_aliases(storage, data):
    """A device type named by one of its aliases (LAVA's) is the type itself; the
    definition keeps what its author wrote."""
    from .storage import NotFound

    def resolve(holder):
        name = holder.get("device_type") if isinstance(holder, dict) else None
        if not isinstance(name, str):
            return
        try:
            storage.get_device_type(name)
        except NotFound:
            target = storage.get_alias(name)
            if target is not None:
                holder["device_type"] = target

    resolve(data)
    roles = ((data.get("protocols") or {}).get("lava-multinode") or {}).get("roles")
    if isinstance(roles, dict):
        for role in roles.values():
            resolve(role)


def _viewing_groups(storage, doc):
    """``visibility: {group: [...]}``: the groups (which must exist)."""
    visibility = doc.data.get("visibility")
    if not isinstance(visibility, dict):
        return ()
    groups = tuple(sorted(set(visibility.get("group") or ())))
    for group in groups:
        if not storage.group_exists(group):
            raise doc.error_at(["visibility", "group"], "group %r does not exist" % group)
    return groups


def submit(storage, hook, master, text, submitter, now, health_check=False, config=None,
           policy=None):
    """Check a definition and queue it (several jobs for a multinode group).

    Returns the queued Job records; raises JobError (nothing queued) when the definition
    is refused. Submitted events are the caller's to publish (Flow.submitted)."""
    records = prepare(storage, hook, master, text, submitter, now, health_check, config,
                      policy=policy)
    with storage.transaction():
        ids = storage.insert_jobs(records)
        for index, (job, job_id) in enumerate(zip(records, ids)):
            job.id = job_id
            if job.target_group:
                # LAVA's display id of a group member: "<first id>.<index>".
                job.sub_id = "%d.%d" % (ids[0], index)
                storage.update_job(job_id, sub_id=job.sub_id)
    return records
