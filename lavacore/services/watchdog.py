"""The liveness watchdog, and the heartbeat that measures the loop's lag."""

import time

import gevent

from .. import metrics
from .base import Service

HEARTBEAT = 0.1  # seconds between two beats: the resolution of the lag measured


class WatchdogService(Service):
    """Marks workers Offline after worker_timeout of silence and finishes jobs whose
    lava/job result never came within the grace period after END.

    A second greenlet beats every ``HEARTBEAT`` seconds of real time and records how
    late it woke (``metrics.LoopWatch``): a greenlet that blocked the loop (a long
    SQLite statement, a CPU-bound plugin) shows as lag, which /health and /metrics
    report. It does nothing else, so a liveness check waiting on a slow database does
    not look like a stalled loop. (systemd's READY, WATCHDOG and STOPPING are the
    master's: lavacore/sdnotify.py.)"""

    name = "watchdog"

    def __init__(self, master):
        super().__init__(master)
        self.heartbeat = None

    def start(self):
        greenlet = super().start()
        self.heartbeat = gevent.spawn(self._beat, metrics.of(self.master).loop)
        self.heartbeat.name = "heartbeat"
        return greenlet

    def stop(self, timeout=5):
        if self.heartbeat is not None:
            self.heartbeat.kill(block=False)
        super().stop(timeout)

    def run(self):
        interval = self.master.config.master.watchdog_interval
        while not self.wait(interval):
            self.master.check_liveness()

    def _beat(self, watch, interval=HEARTBEAT):
        watch.interval = interval
        clock = time.monotonic
        due = clock() + interval
        watch.beat(0.0, due - interval)
        while not self.stopping.wait(max(0.0, due - clock())):
            now = clock()
            watch.beat(now - due, now)
            due = now + interval
