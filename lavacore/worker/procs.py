"""What the worker knows about runner processes, read from /proc.

The worker outlives its runners' parentage: after a worker restart the runners are no longer
its children, so ``waitpid`` cannot tell whether they live. /proc can, and it also guards
against pid reuse: a pid only counts as a job's runner while its command line still carries that job's
``--job-id=<id>`` and ``--output-dir=<job dir>`` arguments (every runner gets them, lava-run
included, and a wrapper such as ``nice`` keeps them when it execs). A zombie has an empty command line, so an exited
runner that nobody reaped yet counts as gone too.
"""

import errno
import os
import signal


def cmdline(pid):
    """The argv of a live process as a list of bytes, or [] if it is gone (or a zombie)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return []
    return data.split(b"\0")[:-1] if data.endswith(b"\0") else data.split(b"\0")


def is_runner(pid, job_id, job_dir=None):
    """True while ``pid`` is alive and is the runner of ``job_id`` (in ``job_dir``)."""
    if not pid or pid <= 0:
        return False
    argv = cmdline(pid)
    if ("--job-id=%d" % job_id).encode() not in argv:
        return False
    return job_dir is None or ("--output-dir=%s" % job_dir).encode() in argv


def find_runner(job_id, job_dir):
    """The pid of the live runner of ``job_id`` in ``job_dir``, or None (a /proc scan)."""
    for name in os.listdir("/proc"):
        if name.isdigit() and is_runner(int(name), job_id, job_dir):
            return int(name)
    return None


def _stat(pid_name):
    """(state, pgrp, session) of a process, from /proc/<pid>/stat."""
    with open("/proc/%s/stat" % pid_name) as f:
        text = f.read()
    # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses, so
    # split after the last ')'.
    fields = text[text.rfind(")") + 2:].split()
    return fields[0], int(fields[2]), int(fields[3])


def _members(index, value, live_only):
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = _stat(name)
        except (OSError, ValueError, IndexError):
            continue
        if stat[index] == value and not (live_only and stat[0] in ("Z", "X")):
            members.append(int(name))
    return members


def session_members(sid):
    """Pids of the processes whose session id is ``sid``."""
    return _members(2, sid, live_only=False)


def group_alive(pgid):
    """True while a process group has a member that is not a zombie.

    ``killpg(pgid, 0)`` is not enough: orphans are reaped by init, which here takes more
    than a second, and a zombie still counts as a group member for the kernel.
    """
    return bool(_members(1, pgid, live_only=True))


def signal_group(pgid, sig):
    """Send ``sig`` to a process group; False if the group no longer exists."""
    if not pgid or pgid <= 1:  # 0 would be our own group, -1 everyone
        return False
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def kill_session(sid):
    """SIGKILL every process of session ``sid``.

    A runner is started as a session leader and puts each test shell in a process group of
    its own inside that session; when the runner itself has to be killed it cannot clean up,
    so the worker sweeps the whole session instead of leaving shells behind.
    """
    killed = 0
    if not sid or sid <= 1:
        return 0
    for pid in session_members(sid):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError as exc:
            if exc.errno not in (errno.ESRCH, errno.EPERM):
                raise
    return killed
