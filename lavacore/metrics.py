"""lavacore's Prometheus metrics: what they are, one set per master.

``of(master)`` is the master's :class:`Metrics` (made on first use, kept as long as the
master lives). Its ``registry`` is a prometheus_client ``CollectorRegistry`` of its own,
never the global one, so several masters in one process (the tests) never mix their
numbers; a site plugin may register its own collectors there.

Three kinds of numbers, each measured where it is cheapest:

- **Counted where it happens**, on the hot paths, as plain integers and lock-free
  histograms (the master is one thread): messages from workers (controller), log lines
  (logs service), scheduling passes (scheduler), loop lag (watchdog), storage statements
  (storage), job queue and run times and finished jobs (the ``on_job_state`` hook of the
  ``metrics`` plugin). An increment costs tens of nanoseconds, an observation a few
  hundred; prometheus_client's own Counter and Histogram take a lock and cost 0.5-1.7 us.
- **Read from storage at scrape time**: jobs not finished by state, the queue by device
  type, devices and workers by state and health: a few GROUP BY counts, over indexes
  (the unfinished jobs are a range of the queue index; finished jobs, which only grow,
  are never counted there).
- **The process**: prometheus_client's process, platform and gc collectors.

Names follow Prometheus conventions: ``lavacore_`` prefix, base units in the name
(``_seconds``, ``_bytes``), ``_total`` for counters. Labels are bounded by the lab:
``device_type``, ``state``, ``health``, ``type`` (a protocol message), ``kind`` (of a
scheduling pass); never a job id, a device hostname or a user.
"""

import bisect
import logging
import math
import time
import weakref

import gevent
import gevent.lock
from prometheus_client import (CollectorRegistry, GCCollector, PlatformCollector,
                               ProcessCollector)
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.utils import floatToGoString

from . import __version__, protocol
from .ratelog import RateLimitedLog
from .states import DeviceHealth, DeviceState, JobState, WorkerHealth, WorkerState

log = logging.getLogger("lavacore.metrics")

# Submit -> START: a job placed at once waits milliseconds; a busy lab's queue, hours.
QUEUE_BUCKETS = (0.01, 0.05, 0.25, 1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 43200,
                 86400)
# START -> END: a smoke test takes seconds, a long soak days.
RUN_BUCKETS = (1, 10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 259200,
               604800)
# One storage statement: an indexed SQLite read takes tens of microseconds, a PostgreSQL
# round trip a few hundred; seconds mean a lock wait or a sick server.
STATEMENT_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                     0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# A scheduling pass: milliseconds for a wake-up, seconds when thousands of jobs start.
PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                60)
# How late the watchdog's heartbeat ran: what every greenlet waited at worst.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# A device type the caller may not see is reported under this name (lavacore.api.
# monitoring): its numbers count, its name does not show.
HIDDEN = "(hidden)"
# Seconds the storage counts, and each rendered exposition (lavacore/api/monitoring.py),
# are reused: whatever the number of scrapers, /metrics costs the database and the loop
# at most one set of counts and one rendering (of each format and viewer) a second.
MAX_AGE = 1.0
STORAGE_TIMEOUT = 5.0   # seconds the storage counts may take (a hung PostgreSQL)
LAG_WINDOW = 10.0       # seconds the worst loop lag is remembered (lavacore/api/monitoring.py)

RECEIVED = (protocol.HELLO, protocol.HELLO_RETRY, protocol.PING, protocol.START_OK,
            protocol.END)
INVALID = "invalid"
UNFINISHED = tuple(s for s in JobState if s != JobState.FINISHED)


class Histogram:
    """A histogram for one thread: ``observe`` is a bisection and two additions (no lock:
    the master is one OS thread, and a greenlet never switches inside it). Bucket bounds
    are inclusive upper bounds, as Prometheus's ``le``."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds):
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value):
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self):
        return sum(self.counts)

    def cumulative(self):
        """[(le as Prometheus writes it, observations <= le)], ending with +Inf."""
        result, running = [], 0
        for bound, count in zip(self.bounds + (math.inf,), self.counts):
            running += count
            result.append((floatToGoString(bound), running))
        return result


class Histograms:
    """Histograms by one label value, made on first observation."""

    __slots__ = ("bounds", "by")

    def __init__(self, bounds):
        self.bounds = bounds
        self.by = {}

    def observe(self, label, value):
        histogram = self.by.get(label)
        if histogram is None:
            histogram = self.by[label] = Histogram(self.bounds)
        histogram.observe(value)

    def get(self, label):
        return self.by.get(label)


class LoopWatch:
    """How late the watchdog's heartbeat ran (the loop's lag), for /metrics and /health:
    every lag observed, the time of the last beat, and the worst lag of roughly the last
    ``window`` seconds. Real monotonic time: a test's fake clock must not look like a
    stall."""

    def __init__(self, window=LAG_WINDOW):
        self.histogram = Histogram(LAG_BUCKETS)
        self.window = window
        self.interval = None      # the heartbeat's period, once it runs
        self.last_beat = None     # time.monotonic() of the last beat
        self.worst = 0.0
        self.worst_at = 0.0

    def beat(self, lag, now=None):
        now = time.monotonic() if now is None else now
        lag = max(0.0, lag)
        self.histogram.observe(lag)
        self.last_beat = now
        if lag >= self.worst or now - self.worst_at > self.window:
            self.worst, self.worst_at = lag, now

    def lag_now(self, now=None):
        """How late the next beat already is (0 when it is not due yet)."""
        if self.last_beat is None or self.interval is None:
            return 0.0
        now = time.monotonic() if now is None else now
        return max(0.0, now - self.last_beat - self.interval)

    def recent_worst(self, now=None):
        now = time.monotonic() if now is None else now
        return self.worst if now - self.worst_at <= self.window else 0.0


class Metrics:
    """The metrics of one master. The services hold references to the counters they
    update; ``registry`` gathers them with the storage counts and the process."""

    def __init__(self, master):
        self._master = weakref.ref(master)  # (kept in a WeakKeyDictionary by master)
        self.started = time.monotonic()
        self.messages_received = dict.fromkeys(RECEIVED + (INVALID,), 0)
        self.log_lines = [0, 0]              # messages on the log socket, their bytes
        self.jobs_finished = {}              # (device type, health name) -> count
        self.job_queue = Histograms(QUEUE_BUCKETS)
        self.job_run = Histograms(RUN_BUCKETS)
        self.statements = Histogram(STATEMENT_BUCKETS)
        self.passes = {"wake": Histogram(PASS_BUCKETS), "full": Histogram(PASS_BUCKETS)}
        self.loop = LoopWatch()
        self.max_age = MAX_AGE
        self.rendered = {}                   # (viewer, format, gzip) -> (time, body)
        self.storage_timeout = STORAGE_TIMEOUT
        self._storage_cache = None           # (monotonic time, families)
        self._storage_lock = gevent.lock.Semaphore()
        self._drops = RateLimitedLog(log)
        self.registry = CollectorRegistry(auto_describe=False)
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self.registry.register(_LabCollector(self))

    @property
    def master(self):
        return self._master()

    # -- what the hooks and services call ---------------------------------------------

    def job_started(self, job):
        """``job`` is Running: its wait in the queue (health checks excluded: they are
        made when their device is free, so their wait says nothing about the queue)."""
        if job.health_check or not job.requested_device_type or job.submit_time is None \
                or job.start_time is None:
            return
        self.job_queue.observe(job.requested_device_type,
                               max(0.0, job.start_time - job.submit_time))

    def job_finished(self, job):
        """``job`` is Finished: counted by health, and its run time if it ran."""
        device_type = job.requested_device_type
        if not device_type:
            return  # a MultiNode dynamic connection: no device, no type
        key = (device_type, job.health.display)
        self.jobs_finished[key] = self.jobs_finished.get(key, 0) + 1
        if job.start_time is not None and job.end_time is not None:
            self.job_run.observe(device_type, max(0.0, job.end_time - job.start_time))

    # -- scrape ------------------------------------------------------------------------

    def storage_families(self):
        """The storage counts as metric families (at most one query set per
        ``max_age``; concurrent scrapes share one), or None when the storage did
        not answer within ``storage_timeout``."""
        cached = self._storage_cache
        if cached is not None and time.monotonic() - cached[0] < self.max_age:
            return cached[1]
        with self._storage_lock:
            cached = self._storage_cache
            if cached is not None and time.monotonic() - cached[0] < self.max_age:
                return cached[1]
            families = self._query_storage()
            self._storage_cache = (time.monotonic(), families)
            return families

    def _query_storage(self):
        from .storage import StorageError

        master = self.master
        if master is None or master.storage is None:
            return None
        timer = gevent.Timeout(self.storage_timeout)
        try:
            with timer:
                return storage_families(master.storage)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise  # someone else's deadline
            self._drops.error("timeout", "metrics: the storage counts took more than %g s;"
                              " /metrics answers without them", self.storage_timeout)
        except StorageError as exc:
            self._drops.error("storage", "metrics: storage counts unavailable: %s", exc)
        return None


def storage_families(storage):
    """Jobs not finished by state, the queue by device type, devices and workers by
    state and health, with the device types' names: five statements, each bounded by
    what is waiting or what the lab has (the finished jobs are never read)."""
    jobs = GaugeMetricFamily("lavacore_jobs", "Jobs not finished yet, by state (finished"
                             " ones: lavacore_jobs_finished_total).", labels=["state"])
    queued = GaugeMetricFamily("lavacore_queued_jobs", "Jobs waiting for a device"
                               " (Submitted), by requested device type.",
                               labels=["device_type"])
    by_state = dict.fromkeys(UNFINISHED, 0)
    waiting = {}
    for state, device_type, count in storage._all(
            "SELECT state, requested_device_type, COUNT(*) FROM jobs WHERE state < ?"
            " GROUP BY state, requested_device_type", (int(JobState.FINISHED),)):
        state = _member(JobState, state)
        if state is None:
            continue
        by_state[state] = by_state.get(state, 0) + count
        if state == JobState.SUBMITTED and device_type is not None:
            waiting[device_type] = count
    for state, count in by_state.items():
        jobs.add_metric([state.display], count)
    for (name,) in storage._all("SELECT name FROM device_types"):
        waiting.setdefault(name, 0)
    for device_type in sorted(waiting):
        queued.add_metric([device_type], waiting[device_type])
    devices = GaugeMetricFamily("lavacore_devices", "Devices by device type, state and"
                                " health.", labels=["device_type", "state", "health"])
    for device_type, state, health, count in storage._all(
            "SELECT device_type, state, health, COUNT(*) FROM devices"
            " GROUP BY device_type, state, health"):
        state, health = _member(DeviceState, state), _member(DeviceHealth, health)
        if state is not None and health is not None:
            devices.add_metric([device_type, state.display, health.display], count)
    workers = GaugeMetricFamily("lavacore_workers", "Workers by state (Online: heard from"
                                " within worker_timeout) and health.",
                                labels=["state", "health"])
    seen = {(s, h): 0 for s in WorkerState for h in WorkerHealth}
    for state, health, count in storage._all(
            "SELECT state, health, COUNT(*) FROM workers GROUP BY state, health"):
        state, health = _member(WorkerState, state), _member(WorkerHealth, health)
        if state is not None and health is not None:
            seen[(state, health)] = count
    for (state, health), count in seen.items():
        workers.add_metric([state.display, health.display], count)
    return [jobs, queued, devices, workers]


def _member(enum, value):
    try:
        return enum(value)
    except ValueError:
        return None


class _LabCollector:
    """The master's own families for the registry, built at each scrape."""

    def __init__(self, metrics):
        self.metrics = metrics

    def describe(self):
        return [family for family in self._memory(empty=True)] + [
            GaugeMetricFamily(name, "") for name in (
                "lavacore_jobs", "lavacore_queued_jobs", "lavacore_devices",
                "lavacore_workers", "lavacore_storage_up")]

    def collect(self):
        families = list(self._memory())
        stored = self.metrics.storage_families()
        up = GaugeMetricFamily("lavacore_storage_up", "1 if the storage counts of this"
                               " scrape were read, 0 if the storage did not answer.")
        up.add_metric([], 0 if stored is None else 1)
        return families + [up] + list(stored or ())

    def _memory(self, empty=False):
        m = self.metrics
        master = m.master
        info = GaugeMetricFamily("lavacore_info", "lavacore's version and storage backend"
                                 " (always 1).", labels=["version", "storage"])
        storage = getattr(getattr(master, "storage", None), "name", "")
        if not empty:
            info.add_metric([__version__, storage or ""], 1)
        yield info
        finished = CounterMetricFamily(
            "lavacore_jobs_finished", "Jobs finished by this master since it started, by"
            " device type and health.", labels=["device_type", "health"])
        if not empty:
            for (device_type, health), count in sorted(m.jobs_finished.items()):
                finished.add_metric([device_type, health], count)
        yield finished
        yield _histograms("lavacore_job_queue_seconds", "Time from submission to START"
                          " (Running) of jobs that are not health checks, by device type.",
                          m.job_queue, empty)
        yield _histograms("lavacore_job_run_seconds", "Time from START (Running) to the"
                          " end of jobs, by device type.", m.job_run, empty)
        received = CounterMetricFamily("lavacore_messages_received", "Messages from"
                                       " workers on the controller socket, by protocol"
                                       " message type (invalid: dropped undecoded).",
                                       labels=["type"])
        if not empty:
            for kind, count in m.messages_received.items():
                received.add_metric([kind], count)
        yield received
        lines = CounterMetricFamily("lavacore_log_lines_received", "Messages (job log"
                                    " lines) received on the log socket.")
        size = CounterMetricFamily("lavacore_log_bytes_received", "Bytes of job log lines"
                                   " received on the log socket.")
        if not empty:
            lines.add_metric([], m.log_lines[0])
            size.add_metric([], m.log_lines[1])
        yield lines
        yield size
        yield _histogram("lavacore_storage_statement_seconds", "Time the database took"
                         " for each statement and commit of this master.", m.statements,
                         empty)
        passes = HistogramMetricFamily("lavacore_scheduling_pass_seconds", "Scheduling"
                                       " passes: on a wake-up (wake) or the periodic one that"
                                       " also resends START and CANCEL (full).",
                                       labels=["kind"])
        if not empty:
            for kind, histogram in m.passes.items():
                passes.add_metric([kind], histogram.cumulative(), histogram.total)
        yield passes
        yield _histogram("lavacore_event_loop_lag_seconds", "How late the watchdog's"
                         " heartbeat ran: what any greenlet could have waited for the"
                         " loop.", m.loop.histogram, empty)


def _histogram(name, documentation, histogram, empty):
    family = HistogramMetricFamily(name, documentation)
    if not empty:
        family.add_metric([], histogram.cumulative(), histogram.total)
    return family


def _histograms(name, documentation, histograms, empty):
    family = HistogramMetricFamily(name, documentation, labels=["device_type"])
    if not empty:
        for label in sorted(histograms.by):
            histogram = histograms.by[label]
            family.add_metric([label], histogram.cumulative(), histogram.total)
    return family


_ALL = weakref.WeakKeyDictionary()


def of(master):
    """The :class:`Metrics` of ``master``, made on first use."""
    metrics = _ALL.get(master)
    if metrics is None:
        metrics = _ALL[master] = Metrics(master)
    return metrics


__all__ = ["Metrics", "Histogram", "Histograms", "LoopWatch", "of", "storage_families",
           "HIDDEN"]
