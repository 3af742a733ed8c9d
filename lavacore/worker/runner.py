"""``lavacore-run``: runs one job, with lava-run's command line.

    lavacore-run --device=DIR/device.yaml --dispatcher=DIR/dispatcher.yaml --output-dir=DIR
                 --job-id=ID --logging-url=URL DIR/job.yaml [--env-dut=DIR/env.dut.yaml]

It runs the job's ``test`` actions on this host (inline definitions, and definitions from
git, fetched through the worker's cache before anything runs: gitdefs.py), with LAVA's test
shell helpers on the steps' PATH (testshell.py, helpers/), MultiNode ones included, which
talk to the coordinator the master names in the job's lava-multinode block; and the deploy
and boot methods its device type declares as this runner's own (jobdef.py). Any other
action fails the job before anything runs. It streams every line to the master's log
socket as it happens, writes ``description.yaml`` and always ends with the ``lava``/``job``
result line that decides the job's health. Exit status 0 when the job ran to its end (even
with failed test cases), 1 when it could not.
"""

import argparse
import json
import os
import signal
import sys
import time
import traceback
import urllib.parse

import yaml

from .. import __version__
from . import environ, gitdefs, jobdef
from .logsender import run_with_sender
from .testshell import TestShell

try:
    _Loader, _Dumper = yaml.CSafeLoader, yaml.CSafeDumper
except AttributeError:  # pragma: no cover
    _Loader, _Dumper = yaml.SafeLoader, yaml.SafeDumper

# Where lava-run finds the coordinator (Debian's lava-coordinator package); read when
# the master names none in the job.
COORDINATOR_CONF = "/etc/lava-coordinator/lava-coordinator.conf"

# description.yaml's `compatibility`, which the master stores as the job's pipeline
# compatibility; bumped when what this runner accepts changes incompatibly.
COMPATIBILITY = 1


class Failure(Exception):
    """Why a job could not run to its end, in LAVA's terms (error_type, error_msg)."""

    def __init__(self, error_type, message):
        super().__init__(message)
        self.error_type = error_type
        self.message = message


class Signals:
    """SIGTERM/SIGINT only set a flag; a wake-up pipe lets the select loop see it at once."""

    def __init__(self):
        self.received = None
        self.wake_fd, write_fd = os.pipe()
        os.set_blocking(self.wake_fd, False)
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        # A handler (not SIG_DFL) so that a child's exit also wakes the loop.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def _on_signal(self, signum, frame):
        if self.received is None:
            self.received = signum

    def canceled(self):
        return self.received is not None


def _seconds(value):
    return "%g seconds" % round(value, 3)


def _url_host(url):
    """The host of tcp://HOST:PORT (this host when it names every address or none)."""
    if not url:
        return "127.0.0.1"
    host = urllib.parse.urlsplit(url).hostname or ""
    return "127.0.0.1" if host in ("", "*", "0.0.0.0") else ("::1" if host == "::" else host)


def _param(definition, value):
    if isinstance(value, str) and value in definition.params:
        return definition.params[value]
    return value


def _hms(value):
    value = int(round(value))
    return "%02d:%02d:%02d" % (value // 3600, value // 60 % 60, value % 60)


class JobRun:
    def __init__(self, args, sender, signals):
        self.args = args
        self.sender = sender
        self.signals = signals
        self.shell = None
        self.started = time.monotonic()

    def run(self):
        """Run the job and send its final result; True if it ran to its end."""
        error = None
        try:
            self._run()
        except Failure as exc:
            error = exc
        except Exception as exc:
            traceback.print_exc()
            error = Failure("Bug", "lavacore-run failed: %s: %s" % (type(exc).__name__, exc))
        finally:
            self._cleanup()
        log = self.sender.log
        if error is None:
            log("info", "job %s ran to its end in %s" % (self.args.job_id,
                                                         _hms(time.monotonic() - self.started)))
            self.sender.result("lava", "job", "pass")
            return True
        log("error", "%s error: %s" % (error.error_type, error.message))
        self.sender.result("lava", "job", "fail", error_type=error.error_type,
                           error_msg=error.message)
        # One line for END's stderr frame, which the master shows when nothing else came.
        sys.stderr.write("lavacore-run: job %s failed (%s): %s\n"
                         % (self.args.job_id, error.error_type, error.message))
        return False

    def _cleanup(self):
        if self.shell is None:
            return
        try:
            leftover = self.shell.cleanup()
        except OSError as exc:
            self.sender.log("warning", "cleaning up the test shell failed: %s" % exc)
            return
        if leftover:
            self.sender.log("info", "stopped %d process group(s) left running by the steps"
                            % leftover)

    def _check_canceled(self):
        if self.signals.canceled():
            raise Failure("Canceled", "job canceled: %s received"
                          % signal.Signals(self.signals.received).name)

    def _read(self, path, what, error_type):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError as exc:
            raise Failure(error_type, "cannot read the %s %s: %s"
                          % (what, path, exc.strerror or exc)) from None

    def _run(self):
        args, log = self.args, self.sender.log
        log("info", "lavacore-run %s, job %s, output dir %s" % (__version__, args.job_id,
                                                                args.output_dir))
        self._check_canceled()
        try:
            os.makedirs(args.output_dir, exist_ok=True)
        except OSError as exc:
            raise Failure("Infrastructure", "cannot create the output dir %s: %s"
                          % (args.output_dir, exc.strerror or exc)) from None
        text = self._read(args.definition, "job definition", "Infrastructure")
        device = self._device()
        try:
            plan = jobdef.load(text, device)
            jobdef.check_runnable(plan, device)
        except jobdef.JobError as exc:
            raise Failure("Job", str(exc)) from None
        env = dict(os.environ)
        if args.env_dut:
            try:
                env = environ.apply(env, self._read(args.env_dut, "env-dut file",
                                                    "Infrastructure"), "env-dut")
            except environ.EnvError as exc:
                raise Failure("Configuration", str(exc)) from None
        job_deadline = self.started + plan.job_timeout
        self._describe(plan, device)
        log("info", "job %r on device type %s: %d action(s), %d of them test actions, job"
            " timeout %s" % (plan.job_name, device.get("device_type") or plan.device_type
                             or "?", len(plan.actions), len(plan.tests),
                             _hms(plan.job_timeout)))
        root = os.path.join(args.output_dir, "lava-test")
        self.shell = TestShell(root, env, self.sender, self.signals.wake_fd,
                               self.signals.canceled, multinode=self._multinode(plan))
        try:
            self.shell.setup()
        except OSError as exc:
            raise Failure("Infrastructure", "cannot set up the test shell in %s: %s"
                          % (root, exc.strerror or exc)) from None
        self._fetch(plan, job_deadline)
        for action in plan.actions:
            if action.test is not None:
                self._test_action(plan, action.test, job_deadline)
            else:
                self._own_action(plan, action, job_deadline)

    # -- MultiNode --------------------------------------------------------------------

    def _multinode(self, plan):
        """What the MultiNode helpers need (helpers/multinode.py), or None."""
        group = plan.multinode
        if group is None:
            return None
        coordinator, why = self._coordinator(group)
        self.sender.log("info", "MultiNode: job %s is role %s of group %s (%d job(s));"
                        " coordinator %s; a lava-send, lava-wait or lava-sync may take %s"
                        % (self.args.job_id, group.role, group.group, group.size,
                           "%s:%d" % (coordinator["host"], coordinator["port"])
                           if coordinator else "none (%s)" % why, _seconds(group.timeout)))
        return {"job": str(self.args.job_id), "group": group.group, "role": group.role,
                "roles": group.roles, "size": group.size, "timeout": group.timeout,
                "coordinator": coordinator, "coordinator_error": why}

    def _coordinator(self, group):
        """({host, port}, None) of the coordinator, or (None, why there is none): the one
        the master names in the job (its host defaults to the master's, as this runner
        reaches it: the host of --logging-url), else lava-run's configuration file."""
        if group.coordinator is not None:
            host = group.coordinator["host"] or _url_host(self.args.logging_url)
            return {"host": host, "port": group.coordinator["port"]}, None
        try:
            with open(COORDINATOR_CONF, encoding="utf-8") as f:
                data = json.loads(f.read(65536))
            port = int(data.get("port", 3079))
            host = str(data.get("coordinator_hostname") or "localhost")
            return {"host": host, "port": port}, None
        except FileNotFoundError:
            return None, ("the master named none in the job and %s does not exist"
                          % COORDINATOR_CONF)
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            return None, "%s is unusable: %s" % (COORDINATOR_CONF, exc)

    # -- git definitions ----------------------------------------------------------------

    def _fetch(self, plan, job_deadline):
        """Clone the git definitions (and the install: git-repos of all definitions)
        before any action runs, as LAVA builds its overlay before it boots."""
        fetcher = None
        for definition in plan.definitions:
            if definition.origin != "git" and not definition.install_list("git-repos"):
                continue
            if fetcher is None:
                cache = gitdefs.default_cache(self.args.output_dir)
                fetcher = gitdefs.Fetcher(cache, self.sender.log, job_deadline,
                                          self.signals.canceled)
            try:
                if definition.origin == "git":
                    self._fetch_git(fetcher, definition)
                self._install_repos(fetcher, definition)
            except gitdefs.Canceled:
                self._check_canceled()
                raise
            except gitdefs.GitError as exc:
                raise Failure(exc.error_type, "%s: %s" % (definition.name, exc.message)) \
                    from None
            except OSError as exc:
                raise Failure("Infrastructure", "%s: %s" % (definition.name, exc)) from None

    def _fetch_git(self, fetcher, definition):
        log = self.sender.log
        where = self.shell.workdir(definition)
        wanted = ", ".join("%s %s" % (k, v) for k, v in (("branch", definition.branch),
                                                          ("revision", definition.revision))
                           if v is not None)
        log("info", "%s: fetching %s from %s%s" % (definition.name, definition.path,
                                                   definition.repository,
                                                   " (%s)" % wanted if wanted else ""))
        started = time.monotonic()
        definition.commit = fetcher.checkout(
            definition.repository, where, revision=definition.revision,
            branch=definition.branch, shallow=definition.shallow,
            history=definition.history)
        text = gitdefs.read_definition(where, definition.path)
        try:
            jobdef.complete(definition, text)
        except jobdef.JobError as exc:
            raise gitdefs.GitError("Job", str(exc)) from None
        log("info", "%s: commit %s, %d step(s), in %s (%.2f s)"
            % (definition.name, definition.commit, len(definition.steps), where,
               time.monotonic() - started))

    def _install_repos(self, fetcher, definition):
        """``install: git-repos``, cloned into the definition's directory (LAVA does
        that on the dispatcher too); the others (deps, keys, sources) are not done on the
        worker host (see _install_notes)."""
        where = self.shell.workdir(definition)
        os.makedirs(where, exist_ok=True)
        for repo in definition.install_list("git-repos"):
            if isinstance(repo, str):
                url, branch, destination = repo, None, gitdefs.repo_dir_name(repo)
            else:
                # LAVA: a value naming a parameter of the definition is replaced by it.
                url = _param(definition, repo["url"])
                branch = _param(definition, repo.get("branch"))
                destination = _param(definition, repo.get("destination")) or \
                    gitdefs.repo_dir_name(url)
            destination = str(destination)
            if not destination or "/" in destination or destination in (".", ".."):
                raise gitdefs.GitError("Job", "install: git-repos: destination %r must be"
                                              " a plain directory name" % destination)
            self.sender.log("info", "%s: install: git-repos: %s into %s"
                            % (definition.name, url, destination))
            fetcher.checkout(str(url), os.path.join(where, destination),
                             branch=None if branch is None else str(branch), shallow=False)

    def _install_notes(self, definition):
        for key, what in (("keys", "apt keys"), ("sources", "package sources"),
                          ("deps", "packages")):
            items = definition.install_list(key)
            if items:
                self.sender.log("warning", "%s: install: %s: lavacore-run does not install %s"
                                " on the worker host (LAVA does the same for a system whose"
                                " distribution it cannot manage); they must already be"
                                " there: %s" % (definition.name, key, what, " ".join(items)))

    def _own_action(self, plan, action, job_deadline):
        """A deploy or boot method the device type declares as this runner's own: the
        device is the worker host, so there is nothing to deploy or boot."""
        self._check_canceled()
        if time.monotonic() >= job_deadline:
            raise Failure("Job", "job timed out after %s" % _seconds(plan.job_timeout))
        name = "%s %s %s" % (action.kind, "to" if action.kind == "deploy" else "with",
                             action.method)
        self.sender.log("info", "start: %d %s (lavacore-run's own method: the device is the"
                        " worker host, nothing to do)" % (action.number, name))
        self.sender.log("info", "end: %d %s (duration 00:00:00)" % (action.number, name))

    def _test_action(self, plan, action, job_deadline):
        log = self.sender.log
        self._check_canceled()
        now = time.monotonic()
        if now >= job_deadline:
            raise Failure("Job", "job timed out after %s" % _seconds(plan.job_timeout))
        action_deadline = now + action.timeout if action.timeout else float("inf")
        deadline = min(job_deadline, action_deadline)
        log("info", "start: %d lava-test-shell (timeout %s)"
            % (action.number, _hms(deadline - now)))
        failed_install = []
        for definition in action.definitions:
            self._check_canceled()
            log("info", "running %s: %d step(s)%s" % (
                definition.name, len(definition.steps),
                ", after %d install step(s)" % len(definition.install_steps)
                if definition.install_steps else ""))
            self._install_notes(definition)
            try:
                outcome = self.shell.run(definition, deadline)
            except OSError as exc:
                raise Failure("Infrastructure", "cannot run %s: %s"
                              % (definition.name, exc.strerror or exc)) from None
            extra = self._run_result(definition, outcome)
            if outcome.status == "done":
                log("info", "%s: steps ended with exit code %d after %s s"
                    % (definition.name, outcome.rc, extra["duration"]))
                self.sender.result("lava", definition.name, "pass", **extra)
                continue
            self.sender.result("lava", definition.name, "fail", **extra)
            if outcome.status == "install_failed":
                # LAVA: the definition's run is skipped, the others still run, and the
                # test action then fails.
                log("error", "%s: install steps failed with exit code %d: its steps are"
                    " not run" % (definition.name, outcome.rc))
                failed_install.append(definition.name)
                continue
            if outcome.status == "aborted":
                raise Failure(*outcome.error)
            self._check_canceled()
            if job_deadline <= action_deadline:
                raise Failure("Job", "job timed out after %s (in %s)"
                              % (_seconds(plan.job_timeout), definition.name))
            if action.skip:
                log("warning", "lava-test-shell (action %d) timed out after %s (in %s);"
                    " its timeout has skip: going on with the next action"
                    % (action.number, _seconds(action.timeout), definition.name))
                return
            raise Failure("Job", "lava-test-shell (action %d) timed out after %s (in %s)"
                          % (action.number, _seconds(action.timeout), definition.name))
        if failed_install:
            raise Failure("Test", "the install steps of %s failed: their steps did not run"
                          % ", ".join(failed_install))
        log("info", "end: %d lava-test-shell (duration %s)"
            % (action.number, _hms(time.monotonic() - now)))

    @staticmethod
    def _run_result(definition, outcome):
        """The extra fields of the lava/<definition> result, LAVA's for git ones."""
        extra = {"duration": "%.2f" % outcome.duration}
        if definition.origin == "git":
            extra.update(repository=definition.repository, path=definition.path,
                         revision=definition.revision or definition.branch or "unspecified",
                         commit_id=definition.commit)
        return extra

    def _device(self):
        text = self._read(self.args.device, "device config", "Infrastructure")
        try:
            data = yaml.load(text, Loader=_Loader) if text.strip() else {}
        except yaml.YAMLError as exc:
            raise Failure("Configuration", "the device config is not valid YAML: %s"
                          % " ".join(str(exc).split())) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise Failure("Configuration", "the device config must be a YAML mapping")
        return data

    @staticmethod
    def _pipeline_entry(plan, action):
        if action.test is None:
            return {"class": "OwnMethodAction", "name": "%s-%s" % (action.method, action.kind),
                    "level": str(action.number), "summary": "lavacore-run's own %s method"
                    % action.kind, "description": "the device is the worker host: nothing"
                    " to do", "timeout": plan.job_timeout}
        test = action.test
        return {"class": "TestShellAction", "name": "lava-test-shell",
                "level": str(test.number), "summary": "lavacore-run test shell",
                "description": "test definitions run on the worker host",
                "timeout": test.timeout or plan.job_timeout,
                "definitions": [d.name for d in test.definitions]}

    def _describe(self, plan, device):
        # lava-run's top-level keys, kept small: the master reads `compatibility` and keeps
        # the rest for people.
        timeouts = {"job": plan.job_timeout}
        description = {
            "compatibility": COMPATIBILITY,
            "device": {"device_type": str(device.get("device_type") or plan.device_type),
                       "hostname": str(device.get("hostname") or "")},
            "job": {"job_name": plan.job_name, "timeouts": timeouts,
                    "actions": [{"test": {"definitions": [d.name for d in a.definitions],
                                          "timeout": a.timeout}} for a in plan.tests]},
            "pipeline": [self._pipeline_entry(plan, a) for a in plan.actions],
        }
        path = os.path.join(self.args.output_dir, "description.yaml")
        try:
            with open(path, "w", encoding="utf-8") as f:
                yaml.dump(description, f, Dumper=_Dumper, default_flow_style=False)
        except OSError as exc:
            raise Failure("Infrastructure", "cannot write %s: %s"
                          % (path, exc.strerror or exc)) from None


def build_parser():
    p = argparse.ArgumentParser(prog="lavacore-run",
                                description="Run one LAVA job (lava-run's arguments).")
    p.add_argument("definition", help="the job definition (job.yaml)")
    p.add_argument("--device", required=True, help="the device config (device.yaml)")
    p.add_argument("--dispatcher", help="the dispatcher config (dispatcher.yaml)")
    p.add_argument("--output-dir", required=True, help="where the job's files go")
    p.add_argument("--job-id", required=True, help="the job id, as sent with each log line")
    p.add_argument("--logging-url", help="the master's log socket (lines go to stdout "
                                         "without it)")
    p.add_argument("--env-dut", help="environment changes for the test shell")
    p.add_argument("--ipv6", action="store_true")
    p.add_argument("--master-cert", help="the master's public key (CURVE)")
    p.add_argument("--slave-cert", help="this worker's key pair (CURVE)")
    p.add_argument("--validate", action="store_true",
                   help="only check the job definition and exit")
    return p


def main(argv=None):
    # Before anything slow: a cancel that comes while we start must still be seen.
    signals = Signals()
    args = build_parser().parse_args(argv)
    args.output_dir = os.path.abspath(args.output_dir)
    if args.validate:
        try:
            with open(args.definition, encoding="utf-8", errors="replace") as f:
                jobdef.load(f.read())
        except (OSError, jobdef.JobError) as exc:
            print("lavacore-run: invalid job: %s" % exc, file=sys.stderr)
            return 1
        return 0
    return run_with_sender("lavacore-run", args,
                           lambda sender: JobRun(args, sender, signals).run())


if __name__ == "__main__":
    sys.exit(main())
