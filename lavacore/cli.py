"""The command line (README, "Command line"). ``main(argv) -> int``; thin over the same
storage, Flow and submission code the master and the API use.

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

from . import __version__, cliaccounts, present

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
        self.flow = Flow(self.storage, self.clock, self.publish, self.pm.hook, None,
                         announce=self.announce)
        # The command line has the database: it sees everything, unless --as asks for
        # what a user sees.
        principal = permissions.SYSTEM if as_user is None else \
            permissions.Principal.load(self.storage, as_user)
        self.policy = permissions.Policy(self.storage, principal)

    def publish(self, kind, data, username=None):
        self.storage.publish_event({"kind": kind, "data": data, "username": username})

    def announce(self, line):
        """A change made here, in the running master's log (lavacore/flow.py)."""
        self.storage.publish_event({"kind": "log", "username": None, "data": {
            "line": line, "source": "command line, %s" % invoking_user()}})

    def close(self):
        self.storage.close()


def invoking_user():
    """Who runs this command: $USER, else the name of this uid in the password database,
    else "uid N". Never empty: an empty submitter would pass for the system's own."""
    name = os.environ.get("USER", "").strip()
    if name:
        return name
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return "uid %d" % os.getuid()


def _check_user(args):
    if not str(args.user).strip():
        raise UserError("--user: must not be empty")


def _print_json(data):
    print(json.dumps(data, indent=2, sort_keys=False))


def _table(rows, columns):
    print(present.table(rows, columns), end="")


# -- commands ---------------------------------------------------------------------------

def cmd_master(args):
    from . import config as config_mod
    from . import logsetup
    from .master import Master

    config = config_mod.load(args.config)
    logsetup.apply(config, args.log_file, args.log_level)
    return Master(config).run()


def cmd_api(args):
    """The HTTP API in processes of their own, beside the master (lavacore/apiserver.py)."""
    from . import apiserver
    from . import config as config_mod
    from . import logsetup

    from .services.api import parse_listen

    if args.processes < 1:
        raise UserError("--processes: at least 1")
    config = config_mod.load(args.config)
    parse_listen(args.listen or config.api.listen)  # a typo: one line, before anything
    if args.processes > 1 and config.storage.backend == "sqlite":
        raise UserError(apiserver.SQLITE_POOL % args.processes)
    logsetup.apply(config, args.log_file, args.log_level)
    return apiserver.run(config, listen=args.listen, processes=args.processes,
                         events_url=args.events, reuse_port=args.reuse_port,
                         log_file=args.log_file, log_level=args.log_level)


def cmd_config(args):
    """The configuration the master would run with, or the error it would stop with."""
    from . import config as config_mod
    from . import plugins, privileges
    from .config import ConfigError

    config = config_mod.load(args.config)
    if config.master.user:
        # Who runs this command does not matter: the master starts as root to drop.
        privileges.identity(config.master.user, config.master.group)
    warnings = config_mod.check_files(config)
    pm = plugins.build(config)
    from .storage import StorageError

    try:
        # The backend checks its [storage] options as the master's start would (it
        # connects only when opened, which this is not).
        if pm.hook.storage(config=config) is None:
            raise ConfigError("[storage] backend: no storage plugin named %r is installed"
                              % config.storage.backend)
    except StorageError as exc:
        raise ConfigError(str(exc)) from None
    data = config_mod.effective(config, plugins.plugin_tables(pm, config))
    ignored = ["[%s]: plugin %s is disabled ([plugins] disable): this table is ignored"
               % item for item in sorted(pm.lavacore_ignored_tables.items())]
    for line in warnings + ignored:
        print("lavacore: warning: %s" % line, file=sys.stderr)
    if args.json:
        _print_json(data)
        return 0
    scheduler = plugins.scheduler_in_use(pm, config)
    comments = ["The configuration of %s as the master runs it:" % os.path.abspath(
        config.path), "defaults filled in, paths made absolute, secrets masked.",
        "Scheduler in use: %s." % (plugins._short(scheduler) if scheduler else "none")]
    comments += ["warning: %s" % line for line in warnings + ignored]
    sys.stdout.write(config_mod.to_toml(data, comments))
    return 0


def cmd_submit(args, session):
    import yaml

    from .jobs import JobError, prepare, submit

    path = args.definition
    _check_user(args)
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
            jobs = prepare(session.storage, session.pm.hook, None, text, args.user,
                           session.clock.time(), config=session.config,
                           strict=args.strict)
        else:
            jobs = submit(session.storage, session.pm.hook, None, text, args.user,
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


def cmd_jobs_show(args, session):
    job = _job(session, args.id)
    data = present.job_details(session.storage, job)
    if args.json:
        _print_json(data)
    else:
        print(present.job_text(data), end="")
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
        _table(rows, present.JOB_COLUMNS)
    return 0


def cmd_jobs_cancel(args, session):
    _check_user(args)
    job = _job(session, args.id)
    if not session.policy.can_cancel_job(job):
        raise UserError("job %s: you may not cancel it" % args.id)
    canceled = session.flow.cancel(job.id, username=args.user)
    if canceled is None:
        job = session.storage.get_job(job.id)
        print("job %d is already %s" % (job.id, job.state.display), file=sys.stderr)
        return 0
    print("job %d: %s" % (job.id, canceled.state.display))
    return 0




def _waiting(session, job):
    """Why a job that has not started waits, in one line."""
    from .states import SCHEDULABLE_HEALTH, JobState, WorkerState

    if job.state == JobState.SCHEDULED:
        return "scheduled on %s (worker %s): waiting for the worker to start it" % (
            job.actual_device or "-", job.worker or "-")
    if job.state == JobState.SCHEDULING:
        return "waiting for the other jobs of its MultiNode group to be scheduled"
    if not job.requested_device_type:
        return "waiting to be scheduled"
    kind = job.requested_device_type
    devices = session.storage.list_devices(device_type=kind)
    if not devices:
        return "waiting for a device of type %s: there is none" % kind
    online = {w.hostname for w in session.storage.list_workers()
              if w.state == WorkerState.ONLINE}
    tags = set(job.tags or ())
    fitting = [d for d in devices if tags <= set(d.tags)]
    usable = [d for d in fitting if d.health in SCHEDULABLE_HEALTH and d.worker in online]
    idle = [d for d in usable if d.state.display == "Idle"]
    what = "a device of type %s%s" % (kind, " with tags %s" % ", ".join(sorted(tags))
                                      if tags else "")
    if not fitting:
        return "waiting for %s: none of the %d device(s) of the type has those tags" % (
            what, len(devices))
    if not usable:
        return "waiting for %s: none of the %d is Good or Unknown on an Online worker" % (
            what, len(fitting))
    if not idle:
        return "waiting for %s: all %d usable one(s) are busy" % (what, len(usable))
    return "waiting for %s: %d idle, the next scheduling pass takes it" % (what, len(idle))


def _ended(job):
    reason = " (%s)" % " ".join(job.failure_comment.split())[:500] \
        if job.failure_comment and job.health.display != "Complete" else ""
    return "job %d: %s, %s%s" % (job.id, job.state.display, job.health.display, reason)


def cmd_jobs_logs(args, session):
    from .states import JobState

    job = _job(session, args.id)
    path = os.path.join(job.output_dir(session.config.resolve(
        session.config.master.output_dir)), "output.yaml")
    position = 0
    pending = ""
    inode = None
    printed = skip = 0
    said = last_state = None  # the last "waiting" line printed, the state it was for
    loops = 0
    while True:
        # The state before the file: a Finished job's lines are all in it already.
        job = session.storage.get_job(job.id)
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
            print(line if args.raw else present.log_line_text(line), flush=True)
        if printed == 0 and job.state < JobState.RUNNING and (
                loops % 25 == 0 or job.state != last_state):
            # Nothing to show yet: say why, again when that changes (on stderr, so that
            # stdout is the log alone).
            line = "job %d: %s, no log yet: %s" % (job.id, job.state.display,
                                                   _waiting(session, job))
            if line != said:
                print(line, file=sys.stderr, flush=True)
                said = line
        last_state = job.state
        loops += 1
        finished = job.state == JobState.FINISHED
        if not args.follow or finished:
            if finished and printed == 0:
                print("%s; it has no log" % _ended(job), file=sys.stderr)
            elif finished and args.follow:
                print(_ended(job), file=sys.stderr)
            break
        time.sleep(args.interval)
    return 0


def cmd_jobs_results(args, session):
    job = _job(session, args.id)
    cases = session.storage.list_testcases(job.id)
    if args.json:
        _print_json(present.results_details(job, cases))
    else:
        print(present.results_table(cases), end="")
    return 0


def cmd_devices_list(args, session):
    rows = [d.to_dict() for d in session.storage.list_devices()
            if session.policy.can_view_device(d)]
    if args.json:
        _print_json(rows)
    else:
        _table(rows, present.DEVICE_COLUMNS)
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
    data = present.device_details(session.storage, device)
    if args.json:
        _print_json(data)
    else:
        print(present.device_text(data), end="")
    return 0


def cmd_devices_set_health(args, session):
    from . import health
    from .states import DeviceHealth

    _check_user(args)
    _device(session, args.hostname)
    new = _parse(DeviceHealth, args.health, "health")
    device = health.set_device_health(session, args.hostname, new, args.user, args.reason)
    print("%s: %s" % (device.hostname, device.health.display))
    return 0


def cmd_workers_set_health(args, session):
    from .states import WorkerHealth

    _check_user(args)
    _worker(session, args.hostname)
    new = _parse(WorkerHealth, args.health, "health")
    worker = session.flow.set_worker_health(args.hostname, new, args.user, args.reason)
    print("%s: %s" % (worker.hostname, worker.health.display))
    return 0


def cmd_workers_show(args, session):
    worker = _worker(session, args.hostname)
    data = worker_rows(session, [worker], text=not args.json)[0]
    details = present.worker_details(session.storage, worker, session.policy)
    data["devices"], data["history"] = details["devices"], details["history"]
    if args.json:
        _print_json(data)
    else:
        print(present.worker_text(data), end="")
    return 0


def _master_running(session):
    """Does a master run on this database? True or False where the storage can tell (a
    datagram to SQLite's notification socket is refused when no master holds it), None
    where it cannot (PostgreSQL: a NOTIFY goes out whether anyone listens or not)."""
    if session.storage.name != "sqlite":
        return None
    return bool(session.storage.publish_event({"kind": "ping", "data": {},
                                               "username": None}))


# A running master writes an Online worker's last_ping every few seconds and marks it
# Offline after [master] worker_timeout of silence; past this much more, no master does.
STALE_MARGIN = 30.0


def worker_rows(session, workers, text=True):
    """The workers as dicts; an Online worker no master keeps Online is "stale" (the
    master was killed, or is stuck): its state says so in ``text`` form."""
    running = None
    now = time.time()
    limit = session.config.master.worker_timeout + STALE_MARGIN
    rows = []
    for worker in workers:
        row = worker.to_dict()
        row["stale"] = False
        if worker.state.display == "Online":
            if running is None:
                running = _master_running(session)
                running = "unknown" if running is None else running
            silent = now - worker.last_ping if worker.last_ping is not None else None
            if running is False:
                row["stale"] = True
                note = "master not running"
            elif silent is not None and silent > limit:
                row["stale"] = True
                note = "no ping recorded for %d s: is the master running?" % silent
            if row["stale"] and text:
                row["state"] = "Online (%s)" % note
        rows.append(row)
    return rows


def cmd_workers_list(args, session):
    rows = worker_rows(session, session.storage.list_workers(), text=not args.json)
    if args.json:
        _print_json(rows)
    else:
        _table(rows, present.WORKER_COLUMNS)
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
    parser.add_argument("--log-level", default=None, type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                        help="the master's log level (default: [logging] level, INFO)")
    parser.add_argument("--log-file", default=None, metavar="PATH",
                        help="the master's log file (default: [logging] file, stderr)")
    parser.add_argument("--version", action="version", version="lavacore " + __version__)
    parser.add_argument("--as", dest="as_user", metavar="USER",
                        help="show jobs and devices as USER may see them (the command line"
                             " sees everything by default)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("master", help="run the master (the default command)")
    p = sub.add_parser("api", help="serve the HTTP API (XML-RPC, REST, pages, /metrics)"
                                   " from processes beside the master, on its database")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="where to listen (default: [api] listen; the master must not"
                        " listen there too)")
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="a pool of N processes sharing the socket (default: 1)")
    p.add_argument("--reuse-port", action="store_true",
                   help="each process binds the address with SO_REUSEPORT instead of"
                        " sharing one socket (other lavacore api processes may join)")
    p.add_argument("--events", metavar="URL",
                   help="the master's event socket, for /ws/ (default: [master] events,"
                        " a wildcard host taken as this host)")
    p.set_defaults(func=cmd_api, standalone=True)
    p = sub.add_parser("worker", add_help=False, prefix_chars="\0",
                       help="run a protocol v3 worker (lavacore worker --help)")
    p.add_argument("worker_args", nargs=argparse.REMAINDER)
    p = sub.add_parser("config", help="print the effective configuration (defaults filled"
                                      " in, paths resolved, secrets masked)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_config, standalone=True)

    p = sub.add_parser("submit", help="submit a job definition; prints job ids")
    p.add_argument("definition", help="YAML job definition file, or - for stdin")
    p.add_argument("--user", default=invoking_user(),
                   help="submitter name (default: $USER, or this uid's login name)")
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
    p.add_argument("--user", default=invoking_user())
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
    p.add_argument("--user", default=invoking_user())
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
        if args.command == "worker":
            from .worker.cli import main as worker_main

            return worker_main(args.worker_args)
        if args.command in (None, "master"):
            return cmd_master(args)
        if args.command == "api":
            return cmd_api(args)
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
