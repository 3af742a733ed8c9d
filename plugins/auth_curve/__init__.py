"""CURVE encryption and per-worker identity for the master (LAVA's ``--encrypt``, and more).

On when config.toml has an ``[auth_curve]`` table::

    [auth_curve]
    master_cert = "etc/certs/master.key_secret"   # the master's key pair
    workers_certs = "etc/certs/workers"           # one public <hostname>.key per worker
    poll_interval = 2.0                           # seconds; SIGHUP re-reads at once

* The controller ROUTER and the log PULL socket become CURVE servers, with a green ZAP
  authenticator (always one: without it libzmq accepts every key). The events PUB socket
  stays plaintext, as LAVA's publisher was, so lavacli and event listeners need no keys.
* Keys change without a restart: workers_certs is polled, SIGHUP re-reads it at once, and
  an unknown key at a handshake re-reads it before being refused.
* Revocation ends established sessions too: every message carries its peer's key
  (``User-Id``), and a key no longer in workers_certs is refused, which LAVA never did.
* Identity: a key speaks only for the hostnames of its files (``worker1.key`` ->
  ``worker1``). That default is the ``authorize_worker`` hook, ``trylast``: a site's
  plugin answering that hook replaces the policy, while this plugin still refuses keys
  that are unknown or revoked whatever the policy says.

Key files are zmq.auth certificates, the format of LAVA's ``create_certificate.py``;
``lavacore certs create`` and ``lavacore workers allow/revoke`` manage them.
"""

import logging
import weakref

from lavacore.hookspecs import hookimpl

from . import settings as settings_mod
from .auth import CurveAuth

log = logging.getLogger("lavacore.auth_curve")

# The config.toml table this plugin reads (lavacore/plugins.py).
LAVACORE_TABLES = {settings_mod.TABLE: settings_mod.effective}

SECURED_ROLES = ("controller", "logs")

# One state per master (tests build many masters in one process; no global state
# outlives its master).
_states = weakref.WeakKeyDictionary()


def get(master):
    """The :class:`CurveAuth` of ``master``, or None when CURVE is off. A site's
    authorize_worker plugin may use ``get(master).keys.names_of(public_key)``."""
    if master is None:
        return None
    return _states.get(master)


@hookimpl
def configure(config, master):
    if master is None:
        return  # a command line: lavacore.certs reads the table itself when asked
    auth = _states.get(master)
    if auth is not None:
        auth.reload("reload (SIGHUP)")
        return
    settings = settings_mod.parse(config)
    if settings is None:
        return
    auth = CurveAuth(master, settings)
    auth.scan(force=True)
    _states[master] = auth
    # The controller then refuses any message that carries no key (as LAVA: plaintext
    # peers are refused when encryption is on).
    master.auth_required = True
    log.info("CURVE on: master key %s, %d worker key(s) in %s (polled every %gs); the"
             " events socket stays plaintext", settings.public_key, len(auth.keys.by_name),
             settings.workers_certs, settings.poll_interval)


@hookimpl
def secure_socket(master, role, socket):
    auth = get(master)
    if auth is None:
        return
    if role in SECURED_ROLES:
        auth.service.secure(role, socket)


@hookimpl
def register_services(master):
    auth = get(master)
    return [auth.service] if auth is not None else None


@hookimpl(trylast=True)
def authorize_worker(master, hostname, public_key):
    """The default policy: a key speaks for the hostnames of the files holding it."""
    auth = get(master)
    if auth is None:
        return None
    return hostname in auth.keys.names_of(public_key)


@hookimpl(wrapper=True, specname="authorize_worker")
def enforce_allowed_keys(master, hostname, public_key):
    """Around every policy: unknown and revoked keys are refused, whatever it said."""
    policy = yield
    auth = get(master)
    if auth is None:
        return policy
    return auth.decide(hostname, public_key, policy)
