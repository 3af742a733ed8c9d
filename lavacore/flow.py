"""The state machines of jobs, devices and workers (LAVA's), enforced in one place.

Every change of a job, device or worker state or health goes through :class:`Flow`. Each
method runs in one storage transaction, re-reads the rows it changes, moves only forward
and refuses anything else by returning None; then, after the commit, it publishes the
events and calls the ``on_job_state`` hook. The master and the command line use the same
Flow, with different publishers (the PUB socket, or a notification to the master).

What an administrator greps for is announced as one line each, after the commit: every
job end (state, health, reason), every cancel (who), every device or worker health change
(from, to, who, why). In the master they go to its log; the command line hands them to
the running master, which logs them too (``announce``).
"""

import logging

from .states import (CHECKABLE_HEALTH, SCHEDULABLE_HEALTH, DeviceHealth, DeviceState,
                     JobHealth, JobState, WorkerHealth, WorkerState)

log = logging.getLogger("lavacore.flow")

REASON_LIMIT = 500  # characters of a comment quoted in a log line


def _reason(text):
    text = " ".join(str(text).split())
    return text if len(text) <= REASON_LIMIT else text[:REASON_LIMIT] + "..."


def job_end_line(job):
    """``job 12 finished: Incomplete (Infrastructure: ...) on qemu01``."""
    reason = ""
    if job.health != JobHealth.COMPLETE and job.failure_comment:
        reason = " (%s)" % _reason(job.failure_comment)
    return "job %d finished: %s%s%s%s" % (
        job.id, job.health.display, reason,
        " on %s" % job.actual_device if job.actual_device else "",
        ", health check" if job.health_check else "")


def health_line(kind, name, old, new, username, reason):
    """``device qemu01 health Good -> Bad by lava-health: health check incomplete``."""
    return "%s %s health %s -> %s by %s%s" % (
        kind, name, old.display, new.display, username or "-",
        ": %s" % _reason(reason) if reason else "")


def _log_line(text):
    log.info("%s", text)


def job_event(job):
    return {"job": str(job.id), "state": job.state.display, "health": job.health.display,
            "description": job.description, "device": job.actual_device,
            "device_type": job.requested_device_type, "worker": job.worker,
            "submitter": job.submitter, "priority": job.priority,
            "visibility": job.visibility, "health_check": job.health_check,
            "target_group": job.target_group or None, "sub_id": job.sub_id or None,
            "failure_comment": job.failure_comment, "pipeline": True,
            "viewing_groups": list(job.viewing_groups)}


def device_event(device, job_id=None):
    data = {"device": device.hostname, "device_type": device.device_type,
            "worker": device.worker, "state": device.state.display,
            "health": device.health.display}
    if job_id is not None:
        data["job"] = job_id
    return data


def worker_event(worker):
    return {"worker": worker.hostname, "hostname": worker.hostname,
            "state": worker.state.display, "health": worker.health.display}


def _placeable(job, device):
    """Whether ``job`` may be Scheduled on ``device`` now (both as read locked)."""
    if job.state != JobState.SUBMITTED or device.state != DeviceState.IDLE:
        return False
    if job.requested_device_type not in (None, device.device_type):
        return False
    allowed = CHECKABLE_HEALTH if job.health_check else SCHEDULABLE_HEALTH
    return device.health in allowed


class Flow:
    """``publish(kind, data, username)`` sends an event ("testjob", "device", "worker");
    ``hook`` is the plugin manager's hook relay (or None); ``master`` is passed to hooks."""

    def __init__(self, storage, clock, publish, hook=None, master=None, announce=None):
        self.storage = storage
        self.clock = clock
        self.publish = publish
        self.hook = hook
        self.master = master
        self.announce = announce or _log_line

    # -- after-commit notifications -----------------------------------------------------

    def _job_changed(self, job, old_state, device=None, username=None):
        if job.state == JobState.FINISHED and old_state != JobState.FINISHED:
            self.announce(job_end_line(job))
        self.publish("testjob", job_event(job), username or job.submitter)
        if device is not None:
            self.publish("device", device_event(device, job.id), username or "lava-health")
        if self.hook is not None:
            try:
                self.hook.on_job_state(master=self.master, flow=self, job=job,
                                       old_state=old_state)
            except Exception:
                log.exception("[job %s] a plugin's on_job_state failed", job.id)

    # -- jobs ---------------------------------------------------------------------------

    def submitted(self, jobs):
        for job in jobs:
            self._job_changed(job, None)

    def schedule(self, job_id, hostname):
        """Submitted job -> Scheduled on ``hostname`` (must be Idle, worker Online).

        Returns the updated (job, device), or None if either moved meanwhile."""
        st = self.storage
        with st.transaction():
            job = st.get_job(job_id, lock=True)
            device = st.get_device(hostname, lock=True)
            if not _placeable(job, device):
                return None
            job.state, job.actual_device, job.worker = JobState.SCHEDULED, hostname, device.worker
            st.update_job(job_id, state=job.state, actual_device=hostname, worker=device.worker)
            device.state, device.current_job = DeviceState.RESERVED, job.id
            st.update_device(hostname, state=device.state, current_job=job.id)
        self._job_changed(job, JobState.SUBMITTED, device)
        return job, device

    def schedule_many(self, assignments):
        """:meth:`schedule` for a whole pass's [(job id, hostname)], in one transaction
        of a few statements: returns [(job, device)] placed, in order, and the
        assignments that were not possible (a job or device that moved meanwhile, a
        device given twice). Events go out once it is committed."""
        st = self.storage
        placed, refused = [], []
        with st.transaction():
            jobs, devices = st.claim_many(assignments)
            for job_id, hostname in assignments:
                job, device = jobs.get(int(job_id)), devices.get(hostname)
                if job is None or device is None or not _placeable(job, device):
                    refused.append((job_id, hostname))
                    continue
                job.state, job.actual_device, job.worker = (JobState.SCHEDULED, hostname,
                                                            device.worker)
                device.state, device.current_job = DeviceState.RESERVED, job.id
                placed.append((job, device))
            st.set_scheduled([(job.id, device.hostname, device.worker)
                              for job, device in placed])
        for job, device in placed:
            self._job_changed(job, JobState.SUBMITTED, device)
        return placed, refused

    def schedule_dynamic(self, job_id, worker):
        """A dynamic connection (no device) -> Scheduled on ``worker``."""
        with self.storage.transaction():
            found = self.storage.advance_job(job_id, JobState.SCHEDULED, worker=worker)
        if found is None:
            return None
        job, old = found
        self._job_changed(job, old)
        return job

    def running(self, job_id):
        """START_OK: Scheduled -> Running. Any later state is left alone (a START_OK for a
        Canceling job is normal: LAVA's worker does it)."""
        found = self.storage.mark_running(job_id, self.clock.time())
        if found is None:
            return None
        job, old, device = found
        self._job_changed(job, old, device)
        return job

    def cancel(self, job_id, username=None):
        """Ask a job to stop: Submitted -> Finished/Canceled at once; Scheduling, Scheduled
        or Running -> Canceling (the worker is told, and END finishes it). Returns the job,
        or None if it had already finished or was already canceling."""
        st = self.storage
        with st.transaction():
            job = st.get_job(job_id, lock=True)
            if job.state >= JobState.CANCELING:
                return None
            device = note = None
            old = job.state
            if job.state == JobState.SUBMITTED:
                job, old, device, note = self._finish_locked(
                    job, JobHealth.CANCELED, username=username,
                    comment="canceled before it was scheduled")
            else:
                job.state = JobState.CANCELING
                st.update_job(job_id, state=job.state)
        self.announce("job %d canceled by %s (it was %s%s)" % (
            job.id, username or "-", old.display,
            " on %s" % job.actual_device if job.actual_device else ""))
        self._job_changed(job, old, device, username)
        if note:
            self.announce(note)
        if self.hook is not None:
            self.hook.on_cancel(master=self.master, flow=self, job=job)
        return job

    def record_result(self, job_id, result, error_type=None, error_msg=None):
        """The job's lava/job result arrived on the log stream."""
        self.storage.update_job(job_id, result=result, error_type=error_type,
                                error_msg=error_msg)

    def finish(self, job_id, health, infrastructure_error=False, comment=None, username=None):
        """-> Finished with ``health`` (Canceled instead if it was Canceling). Frees the
        device and applies the device health rule of LAVA. Returns the job or None if
        it had already finished."""
        with self.storage.transaction():
            job = self.storage.get_job(job_id, lock=True)
            if job.state == JobState.FINISHED:
                return None
            job, old, device, note = self._finish_locked(job, health, infrastructure_error,
                                                         comment, username)
        self._job_changed(job, old, device, username)
        if note:
            self.announce(note)
        return job

    def _finish_locked(self, job, health, infrastructure_error=False, comment=None,
                       username=None):
        """The Finished transition inside the caller's transaction; returns (job, old
        state, device, the line announcing the device's health change or None) for the
        caller to announce once committed."""
        st = self.storage
        old = job.state
        if health == JobHealth.UNKNOWN:
            raise ValueError("a job cannot finish with health Unknown")
        if old == JobState.CANCELING:
            health = JobHealth.CANCELED
        job.state, job.health, job.end_time = JobState.FINISHED, health, self.clock.time()
        job.infrastructure_error = bool(infrastructure_error)
        if comment and not job.failure_comment:
            job.failure_comment = comment
        st.update_job(job.id, state=job.state, health=job.health, end_time=job.end_time,
                      infrastructure_error=job.infrastructure_error,
                      failure_comment=job.failure_comment)
        device = health_change = note = None
        if job.actual_device:
            device = st.get_device(job.actual_device, lock=True)
            fields = {"state": DeviceState.IDLE, "current_job": None}
            device.state, device.current_job = DeviceState.IDLE, None
            new_health = self._device_health_after(job, device)
            if new_health is not None and new_health != device.health:
                health_change = (device.health, new_health)
                device.health = fields["health"] = new_health
            if job.health_check:
                fields["last_health_report_job"] = job.id
            st.update_device(device.hostname, **fields)
            if health_change:
                reason = ("health check %s" % job.health.display.lower() if job.health_check
                          else "job %d ended with an infrastructure error" % job.id)
                st.add_history("device", device.hostname, health_change[0].display,
                               health_change[1].display, "lava-health", reason,
                               self.clock.time())
                note = health_line("device", device.hostname, health_change[0],
                                   health_change[1], "lava-health", reason)
        return job, old, device, note

    @staticmethod
    def _device_health_after(job, device):
        """Spec 6.2: the health a device takes when ``job`` finishes on it (None: keep)."""
        if job.health_check:
            if device.health in (DeviceHealth.MAINTENANCE, DeviceHealth.RETIRED,
                                 DeviceHealth.LOOPING):
                return None
            return DeviceHealth.GOOD if job.health == JobHealth.COMPLETE else DeviceHealth.BAD
        if job.infrastructure_error and device.health not in (DeviceHealth.MAINTENANCE,
                                                              DeviceHealth.RETIRED):
            return DeviceHealth.UNKNOWN
        return None

    # -- devices and workers ------------------------------------------------------------

    def set_device_health(self, hostname, health, username, reason="", only_from=None):
        """``only_from``: the healths it may change from (None: any); from another one
        (someone else changed it meanwhile) it is left alone."""
        st = self.storage
        with st.transaction():
            device = st.get_device(hostname, lock=True)
            old = device.health
            if old == health or (only_from is not None and old not in only_from):
                return device
            device.health = health
            st.update_device(hostname, health=health)
            st.add_history("device", hostname, old.display, health.display, username, reason,
                           self.clock.time())
        self.announce(health_line("device", hostname, old, health, username, reason))
        self.publish("device", device_event(device), username)
        return device

    def set_worker_state(self, hostname, state, last_ping=None):
        st = self.storage
        with st.transaction():
            worker = st.get_worker(hostname)
            fields = {}
            if last_ping is not None:
                fields["last_ping"] = worker.last_ping = last_ping
            changed = worker.state != state
            if changed:
                fields["state"] = worker.state = state
            st.update_worker(hostname, **fields)
        if changed:
            self.publish("worker", worker_event(worker), "lava-health")
        return changed

    def workers_alive(self, hostnames, now):
        """Liveness of a batch of workers (created when unknown): Online, last_ping
        ``now``; one transaction, an event for each that came Online. Returns (hostnames
        that came Online, hostnames created)."""
        went_online, created = self.storage.workers_alive(hostnames, now,
                                                         description="created by lavacore")
        for worker in went_online:
            self.publish("worker", worker_event(worker), "lava-health")
        return [w.hostname for w in went_online], created

    def set_worker_health(self, hostname, health, username, reason=""):
        """Admin change of a worker's health, cascading to its devices (as LAVA)."""
        st = self.storage
        changed_devices = []
        with st.transaction():
            worker = st.get_worker(hostname)
            old = worker.health
            if old == health:
                return worker
            worker.health = health
            st.update_worker(hostname, health=health)
            st.add_history("worker", hostname, old.display, health.display, username, reason,
                           self.clock.time())
            notes = [health_line("worker", hostname, old, health, username, reason)]
            for device in st.list_devices(worker=hostname):
                new = _cascade(old, health, device.health)
                if new is not None and new != device.health:
                    why = "worker %s: %s" % (hostname, health.display)
                    st.add_history("device", device.hostname, device.health.display,
                                   new.display, username, why, self.clock.time())
                    notes.append(health_line("device", device.hostname, device.health, new,
                                             username, why))
                    device.health = new
                    st.update_device(device.hostname, health=new)
                    changed_devices.append(device)
        for note in notes:
            self.announce(note)
        self.publish("worker", worker_event(worker), username)
        for device in changed_devices:
            self.publish("device", device_event(device), username)
        return worker


def _cascade(old, new, device_health):
    if new == WorkerHealth.ACTIVE:
        if old == WorkerHealth.RETIRED:
            return None
        return DeviceHealth.UNKNOWN if device_health == DeviceHealth.MAINTENANCE else None
    if new == WorkerHealth.MAINTENANCE:
        if device_health in (DeviceHealth.BAD, DeviceHealth.MAINTENANCE, DeviceHealth.RETIRED):
            return None
        return DeviceHealth.MAINTENANCE
    if device_health in (DeviceHealth.BAD, DeviceHealth.RETIRED):
        return None
    return DeviceHealth.RETIRED


__all__ = ["Flow", "job_event", "device_event", "worker_event", "WorkerState"]
