"""Health checks, as LAVA schedules them: which idle devices get their type's health-check job before
any normal job, in this scheduling pass.

A device type's health check is the job ``health-checks/<type>.yaml`` (or ``.yml``) under
``dispatcher_config``, or the text set through the API (kept in the database). Whether a
check is due is the ``health_check_due`` hook: LAVA's rule by default, replaceable by a
plugin (for example a site that runs checks only at night).
"""

import logging
import os

from .jobs import JobError, submit
from .states import DeviceHealth
from .storage import NotFound

log = logging.getLogger("lavacore.health")

HEALTH_USER = "lava-health"


def _checks_directory(master):
    return os.path.join(master.config.resolve(master.config.master.dispatcher_config),
                        "health-checks")


def definition(master, device_type, known=None):
    """The health-check job text for ``device_type``, or None if it has none.
    ``known`` (from :func:`_known`), when a pass asks for many types: which types have
    one in the database and which files exist, read once for all."""
    if known is None or device_type in known[0]:
        stored = master.storage.get_blob("health-check", device_type)
        if stored is not None:
            return stored
    root = _checks_directory(master)
    for suffix in (".yaml", ".yml"):
        if known is not None and device_type + suffix not in known[1]:
            continue
        path = os.path.join(root, device_type + suffix)
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.error("cannot read health check %s: %s", path, exc)
            return None
    return None


def _known(master):
    """(types with a health check in the database, file names in health-checks/)."""
    stored = {name for kind, name in master.storage.blob_names() if kind == "health-check"}
    try:
        files = set(os.listdir(_checks_directory(master)))
    except OSError:
        files = set()
    return stored, files


def _last_check(master, job_id):
    """The last health check job of a device. Finished jobs do not change, so they are
    remembered: a pass over thousands of idle devices does not re-read them all."""
    cache = master.health_check_cache
    if job_id not in cache:
        if len(cache) > 100000:
            cache.clear()
        try:
            cache[job_id] = master.storage.get_job(job_id)
        except NotFound:
            cache[job_id] = None
    return cache[job_id]


def is_due(master, device, device_type):
    last = None
    if device.last_health_report_job is not None:
        last = _last_check(master, device.last_health_report_job)
    jobs_since = 0
    if last is not None and device_type.health_denominator == "jobs":
        jobs_since = master.storage.count_jobs_started_since(device.hostname,
                                                             last.submit_time or 0)
    return bool(master.hook.health_check_due(
        master=master, device=device, device_type=device_type, last_check=last,
        jobs_since=jobs_since, now=master.clock.time()))


def plan(master, view):
    """Create and return the health-check jobs of this pass as (job, device) pairs, already
    Scheduled. The devices they use are taken out of ``view``; so are Looping devices,
    which only ever run health checks."""
    storage = master.storage
    placed = []
    refused = []
    texts = {}
    types = {}
    wanted = view.device_types()
    if wanted:
        # Read once for the pass, not per type: a pass over 50 types made 100 round trips
        # to PostgreSQL here.
        kinds = {kind.name: kind for kind in storage.list_device_types()}
        known = _known(master)
    for device_type in wanted:
        for device in view.devices(device_type):
            if device_type not in types:
                types[device_type] = kinds.get(device_type)
                texts[device_type] = definition(master, device_type, known)
            kind = types[device_type]
            text = texts[device_type]
            if kind is None or kind.health_disabled or text is None:
                if kind is not None and device.health == DeviceHealth.UNKNOWN:
                    _nothing_to_check(master, device, kind)
                continue
            if not is_due(master, device, kind):
                continue
            job = _create(master, device, text)
            if job is None:
                refused.append(device.hostname)
                continue
            result = master.flow.schedule(job.id, device.hostname)
            if result is not None:
                log.info("[job %d] health check Scheduled on %s", job.id, device.hostname)
                placed.append(result)
    view.remove([device.hostname for _, device in placed] + refused)
    view.remove([d.hostname for t in view.device_types() for d in view.devices(t)
                 if d.health == DeviceHealth.LOOPING])
    return placed


def _nothing_to_check(master, device, kind):
    """An Unknown device whose type has no health check (or has them disabled) cannot be
    checked: it is Good, and its history and the log say why. (LAVA leaves such a device
    Unknown and runs jobs on it all the same; Unknown forever told no one anything.)"""
    if kind.health_disabled:
        reason = "health checks are disabled for device type %s" % kind.name
    else:
        reason = "device type %s has no health check (%s, or one set through the API)" % (
            kind.name, os.path.join(master.config.resolve(
                master.config.master.dispatcher_config), "health-checks",
                kind.name + ".yaml"))
    master.flow.set_device_health(device.hostname, DeviceHealth.GOOD, HEALTH_USER, reason,
                                  only_from=(DeviceHealth.UNKNOWN,))


def _create(master, device, text):
    try:
        jobs = submit(master.storage, master.hook, master, text, HEALTH_USER,
                      master.clock.time(), health_check=True)
    except JobError as exc:
        reason = "invalid health-check definition for %s: %s" % (device.device_type, exc)
        log.error("device %s: %s; health Bad", device.hostname, reason)
        master.flow.set_device_health(device.hostname, DeviceHealth.BAD, HEALTH_USER, reason)
        return None
    job = jobs[0]
    if job.requested_device_type != device.device_type:
        # A health check names its own device_type; it must be the device's.
        master.flow.cancel(job.id, HEALTH_USER)
        reason = "health check for %s asks for device type %s" % (
            device.device_type, job.requested_device_type)
        master.flow.set_device_health(device.hostname, DeviceHealth.BAD, HEALTH_USER, reason)
        return None
    master.flow.submitted([job])
    return job


def set_device_health(ctx, hostname, health, username, reason=""):
    """An administrator's change of a device's health (CLI or API; ``ctx`` has storage,
    config, flow and hook). A device brought back to Good from Maintenance, Bad or Retired
    is set Unknown instead when its type has a health check, so that it is checked before
    its next job."""
    device = ctx.storage.get_device(hostname)
    if health == DeviceHealth.GOOD and device.health in (
            DeviceHealth.MAINTENANCE, DeviceHealth.BAD, DeviceHealth.RETIRED) and \
            definition(ctx, device.device_type) is not None:
        health = DeviceHealth.UNKNOWN
        reason = (reason + "; " if reason else "") + "health check before it is Good"
    return ctx.flow.set_device_health(hostname, health, username, reason)
