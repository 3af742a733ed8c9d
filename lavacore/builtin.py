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
    context = job_context(job.definition)
    if len(master.hook.device_config.get_hookimpls()) == 1:  # only device_config above
        config = master.templates.render_text(device.hostname, context)
    else:
        config = devices.yaml_dump(master.hook.device_config(
            master=master, device=device, context=context))
    dispatcher, env, env_dut = master.templates.worker_files(master.config, job.worker)
    return [devices.StartMessage(job.worker, job.id, job.definition, config, dispatcher,
                                 env, env_dut)]


def job_context(definition):
    """The ``context`` of a job definition ({} if none). A text that neither holds the
    word nor any backslash cannot have the key (YAML spells a key differently only with
    an escape in a double-quoted scalar), so most STARTs skip parsing the job again."""
    if "context" not in definition and "\\" not in definition:
        return {}
    data = devices.yaml_load(definition)
    context = data.get("context") if isinstance(data, dict) else None
    return context or {}


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

