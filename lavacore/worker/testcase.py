"""``lava-test-case``: how a test step reports a test case to lavacore-run.

    lava-test-case NAME --result pass|fail|skip|unknown [--measurement M] [--units U]
    lava-test-case NAME --shell CMD...

The runner puts a wrapper on the steps' PATH that runs this file with ``python -I -S``, so
it uses the standard library only. A report is one JSON line written to the FIFO named by
``$LAVACORE_RESULTS``, which the runner reads while the steps run: the case reaches the
master as it happens. A line shorter than PIPE_BUF is written atomically, so concurrent
callers cannot interleave; a FIFO (unlike a unix socket) has no path-length limit and
still works from a step whose stdout is redirected.
"""

import errno
import json
import os
import subprocess
import sys

RESULTS = ("pass", "fail", "skip", "unknown")
USAGE = ("usage: lava-test-case NAME --result pass|fail|skip|unknown "
         "[--measurement M] [--units U]\n"
         "       lava-test-case NAME --shell CMD...")
# Under PIPE_BUF (4096) with room for the JSON around the fields.
MAX_FIELD = 900


class UsageError(Exception):
    pass


def parse(argv):
    if not argv or not argv[0] or argv[0].startswith("-"):
        raise UsageError("a test case name comes first")
    name, rest = argv[0], argv[1:]
    if rest and rest[0] == "--shell":
        if len(rest) < 2:
            raise UsageError("--shell needs a command")
        return {"case": name, "shell": rest[1:]}
    fields = {"case": name}
    options = {"--result": "result", "--measurement": "measurement", "--units": "units"}
    i = 0
    while i < len(rest):
        flag, value = rest[i], None
        if "=" in flag and flag.split("=", 1)[0] in options:
            flag, value = flag.split("=", 1)
            i += 1
        elif flag in options and i + 1 < len(rest):
            value = rest[i + 1]
            i += 2
        else:
            raise UsageError("unexpected argument %r" % flag)
        fields[options[flag]] = value
    if "result" not in fields:
        raise UsageError("--result is required")
    fields["result"] = fields["result"].lower()
    if fields["result"] not in RESULTS:
        raise UsageError("--result must be one of %s, got %r" % ("|".join(RESULTS),
                                                                 fields["result"]))
    if "measurement" in fields:
        try:
            fields["measurement"] = float(fields["measurement"])
        except ValueError:
            raise UsageError("--measurement must be a number, got %r"
                             % fields["measurement"]) from None
    return fields


def run_shell(command):
    # One argument is a shell command line (pipes work); several are a command and its
    # arguments, as LAVA's `$*` ran them.
    argv = ["/bin/sh", "-c", command[0]] if len(command) == 1 else command
    try:
        return subprocess.call(argv)
    except OSError as exc:
        sys.stderr.write("lava-test-case: cannot run %s: %s\n" % (command[0], exc))
        return 127


def report(fields):
    path = os.environ.get("LAVACORE_RESULTS")
    if not path:
        raise OSError("LAVACORE_RESULTS is not set: not running under lavacore-run")
    record = {"definition": os.environ.get("TESTRUN_ID", "")}
    for key, value in fields.items():
        record[key] = value[:MAX_FIELD] if isinstance(value, str) else value
    data = (json.dumps(record) + "\n").encode("utf-8", errors="replace")
    try:
        # Non-blocking open fails at once (ENXIO) when the runner is gone instead of
        # waiting forever for a reader.
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise OSError("the runner is not reading %s" % path) from None
        raise
    try:
        os.set_blocking(fd, True)
        os.write(fd, data)
    finally:
        os.close(fd)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        fields = parse(argv)
    except UsageError as exc:
        sys.stderr.write("lava-test-case: %s\n%s\n" % (exc, USAGE))
        return 1
    if "shell" in fields:
        rc = run_shell(fields.pop("shell"))
        fields["result"] = "pass" if rc == 0 else "fail"
    try:
        report(fields)
    except OSError as exc:
        sys.stderr.write("lava-test-case: cannot report %s: %s\n" % (fields["case"], exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
