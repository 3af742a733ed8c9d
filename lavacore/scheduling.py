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

    ``candidates(device_type, devices)`` reads the queue as streams, one per queued tag
    set that one of the devices carries. The first call of a pass reads the head of every
    such stream of every type at once (as many jobs as the stream has fitting devices:
    a pass cannot place more), so a pass costs a fixed few statements whatever the number
    of types and tag sets: the devices, the tag sets, the heads. A stream is read further
    only when a pass gets past its head, and only while a device it fits is still free.
    """

    def __init__(self, storage, rng=None, healths=SCHEDULABLE_HEALTH, exclude=()):
        self.storage = storage
        self.rng = rng or random.Random()
        self._by_type = {}
        self._tag_sets = None  # {type: [(JSON text, frozenset)]} of queued jobs, per pass
        self._heads = None  # {(type, JSON text): (jobs, how many were asked)}, per pass
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
        carries are never read, so a long queue of unplaceable jobs costs nothing.

        ``devices`` may be the caller's own list of free devices, shrinking as it places
        jobs: a stream is not read past its first page once none of them carries its tags
        (its jobs could not be placed anyway)."""
        devices = self.devices(device_type) if devices is None else devices
        if self._heads is None:
            self._read_heads(device_type, devices)
        carried = [frozenset(d.tags) for d in devices]
        streams = []
        for text, wanted in self._streams(device_type):
            fitting = sum(1 for tags in carried if wanted <= tags)
            if fitting:
                streams.append(self._stream(device_type, text, wanted, fitting, devices))
        return heapq.merge(*streams, key=queue_rank)

    def _streams(self, device_type):
        """[(JSON text, frozenset)] of the tag sets queued for ``device_type``: read at
        once for every type with devices in this pass, then for any other type asked."""
        if self._tag_sets is None:
            self._tag_sets = {}
        if device_type not in self._tag_sets:
            kinds = [device_type] + [t for t in self.device_types()
                                     if t not in self._tag_sets and t != device_type]
            found = self.storage.queued_tag_sets_by_type(kinds)
            for kind in kinds:
                self._tag_sets[kind] = [(text, frozenset(json.loads(text) if text else ()))
                                        for text in found.get(kind, ())]
        return self._tag_sets[device_type]

    def _read_heads(self, device_type, devices):
        """The head of every stream of every type with devices, in one storage call."""
        wanted = []
        for kind in dict.fromkeys(self.device_types() + [device_type]):
            carried = [frozenset(d.tags) for d in
                       (devices if kind == device_type else self._by_type[kind])]
            for text, tags in self._streams(kind):
                fitting = sum(1 for have in carried if tags <= have)
                if fitting:
                    wanted.append((kind, text, fitting))
        heads = self.storage.queued_stream_heads(wanted)
        self._heads = {(kind, text): (heads.get((kind, text), []), size)
                       for kind, text, size in wanted}

    def _stream(self, device_type, text, wanted, size, devices):
        jobs, asked = self._heads.get((device_type, text), ((), 0))
        if asked < size:  # read before the caller's devices were known: read again
            jobs, asked = self.storage.queued_jobs_tagged(device_type, text, size), size
        yield from jobs
        if len(jobs) < asked:
            return  # the stream ended within its head
        offset, page = len(jobs), asked
        while any(wanted <= frozenset(d.tags) for d in devices):
            page = min(page * 2, PAGE)
            jobs = self.storage.queued_jobs_tagged(device_type, text, limit=page,
                                                   offset=offset)
            yield from jobs
            if len(jobs) < page:
                return
            offset += page

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
