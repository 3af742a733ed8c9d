"""The built-in runner's test shell: test definitions run on the worker host.

A definition's steps are one shell script, so a failing step does not stop the next one; a
bash ERR trap reports each failing step and its exit code. Its ``install: steps`` run first,
as a script of their own that stops at the first failing step. The script's output is read
as it comes and sent line by line (lvl ``target``). LAVA's helpers (``lava-test-case``,
``lava-test-set``, ``lava-send``... see helpers/) are on the steps' PATH and report
through a FIFO the runner reads in the same loop: test cases (with the test set they are
in), references, log lines, events, and what ends the job (``lava-test-raise``, a
MultiNode call that could not complete), on which the runner stops the steps at once.

Each definition's shell runs in a process group of its own, inside the runner's session, so
a timeout or a cancel can kill the whole step tree, and what a definition leaves running in
the background lives on until the job ends, as on a LAVA test device; so do background
processes (lava-background-process-start), in process groups of their own.
"""

import dataclasses
import json
import os
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time

from . import procs
from .helpers import common as helpers_common, main as helpers_main

# A line longer than this is cut into pieces: one gigantic line must not become one
# gigantic log message (or eat the runner's memory).
MAX_LINE = 64 * 1024
READ_SIZE = 64 * 1024
# How long a shell may take to die after SIGTERM before it gets SIGKILL.
KILL_GRACE = 1.0
# After the shell exits, how long to keep reading output that background processes may
# still write; their output past that is not collected.
DRAIN_AFTER_EXIT = 2.0


class LineSplitter:
    """Bytes in, complete text lines out; lines over ``limit`` bytes are split."""

    def __init__(self, limit=MAX_LINE):
        self.limit = limit
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data
        lines, start, buf, limit = [], 0, self.buf, self.limit
        while True:
            nl = buf.find(b"\n", start, start + limit + 1)
            if nl >= 0:
                lines.append(self._text(buf[start:nl]))
                start = nl + 1
            elif len(buf) - start > limit:
                cut = start + limit
                # Cut before a UTF-8 continuation byte, not in the middle of a character.
                for back in range(4):
                    if buf[cut - back] & 0xC0 != 0x80:
                        cut -= back
                        break
                lines.append(self._text(buf[start:cut]))
                start = cut
            else:
                break
        del buf[:start]
        return lines

    def flush(self):
        rest, self.buf = self.buf, bytearray()
        return [self._text(rest)] if rest else []

    @staticmethod
    def _text(data):
        if data.endswith(b"\r"):
            data = data[:-1]
        return bytes(data).decode("utf-8", errors="replace")


@dataclasses.dataclass
class Outcome:
    status: str         # "done", "timeout", "canceled", "aborted" or "install_failed"
    rc: int             # exit code of the script (None unless done or install_failed)
    duration: float
    error: tuple = None  # (error_type, message) when aborted


RESULT_KEYS = ("definition", "case", "result", "measurement", "units")
# Levels a helper may write log lines at (common.log).
HELPER_LEVELS = ("debug", "info", "warning", "error")


class TestShell:
    """The test shell of one job: the helpers on PATH, the results FIFO, the shells'
    process groups. ``multinode``: the job's group, written for the MultiNode helpers
    (a dict, see helpers/multinode.py), or None."""

    def __init__(self, root, env, sender, wake_fd, canceled, multinode=None):
        self.root = root
        self.env = env
        self.sender = sender
        self.wake_fd = wake_fd
        self.canceled = canceled
        self.multinode = multinode
        self.bin_dir = os.path.join(root, "bin")
        self.fifo = os.path.join(root, "results.fifo")
        self.background = os.path.join(root, "background")
        self.cache = os.path.join(root, "lava_multi_node_cache.txt")
        self.multinode_conf = os.path.join(root, "multinode.json")
        self.shell = shutil.which("bash", path=os.defpath + ":/usr/local/bin") or "/bin/sh"
        self.groups = []
        self._fifo_fd = None
        self._fifo_lines = LineSplitter(limit=8192)
        self._current = None  # (definition, step line table) being run
        self._set = None      # the test set of lava-test-set start, until stop
        self._abort = None    # (error_type, message) a helper ended the job with

    def setup(self):
        os.makedirs(self.bin_dir)
        os.makedirs(self.background)
        main = os.path.abspath(helpers_main.__file__)
        for name in helpers_main.NAMES:
            tool = os.path.join(self.bin_dir, name)
            with open(tool, "w") as f:
                f.write("#!/bin/sh\nexec %s -I -S %s %s \"$@\"\n"
                        % (shlex.quote(sys.executable), shlex.quote(main), name))
            os.chmod(tool, 0o755)
        if self.multinode is not None:
            with open(self.multinode_conf, "w") as f:
                json.dump(dict(self.multinode, cache=self.cache), f)
        os.mkfifo(self.fifo, 0o600)
        # O_RDWR: the runner is always a writer too, so the FIFO never reports EOF between
        # two helper calls, and writers never wait for a reader.
        self._fifo_fd = os.open(self.fifo, os.O_RDWR | os.O_NONBLOCK)

    def workdir(self, definition):
        """Where a definition's steps run (a git definition's clone is made there)."""
        return os.path.join(self.root, definition.name)

    # -- one definition -----------------------------------------------------------------

    def run(self, definition, deadline):
        """Run one definition's install steps, then its steps, until they end,
        ``deadline`` (monotonic), cancel, or a helper that ends the job."""
        started = time.monotonic()
        workdir = self.workdir(definition)
        os.makedirs(workdir, exist_ok=True)
        env = dict(self.env)
        env.update(definition.params)
        env["PATH"] = self.bin_dir + ":" + (env.get("PATH") or os.defpath)
        env["TESTRUN_ID"] = definition.name
        env["LAVACORE_RESULTS"] = self.fifo
        env["LAVACORE_SHELL_DIR"] = self.root
        if self.multinode is not None:
            env["LAVACORE_MULTINODE"] = self.multinode_conf
            env["LAVA_MULTI_NODE_CACHE"] = self.cache
        self._set, self._abort = None, None
        try:
            if definition.install_steps:
                status, rc = self._execute(definition, "install", definition.install_steps,
                                           workdir, env, deadline)
                if status != "done" or rc != 0:
                    if status == "done":
                        status = "install_failed"
                    return self._outcome(status, rc, started)
            status, rc = self._execute(definition, "run", definition.steps, workdir, env,
                                       deadline)
            return self._outcome(status, rc, started)
        finally:
            self._set = None

    def _outcome(self, status, rc, started):
        if status == "aborted":
            return Outcome(status, None, time.monotonic() - started, self._abort)
        return Outcome(status, rc if status in ("done", "install_failed") else None,
                       time.monotonic() - started)

    def _execute(self, definition, stage, steps, workdir, env, deadline):
        script, lines = self._script(definition, steps, stop_on_error=stage == "install")
        path = os.path.join(self.root, "%s.%s.sh" % (definition.name, stage))
        with open(path, "w", encoding="utf-8") as f:
            f.write(script)
        self._current = (definition, lines, stage)
        proc = subprocess.Popen([self.shell, path], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=workdir,
                                env=env, close_fds=True, process_group=0)
        self.groups.append(proc.pid)
        self.sender.log("debug", "%s: %s%s %s (pid %d) in %s" % (
            definition.name, "install steps: " if stage == "install" else "", self.shell,
            path, proc.pid, workdir))
        status = self._pump(proc, deadline)
        if status != "done":
            self._stop(proc)
        self._read_results()
        if status == "done" and self._abort is not None:
            status = "aborted"
        proc.wait()
        return status, proc.returncode

    def _pump(self, proc, deadline):
        out = proc.stdout.fileno()
        os.set_blocking(out, False)
        splitter = LineSplitter()
        sel = selectors.DefaultSelector()
        sel.register(out, selectors.EVENT_READ, "out")
        sel.register(self._fifo_fd, selectors.EVENT_READ, "fifo")
        if self.wake_fd is not None:
            sel.register(self.wake_fd, selectors.EVENT_READ, "wake")
        exited_at, eof, status = None, False, "done"
        try:
            while True:
                now = time.monotonic()
                if self.canceled():
                    status = "canceled"
                    break
                if self._abort is not None:
                    status = "aborted"
                    break
                if now >= deadline:
                    status = "timeout"
                    break
                if exited_at is None and proc.poll() is not None:
                    exited_at = now
                if exited_at is not None and (eof or now - exited_at > DRAIN_AFTER_EXIT):
                    break
                # Bounded so a missed SIGCHLD only delays noticing the exit a little.
                for key, _ in sel.select(min(deadline - now, 0.25)):
                    if key.data == "out":
                        eof = self._read_output(out, splitter)
                        if eof:
                            sel.unregister(out)
                    elif key.data == "fifo":
                        self._read_results()
                    else:
                        _drain(self.wake_fd)
        finally:
            sel.close()
            for line in splitter.flush():
                self.sender.log("target", line)
            proc.stdout.close()
        return status

    def _read_output(self, fd, splitter):
        # A bounded batch per wake-up, so deadlines and cancels are seen during a flood.
        for _ in range(16):
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                return False
            if not data:
                return True
            for line in splitter.feed(data):
                self.sender.log("target", line)
        return False

    def _read_results(self):
        while True:
            try:
                data = os.read(self._fifo_fd, READ_SIZE)
            except BlockingIOError:
                return
            if not data:
                return
            for line in self._fifo_lines.feed(data):
                self._record(line)

    def _record(self, line):
        """One report of a helper (helpers/common.py)."""
        definition, lines, stage = self._current
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            self.sender.log("warning", "ignored a malformed test shell report: %r"
                            % line[:200])
            return
        name = _text(record.get("definition")) or definition.name
        if "step_failed" in record:
            step, text = _step_at(lines, record.get("step_failed"))
            self.sender.log("info", "%s: %sstep %s exited with %s: %s"
                            % (name, "install " if stage == "install" else "", step,
                               record.get("rc"), text))
        elif "testset" in record:
            self._test_set(name, record)
        elif "log" in record:
            level = record["log"] if record["log"] in HELPER_LEVELS else "info"
            self.sender.log(level, "%s: %s" % (name, _text(record.get("msg"))))
        elif "event" in record:
            self.sender.send(_event_line(_text(record["event"])))
        elif "raise" in record:
            if self._abort is None:
                self._abort = ("Test", _text(record["raise"]) or "lava-test-raise")
        else:
            self._case(name, record)

    def _test_set(self, name, record):
        if record["testset"] == "start" and record.get("name"):
            self._set = _text(record["name"])
            self.sender.log("info", "%s: starting test set %s" % (name, self._set))
        elif record["testset"] == "stop":
            if self._set is not None:
                self.sender.log("info", "%s: closing test set %s" % (name, self._set))
            self._set = None

    def _case(self, name, record):
        """A test case (lava-test-case, lava-test-reference, a MultiNode call), in the
        current test set; a failed MultiNode call also ends the job (``abort``)."""
        abort = record.get("abort")
        if not record.get("case") or record.get("result") not in helpers_common.RESULTS:
            self.sender.log("warning", "ignored an incomplete test case report: %r"
                            % json.dumps(record)[:200])
        else:
            measurement = record.get("measurement")
            if measurement is not None and (isinstance(measurement, bool) or
                                            not isinstance(measurement, (int, float))):
                measurement = None
            units = record.get("units")
            extra = {}
            if isinstance(record.get("reference"), str):
                extra["reference"] = record["reference"]
            if self._set is not None:
                extra["set"] = self._set
            self.sender.result(name, _text(record["case"]), record["result"], measurement,
                               None if units is None else _text(units), **extra)
        if isinstance(abort, dict) and self._abort is None:
            error_type = _text(abort.get("error_type")) or "Test"
            self._abort = (error_type[:64], _text(abort.get("message")) or "aborted")

    def _script(self, definition, steps, stop_on_error=False):
        head = ["#!%s" % self.shell,
                "# lavacore-run: the %s of %s" % ("install steps" if stop_on_error
                                                  else "steps", definition.name)]
        if self.shell.endswith("bash"):
            # Report each failing step (its line) without stopping the script.
            head += ["__lavacore_failed() {",
                     "    printf '{\"step_failed\": %d, \"rc\": %d, \"definition\": \"%s\"}\\n' "
                     "\"$2\" \"$1\" \"$TESTRUN_ID\" > \"$LAVACORE_RESULTS\"",
                     "}",
                     "trap '__lavacore_failed $? $LINENO' ERR"]
        if stop_on_error:
            head.append("set -e")
        for name, value in sorted(definition.params.items()):
            head.append("export %s=%s" % (name, shlex.quote(value)))
        lines, body, line_no = [], [], len(head) + 1
        for number, step in enumerate(steps, 1):
            lines.append((line_no, number, step))
            body.append(step)
            line_no += step.count("\n") + 1
        return "\n".join(head + body) + "\n", lines

    def _stop(self, proc):
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(KILL_GRACE)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc.pid, signal.SIGKILL)

    # -- end of job ---------------------------------------------------------------------

    def cleanup(self):
        """Stop what the definitions left running (their shells' groups and background
        processes); return how many groups were alive."""
        alive = [g for g in self.groups + self._background_groups() if procs.group_alive(g)]
        leftover = len(alive)
        for group in alive:
            _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE
        while alive and time.monotonic() < deadline:
            time.sleep(0.02)
            alive = [g for g in alive if procs.group_alive(g)]
        for group in alive:
            _signal_group(group, signal.SIGKILL)
        if self._fifo_fd is not None:
            os.close(self._fifo_fd)
            self._fifo_fd = None
        return leftover

    def _background_groups(self):
        groups = []
        try:
            names = os.listdir(self.background)
        except OSError:
            return groups
        for name in names:
            try:
                with open(os.path.join(self.background, name)) as f:
                    pgid = int(f.read().strip())
            except (OSError, ValueError):
                continue
            if pgid > 1 and pgid not in self.groups:
                groups.append(pgid)
        return groups


def _text(value, limit=4096):
    if value is None:
        return ""
    return (value if isinstance(value, str) else str(value))[:limit]


def _event_line(message):
    from .. import logformat

    return logformat.make_line("event", message)


def _signal_group(pgid, sig):
    if not pgid or pgid <= 1:  # 0 would be our own group, -1 everyone
        return False
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _drain(fd):
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass


def _step_at(lines, line_no):
    """(step number, step text) of a script line, from the table built with the script."""
    found = ("?", "")
    for start, number, text in lines:
        if isinstance(line_no, int) and line_no >= start:
            found = (number, text)
    return found[0], found[1].splitlines()[0][:200] if found[1] else ""
