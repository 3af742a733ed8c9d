"""What START sends is cached (rendered device configurations, worker files), and the
cache never hides a change: a template or worker file edited on disk is seen once its
mtime is looked at again (STAT_TTL, an injectable clock here), a new file shadowing a
type template is seen, a change through the API applies to the very next START."""

import os
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lavacore import devices
from lavacore.config import load

from apiutil import api_labs
from conftest import write_config


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def lab(tmp_path):
    path = write_config(tmp_path, devices=(("host01", "host", "worker1", ()),))
    config = load(path)
    clock = Clock()
    root = config.resolve(config.master.dispatcher_config)
    with open(os.path.join(root, "device-types", "board.jinja2"), "w") as handle:
        handle.write(BOARD)
    with open(os.path.join(root, "devices", "board01.jinja2"), "w") as handle:
        handle.write("{% extends 'board.jinja2' %}\n{% set board_name = 'board01' %}\n")
    templates = devices.DeviceTemplates(root, None, clock=clock)
    return types.SimpleNamespace(config=config, clock=clock, templates=templates, root=root)


# A device type whose rendering shows its dictionary's variable and a job context key.
BOARD = """device_type: board
board_name: {{ board_name }}
memory: {{ memory|default(512) }}
"""


def _touch_later(path, text):
    """Rewrite ``path`` with a later mtime (a filesystem's clock may be coarse)."""
    before = os.stat(path).st_mtime_ns if os.path.exists(path) else 0
    with open(path, "w") as handle:
        handle.write(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_a_rendering_is_reused_until_its_dictionary_changes_on_disk(lab):
    first = lab.templates.render_text("board01", {})
    assert "board_name: board01" in first
    assert lab.templates.render_text("board01", {}) is first  # the cached text itself
    dictionary = os.path.join(lab.root, "devices", "board01.jinja2")
    _touch_later(dictionary, "{% extends 'board.jinja2' %}\n"
                             "{% set board_name = 'renamed-board' %}\n")
    # Within STAT_TTL the file is not looked at again...
    lab.clock.now += devices.STAT_TTL / 2
    assert lab.templates.render_text("board01", {}) is first
    # ... past it, the change is seen.
    lab.clock.now += devices.STAT_TTL
    again = lab.templates.render_text("board01", {})
    assert "board_name: renamed-board" in again


def test_the_type_template_and_a_file_shadowing_it_invalidate_too(lab):
    first = lab.templates.render_text("board01", {})
    shadow = os.path.join(lab.root, "devices", "board.jinja2")
    assert not os.path.exists(shadow)
    # A devices/board.jinja2 appearing wins over device-types/board.jinja2 (the search
    # order of the template loader), so the cached rendering is stale.
    with open(shadow, "w") as handle:
        handle.write("shadowed: {{ board_name }}\n")
    lab.clock.now += 2 * devices.STAT_TTL
    assert lab.templates.render_text("board01", {}) == "shadowed: board01\n"
    os.unlink(shadow)
    lab.clock.now += 2 * devices.STAT_TTL
    assert lab.templates.render_text("board01", {}) == first
    _touch_later(os.path.join(lab.root, "device-types", "board.jinja2"),
                 BOARD + "extra_key: 42\n")
    lab.clock.now += 2 * devices.STAT_TTL
    assert "extra_key: 42" in lab.templates.render_text("board01", {})


def test_each_context_has_its_own_rendering(lab):
    plain = lab.templates.render_text("board01", {})
    assert "memory: 512" in plain
    assert "memory: 2048" in lab.templates.render_text("board01", {"memory": 2048})
    assert lab.templates.render_text("board01", {}) is plain
    assert len(lab.templates._rendered) == 2
    # A huge context is rendered each time, not kept.
    big = {"k%d" % i: "v" * 100 for i in range(100)}
    lab.templates.render_text("board01", big)
    assert len(lab.templates._rendered) == 2


def test_the_cache_is_bounded(lab, monkeypatch):
    monkeypatch.setattr(devices, "CACHED_RENDERINGS", 3)
    for i in range(10):
        lab.templates.render_text("board01", {"n": i})
    assert len(lab.templates._rendered) == 3
    assert lab.templates._rendered_chars == sum(len(entry[0]) for entry in
                                                lab.templates._rendered.values())


def test_a_broken_edit_fails_the_next_job_instead_of_serving_the_old_one(lab):
    lab.templates.render_text("board01", {})
    _touch_later(os.path.join(lab.root, "devices", "board01.jinja2"),
                 "{% extends 'board.jinja2' %\n")
    lab.clock.now += 2 * devices.STAT_TTL
    with pytest.raises(devices.JobSetupError, match="board01.jinja2"):
        lab.templates.render_text("board01", {})


def test_worker_files_follow_their_files_and_reload(lab, tmp_path):
    config = lab.config
    env_path = config.resolve(config.master.env)
    first = lab.templates.worker_files(config, "worker1")
    assert lab.templates.worker_files(config, "worker1") is first
    _touch_later(env_path, "overrides:\n  LANG: C.UTF-8\n  SITE: lab-b\n")
    lab.clock.now += 2 * devices.STAT_TTL
    dispatcher, env, env_dut = lab.templates.worker_files(config, "worker1")
    assert "lab-b" in env
    # A per-worker file appearing takes precedence over the fallback.
    per_worker = os.path.join(config.resolve(config.master.dispatchers), "worker1")
    os.makedirs(per_worker, exist_ok=True)
    with open(os.path.join(per_worker, "env.yaml"), "w") as handle:
        handle.write("overrides:\n  SITE: worker1-only\n")
    lab.clock.now += 2 * devices.STAT_TTL
    assert "worker1-only" in lab.templates.worker_files(config, "worker1")[1]
    # reload() (SIGHUP, an API change) forgets at once.
    with open(os.path.join(per_worker, "env.yaml"), "w") as handle:
        handle.write("overrides:\n  SITE: at-once\n")
    lab.templates.reload()
    assert "at-once" in lab.templates.worker_files(config, "worker1")[1]


@pytest.fixture
def api(tmp_path):
    yield from api_labs(tmp_path)


def test_a_dictionary_set_through_the_api_applies_to_the_next_start(api):
    lab = api(devices=(("host01", "host", "worker1", ()),))
    admin = lab.rpc("admin")
    before = lab.master.templates.render_text("host01", {})
    assert lab.master.templates.render_text("host01", {}) is before
    admin.scheduler.devices.set_dictionary(
        "host01", "{% extends 'host.jinja2' %}\n{% set shell = '/bin/via-api' %}\n")
    assert "/bin/via-api" in lab.master.templates.render_text("host01", {})
    lab.master.templates.worker_files(lab.master.config, "worker1")
    admin.scheduler.workers.set_env("worker1", "overrides:\n  FROM_API: 'yes'\n")
    assert "FROM_API" in lab.master.templates.worker_files(lab.master.config, "worker1")[1]


# -- dictionaries rendered without compiling them -----------------------------------------

# A type template showing every value a dictionary may set, one it defaults itself, a
# block, and a job context key.
SHOWN = ("a", "b", "c", "memory")
PARENT = """{% set c = c | default('type-default') %}
device_type: board
{% block values %}
{% for shown in [a|default('unset'), b|default('unset'), c, memory|default(512)] %}
- {{ shown | tojson }}
{% endfor %}
{% endblock %}
"""

_strings = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\\"),
                   max_size=6)
_scalars = st.one_of(
    _strings.map(lambda t: "'%s'" % t.replace("'", "")),
    _strings.map(lambda t: '"%s"' % t.replace('"', "")),
    st.integers(-10**6, 10**6).map(str), st.sampled_from(
        ["01", "1_000", "1.5", "-2.5e3", "true", "False", "none", "None", "'a\\nb'",
         "'x' ~ 'y'", "memory * 2", "[1, [2, 3]]", "{'k': 'v'}", "(1, 'two')", "[]",
         "[1, 'x', none,]", "undefined_name", "1/0", "'é'", "'%}'"]))
_names = st.sampled_from(list(SHOWN) + ["true", "loop", "x1"])
_statements = st.one_of(
    st.tuples(_names, _scalars).map(lambda p: "{%% set %s = %s %%}" % p),
    st.tuples(_names, _scalars).map(lambda p: "{%%- set %s=%s -%%}" % p),
    st.sampled_from(["{# a comment #}", "\n", "  ", "text after extends",
                     "{{ a }}", "{% block values %}overridden{% endblock %}",
                     "{% if true %}{% set a = 1 %}{% endif %}", "{% set a, b = 1, 2 %}"]))
_dictionaries = st.tuples(
    st.sampled_from(["", " ", "{% set a = 'before' %}", "\n"]),
    st.sampled_from(["{% extends 'parent.jinja2' %}", "{%- extends \"parent.jinja2\" -%}",
                     "{% extends 'missing.jinja2' %}", ""]),
    st.lists(_statements, max_size=6)).map(lambda p: p[0] + p[1] + "\n".join(p[2]) + "\n")


def _reference(root, hostname, context):
    """What jinja2 makes of the dictionary compiled as it is (the sandbox, the template
    directories), parsed as YAML; or the exception's type."""
    import jinja2
    import jinja2.sandbox
    import yaml

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        loader=jinja2.FileSystemLoader([os.path.join(root, "devices"),
                                        os.path.join(root, "device-types")]),
        trim_blocks=True, autoescape=False)
    try:
        return yaml.safe_load(env.get_template(hostname + ".jinja2").render(**context))
    except Exception as exc:
        return type(exc).__name__


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_dictionaries, memory=st.sampled_from([None, 1024, "big"]))
def test_dictionaries_render_as_jinja2_compiles_them(lab, text, memory):
    """Dictionaries of only an extends and literal sets are rendered without compiling
    them (the commonest form read without even jinja2's parser); whatever the
    dictionary, the configuration is the one jinja2 makes of it compiled, and a
    dictionary jinja2 cannot render fails the job."""
    with open(os.path.join(lab.root, "device-types", "parent.jinja2"), "w") as handle:
        handle.write(PARENT)
    with open(os.path.join(lab.root, "devices", "gen01.jinja2"), "w") as handle:
        handle.write(text)
    context = {} if memory is None else {"memory": memory}
    lab.templates.reload()
    expected = _reference(lab.root, "gen01", context)
    try:
        got = lab.templates.render("gen01", context)
    except devices.JobSetupError as exc:
        assert isinstance(expected, str) or not isinstance(expected, dict), (text, exc)
        return
    assert got == expected, text
    quick = devices.quick_dictionary(text)
    if quick is not None:  # the quick reading agrees with jinja2's parser
        assert quick == devices.simple_dictionary(lab.templates.environment().parse(text))


def test_the_usual_dictionary_is_not_compiled(lab):
    text = ("{% extends 'board.jinja2' %}\n{% set board_name = 'b2' %}\n"
            "{% set connection_command = 'telnet ser2net 7002' %}\n"
            "{% set tags = ['usb', 'hdmi'] %}\n{# rack 4 #}\n")
    with open(os.path.join(lab.root, "devices", "board02.jinja2"), "w") as handle:
        handle.write(text)
    assert devices.quick_dictionary(text) == ("board.jinja2", {
        "board_name": "b2", "connection_command": "telnet ser2net 7002",
        "tags": ["usb", "hdmi"]})
    assert "board_name: b2" in lab.templates.render_text("board02", {})
    compiled = [key[1] for key in lab.templates.environment().cache.keys()]
    assert "board.jinja2" in compiled and "board02.jinja2" not in compiled


@pytest.mark.parametrize("definition, context", [
    ("job_name: plain\nactions: []\n", {}),
    ("job_name: a context\ncontext:\n  memory: 2048\n", {"memory": 2048}),
    ('job_name: escaped\n"con\\x74ext": {arch: arm64}\n', {"arch": "arm64"}),
    ("job_name: says context in a value\nactions: []\n", {}),
    ("- not a mapping\n", {}),
])
def test_the_job_context_read_for_start(definition, context):
    from lavacore.builtin import job_context

    assert job_context(definition) == context
