"""config.toml -> typed, frozen configuration objects.

Every error names the TOML key it is about (``[master] ping_interval: ...``). Paths are
resolved relative to the directory of the config file (contracts.md). Unknown keys in
the tables lavacore owns are errors, so a misspelled key is not silently ignored; tables
that plugins own (``[auth_curve]``, ``[multinode]``, ...) are kept as raw mappings in
``Config.raw`` for the plugins to read.
"""

import dataclasses
import os
import tomllib

from . import states


class ConfigError(Exception):
    """A one-line, user-facing configuration error."""


def _check_type(key, value, kinds, kind_name):
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError("%s: expected %s, got %r" % (key, kind_name, value))
    if not isinstance(value, kinds):
        raise ConfigError("%s: expected %s, got %r" % (key, kind_name, value))
    return value


@dataclasses.dataclass(frozen=True)
class MasterConfig:
    listen: str = "tcp://*:5556"
    logs: str = "tcp://*:5555"
    events: str = "tcp://*:5500"
    event_url: str = ""
    event_topic: str = "org.linaro.validation"
    ping_interval: float = 20
    worker_timeout: float = 60
    schedule_interval: float = 20
    # A job whose END came with a description waits this long for its lava/job result
    # (the log stream may trail END a little) before it is finished Incomplete.
    result_grace: float = 10
    # How often the watchdog looks at worker liveness and pending job results.
    watchdog_interval: float = 1
    output_dir: str = "var/job-output"
    dispatcher_config: str = "etc/dispatcher-config"
    dispatchers: str = "etc/dispatcher.d"
    env: str = "etc/env.yaml"
    env_dut: str = "etc/env.dut.yaml"
    # HELLO from a hostname the database does not know creates its worker record (LAVA's
    # behaviour); false: such workers are refused, with a log line, and leave no state.
    auto_register: bool = True
    # Bounds on what workers send (bytes): one ZeroMQ frame on the worker socket, END's
    # description once inflated, and the worker's copy of a job log once inflated.
    max_message: int = 64 * 1024 * 1024
    max_description: int = 8 * 1024 * 1024
    max_log_copy: int = 1024 * 1024 * 1024
    # Started as root: bind the sockets, then run as this user (and group; by default
    # the user's own).
    user: str = ""
    group: str = ""
    # Where the master's own notification socket lives (CLI -> master wake-ups).
    notify: str = ""
    instance: str = "lavacore"


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    backend: str = "sqlite"
    url: str = "var/lavacore.db"
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    plugin: str = "fifo"


@dataclasses.dataclass(frozen=True)
class ApiConfig:
    listen: str = "127.0.0.1:8000"
    enabled: bool = True
    # Seconds from a request's first byte to the end of its headers (slow clients are cut
    # off), and connections one client address may hold open at once.
    header_timeout: float = 10
    max_client_connections: int = 32
    # Failed authentications one client address may make per minute; past that its
    # requests with credentials get 429 for the rest of the minute.
    max_auth_failures: int = 10


@dataclasses.dataclass(frozen=True)
class PluginsConfig:
    modules: tuple = ()
    disable: tuple = ()


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    hostname: str
    device_type: str
    worker: str
    tags: tuple = ()
    health: str = "Good"
    public: bool = True


@dataclasses.dataclass(frozen=True)
class LocalWorkerConfig:
    hostname: str = "worker01"
    work_dir: str = "var/worker"
    master: str = ""
    logs: str = ""
    runner: str = "lavacore-run"
    # Runners (and so job steps) run as this user, when the worker runs as root.
    run_as: str = ""
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Config:
    path: str
    base_dir: str
    master: MasterConfig
    storage: StorageConfig
    scheduler: SchedulerConfig
    api: ApiConfig
    plugins: PluginsConfig
    devices: tuple
    local_worker: object  # LocalWorkerConfig or None
    raw: dict

    def resolve(self, path):
        """A path from the config, made absolute against the config file's directory."""
        if not path:
            return path
        path = os.path.expanduser(path)
        if os.path.isabs(path):
            return path
        return os.path.normpath(os.path.join(self.base_dir, path))

    def section(self, name):
        """A plugin's own table (a dict, empty when absent)."""
        value = self.raw.get(name, {})
        return value if isinstance(value, dict) else {}


def _table(cls, name, data, base=None):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("[%s]: expected a table" % name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = dict(base or {})
    for key, value in data.items():
        qualified = "[%s] %s" % (name, key)
        if key not in fields:
            raise ConfigError("%s: unknown key (known: %s)"
                              % (qualified, ", ".join(sorted(fields))))
        default = fields[key].default
        if isinstance(default, bool):
            _check_type(qualified, value, (bool,), "true or false")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            _check_type(qualified, value, (int, float), "a number")
            if value < 0:
                raise ConfigError("%s: must not be negative, got %r" % (qualified, value))
        elif isinstance(default, str):
            _check_type(qualified, value, (str,), "a string")
        elif isinstance(default, tuple):
            _check_type(qualified, value, (list,), "an array")
            value = tuple(value)
        elif fields[key].default_factory is dict:
            _check_type(qualified, value, (dict,), "a table")
        values[key] = value
    return cls(**values)


def _devices(data):
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError("[[devices]]: expected an array of tables")
    devices = []
    seen = set()
    for index, item in enumerate(data):
        where = "[[devices]] #%d" % (index + 1)
        if not isinstance(item, dict):
            raise ConfigError("%s: expected a table" % where)
        for key in ("hostname", "device_type", "worker"):
            if not isinstance(item.get(key), str) or not item.get(key):
                raise ConfigError("%s %s: required, a non-empty string" % (where, key))
        where = "[[devices]] %s" % item["hostname"]
        if item["hostname"] in seen:
            raise ConfigError("%s: hostname listed twice" % where)
        seen.add(item["hostname"])
        tags = item.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ConfigError("%s tags: expected an array of strings" % where)
        health = item.get("health", "Good")
        if health not in states.DEVICE_HEALTH_NAMES:
            raise ConfigError("%s health: %r is not one of %s"
                              % (where, health, ", ".join(states.DEVICE_HEALTH_NAMES)))
        unknown = set(item) - {"hostname", "device_type", "worker", "tags", "health", "public"}
        if unknown:
            raise ConfigError("%s: unknown key %s" % (where, ", ".join(sorted(unknown))))
        public = item.get("public", True)
        _check_type(where + " public", public, (bool,), "true or false")
        devices.append(DeviceConfig(item["hostname"], item["device_type"], item["worker"],
                                    tuple(tags), health, public))
    return tuple(devices)


def load(path):
    """Read and validate a config file. Raises ConfigError with a one-line message."""
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("%s: no such config file" % path) from None
    except OSError as exc:
        raise ConfigError("%s: cannot read: %s" % (path, exc.strerror)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("%s: invalid TOML: %s" % (path, exc)) from None
    return from_dict(raw, path)


def from_dict(raw, path="<memory>", base_dir=None):
    if base_dir is None:
        base_dir = os.path.dirname(os.path.abspath(path)) if path != "<memory>" else os.getcwd()
    master = _table(MasterConfig, "master", raw.get("master"))
    for key in ("ping_interval", "worker_timeout", "schedule_interval", "watchdog_interval"):
        if getattr(master, key) <= 0:
            raise ConfigError("[master] %s: must be positive" % key)
    for key in ("max_message", "max_description", "max_log_copy"):
        value = getattr(master, key)
        if value != int(value) or value < 4096:
            raise ConfigError("[master] %s: a whole number of bytes, at least 4096, got %r"
                              % (key, value))
    storage = _table(StorageConfig, "storage", raw.get("storage"))
    scheduler = _table(SchedulerConfig, "scheduler", raw.get("scheduler"))
    api = _table(ApiConfig, "api", raw.get("api"))
    if api.header_timeout <= 0:
        raise ConfigError("[api] header_timeout: must be positive")
    if api.max_client_connections < 1 or api.max_client_connections != int(
            api.max_client_connections):
        raise ConfigError("[api] max_client_connections: a whole number, at least 1")
    if api.max_auth_failures < 1 or api.max_auth_failures != int(api.max_auth_failures):
        raise ConfigError("[api] max_auth_failures: a whole number, at least 1")
    plugins = _table(PluginsConfig, "plugins", raw.get("plugins"))
    for key in ("modules", "disable"):
        for item in getattr(plugins, key):
            _check_type("[plugins] %s" % key, item, (str,), "an array of strings")
    local = raw.get("local_worker")
    local_worker = _table(LocalWorkerConfig, "local_worker", local) if local is not None else None
    return Config(path=path, base_dir=base_dir, master=master, storage=storage,
                  scheduler=scheduler, api=api, plugins=plugins,
                  devices=_devices(raw.get("devices")), local_worker=local_worker, raw=raw)
