"""Chaos: a master with 20 host devices on 4 worker processes runs a few hundred short jobs
while it is killed with SIGKILL at random moments and started again, a worker is killed
and restarted mid-job, and (PostgreSQL) the database backends are terminated. Seeded
(LAVACORE_CHAOS_SEED to replay a run); the seed is printed and is in every failure.

What must hold: every job Finished, exactly once, Complete (its steps pass), with its whole
log and all its test cases; no job's steps ran twice."""

import collections
import os
import random
import time

import gevent
import pytest

import pgutil
from crashutil import CrashLab
from workerutil import job_yaml

WORKERS = ("worker01", "worker02", "worker03", "worker04")
DEVICES = 20
LINES = 30
BUDGET = 300  # seconds for the whole run, chaos included


def chaos_job(number, runs):
    half = LINES // 2
    return job_yaml([
        "echo run %d >> %s" % (number, runs),
        "for i in $(seq 1 %d); do echo job-%d-line-$i; done" % (half, number),
        "lava-test-case first --result pass",
        "sleep 0.%d" % (number % 7 + 2),
        "for i in $(seq %d %d); do echo job-%d-line-$i; done" % (half + 1, LINES, number),
        "lava-test-case second --result pass --measurement %d --units n" % number,
    ], name="chaos")


def run_chaos(tmp_path, jobs, storage=None, extra="", terminate=None):
    seed = int(os.environ.get("LAVACORE_CHAOS_SEED") or random.SystemRandom().randrange(1 << 30))
    print("chaos seed %d (LAVACORE_CHAOS_SEED=%d replays it)" % (seed, seed))
    rng = random.Random(seed)
    lab = CrashLab(tmp_path, workers=WORKERS, devices=DEVICES, storage=storage, extra=extra,
                   master={"schedule_interval": 1})
    runs = tmp_path / "runs.log"
    figures = collections.Counter()
    try:
        ids = {}
        for number in range(jobs):  # queued before any worker is there to run them
            job_id, = lab.submit(chaos_job(number, runs))
            ids[job_id] = number
        for name in WORKERS:
            lab.start_worker(name)
        started = time.monotonic()
        victim = rng.choice(WORKERS)
        worker_killed = False

        def finished():
            try:
                states = lab.jobs()
            except AssertionError:
                return 0  # the database is being restarted under us
            return sum(1 for job_id in ids if states.get(job_id, {}).get("state") == "Finished")

        done = 0
        while time.monotonic() - started < BUDGET:
            done = finished()
            if done == jobs and figures["master kills"] >= 3:
                break
            # The master dies at a random moment, stays dead a random while, comes back
            # (at least three times, even if the jobs ended first on a fast machine).
            gevent.sleep(rng.uniform(0.5, 2.5))
            action = rng.random() if done < jobs else 0.0
            if action < 0.55:
                lab.kill_master()
                figures["master kills"] += 1
                gevent.sleep(rng.uniform(0.0, 2.0))
                lab.start_master()
            elif action < 0.7 and terminate is not None:
                figures["backends terminated"] += terminate()
            elif not worker_killed and done > jobs // 4:
                # A worker dies mid-job and comes back on the same work dir.
                lab.kill_worker(victim)
                figures["worker kills"] += 1
                gevent.sleep(rng.uniform(0.0, 3.0))
                lab.start_worker(victim)
                worker_killed = True
        figures["seconds"] = round(time.monotonic() - started)
        states = lab.jobs()
        runs_seen = collections.Counter(
            int(line.split()[1]) for line in runs.read_text().splitlines())
        problems = []
        for job_id, number in sorted(ids.items()):
            job = states[job_id]
            if (job["state"], job["health"]) != ("Finished", "Complete"):
                problems.append("job %d (#%d): %s %s: %s" % (job_id, number, job["state"],
                                                              job["health"],
                                                              job.get("failure_comment")))
                continue
            if runs_seen[number] != 1:
                problems.append("job %d (#%d) ran %d times" % (job_id, number,
                                                               runs_seen[number]))
            lines = [t for t in lab.targets(job_id) if t.startswith("job-%d-" % number)]
            if lines != ["job-%d-line-%d" % (number, n) for n in range(1, LINES + 1)]:
                problems.append("job %d (#%d): log not whole: %s" % (job_id, number, lines))
            cases = sorted(lab.results(job_id))
            if cases != sorted([("0_chaos", "first", "pass"), ("0_chaos", "second", "pass"),
                                ("lava", "0_chaos", "pass"), ("lava", "job", "pass")]):
                problems.append("job %d (#%d): test cases %s" % (job_id, number, cases))
        figures["jobs"] = jobs
        figures["lost"] = len(problems)
        print("chaos figures: %s" % dict(figures))
        assert not problems, "seed %d, %s:\n%s\n--- master (tail) ---\n%s" % (
            seed, dict(figures), "\n".join(problems[:20]), lab.master_logs()[-6000:])
        assert figures["master kills"] >= 3, (seed, dict(figures))
        return figures
    finally:
        lab.close()


@pytest.mark.timeout(BUDGET + 120)
def test_chaos_sqlite(tmp_path):
    run_chaos(tmp_path, jobs=200)


@pytest.fixture
def pg_schema():
    yield from pgutil.schema_for_test()


@pytest.mark.timeout(BUDGET + 120)
def test_chaos_postgresql(tmp_path, pg_schema):
    run_chaos(tmp_path, jobs=200, storage=pgutil.storage_lines(pg_schema),
              extra=pgutil.plugin_extra(), terminate=lambda: pgutil.terminate(pg_schema))
