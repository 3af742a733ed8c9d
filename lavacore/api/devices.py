"""Device operations behind both /RPC2 and /api/v1/: find, list, add, update (health
through Flow, so the history and the events are the same as from the command line),
tags, and the device dictionary (kept in the database, read before the files)."""

import jinja2
import yaml

from .. import health as health_mod
from ..devices import JobSetupError, yaml_dump, yaml_load
from ..flow import device_event
from ..models import Device
from ..states import DeviceHealth
from ..storage import NotFound
from .. import permissions
from . import validate
from .accounts import audit
from .errors import bad_request, conflict, not_found


def find(caller, hostname):
    """The device; 404 when there is none or the caller may not see it."""
    device = validate.existing(caller.storage.get_device, hostname, "hostname", "Device")
    if not caller.policy.can_view_device(device):
        raise not_found("Device '%s' was not found." % device.hostname)
    return device


def listing(caller, show_all=False, **filters):
    devices = caller.storage.list_devices(
        **{key: value for key, value in filters.items() if value is not None})
    if not show_all:
        devices = [d for d in devices if d.health != DeviceHealth.RETIRED]
    policy = caller.policy
    return [d for d in devices if policy.can_view_device(d)]


def _device_type(master, name):
    return validate.existing(master.storage.get_device_type, name, "device type",
                             "DeviceType").name


def _worker(master, name):
    return validate.existing(master.storage.get_worker, name, "worker", "Worker").hostname


def _tags(values):
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise bad_request("tags: expected a list of tag names")
    return tuple(sorted({validate.name(tag, "tag") for tag in values}))


def _changed(caller, device, user):
    caller.master.events.publish("device", device_event(device), user)
    caller.master.scheduler.wake()


def add(caller, hostname, device_type, worker, health=None, description=None, public=True,
        tags=()):
    """A new device (its type and worker must exist, as in LAVA); health defaults to
    Unknown, so a type with a health check gets it before the first job."""
    user = caller.require_admin(permissions.APP, "add_device", "add devices")
    master = caller.master
    hostname = validate.name(hostname, "hostname")
    device_type = _device_type(master, device_type)
    worker = _worker(master, worker)
    new_health = validate.state(DeviceHealth, health, "health")
    if new_health is None:
        new_health = DeviceHealth.UNKNOWN
    description = validate.text(description, "description", optional=True, limit=4096)
    public = validate.flag(public, "public", default=True)
    tags = _tags(tags or ())
    try:
        master.storage.get_device(hostname)
    except NotFound:
        pass
    else:
        raise conflict("Bad request: device '%s' already exists." % hostname)
    device = Device(hostname, device_type, worker, health=new_health, tags=tags,
                    is_public=public, description=description or "")
    master.storage.add_device(device)
    master.storage.add_history("device", hostname, None, new_health.display, user,
                               "added through the API", master.clock.time())
    audit(caller, "device", hostname, "add", None, device.to_dict())
    _changed(caller, device, user)
    return device


def update(caller, hostname, worker=None, public=None, health=None, description=None,
           device_type=None, tags=None, reason=None):
    """Change what is given (None: unchanged). Everything is checked before anything is
    changed."""
    master = caller.master
    device = find(caller, hostname)
    user = caller.require(caller.policy.can_change_device(device),
                          "change device %s" % device.hostname)
    fields = {}
    if worker is not None:
        fields["worker"] = _worker(master, worker)
    if device_type is not None:
        fields["device_type"] = _device_type(master, device_type)
    if description is not None:
        fields["description"] = validate.text(description, "description", limit=4096)
    if public is not None:
        fields["is_public"] = validate.flag(public, "public")
    if tags is not None:
        fields["tags"] = _tags(tags)
    new_health = validate.state(DeviceHealth, health, "health")
    reason = validate.text(reason, "reason", optional=True, limit=1024)
    if fields:
        master.storage.update_device(device.hostname, **fields)
    if new_health is not None:
        health_mod.set_device_health(master, device.hostname, new_health, user,
                                     reason or "set through the API")
    before, device = device, master.storage.get_device(device.hostname)
    if fields or new_health is not None:
        audit(caller, "device", device.hostname, "update", before.to_dict(), device.to_dict())
    if fields:
        _changed(caller, device, user)
    else:
        master.scheduler.wake()
    return device


def tags_add(caller, hostname, tag):
    device = find(caller, hostname)
    return update(caller, device.hostname, tags=list(device.tags) + [tag]).tags


def tags_delete(caller, hostname, tag):
    device = find(caller, hostname)
    tag = validate.name(tag, "tag")
    if tag not in device.tags:
        raise not_found("Tag '%s' was not found." % tag)
    return update(caller, device.hostname, tags=[t for t in device.tags if t != tag]).tags


# -- the device dictionary ----------------------------------------------------------------

def syntax_check(master, text, what):
    """Refuse a jinja2 text that does not parse, with its line."""
    try:
        master.templates.check_syntax(text)
    except jinja2.TemplateSyntaxError as exc:
        raise bad_request("%s: line %s: %s" % (what, exc.lineno, exc.message)) from None


def get_dictionary(caller, hostname, render=False, context=None):
    master = caller.master
    device = find(caller, hostname)
    try:
        text = master.templates.dictionary(device.hostname)
    except JobSetupError as exc:
        raise bad_request(str(exc)) from None
    if text is None:
        raise not_found("Device '%s' does not have a configuration" % device.hostname)
    if not validate.flag(render, "render", default=False):
        return text
    job_context = None
    if context is not None and context != "":
        context = validate.text(context, "context", limit=65536)
        try:
            job_context = yaml_load(context)
        except (yaml.YAMLError, ValueError) as exc:
            raise bad_request("Job Context is not valid: %s" % " ".join(str(exc).split())) \
                from None
        if job_context is not None and not isinstance(job_context, dict):
            raise bad_request("Job Context must be a mapping")
    try:
        return yaml_dump(master.templates.render(device.hostname, job_context))
    except JobSetupError as exc:
        raise bad_request(str(exc)) from None


def set_dictionary(caller, hostname, text):
    """Store the dictionary in the database (an empty text removes the stored one, and the
    file under dispatcher_config, if any, applies again). Takes effect for the next job."""
    master = caller.master
    device = find(caller, hostname)
    caller.require(caller.policy.can_change_device(device),
                   "change device %s" % device.hostname)
    text = validate.text(text, "dictionary", limit=1024 * 1024)
    before = master.storage.get_blob("device", device.hostname)
    if text.strip():
        syntax_check(master, text, "device dictionary %s" % device.hostname)
        master.storage.set_blob("device", device.hostname, text)
    else:
        master.storage.set_blob("device", device.hostname, None)
    audit(caller, "device", device.hostname, "set dictionary", before, text or None)
    master.templates.reload()
    master.scheduler.wake()
    return True
