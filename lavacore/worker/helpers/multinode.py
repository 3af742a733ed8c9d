"""LAVA's MultiNode helpers, for the roles of a group run by lavacore-run:

    lava-self                     this job's id
    lava-role [list]              this job's role; the roles of the group
    lava-group [ROLE]             "JOB<TAB>ROLE" per device job; the jobs of ROLE
    lava-send ID [KEY=VALUE...]   a message to the group (does not wait)
    lava-wait ID                  until a member has sent ID; its data in the cache file
    lava-wait-all ID [ROLE]       until every other member (of ROLE) has sent ID
    lava-sync ID                  until every member of the group has called lava-sync ID
    lava-network broadcast IFACE | collect IFACE [ROLE] | query JOB KEY | hosts FILE

Each call is a test case ``multinode-<call>-<id>`` (pass, or fail when it could not
complete), as in LAVA. A call that cannot complete (the group's timeout, a member that
ended without sending what is waited for, the coordinator unreachable) ends the job, as
in LAVA, where the sync fails and the job then times out.

The waits talk to the coordinator themselves, with lava-coordinator's protocol (a TCP
connection per request: 8 hex digits of length, a JSON request; the same back). lavacore's
coordinator holds a request that has to wait (``hold``) and answers as soon as it can,
so a lava-wait returns when the lava-send arrives, not at the next poll; Debian's
lava-coordinator answers "wait" at once and is polled every ``poll_delay`` seconds.

The data of ``lava-wait``/``lava-wait-all`` goes to ``$LAVA_MULTI_NODE_CACHE``, one
``JOB:KEY=VALUE`` line each (LAVA's /tmp/lava_multi_node_cache.txt, but one file per job,
since the jobs of several roles may share this host).
"""

import json
import os
import socket
import sys
import time

try:
    from . import common
except ImportError:  # run by main.py as a plain script
    import common

# What a message ID and a key may not hold: they travel in LAVA's space-separated
# markers (re is not imported: every helper call pays for its imports).
ID_FORBIDDEN = frozenset("=<>")
KEY_FORBIDDEN = frozenset("=<>:")
MAX_KEYS = 64
MAX_VALUE = 4096
# LAVA's client refuses to send a request of 0xFFFF bytes or more.
MAX_REQUEST = 0xFFFE
MAX_REPLY = 4 * 1024 * 1024
# How long one request may be held by the coordinator before it answers "wait".
HOLD = 30.0
CONNECT_TIMEOUT = 5.0
# lava-coordinator's default for the pause between two polls.
POLL_DELAY = 1.0
# Refused connections (a master restarting) are retried this often until the deadline.
RETRY = 0.25


class CallFailed(Exception):
    """A call that could not complete: (error_type, message) in LAVA's terms."""

    def __init__(self, error_type, message):
        super().__init__(message)
        self.error_type = error_type
        self.message = message


def load_conf():
    path = os.environ.get("LAVACORE_MULTINODE")
    if not path:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# -- the coordinator's protocol ----------------------------------------------------------

def _recv_exact(sock, count):
    chunks, left = [], count
    while left:
        data = sock.recv(min(left, 65536))
        if not data:
            raise ConnectionError("the coordinator closed the connection early")
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)


def roundtrip(address, request, timeout):
    """One request, one reply (a dict)."""
    data = json.dumps(request).encode("utf-8")
    if len(data) > MAX_REQUEST:
        raise CallFailed("Test", "the message is too long for the coordinator (%d bytes,"
                                 " at most %d)" % (len(data), MAX_REQUEST))
    with socket.create_connection(address, timeout=CONNECT_TIMEOUT) as sock:
        sock.settimeout(timeout)
        sock.sendall(b"%08X" % len(data) + data)
        sock.shutdown(socket.SHUT_WR)
        header = _recv_exact(sock, 8)
        try:
            size = int(header, 16)
        except ValueError:
            raise ConnectionError("the coordinator sent a bad header %r" % header) from None
        if size > MAX_REPLY:
            raise ConnectionError("the coordinator's reply is too long (%d bytes)" % size)
        reply = json.loads(_recv_exact(sock, size).decode("utf-8"))
    if not isinstance(reply, dict):
        raise ConnectionError("the coordinator's reply is not a JSON object")
    return reply


def _who(pending):
    """'job 12 (role client), job 13 (role client)' from a wait reply's ``pending``."""
    if not isinstance(pending, list):
        return ""
    names = []
    for item in pending[:10]:
        if isinstance(item, dict):
            names.append("job %s (role %s)" % (item.get("job"), item.get("role")))
    if len(pending) > 10:
        names.append("%d more" % (len(pending) - 10))
    return ", ".join(names)


def call(conf, request, what, timeout):
    """Send ``request`` until the coordinator answers it (ack, group_data...); raise
    CallFailed on a nack, at the deadline, or when the coordinator cannot be reached."""
    coordinator = conf.get("coordinator")
    if not coordinator:
        raise CallFailed("Infrastructure", "%s: no MultiNode coordinator is known to this"
                         " job (%s)" % (what, conf.get("coordinator_error") or "none set"))
    address = (coordinator["host"], int(coordinator["port"]))
    base = {"port": address[1], "blocksize": 4096, "poll_delay": int(POLL_DELAY),
            "host": address[0], "hostname": socket.gethostname(),
            "client_name": str(conf["job"]), "group_name": conf["group"],
            "role": conf["role"]}
    base.update(request)
    started = time.monotonic()
    deadline = started + timeout
    last_error, pending = None, None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        hold = min(HOLD, left)
        message = dict(base, hold=round(hold, 3))
        try:
            reply = roundtrip(address, message, hold + CONNECT_TIMEOUT)
        except CallFailed:
            raise
        except (OSError, ValueError) as exc:
            last_error = exc
            time.sleep(min(RETRY, max(0.0, deadline - time.monotonic())))
            continue
        last_error = None
        response = reply.get("response")
        if response == "wait":
            pending = reply.get("pending")
            if not reply.get("held"):
                # A coordinator that does not hold requests (Debian's) is polled.
                time.sleep(min(POLL_DELAY, max(0.0, deadline - time.monotonic())))
            continue
        if response == "nack":
            reason = reply.get("error") or "the coordinator refused it (nack)"
            raise CallFailed("Test", "%s: %s" % (what, reason))
        return reply
    if last_error is not None:
        raise CallFailed("Infrastructure", "%s: the coordinator at %s:%d cannot be reached"
                         " (%s) after %s" % (what, address[0], address[1], last_error,
                                             _seconds(timeout)))
    waiting = _who(pending)
    raise CallFailed("MultinodeTimeout", "%s timed out after %s%s" % (
        what, _seconds(timeout), ", waiting for " + waiting if waiting else ""))


def _seconds(value):
    return "%g seconds" % round(value, 3)


# -- the helpers -------------------------------------------------------------------------

def _finish(conf, op, message_id, outcome):
    """Report the call's test case; on failure end the job (and never return)."""
    case = ("multinode-%s-%s" % (op, message_id)).lower()
    if isinstance(outcome, CallFailed):
        sys.stderr.write("lava-%s: %s\n" % (op.replace("_", "-"), outcome.message))
        return common.stop_job({"case": case, "result": "fail", "abort": {
            "error_type": outcome.error_type, "message": common.clip(outcome.message, 2000)}})
    common.report({"case": case, "result": "pass"})
    return 0


def _write_cache(path, data):
    """LAVA's cache file: ``JOB:KEY=VALUE`` lines, the previous content replaced."""
    lines = []
    if isinstance(data, dict):
        for sender, values in data.items():
            if not isinstance(values, dict):
                continue
            for key, value in values.items():
                value = "" if value is None else str(value)
                lines.append("%s:%s=%s" % (sender, key, value.replace("\n", " ")))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    os.replace(tmp, path)
    return lines


def _word(value, forbidden):
    return bool(value) and len(value) <= 200 and not any(
        c.isspace() or c in forbidden for c in value)


def _message_id(value, helper):
    if not _word(value, ID_FORBIDDEN):
        raise common.UsageError("the message ID %r must be a word without '=', '<' or '>'"
                                % value)
    return value


def _key_values(args):
    data = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        # LAVA keeps only KEY=VALUE words with something on both sides.
        if not sep or not key or not value:
            continue
        if not _word(key, KEY_FORBIDDEN):
            raise common.UsageError("key %r: a word without ':', '=', '<' or '>'" % key)
        if len(value) > MAX_VALUE:
            raise common.UsageError("the value of %s is longer than %d characters"
                                    % (key, MAX_VALUE))
        data[key] = value
    if len(data) > MAX_KEYS:
        raise common.UsageError("at most %d KEY=VALUE pairs in one message" % MAX_KEYS)
    return data


def _not_multinode(helper):
    return common.error(helper, "this job is not a MultiNode job (no protocols:"
                                " lava-multinode), so it has no group", code=1)


def _timeout(conf):
    try:
        return max(0.0, float(conf.get("timeout") or 30.0))
    except (TypeError, ValueError):
        return 30.0


def lava_send(argv, conf):
    helper = "lava-send"
    try:
        if not argv:
            raise common.UsageError("a message ID is required")
        message_id = _message_id(argv[0], helper)
        data = _key_values(argv[1:])
    except common.UsageError as exc:
        return common.error(helper, "%s\nusage: lava-send ID [KEY=VALUE...]" % exc)
    pairs = "".join(" %s=%s" % item for item in data.items())
    common.signal("<LAVA_MULTI_NODE> <LAVA_SEND %s%s>" % (message_id, pairs))
    try:
        call(conf, {"request": "lava_send", "messageID": message_id, "message": data},
             "lava-send %r" % message_id, _timeout(conf))
    except CallFailed as exc:
        return _finish(conf, "send", message_id, exc)
    return _finish(conf, "send", message_id, None)


def _wait(conf, op, argv, request, usage):
    helper = "lava-" + op.replace("_", "-")
    try:
        if not argv or len(argv) > (2 if op == "wait_all" else 1):
            raise common.UsageError("expected %s" % usage)
        message_id = _message_id(argv[0], helper)
        if op == "wait_all" and len(argv) == 2:
            request["waitrole"] = argv[1]
    except common.UsageError as exc:
        return common.error(helper, "%s\nusage: %s %s" % (exc, helper, usage))
    request["messageID"] = message_id
    what = "%s %r" % (helper, message_id)
    if request.get("waitrole"):
        what += " (role %s)" % request["waitrole"]
    common.signal("<LAVA_MULTI_NODE> <LAVA_%s %s%s>" % (
        op.upper(), message_id, " " + request["waitrole"] if request.get("waitrole") else ""))
    try:
        reply = call(conf, request, what, _timeout(conf))
    except CallFailed as exc:
        common.signal("<LAVA_%s_COMPLETE nack>" % op.upper())
        return _finish(conf, op, message_id, exc)
    if op == "sync":
        common.signal("<LAVA_SYNC_COMPLETE>")
    else:
        lines = _write_cache(conf["cache"], reply.get("message"))
        common.signal("<LAVA_%s_COMPLETE%s>" % (op.upper(), "".join(" " + l for l in lines)))
    return _finish(conf, op, message_id, None)


def lava_wait(argv, conf):
    return _wait(conf, "wait", argv, {"request": "lava_wait"}, "ID")


def lava_wait_all(argv, conf):
    return _wait(conf, "wait_all", argv, {"request": "lava_wait_all"}, "ID [ROLE]")


def lava_sync(argv, conf):
    return _wait(conf, "sync", argv, {"request": "lava_sync", "message": None}, "ID")


def lava_self(argv, conf):
    print(conf["job"])
    return 0


def lava_role(argv, conf):
    if not argv:
        print(conf["role"])
        return 0
    if argv == ["list"]:
        seen = []
        for role in conf["roles"].values():
            if role not in seen:
                seen.append(role)
        print("\n".join(seen))
        return 0
    return common.error("lava-role", "usage: lava-role [list]")


def lava_group(argv, conf):
    roles = conf["roles"]
    if not argv:
        for job, role in roles.items():
            print("%s\t%s" % (job, role))
        return 0
    if len(argv) != 1:
        return common.error("lava-group", "usage: lava-group [ROLE]")
    matching = [job for job, role in roles.items() if role == argv[0]]
    if not matching:
        return 1  # LAVA: no such role, no output
    print("\n".join(matching))
    return 0


# -- lava-network --------------------------------------------------------------------------

_SIOCGIFADDR, _SIOCGIFBRDADDR, _SIOCGIFNETMASK = 0x8915, 0x8919, 0x891B
NETWORK_ID = "network_info"


def _ioctl_address(iface, request):
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            data = fcntl.ioctl(sock.fileno(), request,
                               struct.pack("256s", iface.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(data[20:24])


def network_info(iface):
    """LAVA's keys for one interface of this host (lava-network broadcast)."""
    import ipaddress
    import struct

    if not _word(iface, frozenset("/")) or len(iface) > 15 or \
            not os.path.exists("/sys/class/net/%s" % iface):
        raise common.UsageError("no network interface %r on this host" % iface)
    info = {"ipv4": _ioctl_address(iface, _SIOCGIFADDR),
            "netmask": _ioctl_address(iface, _SIOCGIFNETMASK),
            "broadcast": _ioctl_address(iface, _SIOCGIFBRDADDR)}
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                fields = line.split()
                if len(fields) == 6 and fields[5] == iface and fields[3] == "00":
                    info["ipv6"] = str(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
                    break
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/class/net/%s/address" % iface) as f:
            info["mac"] = f.read().strip()
    except OSError:
        pass
    info["hostname"] = info["hostname-full"] = socket.gethostname()
    try:
        with open("/proc/net/route") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if len(fields) > 3 and fields[1] == "00000000" and int(fields[3], 16) & 2:
                    info["default-gateway"] = socket.inet_ntoa(
                        struct.pack("<I", int(fields[2], 16)))
                    break
    except (OSError, ValueError):
        pass
    try:
        with open("/etc/resolv.conf") as f:
            servers = [line.split()[1] for line in f
                       if line.startswith("nameserver") and len(line.split()) > 1]
        for number, server in enumerate(servers[:3], 1):
            info["dns_%d" % number] = server
    except OSError:
        pass
    return {key: value for key, value in info.items() if value}


def _network_cache(conf):
    return os.path.join(os.path.dirname(conf["cache"]), "lava_multi_node_network_cache.txt")


def lava_network(argv, conf):
    helper = "lava-network"
    usage = ("usage: lava-network broadcast IFACE | collect IFACE [ROLE] | "
             "query JOB KEY | hosts FILE")
    if len(argv) < 2:
        return common.error(helper, usage)
    command = argv[0]
    if command == "broadcast" and len(argv) == 2:
        try:
            data = network_info(argv[1])
        except common.UsageError as exc:
            return common.error(helper, str(exc))
        return lava_send([NETWORK_ID] + ["%s=%s" % item for item in data.items()], conf)
    if command == "collect" and len(argv) in (2, 3):
        network = dict(conf, cache=_network_cache(conf))
        return lava_wait_all([NETWORK_ID] + argv[2:], network)
    if command in ("query", "hosts"):
        try:
            with open(_network_cache(conf)) as f:
                lines = [line.rstrip("\n") for line in f]
        except OSError:
            return common.error(helper, "no network data: call lava-network collect first")
        data = {}
        for line in lines:
            head, _, value = line.partition("=")
            job, _, key = head.partition(":")
            data.setdefault(job, {})[key] = value
        if command == "query" and len(argv) == 3:
            value = data.get(argv[1], {}).get(argv[2])
            if value is not None:
                print(value)
            return 0
        if command == "hosts" and len(argv) == 2:
            try:
                with open(argv[1], "a") as f:
                    for job, values in data.items():
                        if values.get("ipv4"):
                            f.write("%s\t%s\n" % (values["ipv4"], values.get("hostname", job)))
            except OSError as exc:
                return common.error(helper, "cannot write %s: %s" % (argv[1], exc.strerror))
            return 0
    return common.error(helper, usage)


COMMANDS = {
    "lava-self": lava_self,
    "lava-role": lava_role,
    "lava-group": lava_group,
    "lava-send": lava_send,
    "lava-wait": lava_wait,
    "lava-wait-all": lava_wait_all,
    "lava-sync": lava_sync,
    "lava-network": lava_network,
}


def dispatch(name, argv):
    conf = load_conf()
    if conf is None:
        return _not_multinode(name)
    try:
        return COMMANDS[name](argv, conf)
    except common.ReportError as exc:
        return common.error(name, str(exc))
