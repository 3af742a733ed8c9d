"""Job operations behind both /RPC2 and /api/v1/: find, submit, cancel, resubmit,
validate, list, queue, read logs, definition, configuration and results.

Submissions and cancels go through the same code as the command line (lavacore.jobs and
Flow), so the master reacts to them at once: a submitted job is scheduled in the same
breath, a cancel reaches the worker immediately.
"""

import collections
import os

from .. import jobs as submission
from ..jobs import JobError, JobForbidden
from .. import logformat
from ..logformat import parse_line
from ..states import JobState
from ..storage import NotFound
from . import validate
from .errors import FORBIDDEN, ApiError, bad_request, not_found

MAX_LOG_LINES = 20000          # per call; the client asks again for the rest
SCAN_CHUNK = 500
MAX_SCAN = 20000               # jobs looked at for a time-window filter
CONFIG_FILES = ("job.yaml", "device.yaml", "dispatcher.yaml", "env.yaml", "env.dut.yaml")


def find(caller, ident):
    """The job for an id as a client sends it (42, "42", "42.1"); 404 if there is none or
    the caller may not see it (the same answer: a private job's existence is private)."""
    ident = validate.job_id(ident)
    storage = caller.storage
    try:
        if isinstance(ident, int):
            found = [storage.get_job(ident)]
        else:
            found = storage.list_jobs(sub_id=ident, limit=1)
    except NotFound:
        found = None
    if not found or not caller.policy.can_view_job(found[0]):
        raise not_found("Job '%s' was not found." % ident)
    return found[0]


def submit(caller, text):
    """Queue a definition as the caller; returns the Job records (several: multinode)."""
    user = caller.require_user()
    text = validate.text(text, "definition", limit=submission.MAX_DEFINITION + 1)
    master = caller.master
    try:
        records = submission.submit(master.storage, master.hook, master, text, user,
                                    master.clock.time(), policy=caller.policy)
    except JobForbidden as exc:
        raise ApiError(FORBIDDEN, str(exc)) from None
    except JobError as exc:
        raise bad_request("Problem with submitted job data: %s" % exc) from None
    master.flow.submitted(records)
    return records


def resubmit(caller, ident):
    job = find(caller, ident)
    caller.require(caller.policy.can_resubmit_job(job), "resubmit job %s" % ident)
    return submit(caller, job.original_definition or job.definition)


def cancel(caller, ident):
    """Cancel as the caller: the submitter, who may change its device (type), or an
    admin. A job already finished or canceling is left as it is."""
    user = caller.require_user()
    job = find(caller, ident)
    caller.require(caller.policy.can_cancel_job(job), "cancel job %s" % ident)
    canceled = caller.master.flow.cancel(job.id, username=user)
    return canceled or caller.master.storage.get_job(job.id)


def check(caller, text, strict=False):
    """Validate without queueing: {} when the job would be queued, else {"path": where in
    the job (``actions[2].deploy``), "msg": the one-line reason}. The same checks as a
    submission (LAVA's rules, the site's, the devices it needs); ``strict`` adds those of
    LAVA's validate call."""
    master = caller.master
    text = validate.text(text, "definition", limit=submission.MAX_DEFINITION + 1)
    try:
        submission.prepare(master.storage, master.hook, master, text, caller.user,
                           master.clock.time(), strict=strict,
                           policy=caller.policy if caller.user else None)
    except JobError as exc:
        return {"path": exc.path or "", "msg": str(exc)}
    return {}


def definition(job):
    # A multinode member's original definition is the whole group's, as LAVA returns it.
    return job.original_definition or job.definition


def configuration(master, job):
    """[definition, device, dispatcher, env, env-dut] as the job was started with (None
    for a file it did not get); 404 before it was started."""
    if job.state < JobState.SCHEDULED and job.state != JobState.FINISHED:
        raise not_found("Job '%s' has not started yet" % job.id)
    return [master.files.read(job, name) for name in CONFIG_FILES]


def listing(caller, state=None, health=None, offset=0, limit=25, since=None,
            running_for=None, order="-id", **filters):
    """The jobs the caller may see matching the filters, newest first. ``since``
    (minutes): ended in that window; ``running_for`` (minutes): started at least that long
    ago."""
    master = caller.master
    criteria = {key: value for key, value in filters.items() if value is not None}
    criteria["visible"] = caller.policy.job_filter()
    if state is not None:
        criteria["state"] = state
    if health is not None:
        criteria["health"] = health
    if not since and not running_for:
        return master.storage.list_jobs(limit=limit, offset=offset, order=order, **criteria)
    now = master.clock.time()
    if since:
        cutoff = now - since * 60
        found = _scan(master.storage, "-end_time", criteria,
                      keep=lambda job: job.end_time <= now,
                      stop=lambda job: job.end_time is None or job.end_time < cutoff)
    else:
        found = _scan(master.storage, "-id", criteria, keep=lambda job: True)
    if running_for:
        started = now - running_for * 60
        found = [job for job in found if job.start_time is not None and
                 job.start_time <= started]
    reverse = order.startswith("-")
    key = order.lstrip("-")
    found.sort(key=lambda job: (getattr(job, key) or 0, job.id), reverse=reverse)
    return found[offset:offset + limit]


def _scan(storage, order, criteria, keep, stop=lambda job: False):
    found, offset = [], 0
    while offset < MAX_SCAN:
        chunk = storage.list_jobs(limit=SCAN_CHUNK, offset=offset, order=order, **criteria)
        for job in chunk:
            if stop(job):
                return found
            if keep(job):
                found.append(job)
        if len(chunk) < SCAN_CHUNK:
            break
        offset += SCAN_CHUNK
    return found


def queue(caller, device_types=None, offset=0, limit=25):
    return caller.storage.list_jobs(limit=limit, offset=offset, order="-id",
                                    state=JobState.SUBMITTED,
                                    requested_device_type=device_types,
                                    visible=caller.policy.job_filter())


def results(master, job, suite=None, case=None):
    cases = master.storage.list_testcases(job.id, suite=suite)
    if case is not None:
        cases = [c for c in cases if c.name == case]
    return cases


# -- logs -------------------------------------------------------------------------------

def entry(raw):
    """One output.yaml line -> the log entry (a dict with ``dt`` as text)."""
    line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    if line.startswith("- "):
        line = line[2:]
    try:
        data = parse_line(line)
    except ValueError:
        return {"dt": "", "lvl": "debug", "msg": line}
    if not isinstance(data.get("dt"), str):
        data["dt"] = "" if data.get("dt") is None else str(data["dt"])
    return data


def dump_entries(entries):
    """Log entries as the YAML list LAVA returns: one JSON flow mapping per line."""
    lines = []
    for item in entries:
        lines.append("- " + logformat.dumps(item) + "\n")
    return "".join(lines)


class LogReader:
    """Reads entries ``start..end`` of jobs' output.yaml, remembering where the last line
    read of each recently read file begins so following a log does not re-read it all."""

    def __init__(self, size=128):
        self._marks = collections.OrderedDict()  # path -> (line number, byte offset, inode)
        self._size = size

    def read(self, path, start=0, end=None, limit=MAX_LOG_LINES):
        """(entries, more): ``more`` when lines past the returned ones may follow now."""
        entries = []
        line_no, offset = 0, 0
        try:
            handle = open(path, "rb")
        except OSError:
            return entries, False
        # A mark holds for the same file only: a log replaced by the worker's copy (a new
        # inode) is read again from its start.
        inode = os.fstat(handle.fileno()).st_ino
        mark = self._marks.get(path)
        if mark is not None and mark[0] <= start and mark[2] == inode:
            line_no, offset = mark[0], mark[1]
        more = False
        with handle:
            handle.seek(offset)
            while end is None or line_no < end:
                position = handle.tell()
                raw = handle.readline()
                if not raw:
                    break
                if not raw.endswith(b"\n"):
                    break  # being written: the rest comes with the next call
                if line_no >= start:
                    if len(entries) >= limit:
                        more = True
                        handle.seek(position)
                        break
                    entries.append(entry(raw))
                line_no += 1
                offset = handle.tell()
        self._remember(path, line_no, offset, inode)
        return entries, more

    def _remember(self, path, line_no, offset, inode):
        self._marks[path] = (line_no, offset, inode)
        self._marks.move_to_end(path)
        while len(self._marks) > self._size:
            self._marks.popitem(last=False)


def log_count(master, job):
    """The complete lines of a job's log."""
    path = os.path.join(job.output_dir(master.output_root), "output.yaml")
    count = 0
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                count += block.count(b"\n")
    except OSError:
        return 0
    return count


def logs(master, reader, job, start=0, end=None):
    """(finished, entries): finished only when the job is Finished and nothing is left."""
    start = validate.integer(start, "start", default=0, minimum=0)
    end = validate.integer(end, "end", default=None, minimum=0)
    path = os.path.join(job.output_dir(master.output_root), "output.yaml")
    entries, more = reader.read(path, start, end)
    return job.state == JobState.FINISHED and not more, entries
