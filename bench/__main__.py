"""``python -m bench``: every scenario, on SQLite and on PostgreSQL (when its storage plugin
is installed and the server answers), written to bench/results/results.md and .json.

    python -m bench                         # all scenarios, full size, every backend
    python -m bench --backend sqlite -s 2 4  # scenarios 2 and 4 on SQLite
    python -m bench --size tiny --out /tmp/r # a quick check that everything runs
    python -m bench --profile                # py-spy profiles of the master too
"""

import argparse
import dataclasses
import os
import shutil
import signal
import sys
import time
import traceback

from . import scenarios as all_scenarios
from .harness import BACKENDS, master_crashes, postgres_problem, raise_fd_limit, row
from .report import machine, write_results

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass
class Context:
    out: str
    profile: bool = False
    verbose: bool = True

    def profile_path(self, label, backend):
        """Where py-spy writes the master's profile of ``label``, or None."""
        if not self.profile:
            return None
        directory = os.path.join(self.out, "profiles")
        os.makedirs(directory, exist_ok=True)
        return os.path.join(directory, "%s-%s.txt" % (label, backend))

    def say(self, text):
        if self.verbose:
            print(text, file=sys.stderr, flush=True)


def select(names):
    if not names:
        return all_scenarios()
    chosen = []
    for name in names:
        for module in all_scenarios():
            if name in (str(module.NUMBER), module.NAME):
                chosen.append(module)
                break
        else:
            raise SystemExit("bench: no scenario %r (choose from %s)" % (
                name, ", ".join("%d/%s" % (m.NUMBER, m.NAME) for m in all_scenarios())))
    return chosen


def run_scenarios(scenarios, backends, size, ctx):
    """Run and return rows; a scenario that fails gives an error row, never a traceback
    that loses the other results."""
    rows = []
    for backend in backends:
        for module in scenarios:
            load = os.getloadavg()[0]
            ctx.say("bench: %d %s (%s, %s; load average %.1f)..."
                    % (module.NUMBER, module.NAME, backend, size, load))
            started = time.monotonic()
            master_crashes()
            try:
                got = module.run(backend, module.SIZES[size], ctx)
            except Exception as exc:
                traceback.print_exc()
                why = "; ".join(master_crashes()) or "%s: %s" % (
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                got = [row(module.NUMBER, module.TITLE, backend, None, "", ok=False,
                           note="not measured: %s" % why)]
            for item in got:
                item.setdefault("size", size)
                # The machine is shared: what else ran shows in the load average.
                item["load"] = [round(load, 2), round(os.getloadavg()[0], 2)]
                ctx.say("  %-48s %12s %-14s %s" % (item["measure"], item["value"],
                                                   item["unit"], _verdict(item)))
            ctx.say("  (%.1f s)" % (time.monotonic() - started))
            rows.extend(got)
    return rows


def _verdict(item):
    return {True: "pass", False: "MISS", None: ""}[item["ok"]]


def merge(rows, meta, out):
    """These rows replace those of the same scenario and backend in out/results.json;
    the others are kept, and the run that made them is said in the metadata."""
    import json

    try:
        with open(os.path.join(out, "results.json")) as handle:
            old = json.load(handle)
    except (OSError, ValueError):
        return rows, meta
    done = {(r["scenario"], r["backend"]) for r in rows}
    previous = old.get("machine", {})
    kept = [dict(r, run=r.get("run") or previous.get("started"))
            for r in old.get("rows", []) if (r["scenario"], r["backend"]) not in done]
    order = {b: i for i, b in enumerate(BACKENDS)}
    merged = sorted(kept + rows, key=lambda r: (order.get(r["backend"], 9), r["scenario"]))
    runs = dict(previous.get("runs") or {previous.get("started"): {
        k: previous.get(k) for k in ("wall_seconds", "size")}})
    runs[meta["started"]] = {k: meta.get(k) for k in ("wall_seconds", "size")}
    meta = dict(meta, backends=sorted({r["backend"] for r in merged}, key=order.get),
                runs={k: v for k, v in runs.items() if any(r["run"] == k for r in merged)})
    return merged, meta


def _interrupted(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("-s", "--scenario", nargs="*", default=[],
                        help="scenario numbers or names (default: all)")
    parser.add_argument("--backend", choices=BACKENDS + ("all",), default="all")
    parser.add_argument("--size", choices=("full", "small", "tiny"), default="full")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="directory for results.md and results.json")
    parser.add_argument("--profile", action="store_true",
                        help="record a py-spy profile of the master in each scenario")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of other scenarios/backends already in --out")
    args = parser.parse_args(argv)
    if args.profile and shutil.which("py-spy") is None:
        parser.error("--profile needs py-spy (pip install py-spy)")
    # SIGTERM (and SIGINT, which a shell's background job ignores) unwind through the
    # scenarios' cleanups, so no master or simulator is left running.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    raise_fd_limit()
    scenarios = select(args.scenario)
    skipped = {}
    if args.backend == "all":
        backends = ["sqlite"]
        problem = postgres_problem()
        if problem is None:
            backends.append("postgres")
        else:
            skipped["postgres"] = problem
            print("bench: PostgreSQL rows skipped: %s" % problem, file=sys.stderr)
    else:
        backends = [args.backend]
        if args.backend == "postgres":
            problem = postgres_problem()
            if problem is not None:
                raise SystemExit("bench: cannot run on PostgreSQL: %s" % problem)
    os.makedirs(args.out, exist_ok=True)
    ctx = Context(out=args.out, profile=args.profile)
    started = time.time()
    rows = run_scenarios(scenarios, backends, args.size, ctx)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started))
    for item in rows:
        item["run"] = stamp
    meta = machine()
    meta.update({"started": stamp,
                 "wall_seconds": round(time.time() - started, 1), "size": args.size,
                 "backends": backends, "skipped_backends": skipped})
    if args.merge:
        rows, meta = merge(rows, meta, args.out)
    paths = write_results(rows, meta, args.out)
    print("bench: wrote %s" % ", ".join(paths), file=sys.stderr)
    return 0 if all(r["ok"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
