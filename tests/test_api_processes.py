"""The HTTP API served by processes beside the master (``lavacore api``), on PostgreSQL:
what a user does through them takes effect in the master as through the master's own API.

The master runs in this process (with its own API, to compare answers); the API pool is a
real ``python -m lavacore.cli -c CONFIG api --processes N`` subprocess on an OS-chosen
port; clients are lavacli and xmlrpc.client (in threads, so the master's loop runs).
"""

import base64
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import xmlrpc.client

import gevent
import gevent.subprocess
import pytest
import yaml

import pgutil
from apiutil import ApiLab, Rpc, in_thread, lavacli, spawn_lavacli
from conftest import ROOT, job_yaml, run_cli
from lavacore.logformat import result_line
from lavacore.states import DeviceHealth, JobHealth, JobState

pytestmark = pytest.mark.timeout(120)

DEVICES = (("qemu01", "qemu", "worker1", ()), ("bbb01", "bbb", "worker1", ()))


@pytest.fixture
def pg_schema():
    yield from pgutil.schema_for_test()


class ApiPool:
    """``lavacore -c CONFIG api`` as a subprocess; ``url`` once it serves."""

    def __init__(self, config_path, log_path, *args):
        self.log_path = str(log_path)
        self._log = open(self.log_path, "w")
        self.proc = gevent.subprocess.Popen(
            [sys.executable, "-m", "lavacore.cli", "-c", config_path, "api",
             "--listen", "127.0.0.1:0", *args],
            stdin=gevent.subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        pool = "--processes" in args and args[args.index("--processes") + 1] != "1"
        pattern = r"API pool serving (http://\S+)" if pool else r" serving (http://\S+)"
        self.url = self.wait_log(pattern, 60).group(1)

    def wait_log(self, pattern, timeout=20):
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.log_text())
            if found:
                return found
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("no %r in the API pool's log (exit %s):\n%s" % (
                    pattern, self.proc.poll(), self.log_text()[-3000:]))
            gevent.sleep(0.02)

    def log_text(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def rpc_url(self, user=None, token=None):
        host = self.url.split("://", 1)[1]
        return "http://%s%s/RPC2" % ("%s:%s@" % (user, token) if user else "", host)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except gevent.subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def pooled(tmp_path, pg_schema):
    """make(processes=2, *args, **lab kwargs) -> (ApiLab on PostgreSQL, ApiPool)."""
    made = []

    def make(processes=2, *args, api=None, **kwargs):
        kwargs.setdefault("devices", DEVICES)
        lab = ApiLab(tmp_path, api=api, storage=pgutil.storage_lines(pg_schema),
                     extra=pgutil.plugin_extra(), **kwargs)
        made.append(lab)
        pool = ApiPool(lab.config_path, tmp_path / ("api-%d.log" % len(made)),
                       "--processes", str(processes), "--events",
                       lab.master.events.endpoint, *args)
        made.append(pool)
        return lab, pool

    yield make
    for item in reversed(made):
        if isinstance(item, ApiPool):
            item.stop()
        else:
            item.close()


def rpc(lab, pool, user=None):
    return Rpc(pool.rpc_url(user, lab.token(user) if user else None))


def fault(call, *args):
    with pytest.raises(xmlrpc.client.Fault) as info:
        call(*args)
    return info.value


def _get(url, headers=None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=20) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get(url, headers=None):
    return in_thread(_get, url, headers)


def _post_once(url, path, body, headers):
    """One request on a connection of its own (so it may reach any process of a pool)."""
    status, _, data = _raw(url, "POST", path, body, headers)
    return status, data


def _lines(proc, into):
    for line in iter(proc.stdout.readline, ""):
        into.append(line)


def subscribers(pool):
    status, text = get(pool.url + "/metrics")
    assert status == 200
    return sum(float(v) for v in re.findall(
        r'lavacore_api_websocket_subscribers\{process="\d+"\} (\S+)', text.decode()))


# -- jobs --------------------------------------------------------------------------------------

def test_a_job_submitted_through_an_api_process_is_started_by_the_master(pooled, tmp_path):
    lab, pool = pooled()
    worker = lab.worker()
    definition = tmp_path / "job.yaml"
    definition.write_text(job_yaml())
    uri = pool.rpc_url("alice", lab.token("alice"))
    submitted = lavacli(uri, "jobs", "submit", str(definition))
    assert submitted.returncode == 0, submitted.stderr
    job_id = int(submitted.stdout.strip())
    # lavacli's events wait follows the job over the API process's websocket.
    waiting = spawn_lavacli(uri, "events", "wait", "job", str(job_id), "--state", "FINISHED")
    printed = []
    reader = gevent.spawn(_lines, waiting, printed)
    try:
        frames = worker.expect("START", timeout=10)  # the master heard it at once
        assert frames[1] == str(job_id).encode()
        lab.wait_for(lambda: subscribers(pool) == 1, timeout=30, what="the websocket")
        _finish(lab, worker, job_id)
        assert waiting.wait(timeout=30) == 0, waiting.stderr.read()
    finally:
        if waiting.poll() is None:
            waiting.kill()
        reader.kill()
    shown = lavacli(uri, "jobs", "show", str(job_id), "--json")
    data = json.loads(shown.stdout)
    assert (data["state"], data["health"], data["device"]) == ("Finished", "Complete",
                                                               "qemu01")
    assert data["submitter"] == "alice"
    # The master's log tells the change, as for one made through its own API.
    assert lab.job(job_id).health == JobHealth.COMPLETE


def _finish(lab, worker, job_id):
    """A job whose START the worker already has: START_OK, its result, END."""
    worker.send("START_OK", job_id)
    lab.wait_for(lambda: lab.job(job_id).state == JobState.RUNNING, what="Running")
    worker.log(job_id, result_line("0_smoke", "echo", "pass"))
    worker.log(job_id, result_line("lava", "job", "pass"))
    worker.end(job_id)
    worker.expect("END_OK")
    lab.wait_for(lambda: lab.job(job_id).state == JobState.FINISHED, what="Finished")


def test_a_cancel_through_an_api_process_reaches_the_worker(pooled):
    lab, pool = pooled()
    worker = lab.worker()
    alice, bob = rpc(lab, pool, "alice"), rpc(lab, pool, "bob")
    job_id = alice.scheduler.jobs.submit(job_yaml())
    worker.expect("START", timeout=10)
    worker.send("START_OK", job_id)
    lab.wait_for(lambda: lab.job(job_id).state == JobState.RUNNING)
    assert fault(bob.scheduler.jobs.cancel, job_id).faultCode == 403
    alice.scheduler.jobs.cancel(job_id)
    assert worker.expect("CANCEL", timeout=10)[1] == str(job_id).encode()
    worker.end(job_id, description=None)
    worker.expect("END_OK", skip=(b"PONG", b"CANCEL"))
    lab.wait_for(lambda: lab.job(job_id).health == JobHealth.CANCELED)
    # A queued job canceled there never starts, even once a device is free for it.
    lab.master.flow.set_device_health("bbb01", DeviceHealth.MAINTENANCE, "admin")
    queued = alice.scheduler.jobs.submit(job_yaml(device_type="bbb"))
    alice.scheduler.jobs.cancel(queued)
    assert lab.job(queued).health == JobHealth.CANCELED
    lab.master.flow.set_device_health("bbb01", DeviceHealth.GOOD, "admin")
    lab.settled(worker)  # no START for it


# -- permissions, sessions, throttling --------------------------------------------------------

def test_permissions_are_refused_the_same_way_as_by_the_master(pooled):
    lab, pool = pooled()
    admin = rpc(lab, pool, "admin")
    admin.auth.groups.add("bbb-team")
    admin.auth.users.add("dora")
    admin.auth.users.groups.add("dora", "bbb-team")
    admin.scheduler.device_types.perms_add("bbb", "bbb-team", "submit_to_devicetype")
    mine = lab.rpc("alice")   # the master's own API
    theirs = rpc(lab, pool, "alice")
    for client in (mine, theirs):
        refused = fault(client.scheduler.jobs.submit, job_yaml(device_type="bbb"))
        assert refused.faultCode == 403 and "bbb-team" not in refused.faultString
    assert fault(mine.scheduler.jobs.submit, job_yaml(device_type="bbb")).faultString == \
        fault(theirs.scheduler.jobs.submit, job_yaml(device_type="bbb")).faultString
    private = rpc(lab, pool, "dora").scheduler.jobs.submit(
        job_yaml(device_type="bbb").replace("visibility: public", "visibility: personal"))
    assert fault(theirs.scheduler.jobs.show, private).faultCode == 404
    assert rpc(lab, pool, "dora").scheduler.jobs.show(private)["id"] == private
    assert lab.storage.count_jobs() == 1
    # A token revoked in the database is refused by the API process at its next request.
    token_id = lab.storage.list_tokens("alice")[0]["id"]
    run = run_cli(lab.config_path, "tokens", "revoke", str(token_id))
    assert run.returncode == 0, run.stderr
    assert fault(theirs.system.whoami).faultCode == 401


def test_a_session_opened_on_one_process_is_good_on_every_other(pooled):
    lab, pool = pooled(processes=2)
    private = lab.submit(text=job_yaml(name="secret").replace("visibility: public",
                                                              "visibility: personal"))
    html = {"Accept": "text/html"}
    status, headers, body = in_thread(_raw, pool.url, "GET", "/login", None, html)
    assert status == 200
    csrf = re.search(r'name="csrf" value="([^"]+)"', body.decode()).group(1)
    cookies = [_cookie(headers, "lavacore_csrf")]
    form = urllib.parse.urlencode({"csrf": csrf, "username": "alice", "next": "/",
                                   "token": lab.token("alice")}).encode()
    status, headers, body = in_thread(_raw, pool.url, "POST", "/login", form, dict(
        html, **{"Content-Type": "application/x-www-form-urlencoded", "Origin": pool.url,
                 "Cookie": "; ".join(cookies)}))
    assert status == 303, body[:500]
    session = _cookie(headers, "lavacore_session")
    page = "/jobs/%d" % private
    assert in_thread(_raw, pool.url, "GET", page, None, html)[0] == 404
    # Any process of the pool, and the master, takes the session (new connections).
    for url in [pool.url] * 4 + [lab.url]:
        status, _, text = in_thread(_raw, url, "GET", page, None,
                                    dict(html, Cookie=session))
        assert status == 200 and b"secret" in text


def _raw(url, method, path, body, headers):
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    try:
        conn.request(method, path, body=body, headers=headers)
        answer = conn.getresponse()
        return answer.status, answer.getheaders(), answer.read()
    finally:
        conn.close()


def _cookie(headers, name):
    for key, value in headers:
        if key.lower() == "set-cookie" and value.startswith(name + "="):
            return value.split(";")[0]
    raise AssertionError("no %s cookie in %r" % (name, headers))


def test_failed_authentications_are_counted_for_the_whole_pool(pooled):
    lab, pool = pooled(processes=2, api="max_auth_failures = 4")
    wrong = {"Content-Type": "text/xml", "Authorization": "Basic " + base64.b64encode(
        b"alice:not-the-token").decode()}
    body = xmlrpc.client.dumps((), "system.whoami").encode()
    for _ in range(4):  # each on a connection of its own: any process may take it
        status, answer = in_thread(_post_once, pool.url, "/RPC2", body, wrong)
        assert status == 200 and b"<int>401</int>" in answer
    lab.token("alice")
    right = dict(wrong, Authorization="Basic " + base64.b64encode(
        ("alice:%s" % lab.token("alice")).encode()).decode())
    # Whichever process each new connection reaches, the address is locked out.
    for _ in range(6):
        status, _ = in_thread(_post_once, pool.url, "/RPC2", body, right)
        assert status == 429
    # Requests without credentials are still served.
    assert get(pool.url + "/api/v1/jobs/")[0] == 200


# -- device configuration ------------------------------------------------------------------------

def test_configuration_changed_through_an_api_process_reaches_the_master(pooled):
    lab, pool = pooled()
    worker = lab.worker()
    admin = rpc(lab, pool, "admin")
    first = admin.scheduler.jobs.submit(job_yaml())
    frames = worker.expect("START", timeout=10)
    assert yaml.safe_load(frames[3])["role"] == "dut"   # rendered, and cached, by the master
    _finish(lab, worker, first)
    assert admin.scheduler.devices.set_dictionary(
        "qemu01", "{% extends 'qemu.jinja2' %}\n{% set device_type = 'qemu' %}\n"
        "{% set role = 'from-an-api-process' %}\n") is True
    assert admin.scheduler.workers.set_env("worker1", "overrides:\n  LC_ALL: C.UTF-8\n")
    second = admin.scheduler.jobs.submit(job_yaml())
    frames = worker.expect("START", timeout=10)
    assert frames[1] == str(second).encode()
    assert yaml.safe_load(frames[3])["role"] == "from-an-api-process"
    assert "LC_ALL" in frames[5].decode()
    rendered = yaml.safe_load(admin.scheduler.devices.get_dictionary("qemu01", True).data)
    assert rendered["role"] == "from-an-api-process"
    # And the other way: a change made through the master is what the pool shows next.
    lab.rpc("admin").scheduler.devices.set_dictionary(
        "qemu01", "{% extends 'qemu.jinja2' %}\n{% set role = 'from-the-master' %}\n")
    for _ in range(3):
        rendered = yaml.safe_load(admin.scheduler.devices.get_dictionary("qemu01", True).data)
        assert rendered["role"] == "from-the-master"


# -- the event stream --------------------------------------------------------------------------------

def test_events_of_private_jobs_reach_only_those_who_may_see_them(pooled):
    lab, pool = pooled()
    worker = lab.worker()
    alice_uri = pool.rpc_url("alice", lab.token("alice"))
    listen = spawn_lavacli(alice_uri, "events", "listen")
    other = spawn_lavacli(pool.rpc_url("bob", lab.token("bob")), "events", "listen")
    heard, bob = [], []
    readers = [gevent.spawn(_lines, listen, heard), gevent.spawn(_lines, other, bob)]
    try:
        lab.wait_for(lambda: subscribers(pool) == 2, timeout=30, what="two subscribers")
        private = rpc(lab, pool, "alice").scheduler.jobs.submit(
            job_yaml(name="secret job").replace("visibility: public",
                                                "visibility: personal"))
        worker.expect("START", timeout=10)
        worker.send("START_OK", private)
        marker = "[%d] <" % private

        def running(lines):
            return [line for line in lines if marker in line and "state=Running" in line]

        lab.wait_for(lambda: running(heard) and running(bob), timeout=20,
                     what="the Running event in both")
        assert "alice" in running(heard)[0] and "(secret job)" in running(heard)[0]
        assert "<qemu01>" in running(heard)[0]
        assert "secret" not in running(bob)[0] and "alice" not in running(bob)[0]
    finally:
        for proc in (listen, other):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)
        gevent.killall(readers)


# -- the processes themselves ------------------------------------------------------------------------

def test_health_and_metrics_of_an_api_process_are_its_own(pooled):
    lab, pool = pooled(processes=2)
    status, body = get(pool.url + "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["role"] == "api"
    assert health["storage"] == "postgres" and health["processes"] == 2
    assert health["pid"] not in (os.getpid(), pool.proc.pid)
    status, body = get(lab.url + "/health")
    assert json.loads(body)["role"] == "active"
    status, body = get(pool.url + "/metrics")
    text = body.decode()
    assert status == 200
    assert 'lavacore_api_info{processes="2",storage="postgres"' in text
    assert set(re.findall(r'lavacore_api_requests_total\{kind="health",process="(\d)"\}',
                          text)) == {"0", "1"}
    # The lab's numbers are the master's to give, not an API process's.
    assert "lavacore_jobs{" not in text and "lavacore_messages_received" not in text
    # A bad token is refused there as by the master.
    status, _ = get(pool.url + "/metrics", {"Authorization": "Token nope"})
    assert status == 401


@pytest.mark.parametrize("sharing", ["one socket", "--reuse-port"])
def test_a_process_that_dies_is_replaced_and_the_pool_stops_cleanly(pooled, sharing):
    lab, pool = pooled(2, *(["--reuse-port"] if sharing == "--reuse-port" else []))
    children = [int(pid) for pid in re.findall(r"API process \d \(pid (\d+)\) serving",
                                               pool.log_text())]
    assert len(children) == 2
    os.kill(children[0], signal.SIGKILL)
    pool.wait_log(r"API process \d \(pid %d\) exited \(signal SIGKILL\); starting it again"
                  % children[0])
    pool.wait_log(r"API process \d \(pid (?!%d|%d)\d+\) serving" % tuple(children))
    for _ in range(4):
        assert get(pool.url + "/health")[0] == 200
    status, body = get(pool.url + "/metrics")
    assert "lavacore_api_process_restarts_total 1.0" in body.decode()
    assert pool.stop() == 0
    assert "API pool stopped" in pool.log_text()


def test_a_single_process_with_reuse_port_serves_too(pooled):
    lab, pool = pooled(1, "--reuse-port")
    worker = lab.worker()
    job_id = rpc(lab, pool, "alice").scheduler.jobs.submit(job_yaml())
    assert worker.expect("START", timeout=10)[1] == str(job_id).encode()
    assert json.loads(get(pool.url + "/health")[1])["processes"] == 1


def test_command_line_errors_are_one_line(tmp_path, pg_schema):
    from conftest import write_config

    path = write_config(tmp_path, storage=pgutil.storage_lines(pg_schema),
                        extra=pgutil.plugin_extra())
    for args, expected in ((["--listen", "nowhere"], "[api] listen: 'nowhere' is not"
                                                      " HOST:PORT"),
                           (["--processes", "0"], "--processes: at least 1")):
        run = run_cli(path, "api", *args)
        assert run.returncode == 1
        assert run.stderr.count("\n") == 1 and expected in run.stderr, run.stderr
    # An address taken: the error names it, on the last line.
    lab_socket = socket.socket()
    lab_socket.bind(("127.0.0.1", 0))
    lab_socket.listen(1)
    try:
        taken = "127.0.0.1:%d" % lab_socket.getsockname()[1]
        run = run_cli(path, "api", "--listen", taken)
    finally:
        lab_socket.close()
    assert run.returncode == 1
    assert run.stderr.splitlines()[-1] == "lavacore: --listen: cannot listen on %s: Address" \
        " already in use" % taken, run.stderr


def test_on_sqlite_one_api_process_beside_the_master_and_no_pool(tmp_path):
    """SQLite: one API process may serve beside the master (its submissions wake the
    master through its datagram socket, as the command line's do); a pool, or a second
    API process, is refused in one line (readers of one SQLite file in several processes
    wait for each other's locks: measured slower than one process)."""
    lab = ApiLab(tmp_path, devices=DEVICES)
    pool = None
    try:
        refused = run_cli(lab.config_path, "api", "--listen", "127.0.0.1:0",
                          "--processes", "2")
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1
        assert "--processes 2: a pool of API processes needs PostgreSQL" in refused.stderr
        pool = ApiPool(lab.config_path, tmp_path / "api.log", "--events",
                       lab.master.events.endpoint)
        second = run_cli(lab.config_path, "api", "--listen", "127.0.0.1:0")
        assert second.returncode == 1
        assert second.stderr.splitlines()[-1].startswith(
            "lavacore: another lavacore api already serves "), second.stderr
        worker = lab.worker()
        alice = rpc(lab, pool, "alice")
        job_id = alice.scheduler.jobs.submit(job_yaml())
        assert worker.expect("START", timeout=10)[1] == str(job_id).encode()
        worker.send("START_OK", job_id)
        lab.wait_for(lambda: lab.job(job_id).state == JobState.RUNNING)
        alice.scheduler.jobs.cancel(job_id)
        assert worker.expect("CANCEL", timeout=10)[1] == str(job_id).encode()
        assert json.loads(get(pool.url + "/health")[1])["storage"] == "sqlite"
    finally:
        if pool is not None:
            assert pool.stop() == 0
        lab.close()


# -- under systemd ------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
def test_the_systemd_unit_verifies_cleanly(tmp_path):
    text = open(os.path.join(ROOT, "etc", "systemd", "lavacore-api.service")).read()
    assert "ExecStart=/usr/local/bin/lavacore -c /etc/lavacore/config.toml api " in text
    lavacore = shutil.which("lavacore") or pytest.fail("lavacore is not on PATH")
    (tmp_path / "lavacore-api.service").write_text(
        text.replace("/usr/local/bin/lavacore", lavacore))
    done = subprocess.run(["systemd-analyze", "verify", "lavacore-api.service"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stderr


def test_the_pool_tells_systemd_ready_once_every_process_serves(pooled, tmp_path,
                                                                  monkeypatch):
    import struct

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    notify.setblocking(False)
    heard, senders = [], set()

    def expect(field):
        deadline = time.monotonic() + 60
        while not any(field in message.split("\n") for message in heard):
            assert time.monotonic() < deadline, "no %s from the pool: %r" % (field, heard)
            try:
                data, ancillary, _, _ = notify.recvmsg(4096, socket.CMSG_SPACE(12))
            except BlockingIOError:
                gevent.sleep(0.02)
                continue
            heard.append(data.decode())
            senders.update(struct.unpack("3i", item[2][:12])[0] for item in ancillary)
        return [message for message in heard if field in message.split("\n")][0]

    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    try:
        lab, pool = pooled(processes=2)
        ready = expect("READY=1")
        assert "STATUS=serving %s with 2 processes" % pool.url in ready
        expect("WATCHDOG=1")
        # Only the parent speaks to systemd (NotifyAccess=main would drop the others').
        pool.proc.send_signal(signal.SIGTERM)
        expect("STOPPING=1")
        assert pool.proc.wait(timeout=30) == 0
        assert senders == {pool.proc.pid}
    finally:
        notify.close()
