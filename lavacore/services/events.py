"""The lava-publisher role: a PUB socket of job, device and worker events.

Frames as LAVA's publisher sends them: ``[topic, uuid, ISO datetime, username, JSON]``,
topic ``<event_topic>.testjob`` / ``.device`` / ``.worker`` / ``.event``. Every event the
master publishes is also handed to the master itself (``master.on_event``), which is how a
cancel, a new job or a freed device wake the right service at once. With ``event_url``,
events from an external LAVA publisher are read too and react the same way (not
republished).
"""

import datetime
import json
import uuid

import zmq.green as zmq

from .. import permissions, safeyaml
from ..config import ConfigError
from ..netaddr import needs_ipv6
from ..ratelog import RateLimitedLog
from ..storage import StorageError
from .base import Service, recv_bounded


def encode_event(topic, username, data, now=None):
    stamp = (now or datetime.datetime.now(datetime.timezone.utc)).replace(tzinfo=None)
    return [topic.encode(), str(uuid.uuid4()).encode(), stamp.isoformat().encode(),
            (username or "lava-health").encode(), json.dumps(data, default=str).encode()]


class EventService(Service):
    name = "events"

    def __init__(self, master):
        super().__init__(master)
        self.socket = None
        self._plain_pub = None
        self.endpoint = None
        self.sub = None
        self._plain_sub = None
        self.topic = master.config.master.event_topic
        self._drops = RateLimitedLog(self.log)
        self.subscribers = set()  # websocket sessions (lavacore.api.websocket)

    def setup(self):
        config = self.master.config.master
        self.socket, self.endpoint = self.bind(
            zmq.PUB, "events", "[master] events", config.events,
            {zmq.LINGER: 0, zmq.SNDHWM: 100000}, "publishing events")
        # A PUB socket never blocks a send (it drops past SNDHWM): the plain socket
        # spares each event zmq.green's bookkeeping.
        self._plain_pub = self.plain(self.socket)
        if config.event_url:
            sub = self.master.context.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
            sub.setsockopt(zmq.MAXMSGSIZE, 1024 * 1024)
            sub.setsockopt(zmq.RCVHWM, 10000)
            if config.ipv6 or needs_ipv6(config.event_url):
                sub.setsockopt(zmq.IPV6, 1)
            try:
                sub.connect(config.event_url)
            except zmq.ZMQError as exc:
                sub.close(linger=0)
                raise ConfigError("[master] event_url: cannot connect to %s: %s"
                                  % (config.event_url, exc)) from None
            self.sub = sub
            self._plain_sub = self.plain(sub)
            self.log.info("listening to external events on %s", config.event_url)

    def teardown(self):
        for sock in (self.socket, self.sub):
            if sock is not None:
                sock.close(linger=0)
        self.socket = self.sub = self._plain_sub = self._plain_pub = None

    def publish(self, kind, data, username=None):
        """Publish one event and let the master react to it. The PUB socket's subscribers
        are anonymous: an event of a job (or device) they may not see goes out without
        what identifies it (permissions.event_for); each websocket subscriber gets it as
        its own user may see it."""
        topic = "%s.%s" % (self.topic, kind)
        stamp = datetime.datetime.now(datetime.timezone.utc)
        if self._plain_pub is not None:
            shown = self._for_anonymous(kind, data, username)
            if shown is not None:
                try:
                    self._plain_pub.send_multipart(encode_event(topic, shown[1], shown[0], stamp),
                                               zmq.NOBLOCK)
                except zmq.ZMQError as exc:
                    self.log.warning("cannot publish a %s event: %s", kind, exc)
        for subscriber in list(self.subscribers):
            subscriber.offer(kind, topic, data, username, stamp)
        self.master.on_event(kind, data)

    def _for_anonymous(self, kind, data, username):
        try:
            return permissions.event_for(self.master.anonymous_policy(), kind, data, username)
        except StorageError:
            # Cannot tell who may see it: as little as any job event ever carries.
            return permissions.event_for(None, kind, data, username)

    def permissions_changed(self):
        for subscriber in list(self.subscribers):
            subscriber.permissions_changed()

    def run(self):
        if self.sub is None:
            return super().run()
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        while not self.stopping.is_set():
            if not poller.poll(500):
                continue
            while True:
                try:
                    frames, total = recv_bounded(self._plain_sub, 5)
                except zmq.Again:
                    break
                if total != 5:
                    self._drops.warning("frames", "external event with %d frames ignored",
                                        total)
                    continue
                try:
                    data = safeyaml.json_loads(frames[4])
                    kind = frames[0].decode().rsplit(".", 1)[-1]
                    if isinstance(data, dict):
                        self.master.on_event(kind, data)
                except (ValueError, UnicodeDecodeError) as exc:
                    self._drops.warning("bad", "external event ignored: %s", exc)
                except StorageError as exc:
                    self.master.storage_fault("an external event", exc)
                except Exception as exc:  # noqa: BLE001 - one event, never the master
                    self._drops.error("bug", "external event ignored: %s: %s",
                                      type(exc).__name__, exc, exc_info=True)
