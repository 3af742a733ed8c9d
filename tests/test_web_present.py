"""lavacore/present.py, the presentation the command line, REST and the pages share: its
text is the command line's (``lavacore jobs show`` and the rest, run for real here),
except that no Python repr is ever printed; its dicts are REST's."""

import json

import pytest

from apiutil import api_labs, run_job
from conftest import job_yaml, run_cli
from lavacore import present
from lavacore.logformat import make_line, result_line
from lavacore.states import WorkerHealth


@pytest.fixture
def api(tmp_path):
    yield from api_labs(tmp_path)


def test_text_is_the_command_lines_but_without_reprs(api):
    lab = api(devices=(("qemu01", "qemu", "worker1", ()),))
    worker = lab.worker()
    job_id = lab.submit()
    run_job(lab, worker, job_id, [result_line("smoke", "echo", "pass", measurement="1.5",
                                              units="s")])
    storage = lab.storage
    job = storage.get_job(job_id)

    def shown(*args):
        done = run_cli(lab.config_path, *args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert present.job_text(present.job_details(storage, job)) == shown("jobs", "show",
                                                                         str(job_id))
    assert present.jobs_table(storage.list_jobs(order="-id", limit=100)) == shown("jobs",
                                                                                  "list")
    assert present.results_table(storage.list_testcases(job_id)) == shown("jobs", "results",
                                                                          str(job_id))
    assert present.results_details(job, storage.list_testcases(job_id)) == json.loads(
        shown("jobs", "results", str(job_id), "--json"))
    assert present.devices_table(storage.list_devices()) == shown("devices", "list")
    assert present.workers_table(storage.list_workers()) == shown("workers", "list")
    device = storage.get_device("qemu01")
    assert present.device_text(present.device_details(storage, device)) == shown(
        "devices", "show", "qemu01")
    assert present.job_details(storage, job) == json.loads(shown("jobs", "show", str(job_id),
                                                                 "--json"))
    assert present.device_details(storage, device) == json.loads(
        shown("devices", "show", "qemu01", "--json"))
    # REST gives the same dicts.
    assert lab.json("GET", "/api/v1/jobs/%d/" % job_id) == present.job_details(storage, job)
    rest = lab.json("GET", "/api/v1/devices/qemu01/")
    assert rest == present.device_details(storage, device, history=20)
    # The log line format of ``jobs logs``.
    logged = shown("jobs", "logs", str(job_id)).splitlines()
    assert logged and all(line[19:20] == " " for line in logged)
    assert present.log_line_text(make_line("info", "hello"))[19:] == " info     hello"
    assert present.log_line_text('{"dt": "2026-12-02T10:00:00.123", "lvl": "results",'
                                 ' "msg": {"case": "b", "result": "pass"}}') == \
        '2026-12-02T10:00:00 results  {"case": "b", "result": "pass"}'
    assert present.log_line_text("not a mapping") == "not a mapping"


def test_no_python_repr_in_show_texts(api):
    lab = api(devices=(("qemu01", "qemu", "worker1", ("usb", "fast")),))
    lab.worker()
    storage = lab.storage
    lab.master.flow.set_worker_health("worker1", WorkerHealth.MAINTENANCE, "admin",
                                      "checked")
    worker = storage.get_worker("worker1")
    text = present.worker_text(present.worker_details(storage, worker))
    lines = text.splitlines()
    assert lines[0] == "hostname:        worker1"
    assert "devices:         qemu01" in lines
    assert "description:     -" in lines
    assert not [line for line in lines if "None" in line or "[" in line or "{" in line]
    assert [line for line in lines if line.startswith("history:")]
    device = present.device_text(present.device_details(storage, storage.get_device("qemu01")))
    assert "tags:                    fast, usb\n" in device
    job_id = lab.submit(job_yaml(extra="tags: [usb]\n"))
    job = present.job_text(present.job_details(storage, storage.get_job(job_id)))
    assert "tags:            usb\n" in job and "failure_comment: -\n" in job
    # Values: nothing is "-", booleans are yes or no, lists are joined, mappings are
    # key: value.
    assert [present.value_text(v) for v in (None, "", [], {}, 0, False, True, ["a", "b"],
                                            {"k": "v", "n": None})] == \
        ["-", "-", "-", "-", "0", "no", "yes", "a, b", "k: v, n: -"]
    assert present._field("metadata", {"a": 1, "b": [1, 2]}, 16) == \
        "metadata:\n  a: 1\n  b: 1, 2\n"
    assert present.table([], ["x"]) == ""


def test_log_messages_and_durations_for_the_pages():
    assert present.log_message({"lvl": "results", "msg": {
        "definition": "smoke", "case": "speed", "result": "pass", "measurement": 12.5,
        "units": "MB/s"}}) == "smoke/speed: pass 12.5 MB/s"
    assert present.log_message({"lvl": "info", "msg": {"a": "<b>"}}) == '{"a": "<b>"}'
    assert present.log_message({"lvl": "target", "msg": "plain"}) == "plain"
    assert present.log_message({"lvl": "info"}) == ""
    assert [present.duration_text(s) for s in (None, 0, 59.6, 61, 3725)] == \
        ["-", "0 s", "1 min 00 s", "1 min 01 s", "1 h 02 min"]
