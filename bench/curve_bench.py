"""What CURVE costs the master: handshakes per second and the round-trip overhead.

    python bench/curve_bench.py                    # 300 workers, 5000 sequential pings
    python bench/curve_bench.py --workers 1000 --pings 20000 --json

The master runs as in production (``python -m lavacore.cli -c CONFIG``, a subprocess on
its own core), once plaintext and once with ``[auth_curve]``; everything else is the same.
This process plays the workers with plain pyzmq, set up as lava-slave sets up its socket
(ROUTER, identity = hostname, CONNECT_RID ``master``; with CURVE, its own key pair and the
master's public key). Measured for each run:

* connect storm: N workers connect at once and send HELLO; time until every HELLO_OK is
  back (the workers were registered by an untimed first storm, so this is handshakes plus
  the HELLO path, not database inserts). With CURVE each connection is a CURVE handshake
  and a ZAP request answered by the master's green authenticator.
* sequential round trips: one worker, PING -> PONG, one at a time (latency).
* pipelined round trips: every worker sends a burst of PINGs; PONGs per second.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import zmq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Not /tmp: creating files there is slow on this project's machines (see bench/harness.py).
WORK_DIR = os.environ.get("LAVACORE_BENCH_DIR", "/var/tmp")


def _curve_pair():
    public, secret = zmq.curve_keypair()
    return public.decode(), secret.decode()


def _write_cert(path, public, secret=None):
    text = "metadata\ncurve\n    public-key = \"%s\"\n" % public
    if secret:
        text += "    secret-key = \"%s\"\n" % secret
    with open(path, "w") as handle:
        handle.write(text)


class Lab:
    """A workspace: keys for the master and every worker, config.toml, dispatcher config."""

    def __init__(self, workers):
        os.makedirs(WORK_DIR, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="lavacore-curve-bench-", dir=WORK_DIR)
        shutil.copytree(os.path.join(ROOT, "etc"), os.path.join(self.dir, "etc"))
        self.certs = os.path.join(self.dir, "workers")
        os.makedirs(self.certs)
        self.master_public, master_secret = _curve_pair()
        self.master_cert = os.path.join(self.dir, "master.key_secret")
        _write_cert(self.master_cert, self.master_public, master_secret)
        self.keys = {}
        for index in range(workers):
            name = "bench%05d" % index
            public, secret = _curve_pair()
            self.keys[name] = (public, secret)
            _write_cert(os.path.join(self.certs, name + ".key"), public)

    def config(self, curve):
        lines = ["[master]", 'listen = "tcp://127.0.0.1:*"', 'logs = "tcp://127.0.0.1:*"',
                 'events = "tcp://127.0.0.1:*"', "ping_interval = 20", "worker_timeout = 600",
                 "[storage]", 'backend = "sqlite"', 'url = "var/%s.db"' % (
                     "curve" if curve else "plain"), "[api]", "enabled = false"]
        if curve:
            names = _plugin_names()
            if "auth_curve" not in names:
                lines += ["[plugins]", 'modules = ["lavacore_plugins.auth_curve"]']
            lines += ["[auth_curve]", 'master_cert = "%s"' % self.master_cert,
                      'workers_certs = "%s"' % self.certs, "poll_interval = 2.0"]
        path = os.path.join(self.dir, "%s.toml" % ("curve" if curve else "plain"))
        with open(path, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        return path

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def _plugin_names():
    import importlib.metadata

    return {ep.name for ep in importlib.metadata.entry_points(group="lavacore.plugins")}


class MasterProcess:
    def __init__(self, config_path):
        self.log_path = config_path + ".log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "lavacore.cli", "-c", config_path],
                                     stdout=subprocess.DEVNULL, stderr=self.log, cwd=ROOT)
        deadline = time.monotonic() + 30
        while True:
            text = open(self.log_path).read()
            found = re.search(r"listening for workers on (\S+)", text)
            if found and "master started" in text:
                self.url = found.group(1)
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("master did not start:\n" + text)
            time.sleep(0.05)

    def cpu(self):
        """CPU seconds the master has used (user + system): robust on a busy machine."""
        with open("/proc/%d/stat" % self.proc.pid) as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


class Workers:
    """N lava-slave-like sockets in this process."""

    def __init__(self, ctx, url, keys, master_public, curve):
        self.socks = []
        for name, (public, secret) in keys.items():
            sock = ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.IDENTITY, name.encode())
            sock.setsockopt(zmq.CONNECT_ROUTING_ID, b"master")
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            if curve:
                sock.curve_publickey = public.encode()
                sock.curve_secretkey = secret.encode()
                sock.curve_serverkey = master_public.encode()
            self.socks.append(sock)
        self.url = url

    def connect_storm(self, timeout=120):
        """Connect all, HELLO each; seconds until the last HELLO_OK."""
        poller = zmq.Poller()
        for sock in self.socks:
            poller.register(sock, zmq.POLLIN)
        began = time.perf_counter()
        for sock in self.socks:
            sock.connect(self.url)
            sock.send_multipart([b"master", b"HELLO", b"3"])
        waiting = set(self.socks)
        deadline = time.monotonic() + timeout
        while waiting:
            if time.monotonic() > deadline:
                raise RuntimeError("%d of %d workers got no HELLO_OK" % (len(waiting),
                                                                         len(self.socks)))
            for sock, _ in poller.poll(1000):
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if frames[1] == b"HELLO_OK":
                        waiting.discard(sock)
        return time.perf_counter() - began

    def sequential(self, count):
        """``count`` PING -> PONG round trips on one socket; seconds per round trip."""
        sock = self.socks[0]
        began = time.perf_counter()
        for _ in range(count):
            sock.send_multipart([b"master", b"PING"])
            while sock.recv_multipart()[1] != b"PONG":
                pass
        return (time.perf_counter() - began) / count

    def pipelined(self, per_worker):
        """Every socket sends ``per_worker`` PINGs at once; PONGs per second."""
        poller = zmq.Poller()
        for sock in self.socks:
            poller.register(sock, zmq.POLLIN)
        expected = per_worker * len(self.socks)
        got = 0
        began = time.perf_counter()
        for sock in self.socks:
            for _ in range(per_worker):
                sock.send_multipart([b"master", b"PING"])
        while got < expected:
            events = poller.poll(10000)
            if not events:
                raise RuntimeError("only %d of %d PONGs came back" % (got, expected))
            for sock, _ in events:
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if frames[1] == b"PONG":
                        got += 1
        return expected / (time.perf_counter() - began)

    def close(self):
        for sock in self.socks:
            sock.close(linger=0)


def run(lab, curve, pings, burst, io_threads=2):
    master = MasterProcess(lab.config(curve))
    # The workers' side does CURVE too: more than one I/O thread, so that it is not what
    # limits the pipelined figure.
    ctx = zmq.Context(io_threads=io_threads)
    ctx.set(zmq.MAX_SOCKETS, 65536)
    try:
        first = Workers(ctx, master.url, lab.keys, lab.master_public, curve)
        first.connect_storm()  # registers the workers (database inserts): not measured
        first.close()
        storm = Workers(ctx, master.url, lab.keys, lab.master_public, curve)
        cpu0 = master.cpu()
        seconds = storm.connect_storm()
        cpu1 = master.cpu()
        latency = storm.sequential(pings)
        cpu2 = master.cpu()
        rate = storm.pipelined(burst)
        cpu3 = master.cpu()
        storm.close()
    finally:
        ctx.destroy(linger=0)
        master.stop()
    refused = open(master.log_path).read().count("refused")
    return {"mode": "curve" if curve else "plain", "workers": len(lab.keys),
            "storm_s": seconds, "connects_per_s": len(lab.keys) / seconds,
            "rtt_us": latency * 1e6, "pipelined_per_s": rate, "refused_lines": refused,
            "storm_cpu_ms_per_connect": (cpu1 - cpu0) * 1000 / len(lab.keys),
            "seq_cpu_us_per_rtt": (cpu2 - cpu1) * 1e6 / pings,
            "pipelined_cpu_us_per_rtt": (cpu3 - cpu2) * 1e6 / (burst * len(lab.keys))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=300)
    parser.add_argument("--pings", type=int, default=5000, help="sequential round trips")
    parser.add_argument("--burst", type=int, default=20, help="PINGs per worker, pipelined")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each mode (best kept)")
    parser.add_argument("--io-threads", type=int, default=2,
                        help="libzmq I/O threads of the simulated workers")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    lab = Lab(args.workers)
    runs = {"plain": [], "curve": []}
    try:
        for _ in range(args.repeat):
            for curve in (False, True):
                result = run(lab, curve, args.pings, args.burst, args.io_threads)
                runs[result["mode"]].append(result)
    finally:
        lab.close()
    # Wall-clock figures: the best run (least disturbed by the rest of the machine). CPU
    # figures (the master's own CPU time per operation): the median run.
    results = {}
    for mode, items in runs.items():
        best = {"mode": mode, "workers": args.workers, "runs": len(items),
                "storm_s": min(r["storm_s"] for r in items),
                "rtt_us": min(r["rtt_us"] for r in items),
                "pipelined_per_s": max(r["pipelined_per_s"] for r in items),
                "refused_lines": sum(r["refused_lines"] for r in items)}
        best["connects_per_s"] = args.workers / best["storm_s"]
        for key in ("storm_cpu_ms_per_connect", "seq_cpu_us_per_rtt",
                    "pipelined_cpu_us_per_rtt"):
            best[key] = statistics.median(r[key] for r in items)
        results[mode] = best
    plain, curve = results["plain"], results["curve"]
    summary = {
        "plain": plain, "curve": curve,
        "handshake_ms_extra": (curve["storm_s"] - plain["storm_s"]) * 1000 / args.workers,
        "rtt_overhead_pct": 100.0 * (curve["rtt_us"] / plain["rtt_us"] - 1),
        "throughput_overhead_pct": 100.0 * (1 - curve["pipelined_per_s"]
                                            / plain["pipelined_per_s"]),
        "handshake_cpu_ms": curve["storm_cpu_ms_per_connect"]
        - plain["storm_cpu_ms_per_connect"],
        "message_cpu_overhead_pct": 100.0 * (curve["pipelined_cpu_us_per_rtt"]
                                             / plain["pipelined_cpu_us_per_rtt"] - 1),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print("%-6s %8s %10s %14s %10s %14s" % ("mode", "workers", "storm s", "connects/s",
                                            "rtt us", "pipelined/s"))
    for item in (plain, curve):
        print("%-6s %8d %10.3f %14.0f %10.1f %14.0f" % (
            item["mode"], item["workers"], item["storm_s"], item["connects_per_s"],
            item["rtt_us"], item["pipelined_per_s"]))
    print("CURVE: %.0f handshakes/s (connect + CURVE + ZAP + HELLO/HELLO_OK), %+.2f ms per"
          " connection against plaintext" % (curve["connects_per_s"],
                                             summary["handshake_ms_extra"]))
    print("CURVE: sequential round trip %+.1f%%, pipelined throughput %+.1f%%"
          % (summary["rtt_overhead_pct"], -summary["throughput_overhead_pct"]))
    print("master CPU: %.2f ms per CURVE handshake (+ZAP) beyond a plaintext connect;"
          " %.0f -> %.0f us per pipelined round trip (%+.1f%%)"
          % (summary["handshake_cpu_ms"], plain["pipelined_cpu_us_per_rtt"],
             curve["pipelined_cpu_us_per_rtt"], summary["message_cpu_overhead_pct"]))
    if curve["refused_lines"] or plain["refused_lines"]:
        print("warning: the master refused something (see its log)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
