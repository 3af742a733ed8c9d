"""LAVA's environment files (START's env frame, env.dut.yaml) applied to an environment.

The format is lava-slave's: a YAML mapping with ``purge: true`` (start from nothing),
``removes: [NAME, ...]`` (missing names are ignored) and ``overrides: {NAME: value}``, applied
in that order.
"""

import yaml

try:
    _Loader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - libyaml ships in the wheels we install
    _Loader = yaml.SafeLoader


class EnvError(ValueError):
    """An environment description that cannot be applied; the text says why."""


def _scalar(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    return str(value)


def parse(text, what="env"):
    """The mapping of an environment file's text ({} for an empty one)."""
    if not text or not text.strip():
        return {}
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise EnvError("%s is not valid YAML: %s" % (what, " ".join(str(exc).split()))) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EnvError("%s must be a YAML mapping, got %s" % (what, type(data).__name__))
    removes = data.get("removes") or []
    if not isinstance(removes, list):
        raise EnvError("%s: 'removes' must be a list of names" % what)
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise EnvError("%s: 'overrides' must be a mapping of names to values" % what)
    return data


def apply(base, text, what="env"):
    """A new environment: ``base`` (a mapping) changed as the env file text says."""
    data = parse(text, what)
    env = {} if data.get("purge") is True else dict(base)
    for name in data.get("removes") or []:
        env.pop(str(name), None)
    for name, value in (data.get("overrides") or {}).items():
        env[str(name)] = _scalar(value)
    return env
