"""Device configuration: jinja2 device dictionaries extending device-type templates
(spec section 8), and the per-worker dispatcher, env and env-dut files (spec 5.1).

Unlike LAVA, a broken template is never turned into ``None`` and sent as a YAML ``null``
device (quirk 6): it raises :class:`JobSetupError`, which fails only that job.
"""

import dataclasses
import os

import jinja2
import yaml

try:
    _Loader = yaml.CSafeLoader
    _Dumper = yaml.CSafeDumper
except AttributeError:  # pragma: no cover
    _Loader, _Dumper = yaml.SafeLoader, yaml.SafeDumper


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
    return yaml.load(text, Loader=_Loader)


def yaml_dump(data):
    return yaml.dump(data, Dumper=_Dumper, default_flow_style=False, sort_keys=False)


class DeviceTemplates:
    """Renders device dictionaries. Dictionaries and type templates set through the API
    (kept in the database) win over the files under ``dispatcher_config``."""

    def __init__(self, dispatcher_config, storage=None):
        self.root = dispatcher_config
        self.storage = storage
        self._env = None

    def _source(self, name):
        kind, _, base = None, None, name
        if name.endswith(".jinja2"):
            base = name[: -len(".jinja2")]
        for kind, directory in (("device", "devices"), ("device-type", "device-types")):
            if self.storage is not None:
                text = self.storage.get_blob(kind, base)
                if text is not None:
                    return text, None, lambda: False
            path = os.path.join(self.root, directory, name)
            try:
                with open(path, encoding="utf-8") as handle:
                    text = handle.read()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise JobSetupError("cannot read %s: %s" % (path, exc.strerror)) from None
            mtime = os.path.getmtime(path)
            return text, path, lambda p=path, m=mtime: os.path.exists(p) and \
                os.path.getmtime(p) == m
        return None

    def environment(self):
        if self._env is None:
            # cache_size=-1: a lab has more devices than jinja2's default 400 templates,
            # and recompiling a dictionary at every START costs more than keeping it.
            self._env = jinja2.Environment(loader=jinja2.FunctionLoader(self._source),
                                           trim_blocks=True, autoescape=False,
                                           undefined=jinja2.Undefined, cache_size=-1)
        return self._env

    def reload(self):
        """Forget cached templates (SIGHUP, or a dictionary set through the API)."""
        self._env = None

    def dictionary(self, hostname):
        found = self._source(hostname + ".jinja2")
        return found[0] if found else None

    def extends(self, hostname):
        """The device type template a dictionary extends, without ``.jinja2``."""
        text = self.dictionary(hostname)
        if text is None:
            return None
        try:
            ast = self.environment().parse(text)
        except jinja2.TemplateSyntaxError:
            return None
        for node in ast.find_all(jinja2.nodes.Extends):
            if isinstance(node.template, jinja2.nodes.Const):
                return str(node.template.value).rsplit(".jinja2", 1)[0]
        return None

    def render(self, hostname, context=None):
        """The device configuration of ``hostname`` as YAML text, for a job ``context``."""
        where = "device dictionary %s.jinja2" % hostname
        try:
            template = self.environment().get_template(hostname + ".jinja2")
            text = template.render(**(context or {}))
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
        try:
            data = yaml_load(text)
        except yaml.YAMLError as exc:
            raise JobSetupError("%s: rendered YAML is invalid: %s"
                                % (where, " ".join(str(exc).split()))) from None
        if not isinstance(data, dict):
            raise JobSetupError("%s: rendered to %s, not a mapping"
                                % (where, type(data).__name__))
        return data


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
        except yaml.YAMLError as exc:
            raise JobSetupError("cannot open %s %s: invalid YAML: %s"
                                % (what, path, " ".join(str(exc).split()))) from None
        return text
    return ""


def worker_files(config, worker, storage=None):
    """(dispatcher, env, env_dut) texts for ``worker``: per-worker files, then fallbacks
    (spec 5.1). Values set through the API (kept in the database) come first."""
    root = config.resolve(config.master.dispatchers)
    texts = []
    for kind, name, fallback in (
            ("worker-config", "dispatcher.yaml", os.path.join(root, "%s.yaml" % worker)),
            ("worker-env", "env.yaml", config.resolve(config.master.env)),
            ("worker-env-dut", "env.dut.yaml", config.resolve(config.master.env_dut))):
        if storage is not None:
            stored = storage.get_blob(kind, worker)
            if stored is not None:
                texts.append(stored)
                continue
        texts.append(load_optional_yaml([os.path.join(root, worker, name), fallback],
                                        name.replace(".yaml", "")))
    return tuple(texts)


def minimise_configuration(data, parent_hostname):
    """The trimmed device configuration a dynamic connection runs with (spec section 8)."""
    constants = dict(data.get("constants") or {})
    constants["kernel-start-message"] = ""
    actions = data.get("actions") or {}
    return {
        "hostname": parent_hostname,
        "constants": constants,
        "timeouts": data.get("timeouts") or {},
        "actions": {
            "deploy": {"methods": (actions.get("deploy") or {}).get("methods")},
            "boot": {"methods": (actions.get("boot") or {}).get("methods")},
        },
    }
