"""The worker's on-disk job table: what lets a restarted worker keep tracking its runners.

Same shape as lava-slave's ``db.sqlite3`` (LAVA-777): ``jobs(id, pid, status, last_update,
prefix)``. ``last_update`` is epoch seconds; it is stored as a REAL (lava-slave used whole
seconds) so that sub-second intervals work. For a CANCELING row it is the time of the
cancel, which the TERM-again and KILL deadlines count from.

sqlite3 blocks the gevent hub while it runs; every statement here touches a handful of rows
in a tiny file, so the stall is microseconds.
"""

import collections
import os
import sqlite3

RUNNING = 0
CANCELING = 1
FINISHED = 2

STATUS_NAMES = {RUNNING: "running", CANCELING: "canceling", FINISHED: "finished"}

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


class JobTable:
    def __init__(self, path):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # isolation_level=None: each statement commits at once, so a worker killed right
        # after a START leaves the row of the runner it started.
        self._db = sqlite3.connect(path, isolation_level=None, timeout=10)
        self._db.execute(_SCHEMA)

    def close(self):
        if self._db is not None:
            self._db.close()
            self._db = None

    def get(self, job_id):
        cur = self._db.execute(
            "SELECT id, pid, status, last_update, prefix FROM jobs WHERE id = ?", (job_id,))
        row = cur.fetchone()
        return Row(*row) if row else None

    def all(self):
        cur = self._db.execute(
            "SELECT id, pid, status, last_update, prefix FROM jobs ORDER BY id")
        return [Row(*row) for row in cur.fetchall()]

    def insert(self, job_id, pid, status, now, prefix=""):
        self._db.execute(
            "INSERT OR REPLACE INTO jobs (id, pid, status, last_update, prefix)"
            " VALUES (?, ?, ?, ?, ?)", (job_id, pid, status, now, prefix))

    def update(self, job_id, status, now):
        self._db.execute("UPDATE jobs SET status = ?, last_update = ? WHERE id = ?",
                         (status, now, job_id))

    def delete(self, job_id):
        self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
