"""Scenario 8 (issue 13): the master under socket fuzzing.

Fuzzer processes send garbage as fast as it can to the worker socket (random identities,
frame counts from 0 to 1,000, random bytes, near-valid actions with out-of-range ids) and
to the log socket (random frames, deeply nested results lines, alias bombs, lines over the
size limit), while a probe worker measures PING -> PONG round trips, one at a time. The
same probe without the fuzzer, first, is the reference. Reported: the PONG latency
percentiles with and without fuzzing, the garbage rate, the master's RSS (now and peak),
and whether the master survived.
"""

import multiprocessing
import os
import random
import time

import zmq

from .harness import MasterProcess, Workspace, cleanup, percentile, row, rss_mb

NUMBER = 8
NAME = "fuzz"
TITLE = "Master under socket fuzzing"
SIZES = {
    "full": {"seconds": 30, "reference": 10, "fuzzers": 2},
    "small": {"seconds": 10, "reference": 5, "fuzzers": 2},
    "tiny": {"seconds": 1, "reference": 1, "fuzzers": 1},
}


def _garbage(rng):
    """One message of garbage for (socket kind, frames)."""
    pick = rng.random()
    if pick < 0.3:
        return "logs", [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.choice(
            (0, 1, 2, 2, 2, 3, 50)))]
    if pick < 0.45:
        return "logs", [rng.choice((b"9" * 20, b"9223372036854775808", b"0", b"-1",
                                    str(rng.randrange(1, 10 ** 6)).encode())),
                        rng.choice((b"{lvl: results, msg: " + b"[" * 2000 + b"]" * 2000 + b"}",
                                    b'{"lvl": "results", "msg": ' + b"[" * 5000 + b"]" * 5000
                                    + b"}", b"\xff\xfe results", b"x" * rng.randrange(1, 4096)))]
    if pick < 0.455:
        return "logs", [b"1", b"x" * (2 << 20)]  # over the size limit: disconnected
    action = rng.choice((b"HELLO", b"HELLO_RETRY", b"PING", b"START_OK", b"END", b"NOPE",
                         rng.randbytes(8)))
    frames = [action] + [rng.choice((b"3", b"9" * 20, b"-1", b"", rng.randbytes(16),
                                     str(rng.randrange(10 ** 6)).encode()))
                         for _ in range(rng.choice((0, 1, 2, 3, 4, 5) * 8 + (1000,)))]
    return "controller", frames


def _fuzzer(controller, logs, seconds, seed, counter):
    rng = random.Random(seed)
    ctx = zmq.Context()
    routers = []
    for index in range(20):
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.IDENTITY, rng.choice((b"fuzz%d" % index, rng.randbytes(12),
                                                  b"../x%d" % index)))
        sock.setsockopt(zmq.CONNECT_ROUTING_ID, b"master")
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.connect(controller)
        routers.append(sock)
    pushes = []
    for _ in range(4):
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDHWM, 1000)
        push.connect(logs)
        pushes.append(push)
    # Made ahead, so that the sending loop measures the master, not the making.
    pool = [_garbage(rng) for _ in range(3000)]
    time.sleep(0.5)
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        kind, frames = pool[rng.randrange(len(pool))]
        try:
            if kind == "logs":
                if frames:
                    rng.choice(pushes).send_multipart(frames, zmq.NOBLOCK)
            else:
                rng.choice(routers).send_multipart([b"master"] + frames, zmq.NOBLOCK)
            sent += 1
        except zmq.ZMQError:
            time.sleep(0.001)  # queue full: the master reads slower than we write
    counter.value = sent
    ctx.destroy(linger=0)


def _probe(controller, seconds):
    """Sequential PING -> PONG round trips for ``seconds``: their latencies (s), and how
    many got no answer within 5 s."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.IDENTITY, b"probe-%d" % os.getpid())
    sock.setsockopt(zmq.CONNECT_ROUTING_ID, b"master")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(controller)
    sock.send_multipart([b"master", b"HELLO", b"3"])
    if not sock.poll(10000):
        raise RuntimeError("the master did not answer HELLO")
    sock.recv_multipart()
    latencies, lost = [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        sock.send_multipart([b"master", b"PING"])
        while True:
            if not sock.poll(5000):
                lost += 1
                break
            if sock.recv_multipart()[1] == b"PONG":
                latencies.append(time.monotonic() - t0)
                break
        time.sleep(0.01)
    ctx.destroy(linger=0)
    return latencies, lost


def run(backend, size, ctx):
    with cleanup() as defer:
        ws = Workspace(backend, "fuzz")
        defer(ws.close)
        master = MasterProcess(ws)
        defer(master.stop)
        quiet, quiet_lost = _probe(master.controller, size["reference"])
        rss_before = master.rss_mb()
        counters = [multiprocessing.Value("q", 0) for _ in range(size["fuzzers"])]
        fuzzers = [multiprocessing.Process(target=_fuzzer, args=(
            master.controller, master.logs, size["seconds"], 1309 + n, counter))
            for n, counter in enumerate(counters)]
        for fuzzer in fuzzers:
            fuzzer.start()
            defer(lambda f=fuzzer: f.kill() if f.is_alive() else None)
        time.sleep(0.5)
        cpu0, t0 = master.cpu_seconds(), time.monotonic()
        loud, loud_lost = _probe(master.controller, size["seconds"])
        cpu = (master.cpu_seconds() - cpu0) / (time.monotonic() - t0)
        for fuzzer in fuzzers:
            fuzzer.join(size["seconds"] + 30)
        alive = master.proc.poll() is None
        rss = master.rss_mb() if alive else float("nan")
        peak = rss_mb(master.proc.pid, peak=True) if alive else float("nan")
        rate = sum(counter.value for counter in counters) / size["seconds"]

    def ms(values, q):
        return round(1000 * percentile(values, q), 3) if values else float("nan")

    answered = "%d round trips, %d unanswered within 5 s"
    return [
        row(NUMBER, "PONG latency p50, no fuzzing", backend, ms(quiet, 50), "ms",
            note="reference, same run; " + answered % (len(quiet), quiet_lost)),
        row(NUMBER, "PONG latency p99, no fuzzing", backend, ms(quiet, 99), "ms",
            note="reference, same run"),
        row(NUMBER, "PONG latency p50 under fuzzing", backend, ms(loud, 50), "ms",
            note=answered % (len(loud), loud_lost)),
        row(NUMBER, "PONG latency p99 under fuzzing", backend, ms(loud, 99), "ms",
            note="max %.1f ms" % ms(loud, 100)),
        row(NUMBER, "garbage messages sent", backend, round(rate), "messages/s",
            note="%d fuzzer process(es), each 20 worker identities and 4 log sockets, %d s;"
                 " master CPU meanwhile %.0f%% of a core"
                 % (size["fuzzers"], size["seconds"], 100 * cpu)),
        row(NUMBER, "master RSS under fuzzing", backend, round(rss, 1), "MB",
            note="peak %.0f MB; %.0f MB before the fuzzing" % (peak, rss_before)),
        row(NUMBER, "master alive, every PING answered", backend,
            1 if alive and not loud_lost else 0, "yes=1", target="1",
            ok=alive and not loud_lost),
    ]
