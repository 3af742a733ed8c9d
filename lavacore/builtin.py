"""The core's own hook implementations: the defaults, all ``trylast`` so that any
installed plugin answering the same hook takes precedence."""

import datetime

from . import devices
from .hookspecs import hookimpl
from .states import DeviceHealth


@hookimpl(trylast=True)
def device_config(master, device, context):
    return master.templates.render(device.hostname, context)


@hookimpl(trylast=True)
def start_job(master, job, device):
    definition = devices.yaml_load(job.definition) or {}
    context = definition.get("context") or {}
    if len(master.hook.device_config.get_hookimpls()) == 1:  # only device_config above
        config = master.templates.render_text(device.hostname, context)
    else:
        config = devices.yaml_dump(master.hook.device_config(
            master=master, device=device, context=context))
    dispatcher, env, env_dut = master.templates.worker_files(master.config, job.worker)
    return [devices.StartMessage(job.worker, job.id, job.definition, config, dispatcher,
                                 env, env_dut)]


@hookimpl(trylast=True)
def health_check_due(master, device, device_type, last_check, jobs_since, now):
    """Spec 9.1: Unknown or Looping devices, never checked, or due by jobs or hours."""
    if device.health in (DeviceHealth.UNKNOWN, DeviceHealth.LOOPING):
        return True
    if last_check is None:
        return True
    if device_type.health_denominator == "jobs":
        return jobs_since >= device_type.health_frequency
    due = last_check.submit_time + datetime.timedelta(
        hours=device_type.health_frequency).total_seconds()
    return due < now

