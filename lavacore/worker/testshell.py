"""The built-in runner's test shell: inline test definitions run on the worker host.

Like LAVA's test shell, a definition's steps are one shell script, so a failing step does not
stop the next one; a bash ERR trap reports each failing step and its exit code. The script's
output is read as it comes and sent line by line (lvl ``target``); ``lava-test-case`` reports
arrive through a FIFO the runner reads in the same loop (see testcase.py).

Each definition's shell runs in a process group of its own, inside the runner's session, so
a timeout or a cancel can kill the whole step tree, and what a definition leaves running in
the background lives on until the job ends, as on a LAVA test device.
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

from . import procs, testcase

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
    status: str         # "done", "timeout" or "canceled"
    rc: int             # exit code of the script (None unless done)
    duration: float


class TestShell:
    """The test shell of one job: tools on PATH, the results FIFO, the shells' groups."""

    def __init__(self, root, env, sender, wake_fd, canceled):
        self.root = root
        self.env = env
        self.sender = sender
        self.wake_fd = wake_fd
        self.canceled = canceled
        self.bin_dir = os.path.join(root, "bin")
        self.fifo = os.path.join(root, "results.fifo")
        self.shell = shutil.which("bash", path=os.defpath + ":/usr/local/bin") or "/bin/sh"
        self.groups = []
        self._fifo_fd = None
        self._fifo_lines = LineSplitter(limit=8192)
        self._current = None  # (definition, step line table) being run

    def setup(self):
        os.makedirs(self.bin_dir)
        tool = os.path.join(self.bin_dir, "lava-test-case")
        with open(tool, "w") as f:
            f.write("#!/bin/sh\nexec %s -I -S %s \"$@\"\n"
                    % (shlex.quote(sys.executable), shlex.quote(testcase.__file__)))
        os.chmod(tool, 0o755)
        os.mkfifo(self.fifo, 0o600)
        # O_RDWR: the runner is always a writer too, so the FIFO never reports EOF between
        # two lava-test-case calls, and writers never wait for a reader.
        self._fifo_fd = os.open(self.fifo, os.O_RDWR | os.O_NONBLOCK)

    # -- one definition -----------------------------------------------------------------

    def run(self, definition, deadline):
        """Run one definition's steps until they end, ``deadline`` (monotonic) or cancel."""
        started = time.monotonic()
        workdir = os.path.join(self.root, definition.name)
        os.makedirs(workdir)
        script, lines = self._script(definition)
        path = os.path.join(self.root, definition.name + ".sh")
        with open(path, "w", encoding="utf-8") as f:
            f.write(script)
        env = dict(self.env)
        env.update(definition.params)
        env["PATH"] = self.bin_dir + ":" + (env.get("PATH") or os.defpath)
        env["TESTRUN_ID"] = definition.name
        env["LAVACORE_RESULTS"] = self.fifo
        self._current = (definition, lines)
        proc = subprocess.Popen([self.shell, path], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=workdir,
                                env=env, close_fds=True, process_group=0)
        self.groups.append(proc.pid)
        self.sender.log("debug", "%s: %s %s (pid %d) in %s" % (definition.name, self.shell,
                                                               path, proc.pid, workdir))
        status = self._pump(proc, deadline)
        if status != "done":
            self._stop(proc)
        self._read_results()
        proc.wait()
        duration = time.monotonic() - started
        return Outcome(status, proc.returncode if status == "done" else None, duration)

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
        definition, lines = self._current
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            self.sender.log("warning", "ignored a malformed test case report: %r" % line[:200])
            return
        name = record.get("definition") or definition.name
        if "step_failed" in record:
            step, text = _step_at(lines, record.get("step_failed"))
            self.sender.log("info", "%s: step %s exited with %s: %s"
                            % (name, step, record.get("rc"), text))
            return
        if not record.get("case") or record.get("result") not in testcase.RESULTS:
            self.sender.log("warning", "ignored an incomplete test case report: %r" % line[:200])
            return
        measurement = record.get("measurement")
        if measurement is not None and not isinstance(measurement, (int, float)):
            measurement = None
        self.sender.result(name, str(record["case"]), record["result"], measurement,
                           record.get("units"))

    def _script(self, definition):
        head = ["#!%s" % self.shell,
                "# lavacore-run: the steps of %s" % definition.name]
        if self.shell.endswith("bash"):
            # Report each failing step (its line) without stopping the script.
            head += ["__lavacore_failed() {",
                     "    printf '{\"step_failed\": %d, \"rc\": %d, \"definition\": \"%s\"}\\n' "
                     "\"$2\" \"$1\" \"$TESTRUN_ID\" > \"$LAVACORE_RESULTS\"",
                     "}",
                     "trap '__lavacore_failed $? $LINENO' ERR"]
        for name, value in sorted(definition.params.items()):
            head.append("export %s=%s" % (name, shlex.quote(value)))
        lines, body, line_no = [], [], len(head) + 1
        for number, step in enumerate(definition.steps, 1):
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
        """Stop what the definitions left running; return how many groups were alive."""
        alive = [g for g in self.groups if procs.group_alive(g)]
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


def _signal_group(pgid, sig):
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
