"""Memory shared by the processes of an API pool (``lavacore api --processes N``).

The pool's parent makes one memfd before it starts its children and hands it to each of
them; every process maps it. It holds two things:

- **Per-process numbers** (a block of float64 per process, written only by the process
  it belongs to, read by all): pid, start time, the heartbeat of its loop (which the
  parent watches), open connections, websocket subscribers, requests by kind and the
  histograms of request time, loop lag and storage statements. Whichever process
  answers ``/metrics`` shows every process's numbers, labelled ``process="N"``, so a
  scraper reaching the pool through one address sees the same series at every scrape.
- **Per-client counters** (a small open-addressing table keyed by the client's
  address): failed authentications (with the window they fall in) and open connections,
  one column per process. ``[api] max_auth_failures`` and ``max_client_connections`` are
  limits of the pool, as they are of a master: a client cannot get N times more by
  landing on N processes. A process writes only its own column; taking a slot for a new
  address (or another's expired one) is done under an ``flock`` of the memfd, held for
  microseconds. When the table is full, the process counts that client on its own.

A single process (``--processes 1``) uses a private mapping of the same layout for its
numbers, and the master's own per-process throttle and connection counts.
"""

import fcntl
import hashlib
import ipaddress
import mmap
import os
import struct
import zlib

from ..metrics import LAG_BUCKETS, STATEMENT_BUCKETS

MAGIC = 0x6C617661636F7265  # "lavacore"
HEADER = struct.Struct("<qqd")  # magic, processes, children restarted by the parent
MAX_PROCESSES = 64

KINDS = ("xmlrpc", "rest", "web", "metrics", "health")
# One request: an XML-RPC show takes about a millisecond, a big page tens of them.
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                   2.5, 5, 10)
HISTOGRAMS = (("request_seconds", REQUEST_BUCKETS), ("loop_lag", LAG_BUCKETS),
              ("statement_seconds", STATEMENT_BUCKETS))

# The per-process block: named float64 fields, then each histogram's buckets and sum.
SCALARS = ("pid", "started", "beat", "connections", "subscribers") + tuple(
    "requests_" + kind for kind in KINDS)


def _layout():
    offsets, index = {}, 0
    for name in SCALARS:
        offsets[name] = index
        index += 1
    for name, bounds in HISTOGRAMS:
        offsets[name] = index
        index += len(bounds) + 2  # buckets (+Inf included), then the sum
    return offsets, index


OFFSETS, FIELDS = _layout()
BLOCK = struct.Struct("<%dd" % FIELDS)

SLOTS = 4096
PROBE = 16
SLOT_HEAD = struct.Struct("<q16s")      # used (0/1), the client's key
COLUMN = struct.Struct("<dii")          # failures' window start, failures, connections


def client_key(address):
    """16 bytes naming a client address (an IPv4 address as its IPv6-mapped form)."""
    try:
        ip = ipaddress.ip_address(str(address).split("%", 1)[0])
    except ValueError:
        return hashlib.blake2b(str(address).encode("utf-8", "replace"),
                               digest_size=16).digest()
    if ip.version == 4:
        ip = ipaddress.IPv6Address("::ffff:" + str(ip))
    return ip.packed


class PoolMemory:
    """The shared mapping: ``create(processes)`` in the parent, ``attach(fd)`` in a child."""

    def __init__(self, fd, processes, mapping):
        self.fd = fd
        self.processes = processes
        self.map = mapping
        self.stats_at = HEADER.size
        self.table_at = self.stats_at + processes * BLOCK.size
        self.slot_size = SLOT_HEAD.size + processes * COLUMN.size

    @staticmethod
    def size(processes):
        return HEADER.size + processes * BLOCK.size + SLOTS * (
            SLOT_HEAD.size + processes * COLUMN.size)

    @classmethod
    def create(cls, processes):
        if not 1 <= processes <= MAX_PROCESSES:
            raise ValueError("processes: 1 to %d" % MAX_PROCESSES)
        fd = os.memfd_create("lavacore-api-pool", os.MFD_CLOEXEC)
        os.ftruncate(fd, cls.size(processes))
        mapping = mmap.mmap(fd, cls.size(processes))
        HEADER.pack_into(mapping, 0, MAGIC, processes, 0.0)
        return cls(fd, processes, mapping)

    @classmethod
    def attach(cls, fd):
        head = os.pread(fd, HEADER.size, 0)
        magic, processes, _ = HEADER.unpack(head)
        if magic != MAGIC or not 1 <= processes <= MAX_PROCESSES:
            raise ValueError("not an API pool's shared memory")
        return cls(fd, processes, mmap.mmap(fd, cls.size(processes)))

    # -- the header ---------------------------------------------------------------------

    @property
    def restarts(self):
        return HEADER.unpack_from(self.map, 0)[2]

    def count_restart(self):
        struct.pack_into("<d", self.map, 16, self.restarts + 1)

    # -- per-process numbers -------------------------------------------------------------

    def write_block(self, index, values):
        BLOCK.pack_into(self.map, self.stats_at + index * BLOCK.size, *values)

    def read_block(self, index):
        return BLOCK.unpack_from(self.map, self.stats_at + index * BLOCK.size)

    def beat_of(self, index):
        return struct.unpack_from("<d", self.map, self.stats_at + index * BLOCK.size
                                  + 8 * OFFSETS["beat"])[0]

    def clear_process(self, index):
        """A child is gone: its numbers and its share of every client's counters."""
        self.write_block(index, [0.0] * FIELDS)
        with self.locked():
            for slot in range(SLOTS):
                at = self._column_at(slot, index)
                COLUMN.pack_into(self.map, at, 0.0, 0, 0)

    # -- per-client counters ---------------------------------------------------------------

    def locked(self):
        return _Flock(self.fd)

    def _slot_at(self, slot):
        return self.table_at + slot * self.slot_size

    def _column_at(self, slot, index):
        return self._slot_at(slot) + SLOT_HEAD.size + index * COLUMN.size

    def columns(self, slot):
        at = self._slot_at(slot) + SLOT_HEAD.size
        return [COLUMN.unpack_from(self.map, at + i * COLUMN.size)
                for i in range(self.processes)]

    def _probe(self, key):
        start = zlib.crc32(key) % SLOTS
        return [(start + step) % SLOTS for step in range(PROBE)]

    def find(self, key):
        """The slot holding ``key``, or None (no lock: a reader)."""
        for slot in self._probe(key):
            used, stored = SLOT_HEAD.unpack_from(self.map, self._slot_at(slot))
            if used and stored == key:
                return slot
        return None

    def claim(self, key, now, window):
        """The slot of ``key``, taken if needed (call with the lock held): a free slot, or
        one whose client has no connection open and no failure within ``window``.
        None when every slot on its path is in use."""
        spare = None
        for slot in self._probe(key):
            used, stored = SLOT_HEAD.unpack_from(self.map, self._slot_at(slot))
            if used and stored == key:
                return slot
            if spare is None and (not used or self._idle(slot, now, window)):
                spare = slot
        if spare is None:
            return None
        SLOT_HEAD.pack_into(self.map, self._slot_at(spare), 1, key)
        for index in range(self.processes):
            COLUMN.pack_into(self.map, self._column_at(spare, index), 0.0, 0, 0)
        return spare

    def _idle(self, slot, now, window):
        return all(connections <= 0 and (failures == 0 or now - start >= window)
                   for start, failures, connections in self.columns(slot))

    def add_connection(self, slot, index, delta):
        at = self._column_at(slot, index)
        start, failures, connections = COLUMN.unpack_from(self.map, at)
        COLUMN.pack_into(self.map, at, start, failures, max(0, connections + delta))

    def add_failure(self, slot, index, now, window):
        at = self._column_at(slot, index)
        start, failures, connections = COLUMN.unpack_from(self.map, at)
        if failures == 0 or now - start >= window:
            start, failures = now, 0
        COLUMN.pack_into(self.map, at, start, failures + 1, connections)


class _Flock:
    def __init__(self, fd):
        self.fd = fd

    def __enter__(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)


class SharedThrottle:
    """``app.AuthThrottle``'s interface over the pool's table: failed authentications of
    one address count across the pool, each process's within its own window of
    ``window`` seconds from its first failure."""

    def __init__(self, memory, index, clock, limit, window):
        self.memory = memory
        self.index = index
        self.clock = clock
        self.limit = limit
        self.window = window
        self._local = None  # an AuthThrottle for addresses the table has no room for

    def _fallback(self):
        if self._local is None:
            from .app import AuthThrottle

            self._local = AuthThrottle(self.clock, self.limit, self.window)
        return self._local

    def retry_after(self, address):
        key = client_key(address)
        slot = self.memory.find(key)
        if slot is None:
            return self._local.retry_after(address) if self._local is not None else 0
        now = self.clock()
        live = sorted((start + self.window, failures)
                      for start, failures, _ in self.memory.columns(slot)
                      if failures and now - start < self.window)
        remaining = sum(failures for _, failures in live)
        if remaining < self.limit:
            return 0
        for ends, failures in live:
            remaining -= failures
            if remaining < self.limit:
                return int(ends - now) + 1
        return 0

    def failed(self, address):
        """Count a failure; True when it is the one that locks the address out."""
        key = client_key(address)
        now = self.clock()
        with self.memory.locked():
            slot = self.memory.claim(key, now, self.window)
            if slot is not None:
                self.memory.add_failure(slot, self.index, now, self.window)
                total = sum(failures for start, failures, _ in self.memory.columns(slot)
                            if failures and now - start < self.window)
        if slot is None:
            return self._fallback().failed(address)
        return total == self.limit


class SharedConnections:
    """Connections open per client address, across the pool."""

    def __init__(self, memory, index, clock, window):
        self.memory = memory
        self.index = index
        self.clock = clock
        self.window = window

    def open(self, address, limit):
        """The slot counting this new connection, None if the table had no room (the
        caller counts it alone), or False when ``limit`` connections are already open."""
        key = client_key(address)
        with self.memory.locked():
            slot = self.memory.claim(key, self.clock(), self.window)
            if slot is None:
                return None
            if sum(c for _, _, c in self.memory.columns(slot)) >= limit:
                return False
            self.memory.add_connection(slot, self.index, 1)
        return slot

    def close(self, slot):
        # Our own column, and the slot cannot be taken while it counts a connection.
        self.memory.add_connection(slot, self.index, -1)
