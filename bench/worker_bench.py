"""Workers end to end: real master, real worker processes, real runners on ``host`` devices.

    python bench/worker_bench.py                       # both measures, default sizes
    python bench/worker_bench.py --jobs 200 --workers 10 --lines 200000
    python bench/worker_bench.py --worker-tree /var/tmp/old-lavacore   # workers (and their
                                                       # runners) from another source tree
    python bench/worker_bench.py --runner /bin/true    # the control plane alone

1. Throughput: ``--workers`` worker processes (``python -m lavacore.worker.cli``, lava-slave's
   default intervals: 5 s job check), each with one host device, and ``--jobs`` trivial jobs
   (one step: ``true``) submitted at once. Jobs per second = jobs / (last end - first
   submit), with per-job latencies from the job rows (submit -> start -> end).
2. Log ingestion: one job whose step prints ``--lines`` lines. The master's ``output.yaml``
   of that job is sampled every 20 ms: lines/s = lines / (time the last line was on disk -
   time the first was). The runner's own send rate (the lines' ``dt``) is printed beside
   it: when the two agree, the runner, not the master, set the pace.

During both, a fake worker ``probe`` PINGs the master every 10 ms (``master_ping``): the
PONG round trips say how long the master's loop was busy with something else.

Everything runs under /var/tmp (file creation in /tmp is slow on these machines). The
master and the workers log to files in the workspace, which is kept (and its path printed)
when a measure fails, or with ``--keep``. Results go to stdout as JSON.
"""

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PY = sys.executable

JOB = """\
device_type: host
job_name: {name}
priority: medium
visibility: public
timeouts:
  job:
    minutes: 10
actions:
- test:
    definitions:
    - from: inline
      name: bench
      path: inline/bench.yaml
      repository:
        metadata:
          format: Lava-Test Test Definition 1.0
          name: bench
        run:
          steps:
          - {step}
"""


class Probe:
    """A fake worker ``probe`` that PINGs the master every 10 ms from a thread and records
    each PONG's round trip: how responsive the master stays while it works."""

    def __init__(self, url):
        import threading

        self.url = url
        self.rtts = []
        self.lost = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _run(self):
        import zmq

        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, b"probe")
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.url)
        try:
            while not self._stop.is_set():
                began = time.monotonic()
                sock.send(b"PING")
                if sock.poll(10000):
                    sock.recv_multipart()
                    self.rtts.append(time.monotonic() - began)
                else:
                    self.lost += 1
                self._stop.wait(0.01)
        finally:
            sock.close()
            ctx.term()

    def stop(self):
        self._stop.set()
        self._thread.join(15)
        rtts = sorted(self.rtts) or [float("nan")]
        return {"pings": len(self.rtts), "lost": self.lost,
                "rtt_median_ms": round(1000 * rtts[len(rtts) // 2], 2),
                "rtt_p99_ms": round(1000 * rtts[int(0.99 * (len(rtts) - 1))], 2),
                "rtt_max_ms": round(1000 * rtts[-1], 2)}


def say(text):
    print(text, file=sys.stderr, flush=True)


def cpu_seconds(pid):
    """utime + stime of a process, in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def epoch(iso):
    return datetime.datetime.fromisoformat(iso).replace(
        tzinfo=datetime.timezone.utc).timestamp()


class Bench:
    def __init__(self, workers, worker_tree=None, job_check=5.0, keep=False, runner=None):
        self.dir = tempfile.mkdtemp(prefix="lavacore-wbench-", dir="/var/tmp")
        self.keep = keep
        self.count = workers
        self.worker_tree = worker_tree
        self.job_check = job_check
        self.runner = runner
        self.master = None
        self.workers = []
        shutil.copytree(os.path.join(ROOT, "etc"), os.path.join(self.dir, "etc"))
        devices_dir = os.path.join(self.dir, "etc", "dispatcher-config", "devices")
        lines = ["[master]"]
        for key, value in {"listen": "tcp://127.0.0.1:*", "logs": "tcp://127.0.0.1:*",
                           "events": "tcp://127.0.0.1:*", "ping_interval": 20,
                           "worker_timeout": 600, "schedule_interval": 20,
                           "result_grace": 10}.items():
            lines.append("%s = %s" % (key, json.dumps(value)))
        lines += ["[storage]", 'backend = "sqlite"', 'url = "var/lavacore.db"',
                  "[api]", "enabled = false"]
        for n in range(1, workers + 1):
            hostname = "host%02d" % n
            with open(os.path.join(devices_dir, "%s.jinja2" % hostname), "w") as f:
                f.write("{%% extends 'host.jinja2' %%}\n{%% set hostname = '%s' %%}\n"
                        % hostname)
            lines += ["[[devices]]", 'hostname = "%s"' % hostname, 'device_type = "host"',
                      'worker = "worker%02d"' % n, "tags = []", 'health = "Good"']
        self.config = os.path.join(self.dir, "config.toml")
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.session = None

    # -- processes ----------------------------------------------------------------------

    def start(self):
        log_path = os.path.join(self.dir, "master.log")
        log = open(log_path, "wb")
        self.master = subprocess.Popen([PY, "-m", "lavacore.cli", "-c", self.config],
                                       stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()
        endpoints = self.endpoints = {}
        deadline = time.monotonic() + 30
        while "started" not in endpoints:
            if time.monotonic() > deadline or self.master.poll() is not None:
                raise RuntimeError("master did not start:\n" + open(log_path).read())
            time.sleep(0.05)
            text = open(log_path, errors="replace").read()
            for kind, url in re.findall(r"listening for (workers|job logs) on (\S+)", text):
                endpoints[kind] = url
            if "master started" in text:
                endpoints["started"] = True
        runner = os.path.join(os.path.dirname(PY), "lavacore-run")
        if self.worker_tree or not os.path.exists(runner):
            runner = "%s -m lavacore.worker.runner" % PY
        runner = self.runner or runner
        env = dict(os.environ)
        if self.worker_tree:
            env["PYTHONPATH"] = self.worker_tree
        for n in range(1, self.count + 1):
            hostname = "worker%02d" % n
            log = open(os.path.join(self.dir, "%s.log" % hostname), "wb")
            self.workers.append(subprocess.Popen(
                [PY, "-m", "lavacore.worker.cli", "--master", endpoints["workers"],
                 "--logs", endpoints["job logs"], "--hostname", hostname,
                 "--work-dir", os.path.join(self.dir, "work", hostname),
                 "--runner", runner, "--job-check", str(self.job_check),
                 "--log-level", "INFO"],
                stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=self.worker_tree or ROOT))
            log.close()
        from lavacore.cli import Session

        self.session = Session(self.config)
        deadline = time.monotonic() + 60
        while True:
            online = [w for w in self.session.storage.list_workers()
                      if w.state.display == "Online"]
            if len(online) == self.count:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("only %d of %d workers online" % (len(online), self.count))
            time.sleep(0.05)

    def close(self):
        if self.session is not None:
            self.session.close()
        for proc in self.workers:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            proc.wait(30)
        if self.master is not None and self.master.poll() is None:
            self.master.send_signal(signal.SIGTERM)
            self.master.wait(30)
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- jobs ---------------------------------------------------------------------------

    def submit(self, step, name="bench"):
        from lavacore.jobs import submit

        s = self.session
        text = JOB.format(name=name, step=json.dumps(step))
        jobs = submit(s.storage, s.pm.hook, None, text, "bench", s.clock.time())
        s.flow.submitted(jobs)
        return jobs[0].id

    def wait_finished(self, ids, timeout):
        from lavacore.states import JobState

        deadline = time.monotonic() + timeout
        pending = set(ids)
        while pending:
            done = {j.id for j in self.session.storage.list_jobs(state=JobState.FINISHED,
                                                                 limit=100000)}
            pending -= done
            if not pending:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("%d job(s) not finished after %d s" % (len(pending), timeout))
            time.sleep(0.05)
        return [self.session.storage.get_job(i) for i in ids]

    def output_yaml(self, job):
        from lavacore import config as config_mod

        config = config_mod.load(self.config)
        return os.path.join(job.output_dir(config.resolve(config.master.output_dir)),
                            "output.yaml")

    # -- measures -----------------------------------------------------------------------

    def throughput(self, count):
        probe = Probe(self.endpoints["workers"]).start()
        cpu0 = cpu_seconds(self.master.pid)
        began = time.time()
        ids = [self.submit("true", "trivial %d" % n) for n in range(count)]
        submitted = time.time() - began
        jobs = self.wait_finished(ids, timeout=60 + count)
        cpu = cpu_seconds(self.master.pid) - cpu0
        responsiveness = probe.stop()
        health = {}
        for job in jobs:
            health[job.health.display] = health.get(job.health.display, 0) + 1
        first_submit = min(j.submit_time for j in jobs)
        last_end = max(j.end_time for j in jobs)
        wall = last_end - first_submit
        run = [j.end_time - j.start_time for j in jobs]
        wait = [j.start_time - j.submit_time for j in jobs]
        total = [j.end_time - j.submit_time for j in jobs]
        return {
            "jobs": count, "workers": self.count, "health": health,
            "submit_seconds": round(submitted, 2),
            "wall_seconds": round(wall, 2),
            "jobs_per_second": round(count / wall, 2),
            "start_to_end_median_s": round(statistics.median(run), 3),
            "start_to_end_p95_s": round(sorted(run)[int(0.95 * (len(run) - 1))], 3),
            "start_to_end_max_s": round(max(run), 3),
            "queue_wait_median_s": round(statistics.median(wait), 3),
            "submit_to_end_median_s": round(statistics.median(total), 3),
            "master_cpu_seconds": round(cpu, 2),
            "master_cpu_per_job_ms": round(1000 * cpu / count, 2),
            "master_ping": responsiveness,
        }

    def ingestion(self, lines):
        step = "seq 1 %d | sed 's/^/chatty line number /'" % lines
        probe = Probe(self.endpoints["workers"]).start()
        cpu0 = cpu_seconds(self.master.pid)
        job_id = self.submit(step, "chatty")
        job = self.session.storage.get_job(job_id)
        path = self.output_yaml(job)
        samples = []  # (time, size)
        from lavacore.states import JobState

        deadline = time.monotonic() + 300
        while True:
            try:
                size = os.path.getsize(path)
            except OSError:
                size = 0
            samples.append((time.time(), size))
            job = self.session.storage.get_job(job_id)
            if job.state == JobState.FINISHED and len(samples) > 2 and \
                    samples[-1][1] == samples[-2][1]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("chatty job not finished")
            time.sleep(0.02)
        cpu = cpu_seconds(self.master.pid) - cpu0
        responsiveness = probe.stop()
        final = samples[-1][1]
        first_seen = next(t for t, s in samples if s > 0)
        last_seen = next(t for t, s in samples if s == final)
        stored = 0
        dts = []
        from lavacore import logformat

        with open(path, encoding="utf-8") as f:
            for text in f:
                if "chatty line number" in text:
                    stored += 1
                    if stored == 1 or stored == lines:
                        dts.append(epoch(logformat.parse_line(text[2:])["dt"]))
        ingest = last_seen - first_seen
        sent = dts[-1] - dts[0] if len(dts) == 2 else float("nan")
        return {
            "health": job.health.display, "lines_printed": lines, "lines_stored": stored,
            "output_yaml_bytes": final,
            "ingest_seconds": round(ingest, 2),
            "lines_per_second_master": round(stored / ingest) if ingest else None,
            "mb_per_second_master": round(final / ingest / 1e6, 2) if ingest else None,
            "runner_send_seconds": round(sent, 2),
            "lines_per_second_runner": round(stored / sent) if sent else None,
            "last_line_lag_s": round(last_seen - dts[-1], 3) if dts else None,
            "sampling_resolution_s": 0.02,
            "master_cpu_seconds": round(cpu, 2),
            "master_cpu_us_per_line": round(1e6 * cpu / stored, 1) if stored else None,
            "master_ping": responsiveness,
        }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=10)
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--lines", type=int, default=200000)
    p.add_argument("--job-check", type=float, default=5.0,
                   help="the workers' job check period (lava-slave: 5 s)")
    p.add_argument("--worker-tree", help="run the workers from this source tree")
    p.add_argument("--runner", help="the workers' runner command instead of lavacore-run "
                   "(e.g. /bin/true: every job ends at once, Incomplete without a "
                   "description, which measures the control plane alone)")
    p.add_argument("--skip", choices=["throughput", "ingestion"], action="append",
                   default=[])
    p.add_argument("--keep", action="store_true", help="keep the workspace (logs)")
    args = p.parse_args(argv)
    bench = Bench(args.workers, args.worker_tree, args.job_check, args.keep, args.runner)
    results = {"machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()},
               "worker_tree": args.worker_tree or ROOT, "job_check": args.job_check,
               "runner": args.runner or "lavacore-run"}
    try:
        bench.start()
        if "throughput" not in args.skip:
            say("throughput: %d trivial jobs on %d workers..." % (args.jobs, args.workers))
            results["throughput"] = bench.throughput(args.jobs)
            say(json.dumps(results["throughput"], indent=2))
        if "ingestion" not in args.skip:
            say("ingestion: one job printing %d lines..." % args.lines)
            results["ingestion"] = bench.ingestion(args.lines)
            say(json.dumps(results["ingestion"], indent=2))
    except Exception:
        say("workspace: %s" % bench.dir)
        bench.keep = True
        raise
    finally:
        results["machine"]["loadavg_after"] = os.getloadavg()
        bench.close()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
