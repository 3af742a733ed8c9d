"""REST/JSON of users, groups, tokens, tags, aliases, per-object permissions and the audit
trail, under /api/v1/, over lavacore.api.accounts (the same checks as XML-RPC)."""

from .. import models
from . import accounts, device_types, devices, validate
from .rest import _fields, _slice, route

DAY = 86400


def _user(caller, user):
    data = user.to_dict()
    data["groups"] = caller.storage.user_groups(user.username)
    return data


# -- users --------------------------------------------------------------------------------

@route("GET POST", "users/")
def users(request):
    caller = request.caller
    if request.method == "GET":
        request.only("limit", "offset")
        return 200, _slice(request, accounts.users_list(caller),
                           lambda u: _user(caller, u))
    data = _fields(request.json(), ("username", "first_name", "last_name", "email",
                                    "is_active", "is_staff", "is_superuser", "groups"))
    user = accounts.users_add(caller, data.get("username"), data.get("first_name"),
                              data.get("last_name"), data.get("email"),
                              data.get("is_active", True), data.get("is_staff", False),
                              data.get("is_superuser", False))
    for group in data.get("groups") or ():
        accounts.users_groups_add(caller, user.username, group)
    return 201, _user(caller, user)


@route("GET PATCH DELETE", r"users/(?P<name>[^/]+)/")
def user(request, name):
    caller = request.caller
    if request.method == "GET":
        return 200, accounts.users_show(caller, name)
    if request.method == "DELETE":
        accounts.users_delete(caller, name)
        return 200, {"username": name, "deleted": True}
    data = _fields(request.json(), ("first_name", "last_name", "email", "is_active",
                                    "is_staff", "is_superuser"))
    return 200, _user(caller, accounts.users_update(caller, name, **data))


# -- groups -------------------------------------------------------------------------------

@route("GET POST", "groups/")
def groups(request):
    caller = request.caller
    if request.method == "GET":
        request.only("limit", "offset")
        return 200, _slice(request, accounts.groups_list(caller),
                           lambda name: accounts.groups_show(caller, name))
    name = _fields(request.json(), ("name",)).get("name")
    accounts.groups_add(caller, name)
    return 201, accounts.groups_show(caller, name)


@route("GET DELETE", r"groups/(?P<name>[^/]+)/")
def group(request, name):
    if request.method == "GET":
        return 200, accounts.groups_show(request.caller, name)
    accounts.groups_delete(request.caller, name)
    return 200, {"name": name, "deleted": True}


@route("PUT DELETE", r"groups/(?P<name>[^/]+)/users/(?P<username>[^/]+)/")
def group_member(request, name, username):
    if request.method == "PUT":
        accounts.users_groups_add(request.caller, username, name)
    else:
        accounts.users_groups_delete(request.caller, username, name)
    return 200, accounts.groups_show(request.caller, name)


# -- per-object permissions ---------------------------------------------------------------

def _object_perms(request, kind, name):
    caller = request.caller
    if request.method == "GET":
        return 200, accounts.object_perms_list(caller, kind, name)
    data = _fields(request.json(), ("group", "permission"))
    if request.method == "POST":
        accounts.object_perms_add(caller, kind, name, data.get("group"),
                                  data.get("permission"))
        return 201, accounts.object_perms_list(caller, kind, name)
    accounts.object_perms_delete(caller, kind, name, data.get("group"),
                                 data.get("permission"))
    return 200, accounts.object_perms_list(caller, kind, name)


@route("GET POST DELETE", r"device-types/(?P<name>[^/]+)/permissions/")
def device_type_permissions(request, name):
    return _object_perms(request, "devicetype", device_types.find(request.caller,
                                                                   name).name)


@route("GET POST DELETE", r"devices/(?P<name>[^/]+)/permissions/")
def device_permissions(request, name):
    return _object_perms(request, "device", devices.find(request.caller, name).hostname)


# -- API tokens -----------------------------------------------------------------------------

def _token(record):
    return dict(record, created=models.iso(record["created"]),
                last_used=models.iso(record["last_used"]),
                expires=models.iso(record["expires"]))


@route("GET POST", "tokens/")
def tokens(request):
    caller = request.caller
    if request.method == "GET":
        request.only("username", "limit", "offset")
        name = request.arg("username") or caller.require_user()
        return 200, _slice(request, accounts.tokens_list(caller, name), _token)
    data = _fields(request.json(required=False), ("username", "description",
                                                  "expires_days"))
    days = data.get("expires_days")
    expires = None
    if days is not None:
        days = validate.integer(days, "expires_days", minimum=1, maximum=36500)
        expires = caller.now() + days * DAY
    token_id, token = accounts.tokens_create(
        caller, data.get("username") or caller.require_user(), data.get("description") or "",
        expires)
    record = _token(caller.storage.get_token(token_id))
    return 201, dict(record, token=token)  # shown this once, never again


@route("DELETE", r"tokens/(?P<token_id>\d{1,18})/")
def token(request, token_id):
    accounts.tokens_revoke(request.caller, token_id)
    return 200, {"id": int(token_id), "revoked": True}


# -- tags and aliases -----------------------------------------------------------------------

@route("GET POST", "tags/")
def tags(request):
    caller = request.caller
    if request.method == "GET":
        request.only("limit", "offset")
        return 200, _slice(request, accounts.tags_list(caller), lambda t: t)
    data = _fields(request.json(), ("name", "description"))
    accounts.tags_add(caller, data.get("name"), data.get("description"))
    return 201, accounts.tags_show(caller, data.get("name"))


@route("GET DELETE", r"tags/(?P<name>[^/]+)/")
def tag(request, name):
    if request.method == "GET":
        return 200, accounts.tags_show(request.caller, name)
    accounts.tags_delete(request.caller, name)
    return 200, {"name": name, "deleted": True}


@route("GET POST", "aliases/")
def aliases(request):
    caller = request.caller
    if request.method == "GET":
        request.only("limit", "offset")
        return 200, _slice(request, accounts.aliases_list(caller),
                           lambda name: accounts.aliases_show(caller, name))
    data = _fields(request.json(), ("name", "device_type"))
    accounts.aliases_add(caller, data.get("name"), data.get("device_type"))
    return 201, accounts.aliases_show(caller, data.get("name"))


@route("GET DELETE", r"aliases/(?P<name>[^/]+)/")
def alias(request, name):
    if request.method == "GET":
        return 200, accounts.aliases_show(request.caller, name)
    accounts.aliases_delete(request.caller, name)
    return 200, {"name": name, "deleted": True}


# -- the audit trail ------------------------------------------------------------------------

@route("GET", "audit/")
def audit(request):
    """Who changed what, newest first (staff and superusers)."""
    caller = request.caller
    caller.require_staff("read the audit trail")
    request.only("since", "kind", "name", "limit", "offset")
    since = validate.integer(request.arg("since"), "since", default=None, minimum=0)
    rows = caller.storage.list_audit(
        since=since, kind=validate.text(request.arg("kind"), "kind", optional=True, limit=64),
        name=validate.text(request.arg("name"), "name", optional=True, limit=255),
        limit=10000)
    return 200, _slice(request, rows, lambda r: dict(r, time=models.iso(r["time"])))
