"""The command line of users, groups, tokens and the audit trail (``lavacore users``,
``groups``, ``tokens``, ``audit``): the operations of lavacore.api.accounts, run as the
system (the command line has the database), with the local user named in the audit."""

import datetime
import json

from .api import accounts
from .api.auth import LocalCaller
from .api.errors import ApiError
from .models import iso

DAY = 86400


class CommandError(Exception):
    """A one-line error for the person at the terminal."""


def _caller(session):
    from .cli import invoking_user  # (cli imports this module)

    return LocalCaller(session.storage, session.clock, "cli:%s" % invoking_user())


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ApiError as exc:
        raise CommandError(exc.message) from None


def _print(rows, columns, as_json):
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        return
    widths = [max(len(c), *(len(_text(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in rows:
        print("  ".join(_text(row.get(c)).ljust(w) for c, w in zip(columns, widths)).rstrip())


def _text(value):
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


# -- users ------------------------------------------------------------------------------

def cmd_users_add(args, session):
    caller = _caller(session)
    user = _run(accounts.users_add, caller, args.username, args.first_name, args.last_name,
                args.email, True, args.staff, args.superuser)
    for group in args.group or ():
        _run(accounts.users_groups_add, caller, user.username, group)
    print(user.username)
    return 0


def cmd_users_list(args, session):
    users = _run(accounts.users_list, _caller(session))
    _print([u.to_dict() for u in users], ["username", "is_active", "is_staff",
                                          "is_superuser", "last_login"], args.json)
    return 0


def cmd_users_show(args, session):
    data = _run(accounts.users_show, _caller(session), args.username)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    for key in ("username", "first_name", "last_name", "email", "is_active", "is_staff",
                "is_superuser", "date_joined", "last_login", "groups", "tokens"):
        print("%-14s %s" % (key + ":", _text(data.get(key))))
    perms = ["%s.%s.%s" % (p["app"], p["model"], p["codename"]) for p in data["permissions"]]
    print("%-14s %s" % ("permissions:", _text(perms)))
    return 0


def cmd_users_update(args, session):
    _run(accounts.users_update, _caller(session), args.username, args.first_name,
         args.last_name, args.email, args.active, args.staff, args.superuser)
    return 0


def cmd_users_delete(args, session):
    _run(accounts.users_delete, _caller(session), args.username)
    return 0


# -- groups -----------------------------------------------------------------------------

def cmd_groups_add(args, session):
    _run(accounts.groups_add, _caller(session), args.name)
    return 0


def cmd_groups_list(args, session):
    caller = _caller(session)
    names = _run(accounts.groups_list, caller)
    rows = [{"name": name, "users": caller.storage.group_members(name)} for name in names]
    _print(rows, ["name", "users"], args.json)
    return 0


def cmd_groups_show(args, session):
    data = _run(accounts.groups_show, _caller(session), args.name)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print("%-20s %s" % ("name:", data["name"]))
    print("%-20s %s" % ("users:", _text(data["users"])))
    print("%-20s %s" % ("permissions:", _text(["%s.%s.%s" % (p["app"], p["model"],
                                                            p["codename"])
                                               for p in data["permissions"]])))
    print("%-20s %s" % ("on objects:", _text(["%s %s: %s" % (p["kind"], p["name"],
                                                           p["codename"])
                                              for p in data["object_permissions"]])))
    return 0


def cmd_groups_delete(args, session):
    _run(accounts.groups_delete, _caller(session), args.name)
    return 0


def cmd_groups_add_user(args, session):
    _run(accounts.users_groups_add, _caller(session), args.username, args.name)
    return 0


def cmd_groups_remove_user(args, session):
    _run(accounts.users_groups_delete, _caller(session), args.username, args.name)
    return 0


PERMISSION_WORDS = {"view": "view_devicetype", "submit": "submit_to_devicetype",
                    "change": "change_devicetype"}


def _device_type(session, name):
    from .storage import NotFound

    try:
        return session.storage.get_device_type(name).name
    except NotFound:
        raise CommandError("device type %r does not exist" % name) from None


def cmd_groups_perms(args, session):
    caller = _caller(session)
    if args.perms_command == "list":
        rows = [{"kind": kind, "name": name, "permission": code}
                for kind, name, group, code in session.storage.object_permissions()
                if group == args.name]
        _print(rows, ["kind", "name", "permission"], args.json)
        return 0
    code = PERMISSION_WORDS.get(args.permission, args.permission)
    device_type = _device_type(session, args.device_type)
    if args.perms_command == "add":
        _run(accounts.object_perms_add, caller, "devicetype", device_type, args.name, code)
    else:
        _run(accounts.object_perms_delete, caller, "devicetype", device_type, args.name,
             code)
    return 0


# -- tokens -----------------------------------------------------------------------------

def cmd_tokens_create(args, session):
    expires = None
    if args.expires is not None:
        if args.expires <= 0:
            raise CommandError("--expires: a number of days, more than 0")
        expires = session.clock.time() + args.expires * DAY
    try:
        _, token = _run(accounts.tokens_create, _caller(session), args.username,
                        args.description or "", expires)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    print(token)
    return 0


def cmd_tokens_list(args, session):
    rows = _run(accounts.tokens_list, _caller(session), args.username)
    rows = [dict(r, created=iso(r["created"]), last_used=iso(r["last_used"]),
                 expires=iso(r["expires"])) for r in rows]
    _print(rows, ["id", "username", "description", "created", "last_used", "expires"],
           args.json)
    return 0


def cmd_tokens_revoke(args, session):
    _run(accounts.tokens_revoke, _caller(session), args.token_id)
    return 0


# -- the audit trail --------------------------------------------------------------------

def _since(text):
    """--since: ISO date/time (UTC), or a number of hours ago (24h, 90m, 2d)."""
    text = text.strip()
    units = {"m": 60, "h": 3600, "d": DAY}
    if text[-1:] in units and text[:-1].isdigit():
        return datetime.datetime.now(datetime.timezone.utc).timestamp() - \
            int(text[:-1]) * units[text[-1]]
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise CommandError("--since %r: an ISO date or time (2026-12-01T10:00) or an age"
                           " (90m, 24h, 7d)" % text) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def cmd_audit(args, session):
    since = _since(args.since) if args.since else None
    rows = session.storage.list_audit(since=since, kind=args.kind, name=args.name,
                                      limit=args.limit)
    rows = [dict(r, time=iso(r["time"])) for r in rows]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for row in rows:
        change = ""
        if row["before"] is not None or row["after"] is not None:
            change = ": %s -> %s" % (_short(row["before"]), _short(row["after"]))
        print("%s  %-16s %s %s %s%s" % (row["time"], row["user"], row["kind"], row["name"],
                                       row["action"], change))
    return 0


def _short(value, limit=120):
    text = "-" if value is None else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


# -- parsing ----------------------------------------------------------------------------

def add_parsers(sub):
    users = sub.add_parser("users", help="users: add, list, show, update, delete")
    usub = users.add_subparsers(dest="users_command", required=True)
    p = usub.add_parser("add")
    p.add_argument("username")
    p.add_argument("--superuser", action="store_true")
    p.add_argument("--staff", action="store_true")
    p.add_argument("--group", action="append", help="also a member of GROUP (repeat)")
    p.add_argument("--first-name")
    p.add_argument("--last-name")
    p.add_argument("--email")
    p.set_defaults(func=cmd_users_add)
    p = usub.add_parser("list")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_users_list)
    p = usub.add_parser("show")
    p.add_argument("username")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_users_show)
    p = usub.add_parser("update")
    p.add_argument("username")
    for name, dest in (("superuser", "superuser"), ("staff", "staff")):
        p.add_argument("--" + name, dest=dest, action="store_true", default=None)
        p.add_argument("--no-" + name, dest=dest, action="store_false")
    p.add_argument("--active", dest="active", action="store_true", default=None)
    p.add_argument("--inactive", dest="active", action="store_false")
    p.add_argument("--first-name")
    p.add_argument("--last-name")
    p.add_argument("--email")
    p.set_defaults(func=cmd_users_update)
    p = usub.add_parser("delete")
    p.add_argument("username")
    p.set_defaults(func=cmd_users_delete)

    groups = sub.add_parser("groups", help="groups, their members and permissions")
    gsub = groups.add_subparsers(dest="groups_command", required=True)
    p = gsub.add_parser("add")
    p.add_argument("name")
    p.set_defaults(func=cmd_groups_add)
    p = gsub.add_parser("list")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_groups_list)
    p = gsub.add_parser("show")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_groups_show)
    p = gsub.add_parser("delete")
    p.add_argument("name")
    p.set_defaults(func=cmd_groups_delete)
    p = gsub.add_parser("add-user")
    p.add_argument("name")
    p.add_argument("username")
    p.set_defaults(func=cmd_groups_add_user)
    p = gsub.add_parser("remove-user")
    p.add_argument("name")
    p.add_argument("username")
    p.set_defaults(func=cmd_groups_remove_user)
    perms = gsub.add_parser("perms", help="a group's permissions on device types")
    psub = perms.add_subparsers(dest="perms_command", required=True)
    for action in ("add", "delete"):
        p = psub.add_parser(action)
        p.add_argument("name")
        p.add_argument("device_type")
        p.add_argument("permission", choices=sorted(PERMISSION_WORDS))
        p.set_defaults(func=cmd_groups_perms)
    p = psub.add_parser("list")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_groups_perms)

    tokens = sub.add_parser("tokens", help="API tokens: create, list, revoke")
    tsub = tokens.add_subparsers(dest="tokens_command", required=True)
    p = tsub.add_parser("create", help="prints the new token (shown once)")
    p.add_argument("username")
    p.add_argument("--description", default="")
    p.add_argument("--expires", type=float, metavar="DAYS",
                   help="refused after this many days")
    p.set_defaults(func=cmd_tokens_create)
    p = tsub.add_parser("list")
    p.add_argument("username", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tokens_list)
    p = tsub.add_parser("revoke", help="refused at once, also by a running master")
    p.add_argument("token_id", type=int)
    p.set_defaults(func=cmd_tokens_revoke)

    audit = sub.add_parser("audit", help="who changed what, when")
    audit.add_argument("--since", help="ISO date/time (UTC) or an age: 90m, 24h, 7d")
    audit.add_argument("--kind", help="device, devicetype, worker, user, group, token...")
    audit.add_argument("--name", help="the object's name")
    audit.add_argument("--limit", type=int, default=1000)
    audit.add_argument("--json", action="store_true")
    audit.set_defaults(func=cmd_audit)



