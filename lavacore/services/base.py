"""What every master service shares: start/stop life cycle around one greenlet loop."""

import logging

import gevent
import gevent.event


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

    def wait(self, timeout):
        """Sleep for ``timeout`` seconds unless the service is stopped first."""
        return self.stopping.wait(timeout)
