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


def fifo(queue, skip_groups=True):
    assignments = []
    for device_type in queue.device_types():
        free = sorted(queue.devices(device_type), key=lambda d: len(d.tags))
        if not free:
            continue
        # job_fits, with each device's tags as a set once per pass rather than once per
        # job tried (a pass tries thousands): same answers, in the same order.
        carried = [(frozenset(d.tags), d.is_public) for d in free]
        for job in queue.candidates(device_type, free):
            if not free:
                break
            if skip_groups and job.target_group:
                continue
            wanted = frozenset(job.tags) if job.tags else None
            for index, (tags, public) in enumerate(carried):
                if (public or job.health_check) and (wanted is None or wanted <= tags):
                    assignments.append((job.id, free[index].hostname))
                    del free[index]
                    del carried[index]
                    break
    return assignments


@hookimpl(trylast=True)
def schedule(master, queue):
    if master is not None and master.config.scheduler.plugin != "fifo":
        return None
    return fifo(queue)
