"""LAVA's current lava-run as lavacore's runner (lavacore/worker/lavarun.py), without qemu.

* The bridge alone, between a stand-in lava-run that speaks lava-run's HTTP log protocol
  and a scripted master's log socket: hostile posts (bad token, resent and lost records,
  records that are not log lines, nesting, oversized bodies, a connection flood) and its
  forwarding capacity.
* Real master and ``lavacore worker --lava-run-for TYPE`` processes with Debian's
  lava-run, on a device type whose jobs run user commands on the worker (lava-run's
  ``command`` action): a chatty job's every line, a job lava-run refuses, lava-run killed
  mid-job, and the master killed during a lava-run job.

Nothing here sleeps for seconds: every wait is on a condition, with a bound.
"""

import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import crashutil  # noqa: E402
from conftest import ROOT  # noqa: E402
from lavacore.worker import jobdir, lavarun, procs, proctree  # noqa: E402
from lavacore.worker.jobtable import FINISHED  # noqa: E402
from lavacore.worker.slave import Worker  # noqa: E402
from test_e2e import WORKER, Lab  # noqa: E402
from workerutil import (PY, FakeMaster, process_gone, start_frames, start_worker,  # noqa: E402
                        stop_process, table_rows, wait_until)

LAVA_RUN = shutil.which("lava-run")
needs_lava_run = pytest.mark.skipif(
    LAVA_RUN is None or os.geteuid() != 0,
    reason="needs Debian's lava-dispatcher (lava-run) and root (see .ci/run)")

COMMAND_TYPE = "lavarun-cmd"
# A device whose jobs run commands on the worker host: lava-run's `command` action runs the
# device's user commands and logs each line they print.
COMMAND_TEMPLATE = """{%% extends 'base.jinja2' %%}
{%% set device_type = '%(type)s' %%}
{%% block body %%}
hostname: {{ hostname | default('cmd01') }}
commands:
  users:
%(commands)s
actions:
  deploy:
    methods: {}
  boot:
    methods: {}
{%% endblock %%}
{%% block constants %%}
  failure_retry: 1
  boot_retry: 1
{%% endblock %%}
"""


def command_job(name, job_seconds=120):
    return yaml.safe_dump({
        "device_type": COMMAND_TYPE, "job_name": "lava-run command %s" % name,
        "priority": "medium", "visibility": "public",
        "timeouts": {"job": {"seconds": job_seconds}, "action": {"seconds": job_seconds}},
        "actions": [{"command": {"name": name}}]}, sort_keys=False)


def prepare_etc(tmp_path, commands, worker=WORKER, env=None):
    """tmp_path/etc (the shipped one if there is none yet) with the command device type, the
    worker's
    dispatcher config (a tmp dir prefix no other run shares) and ``env`` overrides.
    Returns the prefix."""
    etc = tmp_path / "etc"
    if not etc.exists():
        shutil.copytree(os.path.join(ROOT, "etc"), etc)
    text = "\n".join("    %s:\n      do: %s" % (name, json.dumps(do))
                     for name, do in commands.items())
    (etc / "dispatcher-config" / "device-types" / ("%s.jinja2" % COMMAND_TYPE)).write_text(
        COMMAND_TEMPLATE % {"type": COMMAND_TYPE, "commands": text})
    prefix = "lavacore-test-%d-%d-" % (os.getpid(), time.monotonic_ns())
    (etc / "dispatcher.d").mkdir(exist_ok=True)
    (etc / "dispatcher.d" / ("%s.yaml" % worker)).write_text("prefix: %s\n" % prefix)
    if env:
        data = yaml.safe_load((etc / "env.yaml").read_text()) or {}
        data.setdefault("overrides", {}).update(env)
        (etc / "env.yaml").write_text(yaml.safe_dump(data))
    return prefix


def hold_script(tmp_path, flag):
    """A command printing 500 lines, waiting (bounded) for ``flag``, printing 500 more."""
    path = tmp_path / "hold.sh"
    path.write_text(textwrap.dedent("""\
        seq -f 'before %%g' 1 500
        i=0
        while [ ! -e %s ] && [ $i -lt 3000 ]; do sleep 0.02; i=$((i+1)); done
        seq -f 'after %%g' 1 500
        """ % flag))
    return "sh %s" % path


def stored(lab, job_id):
    """The stored log lines of a job (output.yaml), as text ("" before there are any)."""
    try:
        path = lab.output_yaml(job_id)
    except AssertionError:
        return ""
    if path is None or not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def bridge_pid(work_dir, job_id):
    rows = table_rows(work_dir)
    return rows[job_id][0] if job_id in rows else 0


def lava_run_of(bridge):
    """The pid of the lava-run a bridge started (its child of that name), or None."""
    for pid, comm in proctree.children_map().get(bridge, ()):
        if comm.startswith("lava-run"):
            return pid
    return None


# -- the bridge alone -----------------------------------------------------------------------

STAND_IN = r'''
import http.client, json, socket, sys, time, urllib.parse

args = sys.argv[1:]
def opt(name):
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
url = urllib.parse.urlsplit(opt("--url"))
token, job, out = opt("--token"), opt("--job-id"), opt("--output-dir")
path = "/scheduler/internal/v1/jobs/%s/logs/" % job
answers = []

def line(lvl, msg):
    return json.dumps({"dt": "2024-01-01T00:00:00", "lvl": lvl, "msg": msg})

def request(method, body=b"", token=token, path=path, headers=None):
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    all_headers = {"LAVA-Token": token,
                   "Content-Type": "application/x-www-form-urlencoded"}
    all_headers.update(headers or {})
    conn.request(method, path, body=body, headers=all_headers)
    reply = conn.getresponse()
    data = reply.read()
    conn.close()
    return [reply.status, json.loads(data) if data else None]

def post(records, index, **kwargs):
    body = urllib.parse.urlencode({"lines": "- " + "\n- ".join(records), "index": index})
    return request("POST", body.encode(), **kwargs)

def raw(text):
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    sock.sendall(text.encode())
    data = sock.recv(4096)
    sock.close()
    return data.split(b" ")[1].decode() if data else "closed"

MODE = sys.argv[0].rsplit("-", 1)[-1].split(".")[0]
if MODE == "blast":
    # As fast as lava-run could post: 100 posts of 1000 records.
    started = time.monotonic()
    for n in range(100):
        records = [line("target", "blast line %d" % (n * 1000 + i)) for i in range(1000)]
        assert post(records, n * 1000) == [200, {"line_count": 1000}]
    answers.append(time.monotonic() - started)
    post([line("results", {"definition": "lava", "case": "job", "result": "pass"})],
         100000)
elif MODE == "stubborn":
    # Deaf to SIGTERM, with a child in a session of its own (as pexpect starts qemu).
    import signal, subprocess
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "600.75"], start_new_session=True)
    with open(out + "/child.pid", "w") as f:
        f.write(str(child.pid))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)
else:
    answers.append(post([line("info", "one"), line("info", "two")], 0))
    answers.append(post([line("info", "one"), line("info", "two")], 0))     # resent
    answers.append(post([line("info", "two"), line("info", "three")], 1))   # half resent
    answers.append(post([line("info", "x")], 3, token="not-the-token"))
    answers.append(post([line("info", "x")], 3, path="/scheduler/internal/v1/jobs/999/logs/"))
    answers.append(request("GET"))
    answers.append(post([
        "not: [a, log, line",
        '{"dt": "x", "lvl": "info", "msg": ' + "[" * 20000 + "]" * 20000 + "}",
        json.dumps({"dt": "x", "msg": "no level"}),
        line("results", {"definition": "hostile", "case": "no-result"}),
        line("marker", {"case": "ok", "type": "start_test_case"}),
        line("info", {"lvl": "results", "nested": True}),
        line("results", {"definition": "hostile", "case": "ok", "result": "pass"}),
        line("info", "y" * (1024 * 1024 + 10)),
    ], 3))
    answers.append(post([line("info", "after a gap")], 20))
    count = 34000
    big = "lines=" + "%0A".join("-+" + "z" * 1000 for _ in range(count)) + "&index=21"
    answers.append(request("POST", big.encode()))
    answers.append(raw("POST %s HTTP/1.1\r\nHost: x\r\nLAVA-Token: %s\r\n\r\n" % (path, token)))
    idle = [socket.create_connection((url.hostname, url.port)) for _ in range(8)]
    answers.append(raw("POST %s HTTP/1.1\r\nHost: x\r\n\r\n" % path))
    for sock in idle:
        sock.close()
    final = [line("results", {"definition": "lava", "case": "job", "result": "pass"})]
    deadline = time.monotonic() + 10
    while True:  # lava-run posts again what was not answered
        try:
            answers.append(post(final, 21 + count))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
with open(out + "/stand-in.json", "w") as f:
    json.dump(answers, f)
'''


def run_bridge(tmp_path, master, mode, job_id=7, extra=()):
    """The bridge as the worker starts it, with a stand-in lava-run; returns (process,
    job dir)."""
    job_dir = tmp_path / ("job%d" % job_id)
    job_dir.mkdir()
    for name in ("job.yaml", "device.yaml", "dispatcher.yaml"):
        (job_dir / name).write_text("device_type: stand-in\n")
    script = tmp_path / ("stand-in-%s.py" % mode)
    script.write_text(STAND_IN)
    argv = [PY, "-m", "lavacore.worker.lavarun", "--lava-run=%s %s" % (PY, script),
            *extra] + jobdir.runner_argv([], job_id, str(job_dir), master.logs_url, False)
    with open(job_dir / "stdout", "wb") as out, open(job_dir / "stderr", "wb") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, start_new_session=True)
    return proc, job_dir


def run_to_end(master, proc, job_id, timeout=60):
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the bridge did not end within %s s" % timeout)
        master.pump(0.05)
    master.wait_job_result(job_id, timeout=10)
    return [(line["lvl"], line["msg"]) for line in master.lines[str(job_id)]]


@pytest.fixture
def labs(tmp_path, master_process):
    """Labs of test_e2e (a master process, worker processes, the CLI), closed at the end."""
    made = []

    def make(**kwargs):
        lab = Lab(tmp_path, master_process, **kwargs)
        made.append(lab)
        return lab

    yield make
    for lab in made:
        lab.close()


@pytest.fixture
def fake_master():
    master = FakeMaster()
    yield master
    master.close()


@pytest.mark.timeout(60)
def test_bridge_takes_lava_runs_posts_and_nothing_else(tmp_path, fake_master):
    proc, job_dir = run_bridge(tmp_path, fake_master, "hostile")
    lines = run_to_end(fake_master, proc, 7)
    assert proc.returncode == 0, (job_dir / "stderr").read_text()
    answers = json.loads((job_dir / "stand-in.json").read_text())
    assert answers[:3] == [[200, {"line_count": 2}]] * 3
    assert [a[0] for a in answers[3:6]] == [403, 404, 405]
    assert answers[6] == [200, {"line_count": 8}]
    assert answers[7] == [200, {"line_count": 1}]
    assert answers[8] == [200, {"line_count": 34000}]     # read and dropped, counted
    assert answers[9] == "411"                            # no Content-Length
    assert answers[10] == "closed"                        # a 9th connection
    assert answers[11] == [200, {"line_count": 1}]

    texts = [msg if isinstance(msg, str) else json.dumps(msg) for _, msg in lines]
    assert lines[0][1].startswith("lavacore-lava-run ")
    # Each record once, in order, whatever was resent.
    assert [m for lvl, m in lines if lvl == "info" and m in ("one", "two", "three")] == [
        "one", "two", "three"]
    expected = [
        ("warning", "lava-run sent a record that is not a log line"),
        ("warning", "nested too deep"),
        ("warning", "not a log mapping with 'lvl'"),
        ("warning", "a results record without case and result"),
        ("info", '"nested": true'),
        ("results", '"case": "ok"'),
        ("warning", "characters dropped (more than 1048576)"),
        ("warning", "9 log record(s) of lava-run were lost"),
        ("info", "after a gap"),
        ("warning", "dropped a log post of lava-run"),
    ]
    body = [(lvl, text) for (lvl, _), text in zip(lines, texts)][4:4 + len(expected)]
    for (lvl, text), (want_lvl, want) in zip(body, expected):
        assert lvl == want_lvl and want in text, (lvl, text[:200], want)
    assert not any(lvl == "marker" for lvl, _ in lines)
    refused = [t for t in texts if "refused requests" in t]
    assert refused and "invalid token (1)" in refused[0] and "unknown path (1)" in refused[0]
    assert lines[-1] == ("results", {"definition": "lava", "case": "job", "result": "pass"})
    # The copy the worker sends with END counts as the master counts.
    info = jobdir.log_info(str(job_dir))
    assert info.lines == len(lines)
    assert info.results == sum(1 for lvl, m in lines if lvl == "results"
                               and isinstance(m, dict) and "result" in m) == 2


@pytest.mark.timeout(120)
def test_bridge_forwarding_capacity(tmp_path, fake_master):
    """What the bridge forwards when lava-run posts as fast as it can (the numbers are
    printed: python -m pytest -s)."""
    began = time.monotonic()
    proc, job_dir = run_bridge(tmp_path, fake_master, "blast")
    lines = run_to_end(fake_master, proc, 7, timeout=100)
    elapsed = time.monotonic() - began
    assert proc.returncode == 0, (job_dir / "stderr").read_text()
    blast = [m for lvl, m in lines if lvl == "target"]
    assert blast == ["blast line %d" % n for n in range(100000)]
    posting = json.loads((job_dir / "stand-in.json").read_text())[0]
    cpu = float(re.search(r"forwarded with ([0-9.]+) s of CPU",
                          [m for lvl, m in lines if lvl == "debug"][-1]).group(1))
    print("\nbridge capacity: 100000 records in %.2f s of posting (%.0f lines/s), %.1f s"
          " end to end; bridge CPU %.2f s (%.1f us a line)"
          % (posting, 100000 / posting, elapsed, cpu, cpu / 100000 * 1e6))


def test_a_missing_lava_run_fails_the_job_saying_so(tmp_path, fake_master):
    job_dir = tmp_path / "job3"
    job_dir.mkdir()
    for name in ("job.yaml", "device.yaml", "dispatcher.yaml"):
        (job_dir / name).write_text("device_type: qemu\n")
    argv = [PY, "-m", "lavacore.worker.lavarun", "--lava-run=/nonexistent/lava-run"] + \
        jobdir.runner_argv([], 3, str(job_dir), fake_master.logs_url, False)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "'/nonexistent/lava-run' not found on PATH" in done.stderr
    result = fake_master.wait_job_result(3)
    assert (result["result"], result["error_type"]) == ("fail", "Infrastructure")
    assert "lava-dispatcher" in result["error_msg"]


@pytest.mark.timeout(60)
def test_a_runner_killed_after_cancel_takes_its_whole_tree_along(tmp_path, fake_master):
    """CANCEL's last resort, SIGKILL, reaches what lava-run started in sessions of its
    own: the worker kills the runner's process tree, not only its group and session."""
    script = tmp_path / "stand-in-stubborn.py"
    script.write_text(STAND_IN)
    work = tmp_path / "work"
    worker = start_worker(fake_master, work, extra=[
        "--lava-run-for", "stand-in", "--lava-run", "%s %s" % (PY, script),
        "--cancel-term-again", "0.5", "--cancel-kill", "1"])
    try:
        fake_master.connect("worker1")
        fake_master.send("worker1", start_frames(5, "device_type: stand-in\n",
                                                 device="device_type: stand-in\n"))
        fake_master.expect("START_OK", 5)
        pid_file = work / "tmp" / "5" / "child.pid"
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), timeout=20,
                   what="the stand-in's child", master=fake_master)
        child = int(pid_file.read_text())
        bridge = table_rows(work)[5][0]
        assert procs.is_runner(bridge, 5) and not procs.cmdline(child) == []
        fake_master.send("worker1", ["CANCEL", "5"])
        fake_master.expect("END", 5, timeout=15)
        wait_until(lambda: process_gone(child) and process_gone(bridge), timeout=5,
                   what="the runner's tree gone", master=fake_master)
    finally:
        stop_process(worker)
    log = (tmp_path / "worker1.log").read_text()
    assert re.search(r"job 5: still running [0-9.]+ s after CANCEL: SIGKILL sent \(\d+"
                     r" process\(es\) of its session, [1-9]\d* below it\)", log), log[-2000:]


def test_the_worker_picks_lava_run_for_its_device_types(tmp_path):
    worker = Worker("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "w1", str(tmp_path),
                    runners={"bbb": "lava-run"}, lava_run_for=["*"],
                    lava_run="nice lava-run")
    # Found with the worker's PATH (a job's env may change it).
    bridge = ["lavacore-lava-run", "--lava-run=%s lava-run" % shutil.which("nice")]
    assert worker.runner_for("qemu") == bridge
    assert worker.runner_for("host") == ["lavacore-run"]       # the built-in runner's
    assert worker.runner_for("bbb") == ["lava-run"]             # the v3 era lava-run
    assert worker.runner_for(None) == ["lavacore-run"]
    only = Worker("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "w1", str(tmp_path),
                  lava_run_for=["qemu"])
    assert only.runner_for("qemu") == ["lavacore-lava-run", "--lava-run=%s" % (
        shutil.which("lava-run") or "lava-run")]
    assert only.runner_for("bbb") == ["lavacore-run"]
    with pytest.raises(ValueError):
        Worker("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "w1", str(tmp_path),
               lava_run_for=[""])


# -- real master, worker and lava-run -----------------------------------------------------

def command_lab(labs, tmp_path, commands, worker_extra=(), env=None):
    lab = labs(devices=(("cmd01", COMMAND_TYPE, WORKER, ()),))
    # After the lab's config: it gives unknown device types a test template. The master
    # reads templates and worker files at each START.
    prefix = prepare_etc(tmp_path, commands, env=env)
    lab.start_worker(extra=["--lava-run-for", COMMAND_TYPE, *worker_extra])
    return lab, prefix


def _cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@needs_lava_run
@pytest.mark.timeout(120)
def test_a_chatty_lava_run_job_reaches_the_master_whole(labs, tmp_path):
    count = 20000
    lab, _ = command_lab(labs, tmp_path, {"chatty": "seq -f 'chatty %%g' 1 %d" % count})
    worker = lab.workers[WORKER]
    wait_until(lambda: "HELLO_OK received" in lab.worker_log(), what="worker connected")
    cpu_before = _cpu_seconds(worker.pid)   # its start-up left out
    job_id = lab.submit(command_job("chatty"))
    job = lab.finished(job_id, timeout=90)
    worker_cpu = _cpu_seconds(worker.pid) - cpu_before
    assert job["health"] == "Complete", job
    lines = lab.log_lines(job_id)
    chatty = [line for line in lines if str(line["msg"]).startswith(">> chatty ")]
    assert [line["msg"] for line in chatty] == [">> chatty %d\r" % n
                                                for n in range(1, count + 1)]
    results = lab.results(job_id)
    assert results[("lava", "validate")]["result"] == "pass"
    assert results[("lava", "job")]["result"] == "pass"
    assert lines[-1]["lvl"] == "results" and lines[-1]["msg"]["case"] == "job"
    # Rates, from lava-run's own timestamps of the first and last line of the command.
    first, last = (datetime.datetime.fromisoformat(chatty[i]["dt"]).timestamp()
                   for i in (0, -1))
    ended = [line["msg"] for line in lines if line["lvl"] == "debug"
             and str(line["msg"]).startswith("lavacore-lava-run: lava-run ended")][0]
    bridge_cpu = float(re.search(r"with ([0-9.]+) s of CPU", ended).group(1))
    print("\nchatty lava-run job: %d lines in %.2f s (%.0f lines/s as lava-run logged"
          " them), %d lines stored; bridge CPU %.2f s (%.1f us a line), worker CPU %.2f s"
          " (%.2f us a line)" % (count, last - first, count / max(last - first, 1e-6),
                                 len(lines), bridge_cpu, bridge_cpu / len(lines) * 1e6,
                                 worker_cpu, worker_cpu / len(lines) * 1e6))


@needs_lava_run
@pytest.mark.timeout(90)
def test_a_job_lava_run_refuses_ends_incomplete_with_its_error(labs, tmp_path):
    lab, _ = command_lab(labs, tmp_path, {"chatty": "true"})
    job_id = lab.submit(command_job("no-such-command"))
    job = lab.finished(job_id, timeout=60)
    assert job["health"] == "Incomplete"
    assert job["failure_comment"].startswith("Job: Invalid job data:"), job
    assert "Unknown user command 'no-such-command'" in job["failure_comment"]
    result = lab.results(job_id)[("lava", "job")]
    assert result["result"] == "fail"
    # The worker serves on: a good job on the same device passes.
    again = lab.submit(command_job("chatty"))
    assert lab.finished(again, timeout=60)["health"] == "Complete"


@needs_lava_run
@pytest.mark.timeout(90)
def test_lava_run_killed_mid_job_ends_it_incomplete_and_leaves_nothing(labs, tmp_path):
    flag = tmp_path / "go"
    lab, _ = command_lab(labs, tmp_path, {"hold": hold_script(tmp_path, flag)})
    job_id = lab.submit(command_job("hold"))
    wait_until(lambda: ">> before 500" in stored(lab, job_id), timeout=60,
               what="the command running")
    bridge = bridge_pid(lab.work_dir(), job_id)
    lava_run = lava_run_of(bridge)
    below = [pid for pid, _ in proctree.descendants(bridge)]
    assert lava_run and len(below) >= 3  # lava-run, its log sender, the command's shell
    os.kill(lava_run, signal.SIGKILL)
    job = lab.finished(job_id, timeout=30)
    assert job["health"] == "Incomplete"
    assert job["failure_comment"].startswith(
        "Infrastructure: lava-run was killed by SIGKILL before it sent the job's result"), job
    wait_until(lambda: all(procs.cmdline(pid) == [] for pid in below + [bridge]),
               timeout=10, what="lava-run's processes gone")
    assert "after 1" not in stored(lab, job_id)
    device = json.loads(lab.quick("devices", "list", "--json"))[0]
    assert device["state"] == "Idle"


@needs_lava_run
@pytest.mark.timeout(90)
def test_worker_restarted_during_a_lava_run_job_keeps_tracking_it(labs, tmp_path):
    flag = tmp_path / "go"
    lab, _ = command_lab(labs, tmp_path, {"hold": hold_script(tmp_path, flag)})
    job_id = lab.submit(command_job("hold"))
    wait_until(lambda: ">> before 500" in stored(lab, job_id), timeout=60,
               what="the command running")
    bridge = bridge_pid(lab.work_dir(), job_id)
    worker = lab.workers[WORKER]
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    assert procs.is_runner(bridge, job_id)   # the job runs on without its worker
    lab.start_worker(extra=["--lava-run-for", COMMAND_TYPE])
    wait_until(lambda: "HELLO_OK received" in lab.worker_log().split(
        "worker %s: master" % WORKER)[-1], what="restarted worker connected")
    flag.touch()
    job = lab.finished(job_id, timeout=60)
    assert job["health"] == "Complete", job
    text = stored(lab, job_id)
    assert re.findall(r">> after (\d+)", text) == [str(n) for n in range(1, 501)]
    assert text.count("runs LAVA's lava-run") == 1   # one bridge, one lava-run


@needs_lava_run
@pytest.mark.timeout(120)
def test_master_killed_during_a_lava_run_job_loses_nothing(tmp_path, monkeypatch):
    flag = tmp_path / "go"
    # CrashLab makes host devices; this lab has one device of the command type.
    monkeypatch.setattr(crashutil, "host_devices", lambda count, workers: (
        ("cmd01", COMMAND_TYPE, workers[0], ()),))
    lab = crashutil.CrashLab(tmp_path)
    try:
        prepare_etc(tmp_path, {"hold": hold_script(tmp_path, flag)})
        lab.start_worker(WORKER, extra=["--lava-run-for", COMMAND_TYPE])
        job_id = lab.submit(command_job("hold"))[0]
        wait_until(lambda: lab.output_yaml(job_id) and ">> before 500" in open(
            lab.output_yaml(job_id), errors="replace").read(), timeout=60,
            what="the command running")
        lab.kill_master()
        flag.touch()
        # lava-run ends while the master is away: its lines wait in the bridge's copy.
        wait_until(lambda: lab.rows(WORKER).get(job_id, (0, 0))[1] == FINISHED,
                   timeout=60, what="the runner ended")
        lab.start_master()
        wait_until(lambda: lab.job(job_id)["state"] == "Finished", timeout=60,
                   what="job Finished")
        job = lab.job(job_id)
        assert job["health"] == "Complete", (job, lab.master_logs()[-3000:])
        with open(lab.output_yaml(job_id), encoding="utf-8") as f:
            text = f.read()
        for word in ("before", "after"):
            got = re.findall(r">> %s (\d+)" % word, text)
            assert got == [str(n) for n in range(1, 501)], (word, len(got))
        assert ("lava", "job", "pass") in lab.results(job_id)
    finally:
        lab.close()


def test_split_and_check_records():
    assert lavarun._split("- a\n- b\n- c") == ["a", "b", "c"]
    assert lavarun._split("") == []
    assert lavarun._split("- a\nb\n- c") == ["a b", "c"]
    line, lvl, msg = lavarun._checked('{"dt": "x", "lvl": "target", "msg": "hi"}')
    assert (line, lvl, msg) == ('{"dt": "x", "lvl": "target", "msg": "hi"}', "target", "hi")
    # lava-run's own form: YAML with tags, not JSON.
    raw = '{"dt": "x", "lvl": "results", "msg": {"case": "a", "endtc": ! "236", "result": "pass"}}'
    assert lavarun._checked(raw)[0] == raw
    assert lavarun._checked('{"dt": "x", "lvl": "marker", "msg": {}}') is None
    # Other YAML spellings become lavacore's form, so that the copy's count of results
    # lines (jobdir.log_info) is the master's count of test cases.
    line, lvl, _ = lavarun._checked("{dt: x, lvl: results, msg: {case: a, result: pass}}")
    assert lvl == "results" and line.count('"lvl": "results"') == 1
    line, lvl, _ = lavarun._checked("{dt: x, lvl: info, msg: {lvl: results}}")
    assert lvl == "info" and '"lvl": "results"' not in line
    line, lvl, _ = lavarun._checked(
        "{dt: x, lvl: results, msg: {case: a, result: pass, x: {lvl: results}}}")
    assert lvl == "warning" and "results nested in it" in line
