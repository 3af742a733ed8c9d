"""config.toml as the master takes it: unknown tables refused like unknown keys, plugins'
tables declared, [scheduler] plugin checked, the files [master] names checked at start,
and ``lavacore config`` (the effective configuration, or the master's own error)."""

import json
import os
import tomllib

import pytest

from conftest import run_cli, write_config
from lavacore import config as config_mod
from lavacore import plugins
from lavacore.config import ConfigError
from lavacore.master import Master

pytestmark = pytest.mark.timeout(120)


def _load(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return config_mod.load(str(path))


def _master_error(config_path):
    """The one line a master started on ``config_path`` stops with."""
    done = run_cli(config_path, "master")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr.strip()


def test_a_misspelled_table_is_refused_naming_it_and_the_file(tmp_path):
    config = _load(tmp_path, '[schedular]\nplugin = "fifo"\n')
    with pytest.raises(ConfigError) as info:
        plugins.build(config)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "c.toml") + ": [schedular]: unknown table")
    assert "did you mean [scheduler]?" in message
    # A key at the top level, outside any table, is refused the same way.
    with pytest.raises(ConfigError, match=r"\[plugin\]: unknown key"):
        plugins.build(_load(tmp_path, 'plugin = "fifo"\n'))


def test_plugin_tables_are_known_and_a_disabled_plugins_table_is_ignored(tmp_path):
    config = _load(tmp_path, '[coordinator]\nrecheck = 1.0\n'
                             '[auth_curve]\nenabled = false\n')
    pm = plugins.build(config)
    assert pm.lavacore_tables["coordinator"][0] == "multinode"
    assert pm.lavacore_tables["auth_curve"][0] == "auth_curve"
    assert pm.lavacore_ignored_tables == {}
    config = _load(tmp_path, '[plugins]\ndisable = ["multinode"]\n'
                             '[coordinator]\nrecheck = 1.0\n')
    pm = plugins.build(config)
    assert pm.lavacore_ignored_tables == {"coordinator": "multinode"}


def test_a_site_plugin_declares_its_table(tmp_path, monkeypatch):
    (tmp_path / "site_plugin.py").write_text(
        'LAVACORE_TABLES = ["site"]\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    text = '[plugins]\nmodules = ["site_plugin"]\n[site]\nanswer = 42\n'
    pm = plugins.build(_load(tmp_path, text))
    assert plugins.plugin_tables(pm, _load(tmp_path, text))["site"] == {"answer": 42}
    with pytest.raises(ConfigError, match=r"\[site\]: unknown table"):
        plugins.build(_load(tmp_path, '[site]\nanswer = 42\n'))
    (tmp_path / "greedy_plugin.py").write_text('LAVACORE_TABLES = ["master"]\n')
    with pytest.raises(ConfigError, match=r"plugin greedy_plugin: declares the table"
                                          r" \[master\], which is lavacore's"):
        plugins.build(_load(tmp_path, '[plugins]\nmodules = ["greedy_plugin"]\n'))


def test_scheduler_plugin_must_be_installed(tmp_path):
    with pytest.raises(ConfigError) as info:
        plugins.build(_load(tmp_path, '[scheduler]\nplugin = "lifo"\n'))
    assert str(info.value) == ("[scheduler] plugin: no installed plugin named 'lifo'"
                               " implements the schedule hook (installed: fifo)")
    config = _load(tmp_path, '[scheduler]\nplugin = "fifo"\n')
    pm = plugins.build(config)
    assert plugins.scheduler_in_use(pm, config) == "scheduler_fifo"
    config = _load(tmp_path, '[scheduler]\nplugin = "scheduler_fifo"\n')
    assert plugins.scheduler_in_use(plugins.build(config), config) is None  # fifo declines


def test_logging_table_is_checked(tmp_path):
    config = _load(tmp_path, '[logging]\nfile = "log/m.log"\nlevel = "debug"\n')
    assert config.logging.level == "DEBUG"
    assert config.resolve(config.logging.file) == str(tmp_path / "log" / "m.log")
    with pytest.raises(ConfigError, match=r"^\[logging\] level: 'LOUD' is not one of DEBUG"):
        _load(tmp_path, '[logging]\nlevel = "LOUD"\n')
    with pytest.raises(ConfigError, match=r"^\[logging\] format: '%\(nosuch\)s' is not a"
                                          r" logging format"):
        _load(tmp_path, '[logging]\nformat = "%(nosuch)s"\n')
    with pytest.raises(ConfigError, match=r"^\[logging\] colour: unknown key"):
        _load(tmp_path, '[logging]\ncolour = true\n')


def test_missing_dispatcher_config_is_an_error_and_missing_env_files_warnings(tmp_path,
                                                                               caplog):
    path = write_config(tmp_path)
    text = open(path).read()
    # The default paths need not exist (LAVA takes a missing env file as empty).
    assert config_mod.check_files(config_mod.load(path)) == []
    named = text.replace("[master]\n", '[master]\nenv_dut = "etc/nosuch.dut.yaml"\n'
                         'dispatchers = "etc/nosuch.d"\n')
    open(path, "w").write(named)
    warnings = config_mod.check_files(config_mod.load(path))
    assert warnings == [
        "[master] dispatchers: %s: no such directory; workers get no per-worker"
        " dispatcher.yaml or env files" % (tmp_path / "etc/nosuch.d"),
        "[master] env_dut: %s: no such file; jobs get an empty env-dut (as in LAVA)"
        % (tmp_path / "etc/nosuch.dut.yaml")]
    # The master says so in its log and starts.
    master = Master(config_mod.load(path)).start()
    try:
        assert "[master] env_dut: %s: no such file" % (tmp_path / "etc/nosuch.dut.yaml") \
            in caplog.text
    finally:
        master.stop()
    # An env file that is there but broken would fail every job: an error at start.
    (tmp_path / "etc" / "env.yaml").write_text("overrides: [unclosed\n")
    open(path, "w").write(text)
    assert _master_error(path).startswith(
        "lavacore: [master] env: %s: invalid YAML:" % (tmp_path / "etc" / "env.yaml"))
    (tmp_path / "etc" / "env.yaml").write_text("overrides: {A: b}\n")
    open(path, "w").write(text.replace('[master]\n', '[master]\ndispatcher_config ='
                                       ' "etc/nowhere"\n'))
    assert _master_error(path) == ("lavacore: [master] dispatcher_config: %s: no such"
                                   " directory" % (tmp_path / "etc" / "nowhere"))


def test_config_command_prints_the_effective_configuration(tmp_path):
    path = write_config(tmp_path, master={"ping_interval": 7})
    text = open(path).read().replace(
        '[storage]\nbackend = "sqlite"\nurl = "var/lavacore.db"',
        '[storage]\nbackend = "postgres"\n'
        'url = "postgresql://lab:hunter2@db.example:5432/lab"\n'
        'options = { pool_size = 3, schema = "s" }')
    open(path, "w").write(text + '[logging]\nfile = "log/master.log"\n')
    done = run_cli(path, "config")
    assert done.returncode == 0, done.stderr
    assert "hunter" not in done.stdout
    data = tomllib.loads(done.stdout)
    assert data["master"]["ping_interval"] == 7
    assert data["master"]["worker_timeout"] == 60                    # a default
    assert data["master"]["output_dir"] == str(tmp_path / "var" / "job-output")
    assert data["logging"] == {"file": str(tmp_path / "log" / "master.log"),
                               "level": "INFO", "format": ""}
    assert data["storage"]["url"] == "postgresql://lab:********@db.example:5432/lab"
    assert data["storage"]["options"] == {"pool_size": 3, "schema": "s"}
    assert data["coordinator"]["listen"] == "tcp://127.0.0.1:0"     # the plugin's table
    assert data["coordinator"]["read_timeout"] == 10.0              # with its defaults
    assert [d["hostname"] for d in data["devices"]] == ["qemu01"]
    assert data["devices"][0]["public"] is True
    assert done.stdout.startswith("# The configuration of %s" % path)
    as_json = run_cli(path, "config", "--json")
    assert json.loads(as_json.stdout) == data
    # What it prints is a config the master takes, and it prints back the same.
    again = tmp_path / "again.toml"
    again.write_text(done.stdout.replace("********", "x"))
    assert tomllib.loads(run_cli(str(again), "config").stdout) == data


@pytest.mark.parametrize("text, what", [
    ('[master]\nping_interval = "soon"\n', "[master] ping_interval: expected a number"),
    ('[schedular]\nplugin = "fifo"\n', "[schedular]: unknown table"),
    ('[scheduler]\nplugin = "lifo"\n', "[scheduler] plugin: no installed plugin"),
    ('[auth_curve]\nmaster_cert = "nosuch.key_secret"\nworkers_certs = "certs"\n',
     "[auth_curve] master_cert: no such file"),
    ('[coordinator]\nlisten = "udp://x"\n', "[coordinator] listen: expected tcp://"),
    ('[master]\nuser = "no-such-user-here"\n', "[master] user: no such user"),
    ('[master]\ndispatcher_config = "nowhere"\n', "[master] dispatcher_config: "),
    ('[api]\npublic_url = "javascript:alert(1)//x"\n',
     "[api] public_url: an http(s)://host[:port] address"),
    ('[api]\npublic_url = "https://lava.example.org/../x?y#z"\n',
     "[api] public_url: an http(s)://host[:port] address"),
    ('[api]\nmax_connections = 4\n',
     "[api] max_connections: a whole number, at least max_client_connections (32)"),
    ('[storage]\noptions = { busy_timout = 1 }\n', "[storage] options: unknown key busy_timout"),
    ('[storage]\noptions = { busy_timeout = "abc" }\n', "[storage] options busy_timeout: a"),
    ('[storage]\noptions = { synchronous = "NORMAL; DROP" }\n',
     "[storage] options synchronous: one of OFF, NORMAL, FULL, EXTRA"),
    ('[storage]\nbackend = "postgres"\nurl = "postgresql://x@127.0.0.1/test"\n'
     'options = { pool_sise = 3 }\n', "[storage] options: unknown key pool_sise"),
])
def test_config_command_fails_as_the_master_does(tmp_path, text, what):
    (tmp_path / "etc" / "dispatcher-config").mkdir(parents=True)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    done = run_cli(str(path), "config")
    assert done.returncode == 1
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1
    assert what in done.stderr
    assert done.stderr.strip() == _master_error(str(path))


def test_a_libpq_keyword_string_has_its_password_masked(tmp_path):
    path = write_config(tmp_path)
    text = open(path).read().replace(
        '[storage]\nbackend = "sqlite"\nurl = "var/lavacore.db"',
        '[storage]\nbackend = "postgres"\n'
        "url = \"host=db.example dbname=lab user=lab password='hunter 2' sslmode=require\"")
    open(path, "w").write(text)
    done = run_cli(path, "config")
    assert done.returncode == 0, done.stderr
    assert "hunter" not in done.stdout
    assert tomllib.loads(done.stdout)["storage"]["url"] == \
        "host=db.example dbname=lab user=lab password=******** sslmode=require"


def test_shipped_configs_name_only_files_that_exist():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("config.toml", "etc/qemu-lab.toml"):
        config = config_mod.load(os.path.join(root, name))
        assert config_mod.check_files(config) == [], name
        for key, value in config.raw["master"].items():
            if key in ("output_dir",) or not isinstance(value, str) or "://" in value or \
                    not value:
                continue
            assert os.path.exists(config.resolve(value)), (name, key, value)
