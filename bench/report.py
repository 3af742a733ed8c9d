"""The results table: results.json (every row and the machine) and results.md (the same,
for people), written side by side."""

import json
import os
import platform
import subprocess

from .harness import ROOT

ORDER = ("scenario", "measure", "backend", "value", "unit", "target", "ok", "note")


def machine():
    """What the numbers were measured on."""
    info = {"cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as handle:
            info["memory_mb"] = int(handle.readline().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    for name in ("zmq", "gevent", "psycopg2"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            info[name] = None
    try:
        import sqlite3

        import zmq

        info["libzmq"] = zmq.zmq_version()
        info["sqlite"] = sqlite3.sqlite_version
    except ImportError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        info["commit"] = commit + (" + uncommitted changes" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return "%.3g" % value if abs(value) < 100 else "{:,.0f}".format(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return "{:,}".format(value)
    return str(value).replace("|", "/")


def markdown(rows, meta):
    lines = ["# lavacore benchmark results", ""]
    lines.append("Written by `python -m bench` (see [README.md](../README.md)). Measured %s "
                 "on %s core(s), %s, Python %s, pyzmq %s (libzmq %s), gevent %s, SQLite %s; "
                 "commit %s; size `%s`; %s s wall time (the last run)."
                 % (meta.get("started"), meta.get("cores"), meta.get("cpu", "?"),
                    meta.get("python"), meta.get("zmq"), meta.get("libzmq"),
                    meta.get("gevent"), meta.get("sqlite"), meta.get("commit", "?"),
                    meta.get("size"), meta.get("wall_seconds")))
    runs = meta.get("runs") or {}
    if len(runs) > 1:
        lines.append("")
        lines.append("The table merges runs (`--merge`):")
        for stamp, info in sorted(runs.items()):
            which = sorted({"%s/%s" % (r["scenario"], r["backend"]) for r in rows
                            if r.get("run") == stamp})
            lines.append("- %s (size `%s`, %s s): %s" % (stamp, info.get("size"),
                                                        info.get("wall_seconds"),
                                                        ", ".join(which)))
    lines.append("")
    lines.append("Backends: %s." % ", ".join(meta.get("backends", [])))
    for backend, why in (meta.get("skipped_backends") or {}).items():
        lines.append("Not measured on %s: %s." % (backend, why))
    loads = [l for item in rows for l in item.get("load") or ()]
    if loads:
        lines.append("")
        lines.append("1-minute load average during the run: %.1f to %.1f on %s cores%s"
                     % (min(loads), max(loads), meta.get("cores"),
                        " (other work was running on the machine: the figures are lower "
                        "than on a quiet machine)" if max(loads) > 2 * (meta.get("cores") or 1)
                        else ""))
    lines.append("")
    lines.append("What limits each missed target, with the profiles: see "
                 "[the findings in README.md](../README.md#findings).")
    lines.append("")
    lines.append("| # | measure | backend | value | unit | target | result | note |")
    lines.append("|---|---|---|---:|---|---|---|---|")
    for item in rows:
        verdict = {True: "pass", False: "**MISS**", None: ""}[item["ok"]]
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
            item["scenario"], _cell(item["measure"]), item["backend"], _cell(item["value"]),
            _cell(item["unit"]), _cell(item["target"]) if item["target"] else "",
            verdict, _cell(item["note"]) if item["note"] else ""))
    lines.append("")
    return "\n".join(lines)


def write_results(rows, meta, out):
    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, "results.json")
    md_path = os.path.join(out, "results.md")
    ordered = [{key: item.get(key) for key in ORDER} | {k: v for k, v in item.items()
                                                       if k not in ORDER} for item in rows]
    with open(json_path, "w") as handle:
        json.dump({"machine": meta, "rows": ordered}, handle, indent=2, default=str)
        handle.write("\n")
    with open(md_path, "w") as handle:
        handle.write(markdown(rows, meta))
    return [md_path, json_path]


def main(argv=None):
    """``python -m bench.report [DIR]``: write DIR/results.md again from its results.json."""
    import sys

    out = (argv if argv is not None else sys.argv[1:]) or [
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")]
    with open(os.path.join(out[0], "results.json")) as handle:
        data = json.load(handle)
    with open(os.path.join(out[0], "results.md"), "w") as handle:
        handle.write(markdown(data["rows"], data["machine"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
