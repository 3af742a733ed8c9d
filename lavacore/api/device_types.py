"""Device-type operations behind both /RPC2 and /api/v1/: find, list, add, update, and
the type's template and health check (kept in the database, read before the files)."""

import os

from .. import health as health_mod
from ..jobs import JobError, Located, check_common, context_variables
from ..models import DeviceType
from .. import permissions
from ..storage import NotFound
from . import validate
from .accounts import audit
from .devices import syntax_check
from .errors import bad_request, conflict, not_found

DENOMINATORS = ("hours", "jobs")


def find(caller, name):
    """The device type; 404 when there is none or the caller may not see it."""
    record = validate.existing(caller.storage.get_device_type, name, "device type",
                               "Device-type")
    if not caller.policy.can_view_type(record.name):
        raise not_found("Device-type '%s' was not found." % record.name)
    return record


def _templates_dir(master):
    return os.path.join(master.config.resolve(master.config.master.dispatcher_config),
                        "device-types")


def installed_templates(master):
    """Names of the device-type templates on disk (``base*`` excluded, as LAVA does)."""
    try:
        names = os.listdir(_templates_dir(master))
    except OSError:
        return set()
    return {n[: -len(".jinja2")] for n in names
            if n.endswith(".jinja2") and not n.startswith("base")}


def has_template(master, name, on_disk=None):
    if master.storage.get_blob("device-type", name) is not None:
        return True
    if on_disk is None:
        on_disk = installed_templates(master)
    return name in on_disk


def listing(caller, show_all=False):
    """[(name, device type or None, number of devices, has a template)] of the types the
    caller may see."""
    master = caller.master
    policy = caller.policy
    on_disk = installed_templates(master)
    counts = {}
    for device in master.storage.list_devices():
        counts[device.device_type] = counts.get(device.device_type, 0) + 1
    rows = [(dt.name, dt, counts.get(dt.name, 0), has_template(master, dt.name, on_disk))
            for dt in master.storage.list_device_types()]
    if show_all:
        known = {row[0] for row in rows}
        rows += [(name, None, 0, True) for name in sorted(on_disk - known)]
    return [row for row in rows if policy.can_view_type(row[0])]


def _denominator(value):
    if value is None:
        return None
    if value not in DENOMINATORS:
        raise bad_request("Bad request: invalid health_denominator %r (hours or jobs)"
                          % (value,))
    return value


def add(caller, name, description=None, display=True, health_frequency=24,
        health_denominator="hours", health_disabled=False):
    caller.require_admin(permissions.APP, "add_devicetype", "add device types")
    master = caller.master
    name = validate.name(name, "device type")
    record = DeviceType(
        name, description=validate.text(description, "description", optional=True,
                                         limit=4096) or "",
        display=validate.flag(display, "display", default=True),
        health_disabled=validate.flag(health_disabled, "health_disabled", default=False),
        health_frequency=validate.integer(health_frequency, "health_frequency", default=24,
                                          minimum=0, maximum=10 ** 6),
        health_denominator=_denominator(health_denominator) or "hours")
    try:
        master.storage.get_device_type(name)
    except NotFound:
        pass
    else:
        raise conflict("Bad request: device-type name '%s' is already used." % name)
    master.storage.add_device_type(record)
    audit(caller, "devicetype", name, "add", None, record.to_dict())
    master.scheduler.wake()
    return record


def update(caller, name, description=None, display=None, health_frequency=None,
           health_denominator=None, health_disabled=None):
    master = caller.master
    record = find(caller, name)
    caller.require(caller.policy.can_change_type(record.name),
                   "change device type %s" % record.name)
    fields = {}
    if description is not None:
        fields["description"] = validate.text(description, "description", limit=4096)
    if display is not None:
        fields["display"] = validate.flag(display, "display")
    if health_frequency is not None:
        fields["health_frequency"] = validate.integer(health_frequency, "health_frequency",
                                                      minimum=0, maximum=10 ** 6)
    if health_denominator is not None:
        fields["health_denominator"] = _denominator(health_denominator)
    if health_disabled is not None:
        fields["health_disabled"] = validate.flag(health_disabled, "health_disabled")
    if fields:
        master.storage.update_device_type(record.name, **fields)
        master.scheduler.wake()
    after = master.storage.get_device_type(record.name)
    if fields:
        audit(caller, "devicetype", record.name, "update", record.to_dict(), after.to_dict())
    return after


def _file_name(name, suffix):
    """A type or file name as LAVA accepts it ("qemu" or "qemu.jinja2")."""
    if isinstance(name, str) and name.endswith(suffix):
        name = name[: -len(suffix)]
    return validate.name(name, "device type")


def get_template(caller, name):
    master = caller.master
    name = _file_name(name, ".jinja2")
    if not caller.policy.can_view_type(name):
        raise not_found("Device-type '%s' was not found." % name)
    text = master.storage.get_blob("device-type", name)
    if text is not None:
        return text
    try:
        with open(os.path.join(_templates_dir(master), name + ".jinja2"),
                  encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        raise not_found("Device-type '%s' was not found." % name) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise bad_request("Unable to read device-type configuration: %s" % exc) from None


def set_template(caller, name, text):
    """Store the template (an empty text removes the stored one); devices of the type use
    it from their next job."""
    master = caller.master
    name = _file_name(name, ".jinja2")
    caller.require(caller.policy.can_change_type(name), "change device type %s" % name)
    text = validate.text(text, "template", limit=1024 * 1024)
    before = master.storage.get_blob("device-type", name)
    if text.strip():
        syntax_check(master, text, "device-type template %s" % name)
        master.storage.set_blob("device-type", name, text)
    else:
        master.storage.set_blob("device-type", name, None)
    audit(caller, "devicetype", name, "set template", before, text or None)
    master.templates.reload()
    master.scheduler.wake()
    return True


def get_health_check(caller, name):
    master = caller.master
    name = _file_name(name, ".yaml")
    if not caller.policy.can_view_type(name):
        raise not_found("Device-type '%s' was not found." % name)
    text = health_mod.definition(master, name)
    if text is None:
        raise not_found("Device-type '%s' was not found." % name)
    return text


def set_health_check(caller, name, text):
    """Store the health-check job (checked as a submission is; an empty text removes it)."""
    master = caller.master
    name = _file_name(name, ".yaml")
    caller.require(caller.policy.can_change_type(name), "change device type %s" % name)
    text = validate.text(text, "health check", limit=1024 * 1024)
    if text.strip():
        try:
            check_common(Located(text), context_variables(master.config))
        except JobError as exc:
            raise bad_request("health check %s: %s" % (name, exc)) from None
        master.storage.set_blob("health-check", name, text)
    else:
        master.storage.set_blob("health-check", name, None)
    audit(caller, "devicetype", name, "set health check", None, text or None)
    master.scheduler.wake()
    return True
