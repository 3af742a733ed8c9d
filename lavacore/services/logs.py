"""The lava-logs role: a PULL socket taking ``[job_id, line]`` from runners.

Lines are appended, with LAVA's ``"- "`` prefix, to the job's ``output.yaml``; ``results``
lines become test cases; the ``lava``/``job`` result is recorded and, with END, decides the
job's health. Work is done in batches: the socket is drained, lines are grouped per job,
written with one write per job, and test cases are stored in one transaction per batch.
"""

import collections
import json
import os

import gevent
import gevent.lock
import zmq.green as zmq

from .. import logformat
from ..jobfiles import open_append
from ..models import TestCase
from ..storage import NotFound, StorageError
from .base import Service

BATCH = 5000
OPEN_FILES = 256
MAX_LINE = 1024 * 1024


class JobLog:
    __slots__ = ("job_id", "path", "handle", "state", "worker", "backlog", "opening")

    def __init__(self, job_id, path, state, worker=None):
        self.job_id = job_id
        self.path = path
        self.handle = None
        self.state = state
        self.worker = worker
        self.backlog = []      # text that arrived while the file was being opened
        self.opening = False


class LogService(Service):
    name = "logs"

    def __init__(self, master):
        super().__init__(master)
        self.socket = None
        self._plain = None
        self.endpoint = None
        self._jobs = collections.OrderedDict()  # job id -> JobLog, least recently used first
        self._unknown_warned = set()
        self._refused_warned = set()
        self.lines = 0
        # What could not be stored yet (database away): retried, never dropped.
        self._retry_lines = collections.defaultdict(list)
        self._retry_cases = []
        self._retry_results = []
        self._lock = gevent.lock.RLock()

    def setup(self):
        self.socket, self.endpoint = self.bind(
            zmq.PULL, "logs", "[master] logs", self.master.config.master.logs,
            {zmq.LINGER: 0, zmq.RCVHWM: 5000, zmq.BACKLOG: 1024},
            "listening for job logs")
        self._plain = self.plain(self.socket)

    def teardown(self):
        for entry in self._jobs.values():
            if entry.handle is not None:
                entry.handle.close()
        self._jobs.clear()
        self._plain = None
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None

    def run(self):
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while not self.stopping.is_set():
            if poller.poll(500):
                self.drain()
                # The green Poller does not switch while the socket stays readable: yield,
                # or a log flood would starve the controller (unanswered PINGs).
                gevent.idle()
            elif self._retry_lines or self._retry_cases or self._retry_results:
                with self._lock:
                    self.process({})

    def drain(self, limit=BATCH):
        """Read what is waiting (at most ``limit`` messages) and process it as one batch.
        One greenlet at a time (the service loop, or END's flush)."""
        with self._lock:
            return self._drain(limit)

    def _drain(self, limit):
        sock = self._plain
        if sock is None:
            return 0
        batch = collections.defaultdict(list)
        count = 0
        # With an auth plugin on, each line keeps its sender's CURVE key (User-Id) until
        # the job's worker is known, and is then checked like a controller message.
        auth = self.master.auth_required
        while count < limit:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=not auth)
            except zmq.Again:
                break
            count += 1
            if auth:
                key = _user_id(frames[0])
                frames = [frame.bytes for frame in frames]
            if len(frames) != 2:
                self.log.warning("dropped a log message with %d frames (expected 2)", len(frames))
                continue
            try:
                job_id = int(frames[0])
            except ValueError:
                self.log.warning("dropped a log line for job id %r", frames[0][:40])
                continue
            batch[job_id].append((key, frames[1]) if auth else frames[1])
        if batch:
            self.process(batch)
        return count

    def flush(self, job_id):
        """Take in one batch of lines already waiting (END may overtake a job's last
        lines). Bounded, so END never stalls the loop behind another job's flood; a result
        still on its way is caught by the result_grace wait."""
        self.drain()
        entry = self._jobs.get(job_id)
        if entry is None:
            return
        if entry.handle is None and entry.backlog:
            # The job is about to finish and its file is still being opened by the thread:
            # open it here, so its log is whole when it is Finished (START had the file
            # created ahead, so this rarely waits for the disk). The thread's handle is
            # closed when it comes.
            try:
                self._opened(entry, open_append(entry.path), None)
            except OSError as exc:
                self._opened(entry, None, exc)
        if entry.handle is not None:
            entry.handle.flush()

    # -- processing ---------------------------------------------------------------------

    def _entry(self, job_id):
        entry = self._jobs.get(job_id)
        if entry is not None:
            self._jobs.move_to_end(job_id)
            return entry
        try:
            job = self.master.storage.get_job(job_id)
        except NotFound:
            if job_id not in self._unknown_warned:
                self._unknown_warned.add(job_id)
                self.log.warning("dropped log lines for unknown job %d", job_id)
            return None
        path = os.path.join(job.output_dir(self.master.output_root), "output.yaml")
        entry = JobLog(job_id, path, job.state, job.worker)
        self._jobs[job_id] = entry
        while len(self._jobs) > OPEN_FILES:
            _, old = self._jobs.popitem(last=False)
            if old.handle is not None:
                old.handle.close()
        return entry

    def pending(self, job_id):
        """True if lines, test cases or the result of ``job_id`` wait for the database."""
        return (job_id in self._retry_lines
                or any(c.job_id == job_id for c in self._retry_cases)
                or any(c.job_id == job_id for c in self._retry_results))

    def forget(self, job_id):
        entry = self._jobs.pop(job_id, None)
        if entry is not None and entry.handle is not None:
            entry.handle.close()

    def process(self, batch):
        if self._retry_lines:
            pending, self._retry_lines = self._retry_lines, collections.defaultdict(list)
            for job_id, lines in batch.items():
                pending[job_id].extend(lines)
            batch = pending
        for job_id, lines in batch.items():
            try:
                entry = self._entry(job_id)
            except StorageError as exc:
                self.log.error("[job %d] %d log line(s) kept for later: %s", job_id,
                               len(lines), exc)
                self._retry_lines[job_id].extend(lines)
                continue
            if entry is not None:
                if lines and isinstance(lines[0], tuple):
                    lines = self._authorized(entry, lines)
                self._take(entry, lines)
        self._store()

    def _authorized(self, entry, keyed):
        """The lines of ``keyed`` [(public key, line)] whose sender may speak for the
        job's worker (authorize_worker, as for the controller's messages); the rest are
        dropped with one warning per job and key."""
        verdicts = {}
        lines = []
        dropped = collections.Counter()
        for key, raw in keyed:
            allowed = verdicts.get(key)
            if allowed is None:
                if entry.worker is None:
                    allowed = False
                else:
                    answer = self.master.hook.authorize_worker(
                        master=self.master, hostname=entry.worker, public_key=key)
                    allowed = answer is True or (answer is None
                                                 and not self.master.auth_required)
                verdicts[key] = allowed
            if allowed:
                lines.append(raw)
            else:
                dropped[key] += 1
        for key, count in dropped.items():
            if (entry.job_id, key) not in self._refused_warned:
                if len(self._refused_warned) > 10000:
                    self._refused_warned.clear()
                self._refused_warned.add((entry.job_id, key))
                self.log.warning("[job %d] dropped %d log line(s) from key %s: not allowed to"
                                 " speak for worker %s", entry.job_id, count, key,
                                 entry.worker or "(none: the job has no worker)")
        return lines

    def _take(self, entry, lines):
        chunks = []
        for raw in lines:
            if len(raw) > MAX_LINE:
                raw = raw[:MAX_LINE]
            text = raw.decode("utf-8", errors="replace").replace("\n", " ")
            if "results" in text:
                case = self._result(entry.job_id, text)
                if case is not None:
                    if case.suite == "lava" and case.name == "job":
                        self._retry_results.append(case)
                    self._retry_cases.append(case)
            elif "marker" in text and self._is_marker(text):
                continue
            chunks.append("- ")
            chunks.append(text)
            chunks.append("\n")
        self.lines += len(lines)
        self._write(entry, "".join(chunks))

    def _store(self):
        """Store test cases, then act on job results; on a database error keep both.

        The lists are taken before any storage call: on PostgreSQL a call yields, and
        another greenlet (END's flush) may store meanwhile."""
        cases, self._retry_cases = self._retry_cases, []
        results, self._retry_results = self._retry_results, []
        done = 0
        try:
            if cases:
                self.master.storage.add_testcases(cases)
                cases = []
            for case in results:
                self.master.job_result(case)
                done += 1
        except StorageError as exc:
            self._retry_cases = cases + self._retry_cases
            self._retry_results = results[done:] + self._retry_results
            self.log.error("%d test case(s) and %d job result(s) kept for later: %s",
                           len(self._retry_cases), len(self._retry_results), exc)

    def _write(self, entry, text):
        if not text:
            return
        if entry.handle is None:
            # Creating the file (and its directories) may wait for the disk: a thread does
            # it (lavacore/jobfiles.py) and the text waits here meanwhile, in order.
            entry.backlog.append(text)
            if not entry.opening:
                entry.opening = True
                self.master.files.open_log(
                    entry.path, lambda handle, error: self._opened(entry, handle, error))
            return
        self._append(entry, entry.handle, text)

    def _opened(self, entry, handle, error):
        entry.opening = False
        text, entry.backlog = "".join(entry.backlog), []
        if error is not None:
            self.log.error("[job %d] cannot write %s: %s", entry.job_id, entry.path, error)
            return
        self._append(entry, handle, text)
        if self._jobs.get(entry.job_id) is entry and entry.handle is None:
            entry.handle = handle
        else:  # forgotten, evicted or opened by flush meanwhile
            handle.close()

    def _append(self, entry, handle, text):
        try:
            handle.write(text)
            handle.flush()
        except OSError as exc:
            self.log.error("[job %d] cannot write %s: %s", entry.job_id, entry.path, exc)

    @staticmethod
    def _is_marker(text):
        try:
            return logformat.parse_line(text).get("lvl") == "marker"
        except ValueError:
            return False

    def _result(self, job_id, text):
        try:
            data = logformat.parse_line(text)
        except ValueError:
            return None
        if data.get("lvl") != "results":
            return None
        msg = data.get("msg")
        if not isinstance(msg, dict) or "case" not in msg or "result" not in msg:
            self.log.warning("[job %d] results line without case/result ignored", job_id)
            return None
        extra = {k: v for k, v in msg.items()
                 if k not in ("definition", "case", "result", "measurement", "units")}
        measurement = msg.get("measurement")
        return TestCase(job_id=job_id, suite=str(msg.get("definition", "")),
                        name=str(msg["case"]), result=str(msg["result"]),
                        measurement=None if measurement is None else str(measurement),
                        units=None if msg.get("units") is None else str(msg["units"]),
                        metadata=json.dumps(extra, default=str) if extra else None,
                        logged=self.master.clock.time())


def _user_id(frame):
    try:
        return frame.get("User-Id")
    except (zmq.ZMQError, AttributeError, UnicodeDecodeError):
        return None
