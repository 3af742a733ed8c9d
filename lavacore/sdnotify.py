"""systemd's service notifications (``Type=notify``), without a library: one datagram
to the unix socket named by ``$NOTIFY_SOCKET`` per message, as sd_notify(3) sends it.

``ready()`` once the process serves (READY=1), ``stopping()`` when it stops, and, when
the unit sets ``WatchdogSec=``, :func:`start_watchdog` sends WATCHDOG=1 from a greenlet
at half the interval: if the gevent loop stalls (a C call that never returns, a busy
loop), the pings stop and systemd restarts the service. Outside systemd every call is a
no-op.
"""

import logging
import os
import socket
import time

import gevent

log = logging.getLogger("lavacore.sdnotify")


def _address():
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path or path[0] not in "/@":
        return None
    return "\0" + path[1:] if path[0] == "@" else path  # @: Linux abstract namespace


def notify(*fields):
    """Send ``fields`` ("READY=1", "STATUS=...") as one message; False when there is no
    systemd to tell (or it cannot be told: a service must not fail for that)."""
    address = _address()
    if address is None:
        return False
    message = "\n".join(fields).encode("utf-8", "replace")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        sock.sendto(message, address)
        return True
    except OSError as exc:
        log.debug("cannot notify systemd at %s: %s", address, exc)
        return False
    finally:
        sock.close()


def ready(status=""):
    return notify("READY=1", *(["STATUS=" + status] if status else []))


def reloading():
    # MONOTONIC_USEC: what Type=notify-reload (systemd 253) asks RELOADING=1 to carry.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", "MONOTONIC_USEC=%d" % usec)


def stopping(status=""):
    return notify("STOPPING=1", *(["STATUS=" + status] if status else []))


def watchdog_interval():
    """Seconds between two WATCHDOG=1, half of systemd's ``WatchdogSec``; None when the
    unit has no watchdog for this process."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2_000_000


def start_watchdog(alive=None):
    """The greenlet sending WATCHDOG=1, or None without a watchdog. Kill it to stop.
    With ``alive`` (a callable), a beat is sent only while it returns true: a process
    that knows it is broken (a service of the master gone) lets systemd restart it."""
    interval = watchdog_interval()
    if interval is None or _address() is None:
        return None

    def beat():
        while True:
            if alive is None or alive():
                notify("WATCHDOG=1")
            gevent.sleep(interval)

    greenlet = gevent.spawn(beat)
    greenlet.name = "sd-watchdog"
    log.info("systemd watchdog: WATCHDOG=1 every %.1f s", interval)
    return greenlet
