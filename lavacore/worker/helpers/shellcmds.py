"""LAVA's test shell helpers, for the steps lavacore-run runs on the worker host.

    lava-test-case NAME --result pass|fail|skip|unknown [--measurement M] [--units U]
    lava-test-case NAME --shell CMD...
    lava-test-set start NAME | stop
    lava-test-reference NAME --result RESULT --reference URL
    lava-test-raise MESSAGE...
    lava-test-event MESSAGE
    lava-background-process-start NAME --cmd CMD...
    lava-background-process-stop NAME

Their arguments, exit codes and ``<LAVA_SIGNAL_...>`` lines are LAVA's (lava_test_shell in
LAVA 2020.05). The V1 helpers LAVA removed in 2017 (``lava-test-case-attach``,
``lava-test-run-attach``, ``lava-test-case-metadata``) are there only to refuse, with a
line saying so in the job log, instead of "command not found".
"""

import os
import signal as signals
import sys
import time

try:
    from . import common
except ImportError:  # run by main.py as a plain script
    import common

# Names end up in a signal line or a file name: no blanks, no '>' (the end of a LAVA
# marker), no '/'. (No re, no subprocess at import: every helper call pays for those.)
NAME_FORBIDDEN = frozenset("<>/")
KILL_GRACE = 1.0

TEST_CASE_USAGE = ("usage: lava-test-case NAME --result pass|fail|skip|unknown "
                   "[--measurement M] [--units U]\n"
                   "       lava-test-case NAME --shell CMD...")


def _name(value, what):
    if not value or len(value) > 200 or any(c.isspace() or c in NAME_FORBIDDEN
                                            for c in value):
        raise common.UsageError("%s %r: a name without blanks, '<', '>' or '/'"
                                % (what, value))
    return value


# -- lava-test-case ----------------------------------------------------------------------

def parse_test_case(argv):
    if not argv or not argv[0] or argv[0].startswith("-"):
        raise common.UsageError("a test case name comes first")
    name, rest = _name(argv[0], "test case"), argv[1:]
    if rest and rest[0] == "--shell":
        if len(rest) < 2:
            raise common.UsageError("--shell needs a command")
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
            raise common.UsageError("unexpected argument %r" % flag)
        fields[options[flag]] = value
    if "result" not in fields:
        raise common.UsageError("--result is required")
    fields["result"] = _result(fields["result"])
    if "measurement" in fields:
        try:
            fields["measurement"] = float(fields["measurement"])
        except ValueError:
            raise common.UsageError("--measurement must be a number, got %r"
                                    % fields["measurement"]) from None
    return fields


def _result(value):
    result = value.lower()
    if result not in common.RESULTS:
        raise common.UsageError("--result must be one of %s, got %r"
                                % ("|".join(common.RESULTS), value))
    return result


def _run_shell(command):
    import subprocess

    # One argument is a shell command line (pipes work); several are a command and its
    # arguments.
    argv = ["/bin/sh", "-c", command[0]] if len(command) == 1 else command
    try:
        return subprocess.call(argv)
    except OSError as exc:
        sys.stderr.write("lava-test-case: cannot run %s: %s\n" % (command[0], exc))
        return 127


def _measurement_text(value):
    return "%g" % value if value == value and abs(value) < 1e15 else repr(value)


def lava_test_case(argv):
    try:
        fields = parse_test_case(argv)
    except common.UsageError as exc:
        return common.error("lava-test-case", "%s\n%s" % (exc, TEST_CASE_USAGE))
    if "shell" in fields:
        common.signal("<LAVA_SIGNAL_STARTTC %s>" % fields["case"])
        rc = _run_shell(fields.pop("shell"))
        common.signal("<LAVA_SIGNAL_ENDTC %s>" % fields["case"])
        fields["result"] = "pass" if rc == 0 else "fail"
    data = " RESULT=%s" % fields["result"]
    if fields.get("units") is not None:
        data += " UNITS=%s" % fields["units"]
    if fields.get("measurement") is not None:
        data += " MEASUREMENT=%s" % _measurement_text(fields["measurement"])
    common.signal("<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=%s%s>" % (fields["case"], data))
    try:
        common.report(fields)
    except OSError as exc:
        return common.error("lava-test-case", "cannot report %s: %s" % (fields["case"], exc))
    # LAVA: a --shell command that fails is a failed test case, not a failed step.
    return 0


# -- lava-test-set, lava-test-reference, lava-test-raise, lava-test-event -----------------

def lava_test_set(argv):
    usage = "usage: lava-test-set start NAME | lava-test-set stop"
    try:
        if argv[:1] == ["start"] and len(argv) == 2:
            name = _name(argv[1], "test set")
            record, line = {"testset": "start", "name": name}, "START %s" % name
        elif argv == ["stop"]:
            record, line = {"testset": "stop"}, "STOP"
        else:
            raise common.UsageError("expected 'start NAME' or 'stop'")
    except common.UsageError as exc:
        return common.error("lava-test-set", "%s\n%s" % (exc, usage))
    common.signal("<LAVA_SIGNAL_TESTSET %s>" % line)
    try:
        common.report(record)
    except OSError as exc:
        return common.error("lava-test-set", "cannot report: %s" % exc)
    return 0


def lava_test_reference(argv):
    usage = ("usage: lava-test-reference NAME --result pass|fail|skip|unknown "
             "--reference URL")
    try:
        if not argv or argv[0].startswith("-"):
            raise common.UsageError("a test case name comes first")
        fields = {"case": _name(argv[0], "test case")}
        rest = argv[1:]
        while rest:
            if rest[0] in ("--result", "--reference") and len(rest) > 1:
                fields[rest[0][2:]] = rest[1]
                rest = rest[2:]
            else:
                raise common.UsageError("unexpected argument %r" % rest[0])
        for key in ("result", "reference"):
            if key not in fields:
                raise common.UsageError("--%s must be specified" % key)
        fields["result"] = _result(fields["result"])
        if any(c.isspace() or c in "<>" for c in fields["reference"]) or \
                not fields["reference"]:
            raise common.UsageError("--reference: a URL without blanks, '<' or '>'")
    except common.UsageError as exc:
        return common.error("lava-test-reference", "%s\n%s" % (exc, usage))
    common.signal("<LAVA_SIGNAL_TESTREFERENCE %s %s %s>" % (fields["case"], fields["result"],
                                                             fields["reference"]))
    try:
        common.report(fields)
    except OSError as exc:
        return common.error("lava-test-reference", "cannot report: %s" % exc)
    return 0


def lava_test_raise(argv):
    message = " ".join(argv).strip()
    if not message:
        return common.error("lava-test-raise", "a message is required\n"
                                               "usage: lava-test-raise MESSAGE")
    common.signal("<LAVA_SIGNAL_TESTRAISE %s>" % message)
    try:
        # The runner ends the job (a TestError, as LAVA) and stops these steps.
        return common.stop_job({"raise": common.clip(message, 2000)})
    except OSError as exc:
        common.error("lava-test-raise", "cannot report: %s" % exc)
        return 1


def lava_test_event(argv):
    if len(argv) != 1 or not argv[0]:
        return common.error("lava-test-event", "usage: lava-test-event MESSAGE")
    common.signal("<LAVA_SIGNAL_TESTEVENT %s>" % argv[0])
    try:
        common.report({"event": argv[0]})
    except OSError as exc:
        return common.error("lava-test-event", "cannot report: %s" % exc)
    return 0


# -- background processes ----------------------------------------------------------------

def _pid_file(name):
    directory = os.path.join(common.shell_dir("background"), "background")
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, name + ".pid")


def _alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lava_background_process_start(argv):
    """LAVA's helper restarts the command every second in a loop; this one starts it once,
    in a process group of its own, which lava-background-process-stop (or the end of the
    job) stops with everything it started."""
    usage = "usage: lava-background-process-start NAME --cmd CMD..."
    helper = "lava-background-process-start"
    try:
        if len(argv) < 3 or argv[1] != "--cmd":
            raise common.UsageError("expected NAME --cmd CMD")
        name = _name(argv[0], "process")
        command = " ".join(argv[2:])
        path = _pid_file(name)
    except common.UsageError as exc:
        return common.error(helper, "%s\n%s" % (exc, usage))
    except OSError as exc:
        return common.error(helper, str(exc))
    try:
        with open(path) as f:
            pgid = int(f.read().strip() or 0)
        if pgid and _alive(pgid):
            return common.error(helper, "a background process %s already runs (pid %d)"
                                % (name, pgid))
    except (OSError, ValueError):
        pass
    import subprocess

    try:
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL,
                                process_group=0, close_fds=True)
    except OSError as exc:
        return common.error(helper, "cannot start %s: %s" % (command, exc))
    with open(path, "w") as f:
        f.write("%d\n" % proc.pid)
    try:
        common.log("info", "background process %s started (pid %d): %s"
                   % (name, proc.pid, common.clip(command, 500)))
    except OSError:
        pass
    return 0


def lava_background_process_stop(argv):
    helper = "lava-background-process-stop"
    try:
        if len(argv) != 1:
            raise common.UsageError("expected NAME")
        name = _name(argv[0], "process")
        path = _pid_file(name)
    except common.UsageError as exc:
        return common.error(helper, "%s\nusage: %s NAME" % (exc, helper))
    except OSError as exc:
        return common.error(helper, str(exc))
    try:
        with open(path) as f:
            pgid = int(f.read().strip())
    except (OSError, ValueError):
        return common.error(helper, "no background process %s was started" % name)
    stopped = stop_group(pgid)
    try:
        os.unlink(path)
    except OSError:
        pass
    if stopped:
        try:
            common.log("info", "background process %s stopped (pid %d)" % (name, pgid))
        except OSError:
            pass
    return 0


def stop_group(pgid, grace=KILL_GRACE):
    """SIGTERM to a process group, SIGKILL after ``grace``; True if it was alive."""
    try:
        os.killpg(pgid, signals.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pgid):
        time.sleep(0.02)
    try:
        os.killpg(pgid, signals.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return True


# -- what LAVA removed -------------------------------------------------------------------

REMOVED = {
    "lava-test-case-attach": "attached files to a test case",
    "lava-test-run-attach": "attached files to a test run",
    "lava-test-case-metadata": "added metadata to a test case",
}


def removed(helper):
    def refuse(argv):
        message = ("%s (which %s) was a LAVA V1 helper, removed from LAVA in 2017.12; "
                   "neither LAVA V2 nor lavacore-run provides it: publish files from the "
                   "steps themselves, or record what you need with lava-test-case"
                   % (helper, REMOVED[helper]))
        try:
            common.log("warning", message)
        except OSError:
            pass
        return common.error(helper, message, code=127)
    return refuse


COMMANDS = {
    "lava-test-case": lava_test_case,
    "lava-test-set": lava_test_set,
    "lava-test-reference": lava_test_reference,
    "lava-test-raise": lava_test_raise,
    "lava-test-event": lava_test_event,
    "lava-background-process-start": lava_background_process_start,
    "lava-background-process-stop": lava_background_process_stop,
}
COMMANDS.update({name: removed(name) for name in REMOVED})
