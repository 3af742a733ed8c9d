"""LAVA's job format, checked as LAVA 2020.05 checks a submission, with voluptuous.

The rules are those of LAVA's submission check (what its ``scheduler.jobs.submit``
refuses), plus the MultiNode rules its split enforces by failing. Everything LAVA 2020.05
accepts and can run is accepted. On purpose, and marked ``[beyond LAVA]`` below, a few
jobs LAVA takes are refused because its dispatcher then fails them on the worker or
silently does less than they say: inline definitions without a metadata name, with a
``run`` that has no ``steps`` (``stepz:``) or steps that are not strings; definition
names the dispatcher refuses; ``from`` other than git, inline, tar or url, or a
repository of the wrong kind for it; negative timeouts; no actions at all, or an empty
action; MultiNode actions naming a role the group does not have; ``essential`` that is
not true or false. And one key LAVA 2020.05's check forgot is taken: ``wait_for_prompt``
in interactive scripts, which its dispatcher reads (LAVA accepts it from 2020.09).

Each refusal is one line naming the YAML line and the place in the job
(``line 12: actions[2].deploy: 'to' is required``): voluptuous reports a path of keys
and list indices, which :func:`locate` follows through the YAML node tree.

``strict`` (``scheduler.jobs.validate(definition, True)``, as lavacli's ``--strict``) adds
the checks LAVA's own validate call makes on top of submission: action and global
timeouts no longer than the job's, namespaces on every action or none, no ``device_type``
or ``environment`` beside MultiNode, and deploy/boot methods LAVA 2020.05 knows.
"""

import difflib
import functools
import re

import voluptuous as vol
import yaml

# Variables a job may pass to its device template through ``context`` (LAVA 2020.05's
# list; a lab adds its own with ``[jobs] extra_context_variables`` in config.toml).
CONTEXT_VARIABLES = frozenset((
    # qemu
    "arch", "boot_console", "boot_root", "cpu", "extra_options", "guestfs_driveid",
    "guestfs_interface", "guestfs_size", "machine", "memory", "model", "monitor",
    "netdevice", "no_kvm", "serial", "vga",
    # u-boot load addresses
    "booti_dtb_addr", "booti_kernel_addr", "booti_ramdisk_addr", "bootm_dtb_addr",
    "bootm_kernel_addr", "bootm_ramdisk_addr", "bootz_dtb_addr", "bootz_kernel_addr",
    "bootz_ramdisk_addr",
    # bootloaders, kernels and consoles
    "boot_character_delay", "bootloader_prompt", "console_device", "custom_kernel_args",
    "extra_kernel_args", "extra_nfsroot_args", "kernel_loglevel", "kernel_start_message",
    "lava_test_results_dir", "menu_interrupt_prompt", "mustang_menu_list",
    "test_character_delay", "tftp_mac_address", "uboot_extra_error_message",
    "uboot_needs_interrupt",
))

TOP_LEVEL_KEYS = ("job_name", "device_type", "priority", "visibility", "timeouts",
                  "actions", "protocols", "context", "metadata", "secrets", "environment",
                  "tags", "notify", "reboot_to_fastboot")
ACTION_KINDS = ("deploy", "boot", "test", "command")
UNITS = ("days", "hours", "minutes", "seconds")
# What the dispatcher can fetch a test definition from.
ORIGINS = ("git", "inline", "tar", "url")

# LAVA 2020.05's deploy and boot methods (its per-method schemas), for strict checks;
# "host" is lavacore-run's. Compared with '-' and '_' made equal, as LAVA does.
DEPLOY_METHODS = frozenset((
    "docker", "download", "downloads", "fastboot", "flasher", "fvp", "iso-installer",
    "lxc", "mps", "musca", "nbd", "nfs", "overlay", "recovery", "sata", "ssh", "tftp",
    "tmpfs", "u-boot-ums", "usb", "uuu", "vemsd", "host"))
BOOT_METHODS = frozenset((
    "barebox", "bootloader", "cmsis-dap", "depthcharge", "dfu", "docker", "fastboot",
    "fvp", "gdb", "grub", "grub-efi", "ipxe", "jlink", "kexec", "lxc", "minimal",
    "monitor", "musca", "new-connection", "openocd", "pyocd", "qemu", "qemu-iso",
    "qemu-nfs", "recovery", "schroot", "ssh", "u-boot", "uefi", "uefi-menu", "uuu",
    "host"))

# Names of test definitions (the dispatcher refuses others), and the stricter names of
# interactive and monitor tests (LAVA's submission check).
DEFINITION_NAME = re.compile(r"^[-_a-zA-Z0-9.]+$")
TEST_NAME = re.compile(r"^[-_a-zA-Z0-9]+$")
ACTION_NAME = re.compile(r"^[a-z-]+$")
VLAN_NAME = re.compile(r"^[_a-zA-Z0-9]+$")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")

# voluptuous's own messages, in the words used everywhere else in lavacore.
_MESSAGES = {
    "expected str": "expected a string",
    "expected int": "expected a whole number",
    "expected bool": "expected true or false",
    "expected dict": "expected a mapping",
    "expected a dictionary": "expected a mapping",
    "expected list": "expected a list",
    "expected a list": "expected a list",
}


class SchemaError(ValueError):
    """A definition that breaks a rule; ``path`` is where (``actions[2].deploy``)."""

    def __init__(self, message, path=""):
        super().__init__(message)
        self.path = path


# -- small validators ---------------------------------------------------------------------

def _fail(message, *path):
    raise vol.Invalid(message, path=list(path))


def whole(value):
    """A non-negative whole number (never a boolean)."""
    if isinstance(value, bool) or not isinstance(value, int):
        _fail("expected a whole number, got %r" % (value,))
    if value < 0:
        _fail("must not be negative, got %d" % value)
    return value


def flag(value):
    if not isinstance(value, bool):
        _fail("expected true or false, got %r" % (value,))
    return value


def text(value):
    if not isinstance(value, str):
        _fail("expected a string, got %s" % _kind(value))
    return value


def strings(value):
    if not isinstance(value, list):
        _fail("expected a list of strings, got %s" % _kind(value))
    for index, item in enumerate(value):
        if not isinstance(item, str):
            _fail("expected a string, got %s" % _kind(item), index)
    return value


def matching(pattern, what, quote=True):
    def check(value):
        if not isinstance(value, str) or not pattern.match(value):
            _fail("%r is not a valid %s" % (value, what) if quote
                  else "not a valid %s" % what)
        return value
    return check


def _kind(value):
    if value is None:
        return "nothing (null)"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "true/false",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def timeout():
    """A LAVA timeout: one of days/hours/minutes/seconds, and ``skip`` (go on to the
    next action when it expires). Without a duration LAVA's dispatcher uses its default
    (30 seconds)."""
    keys = {vol.Exclusive(unit, "unit", msg="use one of days, hours, minutes or seconds,"
                                            " not several"): whole for unit in UNITS}
    keys[vol.Optional("skip")] = flag
    schema = vol.Schema(keys)

    def check(value):
        if not isinstance(value, dict):
            _fail("expected a mapping like {minutes: 5}, got %s" % _kind(value))
        return schema(value)
    return check


def named_timeouts(value):
    """``timeouts: actions:`` or ``connections:``, a map of action names to timeouts."""
    if not isinstance(value, dict):
        _fail("expected a mapping of action names to timeouts, like"
              " {lava-test-shell: {minutes: 5}}")
    check = timeout()
    for name, item in value.items():
        if not isinstance(name, str) or not ACTION_NAME.match(name):
            _fail("not an action name (lower-case letters and '-', like"
                  " lava-test-shell)", name)
        try:
            check(item)
        except vol.Invalid as exc:
            exc.prepend([name])
            raise
    return value


def priority(value):
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 100:
        return value
    if value in ("high", "medium", "low"):
        return value
    _fail("must be 0-100 or low/medium/high, got %r" % (value,))


def context_schema(allowed):
    def check(value):
        if not isinstance(value, dict):
            _fail("expected a mapping of context variables, got %s" % _kind(value))
        for name, item in value.items():
            if name not in allowed:
                _fail("not a context variable a job may set (LAVA's list, plus"
                      " [jobs] extra_context_variables)", name)
            if isinstance(item, list):
                bad = [i for i, v in enumerate(item) if not isinstance(v, (str, int))]
                if bad:
                    _fail("expected a string or a whole number", name, bad[0])
            elif not isinstance(item, (str, int)):
                _fail("expected a string, a whole number or a list of them, got %s"
                      % _kind(item), name)
        return value
    return check


def metadata(value):
    if not isinstance(value, dict):
        _fail("expected a mapping, got %s" % _kind(value))
    for key, item in value.items():
        if not isinstance(key, (str, int)):
            _fail("keys must be strings, got %s" % _kind(key), key)
        if not isinstance(item, (str, int)):
            _fail("values must be strings (or whole numbers), got %s" % _kind(item), key)
    return value


def role_names(value):
    """An action's ``role``: a list of role names (one name alone is taken too)."""
    if isinstance(value, str):
        return value
    return strings(value)


def step(value):
    """One shell line of ``run: steps``."""
    if isinstance(value, str) or (isinstance(value, (int, float))
                                  and not isinstance(value, bool)):
        return value
    if isinstance(value, dict):
        _fail("a step must be a string, got a mapping (': ' inside an unquoted step makes"
              " YAML read it as one: quote the step)")
    _fail("a step must be a string, got %s (quote it)" % _kind(value))


# -- actions ------------------------------------------------------------------------------

def _action_keys():
    return {vol.Optional("timeout"): timeout(), vol.Optional("role"): role_names,
            vol.Optional("namespace"): text, vol.Optional("connection-namespace"): text}


def _auto_login():
    return vol.Schema({
        vol.Required("login_prompt"): text,
        vol.Required("username"): text,
        vol.Optional("password_prompt"): text,
        vol.Optional("password"): text,
        vol.Optional("login_commands"): [text],
    })


def _deploy():
    return vol.Schema({**_action_keys(), vol.Required("to"): text}, extra=vol.ALLOW_EXTRA)


def _boot():
    return vol.Schema({
        **_action_keys(),
        vol.Required("method"): text,
        vol.Optional("auto_login"): _auto_login(),
        vol.Optional("parameters"): {text: vol.Any(str, bool, msg="expected a string or"
                                                              " true/false")},
        vol.Optional("commands"): vol.Any(str, list, msg="expected a command set name or"
                                                          " a list of commands"),
    }, extra=vol.ALLOW_EXTRA)


def _command():
    return vol.Schema({**_action_keys(), vol.Required("name"): text}, extra=vol.ALLOW_EXTRA)


def _inline():
    """An inline test definition (``from: inline``): the dispatcher needs its metadata
    name, and runs ``run: steps`` [beyond LAVA: its submission check lets ``run:
    {stepz: ...}`` through, and the job then runs nothing and passes]."""
    return vol.Schema({
        vol.Required("metadata"): vol.Schema({vol.Required("name"): text},
                                             extra=vol.ALLOW_EXTRA),
        vol.Optional("install"): dict,
        vol.Optional("run"): {vol.Required("steps"): [step]},
        vol.Optional("parse"): dict,
    })


def _definition():
    base = vol.Schema({
        vol.Required("from"): vol.Any(*ORIGINS, msg="must be one of %s"
                                      % ", ".join(ORIGINS)),
        vol.Required("name"): matching(DEFINITION_NAME, "test definition name (letters,"
                                                        " digits, '-', '_' and '.')"),
        vol.Required("path"): text,
        vol.Required("repository"): object,
        vol.Optional("parameters"): dict,
        vol.Optional("timeout"): timeout(),
    }, extra=vol.ALLOW_EXTRA)
    inline = _inline()

    def check(item):
        base(item)
        repository = item["repository"]
        try:
            if item["from"] == "inline":
                if not isinstance(repository, dict):
                    _fail("an inline definition is a mapping (metadata, run: steps...),"
                          " got %s" % _kind(repository))
                inline(repository)
            elif not isinstance(repository, str):
                _fail("expected the %s address as a string, got %s"
                      % (item["from"], _kind(repository)))
        except vol.Invalid as exc:
            exc.prepend(["repository"])
            raise
        if item.get("shallow") is True and "revision" in item:
            _fail("'shallow: true' cannot be used with 'revision' (a shallow clone may"
                  " not hold that revision)", "shallow")
        return item
    return check


def _monitors():
    return vol.Schema({**_action_keys(), vol.Required("monitors"): [vol.Schema({
        vol.Required("name"): matching(TEST_NAME, "monitor name (letters, digits, '-'"
                                                  " and '_')"),
        vol.Required("start"): text,
        vol.Required("end"): text,
        vol.Required("pattern"): text,
        vol.Optional("fixupdict"): dict,
    })]}, extra=vol.ALLOW_EXTRA)


def _interactive():
    name = matching(TEST_NAME, "name (letters, digits, '-' and '_')")
    script = vol.Schema({
        vol.Optional("name"): name,
        vol.Optional("command"): vol.Any(None, str, msg="expected a string"),
        vol.Optional("delay"): whole,
        vol.Optional("lava-send"): text,
        vol.Optional("lava-sync"): text,
        vol.Optional("lava-wait"): text,
        vol.Optional("lava-wait-all"): text,
        vol.Optional("wait_for_prompt"): flag,
        vol.Optional("successes"): [{vol.Required("message"): text}],
        vol.Optional("failures"): [{
            vol.Required("message"): text,
            vol.Optional("exception"): vol.Any(
                "InfrastructureError", "JobError", "TestError",
                msg="must be InfrastructureError, JobError or TestError"),
            vol.Optional("error"): text,
        }],
    })
    return vol.Schema({**_action_keys(), vol.Required("interactive"): [vol.Schema({
        vol.Required("name"): name,
        vol.Required("prompts"): list,
        vol.Optional("echo"): vol.Any("discard", msg="the only echo setting is 'discard'"),
        vol.Required("script"): [script],
    })]}, extra=vol.ALLOW_EXTRA)


def _definitions():
    return vol.Schema({**_action_keys(), vol.Required("definitions"): [_definition()]},
                      extra=vol.ALLOW_EXTRA)


def _test():
    """A test action is one of three kinds; like LAVA, it is valid if one of them takes
    it, and the error reported is that of the kind its keys say it is."""
    kinds = (("definitions", _definitions()), ("monitors", _monitors()),
             ("interactive", _interactive()))

    def check(body):
        if not isinstance(body, dict):
            _fail("expected a mapping, got %s" % _kind(body))
        failures = {}
        for key, schema in kinds:
            try:
                return schema(body)
            except vol.Invalid as exc:
                failures[key] = exc
        for key, _ in kinds:
            if key in body:
                raise failures[key]
        _fail("a test action needs definitions, monitors or interactive")
    return check


def _action():
    schemas = {"deploy": _deploy(), "boot": _boot(), "test": _test(),
               "command": _command()}

    def check(item):
        if not isinstance(item, dict):
            _fail("expected a mapping like {deploy: {...}}, got %s" % _kind(item))
        if not item:
            _fail("an action needs one of deploy, boot, test or command")
        for kind in item:
            if kind not in schemas:
                _fail("unknown action type %r (LAVA's are %s and %s)"
                      % (kind, ", ".join(ACTION_KINDS[:-1]), ACTION_KINDS[-1]), kind)
        for kind, body in item.items():
            if not isinstance(body, dict):
                _fail("expected a mapping, got %s" % _kind(body), kind)
            try:
                schemas[kind](body)
            except vol.Invalid as exc:
                exc.prepend([kind])
                raise
        return item
    return check


# -- protocols and notify -----------------------------------------------------------------

def _protocols(context):
    role = vol.Schema({
        vol.Optional("count"): whole,
        vol.Optional("device_type"): vol.All(text, vol.Length(min=1)),
        vol.Optional("connection"): text,
        vol.Optional("host_role"): text,
        vol.Optional("expect_role"): text,
        vol.Optional("request"): text,
        vol.Optional("tags"): strings,
        vol.Optional("context"): context,
        vol.Optional("timeout"): timeout(),
        vol.Optional("essential"): flag,
    }, extra=vol.ALLOW_EXTRA)
    vlan = matching(VLAN_NAME, "VLAN name (letters, digits and '_')", quote=False)
    return vol.Schema({
        vol.Optional("lava-multinode"): {
            vol.Required("roles"): vol.All({text: role}, vol.Length(
                min=1, msg="a MultiNode job needs at least one role")),
            vol.Optional("timeout"): timeout(),
        },
        vol.Optional("lava-vland"): {text: {vlan: {vol.Optional("tags"): strings}}},
        vol.Optional("lava-lxc"): dict,
        vol.Optional("lava-xnbd"): dict,
    })


def _notify():
    callback = vol.Schema({
        vol.Required("url"): text,
        vol.Optional("method"): vol.Any("GET", "POST", msg="must be GET or POST"),
        vol.Optional("token"): text,
        vol.Optional("dataset"): vol.Any("minimal", "logs", "results", "all",
                                         msg="must be minimal, logs, results or all"),
        vol.Optional("content-type"): vol.Any("json", "urlencoded",
                                              msg="must be json or urlencoded"),
    }, extra=vol.ALLOW_EXTRA)
    return vol.Schema({
        vol.Required("criteria"): vol.Schema({
            vol.Required("status"): vol.Any(
                "running", "complete", "incomplete", "canceled", "finished",
                msg="must be running, complete, incomplete, canceled or finished"),
            vol.Optional("type"): vol.Any("progression", "regression",
                                          msg="must be progression or regression"),
        }, extra=vol.ALLOW_EXTRA),
        vol.Optional("recipients"): [{vol.Required("to"): {
            vol.Required("method"): vol.Any("email", "irc", msg="must be email or irc"),
            vol.Optional("user"): text,
            vol.Optional("email"): text,
            vol.Optional("server"): text,
            vol.Optional("handle"): text,
        }}],
        vol.Exclusive("callback", "callback", msg="use callback or callbacks, not both"):
            callback,
        vol.Exclusive("callbacks", "callback", msg="use callback or callbacks, not both"):
            [callback],
        vol.Optional("verbosity"): vol.Any("verbose", "quiet", "status-only",
                                           msg="must be verbose, quiet or status-only"),
        vol.Optional("compare"): vol.Schema({
            vol.Optional("query"): vol.Any(
                {vol.Required("username"): text, vol.Required("name"): text},
                {vol.Required("entity"): text, vol.Optional("conditions"): dict},
                msg="expected {username, name} or {entity, conditions}"),
            vol.Optional("blacklist"): strings,
        }, extra=vol.ALLOW_EXTRA),
    }, extra=vol.ALLOW_EXTRA)


# -- rules across keys --------------------------------------------------------------------

def _recipients(data):
    notify = data.get("notify") or {}
    for index, recipient in enumerate(notify.get("recipients") or ()):
        to = recipient["to"]
        where = ("notify", "recipients", index, "to")
        if to["method"] == "email":
            if "email" not in to and "user" not in to:
                _fail("an email recipient needs 'email' or 'user'", *where)
            if "email" in to and not EMAIL.match(to["email"]):
                _fail("%r is not an email address" % to["email"], *where, "email")
        elif "handle" not in to and "user" not in to:
            _fail("an irc recipient needs 'handle' or 'user'", *where)


def _secrets(data):
    if "secrets" in data and data["visibility"] == "public":
        _fail("a job with secrets must not be public (use visibility: personal or"
              " group)", "secrets")


def action_roles(body):
    """The role names of an action body, as a list."""
    roles = body.get("role", [])
    return [roles] if isinstance(roles, str) else list(roles)


def _multinode(data):
    block = (data.get("protocols") or {}).get("lava-multinode")
    if block is None:
        if not data.get("device_type"):
            _fail("missing (or add protocols: lava-multinode)", "device_type")
        return
    roles = block["roles"]
    where = ("protocols", "lava-multinode", "roles")
    for name, role in roles.items():
        if "device_type" in role and "connection" in role:
            _fail("a role needs either device_type or connection, not both", *where, name)
        if "device_type" not in role and "connection" not in role:
            _fail("a role needs either device_type or connection (with its host_role)",
                  *where, name)
        if "connection" in role and "host_role" not in role:
            _fail("a connection needs a host_role", *where, name)
        host, expect = role.get("host_role"), role.get("expect_role")
        if host is not None:
            if host not in roles:
                _fail("no role %r in this group" % host, *where, name, "host_role")
            if "device_type" not in roles[host]:
                _fail("host role %r has no device" % host, *where, name, "host_role")
            if roles[host].get("count", 1) != 1:
                _fail("count must be 1 to be a host_role", *where, host)
            if expect is None:
                _fail("'expect_role' is required with 'host_role'", *where, name)
            if expect not in roles:
                _fail("no role %r in this group" % expect, *where, name, "expect_role")
        elif expect is not None:
            _fail("only used with a host_role (a connection waiting for that role)",
                  *where, name, "expect_role")
    used = set()
    for index, item in enumerate(data["actions"]):
        for kind, body in item.items():
            if "role" not in body:
                _fail("'role' is required in a MultiNode job (the roles that run this"
                      " action)", "actions", index, kind)
            for name in action_roles(body):
                if name not in roles:
                    # [beyond LAVA: it leaves such an action out of every sub-job]
                    _fail("no role %r in protocols.lava-multinode.roles" % name,
                          "actions", index, kind, "role")
                used.add(name)
    for name, role in roles.items():
        if role.get("count", 1) > 0 and name not in used:
            _fail("no action has this role (each role needs its actions)", *where, name)
    if not any(role.get("count", 1) > 0 for role in roles.values() if "device_type" in role):
        _fail("at least one role needs a device_type and a count of 1 or more", *where)
    for name, block in (data["protocols"].get("lava-vland") or {}).items():
        if name not in roles:
            _fail("no role %r in protocols.lava-multinode.roles" % name,
                  "protocols", "lava-vland", name)
        if roles[name].get("count", 1) != 1:
            _fail("a role with VLANs must have a count of 1", *where, name)


def _duration(value):
    return sum(value.get(unit, 0) * seconds for unit, seconds in
               zip(UNITS, (86400, 3600, 60, 1))) or 30


def _strict(data):
    """The checks LAVA's validate call adds to those of submission."""
    timeouts = data["timeouts"]
    job = _duration(timeouts["job"])
    for key in ("action", "connection"):
        if key in timeouts and _duration(timeouts[key]) > job:
            _fail("longer than the job timeout", "timeouts", key)
    for key in ("actions", "connections"):
        for name, value in (timeouts.get(key) or {}).items():
            if _duration(value) > job:
                _fail("longer than the job timeout", "timeouts", key, name)
    namespaces = 0
    count = 0
    for index, item in enumerate(data["actions"]):
        for kind, body in item.items():
            count += 1
            namespaces += "namespace" in body
            if "timeout" in body and _duration(body["timeout"]) > job:
                _fail("longer than the job timeout", "actions", index, kind, "timeout")
            method, known = {"deploy": ("to", DEPLOY_METHODS),
                             "boot": ("method", BOOT_METHODS)}.get(kind, (None, None))
            if method and body[method].replace("_", "-") not in known:
                _fail("%r is not a %s method of LAVA 2020.05" % (body[method], kind),
                      "actions", index, kind, method)
    if namespaces and namespaces != count:
        _fail("when one action has a namespace, every action needs one", "actions")
    if "lava-multinode" in (data.get("protocols") or {}):
        for key in ("device_type", "environment"):
            if key in data:
                _fail("not used in a MultiNode job (each role has its own)", key)


# -- the job --------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def job_schema(extra_context=(), strict=False):
    """The voluptuous schema of a job (built once per set of extra context variables)."""
    context = context_schema(CONTEXT_VARIABLES | set(extra_context))
    checks = [_multinode, _secrets, _recipients] + ([_strict] if strict else [])
    return vol.Schema(vol.All({
        vol.Required("job_name"): vol.All(text, vol.Length(
            min=1, max=200, msg="must be 1 to 200 characters")),
        vol.Optional("device_type"): vol.All(text, vol.Length(min=1, max=200)),
        vol.Optional("priority"): priority,
        vol.Required("visibility"): vol.Any(
            "public", "personal", {vol.Required("group"): vol.All(strings, vol.Length(
                min=1))}, msg="must be public, personal or {group: [names]}"),
        vol.Required("timeouts"): {
            vol.Required("job"): timeout(),
            vol.Optional("action"): timeout(),
            vol.Optional("connection"): timeout(),
            vol.Optional("actions"): named_timeouts,
            vol.Optional("connections"): named_timeouts,
        },
        # [beyond LAVA: an empty list of actions is refused, it takes any list]
        vol.Required("actions"): vol.All([_action()], vol.Length(
            min=1, msg="a job needs at least one action")),
        vol.Optional("protocols"): _protocols(context),
        vol.Optional("context"): context,
        vol.Optional("metadata"): metadata,
        vol.Optional("secrets"): dict,
        vol.Optional("environment"): dict,
        vol.Optional("tags"): strings,
        vol.Optional("notify"): _notify(),
        vol.Optional("reboot_to_fastboot"): flag,
    }, *[_rule(check) for check in checks]))


def _rule(check):
    def run(data):
        check(data)
        return data
    return run


# -- errors with their YAML line ------------------------------------------------------

def format_path(path):
    out = ""
    for item in path:
        if isinstance(item, int) and not isinstance(item, bool):
            out += "[%d]" % item
        else:
            out += ("." if out else "") + str(item)
    return out


def locate(node, path):
    """The 1-based line of ``path`` in the YAML node tree (that of the nearest existing
    parent when the path ends at a key that is missing)."""
    line = node.start_mark.line + 1 if node is not None else 1
    for item in path:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(item):
                    line, node = key.start_mark.line + 1, value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(item, int) \
                and 0 <= item < len(node.value):
            node = node.value[item]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _clean(path):
    # Required/Optional/Exclusive keys show up in voluptuous paths as marker objects.
    path = [p.schema if isinstance(p, vol.Marker) else p for p in path]
    return [p for p in path if isinstance(p, (str, int)) and not isinstance(p, bool)]


def _describe(error, errors, node):
    """(line, path text, message) of one voluptuous error."""
    path = _clean(error.path)
    message = _MESSAGES.get(error.msg, error.msg)
    if isinstance(error, vol.RequiredFieldInvalid) and path:
        parent, key = path[:-1], path[-1]
        line = locate(node, parent)
        found = [_clean(e.path)[-1] for e in errors if e.msg == "extra keys not allowed"
                 and _clean(e.path)[:-1] == parent]
        close = difflib.get_close_matches(str(key), [str(f) for f in found], 1)
        hint = " (is %r a misspelling?)" % close[0] if close else ""
        if not parent:
            if close:
                return locate(node, [close[0]]), str(key), "missing (%s)" % hint[2:-1]
            need = "a LAVA job needs job_name, visibility, timeouts and actions"
            return line, str(key), "missing (%s)" % need
        return line, format_path(parent), "'%s' is required%s" % (key, hint)
    if error.msg == "extra keys not allowed" and path:
        parent, key = path[:-1], path[-1]
        line = locate(node, path)
        if not parent:
            close = difflib.get_close_matches(str(key), TOP_LEVEL_KEYS, 1)
            hint = " (did you mean %r?)" % close[0] if close else ""
            return line, str(key), "not a key of a LAVA job%s" % hint
        return line, format_path(parent), "unknown key %r" % (key,)
    if isinstance(error, vol.ExclusiveInvalid):
        path = path[:-1]
    return locate(node, path), format_path(path), message


def check(data, node=None, extra_context=(), strict=False):
    """Check a parsed job (``node`` its YAML node tree, for line numbers); raises
    SchemaError with the first problem in the file."""
    try:
        job_schema(tuple(sorted(extra_context)), bool(strict))(data)
    except vol.MultipleInvalid as exc:
        errors = exc.errors
    except vol.Invalid as exc:
        errors = [exc]
    else:
        return
    described = [_describe(error, errors, node) for error in errors]
    line, where, message = min(described, key=lambda d: d[0])
    raise SchemaError("line %d: %s: %s" % (line, where, message) if where
                      else "line %d: %s" % (line, message), where)
