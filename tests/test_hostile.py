"""Hostile input: what anyone who reaches the master's sockets, its API or its
notification channel can send. One bad message is dropped with a log line; the master
(a real process here where "it stops" was the failure) carries on and keeps its jobs."""

import json
import lzma
import os
import re
import socket
import textwrap

import gevent
import gevent.socket
import pytest
import zmq.green as zmq

from conftest import job_yaml, run_cli, write_config
from apiutil import ApiLab
from scripted import ScriptedWorker

WAIT = 30


def wait_until(predicate, timeout=WAIT, what="condition"):
    deadline = gevent.get_hub().loop.now() + timeout
    while not predicate():
        if gevent.get_hub().loop.now() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        gevent.sleep(0.02)


def show(config_path, job_id):
    done = run_cli(config_path, "jobs", "show", str(job_id), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def submit(tmp_path, config_path, text=None):
    path = tmp_path / "job.yaml"
    path.write_text(text or job_yaml())
    done = run_cli(config_path, "submit", str(path))
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[0])


def started_job(tmp_path, config_path, worker):
    """A job submitted and Running on ``worker`` (a ScriptedWorker)."""
    job_id = submit(tmp_path, config_path)
    frames = worker.expect("START", timeout=WAIT)
    assert int(frames[1]) == job_id
    worker.send("START_OK", str(job_id))
    wait_until(lambda: show(config_path, job_id)["state"] == "Running", what="Running")
    return job_id


def result_line(case, result, definition="smoke", **extra):
    msg = dict({"definition": definition, "case": case, "result": result}, **extra)
    return json.dumps({"dt": "2026-12-02T00:00:00", "lvl": "results", "msg": msg})


def deep(n, opening="[", closing="]"):
    return opening * n + closing * n


def xz_bomb(gigabytes):
    """Concatenated .xz streams of zeros: about 160 KB per GiB once inflated."""
    stream = lzma.compress(b"\0" * (64 << 20), preset=9)
    return stream * (16 * gigabytes)


@pytest.fixture
def attacked(tmp_path, master_process):
    """A master process, its config and a zmq.green context, with worker1 greeted."""
    config_path = write_config(tmp_path)
    master = master_process(config_path)
    ctx = zmq.Context()
    try:
        worker = ScriptedWorker(ctx, master.controller, "worker1", master.logs)
        worker.connect()
        yield config_path, master, ctx, worker
        worker.close()
    finally:
        ctx.destroy(linger=0)


@pytest.mark.timeout(120)
def test_log_socket_garbage_never_stops_the_master(tmp_path, attacked):
    config_path, master, ctx, worker = attacked
    job_id = started_job(tmp_path, config_path, worker)
    this = str(job_id).encode()
    attacker = ctx.socket(zmq.PUSH)
    attacker.setsockopt(zmq.LINGER, 0)
    attacker.connect(master.logs)
    garbage = [
        [b"9" * 20, b"a 20-digit id"],               # OverflowError in storage, once
        [b"9223372036854775808", b"2**63"],
        [b"0", b"x"], [b"-1", b"x"], [b"+1", b"x"], [b" 1", b"x"], [b"1_0", b"x"],
        ["\u0661".encode(), b"an Arabic-Indic one"], [b"\xff\xfe", b"x"],
        [b"12345"], [this, b"x", b"three frames"], [b""] * 1000,
        # Results lines nested 100,000 deep: RecursionError in the JSON decoder, and a
        # segmentation fault in libyaml's composer for the YAML form.
        [this, json.dumps({"lvl": "results"})[:-1].encode()
         + b', "msg": ' + deep(100000).encode() + b"}"],
        [this, b"{lvl: results, msg: " + deep(100000).encode() + b"}"],
        [this, b"{lvl: results, msg: " + deep(50000, "{a: ", "}").encode() + b"}"],
        # Aliases expanding to 10**9 nodes.
        [this, ("{lvl: results, a: &a [x,x,x,x,x,x,x,x,x,x], "
                + ", ".join("b%d: &b%d [%s]" % (i, i, ",".join(
                    ["*" + ("a" if i == 0 else "b%d" % (i - 1))] * 10)) for i in range(8))
                + ", msg: {case: bomb, result: pass, x: *b7}}").encode()],
        [this, b"\xff\xfe not UTF-8 results \x00 with a NUL"],
        [this, result_line("nul\x00case", "pass\x00").encode()],
        [this, result_line("nested", "pass", extra=json.loads(deep(900))).encode()],
    ]
    for frames in garbage:
        attacker.send_multipart(frames)
    # A frame over the log socket's size limit: its sender is disconnected.
    big = ctx.socket(zmq.PUSH)
    big.setsockopt(zmq.LINGER, 0)
    big.connect(master.logs)
    big.send_multipart([this, b"x" * (3 << 20)])
    # The job's own lines, after all that, are stored and decide its health.
    worker.log(job_id, json.dumps({"dt": "2026-12-02T00:00:01", "lvl": "target",
                                   "msg": "still here"}))
    worker.log(job_id, result_line("after-garbage", "pass"))
    worker.log(job_id, result_line("job", "pass", definition="lava"))
    worker.end(job_id)
    worker.expect("END_OK", timeout=WAIT, skip=(b"PONG", b"HELLO_OK", b"START"))
    job = show(config_path, job_id)
    assert (job["state"], job["health"]) == ("Finished", "Complete"), job
    worker.send("PING")
    assert worker.expect("PONG", skip=(b"HELLO_OK", b"START", b"END_OK"))[0] == b"PONG"
    assert master.proc.poll() is None
    results = run_cli(config_path, "jobs", "results", str(job_id), "--json")
    cases = {(suite["name"], test["name"]) for suite in json.loads(results.stdout)["suites"]
             for test in suite["tests"]}
    assert ("smoke", "after-garbage") in cases and ("lava", "job") in cases
    assert ("smoke", "nul\ufffdcase") in cases  # stored, NUL replaced
    out = os.path.join(tmp_path, "var", "job-output")
    log = "".join(open(os.path.join(root, name), encoding="utf-8").read()
                  for root, _, names in os.walk(out) for name in names
                  if name == "output.yaml")
    assert "still here" in log
    text = master.log_text()
    assert "job id out of range" in text and "with 1000 frames" in text
    assert "is not a decimal integer" in text
    attacker.close()
    big.close()


@pytest.mark.timeout(120)
def test_controller_garbage_and_a_decompression_bomb(tmp_path, attacked):
    config_path, master, ctx, worker = attacked
    for frames in ([b"START_OK", b"9" * 20], [b"END", b"9223372036854775808", b"", b""],
                   [b"START_OK", b"0"], [b"END", b"1"], [b"PING"] + [b""] * 1000,
                   [b"\xff\xfe"], [], [b"HELLO", b"three"],
                   [b"HELLO", b"3", b"v" * 5000], [b"HELLO", b"3", b"v", b"\x00\x01"],
                   [b"NOPE", b"1"], [b"START_OK", "١٢".encode()]):
        worker.sock.send_multipart([b"master"] + frames)
    bad_name = ctx.socket(zmq.ROUTER)
    bad_name.setsockopt(zmq.IDENTITY, b"../../etc\xff")
    bad_name.setsockopt(zmq.CONNECT_RID, b"master")
    bad_name.setsockopt(zmq.LINGER, 0)
    bad_name.connect(master.controller)
    bad_name.send_multipart([b"master", b"HELLO", b"3"])
    # A real job whose END carries a description that inflates to 4 GiB.
    job_id = started_job(tmp_path, config_path, worker)
    worker.send("END", str(job_id), "", xz_bomb(4))
    worker.expect("END_OK", timeout=WAIT, skip=(b"PONG", b"HELLO_OK", b"START"))
    job = show(config_path, job_id)
    assert (job["state"], job["health"]) == ("Finished", "Incomplete"), job
    assert "description.yaml is too large" in job["failure_comment"]
    # And the master carries on: PONG, and the next job runs.
    worker.send("PING")
    assert worker.expect("PONG", skip=(b"HELLO_OK", b"START", b"END_OK"))[0] == b"PONG"
    second = started_job(tmp_path, config_path, worker)
    worker.log(second, result_line("job", "pass", definition="lava"))
    worker.end(second)
    wait_until(lambda: show(config_path, second)["health"] == "Complete", what="second")
    assert master.proc.poll() is None
    rss = int(open("/proc/%d/status" % master.proc.pid).read().split(
        "VmHWM:")[1].split()[0])
    assert rss < 400 * 1024, "peak RSS %d kB" % rss  # nothing was inflated whole
    text = master.log_text()
    assert "job id out of range" in text and "dropped a message of 1002 frames" in text
    assert "invalid hostname" in text
    bad_name.close()


def send_as(uid, address, payloads):
    """Datagrams to ``address`` from a process running as ``uid``."""
    pid = os.fork()
    if pid == 0:  # the child: no gevent, no pytest, only the datagrams
        code = 1
        try:
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            for payload in payloads:
                sock.sendto(payload.encode(), address)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_notifications_from_other_users_and_malformed_ones_are_ignored(lab, caplog):
    lab = lab()
    address = lab.storage._address()
    worker = lab.worker()
    job_id = lab.submit()
    worker.expect("START")
    worker.send("START_OK", str(job_id))
    lab.wait_for(lambda: lab.job(job_id).state.display == "Running")
    forged = json.dumps({"kind": "testjob", "data": {"job": str(job_id), "state": "Finished",
                                                      "health": "Complete"}})
    # Another local user cannot speak for the CLI.
    send_as(65534, address, [forged])
    lab.wait_for(lambda: "dropped a notification from uid 65534" in caplog.text,
                 timeout=WAIT, what="the refusal")
    # This user's malformed ones: dropped one by one.
    send_as(os.getuid(), address, [
        '{"kind": "testjob", "data": [1, 2]}', '{"kind": 5}', '[1]',
        '{"kind": "device", "data": {"state": "Idle", "health": [1]}}', deep(100000),
        '{"kind": "testjob", "data": {"job": "%s", "state": "Canceling"}}' % ("9" * 30)])
    lab.wait_for(lambda: caplog.text.count("ignored a notification") >= 2, timeout=WAIT,
                 what="the malformed notifications")
    assert not lab.master._stopped.is_set()
    worker.send("PING")
    assert worker.expect("PONG")[0] == b"PONG"
    assert lab.job(job_id).state.display == "Running"  # the forged event changed nothing


def test_external_event_garbage_is_dropped(tmp_path, lab, caplog):
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    try:
        lab = lab(master={"event_url": "tcp://127.0.0.1:%d" % port})
        worker = lab.worker()
        topic = b"org.linaro.validation.testjob"
        probe = [topic, b"u", b"t", b"user", b'{"state": "probe"}']

        def flowing():
            pub.send_multipart(probe[:4])  # 4 frames: dropped with a line once connected
            return "external event with 4 frames ignored" in caplog.text

        lab.wait_for(flowing, timeout=WAIT, what="the subscription")
        for frames in ([topic], [topic] * 6, [topic, b"u", b"t", b"u", b"{not json"],
                       [topic, b"u", b"t", b"u", deep(100000).encode()],
                       [topic, b"u", b"t", b"u", b'{"job": "%s", "state": "Canceling"}'
                        % (b"9" * 40)],
                       [b"\xff" + topic, b"u", b"t", b"u", b"{}"],
                       [topic, b"u", b"t", b"u", b'{"state": ["Submitted"]}']):
            pub.send_multipart(frames)
        lab.wait_for(lambda: "JSON nested too deep" in caplog.text, timeout=WAIT,
                     what="the deep event")
        assert not lab.master._stopped.is_set()
        worker.send("PING")
        assert worker.expect("PONG")[0] == b"PONG"
    finally:
        pub.close()
        ctx.destroy(linger=0)


# -- templates ----------------------------------------------------------------------------

ESCAPE = "cycler.__init__.__globals__.os.popen('touch %s').read()"


def test_dictionaries_render_in_a_sandbox(tmp_path):
    lab = ApiLab(tmp_path)
    try:
        marker = tmp_path / "escaped"
        # Only an administrator may set a dictionary now; even so, it is no way into the
        # master's shell (a stolen token is enough to try).
        alice = lab.rpc("admin")
        assert "403" in str(pytest.raises(Exception, lab.rpc("bob").scheduler.devices
                                          .set_dictionary, "qemu01", "x: 1\n").value)
        anonymous = lab.rpc()
        cases = {
            "escape": "{%% extends 'qemu.jinja2' %%}\n{%% set device_type = %s %%}\n"
                      % (ESCAPE % marker),
            "globals": "{{ lipsum.__globals__['os'].system('touch %s') }}" % marker,
            "format": "{{ '{0.__class__.__mro__}'.format(1) }}",
            "mutate": "{% set d = {} %}{{ d.update({'a': 1}) }}",
            "traversal": "{% include '../../../../etc/passwd' %}",
            "absolute": "{% include '/etc/passwd' %}",
            "repeat": "{{ 'x' * 1000000000 }}",
            "power": "{{ 9 ** 99999999 }}",
            "flood": "{% for a in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
            "cpu": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}"
                   "{% endfor %}",
        }
        for name, text in cases.items():
            assert alice.scheduler.devices.set_dictionary("qemu01", text) is True
            # Rendering is open to anyone: it must never run what the text says.
            with pytest.raises(Exception) as refused:
                anonymous.scheduler.devices.get_dictionary("qemu01", True)
            message = str(refused.value)
            assert "400" in message, (name, message)
            expected = {"escape": "unsafe", "globals": "unsafe", "format": "unsafe",
                        "mutate": "unsafe", "traversal": "not found", "absolute": "not found",
                        "repeat": "repetition", "power": "power of more than",
                        "flood": "renders more than", "cpu": "CPU"}[name]
            assert expected in message, (name, message)
        assert not marker.exists()
        # A job on the device fails alone, as an infrastructure error naming the cause.
        alice.scheduler.devices.set_dictionary("qemu01", cases["escape"])
        job_id = lab.submit()
        lab.worker()
        lab.wait_for(lambda: lab.job(job_id).state.display == "Finished", timeout=WAIT)
        job = lab.job(job_id)
        assert job.health.display == "Incomplete" and "unsafe" in job.failure_comment
        assert not marker.exists()
    finally:
        lab.close()


def test_lava_style_templates_render_as_before(tmp_path):
    """What LAVA's device-type templates use (extends, blocks, set, macros, includes,
    loops, filters, a job context overriding defaults) renders the same in the sandbox."""
    lab = ApiLab(tmp_path)
    try:
        types = tmp_path / "etc" / "dispatcher-config" / "device-types"
        (types / "common.jinja2").write_text(textwrap.dedent("""\
            {% macro console(port) -%}
            telnet localhost {{ port }}
            {%- endmacro %}
            """))
        (types / "board.jinja2").write_text(textwrap.dedent("""\
            {% extends 'base.jinja2' %}
            {% import 'common.jinja2' as common %}
            {% set device_type = 'board' %}
            {% block body %}
            connect: {{ common.console(connection_port | default(2000)) }}
            arch: {{ arch | default('arm64') }}
            commands:
            {% for name, value in power_commands | default({'on': 'pdu on', 'off': 'pdu off'}) | dictsort %}
              {{ name }}: '{{ value }}'
            {% endfor %}
            args: '{{ extra_kernel_args | default('') }} console={{ console_device | default('ttyS0') | upper }}'
            {% if boot_to_shell is defined and boot_to_shell %}
            shell: true
            {% endif %}
            {% endblock body %}
            """))
        devices_dir = tmp_path / "etc" / "dispatcher-config" / "devices"
        (devices_dir / "qemu01.jinja2").write_text(
            "{% extends 'board.jinja2' %}\n{% set connection_port = 7001 %}\n"
            "{% set power_commands = {'reset': 'pdu reset 3'} %}\n")
        lab.master.templates.reload()
        rendered = lab.master.templates.render("qemu01", {"arch": "amd64",
                                                          "extra_kernel_args": "quiet",
                                                          "boot_to_shell": True})
        assert rendered["device_type"] == "board"
        assert rendered["connect"] == "telnet localhost 7001"
        assert rendered["arch"] == "amd64"
        assert rendered["commands"] == {"reset": "pdu reset 3"}
        assert rendered["args"] == "quiet console=TTYS0" and rendered["shell"] is True
    finally:
        lab.close()


# -- HTTP ---------------------------------------------------------------------------------

def _slow_client(address, source):
    sock = gevent.socket.create_connection(address, timeout=WAIT, source_address=(source, 0))
    sock.sendall(b"GET /api/v1/jobs/ HTTP/1.1\r\nHost: lab\r\n")
    return sock


def _get(address, source, path="/api/v1/jobs/", headers=""):
    sock = gevent.socket.create_connection(address, timeout=WAIT, source_address=(source, 0))
    try:
        sock.sendall(("GET %s HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n%s\r\n"
                      % (path, headers)).encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    finally:
        sock.close()


def test_slow_clients_cannot_starve_the_api(tmp_path):
    lab = ApiLab(tmp_path, api="header_timeout = 1\nmax_client_connections = 32")
    try:
        address = lab.master.api.address
        slow = [_slow_client(address, "127.0.0.1") for _ in range(300)]
        answers = []

        def refused(sock):
            try:
                data = sock.recv(1024)
            except OSError:
                data = b""
            answers.append(data)

        # Past 32 connections from one address, the rest are answered 503 at once.
        gevent.joinall([gevent.spawn(refused, s) for s in slow[32:]], timeout=WAIT)
        assert len(answers) == 268 and all(a.startswith(b"HTTP/1.1 503") for a in answers)
        # A normal client is served while the 32 slow ones still hold their connections.
        reply = _get(address, "127.0.0.2")
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        # And each slow one is cut off once its headers are late.
        late = []
        gevent.joinall([gevent.spawn(lambda s=s: late.append(s.recv(1024)))
                        for s in slow[:32]], timeout=WAIT)
        assert len(late) == 32 and all(a.startswith(b"HTTP/1.1 408") for a in late), late[:2]
        for sock in slow:
            sock.close()
        assert _get(address, "127.0.0.1").startswith(b"HTTP/1.1 200")
    finally:
        lab.close()


def test_deep_json_is_a_bad_request(tmp_path):
    lab = ApiLab(tmp_path)
    try:
        body = deep(200000)
        status, _, data = lab.http("POST", "/api/v1/devices/", body=body.encode(),
                                   user="alice", headers={"Content-Type": "application/json"})
        assert status == 400 and b"nested too deep" in data, data[:200]
        status, _, data = lab.http("POST", "/api/v1/jobs/", body=deep(200000, "- [", "]"),
                                   user="alice")
        assert status == 400, data[:200]
        status, _, data = lab.http("POST", "/api/v1/jobs/", body=deep(200000, "{a: ", "}"),
                                   user="alice")
        assert status == 400, data[:200]
        rpc = lab.rpc("alice")
        with pytest.raises(Exception) as refused:
            rpc.scheduler.jobs.submit(deep(100000))
        assert "400" in str(refused.value)
        assert lab.json("GET", "/api/v1/devices/")["count"] == 1  # and it still answers
    finally:
        lab.close()


def test_failed_authentication_is_rate_limited_per_address(tmp_path, caplog):
    lab = ApiLab(tmp_path, api="max_auth_failures = 5")
    try:
        lab.token("alice")
        address = lab.master.api.address
        wrong = "Authorization: Token not-a-token\r\n"
        for _ in range(5):
            assert _get(address, "127.0.0.1", headers=wrong).startswith(b"HTTP/1.1 401")
        throttled = _get(address, "127.0.0.1", headers=wrong)
        assert throttled.startswith(b"HTTP/1.1 429"), throttled[:200]
        retry = re.search(rb"Retry-After: (\d+)", throttled)
        assert retry and 1 <= int(retry.group(1)) <= 61
        # Even the right token waits: guessing is what the limit stops.
        good = "Authorization: Token %s\r\n" % lab.token("alice")
        assert _get(address, "127.0.0.1", headers=good).startswith(b"HTTP/1.1 429")
        assert "127.0.0.1: 5 failed authentications" in caplog.text
        # Reading without credentials still works, and other addresses are not affected.
        assert _get(address, "127.0.0.1").startswith(b"HTTP/1.1 200")
        assert _get(address, "127.0.0.3", headers=wrong).startswith(b"HTTP/1.1 401")
        assert _get(address, "127.0.0.3", headers=good).startswith(b"HTTP/1.1 200")
    finally:
        lab.close()
