"""Scenario 1 (and issue 2): PING/PONG round trips per second with N connected workers,
against the master and against the bare zmq.green ROUTER echo server, in the same run.

One simulated-worker process holds N workers connected to each server. Every worker keeps
``window`` PINGs in flight (closed loop). The two servers are measured in alternating
rounds and the median of each is kept, so both see the same machine. The server (master
or echo, with its ZeroMQ I/O thread) is pinned to core 0 and the simulated workers to
core 1: the figure is what one core of lavacore's stack does, and the run-to-run noise of
the scheduler moving four busy threads over two cores is gone.

The ratio master / echo is the share of its own stack's limit the master keeps.
"""

import os
import statistics
import time

from .harness import (EchoProcess, MasterProcess, SimProcess, Workspace, cleanup, hostnames,
                      row)

NUMBER = 1
NAME = "control"
TITLE = "Control plane: PING/PONG round trips per second"
TARGET_RATIO = 0.85
SIZES = {
    "full": {"workers": [100, 1000], "duration": 2.0, "warmup": 0.5, "window": 4,
             "rounds": 5},
    "small": {"workers": [100], "duration": 1.0, "warmup": 0.3, "window": 4, "rounds": 2},
    "tiny": {"workers": [5], "duration": 0.3, "warmup": 0.1, "window": 1, "rounds": 1},
}


def _cpus():
    """(server core, simulated-worker core) when the machine has two or more."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None, None
    return [cores[0]], [cores[1]]


def run(backend, size, ctx):
    server_cpus, sim_cpus = _cpus()
    rows = []
    for count in size["workers"]:
        with cleanup() as defer:
            ws = Workspace(backend, "control")
            defer(ws.close)
            echo = EchoProcess(ws.dir, cpus=server_cpus)
            defer(echo.stop)
            master = MasterProcess(ws, profile=ctx.profile_path("control-%d" % count, backend),
                                   cpus=server_cpus)
            defer(master.stop)
            sim = SimProcess(cpus=sim_cpus)
            defer(sim.close)
            names = {"echo": hostnames("echo", count), "master": hostnames("bench", count)}
            servers = {"echo": echo, "master": master}
            for key, server in servers.items():
                sim.call("spawn", master=server.controller, hostnames=names[key])
            sim.call("wait", what="hello_ok", count=2 * count, timeout=60)
            rates = {"echo": [], "master": []}
            cpu = {"echo": [], "master": []}
            sim_cpu = []
            for _ in range(size["rounds"]):
                for key in ("echo", "master"):
                    server = servers[key]
                    cpu0, t0 = server.cpu_seconds(), time.monotonic()
                    got = sim.call("pingpong", duration=size["duration"],
                                   warmup=size["warmup"], window=size["window"],
                                   hostnames=names[key])
                    cpu[key].append((server.cpu_seconds() - cpu0) / (time.monotonic() - t0))
                    rates[key].append(got["rate"])
                    sim_cpu.append(got["sim_cpu"])
            rss = master.rss_mb()
        bare = statistics.median(rates["echo"])
        got = statistics.median(rates["master"])
        ratio = got / bare if bare else 0.0
        # Each master round against the echo round just before it: the spread of the
        # ratio over the run, which a single median hides.
        paired = [m / e for e, m in zip(rates["echo"], rates["master"]) if e]
        spread = "; rounds: echo %s, master %s; ratio per round %.0f-%.0f%%" % (
            "/".join("%.0f" % r for r in rates["echo"]),
            "/".join("%.0f" % r for r in rates["master"]),
            100 * min(paired, default=0), 100 * max(paired, default=0))
        note = ("%d PING(s) in flight per worker; median of %d alternating rounds of %gs%s; "
                "server CPU (one core, incl. its ZeroMQ I/O thread): echo %.0f%%, master "
                "%.0f%%; simulated workers %.0f%%"
                % (size["window"], size["rounds"], size["duration"], spread,
                   100 * statistics.median(cpu["echo"]), 100 * statistics.median(cpu["master"]),
                   100 * statistics.median(sim_cpu)))
        rows.append(row(NUMBER, "bare zmq.green echo, %d workers" % count, backend,
                        round(bare), "round trips/s", note="reference, same run, same core"))
        rows.append(row(NUMBER, "master PING/PONG, %d workers" % count, backend,
                        round(got), "round trips/s", note="master RSS %.0f MB" % rss))
        rows.append(row(NUMBER, "master / bare echo, %d workers" % count, backend,
                        round(100 * ratio, 1), "%", target=">= %d%%" % round(100 * TARGET_RATIO),
                        ok=ratio >= TARGET_RATIO, note=note))
    return rows
