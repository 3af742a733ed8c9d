"""Users, groups, permissions, tags, aliases and tokens: the operations behind XML-RPC
(``auth.*``, ``scheduler.tags.*``, ``scheduler.aliases.*``...), REST and the command line.

Each checks who calls with the caller's policy (lavacore/permissions.py: LAVA's rules:
``auth.add_user`` to add users, staff to give object permissions...), changes the storage,
and writes the change to the audit trail (who, when, what before and after).
"""

from .. import permissions, tokens as tokens_mod
from ..models import User
from ..storage import NotFound
from . import validate
from .errors import bad_request, conflict, not_found

MAX_FIELD = 150


def audit(caller, kind, name, action, before=None, after=None):
    caller.storage.add_audit(caller.now(), caller.user or "anonymous", kind, name, action,
                             before, after)


def _field(value, what, optional=True):
    return validate.text(value, what, optional=optional, limit=MAX_FIELD)


def username(value):
    value = validate.text(value, "username", limit=MAX_FIELD)
    if not value or any(c.isspace() or c in ":@/" for c in value):
        raise bad_request("username %r is not valid (no spaces, ':', '@' or '/')"
                          % value[:40])
    return value


def group_name(value):
    return validate.name(value, "group")


def _user(caller, name):
    try:
        return caller.storage.get_user(username(name))
    except NotFound:
        raise not_found("User '%s' was not found." % name) from None


def _group(caller, name):
    name = group_name(name)
    if not caller.storage.group_exists(name):
        raise not_found("Group '%s' was not found." % name)
    return name


# -- users ------------------------------------------------------------------------------

def users_add(caller, name, first_name=None, last_name=None, email=None, is_active=True,
              is_staff=False, is_superuser=False):
    caller.require_admin("auth", "add_user", "add users")
    user = User(username(name), first_name=_field(first_name, "first_name") or "",
                last_name=_field(last_name, "last_name") or "",
                email=_field(email, "email") or "",
                is_active=validate.flag(is_active, "is_active", True),
                is_staff=validate.flag(is_staff, "is_staff", False),
                is_superuser=validate.flag(is_superuser, "is_superuser", False),
                date_joined=caller.now())
    if user.is_superuser and not caller.principal.is_superuser:
        caller.require(False, "make a superuser")
    if not caller.storage.add_user(user):
        raise conflict("Bad request: user already exists?")
    audit(caller, "user", user.username, "add", None, user.to_dict())
    return user


def users_update(caller, name, first_name=None, last_name=None, email=None, is_active=None,
                 is_staff=None, is_superuser=None):
    caller.require_admin("auth", "change_user", "change users")
    user = _user(caller, name)
    fields = {}
    for key, value in (("first_name", first_name), ("last_name", last_name),
                       ("email", email)):
        if value is not None:
            fields[key] = _field(value, key)
    for key, value in (("is_active", is_active), ("is_staff", is_staff),
                       ("is_superuser", is_superuser)):
        if value is not None:
            fields[key] = validate.flag(value, key)
    if "is_superuser" in fields and not caller.principal.is_superuser:
        caller.require(False, "grant or take superuser status")
    caller.storage.update_user(user.username, **fields)
    after = caller.storage.get_user(user.username)
    audit(caller, "user", user.username, "update", user.to_dict(), after.to_dict())
    return after


def users_delete(caller, name):
    caller.require_admin("auth", "change_user", "delete users")
    user = _user(caller, name)
    caller.storage.delete_user(user.username)
    audit(caller, "user", user.username, "delete", user.to_dict(), None)
    return True


def users_list(caller):
    caller.require_admin("auth", "view_user", "list users")
    return caller.storage.list_users()


def users_show(caller, name):
    caller.require_admin("auth", "view_user", "see users")
    user = _user(caller, name)
    data = user.to_dict()
    data["groups"] = caller.storage.user_groups(user.username)
    data["permissions"] = caller.storage.list_permissions("user", user.username)
    data["tokens"] = len(caller.storage.list_tokens(user.username))
    return data


def users_groups_add(caller, name, group):
    caller.require_admin("auth", "change_user", "change users")
    user = _user(caller, name)
    group = _group(caller, group)
    caller.storage.add_member(group, user.username)
    audit(caller, "user", user.username, "join group", None, {"group": group})
    return True


def users_groups_delete(caller, name, group):
    caller.require_admin("auth", "change_user", "change users")
    user = _user(caller, name)
    group = _group(caller, group)
    if not caller.storage.remove_member(group, user.username):
        raise not_found("User '%s' is not in group '%s'." % (user.username, group))
    audit(caller, "user", user.username, "leave group", {"group": group}, None)
    return True


def users_groups_list(caller, name):
    caller.require_admin("auth", "view_user", "see users")
    return caller.storage.user_groups(_user(caller, name).username)


def _model_perm(app, model, code):
    app = validate.text(app, "app", limit=64)
    model = validate.text(model, "model", limit=64)
    code = validate.text(code, "codename", limit=64)
    codes = permissions.MODEL_PERMISSIONS.get((app, model))
    if codes is None:
        raise not_found("Invalid app.model '%s.%s'" % (app, model))
    if code not in codes:
        raise not_found("Invalid permission '%s'" % code)
    return app, model, code


def perms_add(caller, holder_kind, name, app, model, code):
    kind = "user" if holder_kind == "user" else "group"
    caller.require_admin("auth", "change_%s" % kind, "change %ss" % kind)
    holder = _user(caller, name).username if kind == "user" else _group(caller, name)
    perm = _model_perm(app, model, code)
    caller.storage.add_permission(kind, holder, *perm)
    audit(caller, kind, holder, "add permission", None, ".".join(perm))
    return True


def perms_delete(caller, holder_kind, name, app, model, code):
    kind = "user" if holder_kind == "user" else "group"
    caller.require_admin("auth", "change_%s" % kind, "change %ss" % kind)
    holder = _user(caller, name).username if kind == "user" else _group(caller, name)
    perm = _model_perm(app, model, code)
    if not caller.storage.remove_permission(kind, holder, *perm):
        raise not_found("%s '%s' has no permission %s" % (kind.capitalize(), holder,
                                                         ".".join(perm)))
    audit(caller, kind, holder, "remove permission", ".".join(perm), None)
    return True


def perms_list(caller, holder_kind, name):
    kind = "user" if holder_kind == "user" else "group"
    caller.require_admin("auth", "view_%s" % kind, "see %ss" % kind)
    holder = _user(caller, name).username if kind == "user" else _group(caller, name)
    return caller.storage.list_permissions(kind, holder)


# -- groups -----------------------------------------------------------------------------

def groups_add(caller, name):
    caller.require_admin("auth", "add_group", "add groups")
    name = group_name(name)
    if not caller.storage.add_group(name):
        raise conflict("Bad request: group already exists?")
    audit(caller, "group", name, "add")
    return True


def groups_delete(caller, name):
    caller.require_admin("auth", "change_group", "delete groups")
    name = _group(caller, name)
    members = caller.storage.group_members(name)
    caller.storage.delete_group(name)
    audit(caller, "group", name, "delete", {"users": members}, None)
    return True


def groups_list(caller):
    caller.require_admin("auth", "view_group", "list groups")
    return caller.storage.list_groups()


def groups_show(caller, name):
    caller.require_admin("auth", "view_group", "see groups")
    name = _group(caller, name)
    return {"name": name, "users": caller.storage.group_members(name),
            "permissions": caller.storage.list_permissions("group", name),
            "object_permissions": [
                {"kind": kind, "name": obj, "codename": code}
                for kind, obj, group, code in caller.storage.object_permissions()
                if group == name]}


# -- per-object permissions (devices, device types) -------------------------------------

def object_perms_add(caller, kind, obj, group, code):
    """``kind`` 'devicetype' or 'device'; ``code`` one of LAVA's codenames for it."""
    caller.require_staff("give permissions")
    group = _group(caller, group)
    code = validate.text(code, "permission", limit=64)
    if permissions.OBJECT_CODENAMES.get(code, (None,))[0] != kind:
        raise bad_request("permission %r is not one of %s" % (code, ", ".join(
            c for c, (k, _) in permissions.OBJECT_CODENAMES.items() if k == kind)))
    caller.storage.add_object_permission(kind, obj, group, code)
    audit(caller, kind, obj, "add permission", None, {"group": group, "permission": code})
    caller.changed()
    return True


def object_perms_delete(caller, kind, obj, group, code):
    caller.require_staff("take permissions")
    group = _group(caller, group)
    code = validate.text(code, "permission", limit=64)
    if not caller.storage.remove_object_permission(kind, obj, group, code):
        raise not_found("Group '%s' has no permission %s on it." % (group, code))
    audit(caller, kind, obj, "remove permission", {"group": group, "permission": code},
          None)
    caller.changed()
    return True


def object_perms_list(caller, kind, obj):
    caller.require_staff("see permissions")
    return [{"name": code, "group": group}
            for _, _, group, code in caller.storage.object_permissions(kind, obj)]


# -- tags and aliases -------------------------------------------------------------------

def tags_add(caller, name, description=None):
    caller.require_admin(permissions.APP, "add_tag", "add tags")
    name = validate.name(name, "tag")
    description = _field(description, "description") or ""
    if not caller.storage.add_tag(name, description):
        raise conflict("Bad request: tag already exists?")
    audit(caller, "tag", name, "add", None, {"description": description})
    return True


def tags_delete(caller, name):
    caller.require_admin(permissions.APP, "delete_tag", "delete tags")
    name = validate.name(name, "tag")
    if not caller.storage.delete_tag(name):
        raise not_found("Tag '%s' was not found." % name)
    audit(caller, "tag", name, "delete")
    return True


def tags_list(caller):
    return [{"name": name, "description": description}
            for name, description in caller.storage.list_tags().items()]


def tags_show(caller, name):
    name = validate.name(name, "tag")
    tags = caller.storage.list_tags()
    if name not in tags:
        raise not_found("Tag '%s' was not found." % name)
    policy = caller.policy
    devices = [d.hostname for d in caller.storage.list_devices()
               if name in d.tags and policy.can_view_device(d)]
    return {"name": name, "description": tags[name], "devices": devices}


def aliases_add(caller, name, device_type):
    caller.require_admin(permissions.APP, "add_alias", "add aliases")
    name = validate.name(name, "alias")
    device_type = validate.existing(caller.storage.get_device_type, device_type,
                                    "device type", "DeviceType").name
    try:
        caller.storage.get_device_type(name)
    except NotFound:
        pass
    else:
        raise bad_request("Bad request: a device type is named '%s'" % name)
    if not caller.storage.add_alias(name, device_type):
        raise conflict("Bad request: alias already exists?")
    audit(caller, "alias", name, "add", None, {"device_type": device_type})
    return True


def aliases_delete(caller, name, device_type=None):
    caller.require_admin(permissions.APP, "delete_alias", "delete aliases")
    name = validate.name(name, "alias")
    found = caller.storage.get_alias(name)
    if found is None or (device_type is not None and found != device_type):
        raise not_found("Alias '%s' was not found." % name)
    caller.storage.delete_alias(name)
    audit(caller, "alias", name, "delete", {"device_type": found}, None)
    return True


def aliases_list(caller, device_type=None):
    policy = caller.policy
    return [name for name, target in caller.storage.list_aliases(device_type)
            if policy.can_view_type(target)]


def aliases_show(caller, name):
    name = validate.name(name, "alias")
    target = caller.storage.get_alias(name)
    if target is None or not caller.policy.can_view_type(target):
        raise not_found("Alias '%s' was not found." % name)
    return {"name": name, "device_type": target}


# -- API tokens -------------------------------------------------------------------------

def tokens_create(caller, name, description="", expires=None):
    """A new API token for ``name`` (yourself, or anyone for an admin); (id, token)."""
    name = username(name)
    if name != caller.user:
        caller.require_admin("auth", "change_user", "make tokens for other users")
    description = _field(description, "description") or ""
    token_id, token = tokens_mod.create(caller.storage, name, description, caller.now(),
                                        expires)
    audit(caller, "token", str(token_id), "create", None,
          {"user": name, "description": description, "expires": expires})
    return token_id, token


def tokens_list(caller, name=None):
    if name is None or name != caller.user:
        caller.require_admin("auth", "view_user", "see other users' tokens")
    return caller.storage.list_tokens(name)


def tokens_revoke(caller, token_id):
    token_id = validate.integer(token_id, "token id", minimum=1)
    try:
        record = caller.storage.get_token(token_id)
    except NotFound:
        raise not_found("Token %d was not found." % token_id) from None
    if record["username"] != caller.user:
        caller.require_admin("auth", "change_user", "revoke other users' tokens")
    caller.storage.delete_token(token_id)
    audit(caller, "token", str(token_id), "revoke",
          {"user": record["username"], "description": record["description"]}, None)
    return True


# -- remote artifact tokens (LAVA: a job's deploy headers name them) --------------------

def artifact_tokens_add(caller, name, token):
    user = caller.require_user()
    name = validate.text(name, "name", limit=100)
    token = validate.text(token, "token", limit=100)
    if not name or not token:
        raise bad_request("name and token must not be empty")
    if not caller.storage.add_artifact_token(user, name, token):
        raise conflict("Bad request: token already exists?")
    audit(caller, "artifact token", "%s/%s" % (user, name), "add")
    return True


def artifact_tokens_delete(caller, name):
    user = caller.require_user()
    name = validate.text(name, "name", limit=100)
    if not caller.storage.delete_artifact_token(user, name):
        raise not_found("Token %r was not found." % name)
    audit(caller, "artifact token", "%s/%s" % (user, name), "delete")
    return True


def artifact_tokens_list(caller):
    user = caller.require_user()
    return [{"name": name, "token": token}
            for name, token in caller.storage.artifact_tokens(user).items()]


def artifact_tokens_show(caller, name):
    user = caller.require_user()
    name = validate.text(name, "name", limit=100)
    found = caller.storage.artifact_tokens(user)
    if name not in found:
        raise not_found("Token %r was not found." % name)
    return found[name]
