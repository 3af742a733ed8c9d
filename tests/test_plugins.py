"""The plugin core: entry points, [plugins] modules and disable, check_pending, and a
third-party scheduler plugin installed with pip replacing the FIFO default."""

import os
import subprocess
import sys
import textwrap

import pytest

from lavacore import config as config_mod, plugins
from lavacore.config import ConfigError
from lavacore.states import JobState

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.timeout(120)


def _config(tmp_path, text=""):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return config_mod.load(str(path))


def test_builtin_plugins_come_from_the_entry_point_group(tmp_path):
    pm = plugins.build(_config(tmp_path))
    names = {name for name, _ in pm.list_name_plugin()}
    assert {"core", "scheduler_fifo", "storage_sqlite"} <= names


def test_disable_and_unknown_names(tmp_path):
    pm = plugins.build(_config(tmp_path, '[plugins]\ndisable = ["scheduler_fifo"]\n'))
    assert not pm.has_plugin("scheduler_fifo")
    with pytest.raises(ConfigError, match="no plugin named nosuch"):
        plugins.build(_config(tmp_path, '[plugins]\ndisable = ["nosuch"]\n'))


def test_an_installed_plugin_listed_in_modules_too_is_loaded_once(tmp_path):
    pm = plugins.build(_config(tmp_path, '[plugins]\nmodules = ["lavacore_plugins.metrics"]\n'))
    names = [name for name, plugin in pm.list_name_plugin()
             if getattr(plugin, "__name__", "") == "lavacore_plugins.metrics"]
    assert names == ["metrics"]


def test_misspelled_hook_is_an_error(tmp_path, monkeypatch):
    module = tmp_path / "typo_plugin.py"
    module.write_text(textwrap.dedent("""
        from lavacore.hookspecs import hookimpl

        @hookimpl
        def on_helo(master, hostname):
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="on_helo"):
        plugins.build(_config(tmp_path, '[plugins]\nmodules = ["typo_plugin"]\n'))


def test_unimportable_module_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match=r"\[plugins\] modules: cannot import 'no.such'"):
        plugins.build(_config(tmp_path, '[plugins]\nmodules = ["no.such"]\n'))


@pytest.fixture(scope="module")
def lifo_installed(tmp_path_factory):
    """pip-install the third-party plugin from tests/plugins into a private directory."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(target),
                    os.path.join(HERE, "plugins", "lifo_scheduler")],
                   check=True, capture_output=True)
    return str(target)


def test_installed_scheduler_plugin_replaces_fifo(lab, lifo_installed, monkeypatch):
    monkeypatch.syspath_prepend(lifo_installed)
    lab = lab()
    assert lab.master.pm.has_plugin("lifo")
    first = lab.submit(name="first")
    second = lab.submit(name="second")
    worker = lab.worker()
    frames = worker.expect("START")
    assert int(frames[1]) == second, "the newest job goes first with the LIFO plugin"
    assert lab.job(first).state == JobState.SUBMITTED


def test_fifo_without_the_plugin(lab):
    lab = lab()
    first = lab.submit(name="first")
    lab.submit(name="second")
    worker = lab.worker()
    assert int(worker.expect("START")[1]) == first


def test_the_scheduler_logged_is_the_one_that_runs(lab, lifo_installed, monkeypatch,
                                                   caplog):
    import logging

    caplog.set_level(logging.INFO)
    monkeypatch.syspath_prepend(lifo_installed)
    first = lab(extra='[scheduler]\nplugin = "lifo"\n')
    assert "master started (storage sqlite, scheduler lifo, " in caplog.text
    first.master.stop()
    # Installed, it answers first even where config.toml keeps the default: the log says
    # so instead of naming FIFO.
    caplog.clear()
    lab(extra='[scheduler]\nplugin = "fifo"\n')
    assert "master started (storage sqlite, scheduler lifo, " in caplog.text
    assert "[scheduler] plugin is 'fifo', but the installed plugin lifo answers the" \
        " schedule hook first" in caplog.text
