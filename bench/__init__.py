"""lavacore's benchmarks (issue 9): ``python -m bench``; see bench/README.md.

Each scenario is a module with NUMBER, NAME, TITLE, SIZES ("full", "small", "tiny") and
``run(backend, size, ctx) -> [row, ...]``. Benchmarks never run inside the test suite;
tests/test_bench_smoke.py runs each one at its tiny size so they keep working.
"""

import importlib

SCENARIO_MODULES = ("control_plane", "latency", "schedule_pass", "throughput", "log_ingest",
                    "scale", "restart", "fuzz", "web", "metrics")


def scenarios():
    """The scenario modules in their order (imported on demand, so that the worker
    simulator and the echo server, also in this package, stay light)."""
    return [importlib.import_module("bench." + name) for name in SCENARIO_MODULES]
