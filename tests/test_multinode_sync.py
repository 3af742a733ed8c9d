"""MultiNode synchronisation end to end: an in-process master with its coordinator, two
real ``lavacore worker`` processes on two host devices, and the built-in runner running
each role's steps, which call lava-send, lava-wait, lava-wait-all and lava-sync."""

import os
import shutil
import statistics
import subprocess
import sys
import time

import gevent
import pytest
import yaml

from conftest import MasterProcess, run_cli
from crashutil import free_ports
from lavacore import logformat
from lavacore.states import JobHealth, JobState

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTS = (("host01", "host", "worker1", ()), ("host02", "host", "worker2", ()))
LISTEN = '[coordinator]\nlisten = "tcp://127.0.0.1:0"\n'


@pytest.fixture
def group_lab(lab, tmp_path):
    """A master with two host devices on two workers, both running."""
    instance = lab(devices=HOSTS, extra=LISTEN)
    for hostname, *_ in HOSTS:
        path = instance.tmp_path / "etc/dispatcher-config/devices" / (hostname + ".jinja2")
        path.write_text("{%% extends 'host.jinja2' %%}\n{%% set hostname = '%s' %%}\n"
                        % hostname)
    started = []
    for worker in ("worker1", "worker2"):
        log = open(tmp_path / (worker + ".log"), "w")
        started.append(subprocess.Popen(
            [sys.executable, "-m", "lavacore.worker.cli", "--master",
             instance.master.controller.endpoint, "--logs", instance.master.logs.endpoint,
             "--hostname", worker, "--work-dir", str(tmp_path / ("work-" + worker)),
             "--runner", "%s -m lavacore.worker.runner" % sys.executable,
             "--hello-retry", "0.2", "--job-check", "0.2", "--poll-timeout", "0.1"],
            stdout=subprocess.DEVNULL, stderr=log))
        log.close()
    yield instance
    for proc in started:
        proc.terminate()
        proc.wait(10)


def sync_job(steps, group_timeout=60, name="sync"):
    """A group with one host role per entry of ``steps`` ({role: [step, ...]})."""
    data = {
        "job_name": name, "priority": "medium", "visibility": "public",
        "timeouts": {"job": {"minutes": 2}, "action": {"minutes": 2}},
        "protocols": {"lava-multinode": {
            "roles": {role: {"device_type": "host", "count": 1} for role in steps},
            "timeout": {"seconds": group_timeout}}},
        "actions": [{"deploy": {"role": list(steps), "to": "host"}},
                    {"boot": {"role": list(steps), "method": "host"}}] + [
            {"test": {"role": [role], "definitions": [{
                "from": "inline", "name": "%s-steps" % role, "path": "inline/%s.yaml" % role,
                "repository": {"metadata": {"format": "Lava-Test Test Definition 1.0",
                                            "name": role},
                               "run": {"steps": role_steps}}}]}}
            for role, role_steps in steps.items()],
    }
    return yaml.safe_dump(data, sort_keys=False)


def finished(lab, ids, timeout=60):
    lab.wait_for(lambda: all(lab.job(i).state == JobState.FINISHED for i in ids),
                 timeout=timeout, what="the group to finish")
    return [lab.job(i) for i in ids]


def results(lab, job_id):
    return {(c.suite, c.name): c.result for c in lab.storage.list_testcases(job_id)}


def log_lines(lab, job_id):
    for dirpath, _, filenames in os.walk(lab.config.resolve(lab.config.master.output_dir)):
        if os.path.basename(dirpath) == str(job_id) and "output.yaml" in filenames:
            with open(os.path.join(dirpath, "output.yaml"), encoding="utf-8") as f:
                return [logformat.parse_line(line[2:]) for line in f.read().splitlines()]
    return []


def messages(lab, job_id, lvl):
    return [line["msg"] for line in log_lines(lab, job_id) if line.get("lvl") == lvl]


def wait_logged(lab, job_ids):
    # output.yaml is written by the master's file threads once lines arrive.
    lab.wait_for(lambda: all(any(line.get("lvl") == "results" and line["msg"].get("case")
                                 == "job" for line in log_lines(lab, i)) for i in job_ids),
                 timeout=20, what="the logs on disk")


def test_roles_send_wait_wait_all_and_sync(group_lab):
    lab = group_lab
    server = [
        "lava-test-case role --shell test \"$(lava-role)\" = server",
        "lava-test-case roles --shell test \"$(lava-role list | sort | tr '\\n' ' ')\" ="
        " 'client server '",
        "lava-test-case self --shell test \"$(lava-self)\" -gt 0",
        "lava-test-case group --shell test \"$(lava-group | wc -l)\" -eq 2",
        "lava-test-case group-client --shell lava-group client",
        "lava-network broadcast lo",
        "lava-send server-ready port=4242 'motd=hello world' ignored-word",
        "lava-wait-all client-done client",
        "lava-test-case client-said --shell grep -q ':result=ok$' \"$LAVA_MULTI_NODE_CACHE\"",
        "lava-sync finish",
        "lava-sync finish",  # the same barrier, a second round
    ]
    client = [
        "lava-wait server-ready",
        "PORT=$(grep ':port=' \"$LAVA_MULTI_NODE_CACHE\" | cut -d = -f 2)",
        "lava-test-case got-port --shell test \"$PORT\" = 4242",
        "lava-test-case got-motd --shell grep -q ':motd=hello world$'"
        " \"$LAVA_MULTI_NODE_CACHE\"",
        "lava-network collect lo server",
        "lava-test-case server-ip --shell test \"$(lava-network query $(lava-group server)"
        " ipv4)\" = 127.0.0.1",
        "lava-send client-done result=ok",
        "lava-sync finish",
        "lava-sync finish",
    ]
    ids = lab.submit(sync_job({"server": server, "client": client}))
    jobs = finished(lab, ids)
    assert [j.health for j in jobs] == [JobHealth.COMPLETE] * 2, \
        [(j.id, j.failure_comment) for j in jobs]
    server_id, client_id = ids
    found = results(lab, server_id)
    for case in ("role", "roles", "self", "group", "group-client", "client-said",
                 "multinode-send-server-ready", "multinode-wait_all-client-done",
                 "multinode-sync-finish", "multinode-send-network_info"):
        assert found[("0_server-steps", case)] == "pass", (case, found)
    found = results(lab, client_id)
    for case in ("got-port", "got-motd", "server-ip", "multinode-wait-server-ready",
                 "multinode-send-client-done", "multinode-sync-finish",
                 "multinode-wait_all-network_info"):
        assert found[("0_client-steps", case)] == "pass", (case, found)
    wait_logged(lab, ids)
    targets = messages(lab, client_id, "target")
    assert "<LAVA_MULTI_NODE> <LAVA_WAIT server-ready>" in targets
    assert "<LAVA_WAIT_COMPLETE %d:port=4242 %d:motd=hello world>" % (server_id, server_id) \
        in targets
    assert "<LAVA_SYNC_COMPLETE>" in targets
    assert "<LAVA_MULTI_NODE> <LAVA_SEND server-ready port=4242 motd=hello world>" in \
        messages(lab, server_id, "target")


def test_a_role_that_dies_fails_the_waits_of_the_others_at_once(group_lab):
    lab = group_lab
    ids = lab.submit(sync_job({
        "server": ["lava-wait client-waiting", "lava-test-raise server could not start"],
        "client": ["lava-send client-waiting", "lava-wait server-ready", "echo never"],
    }, group_timeout=100))
    server, client = finished(lab, ids)
    assert server.health == JobHealth.INCOMPLETE
    assert server.failure_comment == "Test: server could not start"
    assert client.health == JobHealth.INCOMPLETE
    assert "lava-wait 'server-ready': no other job of the group is left to send it: job %d" \
        " (role server) ended Incomplete" % server.id in client.failure_comment
    # Well within the group's 100 s: a few seconds after the server's job ended.
    assert client.end_time - server.end_time < 15
    assert results(lab, client.id)[("0_client-steps", "multinode-wait-server-ready")] == \
        "fail"
    wait_logged(lab, ids)
    assert "never" not in messages(lab, client.id, "target")


def test_a_role_that_never_calls_lava_sync_ends_the_group_on_its_timeout(group_lab):
    lab = group_lab
    began = time.time()
    ids = lab.submit(sync_job({
        "server": ["lava-sync ready", "echo after-sync"],
        "client": ["lava-wait go", "echo after-wait"],  # never calls lava-sync ready
    }, group_timeout=5))
    server, client = finished(lab, ids)
    assert (server.health, client.health) == (JobHealth.INCOMPLETE, JobHealth.INCOMPLETE)
    # Both end on the group's timeout of 5 s (not the job's 2 minutes).
    assert max(server.end_time, client.end_time) - began < 30
    comments = (server.failure_comment, client.failure_comment)
    assert "lava-sync 'ready'" in comments[0] and "lava-wait 'go'" in comments[1]
    timed_out = [c for c in comments if "timed out after 5 seconds" in c]
    assert timed_out, comments
    assert any(c.startswith("MultinodeTimeout: ") for c in comments)
    for comment in comments:
        assert "timed out after 5 seconds" in comment or "ended Incomplete" in comment
    if "timed out" in comments[0]:
        assert "waiting for job %d (role client)" % client.id in comments[0]
    wait_logged(lab, ids)
    for job, text in zip((server, client), ("lava-sync 'ready'", "lava-wait 'go'")):
        errors = messages(lab, job.id, "error")
        assert any(text in e for e in errors), errors
        assert not any(t.startswith("after-") for t in messages(lab, job.id, "target"))
    assert results(lab, server.id)[("0_server-steps", "multinode-sync-ready")] == "fail"
    assert results(lab, client.id)[("0_client-steps", "multinode-wait-go")] == "fail"


def test_lava_send_to_lava_wait_round_trip(group_lab, capsys):
    """Measures how long a lava-send takes to wake the lava-wait of another role, on
    one host (both runners are local): one way, and a whole ping-pong."""
    lab = group_lab
    rounds = 20
    now = "$(date +%s%N)"
    ids = lab.submit(sync_job({
        "server": ["lava-wait client-up",
                   "for i in $(seq %d); do echo \"sent $i %s\"; lava-send ping-$i;"
                   " lava-wait pong-$i; echo \"back $i %s\"; done" % (rounds, now, now)],
        "client": ["lava-send client-up",
                   "for i in $(seq %d); do lava-wait ping-$i; echo \"got $i %s\";"
                   " lava-send pong-$i; done" % (rounds, now)],
    }))
    jobs = finished(lab, ids)
    assert [j.health for j in jobs] == [JobHealth.COMPLETE] * 2, \
        [(j.id, j.failure_comment) for j in jobs]
    wait_logged(lab, ids)

    def stamps(job_id, word):
        return {int(t.split()[1]): int(t.split()[2]) for t in messages(lab, job_id, "target")
                if t.startswith(word + " ")}

    sent, back = stamps(ids[0], "sent"), stamps(ids[0], "back")
    got = stamps(ids[1], "got")
    one_way = [(got[i] - sent[i]) / 1e6 for i in range(1, rounds + 1)]
    round_trip = [(back[i] - sent[i]) / 1e6 for i in range(1, rounds + 1)]
    with capsys.disabled():
        print("\nlava-send -> lava-wait, %d rounds: one way median %.1f ms (min %.1f, max"
              " %.1f); ping-pong median %.1f ms" % (
                  rounds, statistics.median(one_way), min(one_way), max(one_way),
                  statistics.median(round_trip)))
    # Event-driven, not a poll every second as with lava-coordinator.
    assert statistics.median(one_way) < 1000


def test_the_example_runs_with_the_shipped_config(tmp_path):
    """examples/multinode-sync.yaml with config.toml as shipped, plus the second host
    device the README adds; only the addresses are moved to free ports."""
    for name in ("config.toml", "etc", "examples"):
        source = os.path.join(ROOT, name)
        (shutil.copytree if os.path.isdir(source) else shutil.copy)(source, tmp_path / name)
    devices = tmp_path / "etc/dispatcher-config/devices"
    (devices / "host02.jinja2").write_text(
        (devices / "host01.jinja2").read_text().replace("host01", "host02"))
    listen, logs, events, api, coordinator = free_ports(5)
    config = (tmp_path / "config.toml").read_text()
    for old, new in (('"tcp://*:5556"', '"tcp://127.0.0.1:%d"' % listen),
                     ('"tcp://*:5555"', '"tcp://127.0.0.1:%d"' % logs),
                     ('"tcp://*:5500"', '"tcp://127.0.0.1:%d"' % events),
                     ('"127.0.0.1:8000"', '"127.0.0.1:%d"' % api)):
        assert old in config
        config = config.replace(old, new)
    config += ('\n[[devices]]\nhostname = "host02"\ndevice_type = "host"\n'
               'worker = "worker01"\n\n[coordinator]\nlisten = "tcp://127.0.0.1:%d"\n'
               % coordinator)
    path = tmp_path / "config.toml"
    path.write_text(config)
    master = MasterProcess(str(path))
    try:
        done = run_cli(str(path), "submit", str(tmp_path / "examples/multinode-sync.yaml"))
        assert done.returncode == 0, done.stderr
        ids = [int(x) for x in done.stdout.split()]
        assert len(ids) == 2
        deadline = time.monotonic() + 60
        while True:
            shown = [yaml.safe_load(run_cli(str(path), "jobs", "show", str(i),
                                            "--json").stdout) for i in ids]
            if all(job["state"] == "Finished" for job in shown):
                break
            assert time.monotonic() < deadline, shown
            gevent.sleep(0.3)
        assert [job["health"] for job in shown] == ["Complete", "Complete"], shown
        for job_id in ids:
            cases = yaml.safe_load(run_cli(str(path), "jobs", "results", str(job_id),
                                           "--json").stdout)
            names = {(s["name"], c["name"]): c["result"] for s in cases["suites"]
                     for c in s["tests"]}
            assert all(r == "pass" for r in names.values()), names
            assert any(case == "multinode-sync-done" for _, case in names), names
    finally:
        master.stop()
