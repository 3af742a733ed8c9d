"""Scenario 6: many connected idle workers.

N simulated workers (in two processes when N is large: a process may hold at most about
half of the 20,000 file descriptors this machine allows, and each ZeroMQ socket takes two)
all connect at once and send HELLO, as a lab's workers do when the master comes up. The
time runs from the first socket created to the last HELLO_OK received; the master's RSS
is read once every worker is Online. Then one PING from every worker: the time until
every PONG is back.
"""

import time

from .harness import (BenchError, MasterProcess, SimProcess, Workspace, call_all, cleanup,
                      hostnames, row, wait_until)

NUMBER = 6
NAME = "scale"
TITLE = "Scale: idle connected workers"
SIZES = {
    "full": {"workers": 10000, "processes": 2},
    "small": {"workers": 2000, "processes": 1},
    "tiny": {"workers": 20, "processes": 1},
}


def run(backend, size, ctx):
    from lavacore.states import WorkerState

    count, procs = size["workers"], size["processes"]
    names = hostnames("scale-w", count)
    shards = [names[i::procs] for i in range(procs)]
    with cleanup() as defer:
        ws = Workspace(backend, "scale")
        defer(ws.close)
        master = MasterProcess(ws, profile=ctx.profile_path("scale", backend))
        defer(master.stop)
        idle_rss = master.rss_mb()
        sims = [SimProcess() for _ in shards]
        for sim in sims:
            defer(sim.close)
        # Import and start-up costs of the simulators are not the master's.
        call_all(sims, "stats", [{}] * len(sims))
        spawned = call_all(sims, "spawn", [{"master": master.controller, "hostnames": shard}
                                           for shard in shards])
        done = call_all(sims, "wait", [{"what": "hello_ok", "count": len(shard),
                                        "timeout": 120} for shard in shards], timeout=200)
        t_first = min(s["t_begin"] for s in spawned)
        t_sent = max(s["t_sent"] for s in spawned)
        t_last = max(d["t"] for d in done)
        storage = ws.storage()
        defer(storage.close)

        def online():
            return storage.count_workers_online() if hasattr(
                storage, "count_workers_online") else len(
                storage.list_workers(state=WorkerState.ONLINE))

        # HELLO_OK leaves before the worker is stored Online: wait for the database too.
        try:
            wait_until(lambda: online() >= count, 120, 0.05, "every worker Online")
        except BenchError:
            raise BenchError("%d of %d workers Online in the database 120 s after the "
                             "last HELLO_OK" % (online(), count)) from None
        t_stored = time.monotonic()
        rss = master.rss_mb()
        before = [s["counts"]["pongs"] for s in call_all(sims, "stats", [{}] * len(sims))]
        t0 = min(p["t"] for p in call_all(sims, "ping_all", [{}] * len(sims)))
        pongs = call_all(sims, "wait", [{"what": "pongs", "count": b + len(shard),
                                         "timeout": 60}
                                        for b, shard in zip(before, shards)])
        t_pong = max(p["t"] for p in pongs) - t0
    hello = t_last - t_first
    return [
        row(NUMBER, "time for %d workers to HELLO" % count, backend, round(hello, 3), "s",
            target="< 5 s", ok=hello < 5,
            note="first socket created to last HELLO_OK, %d simulator process(es); "
                 "sockets created and HELLOs sent in %.2f s; every worker Online in the "
                 "database after %.2f s; then a PING from each: all PONGs in %.2f s"
                 % (procs, t_sent - t_first, max(t_stored, t_last) - t_first, t_pong)),
        row(NUMBER, "master RSS, %d workers connected" % count, backend, round(rss), "MB",
            target="< 500 MB", ok=rss < 500,
            note="%.0f MB before they connected (%.1f KB per worker)"
                 % (idle_rss, 1024 * (rss - idle_rss) / count)),
    ]
