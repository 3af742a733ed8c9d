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

# START's files; the optional ones are written only when not empty (LAVA-1129, spec 5.5
# step 3) and read back as "" when absent. job.yaml is written last: when it exists, the
# others were written before it.
START_FILES = ("device.yaml", "dispatcher.yaml", "env.yaml", "env.dut.yaml", "job.yaml")
OPTIONAL = frozenset(("dispatcher.yaml", "env.yaml", "env.dut.yaml"))
LOG_FILE = "output.yaml"
MADE_DIRECTORIES = 1000  # directories each thread remembers having made


class FileThread:
    """Calls made in order by one native thread; each call's ``then(result, error)`` runs
    afterwards in the loop (in a greenlet). ``error`` is the OSError the call raised."""

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
            except OSError as exc:
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
        not wait behind the START files of every job started since."""
        self.write(job, {"description.yaml": description}, then, thread=self.ender)

    def write_start(self, job, message_files):
        """START's files, in the order that makes job.yaml the proof of a complete set;
        and the job's output.yaml created ahead of its first log line (never truncated),
        so that opening it later does not wait for the disk."""
        self.write(job, {name: message_files.get(name) for name in START_FILES})
        self.opener.call(_touch, (os.path.join(self.directory(job), LOG_FILE),
                                  self.opener.made))

    def open_log(self, path, then):
        """Open ``path`` for appending (directories made as needed) in the log thread;
        ``then(handle, error)`` in the loop."""
        self.opener.call(open_append, (path, self.opener.made), then)

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
            return self.writer.flush() and self.ender.flush() and self.opener.flush()
        return False

    def close(self, timeout=60):
        """Finish what is queued: the log files first (their lines exist nowhere else),
        then START's and END's files."""
        self.opener.close(timeout)
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
