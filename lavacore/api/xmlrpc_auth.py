"""XML-RPC methods of users, groups, permissions, tags, aliases and remote artifact
tokens, with LAVA's names and return shapes (``auth.users.*``, ``auth.groups.*``,
``scheduler.tags.*``, ``scheduler.aliases.*``, ``scheduler.device_types.perms_*``,
``scheduler.remote_artifact_tokens.*``...), over lavacore.api.accounts."""

from . import accounts, device_types, devices, validate
from .errors import bad_request
from .xmlrpc import _dt, method


def _user_row(user):
    return {"username": user.username, "last_name": user.last_name,
            "first_name": user.first_name, "is_superuser": user.is_superuser,
            "is_staff": user.is_staff, "is_active": user.is_active}


# -- auth.users -----------------------------------------------------------------------------

@method("auth.users.add")
def users_add(caller, username, first_name=None, last_name=None, email=None, is_active=True,
              is_staff=False, is_superuser=False, ldap=False):
    if validate.flag(ldap, "ldap", False):
        raise bad_request("ldap: lavacore has no LDAP directory")
    accounts.users_add(caller, username, first_name, last_name, email, is_active,
                       is_staff, is_superuser)


@method("auth.users.delete")
def users_delete(caller, username):
    accounts.users_delete(caller, username)


@method("auth.users.list")
def users_list(caller):
    return [_user_row(user) for user in accounts.users_list(caller)]


@method("auth.users.show")
def users_show(caller, username):
    data = accounts.users_show(caller, username)
    user = caller.storage.get_user(data["username"])
    return dict(_user_row(user), email=user.email, groups=data["groups"],
                permissions=data["permissions"], date_joined=_dt(user.date_joined),
                last_login=_dt(user.last_login))


@method("auth.users.update")
def users_update(caller, username, first_name=None, last_name=None, email=None,
                 is_active=None, is_staff=None, is_superuser=None):
    accounts.users_update(caller, username, first_name, last_name, email, is_active,
                          is_staff, is_superuser)


@method("auth.users.groups.add")
def users_groups_add(caller, username, group):
    accounts.users_groups_add(caller, username, group)


@method("auth.users.groups.delete")
def users_groups_delete(caller, username, group):
    accounts.users_groups_delete(caller, username, group)


@method("auth.users.groups.list")
def users_groups_list(caller, username):
    return accounts.users_groups_list(caller, username)


@method("auth.users.perms.add")
def users_perms_add(caller, username, app, model, codename):
    accounts.perms_add(caller, "user", username, app, model, codename)


@method("auth.users.perms.delete")
def users_perms_delete(caller, username, app, model, codename):
    accounts.perms_delete(caller, "user", username, app, model, codename)


@method("auth.users.perms.list")
def users_perms_list(caller, username):
    return accounts.perms_list(caller, "user", username)


# -- auth.groups ----------------------------------------------------------------------------

@method("auth.groups.add")
def groups_add(caller, name):
    accounts.groups_add(caller, name)


@method("auth.groups.delete")
def groups_delete(caller, name):
    accounts.groups_delete(caller, name)


@method("auth.groups.list")
def groups_list(caller):
    return accounts.groups_list(caller)


@method("auth.groups.show")
def groups_show(caller, name):
    data = accounts.groups_show(caller, name)
    return {"name": data["name"], "users": data["users"],
            "permissions": data["permissions"]}


@method("auth.groups.perms.add")
def groups_perms_add(caller, name, app, model, codename):
    accounts.perms_add(caller, "group", name, app, model, codename)


@method("auth.groups.perms.delete")
def groups_perms_delete(caller, name, app, model, codename):
    accounts.perms_delete(caller, "group", name, app, model, codename)


@method("auth.groups.perms.list")
def groups_perms_list(caller, name):
    return accounts.perms_list(caller, "group", name)


# -- per-object permissions -----------------------------------------------------------------

@method("scheduler.device_types.perms_add")
def device_types_perms_add(caller, name, group, permission):
    record = device_types.find(caller, name)
    accounts.object_perms_add(caller, "devicetype", record.name, group, permission)


@method("scheduler.device_types.perms_delete")
def device_types_perms_delete(caller, name, group, permission):
    record = device_types.find(caller, name)
    accounts.object_perms_delete(caller, "devicetype", record.name, group, permission)


@method("scheduler.device_types.perms_list")
def device_types_perms_list(caller, name):
    return accounts.object_perms_list(caller, "devicetype", device_types.find(caller,
                                                                                name).name)


@method("scheduler.devices.perms_add")
def devices_perms_add(caller, hostname, group, permission):
    device = devices.find(caller, hostname)
    accounts.object_perms_add(caller, "device", device.hostname, group, permission)


@method("scheduler.devices.perms_delete")
def devices_perms_delete(caller, hostname, group, permission):
    device = devices.find(caller, hostname)
    accounts.object_perms_delete(caller, "device", device.hostname, group, permission)


@method("scheduler.devices.perms_list")
def devices_perms_list(caller, hostname):
    return accounts.object_perms_list(caller, "device", devices.find(caller,
                                                                       hostname).hostname)


# -- tags and aliases -----------------------------------------------------------------------

@method("scheduler.tags.add")
def tags_add(caller, name, description=None):
    accounts.tags_add(caller, name, description)


@method("scheduler.tags.delete")
def tags_delete(caller, name):
    accounts.tags_delete(caller, name)


@method("scheduler.tags.list")
def tags_list(caller):
    return accounts.tags_list(caller)


@method("scheduler.tags.show")
def tags_show(caller, name):
    return accounts.tags_show(caller, name)


@method("scheduler.aliases.add")
def aliases_add(caller, name, device_type_name):
    accounts.aliases_add(caller, name, device_type_name)


@method("scheduler.aliases.delete")
def aliases_delete(caller, name):
    accounts.aliases_delete(caller, name)


@method("scheduler.aliases.list")
def aliases_list(caller):
    return accounts.aliases_list(caller)


@method("scheduler.aliases.show")
def aliases_show(caller, name):
    return accounts.aliases_show(caller, name)


@method("scheduler.device_types.aliases.add")
def device_types_aliases_add(caller, name, alias):
    accounts.aliases_add(caller, alias, device_types.find(caller, name).name)


@method("scheduler.device_types.aliases.delete")
def device_types_aliases_delete(caller, name, alias):
    accounts.aliases_delete(caller, alias, device_types.find(caller, name).name)


@method("scheduler.device_types.aliases.list")
def device_types_aliases_list(caller, name):
    return accounts.aliases_list(caller, device_types.find(caller, name).name)


# -- remote artifact tokens -----------------------------------------------------------------

@method("scheduler.remote_artifact_tokens.add")
def artifact_tokens_add(caller, name, token):
    accounts.artifact_tokens_add(caller, name, token)


@method("scheduler.remote_artifact_tokens.delete")
def artifact_tokens_delete(caller, name):
    accounts.artifact_tokens_delete(caller, name)


@method("scheduler.remote_artifact_tokens.list")
def artifact_tokens_list(caller):
    return accounts.artifact_tokens_list(caller)


@method("scheduler.remote_artifact_tokens.show")
def artifact_tokens_show(caller, name):
    return accounts.artifact_tokens_show(caller, name)
