"""Job log lines as lava-run sends them on its PUSH socket: ``[job_id, line]``.

Each line is one YAML flow mapping ``{"dt": ..., "lvl": ..., "msg": ...}``. lava-run dumps
it with double-quoted YAML scalars; lavacore's runner writes JSON, which is valid YAML of
the same shape. Readers try JSON first (fast) and fall back to YAML for lava-run's lines.
"""

import datetime
import json
import re

import yaml

from . import safeyaml

LEVELS = ("debug", "info", "warning", "error", "exception", "target", "input", "feedback",
          "results", "event", "marker")


def utcnow_iso():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None).isoformat()


# Characters YAML readers refuse or fold inside a quoted scalar. JSON leaves them raw;
# escaped, each line stays one valid YAML line whatever a job printed.
_UNSAFE = re.compile("[\x7f-\x84\x86-\x9f\ud800-\udfff\ufeff\ufffe\uffff\u2028\u2029]")


def _escape(match):
    return "\\u%04x" % ord(match.group(0))


def dumps(data):
    """JSON text that is also a valid one-line YAML flow mapping."""
    text = json.dumps(data, ensure_ascii=False, separators=(", ", ": "), default=str)
    return _UNSAFE.sub(_escape, text)


def make_line(lvl, msg, dt=None):
    """One log line as text (no trailing newline, no leading ``- ``)."""
    return dumps({"dt": dt or utcnow_iso(), "lvl": lvl, "msg": msg})


def result_line(definition, case, result, measurement=None, units=None, **extra):
    msg = {"definition": definition, "case": case, "result": result}
    if measurement is not None:
        msg["measurement"] = measurement
    if units is not None:
        msg["units"] = units
    msg.update(extra)
    return make_line("results", msg)


def parse_line(text):
    """Return the mapping of one line, or raise ValueError saying why it is not one.
    Lines come from peers: nesting and alias expansion are bounded (safeyaml)."""
    try:
        data = safeyaml.json_loads(text)
    except safeyaml.InputError:
        raise
    except ValueError:
        try:
            data = safeyaml.load(text)
        except yaml.YAMLError as exc:
            raise ValueError("not a YAML mapping: %s" % str(exc).splitlines()[0]) from None
    if not isinstance(data, dict) or "lvl" not in data:
        raise ValueError("not a log mapping with 'lvl'")
    return data
