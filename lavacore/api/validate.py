"""Checks of what a client sends, before it is used: names, job ids, texts, flags, numbers
and state names. Each raises ApiError(400) with a one-line message naming the argument.

Names become file names (dictionaries, templates, worker files) and SQL parameters, so a
name is letters, digits, ``-``, ``_`` and ``.``, never starting with a dot: no path, no
``..``, no quoting tricks reach the storage or the file system.
"""

import re
import xmlrpc.client

from ..protocol import HOSTNAME_RE, MAX_HOSTNAME
from ..storage import NotFound
from .errors import bad_request, not_found

MAX_TEXT = 8 * 1024 * 1024
_JOB_ID_RE = re.compile(r"^(\d{1,18})(?:\.(\d{1,6}))?$")
MAX_JOB_ID = 2 ** 63 - 1


def _show(value, limit=40):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def existing(getter, value, what, label):
    """``getter(name)`` for a valid name; a 404 naming it (``label`` as LAVA spells the
    kind: Device, DeviceType, Worker) when there is none."""
    value = name(value, what)
    try:
        return getter(value)
    except NotFound:
        raise not_found("%s '%s' was not found." % (label, value)) from None


def name(value, what="name"):
    """A device, device type, worker or tag name."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str) or not value:
        raise bad_request("%s: expected a non-empty string, got %s" % (what, _show(value)))
    if len(value) > MAX_HOSTNAME or not HOSTNAME_RE.match(value) or value.startswith("."):
        raise bad_request("%s %s is not valid (letters, digits, '-', '_' and '.', not"
                          " starting with '.', at most %d characters)"
                          % (what, _show(value), MAX_HOSTNAME))
    return value


def optional_name(value, what="name"):
    return None if value is None else name(value, what)


def job_id(value):
    """A job id as a client gives it: 42, "42", or a multinode sub id "42.1".

    Returns an int, or the sub id text."""
    if isinstance(value, bool):
        raise bad_request("job id: expected a number, got %s" % _show(value))
    if isinstance(value, int):
        if 0 <= value <= MAX_JOB_ID:
            return value
        raise bad_request("job id %s is out of range" % value)
    if isinstance(value, str):
        match = _JOB_ID_RE.match(value.strip())
        if match:
            if match.group(2) is not None:
                return value.strip()
            number = int(match.group(1))
            if number <= MAX_JOB_ID:
                return number
    raise bad_request("job id %s is not valid (a number, or NUMBER.N for a multinode job)"
                      % _show(value))


def text(value, what, optional=False, limit=MAX_TEXT):
    """A text argument (a YAML or jinja2 file, a description). Binary values are UTF-8."""
    if value is None and optional:
        return None
    if isinstance(value, xmlrpc.client.Binary):
        value = value.data
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise bad_request("%s: not UTF-8 text (byte %d)" % (what, exc.start)) from None
    if not isinstance(value, str):
        raise bad_request("%s: expected a string, got %s" % (what, type(value).__name__))
    if len(value) > limit:
        raise bad_request("%s: too long (%d characters, at most %d)" % (what, len(value),
                                                                         limit))
    if "\x00" in value:
        raise bad_request("%s: contains a NUL character" % what)
    return value


def flag(value, what, default=None):
    """A boolean (XML-RPC boolean, JSON true/false, or a query string word)."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false",
                                                    "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise bad_request("%s: expected true or false, got %s" % (what, _show(value)))


def integer(value, what, default=None, minimum=None, maximum=None):
    if value is None:
        return default
    if isinstance(value, bool):
        raise bad_request("%s: expected a whole number, got %s" % (what, _show(value)))
    if isinstance(value, str):
        if re.match(r"^-?\d{19,}$", value.strip()):
            raise bad_request("%s: %s is out of range" % (what, _show(value)))
        if not re.match(r"^-?\d{1,18}$", value.strip()):
            raise bad_request("%s: expected a whole number, got %s" % (what, _show(value)))
        value = int(value)
    if not isinstance(value, int):
        raise bad_request("%s: expected a whole number, got %s" % (what, _show(value)))
    if minimum is not None and value < minimum:
        raise bad_request("%s: must be at least %d, got %d" % (what, minimum, value))
    if maximum is not None and value > maximum:
        raise bad_request("%s: must be at most %d, got %d" % (what, maximum, value))
    return value


def state(enum, value, what):
    """A state or health by name ("RUNNING", "Running", "running") -> enum member."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not value.isalpha():
        raise bad_request("%s: %s is not one of %s" % (
            what, _show(value), ", ".join(m.name for m in enum)))
    try:
        return enum[value.upper()]
    except KeyError:
        raise bad_request("%s: %s is not one of %s" % (
            what, _show(value), ", ".join(m.name for m in enum))) from None
