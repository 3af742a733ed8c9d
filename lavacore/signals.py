"""The signals a lavacore daemon (the master, an API process) answers."""

import os
import signal

import gevent


def install(stop, reload, log):
    """SIGTERM and SIGINT call ``stop()`` in a greenlet (a second SIGINT exits at once,
    status 130); SIGHUP calls ``reload()``. Returns the handlers, to cancel when done."""
    interrupts = []

    def on_stop(signum):
        if signum == signal.SIGINT and interrupts:
            os._exit(130)
        interrupts.append(signum)
        log.info("signal %s: stopping", signal.Signals(signum).name)
        gevent.spawn(stop)

    return [gevent.signal_handler(signal.SIGTERM, on_stop, signal.SIGTERM),
            gevent.signal_handler(signal.SIGINT, on_stop, signal.SIGINT),
            gevent.signal_handler(signal.SIGHUP, reload)]
