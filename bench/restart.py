"""Scenario 7: a loaded master killed and restarted.

The database holds R jobs Running on R devices (one per worker) and Q queued jobs. A first
master runs with the R workers connected (each pings every second, and answers STATUS with
START_OK, as a lava-slave whose job still runs), then gets SIGKILL. A second master starts
on the same fixed ports at t0. Measured from t0:

- answers: the first PONG to a probe worker that pings every 10 ms;
- schedules again: the first START for a queued job on a spare worker (with idle devices)
  whose lava-slave starts at t0 too, so it connects as soon as the master is there.

Afterwards the R jobs must still be Running (the workers confirmed them on STATUS).
"""

import time

from .harness import (BenchError, MasterProcess, SimProcess, Workspace, add_devices, cleanup,
                      free_port, hostnames, job_record, queue_jobs, row, wait_until)

NUMBER = 7
NAME = "restart"
TITLE = "Restart under load"
TARGET = 2.0
SIZES = {
    "full": {"running": 1000, "queued": 100000, "spare": 10, "types": 10},
    "small": {"running": 200, "queued": 20000, "spare": 5, "types": 5},
    "tiny": {"running": 5, "queued": 100, "spare": 2, "types": 2},
}


def run(backend, size, ctx):
    from lavacore.states import DeviceState, JobState, WorkerState

    types = ["rtype%02d" % i for i in range(size["types"])]
    busy = hostnames("rs-w", size["running"])
    devices = [("rs%05d" % i, types[i % len(types)], name, ())
               for i, name in enumerate(busy)]
    spare = [("spare%03d" % i, types[i % len(types)], "rs-spare", ())
             for i in range(size["spare"])]
    with cleanup() as defer:
        ws = Workspace(backend, "restart")
        defer(ws.close)
        ws.write_config({"listen": "tcp://127.0.0.1:%d" % free_port(),
                         "logs": "tcp://127.0.0.1:%d" % free_port()})
        ws.device_files(devices + spare)
        storage = ws.storage()
        defer(storage.close)
        t_prep = time.monotonic()
        add_devices(storage, devices + spare)
        now = time.time() - 3600
        running = queue_jobs(storage, [job_record(d[1], now=now, name="run%d" % i)
                                       for i, d in enumerate(devices)])
        with storage.transaction():
            for job_id, device in zip(running, devices):
                storage.update_job(job_id, state=JobState.RUNNING, actual_device=device[0],
                                   worker=device[2], start_time=now + 1)
                storage.update_device(device[0], state=DeviceState.RUNNING,
                                      current_job=job_id)
        queue_jobs(storage, [job_record(types[i % len(types)], now=now + 2 + i * 1e-4,
                                        name="queued%d" % i) for i in range(size["queued"])])
        t_prep = time.monotonic() - t_prep

        first = MasterProcess(ws)
        defer(first.kill)
        workers = SimProcess()
        defer(workers.close)
        workers.call("mode", start="hold", status="running")
        workers.call("spawn", master=first.controller, logs=first.logs, hostnames=busy)
        workers.call("wait", what="hello_ok", count=len(busy), timeout=60)
        # lava-slave pings every 20 s of silence; here every second, so that all of them
        # are back within a second of the restart (the storm the new master must take).
        workers.call("ping_every", interval=1.0)
        probe = SimProcess()
        defer(probe.close)
        probe.call("spawn", master=first.controller, hostnames=["rs-probe"], reconnect_ivl=10)
        probe.call("wait", what="hello_ok", count=1, timeout=30)
        probe.call("ping_every", interval=0.01)
        time.sleep(0.5)
        first.kill()
        probe.call("mark")
        status_before = workers.call("stats")["counts"]["status"]

        t0 = time.monotonic()
        second = MasterProcess(ws, profile=ctx.profile_path("restart", backend))
        defer(second.stop)
        probe.call("spawn", master=second.controller, logs=second.logs,
                   hostnames=["rs-spare"], reconnect_ivl=10)
        probe.call("mode", start="hold")
        answered = probe.call("first", what="pong", timeout=60)["t"]
        scheduled = probe.call("first", what="start", timeout=60)["t"]
        t_ready = second.t_ready
        confirmed = workers.call("wait", what="status", count=status_before + len(busy),
                                 timeout=60)
        t_confirmed = confirmed["t"]
        wait_until(lambda: len(storage.list_workers(state=WorkerState.ONLINE)) >= len(busy) + 2,
                   30, 0.05, "every worker Online again")
        still = storage.count_jobs(state=JobState.RUNNING)
        if still < len(busy):
            raise BenchError("%d of %d jobs still Running after the restart"
                             % (still, len(busy)))
    answer = answered - t0
    schedule = scheduled - t0
    note = ("%d Running + %d queued jobs (prepared in %.1f s); log line 'master started' "
            "after %.2f s; STATUS asked of all %d busy workers within %.2f s"
            % (size["running"], size["queued"], t_prep, t_ready - t0, len(busy),
               t_confirmed - t0))
    return [
        row(NUMBER, "restart -> answers (first PONG)", backend, round(answer, 3), "s",
            target="< 2 s", ok=answer < TARGET, note=note),
        row(NUMBER, "restart -> schedules again (first START)", backend, round(schedule, 3),
            "s", target="< 2 s", ok=schedule < TARGET,
            note="START to a worker whose lava-slave starts with the master"),
    ]
