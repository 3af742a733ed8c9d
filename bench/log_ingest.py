"""Scenario 5: log ingestion from concurrent chatty jobs.

N jobs Running on N simulated workers; each job gets a PUSH socket of its own (as lava-run
has) and the simulated-worker process pushes L lines per job, interleaved, as fast as the
master takes them (ZeroMQ's high-water marks push back). Every tenth line is a test
result, which the master parses into a test case. The clock runs from the first line sent
until every line is in the jobs' output.yaml files (their sizes are watched from here)
and every result is a test case in the database.

The reference is the bare zmq.green log sink of bench/echo.py fed the same lines the same
way: a PULL socket drained as the master's, lines appended to files, nothing parsed.
"""

import os
import time

from .harness import (BenchError, EchoProcess, MasterProcess, SimProcess, Workspace,
                      add_devices, cleanup, hostnames, job_record, queue_jobs, row,
                      wait_until)

NUMBER = 5
NAME = "logs"
TITLE = "Log ingestion, concurrent chatty jobs"
TARGET = 100000.0
SIZES = {
    "full": {"jobs": 100, "lines": 5000, "results_every": 10},
    "small": {"jobs": 100, "lines": 1000, "results_every": 10},
    "tiny": {"jobs": 3, "lines": 50, "results_every": 10},
}


def _sizes(paths):
    def written():
        total = 0
        for path in paths:
            try:
                total += os.path.getsize(path)
            except OSError:
                pass
        return total
    return written


def bare_sink(directory, ids, size):
    """The same lines into the bare zmq.green log sink (bench/echo.py): lines/s."""
    with cleanup() as defer:
        sink_dir = os.path.join(directory, "sink")
        sink = EchoProcess(directory, logs_dir=sink_dir)
        defer(sink.stop)
        sim = SimProcess()
        defer(sim.close)
        sim.call("spawn", master=sink.controller, logs=sink.logs, hostnames=[])
        written = _sizes([os.path.join(sink_dir, str(i), "output.yaml") for i in ids])
        sent = sim.call("logs", jobs=ids, lines=size["lines"],
                        results_every=size["results_every"], timeout=600)
        wait_until(lambda: written() >= sent["bytes"], 120, 0.002, "every line in the sink")
        return sent["sent"] / (time.monotonic() - sent["t0"])


def run(backend, size, ctx):
    workers = hostnames("log-w", size["jobs"])
    devices = [("log%05d" % i, "bench", name, ()) for i, name in enumerate(workers)]
    with cleanup() as defer:
        ws = Workspace(backend, "logs")
        defer(ws.close)
        ws.device_files(devices)
        storage = ws.storage()
        defer(storage.close)
        add_devices(storage, devices)
        ids = queue_jobs(storage, [job_record("bench", name="log%d" % i)
                                   for i in range(size["jobs"])])
        master = MasterProcess(ws, profile=ctx.profile_path("logs", backend))
        defer(master.stop)
        sim = SimProcess()
        defer(sim.close)
        sim.call("mode", start="hold")
        sim.call("spawn", master=master.controller, logs=master.logs, hostnames=workers)
        sim.call("wait", what="jobs_started", count=size["jobs"], timeout=60)
        paths = [os.path.join(storage.get_job(i).output_dir(ws.output_root), "output.yaml")
                 for i in ids]
        written = _sizes(paths)
        before = written()
        cpu0 = master.cpu_seconds()
        sent = sim.call("logs", jobs=ids, lines=size["lines"],
                        results_every=size["results_every"], timeout=600)
        expected = before + sent["bytes"]
        wait_until(lambda: written() >= expected, 120, 0.002, "every line in output.yaml")
        t_lines = time.monotonic()
        cpu = master.cpu_seconds() - cpu0

        def cases():
            return sum(sum(storage.testcase_counts(i).values()) for i in ids)

        wait_until(lambda: cases() >= sent["cases"], 30, 0.01, "every result stored")
        t_cases = time.monotonic()
        if written() != expected:
            raise BenchError("output.yaml holds %d bytes, expected %d" % (written(), expected))
        rss = master.rss_mb()
        sim.call("end", jobs=ids)
        master.stop()
        sim.close()
        bare = bare_sink(ws.dir, ids, size)
    seconds = max(t_lines, t_cases) - sent["t0"]
    rate = sent["sent"] / seconds
    return [row(NUMBER, "bare zmq.green log sink, %d jobs" % size["jobs"], backend,
                round(bare), "lines/s", note="reference, same run: the same lines written "
                "to files by a PULL socket drained as the master's, nothing parsed"),
            row(NUMBER, "log lines/s, %d concurrent jobs" % size["jobs"], backend,
                round(rate), "lines/s", target=">= 100,000/s", ok=rate >= TARGET,
                note="%d lines (%d results -> test cases) in %.2f s; sender alone %.2f s; "
                     "master CPU %.0f%% of one core, RSS %.0f MB"
                     % (sent["sent"], sent["cases"], seconds, sent["t1"] - sent["t0"],
                        100 * cpu / (t_lines - sent["t0"]), rss))]
