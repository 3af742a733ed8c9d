"""Where the log of a lavacore process goes, and what one of its lines may hold.

The master (``[logging]`` of config.toml, ``--log-file``/``--log-level``, the command line
winning) and ``lavacore worker`` (``--log-file``/``--log-level``) both set up their logging
here, once, from their entry point; a master built in-process by a test leaves the
logging of its process alone.

A line is one line: what peers and users send (hostnames, job comments, lava-run's
errors) ends up in messages, so the message of every record has its line breaks and other
control characters escaped and is cut at :data:`MAX_MESSAGE` characters. An
administrator's ``grep "job 12 "`` sees the whole story of job 12, and a hostile text
cannot forge a line of its own or send escape sequences to a terminal. A traceback
(a bug of ours) still follows its line as Python prints it.

A log file is a :class:`logging.handlers.WatchedFileHandler` opened for appending:
logrotate's default (rename, then ``create``) is noticed at the next line, which goes to
the new file; ``copytruncate`` works too, since appends follow the truncation. SIGHUP
reopens the file as well (:func:`reopen`), for tools that expect that.
"""

import logging
import logging.handlers
import os
import re
import sys

DEFAULT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# journald stamps every line with its time and the unit: the time would be there twice.
JOURNAL_FORMAT = "%(levelname)-7s %(name)s: %(message)s"
MAX_MESSAGE = 8192

# C0 controls but tab, DEL, C1 controls, and Unicode's own line and paragraph separators.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r"}


def _escape(match):
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    return ("\\x%02x" if ord(char) < 0x100 else "\\u%04x") % ord(char)


def one_line(text, limit=MAX_MESSAGE):
    """``text`` on one line, at most about ``limit`` characters, controls escaped."""
    text = str(text)
    cut = len(text) - limit if len(text) > limit else 0
    if cut:
        text = text[:limit]
    text = _CONTROL.sub(_escape, text)
    if cut:
        text += "... (%d more characters)" % cut
    return text


class OneLineFormatter(logging.Formatter):
    """A Formatter whose record messages are :func:`one_line`."""

    def format(self, record):
        record.message = one_line(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


def _journal_stderr():
    """Is stderr the journal (systemd's JOURNAL_STREAM names its device and inode)?"""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


class _State:
    handler = None
    path = ""
    level = "INFO"
    format = ""
    overrides = None  # the command line's (log file, level), set by apply()


_state = _State()


def _open(path):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    return logging.handlers.WatchedFileHandler(path, encoding="utf-8")


def setup(path="", level="INFO", fmt="", key="--log-file"):
    """Send this process's log to ``path`` (stderr when empty) at ``level`` with ``fmt``
    (lavacore's format when empty). Called again (SIGHUP), it applies what changed.
    Raises OSError naming nothing: the caller knows which option named the file."""
    root = logging.getLogger()
    if path != _state.path or _state.handler is None:
        handler = _open(path) if path else logging.StreamHandler(sys.stderr)
        if _state.handler is not None:
            root.removeHandler(_state.handler)
            _state.handler.close()
        else:
            for old in list(root.handlers):  # basicConfig's, or a caller's leftovers
                root.removeHandler(old)
        root.addHandler(handler)
        _state.handler, _state.path = handler, path
    default = JOURNAL_FORMAT if not path and _journal_stderr() else DEFAULT_FORMAT
    _state.handler.setFormatter(OneLineFormatter(fmt or default))
    _state.level, _state.format = level, fmt
    root.setLevel(getattr(logging, level.upper()))
    return _state.handler


def configured():
    """Has :func:`setup` run in this process?"""
    return _state.handler is not None


def log_file():
    return _state.path


def reopen():
    """Reopen the log file (SIGHUP): after a rotation that neither renamed nor truncated
    it, or to make sure. A no-op when logging goes to stderr or was not set up here."""
    handler = _state.handler
    if not isinstance(handler, logging.handlers.WatchedFileHandler):
        return False
    handler.acquire()
    try:
        if handler.stream is not None:
            handler.stream.close()
        handler.stream = handler._open()
        handler._statstream()
    finally:
        handler.release()
    return True


def apply(config, log_file=None, log_level=None):
    """The master's logging from its config (``[logging]``) and its command line
    (``--log-file``, ``--log-level``), which wins. ConfigError naming the option or key
    of a log file that cannot be opened."""
    from .config import ConfigError

    _state.overrides = (log_file, log_level)
    path = log_file or config.resolve(config.logging.file)
    try:
        setup(path, log_level or config.logging.level, config.logging.format)
    except OSError as exc:
        raise ConfigError("%s: cannot open %s: %s" % (
            "--log-file" if log_file else "[logging] file", path,
            exc.strerror or exc)) from None


def overrides():
    """(log file, log level) given on the command line to :func:`apply`, or Nones."""
    return getattr(_state, "overrides", None) or (None, None)


def reapply(config):
    """SIGHUP: ``[logging]`` as config.toml says now (the command line still wins); a
    no-op where :func:`apply` did not run (a master inside a test)."""
    if configured() and getattr(_state, "overrides", None) is not None:
        apply(config, *_state.overrides)
