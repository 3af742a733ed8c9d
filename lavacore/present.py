"""How jobs, devices, workers, results and log lines are shown: the one presentation the
command line (text and ``--json``), the REST API (JSON) and the web pages share.

The ``*_details`` functions give the JSON-able dicts (``jobs show --json``, REST's
``jobs/ID/``, the pages' context); the ``*_text`` functions and ``table`` give the command
line's text, where every line ends with a newline (an empty table is no text at all). In
text, a value that is not there is ``-``, a list is comma-separated and a mapping is one
indented ``key: value`` line per key: never a Python repr.
"""

import json

from .models import iso

RESULT_KEYS = ("pass", "fail", "skip", "unknown")
JOB_COLUMNS = ["id", "state", "health", "device_type", "device", "submitter", "description"]
DEVICE_COLUMNS = ["hostname", "device_type", "worker", "state", "health", "current_job"]
WORKER_COLUMNS = ["hostname", "state", "health", "last_ping"]
RESULT_COLUMNS = ["suite", "case", "result", "measurement", "units"]
JOB_FIELDS = ("id", "description", "submitter", "state", "health", "device_type", "device",
              "worker", "priority", "tags", "submit_time", "start_time", "end_time",
              "failure_comment")
DEVICE_FIELDS = ("hostname", "device_type", "worker", "state", "health", "tags",
                 "current_job", "last_health_report_job")


# -- values as text ---------------------------------------------------------------------

def value_text(value):
    """One value as text: ``-`` for nothing (None, "", an empty list), yes or no for a
    boolean, a list joined with commas, a mapping as ``key: value`` pairs joined with
    commas."""
    if value is None or value == "" or value == [] or value == () or value == {}:
        return "-"
    if value is True or value is False:
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(value_text(item) for item in value)
    if isinstance(value, dict):
        return ", ".join("%s: %s" % (key, value_text(item)) for key, item in value.items())
    return str(value)


def _field(name, value, width):
    """``name: value`` padded to ``width``; a mapping continues on indented lines."""
    if isinstance(value, dict) and value:
        return "%s\n" % (name + ":") + "".join(
            "  %s: %s\n" % (key, value_text(item)) for key, item in value.items())
    return "%-*s %s\n" % (width, name + ":", value_text(value))


def table(rows, columns):
    """Rows (dicts) as a text table with a header line; None is ``-``."""
    if not rows:
        return ""
    widths = [max(len(str(c)), *(len(str(r.get(c, "") or "")) for r in rows)) for c in columns]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    for row in rows:
        lines.append("  ".join(str(row.get(c, "") if row.get(c) is not None else "-").ljust(w)
                               for c, w in zip(columns, widths)).rstrip())
    return "\n".join(lines) + "\n"


def history_entry(entry):
    """A health or state history entry (storage.list_history) with its time as text."""
    return dict(entry, time=iso(entry["time"]))


def history_text(entries, width):
    return "".join("%-*s %s %s -> %s by %s: %s\n" % (
        width, "history:", entry["time"], entry["old"], entry["new"], entry["user"] or "-",
        entry["reason"] or "-") for entry in entries)


# -- jobs -------------------------------------------------------------------------------

def job_details(storage, job):
    """A job with its test-case counts by result (and its MultiNode group)."""
    data = job.to_dict()
    counts = storage.testcase_counts(job.id)
    data["results"] = {key: counts.get(key, 0) for key in RESULT_KEYS}
    for key, value in counts.items():
        data["results"].setdefault(key, value)
    if job.target_group:
        data["group"] = [{"id": j.id, "sub_id": j.sub_id, "state": j.state.display,
                          "health": j.health.display, "device": j.actual_device}
                         for j in storage.list_jobs(target_group=job.target_group)]
    return data


def job_text(data):
    """``jobs show``: the details of job_details as text."""
    text = "".join(_field(key, data.get(key), 16) for key in JOB_FIELDS)
    results = ", ".join("%s %d" % (k, v) for k, v in data["results"].items())
    text += "%-16s %s\n" % ("results:", results)
    for member in data.get("group", ()):
        text += "%-16s %s %s %s/%s on %s\n" % ("group:", member["id"], member["sub_id"],
                                               member["state"], member["health"],
                                               member["device"] or "-")
    return text


def jobs_table(jobs):
    return table([job.to_dict() for job in jobs], JOB_COLUMNS)


def duration(job, now=None):
    """Seconds a job ran (so far, for a running one when ``now`` is given), or None."""
    end = job.end_time if job.end_time is not None else now
    if job.start_time is None or end is None:
        return None
    return max(0.0, end - job.start_time)


def duration_text(seconds):
    """``1 h 02 min``, ``3 min 05 s``, ``12 s``; ``-`` for None."""
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return "%d h %02d min" % (hours, minutes)
    if minutes:
        return "%d min %02d s" % (minutes, seconds)
    return "%d s" % seconds


# -- results ----------------------------------------------------------------------------

def results_details(job, cases):
    """``jobs results --json``: the test cases by suite, in the order they came."""
    suites = {}
    for case in cases:
        suites.setdefault(case.suite, []).append(case.to_dict())
    return {"job": job.id, "suites": [{"name": name, "tests": tests}
                                      for name, tests in suites.items()]}


def results_table(cases):
    return table([{"suite": c.suite, "case": c.name, "result": c.result,
                   "measurement": c.measurement, "units": c.units} for c in cases],
                 RESULT_COLUMNS)


# -- log lines --------------------------------------------------------------------------

def log_line_text(line):
    """One stored log line (without its ``- ``) as ``jobs logs`` prints it: time, level,
    message; a line that is not a log mapping as it is."""
    from .logformat import parse_line

    try:
        data = parse_line(line)
    except ValueError:
        return line
    msg = data.get("msg")
    if isinstance(msg, dict):
        msg = json.dumps(msg)
    return "%s %-8s %s" % (str(data.get("dt", ""))[:19], data.get("lvl", ""), msg)


def log_message(entry):
    """The message of a log entry (api.jobs.entry) as one text: a test case's result line
    as ``definition/case: result [measurement units]``, other structures as JSON."""
    msg = entry.get("msg")
    if isinstance(msg, str):
        return msg
    if entry.get("lvl") == "results" and isinstance(msg, dict) and "case" in msg:
        text = "%s/%s: %s" % (msg.get("definition", ""), msg.get("case"),
                              msg.get("result", ""))
        if msg.get("measurement") is not None:
            text += " %s %s" % (msg["measurement"], msg.get("units") or "")
        return text.rstrip()
    if msg is None:
        return ""
    return json.dumps(msg, ensure_ascii=False, default=str)


# -- devices ----------------------------------------------------------------------------

def device_details(storage, device, history=100):
    """A device with its last ``history`` health changes (times as text)."""
    data = device.to_dict()
    data["history"] = [history_entry(h) for h in
                       storage.list_history("device", device.hostname, limit=history)]
    return data


def device_text(data):
    """``devices show``."""
    return "".join(_field(key, data.get(key), 24) for key in DEVICE_FIELDS) + \
        history_text(data["history"], 24)


def devices_table(devices):
    return table([d.to_dict() for d in devices], DEVICE_COLUMNS)


# -- workers ----------------------------------------------------------------------------

def worker_details(storage, worker, policy=None, history=100):
    """A worker with the names of its devices (those ``policy`` lets see, when given) and
    its last ``history`` health changes (times as text)."""
    data = worker.to_dict()
    devices = storage.list_devices(worker=worker.hostname)
    if policy is not None:
        devices = [d for d in devices if policy.can_view_device(d)]
    data["devices"] = [d.hostname for d in devices]
    data["history"] = [history_entry(h) for h in
                       storage.list_history("worker", worker.hostname, limit=history)]
    return data


def worker_text(data):
    """``workers show``: each field as ``key: value`` (lists comma-separated, ``-`` for
    nothing), then one line per history entry."""
    text = "".join(_field(key, value, 16) for key, value in data.items() if key != "history")
    return text + history_text(data.get("history", ()), 16)


def workers_table(workers):
    return table([w.to_dict() for w in workers], WORKER_COLUMNS)
