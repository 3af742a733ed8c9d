"""The MultiNode coordinator on its own: a real in-process master with a group in storage,
and a TCP client speaking lava-coordinator's protocol as LAVA's lava-run does (and with
``hold``, as lavacore-run does)."""

import json
import time

import gevent
import gevent.socket
import pytest
import yaml

from lavacore.states import JobHealth
from test_multinode import group_yaml

pytestmark = pytest.mark.timeout(60)

HOSTS = (("host01", "host", "worker1", ()), ("host02", "host", "worker2", ()),
         ("host03", "host", "worker2", ()))
LISTEN = '[coordinator]\nlisten = "tcp://127.0.0.1:0"\n'


def _lab(lab, devices=HOSTS):
    return lab(devices=devices, extra=LISTEN)


def _service(lab):
    return next(s for s in lab.master.services if s.name == "coordinator")


class Client:
    """One member of a group, as LAVA's MultinodeProtocol talks to the coordinator."""

    def __init__(self, lab, job_id, group):
        self.port = _service(lab).port
        self.job = str(job_id)
        self.group = group

    def raw(self, data, read=True):
        sock = gevent.socket.create_connection(("127.0.0.1", self.port), timeout=10)
        try:
            sock.sendall(data)
            sock.shutdown(gevent.socket.SHUT_WR)
            if not read:
                return None
            chunks = []
            while True:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:  # closed with our bytes unread
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            sock.close()

    def ask(self, request, **fields):
        message = {"port": self.port, "blocksize": 4096, "poll_delay": 1,
                   "host": "127.0.0.1", "hostname": "worker", "client_name": self.job,
                   "group_name": self.group, "role": "x", "request": request}
        message.update(fields)
        data = json.dumps(message).encode()
        answer = self.raw(b"%08X" % len(data) + data)
        assert int(answer[:8], 16) == len(answer) - 8
        return json.loads(answer[8:])


def _group(lab):
    ids = lab.submit(group_yaml({"server": (1, "host", {}), "client": (2, "host", {})}))
    group = lab.job(ids[0]).target_group
    return ids, group


def test_lava_clients_poll_and_get_lavas_answers(lab):
    lab = _lab(lab)
    (server, client1, client2), group = _group(lab)
    s, c1, c2 = (Client(lab, i, group) for i in (server, client1, client2))
    roles = s.ask("group_data", group_size=3)
    assert roles == {"response": "group_data",
                     "roles": {str(server): "server", str(client1): "client",
                               str(client2): "client"}}
    # No hold: LAVA's client is answered "wait" at once, and polls.
    assert c1.ask("lava_wait", messageID="ready")["response"] == "wait"
    assert s.ask("lava_send", messageID="ready", message={"port": "4242"}) == \
        {"response": "ack"}
    assert c1.ask("lava_wait", messageID="ready") == {
        "response": "ack", "message": {str(server): {"port": "4242"}}}
    # Later sends with the same ID add to its data.
    s.ask("lava_send", messageID="ready", message={"ip": "10.0.0.1"})
    assert c2.ask("lava_wait", messageID="ready")["message"] == {
        str(server): {"port": "4242", "ip": "10.0.0.1"}}
    # wait-all by role: every member of that role has to have sent it.
    assert s.ask("lava_wait_all", messageID="done", waitrole="client")["response"] == "wait"
    c1.ask("lava_send", messageID="done", message=None)
    wait = s.ask("lava_wait_all", messageID="done", waitrole="client")
    assert wait["response"] == "wait"
    assert wait["pending"] == [{"job": str(client2), "role": "client"}]
    c2.ask("lava_send", messageID="done", message={"n": 2})
    assert s.ask("lava_wait_all", messageID="done", waitrole="client") == {
        "response": "ack", "message": {str(client1): {}, str(client2): {"n": "2"}}}
    # lava-sync: a barrier of the whole group, usable again once everyone passed it.
    for _ in range(2):
        assert s.ask("lava_sync", messageID="sync")["response"] == "wait"
        assert c1.ask("lava_sync", messageID="sync")["response"] == "wait"
        assert c2.ask("lava_sync", messageID="sync") == {"response": "ack"}
        assert s.ask("lava_sync", messageID="sync") == {"response": "ack"}
        assert c1.ask("lava_sync", messageID="sync") == {"response": "ack"}
    assert s.ask("clear_group", group_size=3) == {"response": "ack"}


def test_a_held_wait_is_answered_when_the_send_arrives(lab):
    lab = _lab(lab)
    (server, client1, client2), group = _group(lab)
    s, c1 = Client(lab, server, group), Client(lab, client1, group)
    waiting = gevent.spawn(c1.ask, "lava_wait", messageID="go", hold=20)
    waiting.join(0.2)
    assert not waiting.ready()  # held, not answered "wait"
    sent = time.monotonic()
    s.ask("lava_send", messageID="go", message={"k": "v"})
    answer = waiting.get(timeout=10)
    assert time.monotonic() - sent < 10  # on the send, not at the end of the 20 s hold
    assert answer == {"response": "ack", "message": {str(server): {"k": "v"}}}
    # A held request that cannot be answered in time says so, and who is awaited.
    started = time.monotonic()
    answer = s.ask("lava_sync", messageID="never", hold=0.3)
    assert 0.25 < time.monotonic() - started < 15  # its 0.3 s hold, not the 20 s ones
    assert answer["response"] == "wait" and answer["held"] is True
    assert {p["job"] for p in answer["pending"]} == {str(client1), str(client2)}


def test_a_member_that_ends_fails_the_waits_on_it_at_once(lab):
    lab = _lab(lab)
    (server, client1, client2), group = _group(lab)
    s, c1, c2 = (Client(lab, i, group) for i in (server, client1, client2))
    sync = gevent.spawn(c1.ask, "lava_sync", messageID="both", hold=20)
    wait_all = gevent.spawn(s.ask, "lava_wait_all", messageID="up", hold=20)
    gevent.sleep(0.1)
    assert not sync.ready() and not wait_all.ready()
    ended = time.monotonic()
    lab.master.flow.finish(client2, JobHealth.INCOMPLETE, comment="test")
    answers = [sync.get(timeout=10), wait_all.get(timeout=10)]
    assert time.monotonic() - ended < 10  # at once, not at the end of the 20 s holds
    assert all(a["response"] == "nack" for a in answers)
    assert "job %d (role client) ended Incomplete without calling it" % client2 in \
        answers[0]["error"]
    assert "job %d (role client) ended Incomplete without sending it" % client2 in \
        answers[1]["error"]
    # The ended job itself is refused, and a lava-wait fails once nobody can send.
    assert "ended Incomplete" in c2.ask("lava_send", messageID="late")["error"]
    lab.master.flow.finish(client1, JobHealth.COMPLETE)
    answer = s.ask("lava_wait", messageID="anything", hold=5)
    assert answer["response"] == "nack"
    assert "no other job of the group is left to send it" in answer["error"]


def test_requests_from_outside_the_group_and_garbage_are_refused(lab):
    lab = _lab(lab)
    (server, _, _), group = _group(lab)
    other, _ = _group(lab)
    outsider = Client(lab, other[0], group)
    assert outsider.ask("lava_send", messageID="x")["error"] == \
        "job %d is not a member of group %s" % (other[0], group)
    assert "no MultiNode group" in Client(lab, server, "f" * 32).ask(
        "lava_send", messageID="x")["error"]
    member = Client(lab, server, group)
    assert member.ask("lava_bogus", messageID="x")["response"] == "nack"
    assert "expected a name" in member.ask("lava_wait", messageID="")["error"]
    assert "at most" in member.ask("lava_send", messageID="big",
                                   message={"k%d" % n: "v" for n in range(300)})["error"]
    # Garbage is dropped without an answer: bad header, oversized, not JSON, cut short.
    for data in (b"zzzzzzzz{}", b"%08X" % (1 << 20) + b"{}", b"00000004nope",
                 b"00000010{}", b"[" * 4):
        assert member.raw(data) == b""
    # ... and the coordinator still answers.
    assert member.ask("lava_send", messageID="after", message={"a": "b"}) == \
        {"response": "ack"}


def test_start_names_the_coordinator_to_lavacore_run(lab):
    lab = _lab(lab, devices=HOSTS[:2])
    port = _service(lab).port
    w1, w2 = lab.worker("worker1"), lab.worker("worker2")
    ids = lab.submit(group_yaml({"a": (1, "host", {}), "b": (1, "host", {})}))
    starts = [w.expect("START") for w in (w1, w2)]
    for frames in starts:
        block = yaml.safe_load(frames[2])["protocols"]["lava-multinode"]
        assert block["coordinator"] == {"port": port}
        assert set(block["roles"]) == {str(i) for i in ids}
