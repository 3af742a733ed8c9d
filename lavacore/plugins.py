"""A fresh pluggy PluginManager per master (or per command), never a global one.

**A plugin's tables.** A plugin that reads a table of config.toml declares it in its
module::

    LAVACORE_TABLES = {"coordinator": effective}   # or a list of names

``effective(config)`` (or None) checks the table as the plugin will, raising
:class:`lavacore.config.ConfigError` naming the key, and returns its values with the
defaults filled in (``lavacore config`` prints them). Once the plugins are loaded, a
table neither lavacore nor a loaded plugin declares is an error naming the table and the
file, as a misspelled key is; the table of a plugin named in ``[plugins] disable`` is
ignored, and the master says so in its log.
"""

import importlib
import importlib.metadata
import logging

import pluggy

from . import builtin, hookspecs
from . import config as config_mod
from .config import ConfigError

log = logging.getLogger("lavacore.plugins")

GROUP = "lavacore.plugins"
TABLES = "LAVACORE_TABLES"


def _entry_points():
    return sorted(importlib.metadata.entry_points(group=GROUP), key=lambda ep: ep.name)


def declared_tables(module):
    """{table: effective function or None} that ``module`` declares."""
    tables = getattr(module, TABLES, None) or {}
    if isinstance(tables, str):
        tables = [tables]
    if not isinstance(tables, dict):
        tables = {name: None for name in tables}
    return dict(tables)


def _quiet_load(load):
    """A disabled plugin's module, only to read its tables (None if it does not load)."""
    try:
        return load()
    except Exception:  # noqa: BLE001 - it is disabled: its faults are not ours to report
        return None


def build(config):
    """Load the core defaults, every installed plugin of the entry-point group, then
    ``[plugins] modules``, skipping ``[plugins] disable``; then check that every hook
    implementation names a real hook, so a misspelled hook is an error, not silence; then
    that every table of config.toml is known, and that ``[scheduler] plugin`` names an
    installed scheduler."""
    pm = pluggy.PluginManager("lavacore")
    pm.add_hookspecs(hookspecs)
    disabled = set(config.plugins.disable)
    known = {"core"}
    tables = {}           # table -> (plugin name, effective function)
    disabled_tables = {}  # table -> plugin name
    pm.register(builtin, name="core")

    def declare(name, module):
        for table, effective in declared_tables(module).items():
            if table in config_mod.CORE_TABLES or table in tables:
                raise ConfigError("plugin %s: declares the table [%s], which is %s's" % (
                    name, table, "lavacore" if table in config_mod.CORE_TABLES
                    else tables[table][0]))
            tables[table] = (name, effective)

    for entry_point in _entry_points():
        known.add(entry_point.name)
        if pm.has_plugin(entry_point.name):
            continue
        if entry_point.name in disabled:
            module = _quiet_load(entry_point.load)
            for table in declared_tables(module):
                disabled_tables[table] = entry_point.name
            continue
        try:
            module = entry_point.load()
        except Exception as exc:
            raise ConfigError("plugin %s (%s): cannot load: %s"
                              % (entry_point.name, entry_point.value, exc)) from None
        pm.register(module, name=entry_point.name)
        declare(entry_point.name, module)
    for path in config.plugins.modules:
        known.add(path)
        if pm.has_plugin(path):
            continue
        if path in disabled:
            module = _quiet_load(lambda: importlib.import_module(path))
            for table in declared_tables(module):
                disabled_tables[table] = path
            continue
        try:
            module = importlib.import_module(path)
        except Exception as exc:
            raise ConfigError("[plugins] modules: cannot import %r: %s" % (path, exc)) from None
        if pm.is_registered(module):
            # Installed (an entry point) and listed too: loaded once.
            log.info("[plugins] modules: %s is already loaded as plugin %s", path,
                     pm.get_name(module))
            continue
        pm.register(module, name=path)
        declare(path, module)
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
    pm.lavacore_tables = tables
    pm.lavacore_ignored_tables = config_mod.check_tables(
        config, {table: owner for table, (owner, _) in tables.items()},
        {t: p for t, p in disabled_tables.items() if t not in tables})
    _check_scheduler(pm, config)
    return pm


def plugin_tables(pm, config):
    """{table: effective values} of the loaded plugins' tables, each checked by its
    plugin (ConfigError as the master would raise it); a table a plugin runs without
    (its function answers None) is left out."""
    values = {}
    for table, (_, effective) in sorted(pm.lavacore_tables.items()):
        if effective is not None:
            value = effective(config)
        else:
            value = config.raw.get(table)
        if value is not None:
            values[table] = value
    return values


# -- the scheduler ----------------------------------------------------------------------

def _short(name):
    return name[len("scheduler_"):] if name.startswith("scheduler_") else name


def schedulers(pm):
    """The plugins implementing ``schedule``, in the order pluggy asks them (the first
    answer that is not None wins; wrappers, such as MultiNode's, are left out)."""
    impls = [impl for impl in pm.hook.schedule.get_hookimpls()
             if not (impl.wrapper or impl.hookwrapper)]
    return [impl.plugin_name for impl in reversed(impls)]


def scheduler_in_use(pm, config):
    """The plugin whose ``schedule`` decides, or None. The builtin FIFO one answers only
    when ``[scheduler] plugin`` is "fifo"; a scheduler installed besides it answers first
    (lavacore's defaults are trylast)."""
    for name in schedulers(pm):
        if name == "scheduler_fifo" and config.scheduler.plugin != "fifo":
            continue
        return name
    return None


def _check_scheduler(pm, config):
    """``[scheduler] plugin``, when config.toml sets it, names an installed scheduler."""
    table = config.raw.get("scheduler")
    if not isinstance(table, dict) or "plugin" not in table:
        return
    names = schedulers(pm)
    wanted = config.scheduler.plugin
    if wanted not in names and wanted not in [_short(n) for n in names]:
        raise ConfigError("[scheduler] plugin: no installed plugin named %r implements the"
                          " schedule hook (installed: %s)" % (
                              wanted, ", ".join(_short(n) for n in names) or "none"))
