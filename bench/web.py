"""The web pages under load of data: how long the job list takes with 100,000 jobs in the
database, and a job page whose log has 200,000 lines.

    python -m bench.web [--backend sqlite|postgres] [--size full|small|tiny] [--no-browser]

A real master process (``lavacore -c config.toml``, API on a free port of 127.0.0.1) on a
database filled beforehand through the storage API: 100,000 jobs over 20 device types and
50 submitters (97% finished, 2% queued, 1% running; 3% personal and 2% group-visible, so
an anonymous visitor's list is filtered), and one finished job with a 200,000-line
output.yaml (about 25 MB: target output, debug, info and a result every 1,000 lines) and
200 test cases.

Each page is asked for REPEATS times over one keep-alive connection; the table gives the
median and 95th percentile of the server's own time (its Server-Timing header: routing,
queries, rendering) and of the whole request seen by the client. The big job's page is
also timed cold, its first request (which indexes the log in a thread). With Debian's
chromium and selenium installed, each page is then loaded in a headless browser and its
navigation timing read: DOMContentLoaded and the load event, from the start of the
navigation (median of BROWSER_REPEATS loads). Last, the master's resident memory before
and after the log pages shows that the log is never read whole.

As a scenario module (NUMBER, NAME, TITLE, SIZES, run) it fits ``python -m bench``.
"""

import argparse
import base64
import http.client
import json
import os
import random
import statistics
import sys
import time

from .harness import (JOB_TEXT, BenchError, MasterProcess, Workspace, add_devices, cleanup,
                      free_port, percentile, row, rss_mb)

NUMBER = 9
NAME = "web"
TITLE = "Web pages: job list at 100k jobs, a 200k-line log"
SIZES = {
    "full": {"jobs": 100000, "log_lines": 200000, "types": 20, "users": 50, "cases": 200},
    "small": {"jobs": 20000, "log_lines": 40000, "types": 10, "users": 20, "cases": 100},
    "tiny": {"jobs": 500, "log_lines": 2000, "types": 3, "users": 5, "cases": 10},
}
REPEATS = 20
BROWSER_REPEATS = 5
TARGET_MS = 200.0      # server time of a page, at the median


def _jobs(size, rng, now):
    """Job records: (record, is the big-log job)."""
    from lavacore.models import Job
    from lavacore.states import JobHealth, JobState

    records = []
    start = now - 30 * 86400
    step = 30 * 86400 / size["jobs"]
    for i in range(size["jobs"]):
        kind = "type%02d" % rng.randrange(size["types"])
        submit = start + i * step
        roll = rng.random()
        if roll < 0.02:
            state, health, started, ended = JobState.SUBMITTED, JobHealth.UNKNOWN, None, None
        elif roll < 0.03:
            state, health, started, ended = JobState.RUNNING, JobHealth.UNKNOWN, submit + 5, None
        else:
            state = JobState.FINISHED
            health = rng.choices([JobHealth.COMPLETE, JobHealth.INCOMPLETE, JobHealth.CANCELED],
                                 [80, 15, 2])[0]
            started, ended = submit + 5, submit + 5 + rng.randrange(30, 3600)
        visibility, groups = "public", ()
        roll = rng.random()
        if roll < 0.03:
            visibility = "personal"
        elif roll < 0.05:
            visibility, groups = "group", ("team%d" % rng.randrange(3),)
        text = JOB_TEXT.format(device_type=kind, name="%d" % i, priority=50)
        records.append(Job(
            None, state=state, health=health, submitter="user%02d" % rng.randrange(size["users"]),
            description="bench job %d on %s" % (i, kind), requested_device_type=kind,
            actual_device=None if started is None else "%s-%d" % (kind, i % 5),
            worker=None if started is None else "worker%d" % (i % 4),
            visibility=visibility, viewing_groups=groups, submit_time=submit,
            start_time=started, end_time=ended, definition=text, original_definition=text,
            failure_comment="Infrastructure error: boot timed out" if health ==
            JobHealth.INCOMPLETE else None))
    return records


def _write_log(path, lines, rng):
    from lavacore.logformat import make_line, result_line

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for n in range(lines):
            if n % 1000 == 999:
                line = result_line("0_smoke", "case-%d" % n, "pass", measurement=str(n),
                                   units="ms", dt="2026-12-01T12:00:00.%06d" % (n % 10 ** 6))
            else:
                lvl = ("target", "target", "target", "debug", "info")[n % 5]
                line = make_line(lvl, "line %d: %s" % (n, "x" * rng.randrange(20, 120)),
                                 dt="2026-12-01T12:00:00.%06d" % (n % 10 ** 6))
            handle.write("- %s\n" % line)
    return os.path.getsize(path)


def prepare(ws, size, ctx):
    """Fill the workspace's database and the big log; returns what the pages need."""
    from lavacore import tokens
    from lavacore.models import TestCase

    rng = random.Random(17)
    now = time.time()
    storage = ws.storage()
    try:
        add_devices(storage, [("type%02d-%d" % (t, d), "type%02d" % t, "worker%d" % (d % 4), ())
                              for t in range(size["types"]) for d in range(5)])
        records = _jobs(size, rng, now)
        started = time.monotonic()
        ids = []
        for first in range(0, len(records), 5000):
            ids.extend(storage.insert_jobs(records[first:first + 5000]))
        ctx.say("web: %d jobs inserted in %.1f s" % (len(ids), time.monotonic() - started))
        big = next(i for i, r in zip(reversed(ids), reversed(records))
                   if r.state.display == "Finished")
        job = storage.get_job(big)
        storage.add_testcases([TestCase(big, "0_smoke", "case-%d" % n, "pass", str(n), "ms")
                               for n in range(size["cases"])])
        path = os.path.join(job.output_dir(ws.output_root), "output.yaml")
        size_bytes = _write_log(path, size["log_lines"], rng)
        ctx.say("web: job %d has a %d-line log (%.1f MB)" % (big, size["log_lines"],
                                                             size_bytes / 1e6))
        for team in range(3):
            storage.add_group("team%d" % team)
        tokens_by_user = {}
        for user in ("alice", "admin"):
            tokens_by_user[user] = tokens.create(storage, user, "bench", now)[1]
        storage.add_member("team1", "alice")
        storage.update_user("admin", is_superuser=True)
        middle = ids[len(ids) // 2]
        if ws.schema is not None:
            # What autovacuum does within a minute of a bulk load: without statistics the
            # planner overestimates the list's count and PostgreSQL JIT-compiles it
            # (about 110 ms more per page, measured).
            ws._pg("ANALYZE %s.jobs" % ws.schema)
        return {"big": big, "middle": middle, "tokens": tokens_by_user,
                "log_mb": size_bytes / 1e6, "jobs": len(ids)}
    finally:
        storage.close()


def _enable_api(ws, port):
    with open(ws.config_path) as handle:
        text = handle.read()
    text = text.replace("[api]\nenabled = false",
                        '[api]\nenabled = true\nlisten = "127.0.0.1:%d"' % port)
    with open(ws.config_path, "w") as handle:
        handle.write(text)


class Client:
    """One keep-alive HTTP connection; ``get`` -> (status, server ms, client ms, bytes)."""

    def __init__(self, port, user=None, token=None):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.headers = {"Accept": "text/html"}
        if user:
            self.headers["Authorization"] = "Basic " + base64.b64encode(
                ("%s:%s" % (user, token)).encode()).decode()

    def get(self, path):
        started = time.perf_counter()
        self.conn.request("GET", path, headers=self.headers)
        response = self.conn.getresponse()
        body = response.read()
        elapsed = (time.perf_counter() - started) * 1000
        timing = response.getheader("Server-Timing") or ""
        server = float(timing.split("dur=")[1]) if "dur=" in timing else float("nan")
        if response.status != 200:
            raise BenchError("GET %s: HTTP %d: %s" % (path, response.status, body[:300]))
        return server, elapsed, len(body)

    def close(self):
        self.conn.close()


def _pages(info, size):
    big, middle = info["big"], info["middle"]
    return [
        ("job list, anonymous", None, "/jobs"),
        ("job list, a user in a group", "alice", "/jobs"),
        ("job list, superuser", "admin", "/jobs"),
        ("job list, state+health filter", None, "/jobs?state=Finished&health=Incomplete"),
        ("job list, type+submitter filter", None, "/jobs?device_type=type01&submitter=user01"),
        ("job list, a page in the middle", None, "/jobs?before=%d" % middle),
        ("job list, oldest page", None, "/jobs?after=0"),
        ("overview", None, "/"),
        ("queue", None, "/queue"),
        ("job page, %d-line log (tail)" % size["log_lines"], None, "/jobs/%d" % big),
        ("job page, log window in the middle", None,
         "/jobs/%d?log_start=%d" % (big, size["log_lines"] // 2)),
        ("log follow request (1,000 lines)", None,
         "/jobs/%d/log?start=%d" % (big, max(0, size["log_lines"] - 1000))),
    ]


def _browser_times(port, paths, ctx):
    """{path: (DOMContentLoaded ms, load ms)} in headless chromium, or None without it."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        ctx.say("web: no selenium: browser timings skipped")
        return None
    if not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")):
        ctx.say("web: no chromium/chromedriver: browser timings skipped")
        return None
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    found = {}
    try:
        for path in paths:
            ready, loaded = [], []
            for _ in range(BROWSER_REPEATS):
                driver.get("http://127.0.0.1:%d%s" % (port, path))
                timing = driver.execute_script(
                    "var t = performance.getEntriesByType('navigation')[0];"
                    "return [t.domContentLoadedEventEnd, t.loadEventEnd];")
                ready.append(timing[0])
                loaded.append(timing[1])
            found[path] = (statistics.median(ready), statistics.median(loaded))
    finally:
        driver.quit()
    return found


def run(backend, size, ctx, browser=True):
    rows = []
    with cleanup() as defer:
        ws = Workspace(backend, "web")
        defer(ws.close)
        port = free_port()
        _enable_api(ws, port)
        info = prepare(ws, size, ctx)
        master = MasterProcess(ws)
        defer(master.kill)
        rss_before = rss_mb(master.pid)
        pages = _pages(info, size)
        clients = {}
        for label, user, path in pages:
            if user not in clients:
                clients[user] = Client(port, user, info["tokens"].get(user))
                defer(clients[user].close)
            client = clients[user]
            if path.startswith("/jobs/%d" % info["big"]) and "cold" not in info:
                server, elapsed, length = client.get(path)
                info["cold"] = True
                rows.append(row(NUMBER, "job page, %d-line log, first (cold) request"
                                % size["log_lines"], backend, round(server, 1), "ms",
                                note="server time; client %.1f ms; indexes the %.0f MB log"
                                % (elapsed, info["log_mb"])))
            servers, clients_ms = [], []
            for _ in range(REPEATS):
                server, elapsed, length = client.get(path)
                servers.append(server)
                clients_ms.append(elapsed)
            median = statistics.median(servers)
            rows.append(row(NUMBER, label, backend, round(median, 1), "ms",
                            target=TARGET_MS, ok=median <= TARGET_MS,
                            note="server p95 %.1f ms; client median %.1f, p95 %.1f ms; %d KB"
                            % (percentile(servers, 95), statistics.median(clients_ms),
                               percentile(clients_ms, 95), length // 1024),
                            path=path))
            ctx.say("web: %-40s server %6.1f ms  client %6.1f ms" % (
                label, median, statistics.median(clients_ms)))
        rss_after = rss_mb(master.pid)
        rows.append(row(NUMBER, "master RSS before / after the pages", backend,
                        round(rss_after, 1), "MB",
                        note="%.1f MB before; the %.0f MB log is never read whole"
                        % (rss_before, info["log_mb"])))
        if browser:
            paths = [p for _, user, p in pages if user is None and "/log?" not in p]
            timings = _browser_times(port, paths, ctx)
            for label, user, path in pages:
                if timings and path in timings and user is None:
                    ready, loaded = timings[path]
                    rows.append(row(NUMBER, "browser: " + label, backend, round(loaded, 1),
                                    "ms", note="DOMContentLoaded %.1f ms, load event %.1f ms"
                                    " (headless chromium, median of %d)"
                                    % (ready, loaded, BROWSER_REPEATS), path=path))
    return rows


class _Context:
    verbose = True

    def say(self, text):
        print(text, file=sys.stderr, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.web", description=TITLE)
    parser.add_argument("--backend", default="sqlite", choices=["sqlite", "postgres"])
    parser.add_argument("--size", default="full", choices=sorted(SIZES))
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = run(args.backend, SIZES[args.size], _Context(), browser=not args.no_browser)
    print("| measure | %s | note |" % args.backend)
    print("|---|---|---|")
    for item in rows:
        print("| %s | %s %s | %s |" % (item["measure"], item["value"], item["unit"],
                                       item["note"]))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
