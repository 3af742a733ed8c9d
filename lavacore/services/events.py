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

from .base import Service


def encode_event(topic, username, data, now=None):
    stamp = (now or datetime.datetime.now(datetime.timezone.utc)).replace(tzinfo=None)
    return [topic.encode(), str(uuid.uuid4()).encode(), stamp.isoformat().encode(),
            (username or "lava-health").encode(), json.dumps(data, default=str).encode()]


class EventService(Service):
    name = "events"

    def __init__(self, master):
        super().__init__(master)
        self.socket = None
        self.endpoint = None
        self.sub = None
        self.topic = master.config.master.event_topic

    def setup(self):
        config = self.master.config.master
        self.socket, self.endpoint = self.bind(
            zmq.PUB, "events", "[master] events", config.events,
            {zmq.LINGER: 0, zmq.SNDHWM: 100000}, "publishing events")
        if config.event_url:
            sub = self.master.context.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
            sub.connect(config.event_url)
            self.sub = sub
            self.log.info("listening to external events on %s", config.event_url)

    def teardown(self):
        for sock in (self.socket, self.sub):
            if sock is not None:
                sock.close(linger=0)
        self.socket = self.sub = None

    def publish(self, kind, data, username=None):
        """Publish one event and let the master react to it."""
        if self.socket is not None:
            try:
                self.socket.send_multipart(
                    encode_event("%s.%s" % (self.topic, kind), username, data), zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                self.log.warning("cannot publish a %s event: %s", kind, exc)
        self.master.on_event(kind, data)

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
                    frames = self.sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) != 5:
                    self.log.warning("external event with %d frames ignored", len(frames))
                    continue
                try:
                    data = json.loads(frames[4])
                    kind = frames[0].decode().rsplit(".", 1)[-1]
                except (ValueError, UnicodeDecodeError) as exc:
                    self.log.warning("external event ignored: %s", exc)
                    continue
                if isinstance(data, dict):
                    self.master.on_event(kind, data)
