"""What every master service shares: start/stop life cycle around one greenlet loop."""

import logging

import gevent
import gevent.event
import zmq as plain_zmq
import zmq.green as zmq

from ..config import ConfigError
from ..netaddr import needs_ipv6


class Service:
    """A greenlet service. Subclasses implement ``setup()`` (bind sockets; called by
    ``start()``), ``run()`` (the loop; returns when ``self.stopping`` is set) and
    ``teardown()`` (close sockets). Nothing happens in the constructor."""

    name = "service"

    def __init__(self, master):
        self.master = master
        self.log = logging.getLogger("lavacore." + self.name)
        self.stopping = gevent.event.Event()
        self.greenlet = None

    def setup(self):
        pass

    def run(self):
        self.stopping.wait()

    def teardown(self):
        pass

    def start(self):
        self.setup()
        self.greenlet = gevent.spawn(self.run)
        self.greenlet.name = self.name
        return self.greenlet

    def stop(self, timeout=5):
        if self.stopping.is_set():
            return
        self.stopping.set()
        # The loop is parked in a poll or a wait; interrupting it there is safe (a
        # transaction in progress rolls back), and stopping does not wait for a timeout.
        if self.greenlet is not None and not self.greenlet.dead and \
                self.greenlet is not gevent.getcurrent():
            self.greenlet.kill(block=True, timeout=timeout)
        self.teardown()

    def bind(self, kind, role, key, address, options, what):
        """A socket of ``kind`` with ``options``, offered to the ``secure_socket`` hook,
        bound to ``address`` (from config ``key``); returns (socket, bound endpoint)."""
        sock = self.master.context.socket(kind)
        for option, value in options.items():
            sock.setsockopt(option, value)
        if self.master.config.master.ipv6 or needs_ipv6(address):
            sock.setsockopt(zmq.IPV6, 1)
        self.master.hook.secure_socket(master=self.master, role=role, socket=sock)
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ConfigError("%s: cannot bind %s: %s" % (key, address, exc)) from None
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.log.info("%s on %s", what, endpoint)
        return sock, endpoint

    @staticmethod
    def plain(sock):
        """The same libzmq socket without zmq.green's wrapper, for the NOBLOCK receives and
        sends of a drain loop. The wrapper reads the socket's events after every call
        (about a third of a message's cost); the green Poller, which does the waiting,
        polls with a zero timeout before it sleeps, so it loses nothing. Not owned: the
        green socket closes it."""
        return plain_zmq.Socket.shadow(sock.underlying)

    def wait(self, timeout):
        """Sleep for ``timeout`` seconds unless the service is stopped first."""
        return self.stopping.wait(timeout)


def recv_bounded(sock, max_frames, copy=True):
    """One message of a plain (non-green) socket, received NOBLOCK: (its first
    ``max_frames`` frames, how many it had). The frames past the bound are read and
    dropped at once, so a peer sending a million empty frames costs no memory."""
    frames = [sock.recv(plain_zmq.NOBLOCK, copy=copy)]
    total = 1
    while sock.getsockopt(plain_zmq.RCVMORE):
        # The rest of a multipart message has arrived with its first frame.
        frame = sock.recv(plain_zmq.NOBLOCK, copy=copy)
        total += 1
        if total <= max_frames:
            frames.append(frame)
    return frames, total
