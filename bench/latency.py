"""Scenario 2 (and issue 2): submit -> START latency for an idle device.

One idle device on one connected simulated worker. Each submission is made the way
``lavacore submit`` makes it, from this (another) process: ``lavacore.jobs.submit`` on its
own storage connection, then the Submitted event through the storage's notification
channel (``Flow.submitted`` with a publisher calling ``storage.publish_event``). The clock
starts before the definition is parsed and stops when the simulated worker receives
START (CLOCK_MONOTONIC is one clock for all processes). The worker runs the job at once
(zero length); the next submission waits until the job is Finished and the device Idle.
"""

import time

from .harness import (JOB_TEXT, BenchError, MasterProcess, SimProcess, Workspace, add_devices,
                      cleanup, percentile, row, wait_until)

NUMBER = 2
NAME = "latency"
TITLE = "Submit -> START latency, idle device"
SIZES = {
    "full": {"submissions": 1000, "warmup": 20},
    "small": {"submissions": 200, "warmup": 10},
    "tiny": {"submissions": 5, "warmup": 1},
}


def run(backend, size, ctx):
    from lavacore.clock import Clock
    from lavacore.flow import Flow
    from lavacore.jobs import submit
    from lavacore.states import JobHealth, JobState

    device = ("lat01", "bench", "lat-worker", ())
    text = JOB_TEXT.format(device_type="bench", name="latency", priority=50)
    latencies = []
    inserts = []
    with cleanup() as defer:
        ws = Workspace(backend, "latency")
        defer(ws.close)
        ws.device_files([device])
        storage = ws.storage()
        defer(storage.close)
        add_devices(storage, [device])
        master = MasterProcess(ws, profile=ctx.profile_path("latency", backend))
        defer(master.stop)
        sim = SimProcess()
        defer(sim.close)
        sim.call("mode", start="zero")
        sim.call("spawn", master=master.controller, logs=master.logs,
                 hostnames=[device[2]])
        sim.call("wait", what="hello_ok", count=1, timeout=30)

        def publish(kind, data, username=None):
            storage.publish_event({"kind": kind, "data": data, "username": username})

        flow = Flow(storage, Clock(), publish)
        incomplete = 0
        for index in range(size["warmup"] + size["submissions"]):
            t0 = time.monotonic()
            jobs = submit(storage, None, None, text, "bench", time.time())
            t1 = time.monotonic()
            flow.submitted(jobs)
            job_id = jobs[0].id
            got = sim.call("job", job=job_id, timeout=30)
            finished = wait_until(
                lambda: (lambda j: j if j.state == JobState.FINISHED else None)(
                    storage.get_job(job_id)), 10, 0.0005, "job %d to finish" % job_id)
            if finished.health != JobHealth.COMPLETE:
                incomplete += 1
            if index >= size["warmup"]:
                latencies.append(got["start"] - t0)
                inserts.append(t1 - t0)
        if incomplete:
            raise BenchError("%d job(s) did not finish Complete" % incomplete)
    ms = [1000 * x for x in latencies]
    p50, p99 = percentile(ms, 50), percentile(ms, 99)
    detail = ("%d submissions (after %d not counted); mean %.1f ms, max %.1f ms; of which "
              "parse + insert in the submitting process: p50 %.1f ms"
              % (len(ms), size["warmup"], sum(ms) / len(ms), max(ms),
                 1000 * percentile(inserts, 50)))
    return [
        row(NUMBER, "submit -> START p50", backend, round(p50, 2), "ms", target="< 10 ms",
            ok=p50 < 10, note=detail),
        row(NUMBER, "submit -> START p99", backend, round(p99, 2), "ms", target="< 50 ms",
            ok=p99 < 50),
    ]
