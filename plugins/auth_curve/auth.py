"""One master's CURVE state: its settings, the allowed keys and the decisions with their log
lines (what was refused, from whom, why; each repeat at most once a minute)."""

import logging
import time

from .keys import KeyDirectory
from .service import CurveService

log = logging.getLogger("lavacore.auth_curve")

# An unknown key at a handshake re-reads workers_certs (a key file just dropped in is
# accepted at once), but a flood of unknown keys must not turn into a flood of scans.
RESCAN_GAP = 0.1
REPEAT_LOG = 60.0
MAX_REMEMBERED = 10000


class Throttle:
    """True the first time a key is seen, then at most once per ``interval`` seconds."""

    def __init__(self, interval=REPEAT_LOG, clock=time.monotonic):
        self.interval = interval
        self.clock = clock
        self._last = {}
        self.suppressed = {}

    def __call__(self, key):
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return False
        if len(self._last) >= MAX_REMEMBERED:
            self._last.clear()
            self.suppressed.clear()
        self._last[key] = now
        return True

    def repeats(self, key):
        count = self.suppressed.pop(key, 0)
        return " (%d more like it since the last report)" % count if count else ""


class CurveAuth:
    def __init__(self, master, settings):
        self.master = master
        self.settings = settings
        self.keys = KeyDirectory(settings.workers_certs)
        self.service = CurveService(master, self)
        self._say = Throttle()
        self._last_rescan = float("-inf")
        self.refusals = 0

    def scan(self, force=False):
        return self.keys.scan(force=force)

    def reload(self, why):
        self.keys.scan(force=True)
        log.info("%s: re-read %s: %d worker key(s) allowed", why, self.keys.path,
                 len(self.keys.by_name))

    # -- handshakes (the ZAP handler) ----------------------------------------------------

    def handshake(self, key, role, address):
        """May ``key`` complete a CURVE handshake? ``(allowed, reason)``."""
        if key in self.keys.by_key:
            return True, "OK"
        now = time.monotonic()
        if now - self._last_rescan >= RESCAN_GAP:
            self._last_rescan = now
            self.keys.scan()
            if key in self.keys.by_key:
                log.info("key %s (%s) picked up at its first handshake", key,
                         ", ".join(self.keys.names_of(key)))
                return True, "OK"
        reason = self.keys.why_not(key)
        self.refusals += 1
        said = ("handshake", key)
        if self._say(said):
            log.warning("refused a CURVE handshake from %s on the %s socket: %s %s%s",
                        address or "?", role or "?", reason.split(" (")[0], key,
                        _detail(reason) + self._say.repeats(said))
        return False, reason.split(" (")[0]

    def refused_connection(self, role, address, reason, endpoint=None):
        """A connection refused before ZAP could name its key (from a socket monitor)."""
        self.refusals += 1
        said = ("connection", role, reason)
        if self._say(said):
            log.warning("refused a connection on the %s socket%s%s: %s%s", role,
                        " (%s)" % endpoint if endpoint else "",
                        " from %s" % address if address else "", reason,
                        self._say.repeats(said))

    # -- messages (authorize_worker, called by the controller and the log service) -------

    def decide(self, hostname, key, policy):
        """The final word on a message from ``key`` speaking as ``hostname``: the key must
        be allowed *now* (a revoked key ends its established sessions), and ``policy``, the
        authorize_worker answer of the installed plugins, must say True."""
        if key is None:
            reason = "no CURVE key: a plaintext peer, and encryption is on"
        elif key not in self.keys.by_key:
            reason = self.keys.why_not(key)
        elif policy is True:
            return True
        else:
            names = self.keys.names_of(key)
            if hostname not in names:
                reason = "key bound to another hostname (%s)" % ", ".join(
                    n + ".key" for n in names)
            else:
                reason = "refused by the authorize_worker policy"
        self.refusals += 1
        said = ("message", hostname, key, reason)
        if self._say(said):
            log.warning("worker %s: refused its traffic from key %s: %s%s", hostname, key,
                        reason, self._say.repeats(said))
        return False


def _detail(reason):
    head, sep, tail = reason.partition(" (")
    return " (" + tail if sep else ""
