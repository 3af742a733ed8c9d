"""``lavacore-run``: runs one job, with lava-run's command line (spec 4.4).

    lavacore-run --device=DIR/device.yaml --dispatcher=DIR/dispatcher.yaml --output-dir=DIR
                 --job-id=ID --logging-url=URL DIR/job.yaml [--env-dut=DIR/env.dut.yaml]

It runs the job's ``test`` actions (inline definitions) on this host, and the deploy and
boot methods its device type declares as this runner's own (jobdef.py); any other action
fails the job before anything runs. It streams every line to the master's log socket as it
happens, writes ``description.yaml`` and always ends with the ``lava``/``job`` result line
that decides the job's health. Exit status 0 when the job ran to its end (even with failed
test cases), 1 when it could not.
"""

import argparse
import os
import signal
import sys
import time
import traceback

import yaml

from .. import __version__
from . import environ, jobdef
from .logsender import LOG_COPY, LogSender
from .testshell import TestShell

try:
    _Loader, _Dumper = yaml.CSafeLoader, yaml.CSafeDumper
except AttributeError:  # pragma: no cover
    _Loader, _Dumper = yaml.SafeLoader, yaml.SafeDumper

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
                               self.signals.canceled)
        try:
            self.shell.setup()
        except OSError as exc:
            raise Failure("Infrastructure", "cannot set up the test shell in %s: %s"
                          % (root, exc.strerror or exc)) from None
        for action in plan.actions:
            if action.test is not None:
                self._test_action(plan, action.test, job_deadline)
            else:
                self._own_action(plan, action, job_deadline)

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
        for definition in action.definitions:
            self._check_canceled()
            log("info", "running %s: %d step(s)" % (definition.name, len(definition.steps)))
            try:
                outcome = self.shell.run(definition, deadline)
            except OSError as exc:
                raise Failure("Infrastructure", "cannot run %s: %s"
                              % (definition.name, exc.strerror or exc)) from None
            duration = "%.2f" % outcome.duration
            if outcome.status == "done":
                log("info", "%s: steps ended with exit code %d after %s s"
                    % (definition.name, outcome.rc, duration))
                self.sender.result("lava", definition.name, "pass", duration=duration)
                continue
            self.sender.result("lava", definition.name, "fail", duration=duration)
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
        log("info", "end: %d lava-test-shell (duration %s)"
            % (action.number, _hms(time.monotonic() - now)))

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
                "description": "inline test definitions run on the worker host",
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
    sender = LogSender(args.logging_url, args.job_id, ipv6=args.ipv6,
                       master_cert=args.master_cert, worker_cert=args.slave_cert,
                       copy=os.path.join(args.output_dir, LOG_COPY))
    try:
        sender.connect()
    except Exception as exc:
        print("lavacore-run: cannot connect to %s: %s" % (args.logging_url, exc),
              file=sys.stderr)
        return 1
    try:
        ok = JobRun(args, sender, signals).run()
    finally:
        sender.close()
    if sender.dropped:
        print("lavacore-run: %d log line(s) dropped: the master did not read them"
              % sender.dropped, file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
