"""A fresh pluggy PluginManager per master (or per command), never a global one."""

import importlib
import importlib.metadata

import pluggy

from . import builtin, hookspecs
from .config import ConfigError

GROUP = "lavacore.plugins"


def _entry_points():
    return sorted(importlib.metadata.entry_points(group=GROUP), key=lambda ep: ep.name)


def build(config):
    """Load the core defaults, every installed plugin of the entry-point group, then
    ``[plugins] modules``, skipping ``[plugins] disable``; then check that every hook
    implementation names a real hook, so a misspelled hook is an error, not silence."""
    pm = pluggy.PluginManager("lavacore")
    pm.add_hookspecs(hookspecs)
    disabled = set(config.plugins.disable)
    known = {"core"}
    pm.register(builtin, name="core")
    for entry_point in _entry_points():
        known.add(entry_point.name)
        if entry_point.name in disabled or pm.has_plugin(entry_point.name):
            continue
        try:
            module = entry_point.load()
        except Exception as exc:
            raise ConfigError("plugin %s (%s): cannot load: %s"
                              % (entry_point.name, entry_point.value, exc)) from None
        pm.register(module, name=entry_point.name)
    for path in config.plugins.modules:
        known.add(path)
        if path in disabled or pm.has_plugin(path):
            continue
        try:
            module = importlib.import_module(path)
        except Exception as exc:
            raise ConfigError("[plugins] modules: cannot import %r: %s" % (path, exc)) from None
        pm.register(module, name=path)
    unknown = disabled - known
    if unknown:
        raise ConfigError("[plugins] disable: no plugin named %s (installed: %s)"
                          % (", ".join(sorted(unknown)), ", ".join(sorted(known))))
    if "core" in disabled:
        raise ConfigError("[plugins] disable: the core plugin cannot be disabled")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise ConfigError("plugin %s: %s" % (getattr(exc, "plugin_name", "?"), exc)) from None
    return pm
