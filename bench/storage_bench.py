"""Storage benchmark: the same measurements on SQLite and on PostgreSQL.

1. Claims per second in a scheduling pass: 10,000 queued jobs, 500 idle devices (one
   device type, 10 online workers). One pass builds the SchedulingView, runs the FIFO
   policy and makes every claim through Flow.schedule (what Master.schedule_pass does,
   without sending START). PostgreSQL is also measured with the variants that decide what
   the backend does: without server-side prepared statements (``prepare = false``), the
   one-round-trip SKIP LOCKED ``claim()``, concurrent claimers, synchronous_commit=off. Then 10,000 jobs queued
   and 10,000 test cases stored, row by row and with the backend's batched INSERTs.
2. End-to-end jobs per second: a real master (``lavacore -c config.toml`` in a
   subprocess) with 50 devices on 10 simulated protocol v3 workers in this process; 2,000
   zero-length jobs are queued at once and timed from the wake-up to the last END_OK.

Run from the repository root::

    python -m bench.storage_bench                      # both backends
    python -m bench.storage_bench --backend postgres --pg-url postgresql://...

PostgreSQL runs in a schema of its own (dropped afterwards).
"""

import argparse
import json
import lzma
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PG_URL = os.environ.get("LAVACORE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")

JOB = """\
device_type: bench
job_name: bench {n}
priority: medium
visibility: public
timeouts:
  job:
    minutes: 5
actions:
- test:
    timeout:
      minutes: 1
    definitions:
    - from: inline
      name: smoke
      path: inline/smoke.yaml
      repository:
        metadata:
          format: Lava-Test Test Definition 1.0
          name: smoke
        run:
          steps:
          - echo hello
"""


# -- storages -------------------------------------------------------------------------------

class Backend:
    def __init__(self, name, workdir, pg_url, **pg_options):
        self.name = name
        self.workdir = workdir
        self.pg_url = pg_url
        self.schema = "storagebench_" + uuid.uuid4().hex[:10] if name == "postgres" else None
        self.pg_options = pg_options
        self.opened = []

    def open(self, **extra):
        if self.name == "sqlite":
            from lavacore_plugins.storage_sqlite import SQLiteStorage

            st = SQLiteStorage(os.path.join(self.workdir, "bench.db")).open()
        else:
            from lavacore_plugins.storage_postgres import PostgresStorage

            options = dict(self.pg_options, schema=self.schema,
                           application_name="lavacore-bench")
            options.update(extra)
            st = PostgresStorage(self.pg_url, **options).open()
        st.migrate()
        self.opened.append(st)
        return st

    def storage_lines(self):
        if self.name == "sqlite":
            return ['backend = "sqlite"', 'url = "bench.db"']
        opts = dict(self.pg_options, schema=self.schema, application_name="lavacore-bench")
        text = ", ".join("%s = %s" % (k, json.dumps(v)) for k, v in opts.items())
        return ['backend = "postgres"', 'url = "%s"' % self.pg_url, "options = { %s }" % text]

    def reset(self):
        for st in self.opened:
            st.close()
        self.opened = []
        if self.name == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                path = os.path.join(self.workdir, "bench.db" + suffix)
                if os.path.exists(path):
                    os.unlink(path)
        else:
            import psycopg2

            conn = psycopg2.connect(self.pg_url)
            conn.autocommit = True
            conn.cursor().execute('DROP SCHEMA IF EXISTS "%s" CASCADE' % self.schema)
            conn.close()


def fill(st, jobs, devices, workers=10, device_type="bench"):
    from lavacore.models import Device, Job, Worker
    from lavacore.states import DeviceHealth, WorkerState

    for w in range(workers):
        st.add_worker(Worker("worker%02d" % w))
    with st.transaction():
        for d in range(devices):
            st.add_device(Device("%s%04d" % (device_type, d), device_type,
                                 "worker%02d" % (d % workers), health=DeviceHealth.GOOD))
    for w in range(workers):
        st.update_worker("worker%02d" % w, state=WorkerState.ONLINE)
    now = time.time()
    batch = []
    for n in range(jobs):
        batch.append(Job(None, requested_device_type=device_type, priority=(n * 7) % 100,
                         submit_time=now + n * 0.001, definition="job_name: %d\n" % n,
                         original_definition="job_name: %d\n" % n, submitter="bench"))
        if len(batch) == 1000:
            st.insert_jobs(batch)
            batch = []
    if batch:
        st.insert_jobs(batch)


# -- 1. claims in a scheduling pass ---------------------------------------------------------

def _claim_flow(st, flow, job_id, hostname):
    return flow.schedule(job_id, hostname)


def _claim_skip_locked(st, flow, job_id, hostname):
    """What Flow.schedule does, with the PostgreSQL one-round-trip claim."""
    from lavacore.states import DeviceState, JobState

    with st.transaction():
        pair = st.claim(job_id, hostname)
        if pair is None:
            return None
        job, device = pair
        if job.state != JobState.SUBMITTED or device.state != DeviceState.IDLE:
            return None
        st.update_job(job_id, state=JobState.SCHEDULED, actual_device=hostname,
                      worker=device.worker)
        st.update_device(hostname, state=DeviceState.RESERVED, current_job=job_id)
    return job, device


def _unclaim(st):
    """Put every claimed job back in the queue and every device back to Idle."""
    from lavacore.states import DeviceState, JobState

    with st.transaction():
        st._execute("UPDATE jobs SET state = ?, actual_device = NULL, worker = NULL"
                    " WHERE state = ?", (int(JobState.SUBMITTED), int(JobState.SCHEDULED)))
        st._execute("UPDATE devices SET state = ?, current_job = NULL",
                    (int(DeviceState.IDLE),))


def scheduling_passes(backend, variants, jobs, devices, rounds):
    """Every variant makes ``rounds`` passes over the same queue, the variants taking turns
    (so a busy machine's ups and downs fall on all of them); the median pass is kept."""
    import statistics

    import gevent

    from lavacore.clock import Clock
    from lavacore.flow import Flow
    from lavacore.scheduling import SchedulingView
    from lavacore_plugins.scheduler_fifo import fifo

    backend.reset()
    base = backend.open()
    fill(base, jobs, devices)
    if backend.name == "postgres":
        base._execute("ANALYZE")
    storages = {}
    for label, _claim, _claimers, options in variants:
        storages[label] = backend.open(**options) if options else base
    runs = {label: [] for label, *_ in variants}
    for _ in range(rounds):
        for label, claim, claimers, _options in variants:
            st = storages[label]
            flow = Flow(st, Clock(), lambda *args, **kwargs: None)
            t0 = time.perf_counter()
            view = SchedulingView(st)
            assignments = fifo(view)
            t1 = time.perf_counter()
            placed = []

            def run(part):
                for job_id, hostname in part:
                    if claim(st, flow, job_id, hostname) is not None:
                        placed.append(job_id)

            if claimers == 1:
                run(assignments)
            else:
                gevent.joinall([gevent.spawn(run, assignments[i::claimers])
                                for i in range(claimers)], raise_error=True)
            t2 = time.perf_counter()
            assert len(placed) == len(assignments) == min(jobs, devices), (
                label, len(placed), len(assignments))
            runs[label].append((t1 - t0, t2 - t1))
            _unclaim(base)
    results = []
    for label, *_ in variants:
        view_s = statistics.median(r[0] for r in runs[label])
        claims_s = statistics.median(r[1] for r in runs[label])
        results.append({"variant": label, "claims": min(jobs, devices),
                        "view_fifo_s": round(view_s, 4), "claims_s": round(claims_s, 4),
                        "claims_per_s": round(min(jobs, devices) / claims_s),
                        "pass_s": round(view_s + claims_s, 4),
                        "claims_per_s_all_rounds": [round(min(jobs, devices) / r[1])
                                                    for r in runs[label]]})
    backend.reset()
    return results


# -- batched writes -------------------------------------------------------------------------

def batched_writes(backend, rows):
    """Queueing jobs and storing test cases: one row per statement (the portable
    SQLStorage code) against the backend's own methods (multi-row INSERTs on PostgreSQL)."""
    from lavacore.models import Job, TestCase
    from lavacore.storage import SQLStorage

    backend.reset()
    st = backend.open()
    result = {"rows": rows}

    def jobs():
        return [Job(None, requested_device_type="bench", definition="x",
                    original_definition="x", submit_time=time.time()) for _ in range(rows)]

    def cases():
        return [TestCase(1, "suite", "case %d" % n, "pass", logged=time.time())
                for n in range(rows)]

    for label, insert_jobs, add_testcases in (
            ("row_by_row", SQLStorage.insert_jobs, SQLStorage.add_testcases),
            ("backend", type(st).insert_jobs, type(st).add_testcases)):
        if label == "backend" and type(st).insert_jobs is SQLStorage.insert_jobs:
            continue  # SQLite: the same code
        t0 = time.perf_counter()
        insert_jobs(st, jobs())
        t1 = time.perf_counter()
        add_testcases(st, cases())
        t2 = time.perf_counter()
        result[label + "_jobs_per_s"] = round(rows / (t1 - t0))
        result[label + "_testcases_per_s"] = round(rows / (t2 - t1))
    backend.reset()
    return result


# -- 2. end to end --------------------------------------------------------------------------

def _free_ports(count):
    socks = [socket.socket() for _ in range(count)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def _plugins_table():
    import importlib.metadata

    if any(ep.name == "storage_postgres"
           for ep in importlib.metadata.entry_points(group="lavacore.plugins")):
        return ""
    return '[plugins]\nmodules = ["lavacore_plugins.storage_postgres"]\n'


def write_lab(workdir, backend, devices, workers):
    etc = os.path.join(workdir, "etc")
    if os.path.exists(etc):
        shutil.rmtree(etc)
    shutil.copytree(os.path.join(ROOT, "etc"), etc)
    config_dir = os.path.join(etc, "dispatcher-config")
    with open(os.path.join(config_dir, "device-types", "bench.jinja2"), "w") as handle:
        handle.write("{% extends 'base.jinja2' %}\n")
    hostnames = []
    for d in range(devices):
        hostname = "bench%04d" % d
        hostnames.append((hostname, "worker%02d" % (d % workers)))
        with open(os.path.join(config_dir, "devices", hostname + ".jinja2"), "w") as handle:
            handle.write("{% extends 'bench.jinja2' %}\n")
    listen, logs, events = _free_ports(3)
    lines = ["[master]", 'listen = "tcp://127.0.0.1:%d"' % listen,
             'logs = "tcp://127.0.0.1:%d"' % logs, 'events = "tcp://127.0.0.1:%d"' % events,
             "schedule_interval = 20", "result_grace = 10", "[storage]"]
    lines += backend.storage_lines()
    lines += ["[api]", "enabled = false"]
    for hostname, worker in hostnames:
        lines += ["[[devices]]", 'hostname = "%s"' % hostname, 'device_type = "bench"',
                  'worker = "%s"' % worker, 'health = "Good"']
    path = os.path.join(workdir, "config.toml")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n" + (_plugins_table() if backend.name ==
                                                 "postgres" else ""))
    return path, "tcp://127.0.0.1:%d" % listen, "tcp://127.0.0.1:%d" % logs


class SimWorkers:
    """Plain pyzmq workers (no gevent): START -> START_OK, the lava/job result, END."""

    def __init__(self, master_url, logs_url, names):
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()
        self.socks = {}
        self.poller = zmq.Poller()
        for name in names:
            sock = self.ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.IDENTITY, name.encode())
            sock.setsockopt(zmq.CONNECT_RID, b"master")
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(master_url)
            self.socks[sock] = name
            self.poller.register(sock, zmq.POLLIN)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(logs_url)
        self.description = lzma.compress(b"job: {}\n")
        self.result = json.dumps({"dt": "2024-01-01T00:00:00.000000", "lvl": "results",
                                  "msg": {"definition": "lava", "case": "job",
                                          "result": "pass"}}).encode()
        self.end_oks = set()
        self.greeted = set()

    def hello(self, timeout=20):
        deadline = time.monotonic() + timeout
        while len(self.greeted) < len(self.socks):
            if time.monotonic() > deadline:
                raise RuntimeError("workers not greeted: %d of %d"
                                   % (len(self.greeted), len(self.socks)))
            for sock, name in self.socks.items():
                if name not in self.greeted:
                    sock.send_multipart([b"master", b"HELLO", b"3"])
            self.step(500)

    def step(self, timeout_ms):
        for sock, _ in self.poller.poll(timeout_ms):
            while True:
                try:
                    frames = sock.recv_multipart(self.zmq.NOBLOCK)
                except self.zmq.Again:
                    break
                action = frames[1]
                if action == b"HELLO_OK":
                    self.greeted.add(self.socks[sock])
                elif action == b"START":
                    job_id = frames[2]
                    sock.send_multipart([b"master", b"START_OK", job_id])
                    self.push.send_multipart([job_id, self.result])
                    sock.send_multipart([b"master", b"END", job_id, b"", self.description])
                elif action == b"END_OK":
                    self.end_oks.add(int(frames[2]))

    def close(self):
        for sock in self.socks:
            sock.close(0)
        self.push.close(0)
        self.ctx.term()


def end_to_end(backend, jobs, devices, workers):
    from lavacore.jobs import submit
    from lavacore.models import Job
    from lavacore.states import JobHealth, JobState

    backend.reset()
    workdir = tempfile.mkdtemp(prefix="lavacore-e2e-", dir=backend.workdir)
    if backend.name == "sqlite":
        backend.workdir, saved = workdir, backend.workdir
    config_path, master_url, logs_url = write_lab(workdir, backend, devices, workers)
    proc = subprocess.Popen([sys.executable, "-m", "lavacore.cli", "-c", config_path,
                             "--log-level", "WARNING"], cwd=ROOT, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    errors = []
    threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()
    sim = None
    try:
        st = None
        deadline = time.monotonic() + 30
        while st is None:  # the master created the schema and the devices
            try:
                st = backend.open()
                if len(st.list_devices()) < devices:
                    st = None
            except Exception:
                st = None
            if st is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("master did not start:\n" + "".join(errors))
                time.sleep(0.2)
        sim = SimWorkers(master_url, logs_url, ["worker%02d" % w for w in range(workers)])
        sim.hello()
        # Queue every job at once (one transaction), then one wake-up.
        template = submit(st, None, None, JOB.format(n=0), "bench", time.time())[0]
        batch = []
        for n in range(1, jobs):
            job = Job(**{k: getattr(template, k) for k in template.__dataclass_fields__})
            job.id, job.submit_time = None, time.time()
            batch.append(job)
        st.insert_jobs(batch)
        t0 = time.perf_counter()
        st.publish_event({"kind": "testjob", "data": {"job": template.id,
                                                     "state": "Submitted"}})
        deadline = time.monotonic() + 300
        while len(sim.end_oks) < jobs:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("%d of %d jobs ended:\n%s" % (len(sim.end_oks), jobs,
                                                                 "".join(errors[-20:])))
            sim.step(100)
        t1 = time.perf_counter()
        time.sleep(0.5)
        complete = st.count_jobs(state=JobState.FINISHED, health=JobHealth.COMPLETE)
        return {"jobs": jobs, "devices": devices, "workers": workers,
                "seconds": round(t1 - t0, 3), "jobs_per_s": round(jobs / (t1 - t0), 1),
                "complete": complete}
    finally:
        if sim is not None:
            sim.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        if backend.name == "sqlite":
            backend.workdir = saved
        backend.reset()


# -- main -----------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--pg-url", default=PG_URL)
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5,
                        help="passes per variant, taking turns (the median is kept)")
    parser.add_argument("--e2e-jobs", type=int, default=2000)
    parser.add_argument("--e2e-devices", type=int, default=50)
    parser.add_argument("--e2e-workers", type=int, default=10)
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args(argv)

    import lavacore_plugins.storage_postgres  # noqa: F401  (the wait callback, first)

    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    workdir = tempfile.mkdtemp(prefix="lavacore-bench-")
    results = []
    try:
        for name in backends:
            variants = [("Flow.schedule (core path)", _claim_flow, 1, {})]
            if name == "postgres":
                variants += [
                    ("Flow.schedule, prepare=false", _claim_flow, 1, {"prepare": False}),
                    ("claim() SKIP LOCKED, 1 round trip", _claim_skip_locked, 1, {}),
                    ("Flow.schedule, 4 greenlets", _claim_flow, 4, {}),
                    ("Flow.schedule, synchronous_commit=off", _claim_flow, 1,
                     {"synchronous_commit": "off"}),
                ]
            for result in scheduling_passes(Backend(name, workdir, args.pg_url), variants,
                                            args.jobs, args.devices, args.repeat):
                result.update(backend=name, jobs_queued=args.jobs, devices=args.devices)
                results.append(result)
                print(json.dumps(result), flush=True)
            result = batched_writes(Backend(name, workdir, args.pg_url), args.jobs)
            result.update(backend=name, variant="batched writes")
            results.append(result)
            print(json.dumps(result), flush=True)
            if not args.skip_e2e:
                backend = Backend(name, workdir, args.pg_url)
                result = end_to_end(backend, args.e2e_jobs, args.e2e_devices, args.e2e_workers)
                result.update(backend=name, variant="end to end")
                results.append(result)
                print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
