"""Test definitions from git (``from: git``) for lavacore-run, with a cache per worker.

LAVA's dispatcher clones the repository of each definition for each job. Here each
repository is kept once per worker, as a bare copy in the cache directory, brought up to
date with ``git fetch`` when a job needs it (skipped when the job asks for a commit the
copy already holds); the job then gets its own clone of that copy, whose objects are hard
links, not a transfer: what it costs is writing the job's working tree. So twenty jobs
from one repository cost one clone and twenty fetches of what changed.

What LAVA's options mean here (LAVA 2020.05's GitHelper): ``branch`` is checked out,
``revision`` is checked out after the clone (and turns ``shallow`` off), ``shallow``
(the default) makes the job's clone one commit deep (from the cache: its history is cut
at that commit, as ``git clone --depth 1`` does, the objects being there anyway),
``history: false`` removes its .git directory. The clone's ``origin`` is the job's URL,
not the cache. Without a cache (``LAVACORE_GIT_CACHE=off``) each job clones from the
URL, as LAVA does.

Concurrency: one lock file per repository in the cache; the fetch holds it exclusively,
the job's clone shared, so jobs of one worker never see a half-updated copy. Jobs that
start together fetch once: a job skips its fetch when one began after the job asked for
the repository (what it fetched is at least as new as the job's request). Every git
command is bounded by the job's deadline and stopped on cancel. A fetch that fails is
retried once from scratch, so a damaged copy repairs itself.

Errors, in LAVA's classes, with git's own message: a repository that cannot be fetched
is an Infrastructure error, as in LAVA (the device then goes to Unknown, to be checked),
unless git says the repository does not exist (a Job error: the job names something that
is not there, the lab is fine); a branch or revision the repository does not have, or a
path it does not hold, is a Job error too.
"""

import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time

GIT = shutil.which("git") or "/usr/bin/git"
# The largest definition file read (LAVA's are a few kB).
MAX_DEFINITION = 1024 * 1024
# Git's output kept for an error message.
MAX_OUTPUT = 64 * 1024
LOCK_POLL = 0.05
# In the cached copy: when its last fetch began (wall clock), for jobs starting together.
FETCH_STAMP = "lavacore-fetch-started"
KILL_GRACE = 2.0
_FULL_SHA = re.compile(r"^[0-9a-fA-F]{40}$")
# What git says when the repository itself is not there (a local path, an HTTP 404, a
# wrong path on an ssh server), as opposed to a host or network that fails.
_MISSING = re.compile(r"does not exist|not found|does not appear to be a git repository",
                      re.IGNORECASE)


class GitError(Exception):
    """(error_type, message) in LAVA's terms."""

    def __init__(self, error_type, message):
        super().__init__(message)
        self.error_type = error_type
        self.message = message


class Canceled(Exception):
    pass


def default_cache(output_dir):
    """Where a worker keeps its repositories: ``$LAVACORE_GIT_CACHE`` ("off": none), else
    ``git-cache`` in the work dir of lavacore's worker (and lava-slave's), whose job dirs
    are ``<work dir>/tmp/<job>``, else next to the job's output dir."""
    configured = os.environ.get("LAVACORE_GIT_CACHE")
    if configured is not None:
        return None if configured.strip().lower() in ("", "off", "none") else configured
    parent = os.path.dirname(os.path.abspath(output_dir))
    if os.path.basename(parent) == "tmp":
        return os.path.join(os.path.dirname(parent), "git-cache")
    return os.path.join(parent, ".lavacore-git-cache")


def _environment():
    env = dict(os.environ)
    # Never wait for a password nobody will type.
    env["GIT_TERMINAL_PROMPT"] = "0"
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    env["LC_ALL"] = "C"
    return env


def _last_lines(output, count=3):
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    text = "; ".join(lines[-count:])
    return text[-1000:] if text else "no output"


class Fetcher:
    """Gets git definitions for one job: ``log(lvl, msg)`` writes to the job log,
    ``deadline`` (monotonic) and ``canceled()`` bound every git command."""

    def __init__(self, cache_dir, log, deadline, canceled):
        self.cache_dir = cache_dir
        self.log = log
        self.deadline = deadline
        self.canceled = canceled
        self.env = _environment()

    # -- running git ------------------------------------------------------------------

    def _git(self, args, cwd=None, check=True):
        """(rc, output) of one git command, stopped at the deadline or on cancel."""
        if self.canceled():
            raise Canceled()
        if time.monotonic() >= self.deadline:
            raise GitError("Job", "the job timed out while fetching its test definitions")
        proc = subprocess.Popen([GIT] + args, cwd=cwd, env=self.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, process_group=0)
        chunks = []
        try:
            while True:
                left = self.deadline - time.monotonic()
                try:
                    out, _ = proc.communicate(timeout=max(0.01, min(0.2, left)))
                    chunks.append(out or b"")
                    break
                except subprocess.TimeoutExpired:
                    if self.canceled():
                        raise Canceled() from None
                    if left <= 0:
                        raise GitError("Job", "the job timed out while fetching its test"
                                              " definitions (git %s)" % args[0]) from None
        finally:
            if proc.poll() is None:
                _kill(proc)
        output = b"".join(chunks)[-MAX_OUTPUT:].decode("utf-8", errors="replace")
        if check and proc.returncode != 0:
            raise _Failed(proc.returncode, output)
        return proc.returncode, output

    # -- the cache ----------------------------------------------------------------------

    def _paths(self, url):
        digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:20]
        base = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(url.rstrip("/")))[:40]
        name = "%s-%s" % (digest, base.removesuffix(".git") or "repo")
        return (os.path.join(self.cache_dir, name + ".git"),
                os.path.join(self.cache_dir, name + ".lock"))

    def _lock(self, path, mode):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    pass
                if self.canceled():
                    raise Canceled()
                if time.monotonic() >= self.deadline:
                    raise GitError("Job", "the job timed out waiting for another job of this"
                                          " worker to update the cached repository")
                time.sleep(LOCK_POLL)
        except BaseException:
            os.close(fd)
            raise

    def _mirror(self, url, mirror, revision, asked):
        """Bring the cached copy of ``url`` up to date (the exclusive lock is held);
        ``asked``: when the job asked for it (wall clock)."""
        stamp = os.path.join(mirror, FETCH_STAMP)
        if os.path.isdir(mirror):
            if revision is not None and _FULL_SHA.match(revision):
                rc, _ = self._git(["cat-file", "-e", revision + "^{commit}"], cwd=mirror,
                                  check=False)
                if rc == 0:
                    self.log("info", "%s: commit %s is in the worker's cache, no fetch"
                             % (url, revision))
                    return
            try:
                with open(stamp) as f:
                    began = float(f.read().strip())
                # (A stamp from the future means the clock went back: fetch.)
                if asked <= began <= time.time():
                    self.log("debug", "%s: the worker's cached copy was fetched after"
                             " this job asked for it, no fetch" % url)
                    return
            except (OSError, ValueError):
                pass
            try:
                began = time.time()
                self._git(["fetch", "--quiet", "--prune", "--tags", "origin",
                           "+refs/heads/*:refs/heads/*"], cwd=mirror)
                _write(stamp, "%f\n" % began)
                self.log("debug", "%s: the worker's cached copy is up to date" % url)
                return
            except _Failed as exc:
                self.log("warning", "%s: updating the worker's cached copy failed (%s);"
                         " cloning it again" % (url, _last_lines(exc.output)))
        else:
            self.log("info", "%s: not in the worker's cache yet, cloning it" % url)
        tmp = "%s.tmp-%d" % (mirror, os.getpid())
        shutil.rmtree(tmp, ignore_errors=True)
        began = time.time()
        try:
            self._git(["clone", "--quiet", "--bare", "--", url, tmp])
            _write(os.path.join(tmp, FETCH_STAMP), "%f\n" % began)
        except _Failed as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise GitError(_error_type(exc.output), "cannot fetch the git repository %s: %s"
                           % (url, _last_lines(exc.output))) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(mirror, ignore_errors=True)
        os.rename(tmp, mirror)

    # -- a job's checkout -------------------------------------------------------------

    def checkout(self, url, dest, revision=None, branch=None, shallow=True, history=True):
        """Clone ``url`` into ``dest`` (which must not exist); return the commit id."""
        if self.cache_dir is None:
            return self._checkout(url, url, dest, revision, branch, shallow, history)
        os.makedirs(self.cache_dir, exist_ok=True)
        mirror, lock_path = self._paths(url)
        asked = time.time()
        fd = self._lock(lock_path, fcntl.LOCK_EX)
        try:
            self._mirror(url, mirror, revision, asked)
            # Other jobs may clone from the copy now; none may update it until we did.
            fcntl.flock(fd, fcntl.LOCK_SH)
            return self._checkout(url, mirror, dest, revision, branch, shallow, history)
        finally:
            os.close(fd)

    def _checkout(self, url, source, dest, revision, branch, shallow, history):
        cached = source != url
        args = ["clone", "--quiet"]
        if branch is not None:
            args += ["--branch", branch]
        if shallow and not cached:
            args += ["--depth", "1"]
        try:
            self._git(args + ["--", source, dest])
        except _Failed as exc:
            shutil.rmtree(dest, ignore_errors=True)
            detail = _last_lines(exc.output)
            if branch is not None and "not found" in detail and cached:
                raise GitError("Job", "%s has no branch %r (%s)" % (url, branch,
                                                                   detail)) from None
            raise GitError("Infrastructure" if cached else _error_type(exc.output),
                           "cannot clone the git repository %s: %s" % (url, detail)) from None
        if revision is not None:
            try:
                self._git(["checkout", "--quiet", "--detach", revision, "--"], cwd=dest)
            except _Failed as exc:
                raise GitError("Job", "%s: cannot check out revision %r: %s"
                               % (url, revision, _last_lines(exc.output))) from None
        _, out = self._git(["rev-parse", "HEAD"], cwd=dest)
        commit = out.strip()
        if cached:
            if shallow:
                # What --depth 1 leaves: the history cut at this commit.
                with open(os.path.join(dest, ".git", "shallow"), "w") as f:
                    f.write(commit + "\n")
            self._git(["remote", "set-url", "origin", url], cwd=dest)
        if not history:
            shutil.rmtree(os.path.join(dest, ".git"))
        return commit


class _Failed(Exception):
    def __init__(self, rc, output):
        super().__init__("git exited with %d" % rc)
        self.rc = rc
        self.output = output


def _error_type(output):
    return "Job" if _MISSING.search(output) else "Infrastructure"


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _kill(proc):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(KILL_GRACE)
            return
        except subprocess.TimeoutExpired:
            continue


def read_definition(root, path):
    """The text of ``path`` inside the clone ``root``; GitError when it is missing, too
    large, or (through a symbolic link) outside the clone."""
    real_root = os.path.realpath(root)
    full = os.path.realpath(os.path.join(root, path))
    if full != real_root and not full.startswith(real_root + os.sep):
        raise GitError("Job", "%s leads outside the repository" % path)
    try:
        with open(full, "rb") as f:
            data = f.read(MAX_DEFINITION + 1)
    except OSError as exc:
        raise GitError("Job", "cannot open the test definition %s: %s"
                       % (path, exc.strerror or exc)) from None
    if len(data) > MAX_DEFINITION:
        raise GitError("Job", "the test definition %s is larger than %d bytes"
                       % (path, MAX_DEFINITION))
    return data.decode("utf-8", errors="replace")


def repo_dir_name(url):
    """Where ``install: git-repos`` puts a repository: its name without ``.git``."""
    return os.path.basename(url.rstrip("/")).removesuffix(".git")
