"""Summarise a py-spy ``--format raw`` profile (collapsed stacks): the functions with the
most samples, on top of the stack (self) and anywhere on it (total).

    python -m bench.profsum bench/results/profiles/throughput-sqlite.txt [--top 25]
"""

import argparse
import collections
import re
import sys


def load(path):
    stacks = []
    with open(path) as handle:
        for line in handle:
            line = line.rstrip("\n")
            if not line:
                continue
            frames, _, count = line.rpartition(" ")
            try:
                stacks.append((frames.split(";"), int(count)))
            except ValueError:
                continue
    return stacks


def short(frame):
    """'recv_multipart (zmq/sugar/socket.py:123)' -> 'recv_multipart (zmq/sugar/socket.py)'."""
    frame = re.sub(r":\d+\)$", ")", frame)
    frame = re.sub(r"\(/[^)]*?/(site-packages|lib/python3\.\d+|main)/", "(", frame)
    return frame


def summarise(stacks, top=25, idle=("poll", "wait", "switch")):
    total = sum(count for _, count in stacks)
    own = collections.Counter()
    anywhere = collections.Counter()
    for frames, count in stacks:
        names = [short(f) for f in frames]
        own[names[-1]] += count
        for name in set(names):
            anywhere[name] += count
    lines = ["%d samples" % total, "", "self%   function (file)"]
    for name, count in own.most_common(top):
        lines.append("%5.1f   %s" % (100.0 * count / total, name))
    lines += ["", "total%  function (file)"]
    for name, count in anywhere.most_common(top):
        lines.append("%5.1f   %s" % (100.0 * count / total, name))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.profsum")
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    print(summarise(load(args.path), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
