"""A job's log (output.yaml, one line per entry) read a window at a time, whatever its
size: a 200,000-line log is never read whole for a page.

Each log read gets a small index: the byte offset and line number of a line start about
every CHUNK bytes. Building it counts newlines a chunk at a time (C code, no Python loop
per line) in a native thread, so a long first scan never stalls the master's loop; a
growing log is indexed from where the last scan stopped, a replaced one (new inode) again
from its start. A window is then one seek and at most CHUNK bytes skipped, and its
reading stops at ``max_lines`` or ``max_bytes``, whichever comes first.
"""

import bisect
import collections
import os

import gevent
import gevent.lock

from .. import present
from ..api.jobs import entry
from ..logformat import LEVELS
from .render import visible

CHUNK = 1 << 20
INLINE_SCAN = 256 * 1024     # a smaller new part is indexed in the loop, not in a thread
MAX_MESSAGE = 16 * 1024      # characters of one message shown; the rest is cut
KNOWN_LEVELS = frozenset(LEVELS)
# The levels a job page lets a reader show or hide: LAVA's, and "other" for lines of a
# level it does not know (each one is a CSS class: the level itself is never one).
LEVEL_CHOICES = tuple(LEVELS) + ("other",)


class _Index:
    def __init__(self, inode):
        self.inode = inode
        self.offsets = [0]       # byte offset of line lines_at[i]
        self.lines_at = [0]
        self.lines = 0           # complete lines up to ``scanned``
        self.scanned = 0         # byte offset just after the last complete line seen
        self.lock = gevent.lock.Semaphore()


def _scan(handle, index):
    """Count the complete lines after ``index.scanned``, adding a checkpoint per chunk
    (runs in a thread for big parts: it touches only ``index`` and the file)."""
    position = look = index.scanned
    handle.seek(look)
    while True:
        data = handle.read(CHUNK)
        if not data:
            break
        cut = data.rfind(b"\n")
        if cut < 0:
            look += len(data)  # inside one very long line
            continue
        index.lines += data.count(b"\n", 0, cut + 1)
        position = look + cut + 1
        index.scanned = position
        index.offsets.append(position)
        index.lines_at.append(index.lines)
        look = position
        handle.seek(look)


def display(number, item):
    """A log entry as the pages show it: line number, time, level (a CSS class from a
    fixed list), message as one text (cut at MAX_MESSAGE characters), its control
    characters made visible (render.visible), as in the page's HTML."""
    lvl = item.get("lvl")
    level = lvl if lvl in KNOWN_LEVELS else "other"
    message = present.log_message(item)
    if len(message) > MAX_MESSAGE:
        message = "%s… (%d more characters)" % (message[:MAX_MESSAGE],
                                                len(message) - MAX_MESSAGE)
    return {"n": number, "dt": visible(str(item.get("dt") or "")[:26]), "lvl": level,
            "msg": visible(message)}


class LogView:
    """Windows of jobs' logs, with the indexes of the ``size`` logs read last."""

    def __init__(self, size=64):
        self._indexes = collections.OrderedDict()
        self._size = size

    def _index(self, path, handle):
        inode = os.fstat(handle.fileno()).st_ino
        index = self._indexes.get(path)
        if index is None or index.inode != inode:
            index = self._indexes[path] = _Index(inode)
        self._indexes.move_to_end(path)
        while len(self._indexes) > self._size:
            self._indexes.popitem(last=False)
        return index

    def _update(self, handle, index):
        with index.lock:
            size = os.fstat(handle.fileno()).st_size
            if size < index.scanned:  # truncated in place: start again
                index.offsets, index.lines_at = [0], [0]
                index.lines = index.scanned = 0
            if size - index.scanned > INLINE_SCAN:
                # A native thread; its own file handle, since this one stays ours.
                with open(handle.name, "rb") as own:
                    gevent.get_hub().threadpool.apply(_scan, (own, index))
            elif size > index.scanned:
                _scan(handle, index)

    def count(self, path):
        """The complete lines of the log at ``path`` (0 when there is none yet)."""
        try:
            handle = open(path, "rb")
        except OSError:
            return 0
        with handle:
            index = self._index(path, handle)
            self._update(handle, index)
            return index.lines

    def read(self, path, start, max_lines, max_bytes=4 * CHUNK):
        """(lines, total): display() of the complete lines from ``start`` (0-based) on,
        at most ``max_lines`` of them and about ``max_bytes``; ``total`` complete lines in
        the log."""
        try:
            handle = open(path, "rb")
        except OSError:
            return [], 0
        lines = []
        with handle:
            index = self._index(path, handle)
            self._update(handle, index)
            total = index.lines
            if start >= total:
                return lines, total
            at = bisect.bisect_right(index.lines_at, start) - 1
            number, offset = index.lines_at[at], index.offsets[at]
            handle.seek(offset)
            while number < start:
                handle.readline()
                number += 1
            used = 0
            while number < total and len(lines) < max_lines and used < max_bytes:
                raw = handle.readline()
                if not raw.endswith(b"\n"):
                    break
                used += len(raw)
                lines.append(display(number, entry(raw)))
                number += 1
        return lines, total
