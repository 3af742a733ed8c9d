"""What a scheduler plugin sees during one pass, and the checks the core makes on what it
decides. The policy itself lives in plugins (``schedule`` hook)."""

import heapq
import json
import random

from .states import SCHEDULABLE_HEALTH

PAGE = 500


class SchedulingView:
    """Devices available now, grouped by type, and the queue of each type in LAVA's order.

    ``devices(device_type)`` lists available devices in a random order, so that jobs are
    spread over a type's devices instead of always landing on the first (LAVA 2019.01+).
    ``jobs(device_type)`` yields queued jobs page by page, so a pass over a long queue only
    reads as far as it needs to.
    """

    def __init__(self, storage, rng=None, healths=SCHEDULABLE_HEALTH, exclude=()):
        self.storage = storage
        self.rng = rng or random.Random()
        self._by_type = {}
        self._tag_sets = None  # {type: queued tag sets}, read once per pass when needed
        excluded = set(exclude)
        for device in storage.available_devices(healths):
            if device.hostname not in excluded:
                self._by_type.setdefault(device.device_type, []).append(device)
        for devices in self._by_type.values():
            self.rng.shuffle(devices)

    def device_types(self):
        return sorted(t for t, devices in self._by_type.items() if devices)

    def remove(self, hostnames):
        """Take devices out of this pass (they got a health check, or may not run jobs)."""
        gone = set(hostnames)
        if gone:
            for device_type, devices in self._by_type.items():
                self._by_type[device_type] = [d for d in devices if d.hostname not in gone]

    def devices(self, device_type):
        return list(self._by_type.get(device_type, ()))

    def candidates(self, device_type, devices=None):
        """The queued jobs of ``device_type`` that fit at least one of ``devices`` (by
        default, this pass's available ones), in queue order. Jobs whose tags no device
        carries are never read, so a long queue of unplaceable jobs costs nothing."""
        devices = self.devices(device_type) if devices is None else devices
        carried = [frozenset(d.tags) for d in devices]
        streams = []
        if self._tag_sets is None:
            self._tag_sets = self.storage.queued_tag_sets_by_type()
        for text in self._tag_sets.get(device_type, ()):
            wanted = set(json.loads(text) if text else ())
            fitting = sum(1 for tags in carried if wanted <= tags)
            if fitting:
                # A pass places at most one job per fitting device: read about that many.
                streams.append(self._tagged(device_type, text, fitting))
        return heapq.merge(*streams, key=queue_rank)

    def _tagged(self, device_type, tags, page):
        offset = 0
        while True:
            jobs = self.storage.queued_jobs_tagged(device_type, tags, limit=page,
                                                   offset=offset)
            yield from jobs
            if len(jobs) < page:
                return
            offset += page
            page = min(page * 2, PAGE)

    def jobs(self, device_type):
        offset = 0
        while True:
            page = self.storage.queued_jobs(device_type, limit=PAGE, offset=offset)
            yield from page
            if len(page) < PAGE:
                return
            offset += PAGE


def queue_rank(job):
    """LAVA's queue order: priority, submit time, group, id."""
    return (-job.priority, job.submit_time or 0, job.target_group or "", job.id)


def job_fits(job, device):
    """Spec 9.2: job tags must be a subset of the device's; private devices take only
    health checks here (ownership is not modelled beyond public/private)."""
    if job.tags and not set(job.tags) <= set(device.tags):
        return False
    return device.is_public or job.health_check
