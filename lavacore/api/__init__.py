"""The HTTP API of the master: XML-RPC at /RPC2 (LAVA's methods, as lavacli calls them)
and REST/JSON at /api/v1/, both over the same operations (jobs, devices, device types,
workers) and the same checks of names, ids and tokens.

``lavacore.services.api`` runs it on gevent's WSGI server inside the master;
``lavacore.apiserver`` (``lavacore api``) runs the same application in processes of
their own on the master's database.
"""
