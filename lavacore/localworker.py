"""The ``[local_worker]`` of config.toml: a worker for a lab of one machine.

It runs inside the master's process (a greenlet on its loop), or, when the master drops
root (``[master] user``), as a process of its own started before the master drops, so
that it keeps root as a lab host's worker does and its runners can run as
``[local_worker] run_as``::

    python -m lavacore.localworker CONFIG MASTER_URL LOGS_URL
"""

import logging
import os
import signal
import sys

log = logging.getLogger("lavacore.worker")


def build(config, master_url, logs_url):
    """The Worker of ``config``'s [local_worker] (ConfigError naming the key if wrong)."""
    from .config import ConfigError
    from .worker.slave import Worker

    local = config.local_worker
    options = dict(local.options)
    for key in ("master_cert", "worker_cert"):
        if options.get(key):
            options[key] = config.resolve(options[key])
    if local.run_as:
        options["run_as"] = local.run_as
    try:
        return Worker(master=local.master or master_url, logs=local.logs or logs_url,
                      hostname=local.hostname, work_dir=config.resolve(local.work_dir),
                      runner=local.runner, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError("[local_worker] options: %s" % exc) from None


def main(argv=None):
    import gevent

    from . import config as config_mod
    from .config import ConfigError

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print("usage: python -m lavacore.localworker CONFIG MASTER_URL LOGS_URL",
              file=sys.stderr)
        return 2
    from . import logsetup

    try:
        config = config_mod.load(argv[0])
        # Where the master logs: [logging], or what its command line said.
        logsetup.apply(config, os.environ.get("LAVACORE_LOG_FILE") or None,
                       os.environ.get("LAVACORE_LOG_LEVEL") or None)
        worker = build(config, argv[1], argv[2])
    except ConfigError as exc:
        print("lavacore local worker: %s" % exc, file=sys.stderr)
        return 1
    handlers = [gevent.signal_handler(sig, worker.stop) for sig in (signal.SIGTERM,
                                                                     signal.SIGINT)]
    parent = os.getppid()

    def orphaned():
        # The master dropped root: it cannot signal us. Its end is ours.
        while os.getppid() == parent:
            gevent.sleep(1.0)
        log.info("the master (process %d) is gone: stopping", parent)
        worker.stop()

    watcher = gevent.spawn(orphaned)
    try:
        worker.run()
    finally:
        watcher.kill(block=False)
        for handler in handlers:
            handler.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
