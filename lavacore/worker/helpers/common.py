"""What every test shell helper shares: its report to lavacore-run and LAVA's markers.

A report is one JSON line written to the FIFO named by ``$LAVACORE_RESULTS``, which the
runner reads while the steps run, so a result reaches the master as it happens. Lines
shorter than PIPE_BUF are written atomically: helpers called at the same time (background
steps) cannot interleave, and two helpers called one after the other are read in order.
A FIFO (unlike a unix socket) has no path-length limit and still works from a step whose
stdout is redirected.

The ``<LAVA_SIGNAL_...>`` lines LAVA's helpers print are printed too, so a log reads as
LAVA's does; they are for people and scripts reading the log, the runner reads the FIFO.
"""

import errno
import json
import os
import sys
import time

RESULTS = ("pass", "fail", "skip", "unknown")
# One record stays under PIPE_BUF (4096 bytes), so its write is atomic.
MAX_RECORD = 4000
MAX_FIELD = 900
# After a report that ends the job (lava-test-raise, a failed MultiNode call) the helper
# waits for the runner to stop the steps, so that no further step runs meanwhile; bounded
# in case no runner reads the report (a helper run by hand).
STOP_WAIT = 60.0


class UsageError(Exception):
    """Wrong arguments: the text says what, the helper prints its usage."""


class ReportError(OSError):
    """The runner cannot be told (no runner, or it stopped reading)."""


def clip(value, limit=MAX_FIELD):
    return value[:limit] if isinstance(value, str) else value


def signal(text):
    """LAVA's ``signal``: the marker line on stdout."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def report(record):
    """Send one record to the runner (see the module docstring)."""
    path = os.environ.get("LAVACORE_RESULTS")
    if not path:
        raise ReportError("LAVACORE_RESULTS is not set: not running under lavacore-run")
    record = {key: clip(value) for key, value in record.items()}
    record.setdefault("definition", os.environ.get("TESTRUN_ID", ""))
    data = (json.dumps(record) + "\n").encode("utf-8", errors="replace")
    if len(data) > MAX_RECORD:
        raise ReportError("report too long (%d bytes)" % len(data))
    try:
        # Non-blocking open fails at once (ENXIO) when the runner is gone instead of
        # waiting forever for a reader.
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise ReportError("the runner is not reading %s" % path) from None
        raise
    try:
        os.set_blocking(fd, True)
        os.write(fd, data)
    finally:
        os.close(fd)


def log(lvl, msg):
    """A line in the job log at one of the runner's levels (info, warning, error)."""
    report({"log": lvl, "msg": msg})


def stop_job(record):
    """Report what ends the job, then wait for the runner to stop the steps."""
    report(record)
    sys.stdout.flush()
    deadline = time.monotonic() + STOP_WAIT
    while time.monotonic() < deadline:
        time.sleep(0.5)
    return 1


def error(helper, message, code=1):
    sys.stderr.write("%s: %s\n" % (helper, message))
    sys.stderr.flush()
    return code


def shell_dir(helper):
    path = os.environ.get("LAVACORE_SHELL_DIR")
    if not path or not os.path.isdir(path):
        raise ReportError("LAVACORE_SHELL_DIR is not set: not running under lavacore-run")
    return path
