"""IPv6: the master's ZeroMQ sockets and HTTP API on ::1, a worker and its runner
reaching them there, and [master] ipv6 for a wildcard bind taking both families.

Real sockets on the loopback's ::1; skipped only where this machine has no IPv6 loopback
at all (checked by binding it)."""

import json
import socket
import urllib.request

import gevent
import pytest
import zmq.green as zmq

from conftest import job_yaml, write_config
from lavacore import config as config_mod
from lavacore import protocol
from lavacore.master import Master
from lavacore.states import JobHealth, JobState
from lavacore.worker.slave import Worker

pytestmark = pytest.mark.timeout(120)


def _has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(),
                                reason="no IPv6 loopback (::1) on this machine")

V6 = {"listen": "tcp://[::1]:*", "logs": "tcp://[::1]:*", "events": "tcp://[::1]:*"}


def _hello(context, url, hostname, ipv6=True):
    """HELLO from a socket of our own; True when HELLO_OK comes back."""
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.IDENTITY, hostname.encode())
    sock.setsockopt(zmq.CONNECT_RID, protocol.MASTER_IDENTITY)
    sock.setsockopt(zmq.LINGER, 0)
    if ipv6:
        sock.setsockopt(zmq.IPV6, 1)
    sock.connect(url)
    try:
        sock.send_multipart([protocol.MASTER_IDENTITY, b"HELLO", b"3"])
        with gevent.Timeout(10, False):
            while True:
                frames = sock.recv_multipart()
                if frames[1] == b"HELLO_OK":
                    return True
        return False
    finally:
        sock.close()


@needs_ipv6
def test_a_job_runs_with_every_socket_on_ipv6_loopback(lab, tmp_path):
    lab = lab(master=V6, devices=(("host01", "host", "worker1", ()),))
    master = lab.master
    assert master.controller.endpoint.startswith("tcp://[::1]:")
    assert master.logs.endpoint.startswith("tcp://[::1]:")
    # An event subscriber on ::1 sees the job's events.
    sub = lab.context.socket(zmq.SUB)
    sub.setsockopt(zmq.IPV6, 1)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(master.events.endpoint)
    # lavacore's worker and its runner: the [::1] addresses need nothing more.
    worker = Worker(master.controller.endpoint, master.logs.endpoint, "worker1",
                    str(tmp_path / "work"), hello_retry=0.2, job_check=0.2,
                    poll_timeout=0.5)
    assert worker.ipv6
    worker.start()
    try:
        lab.wait_for(lambda: "worker1" in master.controller.seen, what="worker Online")
        job_id = lab.submit(job_yaml("host"))
        lab.wait_for(lambda: lab.job(job_id).state == JobState.FINISHED, timeout=60,
                     what="job finished")
        assert lab.job(job_id).health == JobHealth.COMPLETE, lab.job(job_id).failure_comment
        assert [c.name for c in lab.storage.list_testcases(job_id, suite="0_smoke")] == \
            ["echo"]  # its results came over the log socket, on ::1
        with gevent.Timeout(10):
            frames = sub.recv_multipart()
        assert frames[0].startswith(b"org.linaro.validation.")
    finally:
        sub.close()
        worker.stop()


@needs_ipv6
def test_api_listens_on_ipv6(tmp_path):
    path = write_config(tmp_path, master=V6)
    text = open(path).read().replace("[api]\nenabled = false", '[api]\nlisten = "[::1]:0"')
    open(path, "w").write(text)
    master = Master(config_mod.load(path)).start()
    try:
        assert master.api.url.startswith("http://[::1]:")

        def get():
            with urllib.request.urlopen(master.api.url + "/api/v1/devices/", timeout=10) \
                    as answer:
                return json.loads(answer.read())

        data = gevent.get_hub().threadpool.apply(get)
        assert [d["hostname"] for d in data["results"]] == ["qemu01"]
    finally:
        master.stop()


@needs_ipv6
def test_master_ipv6_option_takes_both_families_on_a_wildcard(lab):
    lab = lab(master={"listen": "tcp://*:*", "ipv6": True})
    endpoint = lab.master.controller.endpoint
    assert endpoint.startswith("tcp://[::]:")
    port = endpoint.rsplit(":", 1)[1]
    assert _hello(lab.context, "tcp://[::1]:%s" % port, "worker6")
    assert _hello(lab.context, "tcp://127.0.0.1:%s" % port, "worker4", ipv6=False)


def test_without_the_option_an_ipv4_bind_stays_ipv4(lab):
    """IPV6 on an IPv4 address would report it as [::ffff:127.0.0.1], which a peer
    without IPv6 cannot connect to: it is set only where the address needs it."""
    lab = lab()
    assert lab.master.controller.endpoint.startswith("tcp://127.0.0.1:")
    assert not Worker("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "w", "/nonexistent").ipv6
