"""``lavacore worker ...``: the command line of the worker process.

``lavacore.cli`` hands the arguments after ``worker`` to :func:`main`; ``python -m
lavacore.worker.cli`` runs it directly. Signals only ask the worker to stop (it then exits
0 and leaves running jobs alone, as lava-slave does); a second SIGINT exits at once.
"""

import argparse
import logging
import os
import signal
import socket
import sys

import gevent

from .. import logsetup, sdnotify
from .slave import DEFAULT_RUNNER, Worker, WorkerError

log = logging.getLogger("lavacore.worker")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    # One line and exit status 1 for a user error, as every lavacore command does.
    def error(self, message):
        raise UsageError(message)


def _runner_for(text):
    device_type, sep, command = text.partition("=")
    if not sep or not device_type.strip() or not command.strip():
        raise argparse.ArgumentTypeError("expected TYPE=COMMAND, got %r" % text)
    return device_type.strip(), command.strip()


def build_parser():
    p = _Parser(prog="lavacore worker",
                description="Run a protocol v3 worker (LAVA lava-slave equivalent).")
    p.add_argument("--master", required=True, metavar="URL",
                   help="the master's worker socket, e.g. tcp://master:5556")
    p.add_argument("--logs", "--socket-addr", dest="logs", required=True, metavar="URL",
                   help="the master's log socket given to runners, e.g. tcp://master:5555")
    p.add_argument("--hostname", default=socket.getfqdn(),
                   help="this worker's name as the master knows it (default: the FQDN)")
    p.add_argument("--work-dir", "--slave-dir", dest="work_dir",
                   default="/var/lib/lavacore/worker",
                   help="holds the job table (db.sqlite3) and the job dirs (tmp/)")
    p.add_argument("--runner", default=DEFAULT_RUNNER, metavar="CMD",
                   help="runner command given lava-run's arguments (default: %(default)s)")
    p.add_argument("--runner-for", action="append", type=_runner_for, default=[],
                   metavar="TYPE=CMD", help="runner command for one device type (repeatable;"
                   " the protocol v3 era lava-run: TYPE=lava-run)")
    p.add_argument("--lava-run-for", action="append", default=[], metavar="TYPE",
                   help="run this device type's jobs with LAVA's current lava-run (2020.09"
                        " and later), its HTTP log forwarded to the master (repeatable; '*':"
                        " every type but host and those of --runner-for)")
    p.add_argument("--lava-run", default="lava-run", metavar="CMD",
                   help="lava-run's command for --lava-run-for (default: %(default)s)")
    p.add_argument("--run-as", default=None, metavar="USER",
                   help="run the jobs' runners as this user (the worker runs as root)")
    timing = p.add_argument_group("timing (seconds; lava-slave's values by default)")
    timing.add_argument("--poll-timeout", type=float, default=5.0)
    timing.add_argument("--hello-retry", type=float, default=5.0,
                        help="HELLO_RETRY period until HELLO_OK")
    timing.add_argument("--job-check", type=float, default=5.0,
                        help="job check period (ended runners, END resends, cancel escalation)")
    timing.add_argument("--ping-interval", type=float, default=5.0,
                        help="PING interval until the master's PONG sets it")
    timing.add_argument("--min-ping-interval", type=int, default=5,
                        help="a PONG interval below this is refused")
    timing.add_argument("--cancel-term-again", type=float, default=60.0,
                        help="after CANCEL, SIGTERM again at every check from this time")
    timing.add_argument("--cancel-kill", type=float, default=120.0,
                        help="after CANCEL, SIGKILL at this time")
    timing.add_argument("--master-timeout", type=float, default=None,
                        help="no word from the master for this long: reconnect with a fresh"
                             " socket (default: 4 ping intervals)")
    p.add_argument("--ipv6", action="store_true", help="enable IPv6 on the sockets")
    p.add_argument("--encrypt", action="store_true", help="use CURVE encryption")
    p.add_argument("--master-cert", help="the master's public key file (with --encrypt)")
    p.add_argument("--worker-cert", "--slave-cert", dest="worker_cert",
                   help="this worker's key pair file (with --encrypt)")
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    p.add_argument("--log-file", default="", metavar="PATH",
                   help="write the log to PATH (default: stderr; logrotate's rename and"
                        " copytruncate both work)")
    return p


def make_worker(args):
    return Worker(
        master=args.master, logs=args.logs, hostname=args.hostname, work_dir=args.work_dir,
        runner=args.runner, runners=dict(args.runner_for), lava_run_for=args.lava_run_for,
        lava_run=args.lava_run, poll_timeout=args.poll_timeout,
        hello_retry=args.hello_retry, job_check=args.job_check,
        ping_interval=args.ping_interval, min_ping_interval=args.min_ping_interval,
        cancel_term_again=args.cancel_term_again, cancel_kill=args.cancel_kill,
        master_timeout=args.master_timeout, ipv6=args.ipv6, encrypt=args.encrypt,
        master_cert=args.master_cert, worker_cert=args.worker_cert, run_as=args.run_as,
        on_ready=lambda: sdnotify.ready("worker %s" % args.hostname))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print("lavacore worker: error: %s" % exc, file=sys.stderr)
        return 1
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    try:
        logsetup.setup(args.log_file, args.log_level)
    except OSError as exc:
        print("lavacore worker: error: --log-file: cannot open %s: %s"
              % (args.log_file, exc.strerror or exc), file=sys.stderr)
        return 1
    try:
        worker = make_worker(args)
    except ValueError as exc:
        print("lavacore worker: error: %s" % exc, file=sys.stderr)
        return 1

    signals_seen = []

    def on_signal(signum):
        signals_seen.append(signum)
        if len(signals_seen) > 1 and signum == signal.SIGINT:
            log.warning("second SIGINT: exiting at once")
            os._exit(1)
        log.info("%s received: stopping (running jobs are left alone)",
                 signal.Signals(signum).name)
        worker.stop()

    handlers = [gevent.signal_handler(sig, on_signal, sig)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)]
    watchdog = sdnotify.start_watchdog()
    try:
        worker.run()
    except WorkerError as exc:
        print("lavacore worker: error: %s" % exc, file=sys.stderr)
        return 1
    except Exception:
        return 1  # already logged with its traceback by the worker
    finally:
        sdnotify.stopping()
        if watchdog is not None:
            watchdog.kill(block=False)
        for handler in handlers:
            handler.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
