"""config.toml -> typed, frozen configuration objects.

Every error names the TOML key it is about (``[master] ping_interval: ...``). Paths are
resolved relative to the directory of the config file (README, "Configuration"). Unknown
keys in the tables lavacore owns are errors, so a misspelled key is not silently ignored.
Tables that plugins own (``[auth_curve]``, ``[coordinator]``, ...) are kept as raw
mappings in ``Config.raw`` for the plugins to read; a plugin declares them
(``LAVACORE_TABLES``, see lavacore/plugins.py), and once the plugins are loaded a table
nobody declared is an error too (:func:`check_tables`).
"""

import dataclasses
import difflib
import logging
import os
import re
import tomllib
import urllib.parse

from . import safeyaml, states


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
    # ZeroMQ's IPv6 option on every master socket: "*" then binds IPv4 and IPv6, and host
    # names resolve to IPv6 addresses too. Addresses written as [v6] need no option.
    ipv6: bool = False


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
    # Connections open at once, all clients together (each costs a greenlet).
    max_connections: int = 1024
    # The address people reach the pages at, when a reverse proxy stands in front
    # ("https://lava.example.org"): forms must come from it, and with https the session
    # cookie is sent over TLS only. Empty: the request's own Host and scheme.
    public_url: str = ""


@dataclasses.dataclass(frozen=True)
class JobsConfig:
    # Job context keys allowed besides LAVA's (read by lavacore/jobs.py).
    extra_context_variables: tuple = ()


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    # The master's log: a file (reopened when logrotate moves it, and on SIGHUP), or
    # stderr when empty (the journal, under systemd). The command line's --log-file and
    # --log-level win over these.
    file: str = ""
    level: str = "INFO"
    # A logging format string; empty: lavacore's (without the time under journald,
    # which stamps every line itself).
    format: str = ""


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
    jobs: JobsConfig = JobsConfig()
    logging: LoggingConfig = LoggingConfig()

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
    if api.max_connections < api.max_client_connections or api.max_connections != int(
            api.max_connections):
        raise ConfigError("[api] max_connections: a whole number, at least"
                          " max_client_connections (%d)" % api.max_client_connections)
    if api.public_url:
        parts = urllib.parse.urlsplit(api.public_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or \
                parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError("[api] public_url: an http(s)://host[:port] address, got %r"
                              % api.public_url)
    plugins = _table(PluginsConfig, "plugins", raw.get("plugins"))
    for key in ("modules", "disable"):
        for item in getattr(plugins, key):
            _check_type("[plugins] %s" % key, item, (str,), "an array of strings")
    local = raw.get("local_worker")
    local_worker = _table(LocalWorkerConfig, "local_worker", local) if local is not None else None
    jobs = _table(JobsConfig, "jobs", raw.get("jobs"))
    for item in jobs.extra_context_variables:
        _check_type("[jobs] extra_context_variables", item, (str,), "an array of strings")
    return Config(path=path, base_dir=base_dir, master=master, storage=storage,
                  scheduler=scheduler, api=api, plugins=plugins,
                  devices=_devices(raw.get("devices")), local_worker=local_worker, raw=raw,
                  jobs=jobs, logging=_logging(raw.get("logging")))


def _logging(data):
    settings = _table(LoggingConfig, "logging", data)
    level = settings.level.upper()
    if level not in LOG_LEVELS:
        raise ConfigError("[logging] level: %r is not one of %s"
                          % (settings.level, ", ".join(LOG_LEVELS)))
    check_log_format(settings.format, "[logging] format")
    return dataclasses.replace(settings, level=level)


def check_log_format(text, key):
    """A logging format string that formats a record, or ConfigError naming ``key``."""
    if not text:
        return
    try:
        formatter = logging.Formatter(text, validate=True)
        formatter.format(logging.LogRecord("lavacore", logging.INFO, __file__, 1, "m",
                                           None, None))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError("%s: %r is not a logging format: %s" % (key, text, exc)) from None


# -- tables ---------------------------------------------------------------------------

# The tables lavacore itself reads; plugins declare theirs (lavacore/plugins.py).
CORE_TABLES = ("master", "storage", "scheduler", "api", "jobs", "logging", "plugins",
               "local_worker", "devices")


def check_tables(config, plugin_tables, disabled_tables=None):
    """Every top-level table of the file must be lavacore's or a loaded plugin's.

    ``plugin_tables``: {table: plugin name} of the loaded plugins; ``disabled_tables``:
    those of plugins named in ``[plugins] disable``, which are ignored (returned as
    {table: plugin}, for the caller to say so). Anything else is a ConfigError naming the
    table and the file, as a misspelled key is."""
    disabled_tables = disabled_tables or {}
    known = set(CORE_TABLES) | set(plugin_tables)
    ignored = {}
    for name, value in config.raw.items():
        if name in known:
            continue
        if name in disabled_tables:
            ignored[name] = disabled_tables[name]
            continue
        what = "table" if isinstance(value, (dict, list)) else "key"
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        raise ConfigError("%s: [%s]: unknown %s%s (known tables: %s)" % (
            config.path, name, what, "; did you mean [%s]?" % close[0] if close else "",
            ", ".join(sorted(known))))
    return ignored


# -- files named by [master] ----------------------------------------------------------

def check_files(config):
    """What the master needs on disk at start. A missing ``dispatcher_config`` is a
    ConfigError (every job would fail without it); so is an env file that exists but
    cannot be read or is not YAML. A missing ``dispatchers`` directory or env file is only
    worth a warning when config.toml names it: LAVA takes those as empty, and the
    defaults need not exist. Returns the warnings (one line each)."""
    master = config.master
    named = config.raw.get("master") if isinstance(config.raw.get("master"), dict) else {}
    warnings = []
    root = config.resolve(master.dispatcher_config)
    if not os.path.isdir(root):
        raise ConfigError("[master] dispatcher_config: %s: %s" % (
            root, "not a directory" if os.path.exists(root) else "no such directory"))
    path = config.resolve(master.dispatchers)
    if not os.path.isdir(path) and "dispatchers" in named:
        warnings.append("[master] dispatchers: %s: %s; workers get no per-worker"
                        " dispatcher.yaml or env files" % (
                            path, "not a directory" if os.path.exists(path)
                            else "no such directory"))
    for key in ("env", "env_dut"):
        path = config.resolve(getattr(master, key))
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError:
            if key in named:
                warnings.append("[master] %s: %s: no such file; jobs get an empty %s (as"
                                " in LAVA)" % (key, path, key.replace("_", "-")))
            continue
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("[master] %s: cannot read %s: %s"
                              % (key, path, getattr(exc, "strerror", None) or exc)) from None
        try:
            safeyaml.load(text)
        except Exception as exc:  # noqa: BLE001 - yaml's and safeyaml's errors alike
            raise ConfigError("[master] %s: %s: invalid YAML: %s"
                              % (key, path, " ".join(str(exc).split()))) from None
    return warnings


# -- the effective configuration (lavacore config) ------------------------------------

_PATHS = ("output_dir", "dispatcher_config", "dispatchers", "env", "env_dut")
_SECRET = re.compile(r"passw|secret|token|credential", re.IGNORECASE)
MASK = "********"


def _listed(value):
    """Tuples as lists, recursively (what TOML and JSON write)."""
    if isinstance(value, (list, tuple)):
        return [_listed(v) for v in value]
    if isinstance(value, dict):
        return {k: _listed(v) for k, v in value.items()}
    return value


def masked(value, key=""):
    """``value`` with what looks like a secret replaced by a mask: keys named like a
    password, secret or token, and the password of a URL."""
    if isinstance(value, dict):
        return {k: masked(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v, key) for v in value]
    if isinstance(value, str) and value:
        if _SECRET.search(key):
            return MASK
        return _masked_url(value)
    return value


_KEYWORD_SECRET = re.compile(r"""(\b(?:password|passwd|sslpassword)\s*=\s*)(?:'(?:[^'\\]|\\.)*'|\S+)""")


def _masked_url(text):
    if "://" not in text:
        # A libpq keyword string ("host=db user=lava password=secret"): each secret
        # keyword's value, quoted or not.
        return _KEYWORD_SECRET.sub(lambda m: m.group(1) + MASK, text)
    try:
        parts = urllib.parse.urlsplit(text)
        password = parts.password
    except ValueError:
        return text
    if password:
        user, _, host = parts.netloc.rpartition("@")
        name = user.split(":", 1)[0]
        parts = parts._replace(netloc="%s:%s@%s" % (name, MASK, host))
    if parts.query and _SECRET.search(parts.query):
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        parts = parts._replace(query="&".join(
            "%s=%s" % (k, MASK if _SECRET.search(k) else v) for k, v in query))
    return urllib.parse.urlunsplit(parts)


def effective(config, plugin_tables=None):
    """The configuration as the master runs it, as plain data: every key of lavacore's
    tables with its default filled in, paths made absolute, secrets masked; then the
    plugins' tables (``plugin_tables``: {table: their effective values}) and the
    devices."""
    data = {}
    master = dataclasses.asdict(config.master)
    for key in _PATHS:
        master[key] = config.resolve(master[key])
    data["master"] = master
    storage = dataclasses.asdict(config.storage)
    if config.storage.backend == "sqlite":
        storage["url"] = config.resolve(storage["url"])
    data["storage"] = storage
    data["scheduler"] = dataclasses.asdict(config.scheduler)
    data["api"] = dataclasses.asdict(config.api)
    data["jobs"] = dataclasses.asdict(config.jobs)
    logs = dataclasses.asdict(config.logging)
    logs["file"] = config.resolve(logs["file"])
    data["logging"] = logs
    data["plugins"] = dataclasses.asdict(config.plugins)
    if config.local_worker is not None:
        local = dataclasses.asdict(config.local_worker)
        local["work_dir"] = config.resolve(local["work_dir"])
        data["local_worker"] = local
    for name, values in (plugin_tables or {}).items():
        data[name] = values
    data["devices"] = [dataclasses.asdict(device) for device in config.devices]
    return masked(_listed(data))


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key):
    return key if _BARE_KEY.match(key) else _toml_string(key)


def _toml_string(text):
    import json

    # JSON's escapes are TOML's, but for DEL, which TOML wants escaped too.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value):
    import datetime
    import math

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return "[%s]" % ", ".join(_toml_value(v) for v in value if v is not None)
    if isinstance(value, dict):
        items = ["%s = %s" % (_toml_key(k), _toml_value(v)) for k, v in value.items()
                 if v is not None]
        return "{ %s }" % ", ".join(items) if items else "{}"
    raise TypeError("cannot write %s as TOML" % type(value).__name__)


def to_toml(data, comments=()):
    """TOML text of ``data``: {table: {key: value}} and {name: [tables]} (arrays of
    tables), with ``comments`` as a header. Values inside a table that are tables
    themselves are written inline."""
    lines = ["# %s" % line for line in comments]
    for name, value in data.items():
        if isinstance(value, list):
            for item in value:
                lines += ["", "[[%s]]" % _toml_key(name)]
                lines += ["%s = %s" % (_toml_key(k), _toml_value(v))
                          for k, v in item.items() if v is not None]
            continue
        lines += ["", "[%s]" % _toml_key(name)]
        if isinstance(value, dict):
            lines += ["%s = %s" % (_toml_key(k), _toml_value(v))
                      for k, v in value.items() if v is not None]
    return "\n".join(lines).lstrip("\n") + "\n"
