"""Log lines about what peers send, at a rate a peer cannot turn into a disk flood.

A malformed message is dropped with a log line naming the peer and the reason. A peer that
sends a million of them must not write a million lines: per key (a kind of fault, a peer)
at most ``burst`` lines every ``period`` seconds, and at most ``total`` for all keys
together; what was held back is counted and said with the next line that gets through.
The keys are kept in a bounded LRU, so rotating names costs no memory.
"""

import collections
import logging
import time


class RateLimitedLog:
    def __init__(self, logger, burst=5, period=60.0, total=100, keys=4096,
                 clock=time.monotonic):
        self.logger = logger
        self.burst = burst
        self.period = period
        self.total = total
        self.clock = clock
        self._keys = collections.OrderedDict()  # key -> [window start, lines, held back]
        self._size = keys
        self._window = [0.0, 0, 0]              # the same, for all keys
        self.held_back = 0

    def warning(self, key, msg, *args, exc_info=False):
        self.log(logging.WARNING, key, msg, *args, exc_info=exc_info)

    def error(self, key, msg, *args, exc_info=False):
        self.log(logging.ERROR, key, msg, *args, exc_info=exc_info)

    def info(self, key, msg, *args):
        self.log(logging.INFO, key, msg, *args)

    def log(self, level, key, msg, *args, exc_info=False):
        """Log ``msg % args`` unless ``key`` (or everyone) said enough lately. With
        ``exc_info`` the traceback goes to DEBUG, so the line itself stays one line."""
        now = self.clock()
        state = self._keys.get(key)
        if state is None or now - state[0] >= self.period:
            held = state[2] if state is not None else 0
            state = [now, 0, held]
            self._keys[key] = state
            while len(self._keys) > self._size:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key)
        window = self._window
        if now - window[0] >= self.period:
            window[:] = [now, 0, window[2]]
        if state[1] >= self.burst or window[1] >= self.total:
            state[2] += 1
            window[2] += 1
            self.held_back += 1
            return False
        state[1] += 1
        window[1] += 1
        if state[2]:
            msg += " (%d similar line(s) held back)" % state[2]
            window[2] = max(0, window[2] - state[2])
            state[2] = 0
        elif window[2] and window[1] == 1:
            msg += " (%d line(s) about other peers held back)" % window[2]
            window[2] = 0
        self.logger.log(level, msg, *args)
        if exc_info and self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("the traceback of the line above", exc_info=True)
        return True
