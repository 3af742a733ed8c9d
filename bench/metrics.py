"""Scenario 10: what /metrics and the counters behind it cost.

A master (in this process, its HTTP API on a free port) over a lab of 5,000 devices (50
device types on 100 workers) and 100,000 jobs, scraped over real HTTP by a client in a
thread, as Prometheus would:

- the scrape with every storage count read and the exposition rendered again (what
  each scrape costs when they come at least a second apart), and with the rendering
  reused (scrapers within the same second: another Prometheus, a hostile loop); its
  size as text and gzipped; how long the master's loop was held by it;
- once with all 100,000 jobs queued (the worst case: the unfinished jobs are counted
  from the queue index), once with 99% of them finished (a lab's usual state: finished
  jobs are never read);
- the job histograms filled for all 50 types through the ``on_job_state`` hook, so the
  exposition has its full size.

Then the cost of counting on the hot paths: the two dictionary increments per worker
message against the controller's whole handling of a PING; the per-line addition against
the log service's measured cost per line (lines pushed through its real socket); and the
statement timer, on and off, around a real indexed read.

    python -m bench.metrics [--backend sqlite|postgres|all] [--size full|small|tiny]
"""

import argparse
import gzip
import random
import statistics
import sys
import time

from .harness import (BACKENDS, Workspace, add_devices, cleanup, postgres_problem,
                      queue_jobs, row)
from .schedule_pass import jobs as queued_jobs
from .schedule_pass import layout

NUMBER = 10
NAME = "metrics"
TITLE = "/metrics with 5k devices and 100k jobs"
SIZES = {
    "full": {"devices": 5000, "types": 50, "workers": 100, "jobs": 100000, "scrapes": 20,
             "messages": 50000, "lines": 50000, "statements": 20000},
    "small": {"devices": 1000, "types": 20, "workers": 20, "jobs": 20000, "scrapes": 10,
              "messages": 20000, "lines": 20000, "statements": 5000},
    "tiny": {"devices": 50, "types": 5, "workers": 5, "jobs": 200, "scrapes": 3,
             "messages": 2000, "lines": 2000, "statements": 200},
}
SCRAPE_TARGET = 0.25   # seconds: a tenth of a 2.5 s scrape timeout, at most
HELD_TARGET = 0.1      # seconds the loop may be held by one scrape (SQLite blocks it)


# The scraper: a process of its own, as Prometheus is (a thread of this process would
# share the interpreter lock with the master and slow both).
CLIENT = r"""
import json, sys, time, urllib.request
url, count = sys.argv[1], int(sys.argv[2])
headers = {"Accept-Encoding": "gzip"} if sys.argv[3] == "gzip" else {}
times, sizes = [], []
for _ in range(count):
    request = urllib.request.Request(url, headers=headers)
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        body = response.read()
        assert response.status == 200, response.status
    times.append(time.perf_counter() - started)
    sizes.append(len(body))
print(json.dumps({"times": times, "size": sizes[-1]}))
"""


def _client(url, count, encoding=""):
    """Scrape ``url`` ``count`` times from another process: (times, last body size)."""
    import json

    import gevent.subprocess

    done = gevent.subprocess.run([sys.executable, "-c", CLIENT, url, str(count),
                                  encoding or "-"], capture_output=True, text=True,
                                 timeout=600)
    if done.returncode != 0:
        raise RuntimeError("the scraping client failed: %s" % done.stderr.strip()[-500:])
    result = json.loads(done.stdout)
    return result["times"], result["size"]


def _api_config(ws):
    with open(ws.config_path) as handle:
        text = handle.read()
    text = text.replace("[api]\nenabled = false",
                        '[api]\nenabled = true\nlisten = "127.0.0.1:0"')
    with open(ws.config_path, "w") as handle:
        handle.write(text)


def _fill_histograms(master, types, rng, per_type=20):
    """Jobs of every type through the on_job_state hook, as the master's Flow calls it."""
    from lavacore.models import Job
    from lavacore.states import JobHealth, JobState

    now = time.time()
    for device_type in types:
        for n in range(per_type):
            submitted = now - rng.uniform(10, 50000)
            job = Job(id=n, requested_device_type=device_type, submit_time=submitted,
                      start_time=submitted + rng.expovariate(1 / 600.0))
            job.state = JobState.RUNNING
            master.hook.on_job_state(master=master, flow=master.flow, job=job,
                                     old_state=JobState.SCHEDULED)
            job.state = JobState.FINISHED
            job.health = rng.choice((JobHealth.COMPLETE, JobHealth.COMPLETE,
                                     JobHealth.INCOMPLETE, JobHealth.CANCELED))
            job.end_time = job.start_time + rng.expovariate(1 / 1800.0)
            master.hook.on_job_state(master=master, flow=master.flow, job=job,
                                     old_state=JobState.RUNNING)


class _Ticker:
    """A greenlet waking every millisecond: the longest gap between two of its wake-ups
    is the longest the loop was held by anything (here: the scrape)."""

    def __init__(self):
        import gevent

        self.worst = 0.0
        self._last = time.perf_counter()
        self._greenlet = gevent.spawn(self._run)

    def _run(self):
        import gevent

        while True:
            gevent.sleep(0.001)
            now = time.perf_counter()
            self.worst = max(self.worst, now - self._last - 0.001)
            self._last = now

    def take(self):
        worst, self.worst = self.worst, 0.0
        return worst

    def stop(self):
        self._greenlet.kill()


def _scrapes(master, url, count, fresh):
    """Scrapes over HTTP, gzipped as Prometheus asks: (client times, size, the longest
    the loop was held meanwhile)."""
    from lavacore import metrics

    counted = metrics.of(master)
    counted.max_age = 0.0 if fresh else 3600.0
    ticker = _Ticker()
    try:
        ticker.take()
        times, size = _client(url, count, "gzip")
        held = ticker.take()
    finally:
        ticker.stop()
        counted.max_age = metrics.MAX_AGE
    return times, size, held


def _server_side(master, count):
    """What the master does for one anonymous scrape, timed in parts (medians, seconds):
    the storage counts, the whole collection, the visibility rules, the text encoding,
    gzip; and the text."""
    from prometheus_client import generate_latest

    from lavacore import metrics
    from lavacore.api import monitoring

    counted = metrics.of(master)
    parts = {"counts": [], "collect": [], "visible": [], "encode": [], "gzip": []}
    body = b""
    for _ in range(count):
        t0 = time.perf_counter()
        metrics.storage_families(master.storage)
        t1 = time.perf_counter()
        counted.max_age = 0.0
        families = list(counted.registry.collect())
        counted.max_age = metrics.MAX_AGE
        t2 = time.perf_counter()
        families = monitoring.visible(families, master.anonymous_policy())
        t3 = time.perf_counter()
        body = generate_latest(monitoring._Families(families))
        t4 = time.perf_counter()
        gzip.compress(body, monitoring.GZIP_LEVEL)
        t5 = time.perf_counter()
        for name, took in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            parts[name].append(took)
    return {name: statistics.median(times) for name, times in parts.items()}, body


def _message_overhead(master, count):
    """(microseconds per PING handled by the controller, nanoseconds of the counting
    added to each message)."""
    from lavacore import metrics

    controller = master.controller
    frames = [b"bench-worker", b"PING"]
    controller.handle(frames)
    started = time.perf_counter()
    for _ in range(count):
        controller.handle(frames)
    handled = (time.perf_counter() - started) / count
    controller.flush_alive()
    received = metrics.of(master).messages_received
    action = "PING"
    started = time.perf_counter()
    for _ in range(count):
        received[action] += 1
    counting = (time.perf_counter() - started) / count
    started = time.perf_counter()
    for _ in range(count):
        pass
    empty = (time.perf_counter() - started) / count
    return handled * 1e6, max(0.0, counting - empty) * 1e9


def _line_overhead(master, storage, count):
    """(microseconds per log line taken by the log service through its socket,
    nanoseconds of the counting added per line)."""
    import gevent
    import zmq.green as zmq

    from lavacore import metrics
    from lavacore.models import Job

    job_id = storage.insert_jobs([Job(id=None, submitter="bench", requested_device_type=None,
                                      definition="{}", original_definition="{}",
                                      submit_time=time.time())])[0]
    counters = metrics.of(master).log_lines
    push = master.context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.connect(master.logs.endpoint.replace("0.0.0.0", "127.0.0.1"))
    line = ('- {"dt": "2026-12-01T00:00:00.000000", "lvl": "target", "msg": "a line of the'
            ' job\'s console, as long as most"}').encode()
    try:
        first = counters[0]
        # Sent first (the loop does not switch while this greenlet sends), then timed:
        # only the log service's own work is measured.
        for _ in range(count):
            push.send_multipart([str(job_id).encode(), line])
        started = time.perf_counter()
        deadline = time.monotonic() + 120
        while counters[0] - first < count:
            if time.monotonic() > deadline:
                raise RuntimeError("the log service took %d of %d lines"
                                   % (counters[0] - first, count))
            gevent.sleep(0.005)
        taken = (time.perf_counter() - started) / count
    finally:
        push.close(linger=0)
    frames = [b"1", line]
    received = 0
    started = time.perf_counter()
    for _ in range(count):
        received += len(frames[-1])
    counting = (time.perf_counter() - started) / count
    started = time.perf_counter()
    for _ in range(count):
        pass
    empty = (time.perf_counter() - started) / count
    return taken * 1e6, max(0.0, counting - empty) * 1e9


def _statement_overhead(storage, count):
    """(microseconds per indexed read without the timer, with it)."""
    timer = storage.statement_timer
    hostname = storage._one("SELECT hostname FROM devices LIMIT 1")[0]
    results = {}
    try:
        for label, value in (("off", None), ("on", timer), ("off", None), ("on", timer)):
            storage.statement_timer = value
            started = time.perf_counter()
            for _ in range(count):
                storage.get_device(hostname)
            results.setdefault(label, []).append((time.perf_counter() - started) / count)
    finally:
        storage.statement_timer = timer
    return min(results["off"]) * 1e6, min(results["on"]) * 1e6


def _library_costs(count=200000):
    """Nanoseconds per update: lavacore's Histogram and prometheus_client's."""
    from prometheus_client import CollectorRegistry, Counter
    from prometheus_client import Histogram as ClientHistogram

    from lavacore.metrics import STATEMENT_BUCKETS, Histogram

    registry = CollectorRegistry()
    theirs = ClientHistogram("bench_seconds", "", buckets=STATEMENT_BUCKETS,
                             registry=registry)
    counter = Counter("bench_messages", "", ["type"], registry=registry)
    ours = Histogram(STATEMENT_BUCKETS)
    costs = {}
    for name, fn in (("lavacore Histogram.observe", lambda: ours.observe(0.0003)),
                     ("prometheus_client Histogram.observe", lambda: theirs.observe(0.0003)),
                     ("prometheus_client Counter.labels().inc",
                      lambda: counter.labels("PING").inc())):
        started = time.perf_counter()
        for _ in range(count):
            fn()
        costs[name] = (time.perf_counter() - started) / count * 1e9
    return costs


def run(backend, size, ctx):
    import gevent

    from lavacore.master import Master
    from lavacore.states import DeviceHealth, DeviceState, JobState

    rng = random.Random(17)
    devices = layout(size)
    types = sorted({d[1] for d in devices})
    rows = []
    with cleanup() as defer:
        ws = Workspace(backend, "metrics")
        defer(ws.close)
        ws.write_config({"schedule_interval": 86400, "watchdog_interval": 1})
        _api_config(ws)
        ws.device_files(devices)
        storage = ws.storage()
        t0 = time.monotonic()
        add_devices(storage, devices)
        queue_jobs(storage, queued_jobs(size, rng))
        prepare = time.monotonic() - t0
        storage.close()
        master = Master(ws.config()).start()
        defer(master.stop)
        gevent.sleep(0.2)
        storage = master.storage
        # A lab's mix of device states and healths.
        with storage.transaction():
            for hostname, *_ in rng.sample(devices, len(devices) // 3):
                storage.update_device(hostname, state=rng.choice(list(DeviceState)),
                                      health=rng.choice(list(DeviceHealth)))
        _fill_histograms(master, types, rng)
        url = master.api.url + "/metrics"
        _client(url, 1)  # caches, first imports
        label = "%d devices, %d jobs" % (len(devices), size["jobs"])
        for phase in ("all queued", "99% finished"):
            if phase == "99% finished":
                storage._execute("UPDATE jobs SET state = %d, health = 1 WHERE id %% 100"
                                 " <> 0" % int(JobState.FINISHED))
                if backend == "postgres":
                    # What autovacuum does soon after such an update: without it, the
                    # queue index still points at 99,000 dead rows to check.
                    storage._execute("VACUUM ANALYZE jobs")
            parts, body = _server_side(master, max(3, size["scrapes"] // 2))
            fresh, zipped, held = _scrapes(master, url, size["scrapes"], fresh=True)
            reused, _, _ = _scrapes(master, url, size["scrapes"], fresh=False)
            lines = sum(1 for text in body.decode().splitlines()
                        if text and not text.startswith("#"))
            p50 = statistics.median(fresh)
            rows.append(row(NUMBER, "scrape, storage counts read, %s (%s)" % (label, phase),
                            backend, round(p50 * 1000, 1), "ms", target="< %d ms" % (
                                SCRAPE_TARGET * 1000), ok=p50 < SCRAPE_TARGET,
                            note="p50 of %d gzipped scrapes over HTTP from another"
                                 " process, max %.1f ms; in the master (medians): storage"
                                 " counts %.1f ms, all families %.1f ms, visibility %.1f"
                                 " ms, text %.1f ms, gzip %.1f ms; lab prepared in %.1f s"
                                 % (len(fresh), max(fresh) * 1000, parts["counts"] * 1000,
                                    parts["collect"] * 1000, parts["visible"] * 1000,
                                    parts["encode"] * 1000, parts["gzip"] * 1000, prepare)))
            rows.append(row(NUMBER, "scrape, rendering reused (%s)" % phase, backend,
                            round(statistics.median(reused) * 1000, 1), "ms",
                            note="p50 of %d, max %.1f ms (a second scraper within a"
                                 " second)" % (len(reused), max(reused) * 1000)))
            rows.append(row(NUMBER, "loop held by a scrape (%s)" % phase, backend,
                            round(held * 1000, 1), "ms", target="< %d ms" % (
                                HELD_TARGET * 1000), ok=held < HELD_TARGET,
                            note="the longest a 1 ms ticker greenlet waited during the"
                                 " scrapes with the storage counts read (SQLite blocks the"
                                 " loop while it reads; PostgreSQL yields)"))
            rows.append(row(NUMBER, "exposition size (%s)" % phase, backend,
                            round(len(body) / 1024, 1), "KiB",
                            note="%d samples; gzipped %.1f KiB (sent gzipped when the"
                                 " scraper accepts it, as Prometheus does)" % (
                                     lines, zipped / 1024)))
        handled, counting = _message_overhead(master, size["messages"])
        rows.append(row(NUMBER, "counting per worker message", backend, round(counting, 1),
                        "ns", difference=True,
                        note="%.1f%% of the controller's %.2f us per PING handled"
                             " (a dict increment)" % (100 * counting / 1000 / handled,
                                                      handled)))
        taken, per_line = _line_overhead(master, storage, size["lines"])
        rows.append(row(NUMBER, "counting per log line", backend, round(per_line, 1), "ns",
                        difference=True,
                        note="%.2f%% of the log service's %.2f us per line taken through"
                             " its socket" % (100 * per_line / 1000 / taken, taken)))
        off, on = _statement_overhead(storage, size["statements"])
        rows.append(row(NUMBER, "statement timer", backend, round((on - off) * 1000, 0),
                        "ns", difference=True,
                        note="an indexed read: %.1f us without the timer, %.1f us"
                             " with it (%+.1f%%)" % (off, on, 100 * (on - off) / off)))
    if backend == BACKENDS[0]:
        for name, cost in _library_costs().items():
            rows.append(row(NUMBER, name, backend, round(cost), "ns",
                            note="per update, in this process (no storage involved)"))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.metrics",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=BACKENDS + ("all",), default="all")
    parser.add_argument("--size", choices=tuple(SIZES), default="full")
    args = parser.parse_args(argv)
    backends = list(BACKENDS) if args.backend == "all" else [args.backend]
    if "postgres" in backends:
        problem = postgres_problem()
        if problem is not None:
            if args.backend == "postgres":
                raise SystemExit("bench.metrics: cannot run on PostgreSQL: %s" % problem)
            print("bench.metrics: PostgreSQL skipped: %s" % problem, file=sys.stderr)
            backends.remove("postgres")
    rows = []
    for backend in backends:
        rows.extend(run(backend, SIZES[args.size], None))
    print("| measure | backend | value | unit | target | result | note |")
    print("|---|---|---:|---|---|---|---|")
    for item in rows:
        verdict = {True: "pass", False: "**MISS**", None: ""}[item["ok"]]
        print("| %s | %s | %s | %s | %s | %s | %s |" % (
            item["measure"], item["backend"], item["value"], item["unit"],
            item["target"] or "", verdict, item["note"]))
    return 0 if all(item["ok"] is not False for item in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
