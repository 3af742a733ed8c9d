"""A job's directory on the worker, ``<work dir>/tmp/<prefix><job id>``: the files START
brings, the runner started in it, and what END reads back from it."""

import fcntl
import logging
import lzma
import os
import shutil
import subprocess
import sys

import gevent.subprocess
import yaml

from .. import protocol
from .logsender import LOG_COPY

try:
    _Loader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _Loader = yaml.SafeLoader

log = logging.getLogger("lavacore.worker")

DEFAULT_RUNNER = "lavacore-run"
# The runner that runs LAVA's current lava-run (lavarun.py).
LAVA_RUN_BRIDGE = "lavacore-lava-run"
# Runners that are lavacore's own modules: importable wherever the worker is, even when
# their console scripts are not on PATH (a venv not activated, say).
_OWN_RUNNERS = {DEFAULT_RUNNER: "lavacore.worker.runner",
                LAVA_RUN_BRIDGE: "lavacore.worker.lavarun"}
# The largest compressed copy attached to END (the master's [master] max_message is
# 64 MiB by default: a larger frame would cut the connection, and END would never pass).
MAX_LOG_COPY = 48 * 1024 * 1024
_RESULTS = b'"lvl": "results"'  # unescaped quotes: only ever the level of a line
# END carries the runner's stderr; a runner that crashed in a loop can leave megabytes of
# it, and the master only shows it as a failure comment, so only the tail is sent.
MAX_STDERR = 1024 * 1024
# A runner holds RUN_LOCK (flock) from before its exec until it ends, and RUN_MARK exists
# once one held it: a worker killed while it started a runner lets the next one tell a
# runner that runs, one that ran and ended, and one that never started (runner_state).
RUN_LOCK = "runner.lock"
RUN_MARK = "runner.started"


def prefix(job_id, dispatcher):
    """dispatcher.yaml's ``prefix``, which lets several workers share one host's tmp dir."""
    if not dispatcher.strip():
        return ""
    try:
        data = yaml.load(dispatcher, Loader=_Loader)
    except yaml.YAMLError as exc:
        log.warning("job %d: dispatcher config is not valid YAML (%s): no prefix", job_id,
                    " ".join(str(exc).split()))
        return ""
    value = data.get("prefix", "") if isinstance(data, dict) else ""
    value = "" if value is None else str(value)
    if "/" in value or "\0" in value:
        log.warning("job %d: dispatcher prefix %r would leave the tmp dir: ignored", job_id,
                    value)
        return ""
    return value


def write_files(job_dir, definition, device, dispatcher, env_dut):
    if os.path.isdir(job_dir):
        # Left by a job the table no longer knows (its END_OK cleanup failed).
        shutil.rmtree(job_dir)
    os.makedirs(job_dir)
    files = [("job.yaml", definition), ("device.yaml", device), ("dispatcher.yaml", dispatcher)]
    if env_dut:
        files.append(("env.dut.yaml", env_dut))
    for name, text in files:
        path = os.path.join(job_dir, name)
        try:
            with open(path, "w", encoding="utf-8", newline="") as f:
                f.write(text)
        except OSError as exc:
            # A failed write (a full disk) names no file: say which one it was.
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror, path) from None
            raise


def device_type(job_id, definition, device):
    """The job's device type: the device config names it in LAVA's templates, the job too."""
    for what, text in (("device config", device), ("job definition", definition)):
        try:
            data = yaml.load(text, Loader=_Loader) if text.strip() else None
        except yaml.YAMLError:
            log.warning("job %d: %s is not valid YAML", job_id, what)
            continue
        if isinstance(data, dict) and data.get("device_type"):
            return str(data["device_type"])
    return None


def runner_argv(command, job_id, job_dir, logs_url, has_env_dut, ipv6=False, certs=None):
    """lava-run's command line, in lava-slave's order."""
    argv = list(command) + [
        "--device=%s" % os.path.join(job_dir, "device.yaml"),
        "--dispatcher=%s" % os.path.join(job_dir, "dispatcher.yaml"),
        "--output-dir=%s" % job_dir,
        "--job-id=%d" % job_id,
        "--logging-url=%s" % logs_url,
        os.path.join(job_dir, "job.yaml"),
    ]
    if ipv6:
        argv.append("--ipv6")
    if certs:
        master_cert, worker_cert = certs
        argv += ["--master-cert", master_cert, "--slave-cert", worker_cert]
    if has_env_dut:
        argv.append("--env-dut=%s" % os.path.join(job_dir, "env.dut.yaml"))
    return argv


def identity(user):
    """(name, uid, gid) of a user to run jobs as; ValueError naming it if unknown."""
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ValueError("run_as: no such user %r" % user) from None
    return entry.pw_name, entry.pw_uid, entry.pw_gid


def open_run_lock(job_dir):
    """The job's runner lock file, opened (created) for :func:`spawn`; the caller closes
    it once the runner is started."""
    return os.open(os.path.join(job_dir, RUN_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                   0o644)


def runner_state(job_dir):
    """What became of the runner of the job in ``job_dir``: "running" (its lock is held:
    it runs, or is between fork and exec), "ended" (it held the lock once), "never" (no
    runner ever took it) or "unknown" (no lock file: not started by this code)."""
    try:
        fd = os.open(os.path.join(job_dir, RUN_LOCK), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # none (not started by this code), or unreadable
        return "unknown"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "running"
    except OSError:  # a filesystem without locks (ENOLCK): as if there were no lock file
        return "unknown"
    finally:
        os.close(fd)  # (releases it when taken)
    return "ended" if os.path.exists(os.path.join(job_dir, RUN_MARK)) else "never"


def _holder(lock_fd, mark):
    """The runner's first act, in the child between fork and exec: take the job's lock
    (held across exec until the runner ends) or exit without running when another
    runner of the job holds it; then leave the mark that it started. (Until the child
    closes the worker's descriptors, after this, it also holds the worker's own lock of
    its work dir, so a restarted worker cannot look at the job while a child of the dead
    one sits between fork and exec without the runner lock.)"""
    def hold():
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise  # another runner of this job: this one does not run
        except OSError:
            return  # no locks on this filesystem: run without (runner_state: "unknown")
        # Without its mark an ended runner would look never started: not run at all
        # (a full disk, say: the job ends with the error) rather than maybe twice.
        os.close(os.open(mark, os.O_WRONLY | os.O_CREAT, 0o644))
    return hold


def spawn(argv, job_dir, env, run_as=None, lock_fd=None):
    """Start the runner with stdout/stderr in the job dir; return its gevent Popen.
    ``run_as`` (name, uid, gid): the runner runs as that user, owning its job dir.
    ``lock_fd`` (:func:`open_run_lock`): the runner takes it before it runs, and does not
    run if another runner of the job holds it."""
    # Resolved with the worker's PATH, not the job's: a purged env must not hide it.
    if os.sep not in argv[0]:
        found = shutil.which(argv[0])
        if found is not None:
            argv = [found] + argv[1:]
        elif argv[0] in _OWN_RUNNERS:
            argv = [sys.executable, "-m", _OWN_RUNNERS[argv[0]]] + argv[1:]
        else:
            raise FileNotFoundError("runner command %r not found on PATH" % argv[0])
    with open(os.path.join(job_dir, "stdout"), "wb") as out, \
            open(os.path.join(job_dir, "stderr"), "wb") as err:
        # start_new_session: the runner leads its own session and process group, so a
        # worker that stops or dies leaves it running, and CANCEL can signal the group.
        options = {}
        if run_as is not None:
            name, uid, gid = run_as
            for root, dirs, files in os.walk(job_dir):
                for entry in [root] + [os.path.join(root, n) for n in dirs + files]:
                    os.lchown(entry, uid, gid)
            env = dict(env, USER=name, LOGNAME=name)
            options = {"user": uid, "group": gid,
                       "extra_groups": os.getgrouplist(name, gid)}
        if lock_fd is not None:
            options["preexec_fn"] = _holder(lock_fd, os.path.join(job_dir, RUN_MARK))
            options["pass_fds"] = (lock_fd,)
        return gevent.subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=err, env=env, cwd=job_dir, close_fds=True,
                                       start_new_session=True, **options)


def append_stderr(job_dir, text):
    try:
        with open(os.path.join(job_dir, "stderr"), "a", encoding="utf-8") as f:
            f.write(text + "\n")
    except OSError:
        pass  # the caller keeps the text in memory too


def read_stderr(job_dir):
    """The tail of the runner's stderr (b"" if there is none)."""
    try:
        with open(os.path.join(job_dir, "stderr"), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - MAX_STDERR))
            return f.read()
    except OSError:
        return b""


def description(job_dir):
    """END's description frame: lzma'd description.yaml, or None if there is none."""
    try:
        with open(os.path.join(job_dir, "description.yaml"), "rb") as f:
            return protocol.compress_description(f.read())
    except OSError:
        return None


def log_info(job_dir):
    """protocol.LogInfo of the runner's log copy (whole lines only), or None without one."""
    lines = results = 0
    tail = b""
    try:
        with open(os.path.join(job_dir, LOG_COPY), "rb") as f:
            while True:
                block = f.read(1 << 20)
                if not block:
                    break
                data = tail + block
                cut = data.rfind(b"\n") + 1
                lines += data.count(b"\n", 0, cut)
                results += data.count(_RESULTS, 0, cut)
                tail = data[cut:]
    except OSError:
        return None
    return protocol.LogInfo(lines, results)


def log_copy(job_dir, limit=MAX_LOG_COPY):
    """The runner's log copy, lzma'd for END, or None (no copy, or too large to send)."""
    try:
        with open(os.path.join(job_dir, LOG_COPY), "rb") as f:
            data = f.read()
    except OSError:
        return None
    cut = data.rfind(b"\n") + 1  # a line being written when the runner died: not sent
    blob = lzma.compress(data[:cut], preset=1)
    return blob if len(blob) <= limit else None
