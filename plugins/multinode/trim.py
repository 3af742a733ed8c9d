"""The device configuration a dynamic connection runs with: its host device's, trimmed
as LAVA 2020.05 trims it (Device.minimise_configuration).

A connection has no device of its own; it reaches its host role's device through the
connections and methods that device offers. So it keeps the host's hostname, its
constants (without a kernel start message to wait for), its timeouts, and the
``connections`` and ``methods`` of its deploy and boot actions. Everything else (power
commands, serial consoles, parameters) is dropped: a connection must never power-cycle
the board its host role is using.
"""


def _get(data, *keys):
    # LAVA's walk: a missing key reads as an empty mapping, a present one as it is.
    for key in keys:
        data = data.get(key, {}) if isinstance(data, dict) else {}
    return data


def trimmed_configuration(config, hostname):
    """The trimmed copy of the rendered device configuration ``config`` (not changed)."""
    constants = dict(config.get("constants") or {})
    constants["kernel-start-message"] = ""
    return {
        "hostname": hostname,
        "constants": constants,
        "timeouts": config.get("timeouts") or {},
        "actions": {
            kind: {"connections": _get(config, "actions", kind, "connections"),
                   "methods": _get(config, "actions", kind, "methods")}
            for kind in ("deploy", "boot")
        },
    }
