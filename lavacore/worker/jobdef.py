"""What the built-in runner takes from a LAVA job definition: its timeouts, its actions,
the test definitions of its ``test`` actions (inline, or from git: gitdefs.py fetches them
and :func:`complete` reads them) and its MultiNode group, checked before anything runs.

Everything that does not fit raises :class:`JobError` with one line naming the place
(``actions[2].test.definitions[0]``, ``timeouts.job``, a YAML line), because LAVA reports
such a job as a Job error and the person who wrote it has to find the mistake.

Deploy and boot actions: lavacore-run performs only the methods a device type declares as
its own, in the device configuration's own method list::

    actions:
      deploy:
        methods:
          host:
            lavacore-run: true

(the ``host`` type's: the device is the worker host, so there is nothing to deploy or
boot). Any other deploy or boot method, and ``command`` actions, are refused before the
job runs (:func:`check_runnable`), so a job never passes having skipped what it asked for.
"""

import dataclasses
import os
import re

import yaml

from .. import safeyaml

try:
    _Loader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _Loader = yaml.SafeLoader

# LAVA makes timeouts.job mandatory; a job without it still gets a bound here so that the
# runner can never run forever.
DEFAULT_JOB_TIMEOUT = 3600.0
# What LAVA's dispatcher takes for a timeout that gives no duration ({skip: true}, {}).
DEFAULT_TIMEOUT = 30.0
NAME_RE = re.compile(r"^[-_a-zA-Z0-9.]+$")
SHELL_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UNITS = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}
# LAVA's two actions around a test shell: the retry wrapper and the shell itself. Each
# has its own timeout; the test runs until the first of them expires.
TEST_ACTION_NAMES = ("lava-test-retry", "lava-test-shell")
# The key of a device method (actions.deploy.methods.NAME) that makes it lavacore-run's.
RUNNER_KEY = "lavacore-run"
_INLINE_KEYS = ("metadata", "install", "run", "parse", "params")
_INSTALL_KEYS = ("keys", "sources", "deps", "steps", "git-repos")
# skip_install's values; "all" is every one of the others.
SKIP_INSTALL = _INSTALL_KEYS + ("all",)
_GIT_KEYS = ("from", "name", "path", "repository", "revision", "branch", "shallow",
             "history", "parameters", "params", "skip_install", "timeout", "lava-signal")
# LAVA's poll timeout of one MultiNode call when the group sets none.
DEFAULT_MULTINODE_TIMEOUT = 30.0
_METHOD_KEYS = {"deploy": "to", "boot": "method", "command": "name"}


class JobError(ValueError):
    """The job definition is unusable; the text says where and why."""


@dataclasses.dataclass
class Definition:
    name: str       # LAVA's "<index>_<name>", e.g. "0_smoke"
    steps: list
    params: dict
    where: str = ""             # actions[1].test.definitions[0]
    origin: str = "inline"      # or "git"
    skip_install: frozenset = frozenset()
    job_params: dict = dataclasses.field(default_factory=dict)  # override the testdef's
    install: dict = dataclasses.field(default_factory=dict)  # the testdef's, checked
    # from: git (gitdefs.py fetches it, :func:`complete` reads the file)
    repository: str = None
    path: str = None
    revision: str = None
    branch: str = None
    shallow: bool = True
    history: bool = True
    commit: str = None

    @property
    def install_steps(self):
        return [] if "steps" in self.skip_install else list(self.install.get("steps", []))

    def install_list(self, key):
        """keys, sources, deps or git-repos of ``install:``, unless skip_install says not."""
        return [] if key in self.skip_install else list(self.install.get(key, []))


@dataclasses.dataclass
class MultiNode:
    """The lava-multinode block of a sub-job, as the master sends it at START."""
    group: str
    role: str
    roles: dict         # {job id (str): role} of the group's device jobs
    size: int
    timeout: float      # seconds one lava-send/wait/sync may take (the group's timeout)
    coordinator: dict   # {"host": str or None, "port": int} set by the master, or None


@dataclasses.dataclass
class TestAction:
    number: int     # 1-based position in the pipeline, as LAVA numbers it
    timeout: float  # seconds, or None for "whatever the job has left"
    definitions: list
    skip: bool = False  # its timeout has skip: true: on expiry, go on to the next action


@dataclasses.dataclass
class Action:
    number: int     # 1-based position in the pipeline (one per action kind)
    kind: str       # deploy, boot, test or command
    where: str      # actions[2].deploy
    method: str     # deploy: to, boot: method, command: name; '' for tests
    test: TestAction = None


@dataclasses.dataclass
class JobPlan:
    data: dict
    job_name: str
    device_type: str
    job_timeout: float
    actions: list
    multinode: MultiNode = None

    @property
    def definitions(self):
        return [d for test in self.tests for d in test.definitions]

    @property
    def tests(self):
        return [action.test for action in self.actions if action.test is not None]


def duration(value, where):
    """Seconds of a LAVA timeout mapping such as ``{minutes: 5}`` (units may be combined,
    as LAVA's dispatcher adds them up; ``skip`` is allowed; no duration at all is LAVA's
    default of 30 seconds)."""
    if not isinstance(value, dict):
        raise JobError("%s: expected a mapping like {minutes: 5}, got %r" % (where, value))
    total = 0.0
    for key, amount in value.items():
        if key == "skip":
            if not isinstance(amount, bool):
                raise JobError("%s.skip: expected true or false, got %r" % (where, amount))
            continue
        if key not in _UNITS:
            raise JobError("%s: unknown unit %r (use days, hours, minutes or seconds)"
                           % (where, key))
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise JobError("%s.%s: expected a non-negative number, got %r" % (where, key, amount))
        total += amount * _UNITS[key]
    return total or DEFAULT_TIMEOUT


def _yaml_error(exc):
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return "line %d, column %d: %s" % (mark.line + 1, mark.column + 1, problem)
    return " ".join(str(exc).split())


def _step(value, where):
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, dict):
        raise JobError("%s: a step must be a string, got a mapping (a ': ' inside an unquoted "
                       "step makes YAML read it as one; quote the step)" % where)
    raise JobError("%s: a step must be a string, got %r" % (where, value))


def _steps(value, where):
    if value is None:
        return []
    if not isinstance(value, list):
        raise JobError("%s: expected a list of shell lines" % where)
    return [_step(s, "%s[%d]" % (where, i)) for i, s in enumerate(value)]


def _install(block, where):
    """An ``install:`` block, checked: lists of strings (git-repos: of URLs or mappings)."""
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise JobError("%s: expected a mapping (keys, sources, deps, steps, git-repos)"
                       % where)
    checked = {}
    for key, value in block.items():
        here = "%s.%s" % (where, key)
        if key == "git-repos":
            if not isinstance(value, list):
                raise JobError("%s: expected a list of repositories" % here)
            for i, repo in enumerate(value):
                if not isinstance(repo, (str, dict)) or (isinstance(repo, dict) and not
                                                        isinstance(repo.get("url"), str)):
                    raise JobError("%s[%d]: expected a URL or a mapping with 'url'"
                                   % (here, i))
            checked[key] = value
        elif key in _INSTALL_KEYS or (isinstance(key, str) and key.startswith("deps-")):
            checked[key] = _steps(value, here)
        else:
            raise JobError("%s: unknown key %r (an install block has %s)"
                           % (where, key, ", ".join(_INSTALL_KEYS)))
    return checked


def _testdef(repo, where):
    """(steps, install, params) of a test definition (inline, or a git definition's
    file); its keys are checked so that a typo (``stepz:``) is an error, not a definition
    that runs nothing and passes."""
    if not isinstance(repo, dict):
        raise JobError("%s: a test definition needs a mapping here" % where)
    for key in repo:
        if key not in _INLINE_KEYS:
            raise JobError("%s: unknown key %r (a test definition has %s)"
                           % (where, key, ", ".join(_INLINE_KEYS)))
    install = _install(repo.get("install"), where + ".install")
    params = _params(repo.get("params"), where + ".params")
    if "run" not in repo:
        return [], install, params
    run = repo["run"]
    if not isinstance(run, dict):
        raise JobError("%s.run: expected a mapping with 'steps'" % where)
    unknown = [key for key in run if key != "steps"]
    if unknown:
        raise JobError("%s.run: unknown key %r (the only one is 'steps')"
                       % (where, unknown[0]))
    if "steps" not in run:
        raise JobError("%s.run: 'steps' is required" % where)
    return _steps(run["steps"] or [], where + ".run.steps"), install, params


def _params(source, where):
    if source is None:
        return {}
    if not isinstance(source, dict):
        raise JobError("%s: expected a mapping" % where)
    params = {}
    for pname, pvalue in source.items():
        if not isinstance(pname, str) or not SHELL_NAME_RE.match(pname):
            raise JobError("%s: %r is not a valid shell variable name" % (where, pname))
        params[pname] = "" if pvalue is None else str(pvalue)
    return params


def _flag(item, key, default, where):
    value = item.get(key, default)
    if not isinstance(value, bool):
        raise JobError("%s.%s: expected true or false, got %r" % (where, key, value))
    return value


def _definition(item, where, index):
    if not isinstance(item, dict):
        raise JobError("%s: expected a mapping, got %r" % (where, item))
    origin = item.get("from")
    if origin not in ("inline", "git"):
        raise JobError("%s: 'from: %s' is not supported by lavacore-run (only 'from: inline'"
                       " and 'from: git')" % (where, origin))
    name = item.get("name")
    repo = item.get("repository")
    if origin == "inline":
        steps, install, testdef_params = _testdef(repo, where + ".repository")
        metadata = repo.get("metadata") if isinstance(repo.get("metadata"), dict) else {}
        name = name or metadata.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise JobError("%s.name: expected a name of letters, digits, '-', '_' or '.', got %r"
                       % (where, name))
    if name == "lava":
        raise JobError("%s.name: 'lava' is reserved for LAVA's own results" % where)
    skip = item.get("skip_install") or []
    if not isinstance(skip, list) or any(s not in SKIP_INSTALL for s in skip):
        raise JobError("%s.skip_install: expected a list of %s" % (where,
                                                                  ", ".join(SKIP_INSTALL)))
    skip = frozenset(_INSTALL_KEYS if "all" in skip else skip)
    # The job's `parameters` (and `params`, which LAVA reads too) override the
    # definition's own `params` defaults.
    job_params = _params(item.get("parameters"), where + ".parameters")
    job_params.update(_params(item.get("params"), where + ".params"))
    definition = Definition("%d_%s" % (index, name), [], {}, where=where, origin=origin,
                            skip_install=skip, job_params=job_params)
    if origin == "inline":
        definition.steps, definition.install = steps, install
        definition.params = dict(testdef_params, **job_params)
        return definition
    for key in item:
        if key not in _GIT_KEYS:
            raise JobError("%s: unknown key %r (a git definition has %s)"
                           % (where, key, ", ".join(_GIT_KEYS)))
    if not isinstance(repo, str) or not repo.strip():
        raise JobError("%s.repository: expected the git repository's address" % where)
    path = item.get("path")
    if not isinstance(path, str) or not path.strip():
        raise JobError("%s.path: expected the path of the definition's YAML file in the"
                       " repository" % where)
    normal = os.path.normpath(path)
    if os.path.isabs(path) or normal == ".." or normal.startswith("../"):
        raise JobError("%s.path: %r is outside the repository" % (where, path))
    for key in ("revision", "branch"):
        value = item.get(key)
        if value is not None and (not isinstance(value, (str, int)) or isinstance(
                value, bool) or not str(value).strip() or str(value).startswith("-")):
            raise JobError("%s.%s: expected a git %s, got %r" % (where, key, key, value))
    definition.repository = repo.strip()
    definition.path = normal
    definition.revision = None if item.get("revision") is None else str(item["revision"])
    definition.branch = None if item.get("branch") is None else str(item["branch"])
    # LAVA: shallow unless a revision is asked for (a shallow clone may not hold it).
    definition.shallow = definition.revision is None and _flag(item, "shallow", True, where)
    definition.history = _flag(item, "history", True, where)
    return definition


def complete(definition, text):
    """Read a git definition's file (``text``): its steps, install block and params,
    which the job's parameters override. Raises JobError naming the file."""
    where = "%s (%s in %s)" % (definition.where, definition.path, definition.repository)
    try:
        data = safeyaml.load(text)
    except (yaml.YAMLError, ValueError) as exc:
        raise JobError("%s: not valid YAML: %s" % (where, _yaml_error(exc))) from None
    steps, install, params = _testdef(data, where)
    definition.steps, definition.install = steps, install
    definition.params = dict(params, **definition.job_params)
    return definition


def multinode(data):
    """The job's :class:`MultiNode` block, or None when it is not a MultiNode sub-job."""
    protocols = data.get("protocols")
    block = protocols.get("lava-multinode") if isinstance(protocols, dict) else None
    if block is None:
        return None
    where = "protocols.lava-multinode"
    if not isinstance(block, dict):
        raise JobError("%s: expected a mapping" % where)
    group, role = block.get("target_group"), block.get("role")
    if not isinstance(group, str) or not group:
        return None  # a group definition not split into sub-jobs: nothing to join
    if not isinstance(role, str) or not role:
        raise JobError("%s.role: a MultiNode sub-job needs its role" % where)
    roles = block.get("roles")
    roles = ({str(k): str(v) for k, v in roles.items() if isinstance(v, (str, int))}
             if isinstance(roles, dict) else {})
    size = block.get("group_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        size = len(roles) or 1
    timeout = DEFAULT_MULTINODE_TIMEOUT
    if block.get("timeout") is not None:
        timeout = duration(block["timeout"], where + ".timeout")
    coordinator = block.get("coordinator")
    if coordinator is not None:
        port = coordinator.get("port") if isinstance(coordinator, dict) else None
        host = coordinator.get("host") if isinstance(coordinator, dict) else None
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536 or \
                not isinstance(host, (str, type(None))):
            raise JobError("%s.coordinator: expected {host: HOST, port: PORT}" % where)
        coordinator = {"host": host or None, "port": port}
    return MultiNode(group, role, roles, size, timeout, coordinator)


def _timeouts(data, where):
    timeouts = data.get("timeouts")
    if timeouts is None:
        return {}
    if not isinstance(timeouts, dict):
        raise JobError("%s: expected a mapping" % where)
    return timeouts


def _test_timeout(data, device, test, where):
    """(seconds or None, skip) of a test action, by LAVA's precedence: the action's own
    ``timeout``, else ``timeouts.actions.<name>`` (the job's, then the device's), else
    ``timeouts.action`` (the job's, then the device's); for each of the retry wrapper and
    the shell, the first to expire ending the test."""
    own = test.get("timeout")
    if own is not None:
        seconds = duration(own, where + ".timeout")
        return seconds, own.get("skip") is True
    sources = [(_timeouts(data, "timeouts"), "timeouts"),
               (_timeouts(device or {}, "the device's timeouts"), "device timeouts")]
    limits = []
    for name in TEST_ACTION_NAMES:
        found = None
        for timeouts, label in sources:
            named = timeouts.get("actions")
            if isinstance(named, dict) and named.get(name) is not None:
                found = duration(named[name], "%s.actions.%s" % (label, name))
                break
        if found is None:
            for timeouts, label in sources:
                if timeouts.get("action") is not None:
                    found = duration(timeouts["action"], "%s.action" % label)
                    break
        if found is not None:
            limits.append(found)
    return (min(limits) if limits else None), False


def _test(data, device, body, where, number, index):
    if not isinstance(body, dict):
        raise JobError("%s: expected a mapping" % where)
    if body.get("definitions") is None:
        other = [k for k in ("monitors", "interactive") if k in body]
        raise JobError("%s: %s" % (where, "'%s' tests are not supported by lavacore-run"
                                   % other[0] if other else "no 'definitions'"))
    if not isinstance(body["definitions"], list):
        raise JobError("%s.definitions: expected a list" % where)
    definitions = [_definition(item, "%s.definitions[%d]" % (where, i), index + i)
                   for i, item in enumerate(body["definitions"])]
    seconds, skip = _test_timeout(data, device, body, where)
    return TestAction(number, seconds, definitions, skip)


def load(text, device=None):
    """Parse and check a job definition; return its :class:`JobPlan`. ``device`` is the
    device configuration (a dict), whose timeouts the job's override."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise JobError("job definition is not valid YAML: %s" % _yaml_error(exc)) from None
    if not isinstance(data, dict):
        raise JobError("job definition must be a YAML mapping, got %s" % type(data).__name__)
    timeouts = _timeouts(data, "timeouts")
    job_timeout = DEFAULT_JOB_TIMEOUT
    if timeouts.get("job") is not None:
        job_timeout = duration(timeouts["job"], "timeouts.job")
    items = data.get("actions")
    if not isinstance(items, list) or not items:
        raise JobError("actions: expected a non-empty list of actions")
    actions, index = [], 0
    for position, item in enumerate(items):
        if not isinstance(item, dict) or not item:
            raise JobError("actions[%d]: expected a mapping like {deploy: {...}}" % position)
        for kind, body in item.items():
            where = "actions[%d].%s" % (position, kind)
            number = len(actions) + 1
            if kind == "test":
                test = _test(data, device, body, where, number, index)
                index += len(test.definitions)
                actions.append(Action(number, kind, where, "", test))
                continue
            if kind not in _METHOD_KEYS:
                raise JobError("%s: unknown action type (deploy, boot, test or command)"
                               % where)
            if not isinstance(body, dict):
                raise JobError("%s: expected a mapping" % where)
            method = body.get(_METHOD_KEYS[kind])
            if not isinstance(method, str) or not method:
                raise JobError("%s: '%s' is required" % (where, _METHOD_KEYS[kind]))
            actions.append(Action(number, kind, where, method))
    return JobPlan(data=data, job_name=str(data.get("job_name") or ""),
                   device_type=str(data.get("device_type") or ""), job_timeout=job_timeout,
                   actions=actions, multinode=multinode(data))


def own_methods(device, kind):
    """The ``kind`` (deploy or boot) methods the device type declares as lavacore-run's."""
    actions = device.get("actions")
    block = actions.get(kind) if isinstance(actions, dict) else None
    methods = block.get("methods") if isinstance(block, dict) else None
    if not isinstance(methods, dict):
        return set()
    return {name for name, settings in methods.items()
            if isinstance(settings, dict) and settings.get(RUNNER_KEY) is True}


def check_runnable(plan, device):
    """Raise JobError naming the first action lavacore-run cannot perform on ``device``."""
    device_type = device.get("device_type") or plan.device_type or "?"
    for action in plan.actions:
        if action.kind == "test":
            continue
        if action.kind == "command":
            raise JobError("%s: lavacore-run cannot run command %r (device commands need"
                           " LAVA's lava-run)" % (action.where, action.method))
        own = own_methods(device, action.kind)
        if action.method not in own:
            verb = "deploy to" if action.kind == "deploy" else "boot with"
            declared = (" (its own %s methods: %s)" % (action.kind, ", ".join(sorted(own)))
                        if own else "")
            raise JobError("%s: lavacore-run cannot %s %r: device type %s does not declare"
                           " it as lavacore-run's own%s" % (action.where, verb, action.method,
                                                            device_type, declared))
