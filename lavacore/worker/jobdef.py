"""What the built-in runner takes from a LAVA job definition: its timeouts and the inline
test definitions of its ``test`` actions, checked before anything runs.

Everything that does not fit raises :class:`JobError` with one line naming the place
(``actions[2].test.definitions[0]``, ``timeouts.job``, a YAML line), because LAVA reports
such a job as a Job error and the person who wrote it has to find the mistake.
"""

import dataclasses
import re

import yaml

try:
    _Loader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _Loader = yaml.SafeLoader

# LAVA makes timeouts.job mandatory; a job without it still gets a bound here so that the
# runner can never run forever.
DEFAULT_JOB_TIMEOUT = 3600.0
NAME_RE = re.compile(r"^[-_a-zA-Z0-9.]+$")
SHELL_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UNITS = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}
# Names under timeouts.actions that mean "the test shell" in LAVA jobs.
_TEST_ACTION_NAMES = ("lava-test-shell", "lava-test-retry", "test")


class JobError(ValueError):
    """The job definition is unusable; the text says where and why."""


@dataclasses.dataclass
class Definition:
    name: str       # LAVA's "<index>_<name>", e.g. "0_smoke"
    steps: list
    params: dict


@dataclasses.dataclass
class TestAction:
    number: int     # 1-based position in `actions`, as LAVA numbers its pipeline
    timeout: float  # seconds, or None for "whatever the job has left"
    definitions: list


@dataclasses.dataclass
class JobPlan:
    data: dict
    job_name: str
    device_type: str
    job_timeout: float
    tests: list
    skipped: list   # (number, action name) of actions this runner does not run


def duration(value, where):
    """Seconds of a LAVA timeout mapping such as ``{minutes: 5}`` (keys may be combined)."""
    if not isinstance(value, dict) or not value:
        raise JobError("%s: expected a mapping like {minutes: 5}, got %r" % (where, value))
    total = 0.0
    for key, amount in value.items():
        if key not in _UNITS:
            raise JobError("%s: unknown unit %r (use days, hours, minutes or seconds)"
                           % (where, key))
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise JobError("%s.%s: expected a non-negative number, got %r" % (where, key, amount))
        total += amount * _UNITS[key]
    if total <= 0:
        raise JobError("%s: the timeout must be longer than 0 seconds" % where)
    return total


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


def _definition(item, where, index):
    if not isinstance(item, dict):
        raise JobError("%s: expected a mapping, got %r" % (where, item))
    origin = item.get("from")
    if origin != "inline":
        raise JobError("%s: 'from: %s' is not supported by lavacore-run (only 'from: inline')"
                       % (where, origin))
    repo = item.get("repository")
    if not isinstance(repo, dict):
        raise JobError("%s.repository: an inline definition needs a mapping here" % where)
    metadata = repo.get("metadata") if isinstance(repo.get("metadata"), dict) else {}
    name = item.get("name") or metadata.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise JobError("%s.name: expected a name of letters, digits, '-', '_' or '.', got %r"
                       % (where, name))
    run = repo.get("run") or {}
    if not isinstance(run, dict):
        raise JobError("%s.repository.run: expected a mapping with 'steps'" % where)
    steps = run.get("steps") or []
    if not isinstance(steps, list):
        raise JobError("%s.repository.run.steps: expected a list of shell lines" % where)
    steps = [_step(s, "%s.repository.run.steps[%d]" % (where, i)) for i, s in enumerate(steps)]
    # The definition's `params` are defaults; the job's `parameters` override them (LAVA).
    params = {}
    for key, source in (("repository.params", repo.get("params")),
                        ("parameters", item.get("parameters"))):
        if source is None:
            continue
        if not isinstance(source, dict):
            raise JobError("%s.%s: expected a mapping" % (where, key))
        for pname, pvalue in source.items():
            if not isinstance(pname, str) or not SHELL_NAME_RE.match(pname):
                raise JobError("%s.%s: %r is not a valid shell variable name"
                               % (where, key, pname))
            params[pname] = "" if pvalue is None else str(pvalue)
    return Definition("%d_%s" % (index, name), steps, params)


def _action_timeout(data, test, where):
    if test.get("timeout") is not None:
        return duration(test["timeout"], where + ".timeout")
    timeouts = data.get("timeouts") or {}
    per_name = timeouts.get("actions") or {}
    if isinstance(per_name, dict):
        for name in _TEST_ACTION_NAMES:
            if per_name.get(name) is not None:
                return duration(per_name[name], "timeouts.actions.%s" % name)
    if timeouts.get("action") is not None:
        return duration(timeouts["action"], "timeouts.action")
    return None


def load(text):
    """Parse and check a job definition; return its :class:`JobPlan`."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise JobError("job definition is not valid YAML: %s" % _yaml_error(exc)) from None
    if not isinstance(data, dict):
        raise JobError("job definition must be a YAML mapping, got %s" % type(data).__name__)
    timeouts = data.get("timeouts")
    if timeouts is not None and not isinstance(timeouts, dict):
        raise JobError("timeouts: expected a mapping")
    timeouts = timeouts or {}
    job_timeout = DEFAULT_JOB_TIMEOUT
    if timeouts.get("job") is not None:
        job_timeout = duration(timeouts["job"], "timeouts.job")
    actions = data.get("actions")
    if not isinstance(actions, list) or not actions:
        raise JobError("actions: expected a non-empty list of actions")
    tests, skipped, index = [], [], 0
    for number, action in enumerate(actions, 1):
        where = "actions[%d]" % (number - 1)
        if not isinstance(action, dict) or len(action) != 1:
            raise JobError("%s: expected a mapping with one key (deploy, boot, test...)" % where)
        (kind, body), = action.items()
        if kind != "test":
            skipped.append((number, str(kind)))
            continue
        where += ".test"
        if not isinstance(body, dict):
            raise JobError("%s: expected a mapping" % where)
        if body.get("definitions") is None:
            other = [k for k in ("monitors", "interactive") if k in body]
            raise JobError("%s: %s" % (where, "'%s' tests are not supported by lavacore-run"
                                       % other[0] if other else "no 'definitions'"))
        if not isinstance(body["definitions"], list):
            raise JobError("%s.definitions: expected a list" % where)
        definitions = []
        for i, item in enumerate(body["definitions"]):
            definitions.append(_definition(item, "%s.definitions[%d]" % (where, i), index))
            index += 1
        tests.append(TestAction(number, _action_timeout(data, body, where), definitions))
    return JobPlan(data=data, job_name=str(data.get("job_name") or ""),
                   device_type=str(data.get("device_type") or ""), job_timeout=job_timeout,
                   tests=tests, skipped=skipped)
