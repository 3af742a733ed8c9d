"""Scenario 4: end-to-end throughput of zero-length jobs through N workers.

N workers with one device each (one device type); the jobs are queued before the master
starts. The simulated workers connect, and each START is answered at once with START_OK,
the job's ``lava``/``job`` pass result on the log socket and END (a job of zero length).
Counted client-side: jobs whose END_OK came back, over the time from the first START to
the last END_OK; every job must end Finished/Complete in the database.
"""

import os
import shutil
import tempfile
import time

from .harness import (BenchError, MasterProcess, SimProcess, Workspace, add_devices, cleanup,
                      hostnames, job_record, percentile, queue_jobs, row, wait_until)

NUMBER = 4
NAME = "throughput"
TITLE = "End-to-end throughput, zero-length jobs"
TARGET = 1000.0
SIZES = {
    "full": {"workers": 1000, "jobs": 5000},
    "small": {"workers": 200, "jobs": 1000},
    "tiny": {"workers": 5, "jobs": 20},
}


def run(backend, size, ctx):
    from lavacore.states import JobHealth, JobState

    workers = hostnames("tp-w", size["workers"])
    devices = [("tp%05d" % i, "bench", name, ()) for i, name in enumerate(workers)]
    with cleanup() as defer:
        ws = Workspace(backend, "throughput")
        defer(ws.close)
        ws.device_files(devices)
        storage = ws.storage()
        defer(storage.close)
        add_devices(storage, devices)
        now = time.time()
        queue_jobs(storage, [job_record("bench", now=now + i * 1e-4, name="tp%d" % i)
                             for i in range(size["jobs"])])
        master = MasterProcess(ws, profile=ctx.profile_path("throughput", backend))
        defer(master.stop)
        sim = SimProcess()
        defer(sim.close)
        sim.call("mode", start="zero")
        cpu0 = master.cpu_seconds()
        sim.call("spawn", master=master.controller, logs=master.logs, hostnames=workers)
        got = sim.call("wait", what="jobs_done", count=size["jobs"],
                       timeout=60 + size["jobs"] / 20.0)
        cpu = master.cpu_seconds() - cpu0
        times = sorted(sim.call("end_ok_times")["times"])
        starts = sim.call("stats")["counts"]["starts"]
        rss = master.rss_mb()
        # END_OK may leave before the job is Finished (its result still on the way).
        t_done = time.monotonic()
        try:
            wait_until(lambda: storage.count_jobs(state=JobState.FINISHED) >= size["jobs"],
                       30, 0.01, "every job Finished")
        except BenchError:
            pass
        lag = time.monotonic() - t_done
        finished = storage.count_jobs(state=JobState.FINISHED)
        complete = storage.count_jobs(state=JobState.FINISHED, health=JobHealth.COMPLETE)
        master.stop()
        per_job = entries_per_job(ws.output_root, size["jobs"])
        creates = creation_rate(ws.dir)
    if complete != size["jobs"]:
        raise BenchError("%d of %d jobs Finished, %d Complete" % (finished, size["jobs"],
                                                                 complete))
    seconds = got["last_end_ok"] - got["first_start"]
    rate = size["jobs"] / seconds
    # The middle 80% of completions, without the connect ramp-up and the tail.
    low, high = percentile(times, 10), percentile(times, 90)
    steady = 0.8 * size["jobs"] / (high - low) if high > low else rate
    # SQLite's target, and 60% of it on PostgreSQL (each job a few transactions there,
    # every statement a round trip).
    target = TARGET if backend == "sqlite" else 0.6 * TARGET
    return [row(NUMBER, "jobs started and finished per second, %d workers" % size["workers"],
                backend, round(rate, 1), "jobs/s",
                target=">= %d/s" % target if target else None,
                ok=(rate >= target) if target else None,
                note="%d jobs in %.2f s (first START to last END_OK); middle 80%%: %.0f/s; "
                     "master CPU %.0f%% of one core, RSS %.0f MB; %d STARTs sent; all "
                     "Finished/Complete in the database %.2f s after the last END_OK"
                     % (size["jobs"], seconds, steady, 100 * cpu / seconds, rss, starts,
                        lag)),
            row(NUMBER, "file creations/s in the workspace, after the run", backend,
                round(creates), "files/s",
                note="reference, same run: the disk's own limit on jobs/s is this divided "
                     "by the %.1f files and directories the master created per job (the "
                     "job files are written by threads, so the loop does not wait for "
                     "them; END_OK waits for description.yaml)" % per_job)]


def entries_per_job(root, jobs):
    """Files and directories under the job output tree, per job."""
    count = 0
    for _, dirnames, filenames in os.walk(root):
        count += len(dirnames) + len(filenames)
    return count / float(jobs)


def creation_rate(directory, files=1000):
    """Small files created and written per second in ``directory`` (as the master does)."""
    scratch = tempfile.mkdtemp(prefix="creates-", dir=directory)
    try:
        start = time.perf_counter()
        for i in range(files):
            with open(os.path.join(scratch, "f%d.yaml" % i), "w") as handle:
                handle.write("x" * 200)
        return files / (time.perf_counter() - start)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
