"""The MultiNode coordinator: lava-send, lava-wait, lava-wait-all and lava-sync between the
jobs of a running group, in the master, speaking Debian's lava-coordinator protocol.

Why in the master, and not Debian's lava-coordinator: the master knows each group from
storage (its jobs, their roles, whether each still runs), so

- a request is accepted only from a job of the group it names, with the role storage
  gives it, not from whoever connects first with a group name and a size;
- when a member ends (Complete, Incomplete, Canceled) the waits it could never satisfy
  fail at once, naming it, instead of every other role hanging until the group's timeout
  (the multinode plugin tells this service about every state change of a group's jobs,
  and groups with waiters are read again from storage every ``recheck`` seconds);
- a wait is answered the moment it can be: a request that would get "wait" is held open
  until the awaited lava-send arrives (lavacore-run asks for that with ``hold``), where
  lava-coordinator answers "wait" and is asked again a second later;
- one process and one configuration less, and the same bounds as the master's other
  sockets.

The wire protocol is lava-coordinator's, so LAVA's own lava-run (2018.x-2023.x) can use
it unchanged (``/etc/lava-coordinator/lava-coordinator.conf`` naming the master): one TCP
connection per request, 8 hex digits giving the length of a JSON request, then the same
for the reply, ``{"response": "ack" | "wait" | "nack" | "group_data", ...}``.

Semantics, LAVA's: a message ID's data (``{sender job: {key: value}}``) stays available
for the life of the group and later sends with the same ID add to it; lava-wait returns
once any member (this one included) has sent the ID; lava-wait-all once every other
member (of the given role) has; lava-sync once every member of the group has called it,
after which the ID can be used for another round. Two differences, both where LAVA's
coordinator contradicts its documentation: lava-wait-all before anyone sent the ID waits
(LAVA's coordinator answers nack), and with a role it waits for every member of that role
(LAVA's for the first one).

What peers send is bounded: the request size (``max_message``; LAVA's client never sends
64 KiB or more), the data one group may store (``max_group_bytes``), keys per message,
message IDs per group, requests held per group, connections at once, and the time a
request may take to arrive. A malformed request is answered nack (or dropped) with a
rate-limited log line naming the peer. The coordinator's state is in memory, as
lava-coordinator's: a master restart forgets what was sent (waits for it then time out).

Configuration, ``[coordinator]`` (all optional): ``enabled`` (true), ``listen``
("tcp://HOST:3079", HOST that of ``[master] listen``), ``advertise`` (the host, or
host:port, runners connect to; by default the host they reach the master's log socket
at), ``max_message``, ``max_group_bytes``, ``max_connections``, ``recheck``,
``read_timeout``.
"""

import dataclasses
import json
import socket
import time
import urllib.parse

import gevent
import gevent.event
import gevent.pool
import gevent.server
import gevent.socket

from .. import devices, safeyaml
from ..config import ConfigError
from ..ratelog import RateLimitedLog
from ..states import JobState
from ..storage import StorageError
from .base import Service

DEFAULT_PORT = 3079  # lava-coordinator's
REQUESTS = ("group_data", "clear_group", "aggregate", "lava_send", "lava_wait",
            "lava_wait_all", "lava_sync", "complete")
MAX_NAME = 200           # a message ID, key, role or group name
MAX_VALUE = 4096         # one value of a message
MAX_KEYS = 256           # keys of one message
MAX_MESSAGE_IDS = 4096   # message IDs one group may use
MAX_HOLD = 30.0          # seconds a request may be held before "wait"
MAX_GROUPS = 10000       # groups kept in memory
LINGER = 300.0           # seconds a group whose jobs all ended is kept (late polls)


@dataclasses.dataclass(frozen=True)
class Settings:
    enabled: bool = True
    listen: str = ""
    listen_explicit: bool = False
    advertise: str = ""
    max_message: int = 64 * 1024
    max_group_bytes: int = 1024 * 1024
    max_connections: int = 1024
    recheck: float = 2.0
    read_timeout: float = 10.0


def settings(config):
    """The ``[coordinator]`` table, checked; ConfigError names the key."""
    raw = config.section("coordinator")
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    values = {}
    for key, value in raw.items():
        name = "[coordinator] %s" % key
        if key not in fields or key == "listen_explicit":
            raise ConfigError("%s: unknown key (known: %s)" % (name, ", ".join(
                sorted(k for k in fields if k != "listen_explicit"))))
        default = fields[key].default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError("%s: expected true or false, got %r" % (name, value))
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise ConfigError("%s: expected a string, got %r" % (name, value))
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError("%s: expected a positive number, got %r" % (name, value))
        values[key] = value
    for key in ("max_message", "max_group_bytes", "max_connections"):
        if key in values and values[key] != int(values[key]):
            raise ConfigError("[coordinator] %s: expected a whole number" % key)
        if key in values:
            values[key] = int(values[key])
    if values.get("max_message", 4096) < 4096:
        raise ConfigError("[coordinator] max_message: at least 4096 bytes")
    if values.get("listen"):
        values["listen_explicit"] = True
        parse_listen(values["listen"], "[coordinator] listen")
    else:
        host = urllib.parse.urlsplit(config.master.listen).hostname or "*"
        values["listen"] = "tcp://%s:%d" % (host if ":" not in host else "[%s]" % host,
                                           DEFAULT_PORT)
    if values.get("advertise"):
        parse_advertise(values["advertise"])
    return Settings(**values)


def parse_listen(text, key="[coordinator] listen"):
    """("host", port) of tcp://HOST:PORT (HOST * for every IPv4 address)."""
    parts = urllib.parse.urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "tcp" or not parts.hostname or port is None:
        raise ConfigError("%s: expected tcp://HOST:PORT, got %r" % (key, text))
    host = parts.hostname
    return ("0.0.0.0" if host == "*" else host), port


def parse_advertise(text):
    """{"host": h, "port": p or None} of HOST or HOST:PORT."""
    parts = urllib.parse.urlsplit("tcp://" + text)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname or port == -1 or parts.path:
        raise ConfigError("[coordinator] advertise: expected HOST or HOST:PORT, got %r"
                          % text)
    return {"host": parts.hostname, "port": port}


# -- groups -------------------------------------------------------------------------------

@dataclasses.dataclass
class Member:
    job: str
    role: str
    state: JobState
    health: str = ""

    @property
    def ended(self):
        return self.state >= JobState.CANCELING

    def describe(self):
        return "job %s (role %s)" % (self.job, self.role)

    def fate(self):
        if self.state == JobState.CANCELING:
            return "is being canceled"
        return "ended %s" % (self.health or "")


class Group:
    def __init__(self, name, members):
        self.name = name
        self.members = members          # job id (str) -> Member, all sub-jobs
        self.sent = {}                  # message ID -> {sender job: {key: value}}
        self.syncs = {}                 # message ID -> (arrived set, released set)
        self.stored = 0                 # bytes of sent data
        self.waiters = 0
        self.touched = time.monotonic()
        self.ended_at = None
        self._changed = gevent.event.Event()

    def changed(self):
        event, self._changed = self._changed, gevent.event.Event()
        event.set()

    def wait_change(self, timeout):
        self._changed.wait(timeout)

    def others(self, job):
        return [m for key, m in self.members.items() if key != job]

    def update(self, job, state, health):
        member = self.members.get(str(job))
        if member is None or (member.state, member.health) == (state, health):
            return False
        member.state, member.health = state, health
        if all(m.ended for m in self.members.values()):
            self.ended_at = self.ended_at or time.monotonic()
        return True


class Refused(Exception):
    """A request answered nack; the text says why (sent to lavacore's client)."""


_WAIT = object()


def _role_of(job):
    try:
        data = devices.yaml_load(job.definition) or {}
    except Exception:  # noqa: BLE001 - a stored definition, read leniently
        return "?"
    protocols = data.get("protocols") if isinstance(data, dict) else None
    block = protocols.get("lava-multinode") if isinstance(protocols, dict) else None
    role = block.get("role") if isinstance(block, dict) else None
    return str(role) if role else "?"


def _names(members):
    return ", ".join(m.describe() for m in members[:10]) + (
        ", and %d more" % (len(members) - 10) if len(members) > 10 else "")


class CoordinatorService(Service):
    name = "coordinator"

    def __init__(self, master, config=None):
        super().__init__(master)
        self.settings = config or settings(master.config)
        self.server = None
        self.port = None
        self.host = None
        self.groups = {}
        self._drops = RateLimitedLog(self.log)
        self._storage_down = False

    # -- life cycle ---------------------------------------------------------------------

    def setup(self):
        if not self.settings.enabled:
            self.log.info("MultiNode coordinator disabled ([coordinator] enabled = false)")
            return
        host, port = parse_listen(self.settings.listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = gevent.socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            if self.settings.listen_explicit:
                raise ConfigError("[coordinator] listen: cannot listen on %s: %s"
                                  % (self.settings.listen, exc.strerror or exc)) from None
            # The default port is lava-coordinator's: Debian's may hold it on this host.
            self.log.error("MultiNode coordinator: cannot listen on %s (%s): lava-send,"
                           " lava-wait and lava-sync of lavacore-run are unavailable; set"
                           " [coordinator] listen to a free address", self.settings.listen,
                           exc.strerror or exc)
            return
        self.host, self.port = sock.getsockname()[:2]
        pool = gevent.pool.Pool(self.settings.max_connections)
        self.server = gevent.server.StreamServer(sock, self._handle, spawn=pool)
        self.server.start()
        self.log.info("MultiNode coordinator on tcp://%s:%d", "[%s]" % self.host
                      if ":" in self.host else self.host, self.port)

    def teardown(self):
        if self.server is not None:
            self.server.stop(timeout=1)
            self.server = None

    def run(self):
        while not self.wait(self.settings.recheck):
            try:
                self._recheck()
            except StorageError as exc:
                self._storage_fault(exc)

    def advertised(self):
        """What START tells lavacore-run: {"port": P} and, if configured, "host"."""
        if self.port is None:
            return None
        if self.settings.advertise:
            where = parse_advertise(self.settings.advertise)
            return {"host": where["host"], "port": where["port"] or self.port}
        return {"port": self.port}

    # -- what the multinode plugin tells us ---------------------------------------------

    def job_changed(self, job):
        """A job of a group changed state (the plugin's on_job_state)."""
        group = self.groups.get(job.target_group)
        if group is not None and group.update(job.id, JobState(job.state),
                                              _health(job)):
            group.changed()

    def _recheck(self):
        now = time.monotonic()
        for name, group in list(self.groups.items()):
            if group.waiters:
                self._refresh(group)
            elif group.ended_at is not None and now - group.ended_at > LINGER:
                del self.groups[name]

    def _refresh(self, group):
        changed = False
        for job in self.master.storage.list_jobs(target_group=group.name):
            changed |= group.update(job.id, JobState(job.state), _health(job))
        if changed:
            group.changed()
        self._storage_works()

    def _group(self, name):
        group = self.groups.get(name)
        if group is not None:
            group.touched = time.monotonic()
            return group
        jobs = self.master.storage.list_jobs(target_group=name)
        self._storage_works()
        if not jobs:
            return None
        if len(self.groups) >= MAX_GROUPS:
            idle = sorted((g.touched, n) for n, g in self.groups.items() if not g.waiters)
            for _, old in idle[:len(self.groups) - MAX_GROUPS + 1]:
                del self.groups[old]
        members = {str(job.id): Member(str(job.id), _role_of(job), JobState(job.state),
                                       _health(job)) for job in jobs}
        group = Group(name, members)
        if all(m.ended for m in members.values()):
            group.ended_at = time.monotonic()
        self.groups[name] = group
        return group

    def _storage_fault(self, exc):
        if not self._storage_down:
            self._storage_down = True
            self.log.error("MultiNode coordinator: storage unavailable (%s): requests are"
                           " answered 'wait' until it is back", exc)

    def _storage_works(self):
        if self._storage_down:
            self._storage_down = False
            self.log.warning("MultiNode coordinator: storage available again")

    # -- one connection -----------------------------------------------------------------

    def _handle(self, sock, address):
        peer = "%s:%s" % tuple(address[:2])
        try:
            try:
                with gevent.Timeout(self.settings.read_timeout):
                    request = self._read(sock, peer)
            except gevent.Timeout:
                self._drops.warning(("slow", peer), "coordinator: %s sent no whole request"
                                    " within %gs; dropped", peer, self.settings.read_timeout)
                return
            if request is None:
                return
            try:
                reply = self._answer(request)
            except Refused as exc:
                self._drops.warning(("nack", peer), "coordinator: request of %s refused: %s",
                                    peer, exc)
                reply = {"response": "nack", "error": str(exc)}
            except StorageError as exc:
                self._storage_fault(exc)
                reply = {"response": "wait"}
            data = json.dumps(reply).encode("utf-8")
            sock.sendall(b"%08X" % len(data) + data)
        except OSError:
            pass  # the peer went away; nothing to answer
        except Exception as exc:  # noqa: BLE001 - one request, never the master
            self._drops.error(("bug", peer), "coordinator: request of %s failed: %s: %s",
                              peer, type(exc).__name__, exc, exc_info=True)
        finally:
            try:
                sock.close()
            except OSError:
                pass

    def _read(self, sock, peer):
        header = _recv_exact(sock, 8)
        if header is None or len(header) != 8 or not all(
                c in b"0123456789abcdefABCDEF" for c in header):
            self._drops.warning(("header", peer), "coordinator: %s sent a bad header %r;"
                                " dropped", peer, header[:8] if header else b"")
            return None
        length = int(header, 16)
        if length > self.settings.max_message:
            self._drops.warning(("size", peer), "coordinator: %s announced a request of %d"
                                " bytes (at most %d); dropped", peer, length,
                                self.settings.max_message)
            return None
        body = _recv_exact(sock, length)
        if body is None:
            self._drops.warning(("short", peer), "coordinator: %s closed before sending"
                                " its whole request; dropped", peer)
            return None
        try:
            request = safeyaml.json_loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            self._drops.warning(("json", peer), "coordinator: %s sent a request that is not"
                                " JSON (%s); dropped", peer, str(exc)[:100])
            return None
        if not isinstance(request, dict):
            self._drops.warning(("json", peer), "coordinator: %s sent a request that is not"
                                " a JSON object; dropped", peer)
            return None
        return request

    # -- one request --------------------------------------------------------------------

    def _answer(self, request):
        kind = request.get("request")
        if kind not in REQUESTS:
            raise Refused("unknown request %r" % str(kind)[:MAX_NAME])
        group_name = _name(request.get("group_name"), "group_name")
        client = request.get("client_name")
        if isinstance(client, int) and not isinstance(client, bool):
            client = str(client)
        client = _name(client, "client_name")
        group = self._group(group_name)
        if group is None:
            raise Refused("there is no MultiNode group %s" % group_name)
        member = group.members.get(client)
        if member is None:
            raise Refused("job %s is not a member of group %s" % (client, group_name))
        if member.ended:
            raise Refused("%s %s" % (member.describe(), member.fate()))
        if kind == "group_data":
            return {"response": "group_data",
                    "roles": {key: m.role for key, m in group.members.items()}}
        if kind in ("clear_group", "complete"):
            return {"response": "ack"}
        if kind == "aggregate":
            raise Refused("aggregate is not supported (LAVA V2 does not use it)")
        message_id = _name(request.get("messageID"), "messageID")
        if kind == "lava_send":
            return self._send(group, client, message_id, request.get("message"))
        if kind == "lava_wait":
            check = lambda: self._wait(group, client, message_id)  # noqa: E731
        elif kind == "lava_wait_all":
            role = request.get("waitrole")
            role = None if role in (None, "") else _name(role, "waitrole")
            check = lambda: self._wait_all(group, client, message_id, role)  # noqa: E731
        else:
            check = lambda: self._sync(group, client, message_id)  # noqa: E731
        return self._hold(group, check, request.get("hold"))

    def _hold(self, group, check, hold):
        """The answer of ``check()``; while it says wait, hold the request (up to the
        ``hold`` seconds lavacore's client asked for), checking again on every change."""
        if isinstance(hold, bool) or not isinstance(hold, (int, float)) or hold <= 0 \
                or group.waiters >= 4 * len(group.members) + 16:
            hold = 0.0
        deadline = time.monotonic() + min(float(hold), MAX_HOLD)
        group.waiters += 1
        try:
            while True:
                answer, pending = check()
                if answer is not _WAIT:
                    return answer
                left = deadline - time.monotonic()
                if left <= 0:
                    return {"response": "wait", "held": hold > 0,
                            "pending": [{"job": m.job, "role": m.role} for m in pending[:50]]}
                group.wait_change(left)
        finally:
            group.waiters -= 1

    def _send(self, group, client, message_id, message):
        if message is None:
            message = {}
        elif not isinstance(message, dict):
            message = {str(message)[:MAX_NAME]: None}  # LAVA: a bare word is a key
        if len(message) > MAX_KEYS:
            raise Refused("lava-send %r: %d keys, at most %d" % (message_id, len(message),
                                                                 MAX_KEYS))
        data = {}
        for key, value in message.items():
            key = _name(key, "a message key")
            if isinstance(value, (dict, list)):
                raise Refused("lava-send %r: the value of %s is not a string" % (message_id,
                                                                                  key))
            value = "" if value is None else str(value)
            if len(value) > MAX_VALUE:
                raise Refused("lava-send %r: the value of %s is longer than %d characters"
                              % (message_id, key, MAX_VALUE))
            data[key] = value
        if message_id not in group.sent and len(group.sent) >= MAX_MESSAGE_IDS:
            raise Refused("group %s has used %d message IDs already" % (group.name,
                                                                       MAX_MESSAGE_IDS))
        size = len(message_id) + sum(len(k) + len(v) for k, v in data.items())
        if group.stored + size > self.settings.max_group_bytes:
            raise Refused("group %s has sent %d bytes already (at most %d)"
                          % (group.name, group.stored, self.settings.max_group_bytes))
        group.stored += size
        group.sent.setdefault(message_id, {}).setdefault(client, {}).update(data)
        group.changed()
        return {"response": "ack"}

    @staticmethod
    def _wait(group, client, message_id):
        if message_id in group.sent:
            return {"response": "ack", "message": group.sent[message_id]}, None
        others = group.others(client)
        running = [m for m in others if not m.ended]
        if not running:
            raise Refused("lava-wait %r: no other job of the group is left to send it: %s"
                          % (message_id, "; ".join("%s %s" % (m.describe(), m.fate())
                                                   for m in others) or "it has no other job"))
        return _WAIT, running

    @staticmethod
    def _wait_all(group, client, message_id, role):
        if role is not None and not any(m.role == role for m in group.members.values()):
            raise Refused("lava-wait-all %r: group %s has no role %s" % (message_id,
                                                                        group.name, role))
        senders = group.sent.get(message_id, {})
        missing = [m for m in group.others(client)
                   if (role is None or m.role == role) and m.job not in senders]
        if not missing:
            return {"response": "ack", "message": senders}, None
        gone = [m for m in missing if m.ended]
        if gone:
            raise Refused("lava-wait-all %r: %s" % (message_id, "; ".join(
                "%s %s without sending it" % (m.describe(), m.fate()) for m in gone)))
        return _WAIT, missing

    @staticmethod
    def _sync(group, client, message_id):
        arrived, released = group.syncs.setdefault(message_id, (set(), set()))
        if client in released:
            released.discard(client)
            return {"response": "ack"}, None
        arrived.add(client)
        if arrived >= set(group.members):
            released |= arrived
            arrived.clear()
            released.discard(client)
            group.changed()
            return {"response": "ack"}, None
        missing = [m for m in group.members.values() if m.job not in arrived]
        gone = [m for m in missing if m.ended]
        if gone:
            raise Refused("lava-sync %r: %s" % (message_id, "; ".join(
                "%s %s without calling it" % (m.describe(), m.fate()) for m in gone)))
        return _WAIT, missing


def _health(job):
    health = getattr(job, "health", None)
    return getattr(health, "display", str(health or ""))


def _name(value, what):
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        raise Refused("%s: expected a name of 1 to %d characters" % (what, MAX_NAME))
    return value


def _recv_exact(sock, count):
    chunks, left = [], count
    while left:
        data = sock.recv(min(left, 65536))
        if not data:
            return None
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)
