"""Job submission: parse and check a LAVA job definition before anything is queued.

Errors are one line naming where the problem is (``line 7: priority: ...``): the line
numbers come from the YAML node tree, so a person can go straight to the spot.
"""

import yaml

from . import states
from .models import Job

try:
    _Loader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _Loader = yaml.SafeLoader

MAX_DEFINITION = 4 * 1024 * 1024


class JobError(ValueError):
    """A submission refused, with a one-line reason."""


class Located:
    """A parsed definition together with the source line of each top-level key."""

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
            node = yaml.compose(text, Loader=_Loader)
            self.data = yaml.load(text, Loader=_Loader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = "line %d, column %d: " % (mark.line + 1, mark.column + 1) if mark else ""
            raise JobError("%sinvalid YAML: %s" % (where, exc.problem or exc.context)) from None
        except yaml.YAMLError as exc:
            raise JobError("invalid YAML: %s" % " ".join(str(exc).split())) from None
        if not isinstance(self.data, dict):
            raise JobError("line 1: a job definition must be a YAML mapping, not %s"
                           % ("empty" if self.data is None else type(self.data).__name__))
        self.lines = {}
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    self.lines[key.value] = (key.start_mark.line + 1, value)

    def line(self, key, default=1):
        return self.lines.get(key, (default, None))[0]

    def error(self, key, message):
        if key in self.lines:
            return JobError("line %d: %s: %s" % (self.line(key), key, message))
        return JobError("%s: %s" % (key, message))


def parse_priority(value):
    if isinstance(value, bool):
        raise ValueError("must be 0-100 or low/medium/high, got %r" % value)
    if isinstance(value, int):
        if 0 <= value <= 100:
            return value
    elif isinstance(value, str) and value.lower() in states.PRIORITY_NAMES:
        return states.PRIORITY_NAMES[value.lower()]
    raise ValueError("must be 0-100 or low/medium/high, got %r" % (value,))


def check_common(doc):
    """The checks every job (single or multinode) passes; raises JobError."""
    data = doc.data
    for key in ("job_name", "visibility", "timeouts", "actions"):
        if key not in data:
            raise JobError("%s: missing (a LAVA job needs job_name, visibility, timeouts,"
                           " actions)" % key)
    if not isinstance(data["job_name"], str) or not data["job_name"].strip():
        raise doc.error("job_name", "must be a non-empty string")
    visibility = data["visibility"]
    if visibility not in ("public", "personal") and not (
            isinstance(visibility, dict) and set(visibility) == {"group"}):
        raise doc.error("visibility", "must be public, personal or {group: [...]}")
    timeouts = data["timeouts"]
    if not isinstance(timeouts, dict) or not isinstance(timeouts.get("job"), dict):
        raise doc.error("timeouts", "must be a mapping with a 'job' timeout")
    for name, value in timeouts.items():
        if isinstance(value, dict):
            if not value or any(u not in ("days", "hours", "minutes", "seconds")
                                or not isinstance(n, int) or isinstance(n, bool) or n < 0
                                for u, n in value.items()):
                raise doc.error("timeouts", "%s: use days/hours/minutes/seconds with whole"
                                " numbers" % name)
    actions = data["actions"]
    if not isinstance(actions, list) or not actions:
        raise doc.error("actions", "must be a non-empty list")
    for index, action in enumerate(actions):
        if not isinstance(action, dict) or len(action) != 1:
            raise doc.error("actions", "item %d must be a mapping with one key (deploy, boot,"
                            " test, command)" % (index + 1))
    if "priority" in data:
        try:
            parse_priority(data["priority"])
        except ValueError as exc:
            raise doc.error("priority", str(exc)) from None
    tags = data.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise doc.error("tags", "must be a list of strings")
    context = data.get("context", {})
    if context is not None and not isinstance(context, dict):
        raise doc.error("context", "must be a mapping")
    if isinstance(context, dict) and not all(isinstance(k, str) and k.isidentifier()
                                             for k in context):
        raise doc.error("context", "keys must be plain names")


def check_device_type(storage, doc, device_type, tags, submitter):
    """The requested type must exist with at least one usable device carrying the tags."""
    from .storage import NotFound
    from .states import DeviceHealth

    try:
        storage.get_device_type(device_type)
    except NotFound:
        raise doc.error("device_type", "unknown device type %r" % device_type) from None
    devices = [d for d in storage.list_devices(device_type=device_type)
               if d.health != DeviceHealth.RETIRED]
    if not devices:
        raise doc.error("device_type", "every device of type %r is retired or none exists"
                        % device_type)
    if submitter != "lava-health" and not any(d.is_public for d in devices):
        raise doc.error("device_type", "no device of type %r accepts jobs from %s"
                        % (device_type, submitter or "anonymous users"))
    wanted = set(tags)
    if wanted and not any(wanted <= set(d.tags) for d in devices):
        raise doc.error("tags", "no %s device carries all of %s"
                        % (device_type, ", ".join(sorted(wanted))))


def single_job(storage, doc, submitter, now, health_check=False):
    """The Job record for a single-node definition (already checked by check_common)."""
    data = doc.data
    device_type = data.get("device_type")
    if not isinstance(device_type, str) or not device_type:
        raise JobError("device_type: missing (or add protocols: lava-multinode)")
    tags = data.get("tags", [])
    check_device_type(storage, doc, device_type, tags, submitter)
    return Job(id=None, submitter=submitter or "", description=data["job_name"],
               requested_device_type=device_type, tags=tuple(tags),
               priority=parse_priority(data.get("priority", 50)),
               visibility=data["visibility"] if isinstance(data["visibility"], str)
               else "group", submit_time=now, definition=doc.text,
               original_definition=doc.text, health_check=health_check)


def submit(storage, hook, master, text, submitter, now, health_check=False):
    """Check a definition and queue it (several jobs for a multinode group).

    Returns the queued Job records; raises JobError (nothing queued) when the definition
    is refused. Submitted events are the caller's to publish (Flow.submitted)."""
    doc = Located(text)
    check_common(doc)
    problems = []
    if hook is not None:
        for found in hook.validate_job(master=master, definition=doc.data, submitter=submitter):
            problems.extend(found or ())
    if problems:
        raise JobError(problems[0])
    records = None
    if hook is not None:
        records = hook.split_job(master=master, storage=storage, definition=doc,
                                 submitter=submitter, now=now)
    if records is None:
        if isinstance(doc.data.get("protocols"), dict) and \
                "lava-multinode" in doc.data["protocols"]:
            raise doc.error("protocols", "multinode jobs need the multinode plugin, which is"
                            " not loaded")
        records = [single_job(storage, doc, submitter, now, health_check)]
    with storage.transaction():
        ids = storage.insert_jobs(records)
        for index, (job, job_id) in enumerate(zip(records, ids)):
            job.id = job_id
            if job.target_group:
                # LAVA's display id of a group member: "<first id>.<index>".
                job.sub_id = "%d.%d" % (ids[0], index)
                storage.update_job(job_id, sub_id=job.sub_id)
    return records
