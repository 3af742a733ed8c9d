"""Untrusted YAML is read within bounds: nesting depth and nodes with aliases expanded.
Texts are let through unwalked only when string counts prove them shallow
(safeyaml.depth_bound); these tests hold the bound to be a true upper bound, and send
the bombs that would crash libyaml's composer or exhaust memory."""

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lavacore import safeyaml


def true_depth(text):
    depth = deepest = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            deepest = max(deepest, depth)
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1
    return deepest


_leaves = st.one_of(st.integers(), st.text(max_size=8), st.booleans(), st.none())
_trees = st.recursive(_leaves, lambda children: st.one_of(
    st.lists(children, max_size=3),
    st.dictionaries(st.text(max_size=4), children, max_size=3)), max_leaves=40)


@settings(max_examples=400, deadline=None)
@given(tree=_trees, flow=st.sampled_from([None, True, False]), indent=st.integers(2, 9),
       width=st.sampled_from([20, 80, 10000]), breaks=st.sampled_from(["\n", "\r", "\r\n"]),
       compact=st.booleans())
def test_the_bound_is_never_below_the_depth(tree, flow, indent, width, breaks, compact):
    text = yaml.safe_dump(tree, default_flow_style=flow, indent=indent, width=width,
                          line_break=breaks, allow_unicode=True)
    if compact:  # "- - - x": nesting on one line, without indentation
        text = text.replace("-\n" + " " * indent + "- ", "- - ")
    try:
        depth = true_depth(text)
    except yaml.YAMLError:
        return
    assert safeyaml.depth_bound(text) >= depth, text


def _block(depth, step):
    return "".join(" " * (step * level) + "k:\n" for level in range(depth)) + \
        " " * (step * depth) + "x\n"


@pytest.mark.parametrize("bomb", [
    "[" * 30000 + "]" * 30000,
    "{a: " * 30000 + "b" + "}" * 30000,
    "- " * 30000 + "x\n",
    "? " * 30000 + "x\n",
    _block(3000, 1),
    _block(3000, 1).replace("\n", "\r"),
    "- " * 15000 + "[" * 15000 + "x" + "]" * 15000 + "\n",
], ids=["flow sequences", "flow mappings", "compact sequences", "complex keys",
        "indented mappings", "indented mappings, CR line breaks", "mixed"])
def test_bombs_are_refused_whatever_the_depth_allowed(bomb):
    for max_depth in (safeyaml.MAX_DEPTH, 1000):
        with pytest.raises(safeyaml.InputError, match="nested more than"):
            safeyaml.load(bomb, max_depth=max_depth)


def test_aliases_are_counted_expanded():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 8):
        refs = ", ".join(["*a%d" % (level - 1)] * 10)
        lines.append("a%d: &a%d [%s]" % (level, level, refs))
    with pytest.raises(safeyaml.InputError, match="aliases are expanded"):
        safeyaml.load("\n".join(lines))


def test_a_usual_configuration_is_read_as_it_is():
    text = ("commands:\n  connect: telnet ser2net 7001\n  power_on: [pdu, on]\n"
            "actions:\n  deploy:\n    methods:\n      tftp: {}\n")
    assert safeyaml.depth_bound(text) <= 1000
    assert safeyaml.load(text, max_depth=1000) == yaml.safe_load(text)
