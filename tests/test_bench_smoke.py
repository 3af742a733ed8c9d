"""Every benchmark scenario at its tiny size, so that they keep working.

Benchmarks never run in the test suite; these runs check only that each scenario still
drives a real master and real simulated workers to a well-formed result row. Timing
targets are never asserted here (the numbers of a tiny run on a busy CI box mean nothing).
"""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import bench  # noqa: E402
from bench.__main__ import Context  # noqa: E402
from bench.harness import postgres_problem, raise_fd_limit  # noqa: E402

SCENARIOS = {module.NAME: module for module in bench.scenarios()}
# What the PostgreSQL plugin changes most: the storage-heavy scenarios.
POSTGRES = ("latency", "schedule")


def check_rows(rows, module, backend):
    assert rows, "%s produced no rows" % module.NAME
    for item in rows:
        assert item["scenario"] == module.NUMBER
        assert item["backend"] == backend
        assert item["measure"] and item["unit"]
        value = item["value"]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), item
        assert math.isfinite(value), item
        # A difference of two timings (an overhead) can come out at or below zero in the
        # noise of a loaded machine; every other figure is a positive measure.
        if "exponent" not in item["measure"] and not item.get("difference"):
            assert value > 0, item
        assert item["ok"] in (True, False, None)
        if item["target"]:
            assert item["ok"] is not None, item
        json.dumps(item)


def run_tiny(name, backend, tmp_path):
    raise_fd_limit()
    module = SCENARIOS[name]
    rows = module.run(backend, module.SIZES["tiny"], Context(out=str(tmp_path),
                                                             verbose=False))
    check_rows(rows, module, backend)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_tiny_sqlite(name, tmp_path):
    run_tiny(name, "sqlite", tmp_path)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", POSTGRES)
def test_scenario_tiny_postgres(name, tmp_path):
    problem = postgres_problem()
    assert problem is None, problem  # .ci/run starts PostgreSQL: its absence is a failure
    run_tiny(name, "postgres", tmp_path)


@pytest.mark.timeout(30)
def test_command_line_writes_the_tables(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench", "--size", "tiny", "--backend",
                           "sqlite", "-s", "schedule", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    # Exit status 1 means "a target was missed", which tiny runs may well do.
    assert proc.returncode in (0, 1), proc.stderr
    data = json.loads((out / "results.json").read_text())
    assert data["machine"]["cores"] >= 1
    assert data["rows"] and all(r["backend"] == "sqlite" for r in data["rows"])
    text = (out / "results.md").read_text()
    assert "| # | measure |" in text and "decision" in text
