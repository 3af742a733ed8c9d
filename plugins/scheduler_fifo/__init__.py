"""The default scheduler: LAVA's order.

Per device type, queued jobs are taken by priority, then submit time, then id. Each job
gets the first available device that carries all its tags; a job without tags prefers the
devices with the fewest tags, so tagged devices stay free for the jobs that need them. One
job per device per pass. Multinode sub-jobs (``target_group``) are left to the multinode
plugin, which places whole groups.

Enabled when ``[scheduler] plugin = "fifo"`` (the default); with another name it returns
None and lets that plugin decide.
"""

from lavacore.hookspecs import hookimpl
from lavacore.scheduling import job_fits


def fifo(queue, skip_groups=True):
    assignments = []
    for device_type in queue.device_types():
        free = sorted(queue.devices(device_type), key=lambda d: len(d.tags))
        if not free:
            continue
        for job in queue.candidates(device_type, free):
            if not free:
                break
            if skip_groups and job.target_group:
                continue
            for index, device in enumerate(free):
                if job_fits(job, device):
                    assignments.append((job.id, device.hostname))
                    del free[index]
                    break
    return assignments


@hookimpl(trylast=True)
def schedule(master, queue):
    if master is not None and master.config.scheduler.plugin != "fifo":
        return None
    return fifo(queue)
