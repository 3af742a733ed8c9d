"""The lava-logs role: a PULL socket taking ``[job_id, line]`` from runners.

Lines are appended, with LAVA's ``"- "`` prefix, to the job's ``output.yaml``; ``results``
lines become test cases; the ``lava``/``job`` result is recorded and, with END, decides the
job's health. Work is done in batches: the socket is drained, lines are grouped per job,
written with one write per job, and test cases are stored in one transaction per batch.

Anyone who can reach the socket can send anything: every message is checked (two frames,
a job id storage can hold, a bounded size) and a message that fails is dropped with a
rate-limited log line; nothing a peer sends stops the service. What cannot be stored now is
held, never dropped: lines whose file cannot be written (a full disk) wait in memory, test
cases and results wait for the database. Each job's count of lines taken is kept, so END
can tell whether the master has the whole log (see ``check``); when it does not, the
worker's own copy of the log replaces it (``replace``).
"""

import collections
import errno
import json
import os

import gevent
import gevent.lock
import zmq.green as zmq

from .. import logformat, metrics, protocol
from ..jobfiles import open_log
from ..models import TestCase
from ..ratelog import RateLimitedLog
from ..storage import NotFound, StorageError
from .base import Service, recv_bounded

BATCH = 5000
BATCH_BYTES = 16 * 1024 * 1024
OPEN_FILES = 256
MAX_LINE = 1024 * 1024
# Lines held in memory while their file cannot be written. Beyond it new lines are
# dropped (and counted as missing: lavacore's worker sends its copy of the log at END).
MAX_HELD = 256 * 1024 * 1024
RETRY_EVERY = 1.0
SEALED = 10000  # jobs whose log was replaced by the worker's copy, remembered


class JobLog:
    __slots__ = ("job_id", "path", "state", "worker", "fd", "size", "base", "lines",
                 "pending", "held", "opening")

    def __init__(self, job_id, path, state, worker=None):
        self.job_id = job_id
        self.path = path
        self.state = state
        self.worker = worker
        self.fd = None          # open for appending once the file thread opened it
        self.size = 0           # bytes known to be in the file
        self.base = None        # complete lines in the file when it was opened
        self.lines = 0          # lines taken since (written or held)
        self.pending = []       # bytes not in the file yet, in order
        self.held = 0           # their size
        self.opening = False

    def total(self):
        """Lines of this job the master has (None until the file was opened)."""
        return None if self.base is None else self.base + self.lines


class LogService(Service):
    name = "logs"

    def __init__(self, master):
        super().__init__(master)
        self.socket = None
        self._plain = None
        self.endpoint = None
        self._jobs = collections.OrderedDict()  # job id -> JobLog, least recently used first
        self._drops = RateLimitedLog(self.log)
        self.lines = 0
        # What could not be stored yet (database away): retried, never dropped.
        self._retry_lines = collections.defaultdict(list)
        self._retry_cases = []
        self._retry_results = []
        self._unwritten = set()   # JobLogs with pending bytes after a failed write
        self._held = 0
        self._write_fault = None
        self._sealed = collections.OrderedDict()
        self._lock = gevent.lock.RLock()
        # [messages, bytes] read off the socket, counted per batch (lavacore/metrics.py).
        self._received = metrics.of(master).log_lines

    def setup(self):
        self.socket, self.endpoint = self.bind(
            zmq.PULL, "logs", "[master] logs", self.master.config.master.logs,
            {zmq.LINGER: 0, zmq.RCVHWM: 5000, zmq.BACKLOG: 1024,
             zmq.MAXMSGSIZE: MAX_LINE + 64},
            "listening for job logs")
        self._plain = self.plain(self.socket)

    def teardown(self):
        for entry in self._jobs.values():
            self._write_pending(entry)
            self._close(entry)
        self._jobs.clear()
        self._plain = None
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None

    def run(self):
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        clock = self.master.clock
        next_retry = 0.0
        while not self.stopping.is_set():
            if poller.poll(500):
                self.drain()
                # The green Poller does not switch while the socket stays readable: yield,
                # or a log flood would starve the controller (unanswered PINGs).
                gevent.idle()
            if (self._retry_lines or self._retry_cases or self._retry_results
                    or self._unwritten) and clock.monotonic() >= next_retry:
                next_retry = clock.monotonic() + RETRY_EVERY
                with self._lock:
                    self._guarded(self.process, {})

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
        count = size = received = 0
        # With an auth plugin on, each line keeps its sender's CURVE key (User-Id) until
        # the job's worker is known, and is then checked like a controller message.
        auth = self.master.auth_required
        while count < limit and size < BATCH_BYTES:
            try:
                frames, total = recv_bounded(sock, 2, copy=not auth)
            except zmq.Again:
                break
            count += 1
            received += len(frames[-1])
            key = _user_id(frames[0]) if auth else None
            if auth:
                frames = [frame.bytes for frame in frames]
            if total != 2:
                self._drops.warning("frames", "dropped a log message with %d frames"
                                    " (expected 2)", total)
                continue
            try:
                job_id = protocol.job_id(frames[0])
            except protocol.ProtocolError as exc:
                self._drops.warning("id", "dropped a log line: %s", exc)
                continue
            if job_id in self._sealed:
                continue  # its log was replaced by the worker's copy: late duplicates
            size += len(frames[1])
            batch[job_id].append((key, frames[1]) if auth else frames[1])
        counters = self._received
        counters[0] += count
        counters[1] += received
        if batch:
            self._guarded(self.process, batch)
        return count

    def _guarded(self, fn, *args):
        """Run one batch; a bug in it drops the batch with one line, never the service."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - the boundary of what peers send
            self._drops.error("batch", "dropped a batch of log lines: %s: %s",
                              type(exc).__name__, exc, exc_info=True)

    def flush(self, job_id):
        """Take in one batch of lines already waiting (END may overtake a job's last
        lines) and write what ``job_id`` has. Bounded, so END never stalls the loop behind
        another job's flood; a result still on its way is caught by the result_grace wait.
        Returns the job's JobLog (None when no line of it was ever seen)."""
        self.drain()
        with self._lock:
            entry = self._jobs.get(job_id)
            if entry is None:
                return None
            if entry.fd is None:
                # The job is about to finish and its file is still being opened by the
                # thread: open it here, so its log is whole when it is Finished (START
                # had the file created ahead, so this rarely waits for the disk). The
                # thread's result is closed when it comes.
                try:
                    self._opened(entry, open_log(entry.path), None)
                except OSError as exc:
                    self._opened(entry, None, exc)
            self._write_pending(entry)
            return entry

    # -- what END asks ------------------------------------------------------------------

    def check(self, job, info=None):
        """Whether the master holds all of ``job``'s log: None if so, else (reason,
        copy_helps). ``info`` (protocol.LogInfo, from lavacore's worker) says how many
        lines and results lines its runner sent; without it only what is held here counts
        (lines not written yet, test cases or results not stored yet)."""
        entry = self.flush(job.id)
        if entry is None and info is not None and info.lines:
            entry = self._entry_now(job)
            if entry is None:
                return "its log file cannot be opened", False
        if entry is not None and entry.pending:
            return "%d log line(s) not written yet" % entry.lines, False
        if self.pending(job.id):
            return "test cases or its result not stored yet", False
        if info is None:
            return None
        lines = entry.total() if entry is not None else 0
        if lines != info.lines:
            return "%s of the %d log lines its runner sent" % (lines, info.lines), True
        results = sum(self.master.storage.testcase_counts(job.id).values())
        if results != info.results:
            return "%d of the %d test results its runner sent" % (results, info.results), True
        return None

    def _entry_now(self, job):
        """The JobLog of a job with no line seen in this master's life, opened here."""
        with self._lock:
            entry = self._entry(job.id, job)
            if entry is not None and entry.fd is None:
                try:
                    self._opened(entry, open_log(entry.path), None)
                except OSError as exc:
                    self._opened(entry, None, exc)
                    return None
            return entry

    def replace(self, job, blob, then):
        """The worker's copy of ``job``'s log (lzma ``blob``) becomes its log: output.yaml
        is replaced (off the loop), its test cases and result are taken again from it in
        one transaction, and later lines of the job are ignored. ``then(error)`` in the
        loop, error None when done."""
        with self._lock:
            entry = self._jobs.pop(job.id, None)
            if entry is not None:
                self._close(entry)
                self._unwritten.discard(entry)
                self._held -= entry.held
            self._retry_lines.pop(job.id, None)
            self._retry_cases = [c for c in self._retry_cases if c.job_id != job.id]
            self._retry_results = [c for c in self._retry_results if c.job_id != job.id]
            self._sealed[job.id] = True
            while len(self._sealed) > SEALED:
                self._sealed.popitem(last=False)
        limit = self.master.config.master.max_log_copy

        def replaced(result, error):
            if error is not None:
                then(error)
                return
            lines, texts = result
            cases = [case for case in (self._result(job.id, text) for text in texts)
                     if case is not None]
            try:
                self.master.replace_results(job.id, cases)
            except StorageError as exc:
                then(exc)
                return
            self.log.info("[job %d] log replaced by the worker's copy: %d line(s), %d test"
                          " result(s)", job.id, lines, len(cases))
            then(None)

        self.master.files.replace_log(job, blob, limit, replaced)

    # -- processing ---------------------------------------------------------------------

    def _entry(self, job_id, job=None):
        entry = self._jobs.get(job_id)
        if entry is not None:
            self._jobs.move_to_end(job_id)
            return entry
        if job is None:
            try:
                job = self.master.storage.get_job(job_id)
            except NotFound:
                self._drops.warning("unknown", "dropped log lines for unknown job %d", job_id)
                return None
        path = os.path.join(job.output_dir(self.master.output_root), "output.yaml")
        entry = JobLog(job_id, path, job.state, job.worker)
        self._jobs[job_id] = entry
        if len(self._jobs) > OPEN_FILES:
            # Files being opened or with lines to write are kept: their counts must hold.
            for old_id, old in list(self._jobs.items()):
                if len(self._jobs) <= OPEN_FILES:
                    break
                if old is not entry and not old.opening and not old.pending:
                    del self._jobs[old_id]
                    self._close(old)
        return entry

    def pending(self, job_id):
        """True if lines, test cases or the result of ``job_id`` wait to be stored."""
        entry = self._jobs.get(job_id)
        return bool((entry is not None and entry.pending)
                    or job_id in self._retry_lines
                    or any(c.job_id == job_id for c in self._retry_cases)
                    or any(c.job_id == job_id for c in self._retry_results))

    def forget(self, job_id):
        entry = self._jobs.get(job_id)
        if entry is not None and not entry.pending and not entry.opening:
            del self._jobs[job_id]
            self._close(entry)

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
                self.master.storage_fault("log lines kept for later", exc)
                self._retry_lines[job_id].extend(lines)
                continue
            if entry is not None:
                if lines and isinstance(lines[0], tuple):
                    lines = self._authorized(entry, lines)
                self._take(entry, lines)
        for entry in list(self._unwritten):
            self._write_pending(entry)
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
            self._drops.warning(("key", entry.job_id, key),
                                "[job %d] dropped %d log line(s) from key %s: not allowed"
                                " to speak for worker %s", entry.job_id, count, key,
                                entry.worker or "(none: the job has no worker)")
        return lines

    def _take(self, entry, lines):
        chunks = []
        taken = 0
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
            taken += 1
        self.lines += len(lines)
        if taken:
            self._write(entry, "".join(chunks).encode("utf-8"), taken)

    def _store(self):
        """Store test cases and job results in one transaction; on a database error keep
        both for the next try.

        The lists are taken before any storage call: on PostgreSQL a call yields, and
        another greenlet (END's flush) may store meanwhile."""
        cases, self._retry_cases = self._retry_cases, []
        results, self._retry_results = self._retry_results, []
        if not cases and not results:
            return
        try:
            self.master.store_results(cases, results)
        except StorageError as exc:
            self._retry_cases = cases + self._retry_cases
            self._retry_results = results + self._retry_results
            self.master.storage_fault("test cases and job results kept for later", exc)
            return
        self.master.storage_works()

    # -- the files ----------------------------------------------------------------------

    def _write(self, entry, data, count):
        if self._held + len(data) > MAX_HELD and (entry.fd is None or entry.pending):
            self._drops.error("held", "[job %d] dropped %d log line(s): %d bytes of log"
                              " lines already wait for the disk", entry.job_id, count,
                              self._held)
            return
        entry.lines += count
        entry.pending.append(data)
        entry.held += len(data)
        self._held += len(data)
        if entry.fd is None:
            # Creating the file (and its directories) may wait for the disk: a thread does
            # it (lavacore/jobfiles.py) and the lines wait here meanwhile, in order.
            if not entry.opening:
                entry.opening = True
                self.master.files.open_log(
                    entry.path, lambda result, error: self._opened(entry, result, error))
            return
        self._write_pending(entry)

    def _opened(self, entry, result, error):
        entry.opening = False
        if error is not None:
            self._write_failed(entry, error)
            return
        fd, size, lines = result
        if self._jobs.get(entry.job_id) is not entry or entry.fd is not None:
            os.close(fd)  # forgotten, evicted or opened by flush meanwhile
            return
        entry.fd, entry.size, entry.base = fd, size, lines
        self._write_pending(entry)

    def _write_pending(self, entry):
        """Append what ``entry`` holds; on failure keep it (and cut off any part that was
        written, so the file holds whole lines only) for the next try."""
        if not entry.pending or entry.fd is None:
            return
        data = b"".join(entry.pending)
        try:
            view = memoryview(data)
            while view:
                written = os.write(entry.fd, view)
                view = view[written:]
        except OSError as exc:
            try:
                os.ftruncate(entry.fd, entry.size)
            except OSError:
                pass
            entry.pending = [data]
            self._write_failed(entry, exc)
            return
        entry.size += len(data)
        entry.pending = []
        self._held -= entry.held
        entry.held = 0
        self._unwritten.discard(entry)
        if self._write_fault is not None and not self._unwritten:
            self.log.warning("job logs are written again (%s)", self._write_fault)
            self._write_fault = None

    def _write_failed(self, entry, error):
        self._unwritten.add(entry)
        if self._write_fault is None:
            self._write_fault = "%s: %s" % (entry.path, error.strerror or error)
            self.log.error("cannot write job logs (%s): their lines are held in memory and"
                           " written when it works again", self._write_fault)
            if getattr(error, "errno", None) not in (errno.ENOSPC, errno.EDQUOT, errno.EIO,
                                                     errno.EROFS):
                self.log.debug("log write error", exc_info=error)

    def _close(self, entry):
        if entry.fd is not None:
            try:
                os.close(entry.fd)
            except OSError:
                pass
            entry.fd = None

    # -- lines --------------------------------------------------------------------------

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
            self._drops.warning(("case", job_id), "[job %d] results line without case/result"
                                " ignored", job_id)
            return None
        extra = {k: v for k, v in msg.items()
                 if k not in ("definition", "case", "result", "measurement", "units")}
        measurement = msg.get("measurement")
        return TestCase(job_id=job_id, suite=_field(msg.get("definition", "")),
                        name=_field(msg["case"]), result=_field(msg["result"]),
                        measurement=None if measurement is None else _field(measurement),
                        units=None if msg.get("units") is None else _field(msg["units"]),
                        metadata=_metadata(extra),
                        logged=self.master.clock.time())


def _field(value, limit=4096):
    # NUL has no place in a name (and PostgreSQL's TEXT refuses it).
    text = value if isinstance(value, str) else str(value)
    return text[:limit].replace("\x00", "\ufffd")


def _metadata(extra):
    if not extra:
        return None
    try:
        return json.dumps(extra, default=str)[:65536]
    except (ValueError, RecursionError):
        return None


def _user_id(frame):
    try:
        return frame.get("User-Id")
    except (zmq.ZMQError, AttributeError, UnicodeDecodeError):
        return None
