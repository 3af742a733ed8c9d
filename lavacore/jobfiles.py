"""The files the master keeps in each job's output directory (START's job.yaml,
device.yaml and worker files, END's description.yaml, the log's output.yaml), created by
native threads instead of the loop.

Creating a file blocks: on a slow or busy disk (measured at 0.5-5 ms per file on the
project's machines; NFS in some labs) a master creating several files per job on its one
loop stops answering PINGs, taking log lines and acknowledging ENDs meanwhile. Here the
loop only queues the work: one thread writes START's files, one END's description.yaml
(reads made before they got there are answered from the queues), a third opens the log
files, which the log service then appends to. Appending to an open file does not wait
for the disk.

The threads do no logging (the logging module's locks are not for use across a hub and a
native thread): what they did, or failed to do, is handed back to the loop.
"""

import collections
import logging
import os

import gevent
import gevent.threadpool

log = logging.getLogger("lavacore.jobfiles")

# START's files; the optional ones are written only when not empty (as LAVA, LAVA-1129)
# and read back as "" when absent. job.yaml is written last: when it exists, the
# others were written before it.
START_FILES = ("device.yaml", "dispatcher.yaml", "env.yaml", "env.dut.yaml", "job.yaml")
OPTIONAL = frozenset(("dispatcher.yaml", "env.yaml", "env.dut.yaml"))
LOG_FILE = "output.yaml"
MADE_DIRECTORIES = 1000  # directories each thread remembers having made


class FileThread:
    """Calls made in order by one native thread; each call's ``then(result, error)`` runs
    afterwards in the loop (in a greenlet). ``error`` is the OSError (or ValueError) the
    call raised."""

    def __init__(self, name):
        self.name = name
        self._queue = collections.deque()   # (fn, args, then), appended by the loop
        self._done = collections.deque()    # (then, result, error), appended by the thread
        self._pool = gevent.threadpool.ThreadPool(1)
        self._task = None
        self.made = collections.OrderedDict()  # directories made: for this thread's calls
        # The thread wakes the loop after each call (an async watcher is the thread-safe
        # way in), so a ``then`` runs as soon as its call is done, not when the queue is
        # empty: under a steady load it may never be.
        self._wake = gevent.get_hub().loop.async_()
        self._wake.start(self._woken)
        self._delivering = False

    def call(self, fn, args, then=None):
        self._queue.append((fn, args, then))
        self._start()

    def _start(self):
        if self._task is None and self._queue:
            self._task = self._pool.spawn(self._run)
            # Link callbacks run in the hub, which must not block: hand over to a greenlet.
            self._task.rawlink(lambda task: gevent.spawn(self._finished, task))

    def flush(self, timeout=None):
        """Wait until every queued call ran and its ``then`` too; False on timeout."""
        with gevent.Timeout(timeout, False):
            while self._queue or self._task is not None or self._done:
                task = self._task
                if task is not None:
                    task.wait()
                self._finished(task)
            return True
        return False

    def close(self, timeout):
        done = self.flush(timeout)
        if not done:
            log.error("%s: %d file operation(s) not done within %ss of stopping", self.name,
                      len(self._queue), timeout)
        self._pool.kill()
        self._wake.stop()
        self._wake.close()
        return done

    def _run(self):
        """In the thread: run calls until the queue is empty."""
        while True:
            try:
                fn, args, then = self._queue.popleft()
            except IndexError:
                return
            try:
                self._done.append((then, fn(*args), None))
            except (OSError, ValueError) as exc:  # ValueError: data that did not decode
                self._done.append((then, None, exc))
            if then is not None:
                try:
                    self._wake.send()
                except Exception:  # closed: the master stopped without waiting for us
                    return

    def _woken(self):
        """In the hub (which must not block): deliver from a greenlet."""
        if not self._delivering and self._done:
            self._delivering = True
            gevent.spawn(self._deliver)

    def _deliver(self):
        try:
            self._finished(None)
        finally:
            self._delivering = False

    def _finished(self, task):
        """In the loop: run the ``then`` of the calls done; when ``task`` (the thread's
        run) is over, start another for what was queued after it found the queue empty."""
        if task is not None and task is self._task and task.ready():
            self._task = None
            if not task.successful():
                log.error("%s: the file thread failed: %r", self.name, task.exception)
        while self._done:
            then, result, error = self._done.popleft()
            if then is not None:
                try:
                    then(result, error)
                except Exception:
                    log.exception("%s: handling a finished file operation failed", self.name)
        self._start()


class JobFiles:
    def __init__(self, root):
        self.root = root
        self._pending = {}   # directory -> {name: text} queued, not yet written
        self.writer = FileThread("job files")     # START's files
        self.ender = FileThread("end files")      # description.yaml, which END_OK awaits
        self.opener = FileThread("log files")     # output.yaml
        self.replayer = FileThread("log copies")  # output.yaml from a worker's copy

    def directory(self, job):
        return job.output_dir(self.root)

    def write(self, job, files, then=None, thread=None):
        """Queue ``files`` ({name: text}) for ``job``'s directory; returns at once.
        ``then()`` runs in the loop once they are written (or failed, logged)."""
        thread = thread or self.writer
        directory = self.directory(job)
        pending = self._pending.setdefault(directory, {})
        for name, text in files.items():
            text = text or ""
            if name in OPTIONAL and not text:
                continue
            pending[name] = text
            thread.call(_write_file, (directory, name, text, thread.made),
                        lambda result, error, d=directory, n=name, t=text:
                        self._written(d, n, t, error))
        if not pending:
            del self._pending[directory]
        if then is not None:
            thread.call(_nothing, (), lambda result, error: then())

    def write_end(self, job, description, then):
        """END's description.yaml, on a thread of its own: END_OK waits for it, and must
        not wait behind the START files of every job started since. ``then(error)`` runs
        in the loop: error is None once the file is written, else the OSError (a full
        disk), and END_OK must then wait for the worker's next END."""
        directory = self.directory(job)
        pending = self._pending.setdefault(directory, {})
        pending["description.yaml"] = description

        def done(result, error, text=description):
            self._written(directory, "description.yaml", text, error)
            then(error)

        self.ender.call(_write_file, (directory, "description.yaml", description,
                                      self.ender.made), done)

    def replace_log(self, job, blob, limit, then):
        """Replace ``job``'s output.yaml with the worker's copy of its log (``blob``: lzma
        data, inflated at most to ``limit`` bytes), off the loop, on a thread of its own.
        ``then(result, error)`` in the loop: result is (lines, results lines as text)."""
        self.replayer.call(_replace_log, (os.path.join(self.directory(job), LOG_FILE), blob,
                                          limit, self.replayer.made), then)

    def write_start(self, job, message_files):
        """START's files, in the order that makes job.yaml the proof of a complete set;
        and the job's output.yaml created ahead of its first log line (never truncated),
        so that opening it later does not wait for the disk."""
        self.write(job, {name: message_files.get(name) for name in START_FILES})
        self.opener.call(_touch, (os.path.join(self.directory(job), LOG_FILE),
                                  self.opener.made))

    def open_log(self, path, then):
        """Open ``path`` for appending (directories made as needed) in the log thread;
        ``then((fd, size, lines), error)`` in the loop (see :func:`open_log`)."""
        self.opener.call(open_log, (path, self.opener.made), then)

    def read(self, job, name):
        """The text of ``name`` for ``job`` (queued or on disk); None when it has none."""
        directory = self.directory(job)
        pending = self._pending.get(directory)
        if pending and name in pending:
            return pending[name]
        try:
            with open(os.path.join(directory, name), encoding="utf-8",
                      errors="replace") as handle:
                return handle.read()
        except OSError:
            return None

    def start_texts(self, job):
        """START's five texts as first sent, or None when job.yaml is not there (the
        START must then be built again)."""
        texts = {name: self.read(job, name) for name in START_FILES}
        if not texts["job.yaml"] or texts["device.yaml"] is None:
            return None
        return [texts[name] or "" for name in
                ("job.yaml", "device.yaml", "dispatcher.yaml", "env.yaml", "env.dut.yaml")]

    def flush(self, timeout=None):
        """Wait until everything queued is done; False on timeout."""
        with gevent.Timeout(timeout, False):
            return (self.writer.flush() and self.ender.flush() and self.opener.flush()
                    and self.replayer.flush())
        return False

    def close(self, timeout=60):
        """Finish what is queued: the log files first (their lines exist nowhere else),
        then START's and END's files."""
        self.opener.close(timeout)
        self.replayer.close(timeout)
        self.ender.close(timeout)
        self.writer.close(timeout)

    def _written(self, directory, name, text, error):
        pending = self._pending.get(directory)
        if pending is not None and pending.get(name) is text:
            del pending[name]
            if not pending:
                del self._pending[directory]
        if error is not None:
            log.error("[job %s] cannot write %s in %s: %s", os.path.basename(directory),
                      name, directory, error)


def _write_file(directory, name, text, made):
    with _create(os.path.join(directory, name), "w", made) as handle:
        handle.write(text)


def open_append(path, made=None):
    return _create(path, "a", made)


def _create(path, mode, made):
    """open(), making the directory first unless this thread remembers making it, and
    again if it was removed since."""
    directory = os.path.dirname(path)
    _makedirs(directory, made)
    try:
        return open(path, mode, encoding="utf-8")
    except FileNotFoundError:
        if made is None or made.pop(directory, None) is None:
            raise
        _makedirs(directory, made)
        return open(path, mode, encoding="utf-8")


def open_log(path, made=None):
    """A job log opened for appending: (fd, size, complete lines). A last line without its
    newline (the master was killed while writing it) is cut off, so the file holds whole
    lines only; the line counts as not received, and comes back with the worker's copy."""
    directory = os.path.dirname(path)
    _makedirs(directory, made)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        if made is None or made.pop(directory, None) is None:
            raise
        _makedirs(directory, made)
        fd = os.open(path, flags, 0o644)
    try:
        size = os.fstat(fd).st_size
        lines = 0
        if size:
            size, lines = _whole_lines(path, size)
            os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd, size, lines


def _whole_lines(path, size):
    """(bytes up to the end of the last complete line, complete lines) of a file."""
    lines = 0
    end = 0
    offset = 0
    with open(path, "rb") as handle:
        while offset < size:
            block = handle.read(min(1 << 20, size - offset))
            if not block:
                break
            lines += block.count(b"\n")
            last = block.rfind(b"\n")
            if last >= 0:
                end = offset + last + 1
            offset += len(block)
    return end, lines


def _replace_log(path, blob, limit, made):
    """In a file thread: write the inflated ``blob`` as the new ``path`` (through a
    temporary file and a rename, so a reader or a crash sees the old or the new log),
    returning (lines, [the lines that may be results, as text])."""
    from . import protocol

    _makedirs(os.path.dirname(path), made)
    temporary = path + ".replay"
    results = []
    tail = [b""]

    with open(temporary, "wb") as handle:
        def sink(chunk):
            data = tail[0] + chunk
            cut = data.rfind(b"\n") + 1
            for line in data[:cut].splitlines():
                if b"results" in line:
                    line = line[2:] if line.startswith(b"- ") else line
                    results.append(line.decode("utf-8", errors="replace"))
            tail[0] = data[cut:]
            handle.write(data[:cut])

        protocol.inflate(blob, limit, "the worker's copy of the log", sink)
    # A last line without its newline was being written when the runner died: dropped.
    _, lines = _whole_lines(temporary, os.path.getsize(temporary))
    os.replace(temporary, path)
    return lines, results


def _touch(path, made):
    open_append(path, made).close()


def _makedirs(directory, made):
    """os.makedirs, skipped for a directory this thread made or saw lately (``made``: an
    OrderedDict the calling thread alone uses): a job's files share one directory, and
    on a slow disk even finding that it exists costs."""
    if made is not None and directory in made:
        return
    os.makedirs(directory, exist_ok=True)
    if made is not None:
        made[directory] = True
        if len(made) > MADE_DIRECTORIES:
            made.popitem(last=False)


def _nothing():
    return None
