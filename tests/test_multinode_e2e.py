"""MultiNode groups end to end: an in-process master, real worker processes and the
built-in runner executing each role's steps on the host."""

import subprocess
import sys

import pytest

from lavacore.states import JobHealth, JobState
from test_multinode import group_yaml

pytestmark = pytest.mark.timeout(120)

HOSTS = (("host01", "host", "worker1", ()), ("host02", "host", "worker2", ()),
         ("host03", "host", "worker2", ()))


@pytest.fixture
def workers(tmp_path):
    started = []

    def start(lab, hostname):
        work_dir = tmp_path / ("work-" + hostname)
        proc = subprocess.Popen(
            [sys.executable, "-m", "lavacore.worker.cli", "--master",
             lab.master.controller.endpoint, "--logs", lab.master.logs.endpoint,
             "--hostname", hostname, "--work-dir", str(work_dir),
             "--runner", "%s -m lavacore.worker.runner" % sys.executable,
             "--hello-retry", "0.2", "--job-check", "0.2", "--poll-timeout", "0.1"],
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / (hostname + ".log"), "w"))
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(10)


def _host_lab(lab):
    instance = lab(devices=HOSTS)
    for hostname, *_ in HOSTS:
        path = instance.tmp_path / "etc/dispatcher-config/devices" / (hostname + ".jinja2")
        path.write_text("{%% extends 'host.jinja2' %%}\n{%% set hostname = '%s' %%}\n"
                        % hostname)
    return instance


def _results(lab, job_id):
    return {(c.suite, c.name): c.result for c in lab.storage.list_testcases(job_id)}


def test_two_roles_and_a_dynamic_connection_run_to_the_end(lab, workers):
    lab = _host_lab(lab)
    workers(lab, "worker1")
    workers(lab, "worker2")
    text = group_yaml({"server": (1, "host", {}), "client": (2, "host", {}),
                       "ssh": (1, None, {"connection": "ssh", "host_role": "server",
                                         "expect_role": "server"})})
    # Each role's step records its role and the size of its group, as a test case.
    text = text.replace("run: {steps: [echo server]}",
                        "run: {steps: [lava-test-case role-server --result pass]}")
    text = text.replace("run: {steps: [echo client]}",
                        "run: {steps: [lava-test-case role-client --result pass]}")
    text = text.replace("run: {steps: [echo ssh]}",
                        "run: {steps: [lava-test-case role-ssh --result pass]}")
    ids = lab.submit(text)
    lab.wait_for(lambda: all(lab.job(i).state == JobState.FINISHED for i in ids),
                 timeout=60, what="the group to finish")
    jobs = [lab.job(i) for i in ids]
    assert [j.health for j in jobs] == [JobHealth.COMPLETE] * 4, \
        [(j.id, j.failure_comment) for j in jobs]
    server, client1, client2, ssh = jobs
    assert _results(lab, server.id)[("0_server-test", "role-server")] == "pass"
    assert _results(lab, client1.id)[("0_client-test", "role-client")] == "pass"
    assert _results(lab, ssh.id)[("0_ssh-test", "role-ssh")] == "pass"
    assert ssh.actual_device is None and ssh.worker == server.worker
    assert {client1.actual_device, client2.actual_device, server.actual_device} == \
        {"host01", "host02", "host03"}


def test_cancel_of_a_running_member_stops_the_whole_group(lab, workers):
    lab = _host_lab(lab)
    workers(lab, "worker1")
    workers(lab, "worker2")
    text = group_yaml({"a": (1, "host", {}), "b": (1, "host", {})})
    text = text.replace("echo a]", "sleep 600]").replace("echo b]", "sleep 600]")
    ids = lab.submit(text)
    lab.wait_for(lambda: all(lab.job(i).state == JobState.RUNNING for i in ids),
                 timeout=30, what="both running")
    lab.master.flow.cancel(ids[0], "alice")
    lab.wait_for(lambda: all(lab.job(i).state == JobState.FINISHED for i in ids),
                 timeout=30, what="both canceled")
    assert [lab.job(i).health for i in ids] == [JobHealth.CANCELED] * 2
    assert all(d.state.display == "Idle" for d in lab.storage.list_devices())


def test_essential_failure_cancels_the_rest(lab, workers):
    lab = _host_lab(lab)
    workers(lab, "worker1")
    workers(lab, "worker2")
    text = group_yaml({"server": (1, "host", {"essential": "true"}),
                       "client": (1, "host", {})})
    # The server's test action times out after a second: its job ends Incomplete.
    text = text.replace("echo server]", "sleep 30]").replace("echo client]", "sleep 600]")
    text = text.replace("- test:\n    role: [server]",
                        "- test:\n    role: [server]\n    timeout: {seconds: 1}", 1)
    ids = lab.submit(text)
    lab.wait_for(lambda: all(lab.job(i).state == JobState.FINISHED for i in ids),
                 timeout=60, what="the group to end")
    server, client = (lab.job(i) for i in ids)
    assert server.health == JobHealth.INCOMPLETE
    assert "timed out" in (server.failure_comment or "") or "timeout" in \
        (server.failure_comment or "")
    assert client.health == JobHealth.CANCELED
