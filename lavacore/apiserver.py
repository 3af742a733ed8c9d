"""The HTTP API in processes of its own: ``lavacore -c config.toml api``.

The master serves the API inside its gevent loop (lavacore/services/api.py). Where one
process is not enough, ``lavacore api`` serves the same application (XML-RPC, REST, the
web pages, the websocket event stream, /metrics, /health) from other processes on the same
database, while the master keeps scheduling; ``--processes N`` makes it a pre-forked pool
sharing one listening socket (lavacore/apipool.py).

An API process is an :class:`ApiHost`: what the API code calls "the master", with the
same attributes, made of the storage and of messengers to the real master:

- changes (a submission, a cancel, a device's health, a worker's) go through Flow as on
  the command line; every event Flow makes is handed to the master over the storage's
  notification channel (``Storage.publish_event``), and the master republishes it and
  acts on it as if it had made the change itself: a new job is scheduled at once, a
  cancel goes to the worker at once;
- ``scheduler.wake()`` and ``templates.reload()`` (a device dictionary, device-type
  template, health check or worker file set through the API) send ``{"kind": "reload"}``,
  on which the master drops what it caches of device configurations and makes a pass;
- who may see or do what changed (users, groups, permissions): ``{"kind": "permissions"}``,
  which the master and, on PostgreSQL, every other API process hear (they LISTEN too);
- the event stream at ``/ws/`` comes from the master's event socket (``[master] events``,
  or ``--events``), where anonymous subscribers get private jobs' events without what
  identifies them: those are completed from the database before each websocket
  subscriber gets them as its own user may see them.

On SQLite, one API process may run beside the master (on its host: the file and the
master's wake-up socket are local); a pool needs PostgreSQL (see :func:`check_storage`).
"""

import json
import logging
import os
import socket
import sys
import time

import gevent
import gevent.event
import gevent.pool
import gevent.socket
import zmq.green as zmq

from . import config as config_mod
from . import logsetup, permissions, plugins, sdnotify, signals
from .clock import Clock
from .config import ConfigError
from .devices import DeviceTemplates
from .flow import Flow, job_event
from .jobfiles import JobFiles
from .netaddr import needs_ipv6
from .ratelog import RateLimitedLog
from .services.api import ApiService
from .services.base import Service
from .storage import NotFound, StorageError

log = logging.getLogger("lavacore.api")

ROLE = "api"
POLICY_AGE = 5.0        # seconds a cached anonymous policy is used (as in the master)
HEARTBEAT = 0.1         # seconds between two beats of the loop (lag, and the pool's check)
EVENT_FRAMES = 5
MAX_EVENT = 1024 * 1024


# -- what the API code calls "the master" ----------------------------------------------------

class _Events:
    """``master.events`` for the API code: ``publish`` goes to the master (which
    republishes it); ``subscribers`` are this process's websocket sessions, fed by
    :class:`EventFeed`; ``endpoint`` is the master's event socket, for
    ``scheduler.get_publisher_event_socket``."""

    def __init__(self, host, endpoint):
        self.host = host
        self.endpoint = endpoint
        self.subscribers = set()

    def publish(self, kind, data, username=None):
        self.host.storage.publish_event({"kind": kind, "data": data, "username": username})

    def permissions_changed(self):
        for subscriber in list(self.subscribers):
            subscriber.permissions_changed()


class _Scheduler:
    """``master.scheduler``: a pass in the master, asked for over the notification
    channel."""

    pass_started = None

    def __init__(self, host):
        self.host = host

    def wake(self, full=False):
        self.host.tell_master_wake()


class _Templates(DeviceTemplates):
    """``master.templates`` of an API process. It reads a dictionary or renders a
    configuration only when a client asks for one (``devices.show``, ``get_dictionary``),
    from what the database and the files hold at that moment: nothing is kept from one
    call to the next, so a change made by another process is never missed. ``reload()``
    (the API code calls it after a change) tells the master."""

    def __init__(self, root, storage, host):
        super().__init__(root, storage)
        self.host = host

    def reload(self):
        self.forget()
        self.host.tell_master_reload()

    def forget(self):
        DeviceTemplates.reload(self)

    def dictionary(self, hostname):
        self.forget()
        return super().dictionary(hostname)

    def render(self, hostname, context=None):
        self.forget()
        return super().render(hostname, context)

    def render_text(self, hostname, context=None):
        self.forget()
        return super().render_text(hostname, context)

    def worker_files(self, config, worker):
        self.forget()
        return super().worker_files(config, worker)


class _Heartbeat:
    """``master.watchdog`` as lavacore/api/monitoring.py reads it: the greenlet that
    measures the loop's lag and publishes this process's numbers."""

    def __init__(self, host):
        self.host = host
        self.heartbeat = None

    def start(self):
        self.heartbeat = gevent.spawn(self._beat)
        self.heartbeat.name = "heartbeat"
        return self.heartbeat

    def stop(self):
        if self.heartbeat is not None:
            self.heartbeat.kill(block=False)

    def _beat(self):
        metrics = self.host.api_metrics
        watch = metrics.loop
        watch.interval = HEARTBEAT
        clock = time.monotonic
        due = clock() + HEARTBEAT
        watch.beat(0.0, due - HEARTBEAT)
        metrics.flush()
        while True:
            gevent.sleep(max(0.0, due - clock()))
            now = clock()
            watch.beat(now - due, now)
            metrics.flush()
            due = now + HEARTBEAT


class ApiHost:
    """The API application's host in an API process (see the module's docstring).

    ``listener``: a listening socket to serve (a pool's shared one), or None to bind
    ``listen`` here (with SO_REUSEPORT when ``reuse_port``). ``memory``: the pool's
    shared memory (lavacore/api/shared.py) and ``index`` this process's place in it;
    None for a process on its own."""

    role = ROLE
    auth_required = False

    def __init__(self, config, listen=None, listener=None, events_url=None, memory=None,
                 index=0, reuse_port=False, clock=None):
        self.config = config
        self.listen = listen or config.api.listen
        self.listener = listener
        self.events_url = events_url
        self.memory = memory
        self.index = index
        self.reuse_port = reuse_port
        self.clock = clock or Clock()
        self.output_root = config.resolve(config.master.output_dir)
        self.pm = None
        self.storage = None
        self.services = []
        self.context = None
        self.exit_code = 0
        self.url = None
        self._storage_fault = None
        self._claim = None
        self._anonymous_policy = None
        self._reload_pending = None
        self._stopped = gevent.event.Event()
        self._done = gevent.event.Event()
        self._drops = RateLimitedLog(log)

    @property
    def hook(self):
        return self.pm.hook

    # -- life cycle -------------------------------------------------------------------------

    def start(self):
        from .api import shared
        from .api.procmetrics import ApiMetrics
        from .master import open_storage

        self.pm = plugins.build(self.config)
        # As the command line does: no plugin starts a master's machinery here.
        self.hook.configure(config=self.config, master=None)
        self.storage = open_storage(self.config, self.pm)
        check_storage(self.storage)
        if self.storage.name == "sqlite":
            self._claim = SQLiteClaim(self.storage)
        if self.memory is None:
            self.memory = shared.PoolMemory.create(1)
        self.api_metrics = ApiMetrics(self.memory, self.index, self.storage.name)
        if hasattr(self.storage, "statement_timer"):
            self.storage.statement_timer = (time.perf_counter,
                                            self.api_metrics.statements.observe)
        self.files = JobFiles(self.output_root)
        self.templates = _Templates(
            self.config.resolve(self.config.master.dispatcher_config), self.storage, self)
        self.flow = Flow(self.storage, self.clock, self.events_publish, self.pm.hook, None,
                         announce=self.announce)
        self.scheduler = _Scheduler(self)
        self.events = _Events(self, published_endpoint(self.config, self.events_url))
        self.api_metrics.subscribers = lambda: len(self.events.subscribers)
        self.context = zmq.Context()
        self.watchdog = _Heartbeat(self)
        self.http = HttpService(self)
        self.services = [self.http, EventFeed(self)]
        if broadcasts(self.storage):
            self.services.append(NotifyListener(self))
        try:
            for service in self.services:
                greenlet = service.start()
                greenlet.link_exception(self._service_died)
            self.watchdog.start().link_exception(self._service_died)
        except Exception:
            self.stop()
            raise
        return self

    def _service_died(self, greenlet):
        exc = greenlet.exception
        log.critical("API process: %s crashed: %s: %s; stopping", greenlet.name,
                     type(exc).__name__, exc, exc_info=(type(exc), exc, exc.__traceback__))
        self.exit_code = 1
        gevent.spawn(self.stop)

    def services_run(self):
        """False once a service's greenlet (or the heartbeat) has ended: systemd's
        watchdog is then no longer fed."""
        heartbeat = getattr(getattr(self, "watchdog", None), "heartbeat", None)
        return not any(getattr(service, "greenlet", None) is not None and
                       service.greenlet.dead for service in self.services) and \
            not (heartbeat is not None and heartbeat.dead)

    def stop(self):
        if self._stopped.is_set():
            self._done.wait()
            return
        self._stopped.set()
        sdnotify.stopping()
        for service in reversed(self.services):
            try:
                service.stop()
            except Exception:
                log.exception("stopping %s failed", service.name)
        if getattr(self, "watchdog", None) is not None:
            self.watchdog.stop()
        if self.context is not None:
            self.context.destroy(linger=0)
            self.context = None
        if self.storage is not None:
            self.storage.close()
        if self._claim is not None:
            self._claim.close()
        log.info("API process stopped")
        self._done.set()

    def wait(self):
        self._done.wait()
        return self.exit_code

    def reload(self):
        """SIGHUP: the log file is reopened; nothing else is kept between requests."""
        logsetup.reopen()
        log.info("SIGHUP: log file reopened")

    # -- what the API code asks of "the master" ---------------------------------------------

    def events_publish(self, kind, data, username=None):
        self.events.publish(kind, data, username)

    def announce(self, line):
        """A change made here (Flow's one-line record of it) goes to the master's log,
        with the others."""
        log.debug("%s", line)
        self.storage.publish_event({"kind": "log", "username": None, "data": {
            "line": line, "source": "API process %d" % os.getpid()}})

    def tell_master_wake(self):
        """Ask the master for a scheduling pass (what it caches stays)."""
        try:
            self.storage.publish_event({"kind": "wake", "data": {}, "username": None})
        except StorageError as exc:
            self._drops.warning("wake", "cannot notify the master: %s", exc)

    def tell_master_reload(self):
        """Ask the master to drop its cached device configurations and make a pass; the
        calls of one request make one notification."""
        if self._reload_pending is not None:
            return
        self._reload_pending = gevent.spawn(self._send_reload)

    def _send_reload(self):
        try:
            self.storage.publish_event({"kind": "reload", "data": {}, "username": None})
        except StorageError as exc:
            self._drops.warning("reload", "cannot notify the master: %s", exc)
        finally:
            self._reload_pending = None

    def permissions_changed(self, tell=True):
        """Who may do what changed: cached answers here go, and (``tell``) the master and
        the other API processes are told."""
        self._anonymous_policy = None
        self.events.permissions_changed()
        if tell:
            self.storage.publish_event({"kind": "permissions", "data": {}, "username": None})

    def anonymous_policy(self):
        cached = self._anonymous_policy
        if cached is None or self.clock.monotonic() - cached[1] > POLICY_AGE:
            cached = self._anonymous_policy = (
                permissions.Policy(self.storage, permissions.ANONYMOUS),
                self.clock.monotonic())
        return cached[0]

    def health_details(self):
        return {"pid": os.getpid(), "process": self.index,
                "processes": self.memory.processes if self.memory is not None else 1}

    def notified(self, payload):
        """A notification another process sent (PostgreSQL: every API process LISTENs)."""
        kind = payload.get("kind")
        if kind == "permissions":
            self.permissions_changed(tell=False)
        elif kind in ("reload", "resync"):
            self.templates.forget()
            if kind == "resync":
                self.permissions_changed(tell=False)


def broadcasts(storage):
    """Does every process on this storage hear its notifications? (PostgreSQL's
    LISTEN/NOTIFY does; SQLite's channel is one socket, the master's.)"""
    return getattr(storage, "name", "") == "postgres"


SQLITE_POOL = ("--processes %d: a pool of API processes needs PostgreSQL; on SQLite one"
               " API process beside the master is the most (processes reading one SQLite"
               " file wait for each other's locks: a pool is slower than one process)")


def check_storage(storage, processes=1):
    """API processes need a database that several processes share: PostgreSQL, or
    SQLite for one API process beside the master (measured: two or more spend their time
    sleeping in SQLite's busy handler on the file's shared-memory locks, and hold the
    master's loop there too; see bench/api_scale.py)."""
    name = getattr(storage, "name", "")
    if name not in ("postgres", "sqlite"):
        raise ConfigError("[storage] backend %r: API processes need a database shared"
                          " by several processes (postgres)" % (name or "?"))
    if name == "sqlite" and processes > 1:
        raise ConfigError(SQLITE_POOL % processes)


class SQLiteClaim:
    """The one API process a SQLite database may have: an flock on ``<database>.api``
    next to the file, held while the process runs."""

    def __init__(self, storage):
        import fcntl

        self.path = storage.path + ".api"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ConfigError("another lavacore api already serves %s: on SQLite one API"
                              " process beside the master is the most (a pool needs"
                              " PostgreSQL)" % storage.path) from None

    def close(self):
        os.close(self.fd)


def connect_endpoint(events):
    """Where an API process on the master's host reaches ``[master] events`` (a wildcard
    host becomes loopback), or None when its port is chosen by the OS."""
    scheme, sep, rest = str(events or "").partition("://")
    host, colon, port = rest.rpartition(":")
    if not sep or not colon or not port.isdigit() or int(port) == 0:
        return None
    if host in ("*", "0.0.0.0", ""):
        host = "127.0.0.1"
    elif host in ("[::]", "[*]"):
        host = "[::1]"
    return "%s://%s:%s" % (scheme, host, port)


def published_endpoint(config, events_url):
    """What ``scheduler.get_publisher_event_socket`` answers: the master's event socket
    as configured (a wildcard host is replaced by the client's), or ``--events``."""
    if connect_endpoint(config.master.events) is not None:
        return config.master.events
    return events_url or ""


# -- services --------------------------------------------------------------------------------

class _Service(Service):
    """A service of an API process: the master's Service life cycle, on the host that
    stands in for the master."""

    name = "service"

    def __init__(self, host):
        super().__init__(host)
        self.host = host


class HttpService(ApiService):
    """gevent's WSGI server, as in the master (lavacore/services/api.py: the same
    deadlines on request heads and bodies, the same per-client limits, the same run and
    stop), on this process's socket. In a pool the per-client counts are the pool's
    (lavacore/api/shared.py)."""

    def __init__(self, host):
        super().__init__(host)
        self.host = host

    def setup(self):

        from .api.app import Application
        from .services import api as service
        from .services.api import parse_listen, _url_host

        host = self.host
        api = host.config.api
        bind_host, port = parse_listen(host.listen)
        sock = host.listener
        if sock is None:
            sock = listening_socket(bind_host, port, host.reuse_port, "--listen")
        gsock = gevent.socket.socket(sock.family, sock.type, fileno=sock.detach())
        throttle = connections = None
        if host.memory is not None and host.memory.processes > 1:
            from .api import app as app_mod
            from .api import shared

            throttle = shared.SharedThrottle(host.memory, host.index, time.monotonic,
                                             int(api.max_auth_failures),
                                             app_mod.FAILURE_WINDOW)
            connections = shared.SharedConnections(host.memory, host.index, time.monotonic,
                                                   app_mod.FAILURE_WINDOW)
        self.app = Application(host, throttle=throttle,
                               observe=host.api_metrics.observe_request)
        address = gsock.getsockname()
        # The master's bounds on connections, as its API service sets them (each process
        # of a pool has its own [api] max_connections, where the master has that key).
        cls = _server_class()
        limit = int(api.max_connections)
        self.server = cls(
            gsock, self.app, spawn=gevent.pool.Pool(limit + service.SPARE),
            log=None, environ={"SERVER_NAME": _url_host(address[0]).strip("[]")},
            header_timeout=api.header_timeout,
            max_per_client=int(api.max_client_connections), max_connections=limit,
            shared=connections, metrics=host.api_metrics)
        self.server.init_socket()
        host.url = "http://%s:%d" % (_url_host(address[0]), address[1])

def _server_class():
    """The master's server class with per-client connection counts that can be a pool's,
    and open connections counted for /metrics."""
    from gevent.pywsgi import WSGIServer

    from .services.api import _BUSY, IDLE_TIMEOUT, _Server

    class PoolServer(_Server):
        def __init__(self, *args, shared=None, metrics=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.shared = shared
            self.metrics = metrics

        def handle(self, sock, address):
            if self.shared is None:
                return self._counted(super().handle, sock, address)
            client = address[0] if isinstance(address, tuple) else str(address)
            slot = self.shared.open(client, self.max_per_client)
            if slot is None:  # no room in the pool's table: counted here alone
                return self._counted(super().handle, sock, address)
            if slot is False:
                self.drops.warning(("busy", client), "client %s: more than %d connections"
                                   " open; refused", client, self.max_per_client)
                try:
                    sock.sendall(_BUSY)
                except OSError:
                    pass
                sock.close()
                return None
            try:
                sock.settimeout(IDLE_TIMEOUT)
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass
                self.connections.add(sock)
                return self._counted(WSGIServer.handle, self, sock, address)
            finally:
                self.connections.discard(sock)
                self.shared.close(slot)

        def _counted(self, handle, *args):
            metrics = self.metrics
            metrics.connections += 1
            try:
                return handle(*args)
            finally:
                metrics.connections -= 1

    return PoolServer


def listening_socket(host, port, reuse_port=False, what="--listen", listen=True):
    """A TCP socket bound to (host, port), listening unless ``listen`` is false;
    ConfigError naming ``what`` when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise ConfigError("%s: cannot listen on %s:%d: %s" % (
            what, "[%s]" % host if ":" in host else host, port,
            exc.strerror or exc)) from None
    return sock


class EventFeed(_Service):
    """The master's events, for this process's websocket subscribers: a SUB socket on the
    master's event socket. A job event the master published anonymously (a private job,
    or one of a type hidden from anonymous users) is completed from the database, then
    each subscriber gets it as its own user may see it (lavacore/api/websocket.py).
    Device events of devices hidden from anonymous users are not published there at all,
    so an API process cannot pass them on."""

    name = "event-feed"

    def __init__(self, host):
        super().__init__(host)
        self.socket = None
        self.url = None

    def setup(self):
        config = self.host.config.master
        self.url = self.host.events_url or connect_endpoint(config.events)
        if not self.url:
            log.warning("API process: [master] events (%s) has no fixed port and no"
                        " --events was given: /ws/ subscribers get no events", config.events)
            return
        sock = self.host.context.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, config.event_topic.encode())
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_EVENT)
        sock.setsockopt(zmq.RCVHWM, 10000)
        if config.ipv6 or needs_ipv6(self.url):
            sock.setsockopt(zmq.IPV6, 1)
        try:
            sock.connect(self.url)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ConfigError("--events: cannot connect to %s: %s" % (self.url, exc)) \
                from None
        self.socket = sock

    def teardown(self):
        if self.socket is not None:
            self.socket.close(linger=0)

    def run(self):
        if self.socket is None:
            return super().run()
        from .services.base import recv_bounded

        plain = Service.plain(self.socket)
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        drops = RateLimitedLog(log)
        while not self.stopping.is_set():
            if not poller.poll(500):
                continue
            while True:
                try:
                    frames, total = recv_bounded(plain, EVENT_FRAMES)
                except zmq.Again:
                    break
                if total != EVENT_FRAMES or not self.host.events.subscribers:
                    continue
                try:
                    self.offer(frames)
                except StorageError as exc:
                    drops.warning("storage", "an event for /ws/ subscribers dropped: %s",
                                  exc)
                except Exception as exc:  # noqa: BLE001 - one event, never the process
                    drops.error("bad", "an event from %s ignored: %s: %s", self.url,
                                type(exc).__name__, exc, exc_info=True)

    def offer(self, frames):
        import datetime

        from . import safeyaml

        topic = frames[0].decode()
        kind = topic.rsplit(".", 1)[-1]
        username = frames[3].decode("utf-8", "replace")
        data = safeyaml.json_loads(frames[4])
        if not isinstance(data, dict):
            return
        try:
            stamp = datetime.datetime.fromisoformat(frames[2].decode())
        except ValueError:
            stamp = datetime.datetime.now(datetime.timezone.utc)
        if kind == "testjob" and username == permissions.PRIVATE:
            data, username = self._complete(data)
            if data is None:
                return
        for subscriber in list(self.host.events.subscribers):
            subscriber.offer(kind, topic, data, username, stamp)

    def _complete(self, data):
        """A job event as the master had it before hiding it from anonymous subscribers:
        its state and health as published, the rest from the database."""
        try:
            job = self.host.storage.get_job(int(str(data.get("job")).split(".")[0]))
        except (NotFound, TypeError, ValueError):
            return None, None
        full = job_event(job)
        for key in permissions.REDACTED_JOB_KEYS:
            if key in data:
                full[key] = data[key]
        return full, job.submitter or "lava-health"


class NotifyListener(_Service):
    """PostgreSQL: this process LISTENs as the master does, for what concerns it (who
    may do what changed; device configurations changed)."""

    name = "notify"

    def __init__(self, host):
        super().__init__(host)
        self.listener = None

    def setup(self):
        self.listener = self.host.storage.listen_events()

    def teardown(self):
        if self.listener is not None:
            self.listener.close()

    def run(self):
        drops = RateLimitedLog(log)
        while not self.stopping.is_set():
            for payload in self.listener.wait(0.5):
                if not isinstance(payload, dict):
                    continue
                try:
                    self.host.notified(payload)
                except Exception as exc:  # noqa: BLE001 - one notification, never the process
                    drops.error("bad", "ignored a notification: %s: %s",
                                type(exc).__name__, exc, exc_info=True)


# -- running it ---------------------------------------------------------------------------------

def serve(host, ready=None):
    """Start ``host``, serve until SIGTERM/SIGINT (exit 0) or a crash (exit 1). SIGHUP
    reopens the log. ``ready()`` is called once it serves."""
    handlers = signals.install(host.stop, host.reload, log)
    try:
        host.start()
        if ready is not None:
            ready()
        return host.wait()
    finally:
        for handler in handlers:
            handler.cancel()


def run(config, listen=None, processes=1, events_url=None, reuse_port=False,
        log_file=None, log_level=None):
    """``lavacore api``: one process, or a pool of ``processes``."""
    if processes > 1:
        from . import apipool

        return apipool.run(config, listen or config.api.listen, processes, events_url,
                           reuse_port, log_file, log_level)
    host = ApiHost(config, listen=listen, events_url=events_url, reuse_port=reuse_port)
    watchdog = sdnotify.start_watchdog(alive=lambda: host.services_run())

    def ready():
        log.info("API process %d serving %s (XML-RPC %s/RPC2, REST %s/api/v1/; storage %s)",
                 os.getpid(), host.url, host.url, host.url, host.storage.name)
        sdnotify.ready("serving %s" % host.url)

    try:
        return serve(host, ready)
    finally:
        if watchdog is not None:
            watchdog.kill(block=False)


def child_main(argv=None):
    """One process of a pool (started by lavacore/apipool.py, never by hand): its
    settings are one JSON argument; the listening socket, the shared memory and the
    readiness pipe are inherited descriptors."""
    from .api import shared

    spec = json.loads((argv or sys.argv[1:])[0])
    index = spec["index"]
    _name_records(index)
    config = config_mod.load(spec["config"])
    logsetup.apply(config, spec.get("log_file"), spec.get("log_level"))
    memory = shared.PoolMemory.attach(spec["memory"])
    listener = None
    if spec.get("socket") is not None:
        listener = socket.socket(fileno=spec["socket"])
    host = ApiHost(config, listen=spec["listen"], listener=listener,
                   events_url=spec.get("events"), memory=memory, index=index,
                   reuse_port=spec.get("reuse_port", False))

    def ready():
        log.info("API process %d (pid %d) serving %s", index, os.getpid(), host.url)
        try:
            os.write(spec["ready"], b"%d\n" % index)
        except OSError:
            pass
        os.close(spec["ready"])

    try:
        return serve(host, ready)
    except (ConfigError, StorageError) as exc:
        log.error("API process %d: %s", index, exc)
        return 2


def _name_records(index):
    """Every log record of a pool's process names it: ``lavacore.api[2]``."""
    factory = logging.getLogRecordFactory()
    suffix = "[%d]" % index

    def make(*args, **kwargs):
        record = factory(*args, **kwargs)
        record.name += suffix
        return record

    logging.setLogRecordFactory(make)


if __name__ == "__main__":
    sys.exit(child_main())
