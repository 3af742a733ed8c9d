"""The command line (contracts.md). ``main(argv) -> int``; thin over the same storage,
Flow and submission code the master and the API use.

Exit status 0 on success, 1 on a user error with one line on stderr, never a traceback.
Changes made here are announced to a running master over the storage's notification
channel, so it reacts at once (a submitted job is started in milliseconds).
"""

import argparse
import json
import logging
import os
import sys
import time

from . import __version__, cliaccounts

class UserError(Exception):
    """A one-line error for the person at the terminal."""


class Session:
    """What a command needs: config, plugins, storage and a Flow that notifies the master."""

    def __init__(self, config_path, as_user=None):
        from . import config as config_mod
        from . import permissions, plugins
        from .clock import Clock
        from .flow import Flow
        from .master import open_storage

        self.config = config_mod.load(config_path)
        self.pm = plugins.build(self.config)
        self.pm.hook.configure(config=self.config, master=None)
        self.storage = open_storage(self.config, self.pm)
        self.clock = Clock()
        self.flow = Flow(self.storage, self.clock, self.publish, self.pm.hook, None)
        # The command line has the database: it sees everything, unless --as asks for
        # what a user sees.
        principal = permissions.SYSTEM if as_user is None else \
            permissions.Principal.load(self.storage, as_user)
        self.policy = permissions.Policy(self.storage, principal)

    def publish(self, kind, data, username=None):
        self.storage.publish_event({"kind": kind, "data": data, "username": username})

    def close(self):
        self.storage.close()


def _print_json(data):
    print(json.dumps(data, indent=2, sort_keys=False))


def _table(rows, columns):
    if not rows:
        return
    widths = [max(len(str(c)), *(len(str(r.get(c, "") or "")) for r in rows)) for c in columns]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in rows:
        print("  ".join(str(row.get(c, "") if row.get(c) is not None else "-").ljust(w)
                        for c, w in zip(columns, widths)).rstrip())


# -- commands ---------------------------------------------------------------------------

def cmd_master(args):
    from . import config as config_mod
    from .master import Master

    _setup_logging(args.log_level)
    config = config_mod.load(args.config)
    return Master(config).run()


def cmd_submit(args, session):
    import yaml

    from .jobs import JobError, prepare, submit

    path = args.definition
    if args.strict and not args.dry_run:
        raise UserError("--strict: only with --dry-run (a submission is checked as LAVA"
                        " checks it)")
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, "rb") as handle:
                text = handle.read()
    except OSError as exc:
        raise UserError("%s: cannot read: %s" % (path, exc.strerror)) from None
    try:
        if args.dry_run:
            jobs = prepare(session.storage, session.pm.hook, None, text, args.user or "",
                           session.clock.time(), config=session.config,
                           strict=args.strict)
        else:
            jobs = submit(session.storage, session.pm.hook, None, text, args.user or "",
                          session.clock.time(), config=session.config)
    except JobError as exc:
        raise UserError("%s: %s" % (path, exc)) from None
    if args.dry_run:
        for job in jobs:
            role = ""
            if job.target_group:
                block = yaml.safe_load(job.definition)["protocols"]["lava-multinode"]
                role = ", role %s" % block["role"]
            print("valid: would queue %r for %s%s" % (
                job.description, "device type " + job.requested_device_type
                if job.requested_device_type else "a dynamic connection", role))
        return 0
    session.flow.submitted(jobs)
    for job in jobs:
        print(job.id)
    return 0


def _job(session, job_id):
    from .storage import NotFound

    try:
        job = session.storage.get_job(_job_id(job_id))
    except NotFound:
        job = None
    if job is None or not session.policy.can_view_job(job):
        raise UserError("job %s: no such job" % job_id)
    return job


def _job_id(text):
    try:
        value = int(str(text).split(".")[0])
    except ValueError:
        raise UserError("job id %r: not a number" % text) from None
    if value < 0:
        raise UserError("job id %r: not a valid id" % text)
    return value


def job_details(session, job):
    data = job.to_dict()
    counts = session.storage.testcase_counts(job.id)
    data["results"] = {key: counts.get(key, 0) for key in ("pass", "fail", "skip", "unknown")}
    for key, value in counts.items():
        data["results"].setdefault(key, value)
    if job.target_group:
        data["group"] = [{"id": j.id, "sub_id": j.sub_id, "state": j.state.display,
                          "health": j.health.display, "device": j.actual_device}
                         for j in session.storage.list_jobs(target_group=job.target_group)]
    return data


def cmd_jobs_show(args, session):
    job = _job(session, args.id)
    data = job_details(session, job)
    if args.json:
        _print_json(data)
        return 0
    for key in ("id", "description", "submitter", "state", "health", "device_type", "device",
                "worker", "priority", "tags", "submit_time", "start_time", "end_time",
                "failure_comment"):
        value = data.get(key)
        print("%-16s %s" % (key + ":", "-" if value in (None, [], "") else value))
    results = ", ".join("%s %d" % (k, v) for k, v in data["results"].items())
    print("%-16s %s" % ("results:", results))
    for member in data.get("group", ()):
        print("%-16s %s %s %s/%s on %s" % ("group:", member["id"], member["sub_id"],
                                           member["state"], member["health"],
                                           member["device"] or "-"))
    return 0


def cmd_jobs_list(args, session):
    from .states import JobState

    filters = {}
    if args.state:
        try:
            filters["state"] = JobState.parse(args.state)
        except ValueError as exc:
            raise UserError("--state: %s" % exc) from None
    jobs = session.storage.list_jobs(limit=args.limit, order="-id",
                                     visible=session.policy.job_filter(), **filters)
    rows = [job.to_dict() for job in jobs]
    if args.json:
        _print_json(rows)
    else:
        _table(rows, ["id", "state", "health", "device_type", "device", "submitter",
                      "description"])
    return 0


def cmd_jobs_cancel(args, session):
    job = _job(session, args.id)
    if not session.policy.can_cancel_job(job):
        raise UserError("job %s: you may not cancel it" % args.id)
    canceled = session.flow.cancel(job.id, username=args.user or "")
    if canceled is None:
        job = session.storage.get_job(job.id)
        print("job %d is already %s" % (job.id, job.state.display), file=sys.stderr)
        return 0
    print("job %d: %s" % (job.id, canceled.state.display))
    return 0


def _format_line(line):
    from .logformat import parse_line

    try:
        data = parse_line(line)
    except ValueError:
        return line
    msg = data.get("msg")
    if isinstance(msg, dict):
        msg = json.dumps(msg)
    return "%s %-8s %s" % (str(data.get("dt", ""))[:19], data.get("lvl", ""), msg)


def cmd_jobs_logs(args, session):
    from .states import JobState

    job = _job(session, args.id)
    path = os.path.join(job.output_dir(session.config.resolve(
        session.config.master.output_dir)), "output.yaml")
    position = 0
    pending = ""
    inode = None
    printed = skip = 0
    while True:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                now = os.fstat(handle.fileno()).st_ino
                if inode is not None and now != inode:
                    # Replaced by the worker's copy after a master restart: go on from
                    # the same line of the new file.
                    print("(job %d: its log was replaced by the worker's copy; going on"
                          " from line %d of it)" % (job.id, printed + 1), file=sys.stderr)
                    position, pending, skip = 0, "", printed
                inode = now
                handle.seek(position)
                chunk = handle.read()
                position = handle.tell()
        except FileNotFoundError:
            chunk = ""
        pending += chunk
        *lines, pending = pending.split("\n")
        for line in lines:
            if skip:
                skip -= 1
                continue
            printed += 1
            if line.startswith("- "):
                line = line[2:]
            print(line if args.raw else _format_line(line), flush=True)
        if not args.follow:
            break
        state = session.storage.get_job(job.id).state
        if state == JobState.FINISHED and not chunk:
            job = session.storage.get_job(job.id)
            print("job %d: %s, %s" % (job.id, job.state.display, job.health.display),
                  file=sys.stderr)
            break
        time.sleep(args.interval)
    return 0


def cmd_jobs_results(args, session):
    job = _job(session, args.id)
    cases = session.storage.list_testcases(job.id)
    if args.json:
        suites = {}
        for case in cases:
            suites.setdefault(case.suite, []).append(case.to_dict())
        _print_json({"job": job.id, "suites": [{"name": name, "tests": tests}
                                               for name, tests in suites.items()]})
        return 0
    rows = [{"suite": c.suite, "case": c.name, "result": c.result,
             "measurement": c.measurement, "units": c.units} for c in cases]
    _table(rows, ["suite", "case", "result", "measurement", "units"])
    return 0


def cmd_devices_list(args, session):
    rows = [d.to_dict() for d in session.storage.list_devices()
            if session.policy.can_view_device(d)]
    if args.json:
        _print_json(rows)
    else:
        _table(rows, ["hostname", "device_type", "worker", "state", "health", "current_job"])
    return 0


def _device(session, hostname):
    from .storage import NotFound

    try:
        device = session.storage.get_device(hostname)
    except NotFound:
        device = None
    if device is None or not session.policy.can_view_device(device):
        raise UserError("device %s: no such device" % hostname)
    return device


def _worker(session, hostname):
    from .storage import NotFound

    try:
        return session.storage.get_worker(hostname)
    except NotFound:
        raise UserError("worker %s: no such worker" % hostname) from None


def _parse(enum, text, option):
    try:
        return enum.parse(text)
    except ValueError as exc:
        raise UserError("%s: %s" % (option, exc)) from None


def cmd_devices_show(args, session):
    device = _device(session, args.hostname)
    data = device.to_dict()
    data["history"] = [dict(h, time=_iso(h["time"]))
                       for h in session.storage.list_history("device", device.hostname)]
    if args.json:
        _print_json(data)
        return 0
    for key in ("hostname", "device_type", "worker", "state", "health", "tags",
                "current_job", "last_health_report_job"):
        value = data.get(key)
        print("%-24s %s" % (key + ":", "-" if value in (None, [], "") else value))
    for entry in data["history"]:
        print("%-24s %s %s -> %s by %s: %s" % ("history:", entry["time"], entry["old"],
                                                entry["new"], entry["user"] or "-",
                                                entry["reason"] or "-"))
    return 0


def cmd_devices_set_health(args, session):
    from . import health
    from .states import DeviceHealth

    _device(session, args.hostname)
    new = _parse(DeviceHealth, args.health, "health")
    device = health.set_device_health(session, args.hostname, new, args.user, args.reason)
    print("%s: %s" % (device.hostname, device.health.display))
    return 0


def cmd_workers_set_health(args, session):
    from .states import WorkerHealth

    _worker(session, args.hostname)
    new = _parse(WorkerHealth, args.health, "health")
    worker = session.flow.set_worker_health(args.hostname, new, args.user, args.reason)
    print("%s: %s" % (worker.hostname, worker.health.display))
    return 0


def cmd_workers_show(args, session):
    worker = _worker(session, args.hostname)
    data = worker.to_dict()
    data["devices"] = [d.hostname for d in session.storage.list_devices(worker=worker.hostname)]
    data["history"] = [dict(h, time=_iso(h["time"]))
                       for h in session.storage.list_history("worker", worker.hostname)]
    if args.json:
        _print_json(data)
    else:
        for key, value in data.items():
            print("%-16s %s" % (key + ":", value))
    return 0


def _iso(epoch):
    from .models import iso

    return iso(epoch)


def cmd_workers_list(args, session):
    rows = [w.to_dict() for w in session.storage.list_workers()]
    if args.json:
        _print_json(rows)
    else:
        _table(rows, ["hostname", "state", "health", "last_ping"])
    return 0


def cmd_certs_create(args):
    from . import certs

    key = certs.create_keypair(args.name, args.dir, force=args.force)
    print("public key: %s" % key.path)
    print("secret key: %s_secret" % key.path)
    return 0


def cmd_workers_allow(args, session):
    from . import certs

    key = certs.allow_worker(session.config, args.hostname, args.public_key_file)
    print("%s: allowed (key %s)%s" % (args.hostname, key.public_key,
                                      ", replacing the previous key" if key.replaced else ""))
    return 0


def cmd_workers_revoke(args, session):
    from . import certs

    certs.revoke_worker(session.config, args.hostname)
    print("%s: revoked" % args.hostname)
    return 0


def _open_unmigrated(config_path):
    """Config, plugins and the storage opened as it is (db check must see an old schema)."""
    from . import config as config_mod
    from . import plugins

    config = config_mod.load(config_path)
    pm = plugins.build(config)
    pm.hook.configure(config=config, master=None)
    storage = pm.hook.storage(config=config)
    if storage is None:
        raise UserError("[storage] backend: no storage plugin named %r is installed"
                        % config.storage.backend)
    return config, pm, storage.open()


def cmd_db(args):
    from . import dbtools

    config, pm, storage = _open_unmigrated(args.config)
    try:
        if args.db_command == "migrate":
            old, new = dbtools.db_migrate(storage)
            print("schema version %d -> %d" % (old, new) if old != new
                  else "schema version %d, up to date" % new)
            return 0
        if args.db_command == "check":
            problems = dbtools.db_check(storage)
            for problem in problems:
                print(problem, file=sys.stderr)
            if problems:
                return 1
            print("ok")
            return 0
        dbtools.db_migrate(storage)
        target = dbtools.open_storage_url(config, pm, args.to,
                                          {"schema": args.schema} if args.schema else None)
        try:
            counts = dbtools.db_copy(storage, target)
        finally:
            target.close()
        for table, rows in counts.items():
            print("%-14s %d" % (table, rows))
        return 0
    finally:
        storage.close()


# -- parsing ----------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        prog="lavacore", description="LAVA protocol v3 test-job dispatcher")
    parser.add_argument("-c", "--config", default="config.toml",
                        help="config file (default: ./config.toml)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--version", action="version", version="lavacore " + __version__)
    parser.add_argument("--as", dest="as_user", metavar="USER",
                        help="show jobs and devices as USER may see them (the command line"
                             " sees everything by default)")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("master", help="run the master (the default command)")

    p = sub.add_parser("submit", help="submit a job definition; prints job ids")
    p.add_argument("definition", help="YAML job definition file, or - for stdin")
    p.add_argument("--user", default=os.environ.get("USER", ""),
                   help="submitter name (default: $USER)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the job as a submission is checked, queue nothing; prints"
                        " the jobs it would queue")
    p.add_argument("--strict", action="store_true",
                   help="with --dry-run: also LAVA's validate-time checks")
    p.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="show, list, cancel jobs; their logs and results")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    p = jsub.add_parser("show")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs_show)
    p = jsub.add_parser("list")
    p.add_argument("--state")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs_list)
    p = jsub.add_parser("cancel")
    p.add_argument("id")
    p.add_argument("--user", default=os.environ.get("USER", ""))
    p.set_defaults(func=cmd_jobs_cancel)
    p = jsub.add_parser("logs")
    p.add_argument("id")
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--raw", action="store_true", help="print the YAML lines as stored")
    p.add_argument("--interval", type=float, default=0.2, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_jobs_logs)
    p = jsub.add_parser("results")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs_results)

    devices = sub.add_parser("devices", help="list and show devices, set their health")
    dsub = devices.add_subparsers(dest="devices_command", required=True)
    _list_show_health(dsub, cmd_devices_list, cmd_devices_show, cmd_devices_set_health,
                      "Good|Unknown|Looping|Bad|Maintenance|Retired")

    workers = sub.add_parser("workers", help="list and show workers, set their health")
    wsub = workers.add_subparsers(dest="workers_command", required=True)
    _list_show_health(wsub, cmd_workers_list, cmd_workers_show, cmd_workers_set_health,
                      "Active|Maintenance|Retired (cascades to devices)")

    p = wsub.add_parser("allow", help="allow a worker's CURVE public key ([auth_curve])")
    p.add_argument("hostname")
    p.add_argument("public_key_file")
    p.set_defaults(func=cmd_workers_allow)
    p = wsub.add_parser("revoke", help="revoke a worker's CURVE key ([auth_curve])")
    p.add_argument("hostname")
    p.set_defaults(func=cmd_workers_revoke)

    certs = sub.add_parser("certs", help="CURVE key pairs")
    csub = certs.add_subparsers(dest="certs_command", required=True)
    p = csub.add_parser("create", help="write NAME.key and NAME.key_secret")
    p.add_argument("name")
    p.add_argument("--dir", default=".")
    p.add_argument("--force", action="store_true", help="overwrite an existing pair")
    p.set_defaults(func=cmd_certs_create, standalone=True)

    cliaccounts.add_parsers(sub)

    db = sub.add_parser("db", help="database schema and moves")
    bsub = db.add_subparsers(dest="db_command", required=True)
    p = bsub.add_parser("migrate", help="create or upgrade the schema")
    p.set_defaults(func=cmd_db, standalone=True)
    p = bsub.add_parser("check", help="schema and records consistent? (exit 1 if not)")
    p.set_defaults(func=cmd_db, standalone=True)
    p = bsub.add_parser("copy", help="copy this lab's database to another (empty) one")
    p.add_argument("--to", required=True, help="postgresql://... or a SQLite file path")
    p.add_argument("--schema", default="", help="PostgreSQL schema of the target")
    p.set_defaults(func=cmd_db, standalone=True)
    return parser


def _list_show_health(sub, list_func, show_func, health_func, healths):
    """list, show and set-health: the same three commands for devices and workers."""
    p = sub.add_parser("list")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=list_func)
    p = sub.add_parser("show", help="with its health history")
    p.add_argument("hostname")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=show_func)
    p = sub.add_parser("set-health", help=healths)
    p.add_argument("hostname")
    p.add_argument("health")
    p.add_argument("--reason", default="")
    p.add_argument("--user", default=os.environ.get("USER", ""))
    p.set_defaults(func=health_func)


def _setup_logging(level):
    logging.basicConfig(level=getattr(logging, level),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "worker":
        from .worker.cli import main as worker_main

        return worker_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from .config import ConfigError
    from .jobs import JobError
    from .storage import StorageError

    errors = (UserError, ConfigError, JobError, StorageError, cliaccounts.CommandError)
    try:
        if args.command in (None, "master"):
            return cmd_master(args)
        _setup_logging("WARNING")
        if getattr(args, "standalone", False):
            return args.func(args)
        session = Session(args.config, args.as_user)
        try:
            return args.func(args, session)
        finally:
            session.close()
    except errors as exc:
        print("lavacore: %s" % exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
