"""``main.py NAME ARGS``: run the test shell helper NAME (the wrappers on the steps' PATH
call this file with ``python -I -S``; see __init__.py)."""

import os
import sys

# The helpers of each module (the same as its COMMANDS): only the module a call needs is
# imported, since every call of a helper pays for its imports.
SHELL = ("lava-test-case", "lava-test-set", "lava-test-reference", "lava-test-raise",
         "lava-test-event", "lava-background-process-start", "lava-background-process-stop",
         "lava-test-case-attach", "lava-test-run-attach", "lava-test-case-metadata")
MULTINODE = ("lava-self", "lava-role", "lava-group", "lava-send", "lava-wait",
             "lava-wait-all", "lava-sync", "lava-network")
NAMES = SHELL + MULTINODE


def _module(name):
    if __package__ in (None, ""):
        here = os.path.dirname(os.path.abspath(__file__))
        if sys.path[:1] != [here]:
            sys.path.insert(0, here)
        return __import__(name)
    import importlib

    return importlib.import_module("." + name, __package__)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in NAMES:
        sys.stderr.write("usage: main.py HELPER ARGS (HELPER: %s)\n" % ", ".join(NAMES))
        return 2
    name, args = argv[0], argv[1:]
    try:
        if name in SHELL:
            return _module("shellcmds").COMMANDS[name](args)
        return _module("multinode").dispatch(name, args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
