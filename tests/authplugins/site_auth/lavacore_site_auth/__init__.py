"""A site policy for lavacore's auth_curve plugin: one key per rack.

The key file ``rack1.key`` in workers_certs speaks for every worker named ``rack1-*``
(``rack1-a``, ``rack1-b``, ...), so a rack's hosts share one key pair. Anything else is
left to the default policy (``<hostname>.key`` speaks for ``<hostname>`` only). Unknown
and revoked keys stay refused whatever this says: auth_curve checks them around every
policy.
"""

from lavacore.hookspecs import hookimpl


@hookimpl
def authorize_worker(master, hostname, public_key):
    from lavacore_plugins import auth_curve

    auth = auth_curve.get(master)
    if auth is None or public_key is None:
        return None
    for name in auth.keys.names_of(public_key):
        if hostname.startswith(name + "-"):
            return True
    return None
