"""Schedules the most recently submitted job first. Being installed is enough to replace
lavacore's FIFO default, which is trylast."""

import lavacore.hookspecs

hookimpl = lavacore.hookspecs.hookimpl


@hookimpl
def schedule(master, queue):
    assignments = []
    for device_type in queue.device_types():
        free = queue.devices(device_type)
        for job in sorted(queue.jobs(device_type), key=lambda j: -j.id):
            if not free:
                break
            assignments.append((job.id, free.pop().hostname))
    return assignments
