"""The HTTP API in more than one process: XML-RPC ``scheduler.jobs.show`` and
``scheduler.jobs.submit`` requests/s through the master's own API, then through
``lavacore api --processes N`` beside it, for N = 1, 2, 4.

    python -m bench.api_scale [--backend postgres sqlite] [--processes 1 2 4]
                              [--clients 8] [--seconds 5] [--reuse-port] [--json FILE]

Everything is real and on this machine: the master (``python -m lavacore.cli -c CONFIG``,
its API on a port of its own), the API pool (``python -m lavacore.cli -c CONFIG api
--listen ... --processes N``), PostgreSQL or the SQLite file, and the clients: ``--clients``
processes, each with one keep-alive HTTP connection sending requests back to back. A
request counts when it is answered 200 without a fault. The submitted jobs wait in the
queue (their device's worker is never online), so the master's part of a submission is
the notification and a scheduling pass that finds no device. On SQLite only one API
process is measured: ``lavacore api`` refuses a pool there.

Each row also gives where the machine's CPU went during the measurement (the API
processes, the master, the clients; the rest is PostgreSQL and whatever else ran), how the
pool's processes shared the requests (from its /metrics) and the master's worst loop lag
in the last 10 s (from its /health). The load average is taken before and after: the
machine is shared, and the numbers are whole-machine numbers.
"""

import argparse
import base64
import http.client
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
import urllib.request
import xmlrpc.client

from .harness import (BenchError, MasterProcess, ServerProcess, Workspace, add_devices,
                      cleanup, free_port, postgres_problem, _proc_stat)

from .api_bench import JOB  # the same small job as the single-process API benchmark

DEVICE = ("qemu01", "qemu", "worker1", ())


class ApiPool(ServerProcess):
    """``python -m lavacore.cli -c CONFIG api ...``, ready once it says it serves."""

    def __init__(self, workspace, port, processes, reuse_port=False):
        argv = [sys.executable, "-m", "lavacore.cli", "-c", workspace.config_path, "api",
                "--listen", "127.0.0.1:%d" % port, "--processes", str(processes)]
        if reuse_port:
            argv.append("--reuse-port")
        self.ready_pattern = "API pool serving" if processes > 1 else " serving http"
        super().__init__(argv, os.path.join(workspace.dir, "api-%d.log" % port),
                         cwd=workspace.dir)

    def pids(self):
        """The parent and its children."""
        found = [self.proc.pid]
        try:
            with open("/proc/%d/task/%d/children" % (self.pid, self.pid)) as handle:
                found += [int(pid) for pid in handle.read().split()]
        except OSError:
            pass
        return found


def setup(backend, master_port):
    ws = Workspace(backend, "apiscale")
    ws.write_config(master={"events": "tcp://127.0.0.1:%d" % free_port(),
                            "schedule_interval": 600})
    with open(ws.config_path) as handle:
        text = handle.read()
    text = text.replace("[api]\nenabled = false", '[api]\nenabled = true\nlisten = '
                        '"127.0.0.1:%d"\nmax_auth_failures = 100000\n'
                        "max_client_connections = 1000" % master_port)
    with open(ws.config_path, "w") as handle:
        handle.write(text)
    ws.device_files([DEVICE])
    storage = ws.storage()
    try:
        add_devices(storage, [DEVICE])
        from lavacore import tokens

        token = tokens.create(storage, "bench", "api_scale", time.time())[1]
    finally:
        storage.close()
    return ws, token


# -- clients ------------------------------------------------------------------------------

def _client(port, token, body, seconds, start, results, index):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "text/xml", "Authorization": "Basic " + base64.b64encode(
        ("bench:%s" % token).encode()).decode()}
    done = errors = 0
    start.wait()
    deadline = time.monotonic() + seconds
    cpu = time.process_time()
    while time.monotonic() < deadline:
        try:
            conn.request("POST", "/RPC2", body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            continue
        if response.status == 200 and b"<fault>" not in data:
            done += 1
        else:
            errors += 1
    results[index] = (done, errors, time.process_time() - cpu)


def _busy():
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def measure(port, token, body, clients, seconds, watched):
    """requests/s, errors, and the CPU seconds of ``watched`` ({name: [pids]}), the
    clients and the machine over the run."""
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    results = ctx.Manager().dict()
    procs = [ctx.Process(target=_client, args=(port, token, body, seconds, start, results,
                                               index)) for index in range(clients)]
    for proc in procs:
        proc.start()
    time.sleep(0.5)
    before = {name: _cpu(pids) for name, pids in watched.items()}
    database = _postgres()
    machine = _busy()
    began = time.monotonic()
    start.set()
    for proc in procs:
        proc.join()
    elapsed = time.monotonic() - began
    machine_after = _busy()
    cpu = {name: _cpu(pids) - before[name] for name, pids in watched.items()}
    after = _postgres()
    cpu["postgres"] = sum(value - database.get(pid, 0.0) for pid, value in after.items())
    done = sum(r[0] for r in results.values())
    errors = sum(r[1] for r in results.values())
    cpu["clients"] = sum(r[2] for r in results.values())
    ticks = os.sysconf("SC_CLK_TCK")
    busy_seconds = (machine_after[0] - machine[0]) / ticks
    cpu["other"] = max(0.0, busy_seconds - sum(cpu.values()))
    busy = (machine_after[0] - machine[0]) / max(1, machine_after[1] - machine[1])
    return done / elapsed, errors, elapsed, cpu, busy


def _postgres():
    """{pid: CPU seconds} of every PostgreSQL server process (its backends included)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/comm" % name) as handle:
                if handle.read().strip() != "postgres":
                    continue
            found[int(name)] = _proc_stat(int(name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _cpu(pids):
    total = 0.0
    for pid in pids:
        try:
            total += _proc_stat(pid)
        except (OSError, IndexError, ValueError):
            pass
    return total


def _per_process(port):
    """{process index: XML-RPC requests answered} from the pool's /metrics."""
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as answer:
        text = answer.read().decode()
    found = {}
    for match in re.finditer(r'lavacore_api_requests_total\{kind="xmlrpc",process="(\d+)"\}'
                             r" (\S+)", text):
        found[int(match.group(1))] = float(match.group(2))
    return found


def _master_lag(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=10) as answer:
        return json.loads(answer.read()).get("loop_lag_seconds")


def bodies(job_id):
    return {"scheduler.jobs.show": xmlrpc.client.dumps((job_id,), "scheduler.jobs.show")
            .encode(),
            "scheduler.jobs.submit": xmlrpc.client.dumps((JOB,), "scheduler.jobs.submit")
            .encode()}


def run_backend(backend, args, say):
    rows = []
    master_port = free_port()
    with cleanup() as defer:
        ws, token = setup(backend, master_port)
        defer(ws.close)
        master = MasterProcess(ws)
        defer(master.stop)
        rpc = xmlrpc.client.ServerProxy("http://bench:%s@127.0.0.1:%d/RPC2"
                                        % (token, master_port), allow_none=True)
        job_id = rpc.scheduler.jobs.submit(JOB)
        methods = bodies(job_id)
        # On SQLite, lavacore api refuses a pool (one process beside the master at most).
        counts = [n for n in args.processes if backend != "sqlite" or n == 1]
        if counts != list(args.processes):
            say("%s: pools of more than one process are refused on SQLite; not measured"
                % backend)
        layouts = [("master", 0, False)] + [("pool", n, args.reuse_port) for n in counts]
        # Rounds alternate the order, so a change in the machine's other load does not
        # favour one layout.
        order = []
        for number in range(args.rounds):
            order += layouts if number % 2 == 0 else layouts[::-1]
        for label, processes, reuse in order:
            pool = None
            port = master_port
            if processes:
                port = free_port()
                pool = ApiPool(ws, port, processes, reuse)
            watched = {"master": [master.pid]}
            if pool is not None:
                watched["api"] = pool.pids()
            try:
                for name, body in methods.items():
                    shares_before = _per_process(port) if pool is not None else {}
                    load = os.getloadavg()[0]
                    rate, errors, elapsed, cpu, busy = measure(
                        port, token, body, args.clients, args.seconds, watched)
                    load_after = os.getloadavg()[0]
                    shares = {}
                    if pool is not None:
                        after = _per_process(port)
                        shares = {index: after.get(index, 0) - shares_before.get(index, 0)
                                  for index in sorted(after)}
                    lag = _master_lag(master_port)
                    row = {"backend": backend, "method": name,
                           "server": "master's own API" if pool is None else
                           "lavacore api --processes %d%s" % (
                               processes, " --reuse-port" if reuse else ""),
                           "processes": processes, "clients": args.clients,
                           "requests_per_s": round(rate, 1), "errors": errors,
                           "seconds": round(elapsed, 2),
                           "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
                           "machine_busy": round(busy, 3),
                           "per_process": {str(k): int(v) for k, v in shares.items()},
                           "master_loop_lag_s": lag,
                           "load_before": round(load, 2), "load_after": round(load_after, 2)}
                    rows.append(row)
                    say(_line(row))
            finally:
                if pool is not None:
                    pool.stop()
        count = rpc.scheduler.jobs.list(None, None, 0, 1)[0]["id"]
        say("%s: %d jobs queued in all" % (backend, count))
    return rows


def _line(row):
    cpu = row["cpu_seconds"]
    spent = ", ".join("%s %.1f" % (k, v) for k, v in cpu.items())
    shares = ""
    if row["per_process"]:
        total = sum(row["per_process"].values()) or 1
        shares = "; split %s" % "/".join("%d%%" % round(100 * v / total)
                                          for v in row["per_process"].values())
    return ("%-8s %-22s %-36s %7.0f req/s%s  [cpu s: %s; machine %d%% busy%s;"
            " master lag %s s; load %.1f->%.1f]"
            % (row["backend"], row["method"], row["server"], row["requests_per_s"],
               " (%d errors)" % row["errors"] if row["errors"] else "", spent,
               100 * row["machine_busy"], shares, row["master_loop_lag_s"],
               row["load_before"], row["load_after"]))


def table(rows):
    """The markdown table of the rows (requests/s)."""
    lines = ["| backend | method | server | req/s | CPU s: API / master / PostgreSQL /"
             " clients / other | machine busy | split over processes | master loop lag |"
             " load |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cpu = row["cpu_seconds"]
        per = row["per_process"]
        total = sum(per.values()) or 1
        lines.append("| %s | %s | %s | %.0f | %s / %.1f / %.1f / %.1f / %.1f | %d%% | %s |"
                     " %s s | %.1f-%.1f |" % (
                         row["backend"], row["method"].split(".")[-1], row["server"],
                         row["requests_per_s"], "%.1f" % cpu["api"] if "api" in cpu
                         else "-", cpu["master"], cpu["postgres"], cpu["clients"],
                         cpu["other"], 100 * row["machine_busy"],
                         "/".join("%d%%" % round(100 * v / total) for v in per.values())
                         or "-", row["master_loop_lag_s"], row["load_before"],
                         row["load_after"]))
    return "\n".join(lines)


def summary(rows):
    """Requests/s by layout (the median of the rounds), and against one API process."""
    import statistics

    methods = []
    servers = []
    rates = {}
    for row in rows:
        key = (row["backend"], row["method"])
        if key not in methods:
            methods.append(key)
        if (row["processes"], row["server"]) not in servers:
            servers.append((row["processes"], row["server"]))
        rates.setdefault((key, row["server"]), []).append(row["requests_per_s"])
    servers.sort()
    lines = ["| backend | method | " + " | ".join(name for _, name in servers) + " |",
             "|---|---|" + "---|" * len(servers)]
    for key in methods:
        cells = []
        one = rates.get((key, next((n for p, n in servers if p == 1), None)))
        base = statistics.median(one) if one else None
        for _, name in servers:
            found = rates.get((key, name))
            if not found:
                cells.append("-")
                continue
            value = statistics.median(found)
            cell = "%.0f" % value
            if len(found) > 1:
                cell += " (%.0f-%.0f)" % (min(found), max(found))
            if base and name != "master's own API":
                cell += " x%.2f" % (value / base)
            cells.append(cell)
        lines.append("| %s | %s | %s |" % (key[0], key[1].split(".")[-1], " | ".join(cells)))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", nargs="+", default=["postgres", "sqlite"],
                        choices=["postgres", "sqlite"])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every layout this many times (median in the summary)")
    parser.add_argument("--reuse-port", action="store_true",
                        help="the pool's processes bind with SO_REUSEPORT")
    parser.add_argument("--json", help="write the rows there")
    args = parser.parse_args(argv)

    def say(text):
        print(text, flush=True)

    say("lavacore API scaling: %d cores, load average %s, %d client processes, %g s per"
        " row" % (os.cpu_count(), " ".join("%.2f" % x for x in os.getloadavg()),
                  args.clients, args.seconds))
    rows = []
    for backend in args.backend:
        if backend == "postgres":
            problem = postgres_problem()
            if problem:
                say("postgres: skipped: %s" % problem)
                continue
        try:
            rows += run_backend(backend, args, say)
        except (BenchError, subprocess.SubprocessError, OSError) as exc:
            say("%s: not measured: %s" % (backend, exc))
    say("")
    say(table(rows))
    say("")
    say(summary(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
