"""Device configuration: jinja2 device dictionaries extending device-type templates
(LAVA's layout), and the per-worker dispatcher, env and env-dut files.

Unlike LAVA, a broken template is never turned into ``None`` and sent as a YAML ``null``
device: it raises :class:`JobSetupError`, which fails only that job.
"""

import collections
import dataclasses
import json
import os
import re
import signal
import threading
import time

import gevent
import jinja2
import jinja2.sandbox
import yaml

from . import safeyaml

try:
    _Dumper = yaml.CSafeDumper
except AttributeError:  # pragma: no cover
    _Dumper = yaml.SafeDumper


class JobSetupError(Exception):
    """The files a job needs could not be prepared; the message says which and why."""


@dataclasses.dataclass
class StartMessage:
    """One START to send: to ``worker``, for ``job_id``, with its five frames as text."""

    worker: str
    job_id: int
    definition: str
    device: str
    dispatcher: str
    env: str
    env_dut: str

    def frames(self):
        return (self.definition, self.device, self.dispatcher, self.env, self.env_dut)

    def files(self):
        """The files LAVA's master keeps in the job output directory (LAVA-1129)."""
        return {"job.yaml": self.definition, "device.yaml": self.device,
                "dispatcher.yaml": self.dispatcher, "env.yaml": self.env,
                "env.dut.yaml": self.env_dut}


def yaml_load(text):
    """YAML of a device configuration, a job or a context: bounded (lavacore.safeyaml)."""
    return safeyaml.load(text)


def yaml_dump(data):
    return yaml.dump(data, Dumper=_Dumper, default_flow_style=False, sort_keys=False)


# Template names are plain file names: no directory, no "..", nothing hidden.
_TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,200}$")
MAX_TEMPLATE = 1024 * 1024        # characters of one dictionary or type template
MAX_OUTPUT = 4 * 1024 * 1024      # characters a rendering may produce
MAX_REPEAT = 1024 * 1024          # length of a string or list made with "*"
MAX_POWER = 4096                  # bits of a number made with "**"
# Levels a rendered configuration may nest (LAVA's nest about eight): far below what
# would crash libyaml's composer (tens of thousands), and loose enough that a usual
# configuration is let through on string counts (safeyaml.depth_bound), unwalked.
MAX_CONFIG_DEPTH = 1000
RENDER_SECONDS = 2.0              # CPU a rendering may take before it is stopped
# Rendered device configurations kept, per (device, job context): at most this many, of
# at most this many characters in all; a context larger than MAX_CACHED_CONTEXT (as JSON)
# is rendered each time.
CACHED_RENDERINGS = 10000
CACHED_CHARACTERS = 64 * 1024 * 1024
MAX_CACHED_CONTEXT = 4096
# A template or worker file edited on disk is seen within this many seconds (its mtime is
# looked at no more often).
STAT_TTL = 1.0


class RenderTimeout(Exception):
    pass


class Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox (no attribute starting with "_", no method that changes
    a list or a dict, ranges of at most 100,000) with the operators that make large
    objects from small texts bounded too. LAVA's templates use plain jinja2 and render
    the same in it."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for count, other in ((left, right), (right, left)):
                if isinstance(other, (str, bytes, list, tuple)) and isinstance(count, int) \
                        and count * len(other) > MAX_REPEAT:
                    raise jinja2.sandbox.SecurityError(
                        "a repetition of more than %d items" % MAX_REPEAT)
            return left * right
        if operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and \
                    right * max(abs(left), 2).bit_length() > MAX_POWER:
                raise jinja2.sandbox.SecurityError("a power of more than %d bits" % MAX_POWER)
            return left ** right
        return super().call_binop(context, operator, left, right)


class _RecordingSandbox(Sandbox):
    """The sandbox, noting the name of every template a rendering loads (extends,
    include, import), so that a cached rendering knows what it depends on."""

    loaded = None

    def _load_template(self, name, globals):
        if self.loaded is not None and isinstance(name, str):
            self.loaded.add(name)
        return super()._load_template(name, globals)


class DeviceTemplates:
    """Renders device dictionaries. Dictionaries and type templates set through the API
    (kept in the database) win over the files under ``dispatcher_config``.

    Anyone allowed to set a dictionary writes template code that the master runs: it
    runs in a sandbox (:class:`Sandbox`), template names cannot leave the two template
    directories, and a rendering is bounded in size and CPU time.

    What START needs is cached: compiled templates, the rendered configuration per
    (device, job context) and each worker's files. A cached value is used while the
    template files it came from keep their mtime (looked at every STAT_TTL seconds at
    most) and until :meth:`reload`, which the master calls on SIGHUP and whenever a
    dictionary, template or worker file is changed through the API, by this process or
    another (the storage's notification channel)."""

    def __init__(self, dispatcher_config, storage=None, clock=time.monotonic):
        self.root = dispatcher_config
        self.storage = storage
        self.clock = clock
        self._env = None
        self._stats = {}                          # path -> (looked at, mtime_ns or None)
        # (hostname, context) -> [text, deps, when the deps were last found unchanged]
        self._rendered = collections.OrderedDict()
        self._rendered_chars = 0
        self._worker_files = {}                   # worker -> [texts, deps, checked]
        self._looked = {}                         # template name -> files its source used
        self._plans = {}                          # dictionary name -> (plan, uptodate)
        self._blobs = None                        # (kind, name) of templates in the database

    def _mtime(self, path):
        """The mtime of ``path`` (None if absent), as seen at most STAT_TTL ago."""
        now = self.clock()
        seen = self._stats.get(path)
        if seen is not None and now - seen[0] < STAT_TTL:
            return seen[1]
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            mtime = None
        if len(self._stats) > 4 * CACHED_RENDERINGS:
            self._stats.clear()
        self._stats[path] = (now, mtime)
        return mtime

    def _fresh(self, deps):
        return all(self._mtime(path) == mtime for path, mtime in deps)

    def _unchanged(self, entry):
        """Whether a cached [value, deps, checked] is still good: its files are looked at
        again once STAT_TTL has passed since they were last found unchanged."""
        now = self.clock()
        if now - entry[2] < STAT_TTL:
            return True
        if self._fresh(entry[1]):
            entry[2] = now
            return True
        return False

    def _source(self, name):
        if not _TEMPLATE_NAME.match(name) or ".." in name:
            return None  # TemplateNotFound: nothing outside the template directories
        kind, _, base = None, None, name
        if name.endswith(".jinja2"):
            base = name[: -len(".jinja2")]
        absent = []  # files looked at before: the template is stale once one appears
        for kind, directory in (("device", "devices"), ("device-type", "device-types")):
            if self.storage is not None and (kind, base) in self._stored():
                text = self.storage.get_blob(kind, base)
                if text is not None:
                    # Kept in the database: changed only through the API, which calls
                    # reload() (in this process, or through the notification channel).
                    self._looked[name] = deps = tuple(absent)
                    return _bounded(text, name), None, lambda d=deps: self._fresh(d)
            path = os.path.join(self.root, directory, name)
            try:
                with open(_open_quietly(path), encoding="utf-8") as handle:
                    text = handle.read(MAX_TEMPLATE + 1)
                    mtime = os.fstat(handle.fileno()).st_mtime_ns
            except FileNotFoundError:
                absent.append((path, None))
                continue
            except (OSError, UnicodeDecodeError) as exc:
                raise JobSetupError("cannot read %s: %s" % (path, getattr(exc, "strerror",
                                                                           None) or exc)) \
                    from None
            self._stats[path] = (self.clock(), mtime)
            self._looked[name] = deps = tuple(absent) + ((path, mtime),)
            return _bounded(text, name), path, lambda d=deps: self._fresh(d)
        return None

    def _stored(self):
        """The (kind, name) of every dictionary and type template kept in the database,
        read once until reload(): a START does not ask the database for each one."""
        if self._blobs is None:
            self._blobs = self.storage.blob_names()
        return self._blobs

    def environment(self):
        if self._env is None:
            # cache_size=-1: a lab has more devices than jinja2's default 400 templates,
            # and recompiling a dictionary at every START costs more than keeping it.
            self._env = _RecordingSandbox(loader=jinja2.FunctionLoader(self._source),
                                          trim_blocks=True, autoescape=False,
                                          undefined=jinja2.Undefined, cache_size=-1)
        return self._env

    def reload(self):
        """Forget cached templates, renderings and worker files (SIGHUP, or a dictionary,
        template or worker file set through the API)."""
        self._env = None
        self._stats.clear()
        self._looked.clear()
        self._plans.clear()
        self._blobs = None
        self._rendered.clear()
        self._rendered_chars = 0
        self._worker_files.clear()

    def check_syntax(self, text):
        """Raise jinja2.TemplateSyntaxError (with its line) if ``text`` does not parse."""
        _bounded(text, "template")
        try:
            self.environment().parse(text)
        except (RecursionError, MemoryError):
            raise jinja2.TemplateSyntaxError("nested too deep", 1) from None

    def dictionary(self, hostname):
        found = self._source(hostname + ".jinja2")
        return found[0] if found else None

    def render_text(self, hostname, context=None):
        """The device configuration of ``hostname`` for a job ``context``, as the YAML
        text START sends; from the cache when nothing it came from changed."""
        context = context or {}
        try:
            key = (hostname, json.dumps(context, sort_keys=True, separators=(",", ":"),
                                        default=repr))
        except (TypeError, ValueError, RecursionError):
            key = None
        if key is not None and len(key[1]) > MAX_CACHED_CONTEXT:
            key = None
        if key is not None:
            found = self._rendered.get(key)
            if found is not None and self._unchanged(found):
                self._rendered.move_to_end(key)
                return found[0]
        env = self.environment()
        env.loaded = loaded = set()
        try:
            text = yaml_dump(self.render(hostname, context))
        finally:
            env.loaded = None
        if key is not None:
            # What it came from: the template files (a template kept in the database
            # changes only through the API, which calls reload()).
            deps = tuple(dep for name in sorted(loaded) for dep in self._looked.get(name, ()))
            old = self._rendered.pop(key, None)
            if old is not None:
                self._rendered_chars -= len(old[0])
            self._rendered[key] = [text, deps, self.clock()]
            self._rendered_chars += len(text)
            while self._rendered and (len(self._rendered) > CACHED_RENDERINGS or
                                      self._rendered_chars > CACHED_CHARACTERS):
                dropped = self._rendered.popitem(last=False)[1][0]
                self._rendered_chars -= len(dropped)
        return text

    def worker_files(self, config, worker):
        """:func:`worker_files` of ``worker``, cached while its files keep their mtime."""
        found = self._worker_files.get(worker)
        if found is not None and self._unchanged(found):
            return found[0]
        paths = worker_file_paths(config, worker)
        texts = worker_files(config, worker, self.storage)
        deps = tuple((path, self._mtime(path)) for group in paths for path in group)
        if len(self._worker_files) >= CACHED_RENDERINGS:
            self._worker_files.clear()
        self._worker_files[worker] = [texts, deps, self.clock()]
        return texts

    def _plan(self, hostname):
        """(type template, values) when the dictionary of ``hostname`` is an extends and
        sets of literal values (nearly every lab's dictionaries): it needs no compiling
        of its own. None for any other dictionary, compiled and rendered as it is."""
        name = hostname + ".jinja2"
        found = self._plans.get(name)
        if found is not None and found[1]():
            return found[0]
        source = self._source(name)
        if source is None:
            return None  # not found: the compiling path says so
        plan = quick_dictionary(source[0])
        if plan is None:
            try:
                plan = simple_dictionary(self.environment().parse(source[0]))
            except (jinja2.TemplateSyntaxError, RecursionError, MemoryError):
                plan = None  # the compiling path reports it with its line
        if len(self._plans) >= CACHED_RENDERINGS:
            self._plans.clear()
        self._plans[name] = (plan, source[2])
        return plan

    def render(self, hostname, context=None):
        """The device configuration of ``hostname`` (a dict), for a job ``context``."""
        where = "device dictionary %s.jinja2" % hostname
        try:
            plan = self._plan(hostname)
            if plan is not None:
                # extends + literal sets: the type template rendered with the
                # dictionary's values over the job's context, as jinja2 would after
                # compiling the dictionary (its top-level sets shadow the context).
                parent, values = plan
                env = self.environment()
                if env.loaded is not None:
                    env.loaded.add(hostname + ".jinja2")
                text = _render(env.get_template(parent), dict(context or {}, **values))
            else:
                template = self.environment().get_template(hostname + ".jinja2")
                text = _render(template, context or {})
        except jinja2.TemplateNotFound as exc:
            if exc.name == hostname + ".jinja2":
                raise JobSetupError("%s: not found under %s/devices"
                                    % (where, self.root)) from None
            raise JobSetupError("%s: template %s not found" % (where, exc.name)) from None
        except jinja2.TemplateSyntaxError as exc:
            raise JobSetupError("%s: %s line %s: %s" % (where, exc.name or "template",
                                                        exc.lineno, exc.message)) from None
        except jinja2.TemplateError as exc:
            raise JobSetupError("%s: %s" % (where, exc)) from None
        except TypeError as exc:  # context keys that are not valid keyword names
            raise JobSetupError("%s: bad job context: %s" % (where, exc)) from None
        except RenderTimeout:
            raise JobSetupError("%s: rendering took more than %g s of CPU; stopped"
                                % (where, RENDER_SECONDS)) from None
        except (RecursionError, MemoryError, OverflowError, ValueError, ArithmeticError) \
                as exc:
            raise JobSetupError("%s: %s: %s" % (where, type(exc).__name__, exc)) from None
        try:
            data = safeyaml.load(text, max_depth=MAX_CONFIG_DEPTH)
        except (yaml.YAMLError, safeyaml.InputError) as exc:
            raise JobSetupError("%s: rendered YAML is invalid: %s"
                                % (where, " ".join(str(exc).split()))) from None
        if not isinstance(data, dict):
            raise JobSetupError("%s: rendered to %s, not a mapping"
                                % (where, type(data).__name__))
        return data


_LITERALS = (str, int, float, bool, type(None))


def _literal(node, depth=0):
    if depth > 32:
        return False
    if isinstance(node, jinja2.nodes.Const):
        return isinstance(node.value, _LITERALS)
    if isinstance(node, (jinja2.nodes.Neg, jinja2.nodes.Pos)):
        return isinstance(node.node, jinja2.nodes.Const) and \
            type(node.node.value) in (int, float)
    if isinstance(node, (jinja2.nodes.List, jinja2.nodes.Tuple)):
        return all(_literal(item, depth + 1) for item in node.items)
    if isinstance(node, jinja2.nodes.Dict):
        return all(_literal(pair.key, depth + 1) and _literal(pair.value, depth + 1)
                   for pair in node.items)
    return False


def simple_dictionary(ast):
    """(parent template name, {name: value}) of a parsed dictionary made only of one
    ``{% extends 'CONST' %}``, ``{% set NAME = LITERAL %}`` and, after the extends, plain
    text (which jinja2 never outputs there); None for anything else."""
    parent, values = None, {}
    for node in ast.body:
        if isinstance(node, jinja2.nodes.Extends) and parent is None and \
                isinstance(node.template, jinja2.nodes.Const) and \
                isinstance(node.template.value, str):
            parent = node.template.value
        elif isinstance(node, jinja2.nodes.Assign) and \
                isinstance(node.target, jinja2.nodes.Name) and _literal(node.node):
            try:
                values[node.target.name] = node.node.as_const()
            except (TypeError, ValueError, jinja2.nodes.Impossible):
                return None  # a list as a dict key: let jinja2 say so
        elif isinstance(node, jinja2.nodes.Output) and parent is not None and all(
                isinstance(part, jinja2.nodes.TemplateData) for part in node.nodes):
            continue
        else:
            return None
    return None if parent is None else (parent, values)


# The commonest dictionaries, read without jinja2's parser (written in Python, it costs
# more than the rendering): an extends first, then sets of a string without escapes, an
# integer, a boolean, none, or a flat list of those, and comments. Anything else goes to
# jinja2's parser (simple_dictionary); both give the same plan for what both read.
_SCALAR = r"""'[^'\\\r\n]*'|"[^"\\\r\n]*"|-?(?:0|[1-9][0-9]*)(?![0-9_.eE])|(?:true|false|none|True|False|None)\b"""
_QUICK_EXTENDS = re.compile(r"""\{%[-+]?\s*extends\s+('[^'\\\r\n]*'|"[^"\\\r\n]*")\s*-?%\}""")
_QUICK_SET = re.compile(
    r"\s*\{%%[-+]?\s*set\s+([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(%s|\[\s*(?:(?:%s)\s*"
    r"(?:,\s*(?:%s)\s*)*,?\s*)?\])\s*-?%%\}" % (_SCALAR, _SCALAR, _SCALAR))
_QUICK_COMMENT = re.compile(r"\s*\{#.*?#\}", re.S)
_QUICK_SCALAR = re.compile(_SCALAR)
_QUICK_CONSTANTS = {"true": True, "false": False, "none": None, "True": True,
                    "False": False, "None": None}
_UNASSIGNABLE = frozenset(_QUICK_CONSTANTS)


def _quick_value(text):
    if text[0] in "'\"":
        return text[1:-1]
    if text in _QUICK_CONSTANTS:
        return _QUICK_CONSTANTS[text]
    return int(text)


def quick_dictionary(text):
    """:func:`simple_dictionary`'s plan of the dictionary ``text`` when it has the
    commonest form (see above); None when it does not (not that it is not simple)."""
    found = _QUICK_EXTENDS.match(text)
    if found is None:
        return None
    parent, values, at, end = found.group(1)[1:-1], {}, found.end(), len(text)
    while at < end:
        found = _QUICK_SET.match(text, at)
        if found is not None:
            name, value = found.group(1), found.group(2)
            if name in _UNASSIGNABLE:
                return None  # jinja2 refuses it: let it say so
            if value[0] == "[":
                values[name] = [_quick_value(item.group(0)) for item in
                                _QUICK_SCALAR.finditer(value, 1)]
            else:
                values[name] = _quick_value(value)
            at = found.end()
            continue
        found = _QUICK_COMMENT.match(text, at)
        if found is not None:
            at = found.end()
            continue
        if text[at:].strip():
            return None
        break
    return parent, values


def _open_quietly(path):
    """A descriptor of ``path`` opened for reading without updating its access time
    where the master may (it owns the file): reading a file changed since it was last
    read is otherwise a journaled write, which waits behind the job files being created
    on the same disk."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOATIME", 0))
    except PermissionError:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _bounded(text, name):
    if len(text) > MAX_TEMPLATE:
        raise jinja2.TemplateSyntaxError("%s is larger than %d characters"
                                         % (name, MAX_TEMPLATE), 1)
    return text


def _render(template, context):
    """template.render(context), stopped past MAX_OUTPUT characters or RENDER_SECONDS
    of CPU. The CPU bound is a timer signal: a loop of the template's own never yields
    to gevent, and the handler interrupts it where Python checks for signals."""
    if threading.current_thread() is not threading.main_thread():
        return _generate(template, context)  # signals reach the main thread only
    me = gevent.getcurrent()
    state = {"active": True}

    def expired(signum, frame):
        if state["active"] and gevent.getcurrent() is me:
            raise RenderTimeout()
        if state["active"]:  # the rendering waits for a template (a database read)
            signal.setitimer(signal.ITIMER_PROF, 0.05)

    previous = signal.signal(signal.SIGPROF, expired)
    signal.setitimer(signal.ITIMER_PROF, RENDER_SECONDS)
    try:
        return _generate(template, context)
    finally:
        state["active"] = False
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def _generate(template, context):
    chunks, size = [], 0
    for chunk in template.generate(**context):
        size += len(chunk)
        if size > MAX_OUTPUT:
            raise jinja2.TemplateRuntimeError("renders more than %d characters" % MAX_OUTPUT)
        chunks.append(chunk)
    return "".join(chunks)


def load_optional_yaml(paths, what):
    """The text of the first existing file of ``paths`` ('' if none exists).

    A file that exists but cannot be read or is not valid YAML raises JobSetupError, so
    the job fails with "cannot open ..." instead of running with a wrong configuration.
    """
    for path in paths:
        if not path:
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as exc:
            raise JobSetupError("cannot open %s %s: %s" % (what, path, exc)) from None
        try:
            yaml_load(text)
        except (yaml.YAMLError, safeyaml.InputError) as exc:
            raise JobSetupError("cannot open %s %s: invalid YAML: %s"
                                % (what, path, " ".join(str(exc).split()))) from None
        return text
    return ""


WORKER_FILES = (("worker-config", "dispatcher.yaml"), ("worker-env", "env.yaml"),
                ("worker-env-dut", "env.dut.yaml"))


def worker_file_paths(config, worker):
    """The files looked at for ``worker``'s dispatcher, env and env-dut, in order."""
    root = config.resolve(config.master.dispatchers)
    fallbacks = (os.path.join(root, "%s.yaml" % worker), config.resolve(config.master.env),
                 config.resolve(config.master.env_dut))
    return [[os.path.join(root, worker, name), fallback]
            for (_, name), fallback in zip(WORKER_FILES, fallbacks)]


def worker_files(config, worker, storage=None):
    """(dispatcher, env, env_dut) texts for ``worker``: per-worker files, then fallbacks
    (LAVA's order). Values set through the API (kept in the database) come first."""
    texts = []
    for (kind, name), paths in zip(WORKER_FILES, worker_file_paths(config, worker)):
        if storage is not None:
            stored = storage.get_blob(kind, worker)
            if stored is not None:
                texts.append(stored)
                continue
        texts.append(load_optional_yaml(paths, name.replace(".yaml", "")))
    return tuple(texts)


def with_artifact_tokens(definition, tokens):
    """``definition`` (YAML text) with each ``headers`` value of a deploy action's
    artifacts that names one of ``tokens`` ({name: value}) replaced by the value, as
    LAVA gives its dispatcher remote artifact tokens."""
    data = yaml_load(definition)
    changed = False

    def replace(artifact):
        nonlocal changed
        headers = artifact.get("headers")
        if "url" in artifact and isinstance(headers, dict):
            for key, value in headers.items():
                if isinstance(value, str) and value in tokens:
                    headers[key] = tokens[value]
                    changed = True

    for action in (data or {}).get("actions") or ():
        deploy = action.get("deploy") if isinstance(action, dict) else None
        if not isinstance(deploy, dict):
            continue
        for value in deploy.values():
            if isinstance(value, dict):
                replace(value)
                for inner in value.values():
                    if isinstance(inner, dict):
                        replace(inner)
    return yaml_dump(data) if changed else definition
