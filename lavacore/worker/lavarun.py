"""``lavacore-lava-run``: LAVA's current lava-run (Debian's lava-dispatcher, LAVA 2020.09
and later) as a lavacore runner.

The worker starts it as it starts any runner, with lava-run's protocol v3 arguments
(``--device= --dispatcher= --output-dir= --job-id= --logging-url= job.yaml
[--env-dut=]``) and ``--lava-run=COMMAND``. Since 2020.09 lava-run no longer pushes its
log to a ZeroMQ socket: it POSTs batches of log records to
``<--url>/scheduler/internal/v1/jobs/<id>/logs/`` with a ``LAVA-Token`` header, the job of
lava-server's HTTP API. This bridge plays that endpoint for one job:

* it listens on 127.0.0.1 (a port the OS chooses) and starts lava-run in a process group of
  its own with ``--url`` pointing there and a token made for this job;
* each record of an authenticated, size-bounded post is checked (a bounded YAML mapping
  with ``lvl``) and forwarded to the master's log socket as ``[job_id, line]``, lava-logs'
  format, keeping the same local copy the built-in runner keeps (logsender.LOG_COPY), so
  a master killed during a job loses no line; the answer's ``line_count`` and the posts'
  ``index`` make a resent post count once;
* the signals the worker sends (CANCEL's SIGTERM, and its second SIGTERM) are passed to
  lava-run, which cancels on the first and gives up cleaning on the second;
* when lava-run ends, what it left running (qemu is started through pexpect, in a session
  of its own) is stopped: the bridge is a child subreaper, so nothing escapes it;
* the job always ends with one ``lava``/``job`` result line: lava-run's own, or, when
  lava-run died without sending one, a fail result carrying its exit status and the tail
  of its stderr.

lava-run writes description.yaml in the job dir, which the worker sends with END. The
token is on lava-run's command line, as lava-worker passes it: a local user who can read
other users' /proc entries could post log lines into this job, nothing more.
"""

import argparse
import hmac
import http.server
import json
import os
import resource
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.parse

from .. import __version__, logformat
from . import jobdir, procs, proctree
from .logsender import run_with_sender

DEFAULT_LAVA_RUN = "lava-run"
# lava-run's work space, <dir>/<dispatcher prefix><job id> (lava_common.constants): lava-run
# removes it at its end, but not when it is killed; lava-worker removes it then, and so do we.
LAVA_TMP = "/var/lib/lava/dispatcher/tmp"
LOG_PATH = "/scheduler/internal/v1/jobs/%s/logs/"
# One post holds at most 1000 records of lava-run (each under 10**6 characters); a body
# past this many bytes is read and dropped, its records counted as taken (lava-run would
# otherwise post it again forever).
MAX_BODY = 32 * 1024 * 1024
# One record: the master cuts lines at 1 MiB too.
MAX_RECORD = 1024 * 1024
MAX_CONNECTIONS = 8          # lava-run uses one; the rest is someone else
SOCKET_TIMEOUT = 30.0        # seconds a connection may sit idle inside a request
# lava-run's log sender (a process of lava-run's group) outlives a lava-run that was killed:
# it posts what it holds at its next interval, then waits forever for more.
SENDER_GRACE = 1.0           # seconds after that interval
LEFTOVER_GRACE = 3.0         # SIGTERM to SIGKILL for what lava-run left running
STDERR_TAIL = 16384
# The unescaped form only the top-level level of a results line can take (jobdir.log_info
# counts results lines with it, the master counts the test cases it made: both must agree).
_RESULTS = '"lvl": "results"'
_CANCEL_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                   signal.SIGUSR1, signal.SIGUSR2)


class Signals:
    """The worker's signals, passed on to lava-run once it runs (the first one seen before
    it starts means: do not start it)."""

    def __init__(self):
        self.received = []
        self.pid = None
        for sig in _CANCEL_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.received.append(signum)
        if self.pid is not None:
            _kill(self.pid, signum)

    def attach(self, pid):
        """lava-run runs as ``pid``: signals from now on go to it (and one that came while
        it was being started, too: once, as lava-run reads a second one as "give up")."""
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _CANCEL_SIGNALS)
        try:
            self.pid = pid
            if self.received:
                _kill(pid, self.received[0])
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def detach(self):
        self.pid = None


def _kill(pid, signum):
    try:
        os.kill(pid, signum)
    except OSError:
        pass


class Bridge:
    """lava-run's log endpoint for one job, and the end of the job."""

    def __init__(self, job_id, sender):
        self.job_id = str(job_id)
        self.path = LOG_PATH % self.job_id
        self.token = secrets.token_urlsafe(32)
        self.sender = sender
        self.lock = threading.Lock()
        self.accepted = 0      # records of lava-run taken (the index of the next one)
        self.final = None      # lava-run's lava/job result line, sent once lava-run ends
        self.final_msg = None
        self.posts = 0
        self.records = 0
        self.refused = {}      # why -> count of refused requests

    # -- records --------------------------------------------------------------------------

    def take(self, index, text):
        """The records of one post (``text``: its ``lines`` field); returns how many the
        post held, which lava-run takes as done."""
        records = _split(text)
        count = len(records)
        with self.lock:
            self.posts += 1
            skip = self.accepted - index
            if skip < 0:
                # Records lava-run counts as taken never came (a bridge restarted under
                # it, say): say so, and count from where lava-run is.
                self._send(logformat.make_line(
                    "warning", "lavacore-lava-run: %d log record(s) of lava-run were lost"
                    % -skip))
                self.accepted, skip = index, 0
            for record in records[skip:]:
                self._record(record)
            self.accepted += max(0, count - skip)
        return count

    def dropped(self, count, size, why):
        """A post whose records could not be read: counted as taken, and said."""
        with self.lock:
            self.posts += 1
            self.accepted += count
            self._send(logformat.make_line(
                "warning", "lavacore-lava-run: dropped a log post of lava-run (%d bytes,"
                " %d record(s)): %s" % (size, count, why)))

    def _record(self, raw):
        self.records += 1
        line = _checked(raw)
        if line is None:
            return  # a marker: the master keeps none, so none is sent
        text, lvl, msg = line
        if lvl == "results" and isinstance(msg, dict) and msg.get("definition") == "lava" \
                and msg.get("case") == "job":
            if self.final is None:
                # Held until lava-run has ended, so that the job's log ends with it and
                # what lava-run printed on stderr comes before it.
                self.final, self.final_msg = text, msg
                return
            text = logformat.make_line("warning", "lavacore-lava-run: a second lava/job"
                                       " result of lava-run ignored: %s" % _short(raw))
        self._send(text)

    def _send(self, line):
        self.sender.send(line)

    def log(self, lvl, msg):
        with self.lock:
            self._send(logformat.make_line(lvl, msg))

    def result(self, result, **extra):
        with self.lock:
            self._send(logformat.result_line("lava", "job", result, **extra))

    def send_final(self):
        with self.lock:
            self._send(self.final)

    def refuse(self, why):
        with self.lock:
            self.refused[why] = self.refused.get(why, 0) + 1


def _split(text):
    """lava-run's ``lines`` field ("- " + "\\n- ".join(records)) as a list of records."""
    if not text:
        return []
    if text.startswith("- "):
        text = text[2:]
    return [record.replace("\n", " ") for record in text.split("\n- ")]


def _short(text, limit=1000):
    return text if len(text) <= limit else text[:limit] + "..."


def _checked(raw):
    """(line to send, lvl, msg) for one record of lava-run, None for a marker. A record
    that is not a log line of the expected form becomes a warning line saying so."""
    if len(raw) > MAX_RECORD:
        return (logformat.make_line("warning", "lavacore-lava-run: a log record of %d"
                                    " characters dropped (more than %d)"
                                    % (len(raw), MAX_RECORD)), "warning", None)
    try:
        data = logformat.parse_line(raw)
    except ValueError as exc:  # safeyaml.InputError included
        return (logformat.make_line("warning", "lavacore-lava-run: lava-run sent a record"
                                    " that is not a log line (%s): %s"
                                    % (" ".join(str(exc).split()), _short(raw))),
                "warning", None)
    lvl, msg = data.get("lvl"), data.get("msg")
    if not isinstance(lvl, str) or not lvl:
        return (logformat.make_line("warning", "lavacore-lava-run: a log record without"
                                    " a level: %s" % _short(raw)), "warning", None)
    if lvl == "marker":
        return None
    if lvl == "results" and not (isinstance(msg, dict) and "case" in msg
                                 and "result" in msg):
        return (logformat.make_line("warning", "lavacore-lava-run: a results record"
                                    " without case and result: %s" % _short(raw)),
                "warning", None)
    expected = 1 if lvl == "results" else 0
    if raw.count(_RESULTS) == expected:
        return raw, lvl, msg  # lava-run's own line, as lava-logs took it
    # Written another way (YAML has several), or the level's text nested in a message:
    # sent in lavacore's form, where only the level can hold it.
    text = logformat.dumps(data)
    if text.count(_RESULTS) == expected:
        return text, lvl, msg
    if lvl == "results":
        return (logformat.make_line("warning", "lavacore-lava-run: a results record with"
                                    " results nested in it: %s" % _short(raw)),
                "warning", None)
    return logformat.make_line(lvl, logformat.dumps(msg)), lvl, None


# -- the HTTP endpoint --------------------------------------------------------------------

class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False
    request_queue_size = 16

    def __init__(self, bridge):
        self.bridge = bridge
        self.active = 0
        self.active_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), Handler)

    def process_request(self, request, client_address):
        with self.active_lock:
            full = self.active >= MAX_CONNECTIONS
            if not full:
                self.active += 1
        if full:
            self.bridge.refuse("too many connections")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.active_lock:
                self.active -= 1

    def handle_error(self, request, client_address):
        # A peer that misbehaved (reset, timeout): not a traceback on the job's stderr.
        self.bridge.refuse("broken connection")

    @property
    def url(self):
        host, port = self.server_address[:2]
        return "http://%s:%d" % (host, port)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT
    server_version = "lavacore-lava-run/%s" % __version__
    sys_version = ""

    def log_message(self, format, *args):
        pass  # lava-run's stderr goes to END: keep it lava-run's

    def _answer(self, code, data):
        body = json.dumps(data).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _refuse(self, code, why):
        self.server.bridge.refuse(why)
        self.close_connection = True
        self._answer(code, {"error": why})

    def do_GET(self):
        self._refuse(405, "only POST is served")

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def do_POST(self):
        bridge = self.server.bridge
        if urllib.parse.urlsplit(self.path).path != bridge.path:
            self._refuse(404, "unknown path")
            return
        token = self.headers.get("LAVA-Token", "")
        if not hmac.compare_digest(token.encode("utf-8", "replace"), bridge.token.encode()):
            self._refuse(403, "invalid token")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._refuse(411, "a Content-Length is needed")
            return
        if length < 0:
            self._refuse(400, "invalid Content-Length")
            return
        if length > MAX_BODY:
            count = self._discard(length)
            if count is None:
                return
            bridge.dropped(count, length, "larger than %d bytes" % MAX_BODY)
            self._answer(200, {"line_count": count})
            return
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            bridge.refuse("body cut short")
            return
        try:
            form = urllib.parse.parse_qs(body.decode("utf-8", "replace"),
                                         keep_blank_values=True, max_num_fields=16)
            lines = form["lines"][0]
            index = int(form["index"][0])
        except (KeyError, IndexError, ValueError):
            self._refuse(400, "'lines' and 'index' are needed")
            return
        if index < 0:
            self._refuse(400, "invalid 'index'")
            return
        self._answer(200, {"line_count": bridge.take(index, lines)})

    def _discard(self, length):
        """Read a body too large to keep, counting its records: the first, and one after
        each encoded newline followed by the "-" that starts a record."""
        count, tail, left = 1, b"", length
        while left:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                self.close_connection = True
                self.server.bridge.refuse("body cut short")
                return None
            left -= len(chunk)
            data = tail + chunk.upper()
            count += data.count(b"%0A-")
            tail = data[-3:]  # a match cut between two chunks; never a whole one
        return count


# -- the job --------------------------------------------------------------------------------

def _tail(fd, limit=STDERR_TAIL):
    """The end of what was written to our ``fd`` (a regular file: the job dir's stdout or
    stderr, which lava-run shares), as text; "" for anything else."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        with open("/proc/self/fd/%d" % fd, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _excerpt(text, head=600, tail=1200):
    """Its beginning (where a crash says what it was) and its end."""
    if len(text) <= head + tail + 5:
        return text
    return text[:head] + "\n[...]\n" + text[-tail:]


def _signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return "signal %d" % number


class JobRun:
    def __init__(self, args, sender, signals):
        self.args = args
        self.sender = sender
        self.signals = signals
        self.bridge = Bridge(args.job_id, sender)
        self.server = None
        self.proc = None
        self.started = time.monotonic()
        self.lava_tmp = LAVA_TMP

    def lava_run_argv(self, command, url):
        args = self.args
        # Separate words for --job-id and --output-dir: the worker finds its runner by
        # "--job-id=<id>" and "--output-dir=<dir>", which must match the bridge only.
        argv = list(command) + [
            "--job-id", str(args.job_id), "--output-dir", args.output_dir,
            "--url=%s" % url, "--token=%s" % self.bridge.token,
            "--job-log-interval=%d" % args.log_interval,
            "--device=%s" % args.device]
        if args.dispatcher:
            argv.append("--dispatcher=%s" % args.dispatcher)
        if args.env_dut:
            argv.append("--env-dut=%s" % args.env_dut)
        argv.append(args.definition)
        return argv

    def run(self):
        """Run lava-run to its end; True if its job passed."""
        bridge = self.bridge
        command = shlex.split(self.args.lava_run) or [DEFAULT_LAVA_RUN]
        found = shutil.which(command[0])
        bridge.log("info", "lavacore-lava-run %s: job %s runs LAVA's lava-run (%s)"
                   % (__version__, self.args.job_id, found or command[0]))
        if found is None:
            return self._fail("Infrastructure", "lava-run command %r not found on PATH"
                              " (Debian package lava-dispatcher)" % command[0])
        command[0] = found
        if not proctree.become_subreaper():
            bridge.log("warning", "lavacore-lava-run: cannot become a child subreaper:"
                       " processes lava-run leaves behind may outlive the job")
        try:
            self.server = Server(bridge)
        except OSError as exc:
            return self._fail("Infrastructure", "cannot listen on 127.0.0.1 for lava-run's"
                              " log: %s" % (exc.strerror or exc))
        serving = threading.Thread(target=self.server.serve_forever,
                                   kwargs={"poll_interval": 0.1}, daemon=True,
                                   name="lava-run log endpoint")
        serving.start()
        try:
            return self._run(command)
        finally:
            self.server.shutdown()
            self.server.server_close()

    def _run(self, command):
        bridge = self.bridge
        if self.signals.received:
            return self._fail("Canceled", "job canceled (%s) before lava-run started"
                              % _signal_name(self.signals.received[0]))
        argv = self.lava_run_argv(command, self.server.url)
        try:
            # A process group of its own, as lava-worker starts it: the worker's signals
            # reach lava-run through us, never its log sender process directly.
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, close_fds=True,
                                         process_group=0, cwd=self.args.output_dir)
        except OSError as exc:
            return self._fail("Infrastructure", "cannot start lava-run: %s"
                              % (exc.strerror or exc))
        self.signals.attach(self.proc.pid)
        rc = self.proc.wait()
        self.signals.detach()
        self._wind_down(self.proc.pid)
        if bridge.refused:
            bridge.log("warning", "lavacore-lava-run: refused requests on lava-run's log"
                       " endpoint: %s" % ", ".join("%s (%d)" % item
                                                    for item in sorted(bridge.refused.items())))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        bridge.log("debug", "lavacore-lava-run: lava-run ended (%s) after %.1f s: %d log"
                   " record(s) in %d post(s), forwarded with %.3f s of CPU"
                   % (self._status(rc), time.monotonic() - self.started, bridge.records,
                      bridge.posts, usage.ru_utime + usage.ru_stime))
        if bridge.final is not None:
            if rc != 0:
                self._stderr_lines()
            bridge.send_final()
            return bridge.final_msg.get("result") == "pass"
        self._stderr_lines()
        if rc < 0:
            error_type = "Infrastructure"
            message = "lava-run was killed by %s before it sent the job's result" % (
                _signal_name(-rc))
        else:
            error_type = "Bug"
            message = "lava-run exited with code %d without sending the job's result" % rc
        stderr = _tail(2)
        # Where lava-run prints what it says before its log exists ("lava-run should be
        # executed as root"); without a log socket our own lines go there.
        stdout = _tail(1) if self.args.logging_url else ""
        if stderr:
            message += "; its stderr: " + _excerpt(stderr)
        elif stdout:
            message += "; its stdout: " + _excerpt(stdout)
        return self._fail(error_type, message, stderr=False)

    @staticmethod
    def _status(rc):
        return "killed by %s" % _signal_name(-rc) if rc < 0 else "exit code %d" % rc

    def _wind_down(self, pid):
        """lava-run has exited: give its log sender (same process group) time to post
        what it holds, then stop whatever lava-run left running."""
        deadline = time.monotonic() + self.args.log_interval + SENDER_GRACE
        while procs.group_alive(pid) and time.monotonic() < deadline:
            proctree.reap()
            time.sleep(0.02)
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        left = proctree.stop_below(os.getpid(), LEFTOVER_GRACE)
        if left:
            self.bridge.log("info", "lavacore-lava-run: stopped %d process(es) lava-run left"
                            " running: %s" % (len(left), ", ".join(
                                "%s (pid %d)" % (comm, p) for p, comm in left[:10])))
        self._remove_work_space()

    def _remove_work_space(self):
        job_id = str(self.args.job_id)
        if not job_id.isdigit():
            return
        text = ""
        if self.args.dispatcher:
            try:
                with open(self.args.dispatcher, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError:
                pass
        path = os.path.join(self.lava_tmp, jobdir.prefix(int(job_id), text) + job_id)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            self.bridge.log("debug", "lavacore-lava-run: removed %s, which lava-run left"
                            % path)

    def _stderr_lines(self):
        """What lava-run wrote on stderr, into the job's log: its first lines (where a
        crash says what it was) and its last ones."""
        lines = _tail(2).splitlines()
        if not lines:
            return
        if len(lines) > 40:
            lines = lines[:10] + ["[... %d line(s)]" % (len(lines) - 40)] + lines[-30:]
        self.bridge.log("error", "lava-run's stderr:")
        for line in lines:
            self.bridge.log("error", line)

    def _fail(self, error_type, message, stderr=True):
        if stderr:
            self._stderr_lines()
        self.bridge.log("error", "%s error: %s" % (error_type, message))
        self.bridge.result("fail", error_type=error_type, error_msg=message)
        sys.stderr.write("lavacore-lava-run: job %s failed (%s): %s\n"
                         % (self.args.job_id, error_type, message))
        return False


def build_parser():
    p = argparse.ArgumentParser(
        prog="lavacore-lava-run",
        description="Run one job with LAVA's lava-run (2020.09 and later), its HTTP log"
                    " forwarded to a lavacore master's log socket.")
    p.add_argument("definition", help="the job definition (job.yaml)")
    p.add_argument("--device", required=True, help="the device config (device.yaml)")
    p.add_argument("--dispatcher", help="the dispatcher config (dispatcher.yaml)")
    p.add_argument("--output-dir", required=True, help="the job dir")
    p.add_argument("--job-id", required=True, help="the job id")
    p.add_argument("--logging-url", help="the master's log socket (lines go to stdout"
                                         " without it)")
    p.add_argument("--env-dut", help="environment file for the device under test")
    p.add_argument("--ipv6", action="store_true")
    p.add_argument("--master-cert", help="the master's public key (CURVE)")
    p.add_argument("--slave-cert", help="this worker's key pair (CURVE)")
    p.add_argument("--lava-run", default=DEFAULT_LAVA_RUN, metavar="COMMAND",
                   help="lava-run's command, e.g. 'nice lava-run' (default: %(default)s)")
    p.add_argument("--log-interval", type=int, default=1, metavar="SECONDS",
                   help="lava-run's --job-log-interval (default: %(default)s)")
    return p


def main(argv=None):
    # Before anything slow: a cancel that comes while we start must still be seen.
    signals = Signals()
    args = build_parser().parse_args(argv)
    args.output_dir = os.path.abspath(args.output_dir)
    if args.log_interval < 1:
        print("lavacore-lava-run: --log-interval must be at least 1", file=sys.stderr)
        return 1
    return run_with_sender("lavacore-lava-run", args,
                           lambda sender: JobRun(args, sender, signals).run())


if __name__ == "__main__":
    sys.exit(main())
