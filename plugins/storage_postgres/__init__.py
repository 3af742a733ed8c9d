"""PostgreSQL storage: several processes on one database, and a standby master.

Enabled by::

    [storage]
    backend = "postgres"
    url = "postgresql://lavacore@dbhost:5432/lavacore"   # any libpq URL or "key=value" DSN
    [storage.options]
    pool_size = 8            # connections per process at most
    schema = ""              # a schema of its own (search_path); created by migrate
    synchronous_commit = ""  # e.g. "off": faster commits, the last ones lost on a crash

(every option: ``PostgresStorage.OPTIONS``). The schema is created and migrated when the
master (or any command) starts; ``lavacore db migrate`` and ``db check`` do it explicitly.

What it adds over SQLite:

- The CLI, and API processes other than the master, write to the same database and wake
  the master at once with NOTIFY (``publish_event``/``listen_events``).
- Two masters on one database: the second waits as a standby (an advisory lock, see
  leader.py) and takes over within about a second when the first dies. Run the pair with
  the same config.toml, either on one host (the standby binds the same ports once it is
  active, and workers reconnect by themselves) or on two hosts behind one address that
  follows the active master (a virtual IP, or a DNS name the workers use)::

      lavacore -c config.toml    # host A: "master lock ... taken: this is the active master"
      lavacore -c config.toml    # host B: "standby: waiting for the active master"

  The job output directory (``[master] output_dir``) must be shared by both (NFS), as it
  holds the logs and the START files that are resent to workers.
- Database faults: a dropped connection or a restarted server becomes a one-line
  ``StorageError`` to the core (which then retries; see lavacore.storage) and the next use
  reconnects; connections are checked when taken from the pool.

The psycopg2 wait callback (green.py) is installed when this module is imported, before any
connection exists, so every query waits cooperatively under gevent.
"""

from lavacore.hookspecs import hookimpl
from lavacore.storage import StorageError

try:
    from . import green
    from .backend import PostgresStorage
except ImportError as exc:  # psycopg2 is an extra: a SQLite lab does not build it
    if exc.name != "psycopg2":
        raise
    MISSING = exc
    PostgresStorage = None
else:
    MISSING = None
    green.install()

BACKENDS = ("postgres", "postgresql")


@hookimpl(trylast=True)
def storage(config):
    if config.storage.backend not in BACKENDS:
        return None
    from lavacore.config import ConfigError

    if PostgresStorage is None:
        raise ConfigError("[storage] backend = %r needs psycopg2, which is not installed"
                          " (%s): pip install 'lavacore[postgres]' (builds against"
                          " libpq-dev)" % (config.storage.backend, MISSING))
    try:
        return PostgresStorage(config.storage.url, **dict(config.storage.options))
    except StorageError as exc:
        raise ConfigError(str(exc)) from None


__all__ = ["PostgresStorage", "storage"]
