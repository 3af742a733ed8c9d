"""End to end with real processes: the master (``python -m lavacore.cli -c CONFIG``), a
worker (``python -m lavacore.worker.cli``, short intervals), its runners (the worker's
default runner command, ``lavacore-run``) on ``host`` devices, and the command line.

Nothing here sleeps for seconds: every wait is on a condition, with a bound.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import ROOT, run_cli, write_config  # noqa: E402
from lavacore import cli, logformat  # noqa: E402
from lavacore.worker import procs  # noqa: E402
from workerutil import (PY, acknowledged, fill_filesystem, job_yaml,  # noqa: E402
                        small_filesystem, table_rows, wait_for_file, wait_until)

WORKER = "worker01"
# A job check five times a second is only the fallback: ends are seen through the child
# watcher. Cancel escalation is shortened so that a stuck runner cannot eat the budget.
WORKER_TIMING = ["--hello-retry", "0.2", "--job-check", "0.2", "--poll-timeout", "0.5",
                 "--cancel-term-again", "3", "--cancel-kill", "6"]


def host_devices(count, worker=WORKER, device_type="host"):
    return tuple(("host%02d" % (n + 1), device_type, worker, ()) for n in range(count))


class Lab:
    """A master process, worker processes and the command line, all on one config."""

    def __init__(self, tmp_path, master_process, devices=host_devices(1), master=None,
                 extra=""):
        self.tmp_path = tmp_path
        settings = {"result_grace": 10}
        settings.update(master or {})
        self.config = write_config(tmp_path, devices=devices, master=settings, extra=extra)
        self.master = master_process(self.config)
        self.workers = {}

    # -- processes ----------------------------------------------------------------------

    def work_dir(self, hostname=WORKER):
        return self.tmp_path / ("work-%s" % hostname)

    def start_worker(self, hostname=WORKER, extra=(), work_dir=None):
        work = work_dir or self.work_dir(hostname)
        os.makedirs(work, exist_ok=True)
        log = open(self.tmp_path / ("%s.log" % hostname), "ab")
        proc = subprocess.Popen(
            [PY, "-m", "lavacore.worker.cli", "--master", self.master.controller,
             "--logs", self.master.logs, "--hostname", hostname, "--work-dir", str(work),
             "--log-level", "DEBUG", *WORKER_TIMING, *extra],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.workers[hostname] = proc
        return proc

    def worker_log(self, hostname=WORKER):
        path = self.tmp_path / ("%s.log" % hostname)
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self):
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        # Runners outlive their worker by design: end those a failed test left behind,
        # with everything in their sessions.
        for pid in _runners_under(str(self.tmp_path)):
            procs.kill_session(pid)
        self.master.stop()
        (self.tmp_path / "master.log").write_text(self.master.log_text())

    # -- the command line ---------------------------------------------------------------

    def cli(self, *args):
        """The real CLI in a subprocess; returns its stdout (asserting exit status 0)."""
        done = run_cli(self.config, *args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    def quick(self, *args):
        """The same CLI code in this process (for polling without a fork per look)."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli.main(["-c", self.config, *args]) == 0, args
        return out.getvalue()

    def submit(self, text, fork=False):
        path = self.tmp_path / ("job-%d.yaml" % time.monotonic_ns())
        path.write_text(text)
        return int((self.cli if fork else self.quick)("submit", str(path)).split()[0])

    def job(self, job_id):
        return json.loads(self.quick("jobs", "show", str(job_id), "--json"))

    def wait_job(self, job_id, predicate, timeout=30, what="condition"):
        state = {}

        def check():
            state.update(self.job(job_id))
            return predicate(state)

        try:
            wait_until(check, timeout=timeout, interval=0.05, what=what)
        except AssertionError:
            raise AssertionError("job %d: %s not reached in %s s: %s\n--- master ---\n%s\n"
                                 "--- worker ---\n%s" % (
                                     job_id, what, timeout, state, self.master.log_text()[-3000:],
                                     self.worker_log()[-3000:])) from None
        return dict(state)

    def finished(self, job_id, timeout=30):
        return self.wait_job(job_id, lambda j: j["state"] == "Finished", timeout, "Finished")

    def results(self, job_id, fork=False):
        data = json.loads((self.cli if fork else self.quick)(
            "jobs", "results", str(job_id), "--json"))
        return {(suite["name"], case["name"]): case
                for suite in data["suites"] for case in suite["tests"]}

    def log_lines(self, job_id, fork=False):
        """``jobs logs --raw``: the stored lines, each parsed as lavacore's readers do."""
        text = (self.cli if fork else self.quick)("jobs", "logs", str(job_id), "--raw")
        return [logformat.parse_line(line) for line in text.split("\n") if line]

    def output_yaml(self, job_id):
        """The master's stored log file of a job (LAVA's YYYY/MM/DD/<id> layout)."""
        from lavacore import config as config_mod

        config = config_mod.load(self.config)
        for dirpath, _, filenames in os.walk(config.resolve(config.master.output_dir)):
            if os.path.basename(dirpath) == str(job_id) and "output.yaml" in filenames:
                return os.path.join(dirpath, "output.yaml")
        raise AssertionError("no output.yaml for job %d" % job_id)

    def targets(self, job_id, fork=False):
        return [line["msg"] for line in self.log_lines(job_id, fork) if line["lvl"] == "target"]


def _runners_under(directory):
    """Pids of live runners whose job dir is under ``directory``."""
    prefix = ("--output-dir=%s" % directory).encode()
    return [int(name) for name in os.listdir("/proc") if name.isdigit() and any(
        arg.startswith(prefix) for arg in procs.cmdline(int(name)))]


def _live(argv_text):
    """Pids of live processes whose whole command line is ``argv_text``."""
    wanted = argv_text.encode().split()
    return [int(name) for name in os.listdir("/proc")
            if name.isdigit() and procs.cmdline(int(name)) == wanted]


@pytest.fixture
def make_lab(tmp_path, master_process):
    labs = []

    def make(**kwargs):
        lab = Lab(tmp_path, master_process, **kwargs)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.close()


def _hello_steps():
    return ["echo start",
            "seq 1 1000 | sed 's/^/line /'",
            "lava-test-case first --result pass",
            "lava-test-case speed --result pass --measurement 12.5 --units MB/s",
            "lava-test-case broken --shell false",
            "echo done"]


@pytest.mark.timeout(60)
def test_a_job_passes_with_its_results_and_its_whole_log(make_lab):
    lab = make_lab()
    lab.start_worker()
    job_id = lab.submit(job_yaml(_hello_steps()), fork=True)
    job = lab.finished(job_id)
    assert (job["health"], job["device"], job["worker"]) == ("Complete", "host01", WORKER)
    assert job["start_time"] and job["end_time"] and not job["failure_comment"]
    results = lab.results(job_id, fork=True)
    assert results[("0_smoke", "first")]["result"] == "pass"
    assert results[("0_smoke", "speed")]["measurement"] in ("12.5", 12.5)
    assert results[("0_smoke", "speed")]["unit"] == "MB/s"
    assert results[("0_smoke", "broken")]["result"] == "fail"
    assert results[("lava", "0_smoke")]["result"] == "pass"
    assert results[("lava", "job")]["result"] == "pass"
    targets = lab.targets(job_id, fork=True)
    assert targets[0] == "start" and targets[-1] == "done"
    assert [t for t in targets if t.startswith("line ")] == ["line %d" % n
                                                            for n in range(1, 1001)]
    lines = lab.log_lines(job_id)
    assert lines[-1]["lvl"] == "results" and lines[-1]["msg"]["case"] == "job"
    # After END_OK the worker's directory of the job is gone, the job remembered as done.
    wait_until(lambda: acknowledged(lab.work_dir()), what="job acknowledged")
    assert os.listdir(lab.work_dir() / "tmp") == []
    devices = json.loads(lab.quick("devices", "list", "--json"))
    assert [(d["state"], d["health"]) for d in devices] == [("Idle", "Good")]


@pytest.mark.timeout(60)
def test_cancel_during_a_running_step_leaves_nothing_behind(make_lab):
    lab = make_lab()
    lab.start_worker()
    job_id = lab.submit(job_yaml(["echo started", "sleep 600.25", "echo never"]))
    lab.wait_job(job_id, lambda j: j["state"] == "Running", what="Running")
    wait_until(lambda: _live("sleep 600.25"), timeout=20, what="the step running")
    runner_pid = table_rows(lab.work_dir())[job_id][0]
    sent = time.monotonic()
    assert "Canceling" in lab.cli("jobs", "cancel", str(job_id))
    job = lab.finished(job_id, timeout=20)
    assert time.monotonic() - sent < 10
    assert job["health"] == "Canceled"
    assert "never" not in lab.targets(job_id)
    wait_until(lambda: not _live("sleep 600.25") and not [
        p for p in procs.session_members(runner_pid) if not _zombie(p)],
        timeout=10, what="no step or runner process left")
    # The worker serves on.
    again = lab.submit(job_yaml(["lava-test-case after-cancel --result pass"]))
    assert lab.finished(again)["health"] == "Complete"


def _zombie(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.timeout(60)
def test_worker_killed_and_restarted_mid_job_still_completes_it(make_lab):
    lab = make_lab()
    flag = lab.tmp_path / "go"
    worker = lab.start_worker()
    job_id = lab.submit(job_yaml(["echo running", wait_for_file(flag),
                                  "lava-test-case after-restart --result pass"]))
    lab.wait_job(job_id, lambda j: j["state"] == "Running", what="Running")
    wait_until(lambda: job_id in table_rows(lab.work_dir()), what="job row")
    runner_pid = table_rows(lab.work_dir())[job_id][0]
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    assert procs.is_runner(runner_pid, job_id)  # the runner keeps running
    lab.start_worker()
    wait_until(lambda: "HELLO_OK received" in lab.worker_log().split(
        "worker %s: master" % WORKER)[-1], what="restarted worker connected")
    flag.touch()
    job = lab.finished(job_id)
    assert job["health"] == "Complete", job
    assert lab.results(job_id)[("0_smoke", "after-restart")]["result"] == "pass"
    # Not its child: the restarted worker saw the end at a job check.
    assert "job %d ended: runner ended: END sent" % job_id in lab.worker_log().split(
        "worker %s: master" % WORKER)[-1]
    # One runner only: its start line is in the log once.
    starts = [l for l in lab.log_lines(job_id)
              if l["lvl"] == "info" and str(l["msg"]).startswith("lavacore-run ")]
    assert len(starts) == 1
    wait_until(lambda: acknowledged(lab.work_dir()), what="job acknowledged")


@pytest.mark.timeout(60)
def test_job_timeout_ends_incomplete_with_a_comment_naming_it(make_lab):
    lab = make_lab()
    lab.start_worker()
    job_id = lab.submit(job_yaml(["echo sleeping", "sleep 600.5"], job_seconds=2))
    job = lab.finished(job_id, timeout=30)
    assert job["health"] == "Incomplete"
    assert "timed out after 2 seconds" in job["failure_comment"], job
    wait_until(lambda: not _live("sleep 600.5"), timeout=10, what="the step killed")
    devices = json.loads(lab.quick("devices", "list", "--json"))
    assert devices[0]["state"] == "Idle"


CRASHING_RUNNER = """#!/bin/sh
echo "crashy-runner: cannot open the board's serial console" >&2
exit 1
"""


@pytest.mark.timeout(90)
def test_bad_input_fails_only_its_own_job(make_lab):
    # Four host devices on one worker, so the bad jobs run side by side, and a device of
    # a type whose runner crashes at once.
    lab = make_lab(devices=host_devices(4) + (("crashy01", "crashy", WORKER, ()),
                                              ("falsy01", "falsy", WORKER, ())))
    crashy = lab.tmp_path / "crashy-runner"
    crashy.write_text(CRASHING_RUNNER)
    crashy.chmod(0o755)
    lab.start_worker(extra=["--runner-for", "crashy=%s" % crashy,
                            "--runner-for", "falsy=/bin/false"])
    line = "0123456789" * 9 + "abcdefghi"  # 99 characters + newline: 50,000 lines in 5 MB
    jobs = {
        "failing": lab.submit(job_yaml(["false", "sh -c 'exit 3'",
                                        "lava-test-case explicit --result fail",
                                        "lava-test-case shelled --shell false",
                                        "echo still running"])),
        "garbage": lab.submit(job_yaml([
            "head -c 200000 /dev/urandom; echo",
            r"printf 'nul\000byte \377\376 bad utf8\n'",
            "lava-test-case after-garbage --result pass"])),
        "flood": lab.submit(job_yaml(["yes %s | head -c 5000000" % line,
                                      "lava-test-case after-flood --result pass"])),
        "crash": lab.submit(job_yaml(["true"], device_type="crashy")),
        "silent-crash": lab.submit(job_yaml(["true"], device_type="falsy")),
    }
    # While the flood is being taken in, the master keeps serving: a small job submitted
    # now runs and ends on the remaining device.
    lab.wait_job(jobs["flood"], lambda j: j["state"] == "Running", what="flood Running")
    began = time.monotonic()
    quick = lab.submit(job_yaml(["lava-test-case quick --result pass"]))
    assert lab.finished(quick)["health"] == "Complete"
    quick_seconds = time.monotonic() - began

    failing = lab.finished(jobs["failing"])
    assert failing["health"] == "Complete"
    results = lab.results(jobs["failing"])
    assert results[("0_smoke", "explicit")]["result"] == "fail"
    assert results[("0_smoke", "shelled")]["result"] == "fail"
    assert "still running" in lab.targets(jobs["failing"])

    garbage = lab.finished(jobs["garbage"])
    assert garbage["health"] == "Complete"
    assert lab.results(jobs["garbage"])[("0_smoke", "after-garbage")]["result"] == "pass"
    assert "nul\x00byte \ufffd\ufffd bad utf8" in lab.targets(jobs["garbage"])

    crash = lab.finished(jobs["crash"])
    assert crash["health"] == "Incomplete"
    assert "crashy-runner: cannot open the board's serial console" in crash["failure_comment"]
    silent = lab.finished(jobs["silent-crash"])
    assert silent["health"] == "Incomplete"
    assert "runner crashed (no description)" in silent["failure_comment"]

    flood = lab.finished(jobs["flood"], timeout=60)
    assert flood["health"] == "Complete", flood
    assert lab.results(jobs["flood"])[("0_smoke", "after-flood")]["result"] == "pass"
    with open(lab.output_yaml(jobs["flood"]), encoding="utf-8") as f:
        flood_lines = sum(1 for text in f if line in text)
    assert flood_lines == 5000000 // 100
    assert quick_seconds < 20, "a small job took %.1f s during the flood" % quick_seconds

    # The worker keeps serving and every device is usable again.
    after = lab.submit(job_yaml(["lava-test-case next --result pass"]))
    assert lab.finished(after)["health"] == "Complete"
    devices = json.loads(lab.quick("devices", "list", "--json"))
    assert {d["state"] for d in devices} == {"Idle"}
    assert lab.workers[WORKER].poll() is None


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB filesystem for the worker's work dir (a tmpfs: needs root), or None."""
    path = tmp_path / "small"
    with small_filesystem(path) as mounted:
        yield path if mounted else None


@pytest.mark.timeout(60)
def test_a_full_or_unwritable_work_dir_fails_the_job_and_the_worker_carries_on(
        make_lab, small_disk, tmp_path):
    lab = make_lab()
    work = (small_disk or tmp_path) / "work"
    lab.start_worker(work_dir=work)
    first = lab.submit(job_yaml(["lava-test-case before --result pass"]))
    assert lab.finished(first)["health"] == "Complete"

    if small_disk is not None:
        # A job that fills the disk itself: its step fails, the job still ends.
        filling = lab.submit(job_yaml([
            "lava-test-case fill --shell 'head -c 4000000 /dev/zero > big'",
            "rm -f big", "lava-test-case after-fill --result pass"]))
        job = lab.finished(filling)
        assert job["health"] == "Complete", job
        results = lab.results(filling)
        assert results[("0_smoke", "fill")]["result"] == "fail"
        assert results[("0_smoke", "after-fill")]["result"] == "pass"

    # A job that arrives while the disk is full (or, without root for a small disk, the
    # job dirs' parent is read-only) cannot even get its files written.
    wait_until(lambda: acknowledged(work), what="previous job acknowledged")
    if small_disk is not None:
        filler = fill_filesystem(work)
        expected = "No space left on device"
    else:
        os.chmod(work / "tmp", 0o555)
        expected = "Permission denied"
    blocked = lab.submit(job_yaml(["true"]))
    job = lab.finished(blocked)
    assert job["health"] == "Incomplete"
    assert "cannot start the runner of job %d" % blocked in job["failure_comment"]
    assert expected in job["failure_comment"]
    assert str(work / "tmp") in job["failure_comment"]
    assert lab.workers[WORKER].poll() is None

    # Room again: the worker serves on, and nothing it tracked was lost.
    if small_disk is not None:
        os.unlink(filler)
    else:
        os.chmod(work / "tmp", 0o755)
    after = lab.submit(job_yaml(["lava-test-case after-full --result pass"]))
    assert lab.finished(after)["health"] == "Complete"
    wait_until(lambda: acknowledged(work), what="job table written again")
    assert lab.workers[WORKER].poll() is None


@pytest.mark.timeout(60)
def test_readme_single_machine_flow(tmp_path, master_process):
    """README: `lavacore -c config.toml`, `submit examples/hello.yaml`, `jobs logs --follow`,
    on copies of the shipped files with only the ports (OS-chosen) and the API changed."""
    for name in ("etc", "examples"):
        shutil.copytree(os.path.join(ROOT, name), tmp_path / name)
    with open(os.path.join(ROOT, "config.toml")) as f:
        text = f.read()
    for key in ("listen", "logs", "events"):
        text, count = _set_port(text, key)
        assert count == 1, key
    text = text.replace('[api]\n', '[api]\nenabled = false\n', 1)
    config = tmp_path / "config.toml"
    config.write_text(text)
    master = master_process(str(config))

    def lavacore(*args, timeout=30):
        # As the README types it, in the directory of the copied files.
        return subprocess.run([PY, "-m", "lavacore.cli", "-c", "config.toml", *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=timeout)

    submitted = lavacore("submit", "examples/hello.yaml")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split()[0]
    followed = lavacore("jobs", "logs", job_id, "--follow", timeout=45)
    assert followed.returncode == 0, followed.stderr
    out = followed.stdout
    assert "hello from " in out
    assert "start: 1 lava-test-shell" in out
    for case in ("uname", "tmp-writable", "root-fs-usage", "always-passes"):
        assert '"case": "%s", "result": "pass"' % case in out, case
    assert '"definition": "lava", "case": "job", "result": "pass"' in out
    assert followed.stderr.strip().endswith("job %s: Finished, Complete" % job_id), \
        followed.stderr + master.log_text()[-2000:]


def _set_port(text, key):
    import re

    return re.subn(r'(?m)^%s = "tcp://\*:\d+"' % key, '%s = "tcp://127.0.0.1:*"' % key, text)
