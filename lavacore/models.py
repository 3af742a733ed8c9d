"""Plain records of what the storage holds. Storage backends build these from rows; they
carry no behaviour beyond presentation (the transitions live in lavacore/flow.py)."""

import dataclasses
import datetime
import os

import yaml

from . import safeyaml
from .states import DeviceHealth, DeviceState, JobHealth, JobState, WorkerHealth, WorkerState


def iso(epoch):
    """Epoch seconds -> ISO 8601 UTC text (LAVA's event and JSON form), None stays None."""
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).replace(
        tzinfo=None).isoformat()


@dataclasses.dataclass
class Worker:
    hostname: str
    state: WorkerState = WorkerState.OFFLINE
    health: WorkerHealth = WorkerHealth.ACTIVE
    last_ping: float = None
    description: str = ""
    version: str = None

    def to_dict(self):
        return {"hostname": self.hostname, "state": self.state.display,
                "health": self.health.display, "last_ping": iso(self.last_ping),
                "description": self.description, "version": self.version}


@dataclasses.dataclass
class DeviceType:
    name: str
    description: str = ""
    display: bool = True
    health_disabled: bool = False
    health_frequency: int = 24
    health_denominator: str = "hours"  # or "jobs"

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Device:
    hostname: str
    device_type: str
    worker: str = None
    state: DeviceState = DeviceState.IDLE
    health: DeviceHealth = DeviceHealth.MAINTENANCE
    tags: tuple = ()
    is_public: bool = True
    description: str = ""
    last_health_report_job: int = None
    current_job: int = None

    def to_dict(self):
        return {"hostname": self.hostname, "device_type": self.device_type,
                "worker": self.worker, "state": self.state.display,
                "health": self.health.display, "tags": list(self.tags),
                "public": self.is_public, "description": self.description,
                "current_job": self.current_job,
                "last_health_report_job": self.last_health_report_job}


@dataclasses.dataclass
class Job:
    id: int
    state: JobState = JobState.SUBMITTED
    health: JobHealth = JobHealth.UNKNOWN
    submitter: str = ""
    description: str = ""
    requested_device_type: str = None
    actual_device: str = None
    worker: str = None
    tags: tuple = ()
    priority: int = 50
    visibility: str = "public"
    submit_time: float = None
    start_time: float = None
    end_time: float = None
    definition: str = ""
    original_definition: str = ""
    failure_comment: str = None
    health_check: bool = False
    target_group: str = ""
    sub_id: str = ""
    infrastructure_error: bool = False
    result: str = None          # the lava/job result: "pass", "fail" or None (not seen)
    error_type: str = None
    error_msg: str = None
    end_seen: float = None      # when END (with a description) arrived, waiting for result
    viewing_groups: tuple = ()  # visibility "group": the groups whose members may see it

    @property
    def is_multinode(self):
        return bool(self.target_group)

    def output_dir(self, root):
        """LAVA's layout: <root>/YYYY/MM/DD/<id>, from the submit time (UTC)."""
        day = datetime.datetime.fromtimestamp(self.submit_time or 0, datetime.timezone.utc)
        return os.path.join(root, "%04d" % day.year, "%02d" % day.month, "%02d" % day.day,
                            str(self.id))

    def to_dict(self, with_definition=False):
        data = {"id": self.id, "description": self.description,
                "state": self.state.display, "health": self.health.display,
                "submitter": self.submitter, "device_type": self.requested_device_type,
                "device": self.actual_device, "worker": self.worker,
                "priority": self.priority, "visibility": self.visibility,
                "viewing_groups": list(self.viewing_groups), "tags": list(self.tags), "submit_time": iso(self.submit_time),
                "start_time": iso(self.start_time), "end_time": iso(self.end_time),
                "failure_comment": self.failure_comment, "health_check": self.health_check,
                "target_group": self.target_group or None, "sub_id": self.sub_id or None,
                "infrastructure_error": self.infrastructure_error,
                "error_type": self.error_type}
        if with_definition:
            data["definition"] = self.definition
        return data


@dataclasses.dataclass
class TestCase:
    job_id: int
    suite: str
    name: str
    result: str
    measurement: str = None
    units: str = None
    metadata: str = None
    logged: float = None
    id: int = None

    def parsed_metadata(self):
        """The metadata the runner logged with the case (a dict; {"raw": text} when it is
        not YAML)."""
        if not self.metadata:
            return {}
        try:
            data = safeyaml.load(self.metadata)
        except (yaml.YAMLError, ValueError):
            return {"raw": self.metadata}
        return data if isinstance(data, dict) else {"raw": self.metadata}

    def to_dict(self):
        return {"id": self.id, "job": self.job_id, "suite": self.suite, "name": self.name,
                "result": self.result, "measurement": self.measurement, "unit": self.units,
                "logged": iso(self.logged), "metadata": self.parsed_metadata()}


@dataclasses.dataclass
class User:
    username: str
    first_name: str = ""
    last_name: str = ""
    email: str = ""
    is_active: bool = True
    is_staff: bool = False
    is_superuser: bool = False
    date_joined: float = None
    last_login: float = None

    def to_dict(self):
        return {"username": self.username, "first_name": self.first_name,
                "last_name": self.last_name, "email": self.email,
                "is_active": self.is_active, "is_staff": self.is_staff,
                "is_superuser": self.is_superuser, "date_joined": iso(self.date_joined),
                "last_login": iso(self.last_login)}
