"""YAML and JSON from people and peers, read within bounds.

libyaml's composer recurses once per nesting level in C: a job definition or a log line of
100,000 nested ``[`` kills the whole process with a segmentation fault, not an exception.
Aliases are the other trap: ``&a [x, x]`` referenced by ``[*a, *a]`` referenced by ... is a
small text whose tree, once walked (validated, dumped to a worker, converted to JSON), is
exponentially large. So untrusted YAML is first read as an event stream, which libyaml
parses with an explicit stack, counting the depth and the size of the tree with every
alias expanded; only a text within both bounds is composed. JSON decoding recurses in
Python and raises RecursionError, which is turned into the ValueError callers expect.
"""

import json

import yaml

try:
    _Loader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - libyaml is in the wheels we install
    _Loader = yaml.SafeLoader

# LAVA's own job definitions nest about ten levels deep.
MAX_DEPTH = 100
# Nodes of the tree with every alias expanded: a large real job has a few thousand.
MAX_NODES = 1_000_000

_OPEN = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_CLOSE = (yaml.SequenceEndEvent, yaml.MappingEndEvent)


class InputError(ValueError):
    """Input refused before it was built (too deep, too large); the text says why."""


def check(text, max_depth=MAX_DEPTH, max_nodes=MAX_NODES):
    """Raise InputError if the YAML ``text`` nests deeper than ``max_depth`` or expands to
    more than ``max_nodes`` nodes; yaml.YAMLError if it does not parse."""
    if len(text) < max_depth and "*" not in text:
        return  # each level needs a character: too short to be deep, and no aliases
    if "*" not in text and len(text) <= max_nodes and depth_bound(text) <= max_depth:
        return  # no aliases, too few characters for too many nodes, and not too deep
    anchors = {}  # anchor -> nodes of its tree, aliases expanded
    stack = []    # (anchor, nodes counted before it) of each open collection
    nodes = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.ScalarEvent):
            nodes += 1
            if event.anchor is not None:
                anchors[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            nodes += anchors.get(event.anchor, 1)
        elif isinstance(event, _OPEN):
            if len(stack) >= max_depth:
                line = event.start_mark.line + 1 if event.start_mark else "?"
                raise InputError("line %s: nested more than %d levels deep" % (line, max_depth))
            stack.append((event.anchor, nodes))
            nodes += 1
        elif isinstance(event, _CLOSE):
            anchor, before = stack.pop()
            if anchor is not None:
                anchors[anchor] = nodes - before
        else:
            continue
        if nodes > max_nodes:
            raise InputError("more than %d nodes once its aliases are expanded" % max_nodes)


def depth_bound(text):
    """A number no smaller than how deep the YAML ``text`` nests, from string counts
    that cost microseconds (the event walk of :func:`check` costs as much as the
    parse): each ``[`` or ``{`` may open a flow level, wherever it is; block levels
    need indentation or an indicator, two levels per column at most (a sequence may
    share its key's column) and one per indicator (``- - x``), so a line of n
    characters nests at most 3n + 2 levels (other line breaks than newlines only make
    a line longer). Loose: a deep text is always caught, a shallow one with long
    lines is walked."""
    return text.count("[") + text.count("{") + 3 * max(map(len, text.split("\n"))) + 2


def load(text, max_depth=MAX_DEPTH, max_nodes=MAX_NODES):
    """yaml.safe_load (libyaml) of untrusted text, after :func:`check`."""
    check(text, max_depth, max_nodes)
    return yaml.load(text, Loader=_Loader)


def compose(text, max_depth=MAX_DEPTH, max_nodes=MAX_NODES):
    """The node tree of untrusted text (for line numbers), after :func:`check`."""
    check(text, max_depth, max_nodes)
    return yaml.compose(text, Loader=_Loader)


def json_loads(text):
    """json.loads, with a nesting too deep for the decoder raised as a ValueError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise InputError("JSON nested too deep") from None
