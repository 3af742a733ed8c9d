"""The master's and the worker's logs as an administrator greps them: one line per job
end, cancel, health change and worker coming and going; one line per record whatever a
peer sends; [logging] and --log-file/--log-level; a log file that logrotate moves or
truncates, or that SIGHUP reopens."""

import logging
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, job_yaml, run_cli, write_config
from lavacore import logsetup
from lavacore.logformat import result_line
from lavacore.states import DeviceHealth, JobState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workerutil import wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def test_a_record_is_one_bounded_line_whatever_its_text():
    formatter = logsetup.OneLineFormatter("%(levelname)s %(message)s")
    hostile = "boom\n2026-01-01 00:00:00 CRITICAL forged line\r\x1b[2J\u2028end\ttab"
    record = logging.LogRecord("lavacore.x", logging.ERROR, __file__, 1, "job 3: %s",
                               (hostile,), None)
    text = formatter.format(record)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text
    assert text == ("ERROR job 3: boom\\n2026-01-01 00:00:00 CRITICAL forged line\\r"
                    "\\x1b[2J\\u2028end\ttab")
    long = logging.LogRecord("lavacore.x", logging.INFO, __file__, 1, "x" * 20000, None,
                             None)
    text = formatter.format(long)
    assert len(text) < logsetup.MAX_MESSAGE + 100
    assert text.endswith("... (%d more characters)" % (20000 - logsetup.MAX_MESSAGE))


def test_job_ends_cancels_health_changes_and_workers_are_one_line_each(lab, caplog):
    caplog.set_level(logging.INFO)
    clock = lab.clock()
    lab = lab(clock=clock, master={"worker_timeout": 60},
              devices=(("qemu01", "qemu", "worker1", ()),))
    worker = lab.worker()
    first = lab.submit(user="alice")
    worker.expect("START")
    worker.send("START_OK", first)
    worker.log(first, result_line("lava", "job", "fail", error_type="Infrastructure",
                                  error_msg="board did\nnot boot"))
    worker.end(first)
    worker.expect("END_OK")
    lab.wait_for(lambda: lab.job(first).state == JobState.FINISHED)
    lab.wait_for(lambda: lab.storage.get_device("qemu01").health == DeviceHealth.GOOD)
    second = lab.submit(user="alice")
    worker.expect("START")
    lab.master.flow.cancel(second, username="bob")
    lab.master.flow.set_device_health("qemu01", DeviceHealth.MAINTENANCE, "carol",
                                      "new cable")
    clock.advance(61)
    lab.wait_for(lambda: "worker worker1: Offline" in caplog.text)
    lines = [r.getMessage() for r in caplog.records]
    assert "worker worker1: Online" in lines
    assert "job %d finished: Incomplete (Infrastructure: board did not boot) on qemu01"\
        % first in lines
    assert "device qemu01 health Good -> Unknown by lava-health: job %d ended with an" \
        " infrastructure error" % first in lines
    assert any(line.startswith("device qemu01 health Unknown -> Good by lava-health:"
                               " device type qemu has no health check") for line in lines)
    assert "job %d canceled by bob (it was Scheduled on qemu01)" % second in lines
    assert "device qemu01 health Good -> Maintenance by carol: new cable" in lines
    assert "worker worker1: Offline (silent for more than 60s)" in lines


def _start(config_path, *options, env=None):
    """``lavacore -c CONFIG [options]`` logging to a file: stderr stays empty."""
    return subprocess.Popen([sys.executable, "-m", "lavacore.cli", "-c", config_path,
                             *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, **(env or {})))


def _read(path):
    return open(path).read() if os.path.exists(path) else ""


def test_log_file_level_rotation_and_sighup(tmp_path):
    config_path = write_config(tmp_path, extra='[logging]\nfile = "log/master.log"\n'
                                                'level = "WARNING"\n')
    path = str(tmp_path / "log" / "master.log")
    # --log-level wins over [logging] level; the file is [logging]'s.
    master = _start(config_path, "--log-level", "info")
    try:
        wait_until(lambda: "master started" in _read(path), what="master started")
        # A change made with the command line is in the master's log.
        assert run_cli(config_path, "devices", "set-health", "qemu01", "Bad",
                       "--reason", "dead\nfan", "--user", "dave").returncode == 0
        wait_until(lambda: "device qemu01 health Good -> Bad by dave: dead fan (command"
                           " line, " in _read(path), what="the command line's change")
        # logrotate's default: rename, and the next line goes to a new file.
        os.rename(path, path + ".1")
        assert run_cli(config_path, "devices", "set-health", "qemu01", "Maintenance",
                       "--user", "dave").returncode == 0
        wait_until(lambda: "Bad -> Maintenance" in _read(path), what="a new file")
        assert "Bad -> Maintenance" not in _read(path + ".1")
        # copytruncate: the file is emptied in place; lines go on at its start.
        os.truncate(path, 0)
        assert run_cli(config_path, "devices", "set-health", "qemu01", "Retired",
                       "--user", "dave").returncode == 0
        wait_until(lambda: "Maintenance -> Retired" in _read(path), what="after truncation")
        assert not _read(path).startswith("\0")  # appended at the start, no hole
        # SIGHUP reopens it (a rotation that neither renamed nor truncated).
        os.rename(path, path + ".2")
        master.send_signal(signal.SIGHUP)
        wait_until(lambda: "SIGHUP: reloading" in _read(path), what="reopened on SIGHUP")
        master.send_signal(signal.SIGTERM)
        assert master.wait(30) == 0
        assert master.stderr.read() == ""
    finally:
        if master.poll() is None:
            master.kill()
            master.wait()
    # --log-file wins over [logging] file, and [logging] level applies without
    # --log-level: the INFO lines are left out.
    other = str(tmp_path / "other.log")
    master = _start(config_path, "--log-file", other)
    try:
        wait_until(lambda: os.path.exists(other), what="the --log-file")
        assert run_cli(config_path, "jobs", "list").returncode == 0
        master.send_signal(signal.SIGTERM)
        assert master.wait(30) == 0
    finally:
        if master.poll() is None:
            master.kill()
            master.wait()
    assert "master started" not in _read(other)
    assert "SIGHUP" not in _read(other)


def test_an_unopenable_log_file_is_a_one_line_error(tmp_path):
    config_path = write_config(tmp_path, extra='[logging]\nfile = "/proc/nope/m.log"\n')
    done = run_cli(config_path, "master")
    assert done.returncode == 1
    assert done.stderr.startswith("lavacore: [logging] file: cannot open /proc/nope/m.log:")
    assert len(done.stderr.splitlines()) == 1
    done = run_cli(config_path, "--log-file", "/proc/nope/x.log", "master")
    assert done.stderr.startswith("lavacore: --log-file: cannot open /proc/nope/x.log:")


def test_the_worker_logs_its_jobs_start_and_end_in_its_log_file(tmp_path, master_process):
    config_path = write_config(tmp_path, devices=(("host01", "host", "worker01", ()),))
    master = master_process(config_path)
    log_path = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "lavacore.cli", "worker", "--master", master.controller,
         "--logs", master.logs, "--hostname", "worker01", "--work-dir",
         str(tmp_path / "work"), "--log-file", str(log_path), "--log-level", "info",
         "--hello-retry", "0.2",
         "--job-check", "0.2", "--poll-timeout", "0.5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        definition = tmp_path / "job.yaml"
        definition.write_text(job_yaml("host"))
        job_id = int(run_cli(config_path, "submit", str(definition)).stdout)
        wait_until(lambda: "job %d done" % job_id in _read(log_path), timeout=60,
                   what="job %d done in the worker's log" % job_id)
        text = _read(log_path)
        assert re.search(r"job %d started: runner pid \d+ in " % job_id, text)
        assert re.search(r"job %d ended: runner ended \(exit code 0\): END sent" % job_id,
                         text)
        wait_until(lambda: "job %d finished: Complete on host01" % job_id
                   in master.log_text(), what="the master's line")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        assert worker.stderr.read() == ""
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_the_format_can_be_set_and_is_journal_friendly_by_default(tmp_path, master_process):
    config_path = write_config(tmp_path, extra='[logging]\nformat = "LC %(levelname)s'
                                                ' %(message)s"\n')
    master = master_process(config_path)
    master.stop()
    assert any(line.startswith("LC INFO master started") for line in master.lines)
    # Under systemd (stderr is the journal) the default format has no time: the journal
    # stamps each line itself.
    os.makedirs(tmp_path / "x")
    plain = write_config(tmp_path / "x")
    script = ("import os, sys; st = os.fstat(2); os.environ['JOURNAL_STREAM'] = '%d:%d' %"
              " (st.st_dev, st.st_ino); from lavacore import cli;"
              " sys.exit(cli.main(['-c', sys.argv[1], '--log-level', 'INFO']))")
    proc = subprocess.Popen([sys.executable, "-c", script, plain], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert re.match(r"INFO    lavacore\.\w+: ", first), first
