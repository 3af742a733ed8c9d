"""The scheduler tick: a pass on every wake-up, and a full pass every schedule_interval.

A wake-up (a job submitted, a device freed, a worker online) runs a pass at once, so an
idle device gets its START in milliseconds; wake-ups that arrive during a pass are merged
into the next one. When wake-ups come faster than passes (jobs ending one after
another: a wake-up arriving while a pass places jobs), the next pass waits as long as the
last one took (at most MAX_GAP), so the rest of the master keeps at least half the loop
and each pass places every device freed meanwhile, instead of one pass, with its fixed
cost of statements, per device; a wake-up after a pass that placed nothing runs a pass
at once. A full pass also resends START to jobs still Scheduled and CANCEL to jobs still
Canceling, which is how protocol v3 copes with lost messages.
"""

import time

import gevent.event

from .. import metrics
from .base import Service

# Longest a wake-up waits for the loop's other work after a pass (seconds).
MAX_GAP = 0.05


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
        self._last_end = 0.0      # time.monotonic() when the last pass ended
        self._last_took = 0.0     # how long it took
        self._behind = False      # a wake-up came while the last pass placed jobs

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
                gap = min(self._last_took, MAX_GAP) - (time.monotonic() - self._last_end)
                if self._behind and gap > 0:
                    # Wake-ups faster than passes: give the loop back for as long as the
                    # last pass held it; what frees meanwhile goes in the same pass.
                    gevent.sleep(gap)
                self._wake.clear()
                self._run(master.schedule_pass, "wake")
                self.passes += 1

    def _run(self, fn, kind):
        """One pass, timed in real time (lavacore_scheduling_pass_seconds; /health
        reports a pass that never ends)."""
        self.busy = True
        self.pass_started = started = time.monotonic()
        placed = None
        try:
            placed = fn()
        finally:
            self.busy = False
            self.pass_started = None
            self._last_end = time.monotonic()
            self._last_took = self._last_end - started
            # Behind: woken again during a pass that placed jobs (a pass that placed none
            # had no backlog, and a submission right after it is served at once).
            self._behind = self._wake.is_set() and bool(placed)
            metrics.of(self.master).passes[kind].observe(self._last_took)

    def idle(self):
        """No pass running and none asked for."""
        return not self.busy and not self._wake.is_set() and not self._full
