"""The composition root: builds the master from a config, starts and stops its services,
and holds the few decisions that join them (schedule -> START, END + result -> Finished).

Nothing is bound or spawned before ``start()``; tests build a fresh Master per test.
"""

import logging
import os
import signal

import gevent
import gevent.event
import gevent.subprocess
import zmq.green as zmq

from . import devices, health, plugins, protocol
from .clock import Clock
from .config import ConfigError
from .flow import Flow
from .jobfiles import JobFiles
from .models import DeviceType, TestCase, Worker
from .scheduling import SchedulingView
from .services.controller import Controller
from .services.events import EventService
from .services.logs import LogService
from .services.notify import NotifyService
from .services.scheduler import SchedulerService
from .services.watchdog import WatchdogService
from .states import (CHECKABLE_HEALTH, INFRASTRUCTURE_ERRORS, DeviceHealth, JobHealth,
                     JobState, WorkerState)
from .storage import NotFound, StorageError

log = logging.getLogger("lavacore.master")

START_BATCH = 50  # STARTs built between two yields to the loop in a scheduling pass
POLICY_AGE = 5.0  # seconds a cached anonymous policy is used


def open_storage(config, pm):
    storage = pm.hook.storage(config=config)
    if storage is None:
        raise ConfigError("[storage] backend: no storage plugin named %r is installed"
                          % config.storage.backend)
    storage.open()
    storage.migrate()
    return storage


class Master:
    def __init__(self, config, pm=None, clock=None, storage=None):
        self.config = config
        self.pm = pm
        self.clock = clock or Clock()
        self.storage = storage
        self.context = None
        self.services = []
        self.exit_code = 0
        self.auth_required = False
        self.output_root = config.resolve(config.master.output_dir)
        self._stopped = gevent.event.Event()
        self._done = gevent.event.Event()
        self._started = False
        self._result_timers = {}
        self.health_check_cache = {}  # job id -> finished health-check Job (lavacore/health.py)
        self.local_worker = None
        self.local_process = None
        self._identity = None
        self.files = None
        self._storage_fault = None  # when the storage last stopped working, or None
        self._anonymous_policy = None
        self.events = None

    @property
    def hook(self):
        return self.pm.hook

    # -- life cycle ---------------------------------------------------------------------

    def start(self):
        from . import privileges

        self._identity = privileges.wanted(self.config)  # ConfigError before anything
        if self.pm is None:
            self.pm = plugins.build(self.config)
        self.hook.configure(config=self.config, master=self)
        if self.storage is None:
            self.storage = open_storage(self.config, self.pm)
        self.storage.acquire_leadership(self._stopped, on_lost=self._leadership_lost)
        if self._stopped.is_set():
            self._done.set()
            return self
        self.files = JobFiles(self.output_root)
        self.templates = devices.DeviceTemplates(
            self.config.resolve(self.config.master.dispatcher_config), self.storage)
        self.context = zmq.Context()
        self.context.set(zmq.MAX_SOCKETS, 65536)
        self.events = EventService(self)
        self.flow = Flow(self.storage, self.clock, self.events.publish, self.hook, self)
        self.storage.set_all_workers_offline()
        self._sync_devices()
        self.logs = LogService(self)
        self.controller = Controller(self)
        self.scheduler = SchedulerService(self)
        self.watchdog = WatchdogService(self)
        self.notify = NotifyService(self)
        self.services = [self.events, self.logs, self.controller, self.notify]
        if self.config.api.enabled:
            from .services.api import ApiService

            self.api = ApiService(self)
            self.services.append(self.api)
        for extra in self.hook.register_services(master=self):
            self.services.extend(extra or ())
        self.services += [self.scheduler, self.watchdog]
        self._started = True
        try:
            for service in self.services:
                greenlet = service.start()
                greenlet.link_exception(self._service_died)
            self._start_local_worker()
            if self._identity is not None:
                self._drop_privileges()
        except Exception:
            self.stop()
            raise
        log.info("master started (storage %s, scheduler %s, %d services)",
                 self.storage.name, self.config.scheduler.plugin, len(self.services))
        return self

    def _leadership_lost(self):
        # Another master holds the database now: two must never schedule at once.
        log.critical("lost the active-master lock on the database; stopping")
        self.exit_code = 1
        gevent.spawn(self.stop)

    def _service_died(self, greenlet):
        # Crash-only: a bug in a service stops the master with a clear line and exit 1.
        exc = greenlet.exception
        log.critical("service %s crashed: %s: %s; stopping", greenlet.name,
                     type(exc).__name__, exc, exc_info=(type(exc), exc, exc.__traceback__))
        self.exit_code = 1
        gevent.spawn(self.stop)

    def stop(self):
        if self._stopped.is_set():
            self._done.wait()
            return
        self._stopped.set()
        if self.local_worker is not None:
            self.local_worker.stop()
        if self.local_process is not None and self.local_process.poll() is None:
            # It kept root and we did not: it stops on its own when we are gone (it
            # watches for that); a root master tells it at once.
            try:
                self.local_process.terminate()
                self.local_process.wait(15)
            except (OSError, gevent.subprocess.TimeoutExpired):
                pass
        for timer in self._result_timers.values():
            timer.kill(block=False)
        for service in reversed(self.services):
            try:
                service.stop()
            except Exception:
                log.exception("stopping service %s failed", service.name)
        if self.files is not None:
            # START files can be rebuilt, but log lines waiting for their file cannot:
            # a slow disk gets time (systemd waits 90 s for a unit to stop).
            self.files.close(timeout=60)
        if self.context is not None:
            # Closes whatever a plugin left open instead of waiting for it forever.
            self.context.destroy(linger=0)
            self.context = None
        if self.storage is not None:
            self.storage.close()
        log.info("master stopped")
        self._done.set()

    def run(self):
        """Start, then serve until SIGTERM/SIGINT (exit 0) or a service crash (exit 1). A
        second SIGINT kills at once. SIGHUP reloads device dictionaries and worker files.
        The handlers are in place before anything starts, so no signal is missed."""
        interrupts = []

        def on_stop(signum):
            if signum == signal.SIGINT and interrupts:
                os._exit(130)
            interrupts.append(signum)
            log.info("signal %s: stopping", signal.Signals(signum).name)
            gevent.spawn(self.stop)

        handlers = [gevent.signal_handler(signal.SIGTERM, on_stop, signal.SIGTERM),
                    gevent.signal_handler(signal.SIGINT, on_stop, signal.SIGINT),
                    gevent.signal_handler(signal.SIGHUP, self.reload)]
        try:
            self.start()
            self._done.wait()
        finally:
            for handler in handlers:
                handler.cancel()
        return self.exit_code

    def reload(self):
        if not self._started:
            return
        log.info("reloading device dictionaries and worker configuration")
        self.templates.reload()
        self.hook.configure(config=self.config, master=self)
        self.scheduler.wake()

    def _sync_devices(self):
        """Devices listed in config.toml are created (or their type, worker and tags
        updated); their health is set only when they are created, so an administrator's
        later change is kept."""
        for item in self.config.devices:
            try:
                device = self.storage.get_device(item.hostname)
            except NotFound:
                from .models import Device

                self.storage.add_device(Device(
                    item.hostname, item.device_type, item.worker,
                    health=DeviceHealth.parse(item.health), tags=item.tags,
                    is_public=item.public))
                continue
            self.storage.add_device_type(DeviceType(item.device_type))
            self.storage.add_worker(Worker(item.worker))
            if (device.device_type, device.worker, tuple(device.tags), device.is_public) != (
                    item.device_type, item.worker, tuple(sorted(item.tags)), item.public):
                self.storage.update_device(item.hostname, device_type=item.device_type,
                                           worker=item.worker, tags=item.tags,
                                           is_public=item.public)

    def _start_local_worker(self):
        """The [local_worker]: in this process, or in a process of its own, started while
        this one is still root, when the master drops root."""
        local = self.config.local_worker
        if local is None:
            return
        from . import localworker

        master_url = _connectable(self.controller.endpoint)
        logs_url = _connectable(self.logs.endpoint)
        if self._identity is not None:
            import sys

            self.local_process = gevent.subprocess.Popen(
                [sys.executable, "-m", "lavacore.localworker", os.path.abspath(
                    self.config.path), master_url, logs_url], stdin=gevent.subprocess.DEVNULL)
            log.info("local worker %s started as process %d (work dir %s)", local.hostname,
                     self.local_process.pid, self.config.resolve(local.work_dir))
            return
        if local.run_as and os.geteuid() != 0:
            raise ConfigError("[local_worker] run_as: %s, but the master does not run as"
                              " root" % local.run_as)
        self.local_worker = localworker.build(self.config, master_url, logs_url)
        self.local_worker.start()
        log.info("local worker %s started (work dir %s)", local.hostname,
                 self.config.resolve(local.work_dir))

    def _drop_privileges(self):
        """[master] user: the sockets are bound; give the database and the job output to
        that user, and become it."""
        from . import privileges

        target = self._identity
        os.makedirs(self.output_root, exist_ok=True)
        paths = [self.output_root]
        database = getattr(self.storage, "path", None)
        if database:
            paths += [database, database + "-wal", database + "-shm",
                      os.path.dirname(database)]
        changed = privileges.give(paths, target)
        if changed:
            log.info("gave %d file(s) and directories to %s", changed, target.name)
        privileges.drop(target)

    # -- reactions ----------------------------------------------------------------------

    def on_event(self, kind, data):
        """Every event, ours or another process's, may call for an immediate action."""
        if kind == "testjob":
            state = data.get("state")
            if state == "Submitted":
                self.scheduler.wake()
            elif state == "Canceling":
                self.send_cancel(data.get("job"))
            elif state == "Finished":
                job_id = _int(data.get("job"))
                if job_id is not None:
                    self.logs.forget(job_id)
                self.scheduler.wake()
        elif kind == "device":
            if data.get("state") == "Idle" and data.get("health") in ("Good", "Unknown",
                                                                       "Looping"):
                self.scheduler.wake()
        elif kind == "permissions":  # changed by another process (the command line)
            self.permissions_changed()
        elif kind in ("worker", "reload", "resync"):
            # resync: the notification channel reconnected and may have missed changes.
            if kind == "reload":
                self.templates.reload()
            self.scheduler.wake(full=kind == "resync")

    def permissions_changed(self):
        """Who may see or do what changed: cached policies are dropped, and a pass runs."""
        self._anonymous_policy = None
        if self.events is not None:
            self.events.permissions_changed()
        self.scheduler.wake()

    def anonymous_policy(self):
        """The policy of an anonymous caller (the event PUB socket's subscribers), read
        again every few seconds and whenever permissions change."""
        cached = self._anonymous_policy
        if cached is None or self.clock.monotonic() - cached[1] > POLICY_AGE:
            from . import permissions

            cached = self._anonymous_policy = (
                permissions.Policy(self.storage, permissions.ANONYMOUS),
                self.clock.monotonic())
        return cached[0]

    def notified(self, payload):
        """A change made by another process (see Storage.publish_event)."""
        kind = payload.get("kind")
        data = payload.get("data") or {}
        username = payload.get("username")
        if not isinstance(kind, str) or not isinstance(data, dict) or \
                not isinstance(username, (str, type(None))):
            raise ValueError("a notification needs kind, data and username of the right"
                             " types")
        try:
            if kind in ("testjob", "device", "worker", "event"):
                self.events.publish(kind, data, username)
            else:
                self.on_event(kind, data)
        except StorageError as exc:
            self.storage_fault("acting on a %s notification" % kind[:40], exc)

    def workers_online(self, hostnames):
        """Workers came Online: START and CANCEL again for their jobs, and a pass."""
        try:
            self.resend_starts(worker=hostnames)
            self.resend_cancels(worker=hostnames)
        except StorageError as exc:
            self.storage_fault("resending START/CANCEL to worker(s) %s" % (
                ", ".join(hostnames[:5]) + (", ..." if len(hostnames) > 5 else "")), exc)
        self.scheduler.wake()

    # -- scheduling and starting --------------------------------------------------------

    def schedule_pass(self):
        """Health checks first, then the scheduler plugin's assignments; START each."""
        try:
            # Looping devices are in the view for health checks only (health.plan).
            view = SchedulingView(self.storage, healths=CHECKABLE_HEALTH)
            if not view.device_types():
                return []
            placed = health.plan(self, view)
            if view.device_types():
                assignments = self.hook.schedule(master=self, queue=view) or []
                # One transaction: a multinode group is never seen half claimed, even on a
                # database whose calls yield to other greenlets and processes.
                with self.storage.transaction():
                    for job_id, hostname in assignments:
                        result = self.flow.schedule(job_id, hostname)
                        if result is None:
                            log.warning("[job %s] the scheduler placed it on %s, which is"
                                        " not possible now; skipped", job_id, hostname)
                            continue
                        log.info("[job %d] Scheduled on %s (worker %s)", job_id, hostname,
                                 result[1].worker)
                        placed.append(result)
            for count, (job, device) in enumerate(placed, 1):
                self.start_job(job, device)
                if count % START_BATCH == 0:
                    # A pass placing thousands of jobs must not hold the loop for seconds:
                    # PINGs, log lines and ENDs are served between batches of STARTs.
                    gevent.sleep(0)
            return [job.id for job, _ in placed]
        except StorageError as exc:
            self.storage_fault("a scheduling pass", exc)
            return []

    def full_pass(self):
        self.schedule_pass()
        try:
            self.resend_starts()
            self.resend_cancels()
        except StorageError as exc:
            self.storage_fault("resending START and CANCEL", exc)

    def start_job(self, job, device):
        """Build the START messages (hook), keep their files, send them. A job whose files
        cannot be prepared fails alone: Incomplete, Infrastructure (spec 5.5 step 6)."""
        try:
            messages = self.hook.start_job(master=self, job=job, device=device)
        except devices.JobSetupError as exc:
            self.fail_job_setup(job, str(exc))
            return
        except StorageError as exc:  # the database, not the job: START is resent later
            self.storage_fault("START of job %d, resent by the next full pass" % job.id, exc)
            return
        except Exception as exc:  # a plugin bug must not leave the job Scheduled forever
            log.exception("[job %d] preparing START failed", job.id)
            self.fail_job_setup(job, "%s: %s" % (type(exc).__name__, exc))
            return
        for message in messages or ():
            # Kept for resends and the API (jobs.configuration), written off the loop.
            owner = job if message.job_id == job.id else self.storage.get_job(message.job_id)
            self.files.write_start(owner, message.files())
            self.send_start(message.worker, owner, message.frames())

    def send_start(self, worker, job, texts):
        if worker not in self.controller.seen:
            return  # resent when the worker comes online
        texts = list(texts)
        texts[0] = self._for_worker(job, texts[0])
        self.controller.send(worker, protocol.start(job.id, *texts))

    def _for_worker(self, job, definition):
        """The definition as the worker gets it: a deploy header naming one of the
        submitter's remote artifact tokens carries the token's value (LAVA's remote
        artifact tokens). The master's copy (job.yaml, the API) keeps the names."""
        if "headers" not in definition or not job.submitter:
            return definition
        tokens = self.storage.artifact_tokens(job.submitter)
        return devices.with_artifact_tokens(definition, tokens) if tokens else definition

    def fail_job_setup(self, job, reason):
        log.error("[job %d] cannot start: %s", job.id, reason)
        self.storage.add_testcases([TestCase(
            job_id=job.id, suite="lava", name="job", result="fail",
            metadata='{"error_type": "Infrastructure", "error_msg": %s}' % _json(reason),
            logged=self.clock.time())])
        self.flow.record_result(job.id, "fail", "Infrastructure", reason)
        self.flow.finish(job.id, JobHealth.INCOMPLETE, infrastructure_error=True,
                         comment=reason)

    def resend_starts(self, worker=None):
        """START again for jobs still Scheduled, from the files kept at the first START."""
        for job in self.storage.list_jobs(state=JobState.SCHEDULED, worker=worker):
            if job.worker not in self.controller.seen or job.end_seen is not None:
                continue  # (an END implies the job ran: never START it again)
            texts = self.files.start_texts(job)
            if texts is None:
                device = self.storage.get_device(job.actual_device) if job.actual_device \
                    else None
                self.start_job(job, device)
            else:
                self.send_start(job.worker, job, texts)

    def send_cancel(self, job_id):
        job_id = _int(job_id)
        if job_id is None:
            return
        try:
            job = self.storage.get_job(job_id)
        except NotFound:
            return
        if job.state == JobState.CANCELING and job.worker:
            if job.worker in self.controller.seen:
                self.controller.send(job.worker, protocol.cancel(job.id))

    def resend_cancels(self, worker=None):
        for job in self.storage.list_jobs(state=JobState.CANCELING, worker=worker):
            if job.worker in self.controller.seen:
                self.controller.send(job.worker, protocol.cancel(job.id))

    # -- results and the end of jobs ----------------------------------------------------

    def store_results(self, cases, results):
        """A batch of test cases from the log stream and the lava/job results among them,
        stored in one transaction (so a crash never keeps a case without its result, or
        the reverse); then jobs whose END came first are finished."""
        settle = []
        with self.storage.transaction():
            self.storage.add_testcases(cases)
            for case in results:
                job = self._record_result(case)
                if job is not None and job.end_seen is not None:
                    settle.append(job.id)
        self._settle(settle)

    def replace_results(self, job_id, cases):
        """The test cases of a job taken again from the worker's copy of its log: they
        replace those stored, and its lava/job result is the copy's, in one transaction."""
        with self.storage.transaction():
            self.storage.replace_testcases(job_id, cases)
            for case in cases:
                if case.suite == "lava" and case.name == "job":
                    self._record_result(case)

    def _record_result(self, case):
        try:
            job = self.storage.get_job(case.job_id)
        except NotFound:
            return None
        if job.state == JobState.FINISHED:
            return None
        metadata = _metadata(case.metadata)
        self.flow.record_result(job.id, case.result, _text(metadata.get("error_type")),
                                _text(metadata.get("error_msg")))
        return job

    def _settle(self, job_ids):
        for job_id in job_ids:
            try:
                job = self.storage.get_job(job_id)
            except NotFound:
                continue
            if job.state != JobState.FINISHED and job.result is not None:
                self.finish_from_result(job, job.failure_comment)

    def storage_fault(self, what, exc):
        """A storage error while doing ``what``. The first since the storage last worked
        is logged; the next ones go to DEBUG until it works again (``storage_works``),
        so an outage is one line, not one per message."""
        if self._storage_fault is None:
            self._storage_fault = self.clock.monotonic()
            log.error("storage unavailable (%s): %s; what cannot be stored is held and"
                      " retried, workers resend the rest", what, exc)
        else:
            log.debug("storage still unavailable (%s): %s", what, exc)

    def storage_works(self):
        """A write went through (a read says nothing: on a full disk reads still work)."""
        if self._storage_fault is not None:
            log.warning("storage available again after %.1f s",
                        self.clock.monotonic() - self._storage_fault)
            self._storage_fault = None

    def finish_from_result(self, job, comment=None):
        self._cancel_result_timer(job.id)
        if job.result == "pass":
            self.flow.finish(job.id, JobHealth.COMPLETE)
            return
        infra = job.error_type in INFRASTRUCTURE_ERRORS
        reason = job.error_msg or comment
        if job.error_type and job.error_msg:
            reason = "%s: %s" % (job.error_type, job.error_msg)
        self.flow.finish(job.id, JobHealth.INCOMPLETE, infrastructure_error=infra,
                         comment=reason)

    def watch_result(self, job_id):
        """END came with a description but no lava/job result yet: finish the job as
        Incomplete if none arrives within result_grace."""
        self._cancel_result_timer(job_id)
        self._result_timers[job_id] = gevent.spawn_later(
            self.config.master.result_grace, self._result_overdue, job_id)

    def _cancel_result_timer(self, job_id):
        timer = self._result_timers.pop(job_id, None)
        if timer is not None and timer is not gevent.getcurrent():
            timer.kill(block=False)

    def _result_overdue(self, job_id):
        self._result_timers.pop(job_id, None)
        try:
            self.logs.flush(job_id)
            if self.logs.pending(job_id):
                # Its lines or result wait for the database: not overdue, only unstored.
                self.watch_result(job_id)
                return
            job = self.storage.get_job(job_id)
        except StorageError as exc:
            self.storage_fault("settling the result of job %d" % job_id, exc)
            self.watch_result(job_id)
            return
        if job.state == JobState.FINISHED:
            return
        if job.result is not None:
            self.finish_from_result(job, job.failure_comment)
            return
        reason = "no lava/job result received within %gs of the end of the job" % (
            self.config.master.result_grace)
        log.warning("[job %d] %s; Incomplete", job_id, reason)
        self.flow.finish(job_id, JobHealth.INCOMPLETE,
                         comment=(job.failure_comment + "\n" if job.failure_comment else "")
                         + reason)

    def check_liveness(self):
        """Workers silent for worker_timeout go Offline; results overdue by the clock (a
        fake clock in tests, or timers lost to a restart) are settled."""
        now = self.clock.monotonic()
        timeout = self.config.master.worker_timeout
        for hostname, last in list(self.controller.seen.items()):
            if now - last > timeout:
                del self.controller.seen[hostname]
                log.warning("worker %s: silent for more than %gs; Offline", hostname, timeout)
                try:
                    self.flow.set_worker_state(hostname, WorkerState.OFFLINE)
                except (NotFound, StorageError) as exc:
                    log.error("worker %s: cannot mark Offline: %s", hostname, exc)
        wall = self.clock.time()
        try:
            awaiting = self.storage.jobs_awaiting_result()
        except StorageError as exc:
            self.storage_fault("liveness check", exc)
            return
        for job in awaiting:
            if wall - job.end_seen > self.config.master.result_grace and \
                    job.id not in self._result_timers:
                self._result_overdue(job.id)


def _connectable(endpoint):
    """tcp://0.0.0.0:5556 -> tcp://127.0.0.1:5556 (what a local worker can connect to)."""
    return endpoint.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]")


def _int(value):
    try:
        return int(str(value).split(".")[0])
    except (TypeError, ValueError):
        return None


def _json(text):
    import json

    return json.dumps(text)


def _text(value, limit=65536):
    return None if value is None else str(value)[:limit]


def _metadata(text):
    import json

    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
