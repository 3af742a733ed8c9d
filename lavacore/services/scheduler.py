"""The scheduler tick: a pass on every wake-up, and a full pass every schedule_interval.

A wake-up (a job submitted, a device freed, a worker online) runs a pass at once, so an
idle device gets its START in milliseconds; wake-ups that arrive during a pass are merged
into the next one. A full pass also resends START to jobs still Scheduled and CANCEL to
jobs still Canceling, which is how protocol v3 copes with lost messages.
"""

import time

import gevent.event

from .. import metrics
from .base import Service


class SchedulerService(Service):
    name = "scheduler"

    def __init__(self, master):
        super().__init__(master)
        self._wake = gevent.event.Event()
        self._full = False
        self.passes = 0
        self.full_passes = 0
        self.busy = False  # a pass is running
        self.pass_started = None  # time.monotonic() when the running pass began

    def wake(self, full=False):
        """Run a pass now; ``full`` also resends START/CANCEL as the periodic pass does."""
        if full:
            self._full = True
        self._wake.set()

    def run(self):
        master = self.master
        clock = master.clock
        interval = master.config.master.schedule_interval
        step = min(interval, master.config.master.watchdog_interval)
        next_full = clock.monotonic()
        while not self.stopping.is_set():
            now = clock.monotonic()
            if now >= next_full or self._full:
                self._full = False
                self._wake.clear()
                self._run(master.full_pass, "full")
                self.full_passes += 1
                next_full = clock.monotonic() + interval
                continue
            # Real time waits at most ``step``, so a fake clock moved by a test is noticed.
            if self._wake.wait(min(step, next_full - now)):
                self._wake.clear()
                self._run(master.schedule_pass, "wake")
                self.passes += 1

    def _run(self, fn, kind):
        """One pass, timed in real time (lavacore_scheduling_pass_seconds; /health
        reports a pass that never ends)."""
        self.busy = True
        self.pass_started = started = time.monotonic()
        try:
            fn()
        finally:
            self.busy = False
            self.pass_started = None
            metrics.of(self.master).passes[kind].observe(time.monotonic() - started)

    def idle(self):
        """No pass running and none asked for."""
        return not self.busy and not self._wake.is_set() and not self._full
