"""The worker's on-disk job table: what lets a restarted worker keep tracking its runners.

Same shape as lava-slave's ``db.sqlite3`` (LAVA-777): ``jobs(id, pid, status, last_update,
prefix)``. ``last_update`` is epoch seconds; it is stored as a REAL (lava-slave used whole
seconds) so that sub-second intervals work. For a CANCELING row it is the time of the
cancel, which the TERM-again and KILL deadlines count from.

The rows live in memory and the file follows them. A write that fails (the work dir's disk
is full, say: a job filled it) is logged and retried by ``flush()`` at the next job check,
so a full disk fails the job that cannot start instead of killing the worker; only a
worker restart before the file caught up would lose the rows written meanwhile.

sqlite3 blocks the gevent hub while it runs; every statement here touches a handful of rows
in a tiny file, so the stall is microseconds.
"""

import collections
import logging
import os
import sqlite3

log = logging.getLogger("lavacore.worker")

RUNNING = 0
CANCELING = 1
FINISHED = 2
# lavacore's addition: the master acknowledged the job's END (END_OK). lava-slave forgets
# the job then, so a late START (a resend that crossed START_OK) would run it again; the
# row is kept a while instead, and such a START is answered with END.
DONE = 3

STATUS_NAMES = {RUNNING: "running", CANCELING: "canceling", FINISHED: "finished",
                DONE: "acknowledged"}
# How long and how many acknowledged jobs are remembered.
DONE_KEEP = 7 * 24 * 3600
DONE_MAX = 10000

Row = collections.namedtuple("Row", "id pid status last_update prefix")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    pid INTEGER NOT NULL DEFAULT 0,
    status INTEGER NOT NULL,
    last_update REAL NOT NULL,
    prefix TEXT NOT NULL DEFAULT ''
)
"""


class JobTableError(Exception):
    """The job table cannot be opened; the text says which file and why."""


class JobTable:
    def __init__(self, path):
        self.path = path
        self.error = None    # why the file is behind the rows in memory, or None
        self._dirty = set()  # ids whose row in the file is stale (or should be gone)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            # isolation_level=None: statements commit at once unless a BEGIN is open, so a
            # worker killed right after a START leaves the row of the runner it started.
            self._db = sqlite3.connect(path, isolation_level=None, timeout=10)
            self._db.execute(_SCHEMA)
            cur = self._db.execute(
                "SELECT id, pid, status, last_update, prefix FROM jobs ORDER BY id")
            self._rows = {row[0]: Row(*row) for row in cur.fetchall()}
        except (OSError, sqlite3.Error) as exc:
            raise JobTableError("cannot open the job table %s: %s" % (path, exc)) from None

    def close(self):
        if self._db is not None:
            self.flush()
            self._db.close()
            self._db = None

    def get(self, job_id):
        return self._rows.get(job_id)

    def all(self):
        return [self._rows[job_id] for job_id in sorted(self._rows)]

    def insert(self, job_id, pid, status, now, prefix=""):
        self._rows[job_id] = Row(job_id, pid, status, now, prefix)
        self._changed(job_id)

    def update(self, job_id, status, now):
        row = self._rows.get(job_id)
        if row is not None:
            self._rows[job_id] = row._replace(status=status, last_update=now)
            self._changed(job_id)

    def prune(self, now, keep=DONE_KEEP, most=DONE_MAX):
        """Forget acknowledged jobs older than ``keep`` seconds, and the oldest beyond
        ``most``."""
        done = sorted((row.last_update, row.id) for row in self._rows.values()
                      if row.status == DONE)
        old = [job_id for when, job_id in done if now - when > keep]
        old += [job_id for _, job_id in done[:max(0, len(done) - most)]]
        for job_id in set(old):
            self.delete(job_id)

    def delete(self, job_id):
        if self._rows.pop(job_id, None) is not None:
            self._changed(job_id)

    def _changed(self, job_id):
        self._dirty.add(job_id)
        self.flush()

    def flush(self):
        """Bring the file up to date with the rows; False (and logged) if it cannot."""
        if not self._dirty or self._db is None:
            return True
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for job_id in sorted(self._dirty):
                    row = self._rows.get(job_id)
                    if row is None:
                        self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                    else:
                        self._db.execute(
                            "INSERT OR REPLACE INTO jobs (id, pid, status, last_update,"
                            " prefix) VALUES (?, ?, ?, ?, ?)", tuple(row))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            if self.error is None:
                log.error("job table %s: cannot write (%s): rows kept in memory, written "
                          "when it works again", self.path, exc)
            self.error = str(exc)
            return False
        if self.error is not None:
            log.info("job table %s: written again", self.path)
            self.error = None
        self._dirty.clear()
        return True
