"""/metrics and /health numbers of API processes (``lavacore api``).

An API process is not the master: it schedules nothing and hears no worker, so its
/metrics are its own, every name starting ``lavacore_api_`` and every series labelled
``process`` (its index in the pool, stable across restarts), never the master's names
(the lab's gauges, ``lavacore_jobs`` and the rest, come from the master's /metrics).
Counting happens in plain Python numbers on the hot path; the heartbeat copies them into
the pool's shared memory (lavacore/api/shared.py) ten times a second, and whichever
process answers a scrape reads every process's block, so a scraper reaching the pool
through one address sees the same series each time.
"""

import os
import time

from prometheus_client import CollectorRegistry
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.utils import floatToGoString

from .. import __version__
from ..metrics import MAX_AGE, Histogram, LoopWatch
from . import shared

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def kind_of(path):
    """The ``kind`` label of a request path."""
    if path in ("/RPC2", "/RPC2/"):
        return "xmlrpc"
    if path.startswith("/api/"):
        return "rest"
    if path == "/metrics":
        return "metrics"
    if path == "/health":
        return "health"
    return "web"


class ApiMetrics:
    """One API process's numbers (``registry``, ``rendered``, ``max_age``, ``loop`` and
    ``started`` are what lavacore/api/monitoring.py reads, as of the master's Metrics)."""

    def __init__(self, memory, index, storage_name=""):
        self.memory = memory
        self.index = index
        self.storage_name = storage_name
        self.started = time.monotonic()
        self.started_unix = time.time()
        self.max_age = MAX_AGE
        self.rendered = {}
        self.loop = LoopWatch()
        self.requests = dict.fromkeys(shared.KINDS, 0)
        self.request_seconds = Histogram(shared.REQUEST_BUCKETS)
        self.statements = Histogram(shared.STATEMENT_BUCKETS)
        self.connections = 0
        self.subscribers = lambda: 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_PoolCollector(self))

    def observe_request(self, path, seconds):
        kind = kind_of(path)
        self.requests[kind] += 1
        self.request_seconds.observe(seconds)

    def flush(self):
        """Copy this process's numbers into its block of the shared memory."""
        values = [0.0] * shared.FIELDS
        o = shared.OFFSETS
        values[o["pid"]] = os.getpid()
        values[o["started"]] = self.started_unix
        values[o["beat"]] = time.monotonic()
        values[o["connections"]] = self.connections
        values[o["subscribers"]] = self.subscribers()
        for kind in shared.KINDS:
            values[o["requests_" + kind]] = self.requests[kind]
        for name, histogram in (("request_seconds", self.request_seconds),
                                ("loop_lag", self.loop.histogram),
                                ("statement_seconds", self.statements)):
            at = o[name]
            values[at:at + len(histogram.counts)] = histogram.counts
            values[at + len(histogram.counts)] = histogram.total
        self.memory.write_block(self.index, values)


class _PoolCollector:
    def __init__(self, metrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        m = self.metrics
        m.flush()
        memory = m.memory
        info = GaugeMetricFamily("lavacore_api_info", "An API process pool serving the"
                                 " master's HTTP API (always 1).",
                                 labels=["version", "storage", "processes"])
        info.add_metric([__version__, m.storage_name, str(memory.processes)], 1)
        families = [info]
        restarts = CounterMetricFamily("lavacore_api_process_restarts", "API processes"
                                       " the pool restarted (a crash, or a stalled loop).")
        restarts.add_metric([], memory.restarts)
        families.append(restarts)
        requests = CounterMetricFamily("lavacore_api_requests", "HTTP requests answered,"
                                       " by kind (xmlrpc, rest, web, metrics, health).",
                                       labels=["process", "kind"])
        connections = GaugeMetricFamily("lavacore_api_connections", "HTTP connections open.",
                                        labels=["process"])
        subscribers = GaugeMetricFamily("lavacore_api_websocket_subscribers", "Event"
                                        " stream (/ws/) subscribers.", labels=["process"])
        cpu = CounterMetricFamily("lavacore_api_process_cpu_seconds", "CPU time (user and"
                                  " system) of the process.", labels=["process"])
        rss = GaugeMetricFamily("lavacore_api_process_resident_memory_bytes", "Resident"
                                " memory of the process.", labels=["process"])
        start = GaugeMetricFamily("lavacore_api_process_start_time_seconds", "When the"
                                  " process started (Unix time).", labels=["process"])
        histograms = {
            "request_seconds": HistogramMetricFamily(
                "lavacore_api_request_seconds", "Time to answer an HTTP request (the"
                " event stream left out).", labels=["process"]),
            "loop_lag": HistogramMetricFamily(
                "lavacore_api_event_loop_lag_seconds", "How late the process's 100 ms"
                " heartbeat ran: what any request waited for its loop.", labels=["process"]),
            "statement_seconds": HistogramMetricFamily(
                "lavacore_api_storage_statement_seconds", "Time the database took for each"
                " statement and commit of the process.", labels=["process"]),
        }
        o = shared.OFFSETS
        for index in range(memory.processes):
            block = memory.read_block(index)
            pid = int(block[o["pid"]])
            if not pid:
                continue  # not started yet, or being restarted
            label = [str(index)]
            for kind in shared.KINDS:
                requests.add_metric(label + [kind], block[o["requests_" + kind]])
            connections.add_metric(label, block[o["connections"]])
            subscribers.add_metric(label, block[o["subscribers"]])
            start.add_metric(label, block[o["started"]])
            usage = _proc(pid)
            if usage is not None:
                cpu.add_metric(label, usage[0])
                rss.add_metric(label, usage[1])
            for name, bounds in shared.HISTOGRAMS:
                at = o[name]
                counts = block[at:at + len(bounds) + 1]
                histograms[name].add_metric(label, _cumulative(bounds, counts),
                                            block[at + len(bounds) + 1])
        return families + [requests, connections, subscribers, cpu, rss, start] + \
            list(histograms.values())


def _cumulative(bounds, counts):
    result, running = [], 0
    for bound, count in zip(tuple(bounds) + (float("inf"),), counts):
        running += count
        result.append((floatToGoString(bound), running))
    return result


def _proc(pid):
    """(CPU seconds, resident bytes) of ``pid``, None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS, int(fields[21]) * _PAGE
