"""The states of jobs, devices and workers with LAVA's numbers and
display names. The transitions themselves are enforced in one place: lavacore/flow.py.
"""

import enum


class _Named(enum.IntEnum):
    @property
    def display(self):
        return self.name.capitalize()

    @classmethod
    def parse(cls, text):
        """A display name (any case) or a number -> member; ValueError otherwise."""
        if isinstance(text, cls):
            return text
        if isinstance(text, int) or (isinstance(text, str) and text.isdigit()):
            return cls(int(text))
        try:
            return cls[str(text).upper()]
        except KeyError:
            raise ValueError("%r is not one of %s" % (
                text, ", ".join(m.display for m in cls))) from None


class JobState(_Named):
    SUBMITTED = 0
    SCHEDULING = 1
    SCHEDULED = 2
    RUNNING = 3
    CANCELING = 4
    FINISHED = 5


class JobHealth(_Named):
    UNKNOWN = 0
    COMPLETE = 1
    INCOMPLETE = 2
    CANCELED = 3


class DeviceState(_Named):
    IDLE = 0
    RESERVED = 1
    RUNNING = 2


class DeviceHealth(_Named):
    GOOD = 0
    UNKNOWN = 1
    LOOPING = 2
    BAD = 3
    MAINTENANCE = 4
    RETIRED = 5


class WorkerState(_Named):
    ONLINE = 0
    OFFLINE = 1


class WorkerHealth(_Named):
    ACTIVE = 0
    MAINTENANCE = 1
    RETIRED = 2


DEVICE_HEALTH_NAMES = tuple(m.display for m in DeviceHealth)

# Devices a normal job may be scheduled on (LAVA's rule); health checks also take LOOPING.
SCHEDULABLE_HEALTH = (DeviceHealth.GOOD, DeviceHealth.UNKNOWN)
CHECKABLE_HEALTH = SCHEDULABLE_HEALTH + (DeviceHealth.LOOPING,)

# error_type values of a lava/job result that mean the device or lab, not the job, failed.
INFRASTRUCTURE_ERRORS = frozenset({"Bug", "Configuration", "Infrastructure"})

PRIORITY_NAMES = {"low": 0, "medium": 50, "high": 100}
