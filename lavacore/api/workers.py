"""Worker operations behind both /RPC2 and /api/v1/: find, list, add, update (health
through Flow, which cascades to the worker's devices), and the worker's files: dispatcher
configuration, env, env-dut (kept in the database, read before the files when a job
starts) and its CURVE public certificate (in ``[auth_curve] workers_certs``)."""

import os
import re
import tempfile

import yaml

from .. import permissions
from ..devices import yaml_load
from ..flow import worker_event
from ..models import Worker
from ..states import WorkerHealth
from ..storage import NotFound
from . import validate
from .accounts import audit
from .errors import bad_request, conflict, not_found

# kind -> (blob kind, what LAVA calls it, worker-specific file, fallback file config key)
FILES = {
    "config": ("worker-config", "dispatcher configuration", "dispatcher.yaml", None),
    "env": ("worker-env", "env file", "env.yaml", "env"),
    "env-dut": ("worker-env-dut", "env-dut file", "env.dut.yaml", "env_dut"),
}
_PUBLIC_KEY = re.compile(r'^\s*public-key\s*=\s*"[\x21-\x7e]{40}"\s*$', re.MULTILINE)


def find(master, hostname):
    return validate.existing(master.storage.get_worker, hostname, "worker", "Worker")


def listing(master, show_all=False, **filters):
    workers = master.storage.list_workers(
        **{key: value for key, value in filters.items() if value is not None})
    if not show_all:
        workers = [w for w in workers if w.health != WorkerHealth.RETIRED]
    return workers


def add(caller, hostname, description=None, disabled=False):
    user = caller.require_admin(permissions.APP, "add_worker", "add workers")
    master = caller.master
    hostname = validate.name(hostname, "worker")
    description = validate.text(description, "description", optional=True, limit=4096)
    disabled = validate.flag(disabled, "disabled", default=False)
    try:
        master.storage.get_worker(hostname)
    except NotFound:
        pass
    else:
        raise conflict("Bad request: worker '%s' already exists." % hostname)
    worker = master.storage.add_worker(Worker(
        hostname, health=WorkerHealth.RETIRED if disabled else WorkerHealth.ACTIVE,
        description=description or ""))
    master.events.publish("worker", worker_event(worker), user)
    audit(caller, "worker", hostname, "add", None, worker.to_dict())
    return worker


def update(caller, hostname, description=None, health=None, job_limit=None, reason=None):
    user = caller.require_admin(permissions.APP, "change_worker", "change workers")
    master = caller.master
    worker = find(master, hostname)
    description = validate.text(description, "description", optional=True, limit=4096)
    new_health = validate.state(WorkerHealth, health, "health")
    reason = validate.text(reason, "reason", optional=True, limit=1024)
    if job_limit is not None:
        raise bad_request("job_limit: not supported by lavacore (a worker runs one job per"
                          " device)")
    if description is not None:
        master.storage.update_worker(worker.hostname, description=description)
    if new_health is not None:
        master.flow.set_worker_health(worker.hostname, new_health, user,
                                      reason or "set through the API")
    master.scheduler.wake()
    after = master.storage.get_worker(worker.hostname)
    audit(caller, "worker", worker.hostname, "update", worker.to_dict(), after.to_dict())
    return after


# -- files --------------------------------------------------------------------------------

def _candidates(master, kind, hostname):
    _, _, own, fallback = FILES[kind]
    root = master.config.resolve(master.config.master.dispatchers)
    paths = [os.path.join(root, hostname, own)]
    if kind == "config":
        paths.append(os.path.join(root, "%s.yaml" % hostname))
    elif fallback:
        paths.append(master.config.resolve(getattr(master.config.master, fallback)))
    return paths


def is_default(master, kind, hostname):
    """True when the worker has no file of its own (LAVA's ``default_config`` etc.)."""
    if master.storage.get_blob(FILES[kind][0], hostname) is not None:
        return False
    paths = _candidates(master, kind, hostname)
    own = paths[:2] if kind == "config" else paths[:1]
    return not any(os.path.exists(path) for path in own)


def get_file(caller, kind, hostname):
    """A worker file as the worker gets it. Env files and dispatcher configurations may
    hold a lab's credentials: reading them takes the right to change the worker."""
    caller.require_admin(permissions.APP, "change_worker", "read worker files")
    master = caller.master
    worker = find(master, hostname)
    blob, what, _, _ = FILES[kind]
    text = master.storage.get_blob(blob, worker.hostname)
    if text is not None:
        return text
    for path in _candidates(master, kind, worker.hostname):
        if not path:
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read()
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as exc:
            raise bad_request("Unable to read %s: %s" % (what, exc)) from None
    raise not_found("Worker '%s' does not have a %s" % (worker.hostname, what))


def set_file(caller, kind, hostname, text):
    """Store a worker file (YAML, checked; an empty text removes the stored one). Sent to
    the worker with each START, so it applies from the next job on, without restart."""
    caller.require_admin(permissions.APP, "change_worker", "change workers")
    master = caller.master
    worker = find(master, hostname)
    blob, what, _, _ = FILES[kind]
    text = validate.text(text, what, limit=1024 * 1024)
    if not text.strip():
        master.storage.set_blob(blob, worker.hostname, None)
        master.templates.reload()
        return True
    try:
        data = yaml_load(text)
    except (yaml.YAMLError, ValueError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = "line %d: " % (mark.line + 1) if mark is not None else ""
        raise bad_request("%s: %sinvalid YAML: %s" % (
            what, where, getattr(exc, "problem", None) or " ".join(str(exc).split()))) \
            from None
    if data is not None and not isinstance(data, dict):
        raise bad_request("%s: must be a YAML mapping" % what)
    master.storage.set_blob(blob, worker.hostname, text)
    master.templates.reload()
    audit(caller, "worker", worker.hostname, "set %s" % what, None, {"bytes": len(text)})
    return True


def get_certificate(master, hostname):
    """The worker's CURVE public certificate, from ``[auth_curve] workers_certs``."""
    from .. import certs

    worker = find(master, hostname)
    try:
        path = os.path.join(certs.workers_certs_dir(master.config),
                            worker.hostname + certs.SUFFIX)
    except certs.CertError as exc:
        raise not_found("Worker '%s' has no certificate: %s" % (worker.hostname, exc)) \
            from None
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        raise not_found("Worker '%s' does not have a certificate" % worker.hostname) \
            from None
    except (OSError, UnicodeDecodeError) as exc:
        raise bad_request("Unable to read the certificate: %s" % exc) from None


def set_certificate(caller, hostname, text):
    """Allow the worker's CURVE public certificate (a zmq.auth ``.key`` file, never a key
    pair): written to ``[auth_curve] workers_certs`` as ``lavacore workers allow`` does,
    and the running master re-reads its keys at once."""
    from .. import certs

    caller.require_admin(permissions.APP, "change_worker", "change workers")
    master = caller.master
    worker = find(master, hostname)
    text = validate.text(text, "certificate", limit=65536)
    if "secret-key" in text:
        raise bad_request("certificate: this is a key pair; send the public certificate only")
    if not _PUBLIC_KEY.search(text):
        raise bad_request("certificate: no public-key = \"...\" line (a zmq.auth certificate"
                          " is expected)")
    with tempfile.TemporaryDirectory(prefix="lavacore-cert-") as scratch:
        path = os.path.join(scratch, worker.hostname + certs.SUFFIX)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        try:
            certs.allow_worker(master.config, worker.hostname, path)
        except certs.CertError as exc:
            raise bad_request("certificate: %s" % str(exc).replace(path, "the certificate")) \
                from None
    if getattr(master, "role", None) != "api":
        master.hook.configure(config=master.config, master=master)  # re-read the keys now
    # (An API process cannot tell the master's auth_curve: the master reads the key
    # directory again when the worker's unknown key comes to its handshake.)
    audit(caller, "worker", worker.hostname, "set certificate", None, text.strip())
    return True
