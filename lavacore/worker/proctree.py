"""Process trees, read from /proc: what a runner started, wherever it went.

A runner's process group and session do not hold everything it started: LAVA's lava-run
runs qemu (and serial consoles) through pexpect, which gives each child a session of its
own. Parent links do hold them, as long as someone keeps them: the lava-run bridge makes
itself a child subreaper, so what lava-run leaves behind stays below it.
"""

import ctypes
import errno
import os
import signal
import time

_PR_SET_CHILD_SUBREAPER = 36


def _stat(pid_name):
    """(comm, state, ppid) of a process, from /proc/<pid>/stat."""
    with open("/proc/%s/stat" % pid_name, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    left, right = text.find("("), text.rfind(")")
    fields = text[right + 2:].split()
    return text[left + 1:right], fields[0], int(fields[1])


def children_map():
    """{ppid: [(pid, comm), ...]} of the live processes (zombies left out)."""
    tree = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            comm, state, ppid = _stat(name)
        except (OSError, ValueError, IndexError):
            continue
        if state not in ("Z", "X"):
            tree.setdefault(ppid, []).append((int(name), comm))
    return tree


def descendants(pid):
    """[(pid, comm), ...] of the live processes below ``pid``, parents first."""
    tree = children_map()
    found, todo = [], [pid]
    while todo:
        for child in tree.get(todo.pop(0), ()):
            found.append(child)
            todo.append(child[0])
    return found


def kill_all(pids, sig):
    """Send ``sig`` to each pid; how many were still there."""
    sent = 0
    for pid in pids:
        try:
            os.kill(pid, sig)
            sent += 1
        except OSError as exc:
            if exc.errno not in (errno.ESRCH, errno.EPERM):
                raise
    return sent


def kill_tree(pid, include_root=True):
    """SIGKILL ``pid`` (unless ``include_root`` is false) and every process below it.
    The tree is read first, so children are not lost to init meanwhile; returns the
    descendants that were killed."""
    below = descendants(pid)
    if include_root:
        kill_all([pid], signal.SIGKILL)
    kill_all([p for p, _ in below], signal.SIGKILL)
    return below


def become_subreaper():
    """Orphans of our descendants become our children instead of init's (Linux 3.4+).
    False where that is not possible."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap():
    """Collect every exited child (orphans a subreaper adopted included); their count."""
    count = 0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return count
        if pid == 0:
            return count
        count += 1


def stop_below(pid, grace=3.0, exclude=()):
    """SIGTERM every process below ``pid`` (but those in ``exclude``), SIGKILL what is
    still there after ``grace`` seconds, reap; returns [(pid, comm)] of those found."""
    found = [(p, c) for p, c in descendants(pid) if p not in exclude]
    if not found:
        return found
    kill_all([p for p, _ in found], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        reap()
        live = {p for p, _ in descendants(pid)}
        if not live.intersection(p for p, _ in found):
            break
        time.sleep(0.02)
    left = [p for p, _ in descendants(pid) if p not in exclude]
    kill_all(left, signal.SIGKILL)
    reap()
    return found
