"""The ``[auth_curve]`` table of config.toml, checked once; errors name the TOML key."""

import dataclasses
import os

from zmq import has as zmq_has

from lavacore.certs import CertError, read_key_file
from lavacore.config import ConfigError

TABLE = "auth_curve"
DEFAULT_POLL = 2.0


@dataclasses.dataclass(frozen=True)
class CurveSettings:
    master_cert: str        # the master's key pair file (zmq.auth ``.key_secret``)
    public_key: str         # z85, from master_cert
    secret_key: str
    workers_certs: str      # one public ``<hostname>.key`` per allowed worker
    poll_interval: float    # seconds between two looks at workers_certs


def _key(name):
    return "[%s] %s" % (TABLE, name)


def _path(config, table, name):
    value = table.get(name)
    if value is None:
        raise ConfigError("%s: missing (required when [%s] is present)" % (_key(name), TABLE))
    if not isinstance(value, str) or not value:
        raise ConfigError("%s: expected a path, got %r" % (_key(name), value))
    return config.resolve(value)


def parse(config):
    """The settings, or None when the table is absent or ``enabled = false``."""
    table = config.raw.get(TABLE)
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError("[%s]: expected a table" % TABLE)
    known = ("enabled", "master_cert", "workers_certs", "poll_interval")
    for name in table:
        if name not in known:
            raise ConfigError("%s: unknown key (known: %s)" % (_key(name), ", ".join(known)))
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError("%s: expected true or false, got %r" % (_key("enabled"), enabled))
    if not enabled:
        return None
    if not zmq_has("curve"):
        raise ConfigError("[%s]: this libzmq was built without CURVE support" % TABLE)

    master_cert = _path(config, table, "master_cert")
    if not os.path.isfile(master_cert):
        raise ConfigError("%s: no such file %s" % (_key("master_cert"), master_cert))
    try:
        public, secret = read_key_file(master_cert)
    except CertError as exc:
        raise ConfigError("%s: %s" % (_key("master_cert"), exc)) from None
    if not secret:
        raise ConfigError("%s: %s holds no secret key (give the master's .key_secret file,"
                          " not its public .key)" % (_key("master_cert"), master_cert))

    workers_certs = _path(config, table, "workers_certs")
    if not os.path.isdir(workers_certs):
        raise ConfigError("%s: no such directory %s" % (_key("workers_certs"), workers_certs))

    poll = table.get("poll_interval", DEFAULT_POLL)
    if isinstance(poll, bool) or not isinstance(poll, (int, float)) or poll <= 0:
        raise ConfigError("%s: expected a number of seconds > 0, got %r"
                          % (_key("poll_interval"), poll))
    return CurveSettings(master_cert=master_cert, public_key=public, secret_key=secret,
                         workers_certs=workers_certs, poll_interval=float(poll))


def effective(config):
    """The table as the master runs it (``lavacore config``; None when absent), checked
    as at start."""
    table = config.raw.get(TABLE)
    settings = parse(config)
    if settings is None:
        return {"enabled": False} if table is not None else None
    return {"enabled": True, "master_cert": settings.master_cert,
            "workers_certs": settings.workers_certs, "poll_interval": settings.poll_interval}
