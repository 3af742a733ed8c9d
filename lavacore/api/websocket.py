"""The event stream at ``/ws/``, as LAVA serves it from 2020.09 (lavacli's ``events
listen`` and ``jobs wait`` read it): a websocket (RFC 6455) over which the master sends
each event as one text message, the JSON array ``[topic, uuid, datetime, username,
data]`` where ``data`` is the event's JSON text.

The subscriber authenticates as for the API (HTTP basic ``user:token``, which lavacli
sends from its URL), and receives each event as its user may see it: a job it may not see
comes without what identifies it, a device it may not see not at all (permissions.
event_for). Only pings and a close are read from the client; a frame is at most 64 KiB.
A subscriber that does not keep up (its queue of events is full) is disconnected rather
than letting the master hold events for it.
"""

import base64
import hashlib
import json
import logging
import struct

import gevent
import gevent.event
import gevent.lock
import gevent.queue

from .. import permissions
from ..storage import StorageError

log = logging.getLogger("lavacore.api")

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_FRAME = 64 * 1024
QUEUE = 10000          # events waiting for one subscriber before it is cut off
MAX_SUBSCRIBERS = 1000
PING_EVERY = 30.0
SILENT_FOR = 120.0     # no frame from the client (pongs included) for this long: gone
POLICY_AGE = 60.0

TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA


class ProtocolError(Exception):
    pass


def accept_key(key):
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key (None if malformed)."""
    try:
        if len(base64.b64decode(key.encode("ascii"), validate=True)) != 16:
            return None
    except (ValueError, UnicodeEncodeError):
        return None
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode()


def frame(opcode, payload=b""):
    """One unmasked, final frame (a server's)."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return head + payload


def read_frame(rfile):
    """(opcode, payload) of the client's next frame; ProtocolError for anything not a
    masked frame within MAX_FRAME; EOFError when the connection closed."""
    head = rfile.read(2)
    if len(head) < 2:
        raise EOFError()
    first, second = head
    opcode = first & 0x0F
    if not second & 0x80:
        raise ProtocolError("unmasked frame from a client")
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", _exactly(rfile, 2))[0]
    elif size == 127:
        size = struct.unpack("!Q", _exactly(rfile, 8))[0]
    if size > MAX_FRAME:
        raise ProtocolError("a frame of %d bytes" % size)
    mask = _exactly(rfile, 4)
    data = bytearray(_exactly(rfile, size))
    for index in range(len(data)):
        data[index] ^= mask[index % 4]
    return opcode, bytes(data)


def _exactly(rfile, count):
    data = rfile.read(count)
    if len(data) < count:
        raise EOFError()
    return data


class Subscriber:
    """One websocket client: a bounded queue the event service fills."""

    def __init__(self, storage, principal, clock):
        self.storage = storage
        self.principal = principal
        self.clock = clock
        self.queue = gevent.queue.Queue(QUEUE)
        self.overflowed = False
        self._policy = None

    def policy(self):
        if self._policy is None or self.clock() - self._policy[1] > POLICY_AGE:
            self._policy = (permissions.Policy(self.storage, self.principal), self.clock())
        return self._policy[0]

    def permissions_changed(self):
        self._policy = None

    def offer(self, kind, topic, data, username, stamp):
        """Called by the event service for every event (never blocks)."""
        if self.overflowed:
            return
        try:
            self.queue.put_nowait((kind, topic, data, username, stamp))
        except gevent.queue.Full:
            self.overflowed = True
            self.queue = gevent.queue.Queue(1)
            self.queue.put_nowait(None)  # wakes the sender, which closes

    def message(self, kind, topic, data, username, stamp):
        """The text message of one event for this subscriber, or None."""
        try:
            shown = permissions.event_for(self.policy(), kind, data, username)
        except StorageError:
            shown = permissions.event_for(None, kind, data, username)
        if shown is None:
            return None
        data, username = shown
        return json.dumps([topic, "", stamp.replace(tzinfo=None).isoformat(),
                           username or "lava-health", json.dumps(data, default=str)])


def serve(handler, master, user):
    """Run one websocket session on a pywsgi handler whose request asked for an upgrade
    (the request's credentials were checked by the caller: ``user`` or None)."""
    headers = handler.headers
    key = accept_key(headers.get("Sec-WebSocket-Key", ""))
    if key is None or headers.get("Sec-WebSocket-Version", "") != "13":
        handler.socket.sendall(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n"
                               b"Content-Length: 0\r\n\r\n")
        return
    events = master.events
    if len(events.subscribers) >= MAX_SUBSCRIBERS:
        handler.socket.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 30\r\n"
                               b"Connection: close\r\nContent-Length: 0\r\n\r\n")
        return
    principal = permissions.Principal.load(master.storage, user)
    subscriber = Subscriber(master.storage, principal, master.clock.monotonic)
    sock = handler.socket
    sock.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % key).encode())
    sock.settimeout(None)
    lock = gevent.lock.Semaphore()
    heard = [master.clock.monotonic()]
    closing = gevent.event.Event()

    def send(opcode, payload=b""):
        with lock:
            sock.sendall(frame(opcode, payload))

    def reader():
        try:
            while True:
                opcode, payload = read_frame(handler.rfile)
                heard[0] = master.clock.monotonic()
                if opcode == PING:
                    send(PONG, payload[:125])
                elif opcode == CLOSE:
                    send(CLOSE, payload[:2])
                    return
        except (EOFError, OSError, ProtocolError):
            return
        finally:
            closing.set()
            try:
                subscriber.queue.put_nowait(None)  # wakes the sender
            except gevent.queue.Full:
                pass

    events.subscribers.add(subscriber)
    reading = gevent.spawn(reader)
    try:
        while not closing.is_set():
            try:
                item = subscriber.queue.get(timeout=PING_EVERY)
            except gevent.queue.Empty:
                if master.clock.monotonic() - heard[0] > SILENT_FOR:
                    break
                send(PING, b"lavacore")
                continue
            if item is None:
                break
            text = subscriber.message(*item)
            if text is not None:
                send(TEXT, text.encode("utf-8"))
        if subscriber.overflowed:
            log.warning("websocket subscriber %s: more than %d events behind; disconnected",
                        user or "anonymous", QUEUE)
    except OSError:
        pass
    finally:
        events.subscribers.discard(subscriber)
        reading.kill(block=False)
        try:
            send(CLOSE, struct.pack("!H", 1000))
        except OSError:
            pass
