"""Scenario 3: one scheduling pass over a big queue.

100,000 queued jobs over 50 device types, with tags and three priorities; 5,000 devices
(100 per type) on 100 workers, a quarter of the devices tagged. The master runs in this
process (a real ``Master.start()`` on the prepared database; no worker is connected, so
no START leaves it) and the pass is timed in two parts:

- decision: what the master does before it changes anything: the scheduling view (the
  available devices), the health-check plan and the scheduler plugin's ``schedule`` hook
  (FIFO), the last one timed on its own too;
- decision + apply: ``Master.schedule_pass()``, which also moves each placed job to
  Scheduled and builds its START (device dictionary rendered, files written, one
  transaction per job).

Growth: the decision is timed with 10%, 20%, 40% and 100% of the workers Online (so of
the devices available) and the exponent of a power-law fit is reported (1.0 = linear).
Then the steady state: after the full pass every device is busy; 1% of them are freed and
one pass places jobs on them.
"""

import math
import random
import statistics
import time

from .harness import (Workspace, add_devices, cleanup, job_record, queue_jobs, row)

NUMBER = 3
NAME = "schedule"
TITLE = "Scheduling pass, 100k queued jobs"
SIZES = {
    "full": {"devices": 5000, "types": 50, "workers": 100, "jobs": 100000,
             "growth": [0.1, 0.2, 0.4, 1.0], "repeats": 3, "steady": 0.01},
    "small": {"devices": 1000, "types": 20, "workers": 20, "jobs": 20000,
              "growth": [0.25, 1.0], "repeats": 2, "steady": 0.05},
    "tiny": {"devices": 50, "types": 5, "workers": 5, "jobs": 200,
             "growth": [0.4, 1.0], "repeats": 1, "steady": 0.1},
}

# Device tags by position within its type; job tags drawn with these weights. Every job
# fits some device of its type.
DEVICE_TAGS = [(), (), ("usb",), ("usb", "fast"), (), (), ("usb",), ("gpu",)]
JOB_TAGS = [((), 70), (("usb",), 20), (("fast",), 7), (("gpu",), 3)]


def layout(size):
    """Devices: (hostname, type, worker, tags); device i has type i % types, so every
    worker holds devices of every type."""
    per_worker = size["devices"] // size["workers"]
    devices = []
    for i in range(size["devices"]):
        kind = i % size["types"]
        devices.append(("dev%05d" % i, "type%02d" % kind, "worker%03d" % (i // per_worker),
                        DEVICE_TAGS[(i // size["types"]) % len(DEVICE_TAGS)]))
    return devices


def jobs(size, rng):
    tags = [t for t, _ in JOB_TAGS]
    weights = [w for _, w in JOB_TAGS]
    now = time.time() - 86400
    return [job_record("type%02d" % rng.randrange(size["types"]),
                       rng.choices(tags, weights)[0], rng.choice((0, 50, 50, 50, 100)),
                       now + i * 0.001, name="q%d" % i) for i in range(size["jobs"])]


def run(backend, size, ctx):
    import gevent
    from lavacore import health
    from lavacore.master import Master
    from lavacore.scheduling import SchedulingView
    from lavacore.states import CHECKABLE_HEALTH, DeviceState, WorkerState

    rng = random.Random(9)
    devices = layout(size)
    workers = sorted({d[2] for d in devices})
    rows = []
    with cleanup() as defer:
        ws = Workspace(backend, "schedule")
        defer(ws.close)
        # No periodic pass or watchdog during the measurements: only the passes timed here.
        ws.write_config({"schedule_interval": 86400, "watchdog_interval": 86400})
        ws.device_files(devices)
        storage = ws.storage()
        t0 = time.monotonic()
        add_devices(storage, devices)
        queue_jobs(storage, jobs(size, rng))
        prepare = time.monotonic() - t0
        storage.close()
        master = Master(ws.config()).start()
        defer(master.stop)
        gevent.sleep(0.2)  # the start-up pass (nobody Online: nothing to do)
        storage = master.storage

        def set_online(names):
            with storage.transaction():
                for name in workers:
                    storage.update_worker(name, state=WorkerState.ONLINE if name in names
                                          else WorkerState.OFFLINE)

        def decide():
            t0 = time.perf_counter()
            view = SchedulingView(storage, healths=CHECKABLE_HEALTH)
            health.plan(master, view)
            t1 = time.perf_counter()
            placed = master.hook.schedule(master=master, queue=view) or []
            t2 = time.perf_counter()
            return t2 - t0, t2 - t1, len(placed)

        growth = []
        for share in size["growth"]:
            online = set(workers[:max(1, round(share * len(workers)))])
            set_online(online)
            available = sum(1 for d in devices if d[2] in online)
            times = [decide() for _ in range(size["repeats"])]
            growth.append((available, statistics.median(t[0] for t in times),
                           statistics.median(t[1] for t in times), times[0][2]))
        full_devices, decision, hook_only, placed = growth[-1]
        t0 = time.perf_counter()
        started = master.schedule_pass()
        apply_all = time.perf_counter() - t0
        # Steady state: every device busy; free a few and schedule again, once the files
        # of the full pass's STARTs are written (their native thread would otherwise still
        # be writing thousands of files, taking the GIL from the loop at every switch).
        t0 = time.perf_counter()
        master.files.flush(300)
        drained = time.perf_counter() - t0
        freed = rng.sample([d[0] for d in devices], max(1, int(size["steady"] * len(devices))))
        with storage.transaction():
            for hostname in freed:
                storage.update_device(hostname, state=DeviceState.IDLE, current_job=None)
        steady_decision = decide()[0]
        t0 = time.perf_counter()
        steady_started = master.schedule_pass()
        steady = time.perf_counter() - t0
        # A second full pass, every device freed: their configurations are now cached,
        # as in a running lab (the first pass after a start renders each device once).
        master.files.flush(300)
        with storage.transaction():
            for hostname, *_ in devices:
                storage.update_device(hostname, state=DeviceState.IDLE, current_job=None)
        t0 = time.perf_counter()
        warm_started = master.schedule_pass()
        warm = time.perf_counter() - t0
    exponent = _exponent([(g[0], g[1]) for g in growth])
    queue_note = "%d queued jobs, %d device types, %d workers (prepared in %.1f s)" % (
        size["jobs"], size["types"], len(workers), prepare)
    rows.append(row(NUMBER, "decision, %d idle devices" % full_devices, backend,
                    round(1000 * decision, 1), "ms", target="< 100 ms", ok=decision < 0.1,
                    note="%s; %d jobs placed; FIFO hook alone %.1f ms" % (
                        queue_note, placed, 1000 * hook_only)))
    rows.append(row(NUMBER, "decision + apply, %d idle devices" % full_devices, backend,
                    round(1000 * apply_all, 1), "ms", target="< 1000 ms",
                    ok=apply_all < 1.0,
                    note="%d jobs Scheduled and START built (%.2f ms per job)" % (
                        len(started), 1000 * apply_all / max(1, len(started)))))
    rows.append(row(NUMBER, "decision + apply again, configurations cached", backend,
                    round(1000 * warm, 1), "ms", target="< 1000 ms", ok=warm < 1.0,
                    note="%d jobs Scheduled and START built (%.2f ms per job); the first"
                    " pass rendered each device's configuration (cached since)" % (
                        len(warm_started), 1000 * warm / max(1, len(warm_started)))))
    rows.append(row(NUMBER, "steady pass, %d idle of %d devices" % (len(freed), len(devices)),
                    backend, round(1000 * steady, 1), "ms", target="< 50 ms",
                    ok=steady < 0.05, note="decision %.1f ms; %d jobs placed (measured once the"
                    " full pass's START files were written, %.1f s after it)" % (
                        1000 * steady_decision, len(steady_started), drained)))
    rows.append(row(NUMBER, "decision cost growth exponent", backend,
                    round(exponent, 2), "(1 = linear)", target="<= 1.1", ok=exponent <= 1.1,
                    note="decision ms at " + ", ".join(
                        "%d: %.1f" % (g[0], 1000 * g[1]) for g in growth) + " idle devices"))
    return rows


def _exponent(points):
    """Least-squares slope of log(time) against log(devices)."""
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(max(t, 1e-9)) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
