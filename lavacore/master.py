"""The composition root: builds the master from a config, starts and stops its services,
and holds the few decisions that join them (schedule -> START, END + result -> Finished).

Nothing is bound or spawned before ``start()``; tests build a fresh Master per test.
"""

import dataclasses
import json
import logging
import os

import gevent
import gevent.event
import gevent.subprocess
import zmq.green as zmq

from . import config as config_mod
from . import devices, health, logsetup, plugins, present, protocol, sdnotify, signals
from .clock import Clock
from .config import ConfigError
from . import flow as flow_mod
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
from .states import (CHECKABLE_HEALTH, INFRASTRUCTURE_ERRORS, DeviceHealth, DeviceState,
                     JobHealth, JobState, WorkerState)
from .storage import NotFound, StorageError

log = logging.getLogger("lavacore.master")

START_BATCH = 50  # STARTs built between two yields to the loop in a scheduling pass
POLICY_AGE = 5.0  # seconds a cached anonymous policy is used
CONFIG_USER = "config.toml"  # who changed a device, in its history, when the file did
STANDBY_READY = 2.0  # seconds waiting for the database's master lock before READY=1


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
        self._leadership = False        # this master has been the active one
        self._pending_devices = {}      # hostname -> DeviceConfig waiting for an idle device
        self._sd_watchdog = None

    @property
    def hook(self):
        return self.pm.hook

    # -- life cycle ---------------------------------------------------------------------

    def start(self):
        from . import privileges

        self._identity = privileges.wanted(self.config)  # ConfigError before anything
        warnings = config_mod.check_files(self.config)
        if self.pm is None:
            self.pm = plugins.build(self.config)
        for warning in warnings:
            log.warning("%s", warning)
        for table, plugin in sorted(getattr(self.pm, "lavacore_ignored_tables", {}).items()):
            log.warning("[%s]: plugin %s is disabled ([plugins] disable): this table is"
                        " ignored", table, plugin)
        self.hook.configure(config=self.config, master=self)
        if self.storage is None:
            self.storage = open_storage(self.config, self.pm)
        # A standby master waits here for the active one (PostgreSQL): being a standby is
        # its started state, so systemd hears READY=1 after a moment instead of killing
        # it at its start timeout.
        standby = gevent.spawn_later(STANDBY_READY, sdnotify.ready,
                                     "standby: waiting for the active master")
        try:
            self.storage.acquire_leadership(self._stopped, on_lost=self._leadership_lost)
        finally:
            standby.kill(block=False)
        if self._stopped.is_set():
            self._done.set()
            return self
        self._leadership = True
        self.files = JobFiles(self.output_root)
        # job id -> clock.monotonic() of its last START: a periodic pass leaves a START
        # younger than half a schedule_interval alone (under load, its START_OK is queued,
        # not lost; resending it would only add work to a master already behind).
        self._start_sent = {}
        self.templates = devices.DeviceTemplates(
            self.config.resolve(self.config.master.dispatcher_config), self.storage)
        self.context = zmq.Context()
        self.context.set(zmq.MAX_SOCKETS, 65536)
        self.events = EventService(self)
        self.flow = Flow(self.storage, self.clock, self.events.publish, self.hook, self)
        self.storage.set_all_workers_offline()
        self.logs = LogService(self)
        self.controller = Controller(self)
        self.scheduler = SchedulerService(self)
        self.watchdog = WatchdogService(self)
        self.notify = NotifyService(self)
        self._sync_devices()
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
        scheduler = plugins.scheduler_in_use(self.pm, self.config)
        log.info("master started (storage %s, scheduler %s, %d services)",
                 self.storage.name, plugins._short(scheduler) if scheduler else
                 "none: only health checks run", len(self.services))
        if scheduler and plugins._short(scheduler) != self.config.scheduler.plugin and \
                scheduler != self.config.scheduler.plugin:
            log.info("[scheduler] plugin is %r, but the installed plugin %s answers the"
                     " schedule hook first", self.config.scheduler.plugin, scheduler)
        return self

    def services_run(self):
        """False once a service's greenlet has ended while the master was meant to run
        (systemd's watchdog is then no longer fed; /health says which)."""
        return not any(getattr(service, "greenlet", None) is not None and
                       service.greenlet.dead for service in self.services)

    def _leadership_lost(self):
        # Another master holds the database now: two must never schedule at once.
        self._leadership = False
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
        sdnotify.stopping()
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
            self._workers_offline()
            self.storage.close()
        log.info("master stopped")
        self._done.set()

    def _workers_offline(self):
        """No master hears the workers any more: say so in the database, so that
        ``workers list`` does not show them Online (a master that lost the database to
        another leaves that to the new one)."""
        if not self._leadership or not self._started:
            return
        try:
            online = [w.hostname for w in self.storage.list_workers(state=WorkerState.ONLINE)]
            if online:
                self.storage.set_all_workers_offline()
                log.info("%d worker(s) marked Offline: the master stops (%s)", len(online),
                         ", ".join(online))
        except StorageError as exc:
            log.warning("cannot mark the workers Offline at stop: %s", exc)

    def run(self):
        """Start, then serve until SIGTERM/SIGINT (exit 0) or a service crash (exit 1). A
        second SIGINT kills at once. SIGHUP reloads device dictionaries and worker files.
        The handlers are in place before anything starts, so no signal is missed."""
        handlers = signals.install(self.stop, self.reload, log)
        try:
            # From the start: a standby waiting for the database lock is alive too.
            self._sd_watchdog = sdnotify.start_watchdog(alive=self.services_run)
            self.start()
            if not self._stopped.is_set():
                # systemd (Type=notify): serving now, sockets bound, privileges dropped.
                sdnotify.ready("serving workers on %s" % self.controller.endpoint)
            self._done.wait()
        finally:
            if self._sd_watchdog is not None:
                self._sd_watchdog.kill(block=False)
            for handler in handlers:
                handler.cancel()
        return self.exit_code

    def reload(self):
        """SIGHUP: the log file is reopened; config.toml is read again and its [[devices]]
        and [logging] applied; device dictionaries, worker files and the plugins' files
        (CURVE keys) are read again. A config.toml that does not load is one log line,
        and the running configuration stays."""
        if not self._started or self._stopped.is_set():
            return
        sdnotify.reloading()
        logsetup.reopen()
        log.info("SIGHUP: reloading device dictionaries, worker configuration and %s",
                 self.config.path)
        try:
            new = config_mod.load(self.config.path)
            plugins.build(new)  # the checks of a start: unknown tables, the scheduler
        except ConfigError as exc:
            log.error("SIGHUP: %s; the running configuration is kept", exc)
            new = None
        if new is not None:
            self._restart_needed(new)
            try:
                logsetup.reapply(new)
            except ConfigError as exc:
                log.error("SIGHUP: %s; logging is left as it was", exc)
            old_devices = self.config.devices
            self.config = dataclasses.replace(self.config, devices=new.devices,
                                              logging=new.logging)
            try:
                self._apply_devices(old_devices, new.devices)
            except StorageError as exc:
                self.storage_fault("applying the [[devices]] of config.toml", exc)
        self.templates.reload()
        self.hook.configure(config=self.config, master=self)
        self.scheduler.wake()
        sdnotify.ready()

    def _restart_needed(self, new):
        """Say which changes of config.toml wait for a restart (all but [[devices]] and
        [logging])."""
        old = self.config.raw
        changed = []
        for table in sorted(set(old) | set(new.raw)):
            if table in ("devices", "logging"):
                continue
            before, after = old.get(table), new.raw.get(table)
            if before == after:
                continue
            if isinstance(before, dict) and isinstance(after, dict):
                changed += ["[%s] %s" % (table, key) for key in sorted(set(before) | set(after))
                            if before.get(key) != after.get(key)]
            else:
                changed.append("[%s]" % table)
        if changed:
            log.warning("SIGHUP: %s changed in %s: applied at the next restart (SIGHUP"
                        " applies [[devices]] and [logging])", ", ".join(changed),
                        self.config.path)

    # -- the [[devices]] of config.toml -------------------------------------------------

    def _sync_devices(self):
        """At start: devices listed in config.toml are created, or their type, worker,
        tags and visibility set as the file says; their health is set only when they are
        created, so an administrator's later change is kept. A device the file listed at
        the last start (or SIGHUP) and no longer lists is retired."""
        previous = self._listed_devices()
        for item in self.config.devices:
            self._apply_device(item, None, start=True,
                               relisted=previous is not None and item.hostname not in previous)
            self._warn_without_dictionary(item.hostname)
        if previous is not None:
            listed = {d.hostname for d in self.config.devices}
            for hostname in sorted(previous - listed):
                self._retire_device(hostname)
        self._remember_devices()

    def _listed_devices(self):
        """The hostnames [[devices]] listed when this database was last synced (None the
        first time)."""
        text = self.storage.get_blob("config", "devices")
        try:
            names = json.loads(text) if text else None
        except ValueError:
            return None
        return set(names) if isinstance(names, list) else None

    def _remember_devices(self):
        self.storage.set_blob("config", "devices", json.dumps(
            sorted(d.hostname for d in self.config.devices)))

    def _warn_without_dictionary(self, hostname):
        if self.templates.dictionary(hostname) is None:
            log.warning("device %s: no device dictionary (%s/devices/%s.jinja2, or one set"
                        " through the API): its jobs fail until it has one", hostname,
                        self.templates.root, hostname)

    def _apply_devices(self, old, new):
        """SIGHUP: what changed in [[devices]] since the running configuration."""
        before = {item.hostname: item for item in old}
        for item in new:
            previous = before.pop(item.hostname, None)
            if previous != item:
                self._apply_device(item, previous, relisted=previous is None)
                self._warn_without_dictionary(item.hostname)
        for hostname in sorted(before):
            self._pending_devices.pop(hostname, None)
            self._retire_device(hostname)
        self._remember_devices()

    def _apply_device(self, item, previous, start=False, relisted=False):
        """One [[devices]] entry: created when unknown; otherwise its device_type, worker,
        tags and public flag set as the file says (the type and worker only while it is
        idle: a device running a job keeps them until the job ends); its health when the
        file's changed, or when a device retired for leaving the file is listed again."""
        from .models import Device

        try:
            device = self.storage.get_device(item.hostname)
        except NotFound:
            self.storage.add_device(Device(
                item.hostname, item.device_type, item.worker,
                health=DeviceHealth.parse(item.health), tags=item.tags,
                is_public=item.public))
            if not start:
                log.info("device %s added from %s: type %s, worker %s, health %s",
                         item.hostname, self.config.path, item.device_type, item.worker,
                         item.health)
                self.events.publish("device", flow_mod.device_event(
                    self.storage.get_device(item.hostname)), CONFIG_USER)
            return
        self.storage.add_device_type(DeviceType(item.device_type))
        self.storage.add_worker(Worker(item.worker))
        changes = self._update_device(item)
        if changes:
            log.info("device %s changed in %s%s: %s", item.hostname, self.config.path,
                     " since the last start" if start else "", "; ".join(changes))
            self.events.publish("device", flow_mod.device_event(
                self.storage.get_device(item.hostname)), CONFIG_USER)
        wanted = DeviceHealth.parse(item.health)
        if relisted and device.health == DeviceHealth.RETIRED and wanted != device.health:
            health.set_device_health(self, item.hostname, wanted, CONFIG_USER,
                                     "listed again in %s" % self.config.path)
        elif previous is not None and previous.health != item.health and \
                wanted != device.health:
            health.set_device_health(self, item.hostname, wanted, CONFIG_USER,
                                     "health changed in %s" % self.config.path)

    def _update_device(self, item):
        """Set what the file says of a device; returns the changes made, as text. The
        type and worker of a busy device wait (``_pending_devices``) until it is idle."""
        changes = []
        with self.storage.transaction():
            device = self.storage.get_device(item.hostname, lock=True)
            fields = {}
            if tuple(device.tags) != tuple(sorted(item.tags)):
                fields["tags"] = item.tags
                changes.append("tags %s -> %s" % (present.value_text(list(device.tags)),
                                                  present.value_text(sorted(item.tags))))
            if device.is_public != item.public:
                fields["is_public"] = item.public
                changes.append("public %s -> %s" % (present.value_text(device.is_public),
                                                    present.value_text(item.public)))
            moves = [(key, getattr(device, key), getattr(item, key))
                     for key in ("device_type", "worker")
                     if getattr(device, key) != getattr(item, key)]
            if moves and device.state != DeviceState.IDLE:
                self._pending_devices[item.hostname] = item
                log.info("device %s runs job %s: its %s changed in %s, applied once it is"
                         " idle", item.hostname, device.current_job,
                         " and ".join(key for key, _, _ in moves), self.config.path)
            elif moves:
                self._pending_devices.pop(item.hostname, None)
                for key, old, new in moves:
                    fields[key] = new
                    changes.append("%s %s -> %s" % (key, old, new))
            if fields:
                self.storage.update_device(item.hostname, **fields)
        return changes

    def _apply_pending(self, hostname):
        """A device whose type or worker waited for its job to end is idle now."""
        item = self._pending_devices.get(hostname)
        if item is None or self._stopped.is_set():
            return
        try:
            changes = self._update_device(item)
        except (NotFound, StorageError) as exc:
            log.error("device %s: cannot apply its change from %s: %s", hostname,
                      self.config.path, exc)
            return
        if changes:
            log.info("device %s changed in %s, applied now that it is idle: %s",
                     hostname, self.config.path, "; ".join(changes))
            self.events.publish("device", flow_mod.device_event(
                self.storage.get_device(hostname)), CONFIG_USER)

    def _retire_device(self, hostname):
        """Gone from [[devices]]: Retired, not deleted (its jobs and history refer to it;
        LAVA has administrators retire devices rather than delete them). A job it runs
        goes on to its end."""
        try:
            device = self.storage.get_device(hostname)
        except NotFound:
            return
        if device.health == DeviceHealth.RETIRED:
            return
        self.flow.set_device_health(
            hostname, DeviceHealth.RETIRED, CONFIG_USER,
            "no longer listed in %s%s" % (self.config.path, "; its job %s goes on"
                                          % device.current_job if device.current_job
                                          else ""))

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

            # It logs where the master does (its --log-file and --log-level included).
            log_file, log_level = logsetup.overrides()
            env = dict(os.environ, LAVACORE_LOG_FILE=log_file or "",
                       LAVACORE_LOG_LEVEL=log_level or "")
            self.local_process = gevent.subprocess.Popen(
                [sys.executable, "-m", "lavacore.localworker", os.path.abspath(
                    self.config.path), master_url, logs_url], stdin=gevent.subprocess.DEVNULL,
                env=env)
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
        if logsetup.log_file():
            paths.append(logsetup.log_file())  # the file, not its directory (/var/log?)
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
            if data.get("state") == "Idle" and data.get("device") in self._pending_devices:
                gevent.spawn(self._apply_pending, data.get("device"))
            if data.get("state") == "Idle" and data.get("health") in ("Good", "Unknown",
                                                                       "Looping"):
                self.scheduler.wake()
        elif kind == "wake":  # another process changed what the scheduler reads
            self.scheduler.wake()
        elif kind == "permissions":  # changed by another process (the command line)
            self.permissions_changed()
        elif kind in ("worker", "reload", "resync"):
            # resync: the notification channel reconnected and may have missed changes.
            if kind in ("reload", "resync"):  # a resync may have missed a "reload"
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
            elif kind == "log":
                # A change another process made (the command line): its line goes in the
                # master's log with the others.
                log.info("%s (%s)", str(data.get("line", ""))[:2000],
                         str(data.get("source", "another process"))[:100])
            elif kind == "ping":
                pass  # the command line asking whether a master runs
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
                scheduled, refused = self.flow.schedule_many(list(assignments))
                for job_id, hostname in refused:
                    log.warning("[job %s] the scheduler placed it on %s, which is not"
                                " possible now; skipped", job_id, hostname)
                for job, device in scheduled:
                    log.info("[job %d] Scheduled on %s (worker %s)", job.id, device.hostname,
                             device.worker)
                placed += scheduled
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
        cannot be prepared fails alone: Incomplete, Infrastructure."""
        try:
            messages = self.hook.start_job(master=self, job=job, device=device)
        except devices.JobSetupError as exc:
            self.fail_job_setup(job, str(exc))
            self._check_device_configuration(device)
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

    def _check_device_configuration(self, device):
        """After a job failed to start on ``device``: if the device's configuration
        cannot be made even without a job context (its dictionary missing or broken, its
        type template broken), no job can run there: it is made Bad, with the reason,
        instead of taking and failing every job (an administrator fixes the file and sets
        it Good again). A job whose own context broke the rendering leaves it alone."""
        if device is None or len(self.hook.device_config.get_hookimpls()) != 1:
            return
        try:
            self.templates.render_text(device.hostname, {})
            return
        except devices.JobSetupError as exc:
            reason = "its configuration cannot be made: %s" % exc
        try:
            if self.storage.get_device(device.hostname).health not in (
                    DeviceHealth.BAD, DeviceHealth.MAINTENANCE, DeviceHealth.RETIRED):
                health.set_device_health(self, device.hostname, DeviceHealth.BAD,
                                         "lava-health", reason)
        except (NotFound, StorageError) as exc:
            log.error("device %s: cannot set it Bad (%s): %s", device.hostname, reason, exc)

    def send_start(self, worker, job, texts):
        if worker not in self.controller.seen:
            return  # resent when the worker comes online
        texts = list(texts)
        texts[0] = self._for_worker(job, texts[0])
        self.controller.send(worker, protocol.start(job.id, *texts))
        self._start_sent[job.id] = self.clock.monotonic()

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
        """START again for jobs still Scheduled, from the files kept at the first START:
        every job of ``worker`` (it came back Online and may have lost them), or, in the
        periodic pass, the jobs whose last START is older than half a schedule_interval
        (so a lost START is resent within one and a half intervals)."""
        began = self.clock.monotonic()
        recent = None if worker is not None else \
            began - self.config.master.schedule_interval / 2.0
        scheduled = set()
        for job in self.storage.list_jobs(state=JobState.SCHEDULED, worker=worker):
            scheduled.add(job.id)
            if job.worker not in self.controller.seen or job.end_seen is not None:
                continue  # (an END implies the job ran: never START it again)
            if recent is not None and self._start_sent.get(job.id, recent) > recent:
                continue
            texts = self.files.start_texts(job)
            if texts is None:
                device = self.storage.get_device(job.actual_device) if job.actual_device \
                    else None
                self.start_job(job, device)
            else:
                self.send_start(job.worker, job, texts)
        if worker is None:  # forget the jobs no longer Scheduled
            self._start_sent = {job_id: when for job_id, when in self._start_sent.items()
                                if job_id in scheduled or when >= began}

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
                log.warning("worker %s: Offline (silent for more than %gs)", hostname, timeout)
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
