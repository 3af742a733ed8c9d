"""Time as the master sees it, injectable so tests move time instead of sleeping."""

import time


class Clock:
    """Wall time (epoch seconds, stored and shown) and monotonic time (intervals)."""

    def time(self):
        return time.time()

    def monotonic(self):
        return time.monotonic()


class FakeClock(Clock):
    """A clock that only moves when told to: ``advance(seconds)``."""

    def __init__(self, start=1_700_000_000.0):
        self._now = float(start)
        self._mono = 1000.0

    def time(self):
        return self._now

    def monotonic(self):
        return self._mono

    def advance(self, seconds):
        self._now += seconds
        self._mono += seconds
