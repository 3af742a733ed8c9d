"""The HTTP API (/RPC2 XML-RPC and /api/v1/ REST) against an in-process master: LAVA's
shapes, authentication, changes taking effect at once, and bad input shown harmless."""

import http.client
import json
import re
import socket
import time
import xmlrpc.client

import gevent
import pytest
import yaml

from apiutil import api_labs, in_thread, run_job
from conftest import job_yaml
from lavacore.logformat import make_line, result_line
from lavacore.states import DeviceHealth, JobHealth, JobState, WorkerHealth

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def api(tmp_path):
    yield from api_labs(tmp_path)

ISSUE_METHODS = """system.version system.api_version system.whoami
system.get_master_certificate scheduler.jobs.submit scheduler.jobs.show scheduler.jobs.list
scheduler.jobs.cancel scheduler.jobs.definition scheduler.jobs.logs scheduler.jobs.validate
scheduler.jobs.resubmit scheduler.jobs.queue scheduler.jobs.configuration
scheduler.devices.list scheduler.devices.show scheduler.devices.add scheduler.devices.update
scheduler.devices.get_dictionary scheduler.devices.set_dictionary
scheduler.devices.tags.add scheduler.devices.tags.list scheduler.devices.tags.delete
scheduler.device_types.list scheduler.device_types.show scheduler.device_types.add
scheduler.device_types.update scheduler.device_types.get_template
scheduler.device_types.set_template scheduler.device_types.get_health_check
scheduler.device_types.set_health_check scheduler.workers.list scheduler.workers.show
scheduler.workers.add scheduler.workers.update scheduler.workers.get_config
scheduler.workers.set_config scheduler.workers.get_env scheduler.workers.set_env
scheduler.workers.get_env_dut scheduler.workers.set_env_dut scheduler.workers.get_certificate
scheduler.workers.set_certificate scheduler.get_publisher_event_socket
results.get_testjob_results_yaml""".split()


def fault(call, *args):
    with pytest.raises(xmlrpc.client.Fault) as info:
        call(*args)
    return info.value


def raw_post(lab, path, body, headers=None, timeout=10):
    """POST raw bytes with http.client (in a thread); (status, body) or the OSError."""
    host, port = lab.master.api.address

    def post():
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("POST", path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        except OSError as exc:
            return None, exc
        finally:
            conn.close()
    return in_thread(post)


def test_service_listens_on_os_chosen_port_and_says_where(api, caplog):
    caplog.set_level("INFO", logger="lavacore.api")
    lab = api()
    host, port = lab.master.api.address
    assert host == "127.0.0.1" and port > 0
    assert lab.url == "http://127.0.0.1:%d" % port
    assert "API listening on http://127.0.0.1:%d" % port in caplog.text
    assert lab.json("GET", "/")["xmlrpc"] == "/RPC2"


def test_system_methods_and_version_light_up_every_lavacli_command(api):
    lab = api()
    anonymous, alice = lab.rpc(), lab.rpc("alice")
    version = anonymous.system.version()
    match = re.match(r"(20\d{2})\.(\d{1,2})", version)
    # lavacli 3.1 offers users and groups from 2023.03 (and events over /ws/ from 2020.09)
    assert match and (int(match.group(1)), int(match.group(2))) >= (2023, 3)
    assert anonymous.system.api_version() == 2
    assert anonymous.system.whoami() is None
    assert alice.system.whoami() == "alice"
    assert set(ISSUE_METHODS) <= set(anonymous.system.listMethods())
    assert "job_id" in anonymous.system.methodHelp("scheduler.jobs.show")
    assert fault(anonymous.system.get_master_certificate).faultCode == 404
    endpoint = anonymous.scheduler.get_publisher_event_socket()
    assert endpoint == lab.master.events.endpoint and endpoint.startswith("tcp://127.0.0.1:")
    # A PUB socket bound to every interface is given with the host the client used.
    lab.master.events.endpoint = "tcp://0.0.0.0:5500"
    assert anonymous.scheduler.get_publisher_event_socket() == "tcp://127.0.0.1:5500"


def test_submit_show_list_cancel_with_lava_shapes(api):
    lab = api()
    anonymous, alice = lab.rpc(), lab.rpc("alice")
    refused = fault(anonymous.scheduler.jobs.submit, job_yaml())
    assert refused.faultCode == 401 and lab.storage.count_jobs() == 0
    job_id = alice.scheduler.jobs.submit(job_yaml(name="api job"))
    assert isinstance(job_id, int)
    job = lab.job(job_id)
    assert job.submitter == "alice" and job.state == JobState.SUBMITTED
    shown = anonymous.scheduler.jobs.show(str(job_id))
    assert shown["id"] == job_id and shown["submitter"] == "alice"
    assert (shown["state"], shown["health"]) == ("Submitted", "Unknown")
    assert isinstance(shown["submit_time"], xmlrpc.client.DateTime)
    assert shown["start_time"] is None and shown["end_time"] is None
    assert shown["description"] == "api job" and shown["device_type"] == "qemu"
    assert shown["visibility"] == "Public" and shown["pipeline"] is True
    listed = anonymous.scheduler.jobs.list(None, None, 0, 25, 0, True)
    assert [row["id"] for row in listed] == [job_id]
    assert {"actual_device", "start_time", "end_time", "error_type"} <= set(listed[0])
    assert anonymous.scheduler.jobs.list("SUBMITTED")[0]["id"] == job_id
    assert anonymous.scheduler.jobs.list("RUNNING") == []
    assert anonymous.scheduler.jobs.queue(["qemu"], 0, 25)[0]["requested_device_type"] == "qemu"
    assert anonymous.scheduler.jobs.definition(job_id).startswith("device_type: qemu")
    assert fault(anonymous.scheduler.jobs.cancel, job_id).faultCode == 401
    assert alice.scheduler.jobs.cancel(job_id) is True
    job = lab.job(job_id)
    assert (job.state, job.health) == (JobState.FINISHED, JobHealth.CANCELED)
    shown = anonymous.scheduler.jobs.show(job_id)
    assert isinstance(shown["end_time"], xmlrpc.client.DateTime)
    resubmitted = alice.scheduler.jobs.resubmit(job_id)
    assert resubmitted == job_id + 1 and lab.job(resubmitted).state == JobState.SUBMITTED


def test_invalid_job_refused_with_line_and_validate_reports_it(api):
    lab = api()
    alice = lab.rpc("alice")
    bad = job_yaml().replace("priority: medium", "priority: urgent")
    refused = fault(alice.scheduler.jobs.submit, bad)
    assert refused.faultCode == 400 and "line 3: priority" in refused.faultString
    broken = fault(alice.scheduler.jobs.submit, "job_name: x\n  bad: [indent\n")
    assert broken.faultCode == 400 and "line 2" in broken.faultString
    assert lab.storage.count_jobs() == 0
    assert alice.scheduler.jobs.validate(job_yaml()) == {}
    problem = alice.scheduler.jobs.validate(bad, False)
    assert problem["path"] == "priority" and "line 3" in problem["msg"]


def test_wrong_credentials_are_refused_without_saying_which_part(api):
    lab = api()
    good = lab.token("alice")
    lab.token("bob")
    messages = set()
    for user, token in (("alice", "wrong" + good[5:]), ("mallory", good), ("bob", good),
                        ("alice", "")):
        refused = fault(lab.rpc(user, token).system.version)
        assert refused.faultCode == 401
        messages.add(refused.faultString)
        status, headers, body = lab.http("GET", "/api/v1/jobs/", user=user, token=token)
        assert status == 401 and "Basic" in headers.get("WWW-Authenticate", "")
        messages.add(json.loads(body)["error"])
    assert len(messages) == 1 and "alice" not in messages.pop()
    for header in ("Basic !!!notbase64", "Digest abc", "Basic " + "QQ==" * 300):
        status, _, _ = lab.http("GET", "/api/v1/jobs/", headers={"Authorization": header})
        assert status == 401
    # A token alone (REST scripts) works, and reading needs no token at all.
    status, _, _ = lab.http("GET", "/api/v1/jobs/", headers={"Authorization": "Token " + good})
    assert status == 200
    assert lab.json("GET", "/api/v1/devices/")["count"] == 1


def test_unknown_methods_bad_arguments_and_injection_are_faults(api):
    lab = api()
    alice = lab.rpc("alice")
    job_id = alice.scheduler.jobs.submit(job_yaml())
    assert fault(alice.scheduler.nosuch.method).faultCode == -32601
    assert fault(alice.scheduler.jobs.show).faultCode == -32602
    assert fault(alice.scheduler.jobs.show, 1, 2, 3).faultCode == -32602
    assert fault(alice.scheduler.jobs.show, 999999).faultCode == 404
    for bad in ("abc", "1; DROP TABLE jobs", "1 OR 1=1", -1, "99999999999999999999", "",
                [1], {"id": 1}, True):
        assert fault(alice.scheduler.jobs.show, bad).faultCode == 400, bad
    admin = lab.rpc("admin")  # (worker files are an administrator's to read)
    for name in ("../../etc/passwd", "qemu01' OR '1'='1", "a/b", ".hidden", "x" * 300, "",
                 "qemu01\x00", None, 42):
        # (a NUL cannot even be sent in XML: that one is a parse error)
        for call in (alice.scheduler.devices.show, admin.scheduler.workers.get_config,
                     alice.scheduler.device_types.get_template):
            assert fault(call, name).faultCode in (400, -32700), name
    assert fault(alice.scheduler.jobs.list, "NOSTATE").faultCode == 400
    assert fault(alice.scheduler.jobs.list, None, None, "zero").faultCode == 400
    assert fault(admin.scheduler.devices.update, "qemu01", None, None, None, None,
                 "SHINY").faultCode == 400
    # (alice may not change a device at all: refused before her arguments are read)
    assert fault(alice.scheduler.devices.update, "qemu01", None, None, None, None,
                 "SHINY").faultCode == 403
    # Nothing was harmed: the job and the tables are all there.
    assert lab.job(job_id).state == JobState.SUBMITTED
    assert [d.hostname for d in lab.storage.list_devices()] == ["qemu01"]


def test_malformed_and_huge_bodies_are_harmless(api):
    lab = api()
    alice = lab.rpc("alice")
    for body in (b"not xml at all", b"<methodCall><methodName>x</methodName><params>",
                 b"<methodCall></methodCall>",
                 b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">'
                 b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
                 b"<methodCall><methodName>&b;</methodName></methodCall>",
                 b"\xff\xfe\x00garbage",
                 b"<methodCall><methodName>scheduler.jobs.show</methodName><params><param>"
                 b"<value><int>99999999999999999999999</int></value></param></params>"
                 b"</methodCall>"):
        status, answer = raw_post(lab, "/RPC2", body, {"Content-Type": "text/xml"})
        assert status == 200, answer
        with pytest.raises(xmlrpc.client.Fault) as info:
            xmlrpc.client.loads(answer)
        assert info.value.faultCode in (-32700, -32600, 400), info.value
        assert b"Traceback" not in answer
    huge = xmlrpc.client.dumps(("x" * (11 * 1024 * 1024),), "scheduler.jobs.submit")
    status, answer = raw_post(lab, "/RPC2", huge.encode(), {"Content-Type": "text/xml"})
    assert status == 200
    with pytest.raises(xmlrpc.client.Fault) as info:
        xmlrpc.client.loads(answer)
    assert info.value.faultCode == 413 and "too large" in info.value.faultString
    status, answer = raw_post(lab, "/api/v1/jobs/", b"y" * (11 * 1024 * 1024),
                              {"Content-Type": "text/yaml"})
    assert status == 413 and b"too large" in answer
    # A body announced far too large is not read at all: answered, then closed.
    status, answer = raw_post(lab, "/RPC2", b"<methodCall>",
                              {"Content-Length": str(10 ** 10)}, timeout=5)
    assert status in (200, None)
    for body, ctype in ((b"{not json", "application/json"), (b"[1, 2]", "application/json")):
        status, answer = raw_post(lab, "/api/v1/devices/", body, {"Content-Type": ctype})
        assert status in (400, 401)
    assert lab.storage.count_jobs() == 0
    assert alice.system.whoami() == "alice"  # still serving


def test_internal_error_is_a_fault_not_a_traceback(api, monkeypatch, caplog):
    from lavacore.api import xmlrpc as table

    lab = api()

    def broken(caller, job_id):
        raise RuntimeError("simulated bug")

    monkeypatch.setitem(table.METHODS, "scheduler.jobs.show", broken)
    broken.rpc_signature = table.jobs_show.rpc_signature
    status, answer = raw_post(lab, "/RPC2", xmlrpc.client.dumps((1,), "scheduler.jobs.show")
                              .encode())
    # HTTP 200 with a fault: lavacli would retry an HTTP 500 with back-off.
    assert status == 200 and b"Traceback" not in answer and b"simulated" not in answer
    with pytest.raises(xmlrpc.client.Fault) as info:
        xmlrpc.client.loads(answer)
    assert info.value.faultCode == -32603
    assert "simulated bug" in caplog.text  # the traceback is in the master's log only
    job_id = lab.submit()

    def broken_details(*args):
        raise RuntimeError("simulated REST bug")

    monkeypatch.setattr("lavacore.present.job_details", broken_details)
    status, _, body = lab.http("GET", "/api/v1/jobs/%d/" % job_id)
    assert status == 500 and b"simulated" not in body and b"Traceback" not in body
    assert lab.rpc().system.version()


def test_logs_results_and_configuration_of_a_finished_job(api):
    lab = api()
    worker = lab.worker()
    alice = lab.rpc("alice")
    job_id = alice.scheduler.jobs.submit(job_yaml())
    run_job(lab, worker, job_id, [make_line("info", "hello"), make_line("target", "é ünï"),
                                  result_line("0_smoke", "echo", "pass", measurement=2,
                                              units="s")])
    finished, data = alice.scheduler.jobs.logs(job_id, 0)
    entries = yaml.safe_load(data.data.decode())
    assert finished is True
    assert [e["msg"] for e in entries[:2]] == ["hello", "é ünï"]
    assert all(isinstance(e["dt"], str) for e in entries)
    finished, data = alice.scheduler.jobs.logs(job_id, 1, 2)
    assert [e["msg"] for e in yaml.safe_load(data.data.decode())] == ["é ünï"]
    finished, data = alice.scheduler.jobs.logs(job_id, 100)
    assert yaml.safe_load(data.data.decode()) == []
    results = yaml.safe_load(alice.results.get_testjob_results_yaml(job_id))
    cases = {(r["suite"], r["name"]): r for r in results}
    assert cases[("0_smoke", "echo")]["measurement"] == "2"
    assert cases[("lava", "job")]["result"] == "pass"
    config = alice.scheduler.jobs.configuration(job_id)
    assert len(config) == 5 and b"job_name" in config[0].data
    rest = lab.json("GET", "/api/v1/jobs/%d/logs/?start=1" % job_id)
    assert rest["finished"] and rest["start"] == 1 and rest["logs"][0]["msg"] == "é ünï"
    details = lab.json("GET", "/api/v1/jobs/%d/" % job_id)
    assert (details["state"], details["health"]) == ("Finished", "Complete")
    assert details["results"]["pass"] == 2


def test_admin_changes_take_effect_at_once(api):
    lab = api()
    worker = lab.worker()
    admin = lab.rpc("admin")
    # A new device, with its dictionary set through the API, takes a job at once.
    assert fault(lab.rpc().scheduler.devices.add, "qemu02", "qemu", "worker1").faultCode == 401
    assert fault(admin.scheduler.devices.add, "qemu02", "nosuch", "worker1").faultCode == 404
    assert fault(admin.scheduler.devices.add, "qemu01", "qemu", "worker1").faultCode == 400
    admin.scheduler.devices.update("qemu01", None, None, None, None, "MAINTENANCE", None)
    assert lab.storage.get_device("qemu01").health == DeviceHealth.MAINTENANCE
    admin.scheduler.devices.add("qemu02", "qemu", "worker1", None, None, True, "GOOD")
    bad = fault(admin.scheduler.devices.set_dictionary, "qemu02", "{% extends 'qemu.jinja2' %}"
                "\n{% set x = %}\n")
    assert bad.faultCode == 400 and "line 2" in bad.faultString
    assert admin.scheduler.devices.set_dictionary(
        "qemu02", "{% extends 'qemu.jinja2' %}\n{% set device_type = 'qemu' %}\n"
        "{% set role = 'from-the-api' %}\n") is True
    job_id = admin.scheduler.jobs.submit(job_yaml())
    frames = worker.expect("START", timeout=3)
    assert frames[1] == str(job_id).encode()
    assert yaml.safe_load(frames[3])["role"] == "from-the-api"
    assert lab.job(job_id).actual_device == "qemu02"
    dictionary = admin.scheduler.devices.get_dictionary("qemu02").data.decode()
    assert "from-the-api" in dictionary
    rendered = yaml.safe_load(admin.scheduler.devices.get_dictionary("qemu02", True).data)
    assert rendered["role"] == "from-the-api"
    shown = admin.scheduler.devices.show("qemu02")
    assert shown["has_device_dict"] and shown["current_job"] == job_id
    # Canceling a running job reaches the worker at once.
    worker.send("START_OK", job_id)
    lab.wait_for(lambda: lab.job(job_id).state == JobState.RUNNING)
    admin.scheduler.jobs.cancel(job_id)
    assert worker.expect("CANCEL", timeout=2)[1] == str(job_id).encode()
    worker.end(job_id, description=None)
    worker.expect("END_OK", skip=(b"PONG", b"CANCEL"))
    lab.wait_for(lambda: lab.job(job_id).health == JobHealth.CANCELED)
    # A worker put in maintenance takes its devices with it; nothing more is scheduled.
    admin.scheduler.workers.update("worker1", None, "MAINTENANCE")
    assert lab.storage.get_worker("worker1").health == WorkerHealth.MAINTENANCE
    assert lab.storage.get_device("qemu02").health == DeviceHealth.MAINTENANCE
    held = admin.scheduler.jobs.submit(job_yaml())
    lab.settled(worker)
    assert lab.job(held).state == JobState.SUBMITTED
    admin.scheduler.workers.update("worker1", None, "ACTIVE")
    admin.scheduler.devices.update("qemu02", None, None, None, None, "GOOD", None)
    assert worker.expect("START", timeout=3)[1] == str(held).encode()
    # Tags.
    admin.scheduler.devices.tags.add("qemu02", "usb")
    assert admin.scheduler.devices.tags.list("qemu02") == ["usb"]
    assert fault(admin.scheduler.devices.tags.delete, "qemu02", "nosuch").faultCode == 404
    admin.scheduler.devices.tags.delete("qemu02", "usb")
    assert admin.scheduler.devices.tags.list("qemu02") == []
    history = lab.storage.list_history("device", "qemu01")
    assert {(h["user"], h["new"]) for h in history} >= {("admin", "Maintenance"),
                                                        ("admin", "Unknown")}


def test_device_types_and_worker_files(api):
    lab = api()
    admin, anonymous = lab.rpc("admin"), lab.rpc()
    admin.scheduler.device_types.add("bbb", "BeagleBone", True, False, 12, "jobs")
    assert fault(admin.scheduler.device_types.add, "bbb", None, True, False, 24,
                 "hours").faultCode == 400
    assert fault(admin.scheduler.device_types.add, "x", None, True, False, 24,
                 "weeks").faultCode == 400
    shown = anonymous.scheduler.device_types.show("bbb")
    assert (shown["health_frequency"], shown["health_denominator"]) == (12, "Jobs")
    admin.scheduler.device_types.update("bbb", None, None, None, 6, "hours", True)
    shown = anonymous.scheduler.device_types.show("bbb")
    assert (shown["health_frequency"], shown["health_disabled"]) == (6, True)
    listed = {d["name"]: d for d in anonymous.scheduler.device_types.list()}
    assert listed["qemu"]["devices"] == 1 and listed["qemu"]["template"] is True
    assert listed["bbb"]["template"] is False
    bad = fault(admin.scheduler.device_types.set_template, "bbb", "{% block x %}\n{% if %}")
    assert bad.faultCode == 400 and "line 2" in bad.faultString
    admin.scheduler.device_types.set_template("bbb", "{% extends 'base.jinja2' %}\n")
    assert anonymous.scheduler.device_types.get_template("bbb.jinja2").data.startswith(
        b"{% extends")
    assert fault(anonymous.scheduler.device_types.get_health_check, "bbb").faultCode == 404
    bad = fault(admin.scheduler.device_types.set_health_check, "bbb",
                job_yaml().replace("visibility: public", "visibility: nobody"))
    assert bad.faultCode == 400 and "line 4: visibility" in bad.faultString
    admin.scheduler.device_types.set_health_check("bbb", job_yaml(device_type="bbb"))
    assert b"device_type: bbb" in anonymous.scheduler.device_types.get_health_check("bbb").data
    # Workers and their files.
    admin.scheduler.workers.add("worker2", "second", False)
    assert fault(admin.scheduler.workers.add, "worker2").faultCode == 400
    assert anonymous.scheduler.workers.list() == ["worker1", "worker2"]
    shown = anonymous.scheduler.workers.show("worker2")
    assert shown["description"] == "second" and isinstance(shown["last_ping"],
                                                          xmlrpc.client.DateTime)
    assert fault(admin.scheduler.workers.get_config, "worker2").faultCode == 404
    # Worker files may hold a lab's credentials: an administrator's to read.
    assert fault(anonymous.scheduler.workers.get_config, "worker2").faultCode == 401
    assert fault(lab.rpc("alice").scheduler.workers.get_config, "worker2").faultCode == 403
    bad = fault(admin.scheduler.workers.set_config, "worker2", "a: [1,\n")
    assert bad.faultCode == 400 and "invalid YAML" in bad.faultString
    assert fault(anonymous.scheduler.workers.set_config, "worker2", "a: 1\n").faultCode == 401
    for kind in ("config", "env", "env_dut"):
        assert getattr(admin.scheduler.workers, "set_" + kind)("worker2", "k: %s\n" % kind)
        got = getattr(admin.scheduler.workers, "get_" + kind)("worker2")
        assert got.data == ("k: %s\n" % kind).encode()
    assert anonymous.scheduler.workers.show("worker2")["default_env"] is False
    assert admin.scheduler.workers.set_config("worker2", "")  # removes it again
    assert anonymous.scheduler.workers.show("worker2")["default_config"] is True
    # Without [auth_curve], there is nowhere to put a worker certificate: said so.
    refused = fault(admin.scheduler.workers.set_certificate, "worker2",
                    'metadata\ncurve\n    public-key = "%s"\n' % ("A" * 40))
    assert refused.faultCode == 400 and "workers_certs" in refused.faultString
    assert fault(anonymous.scheduler.workers.get_certificate, "worker2").faultCode == 404
    admin.scheduler.workers.update("worker2", None, "RETIRED")
    assert anonymous.scheduler.workers.list() == ["worker1"]
    assert anonymous.scheduler.workers.list(True) == ["worker1", "worker2"]


def test_rest_lists_filter_and_page_and_admin_changes(api):
    lab = api()
    ids = [lab.json("POST", "/api/v1/jobs/", {"definition": job_yaml(name="job %d" % n)},
                    user="admin", expect=201)["job_ids"][0] for n in range(4)]
    status, _, body = lab.http("POST", "/api/v1/jobs/", job_yaml(), user="bob",
                               headers={"Content-Type": "application/yaml"})
    assert status == 201
    ids.append(json.loads(body)["job_ids"][0])
    page = lab.json("GET", "/api/v1/jobs/?limit=2")
    assert page["count"] == 5 and [j["id"] for j in page["results"]] == ids[::-1][:2]
    assert "offset=2" in page["next"] and page["previous"] is None
    page = lab.json("GET", "/api/v1/jobs/?limit=2&offset=4&ordering=id")
    assert [j["id"] for j in page["results"]] == [ids[4]] and page["next"] is None
    assert lab.json("GET", "/api/v1/jobs/?submitter=bob")["count"] == 1
    lab.json("POST", "/api/v1/jobs/%d/cancel/" % ids[0], user="admin")
    assert lab.json("GET", "/api/v1/jobs/?state=finished&health=CANCELED")["count"] == 1
    assert lab.json("GET", "/api/v1/jobs/?state=Submitted")["count"] == 4
    for path, status in (("/api/v1/jobs/?state=nosuch", 400), ("/api/v1/jobs/?colour=red", 400),
                         ("/api/v1/jobs/?limit=-1", 400), ("/api/v1/jobs/123456/", 404),
                         ("/api/v1/jobs/1%20OR%201=1/", 400), ("/api/v1/nosuch/", 404),
                         ("/api/v1/devices/..%2F..%2Fetc/", 404),
                         ("/api/v1/devices/qemu01%27%20OR%20%271%27=%271/", 400),
                         ("/api/v1/workers/..%2Fetc/config/", 404)):
        assert lab.http("GET", path)[0] == status, path
    status, _, body = lab.http("GET", "/api/v1/jobs/?offset=99999999999999999999999")
    assert status == 400 and b"out of range" in body
    assert lab.http("DELETE", "/api/v1/jobs/")[0] == 405
    assert lab.http("POST", "/api/v1/jobs/", {"definition": job_yaml()})[0] == 401
    refused = lab.json("POST", "/api/v1/jobs/", {"definition": "priority: [\n"}, user="admin",
                       expect=400)
    assert "line" in refused["error"] and refused["code"] == 400
    assert lab.json("POST", "/api/v1/jobs/validate/", {"definition": job_yaml()})["valid"]
    assert lab.http("GET", "/api/v1/jobs/%d/definition/" % ids[1])[2].startswith(b"device_type")
    # Devices, workers and device types.
    device = lab.json("PATCH", "/api/v1/devices/qemu01/", {"health": "maintenance",
                                                           "reason": "cable"}, user="admin")
    assert device["health"] == "Maintenance" and device["history"][0]["reason"] == "cable"
    assert lab.json("PATCH", "/api/v1/devices/qemu01/", {"colour": "red"}, user="admin",
                    expect=400)["error"].startswith("unknown field")
    lab.json("POST", "/api/v1/devices/", {"hostname": "qemu03", "device_type": "qemu",
                                          "worker": "worker1", "tags": ["usb"]},
             user="admin", expect=201)
    assert lab.json("POST", "/api/v1/devices/", {"hostname": "qemu03", "device_type": "qemu",
                                                 "worker": "worker1"}, user="admin",
                    expect=409)
    assert lab.json("GET", "/api/v1/devices/?health=MAINTENANCE")["count"] == 1
    assert lab.json("GET", "/api/v1/devices/?limit=1")["next"]
    assert lab.http("PUT", "/api/v1/devices/qemu03/dictionary/",
                    "{% extends 'qemu.jinja2' %}\n", user="admin")[0] == 200
    assert lab.http("GET", "/api/v1/devices/qemu03/dictionary/")[2].startswith(b"{% extends")
    assert lab.json("GET", "/api/v1/workers/")["results"][0]["hostname"] == "worker1"
    worker = lab.json("PATCH", "/api/v1/workers/worker1/", {"health": "MAINTENANCE"},
                      user="admin")
    assert worker["health"] == "Maintenance" and set(worker["devices"]) == {"qemu01", "qemu03"}
    assert lab.storage.get_device("qemu03").health == DeviceHealth.MAINTENANCE
    assert lab.http("PUT", "/api/v1/workers/worker1/env/", "a: [\n", user="admin")[0] == 400
    assert lab.http("PUT", "/api/v1/workers/worker1/env/", "a: 1\n", user="admin")[0] == 200
    assert lab.http("GET", "/api/v1/workers/worker1/env/", user="admin")[2] == b"a: 1\n"
    assert lab.http("GET", "/api/v1/workers/worker1/env/")[0] == 401
    lab.json("POST", "/api/v1/device-types/", {"name": "bbb", "health_frequency": 3},
             user="admin", expect=201)
    types = {t["name"]: t for t in lab.json("GET", "/api/v1/device-types/")["results"]}
    assert types["bbb"]["health_frequency"] == 3 and types["qemu"]["devices"] == 2


def test_requests_per_second_smoke_and_quick_stop_with_idle_connections(api):
    """Concurrent clients are all answered while slow clients hang on; neither they nor
    idle keep-alive connections delay the master's stop."""
    lab = api()
    alice = lab.rpc("alice")
    job_id = alice.scheduler.jobs.submit(job_yaml())
    host, port = lab.master.api.address

    def burst(count):
        conn = http.client.HTTPConnection(host, port, timeout=10)
        body = xmlrpc.client.dumps((job_id,), "scheduler.jobs.show").encode()
        for _ in range(count):
            conn.request("POST", "/RPC2", body=body, headers={"Content-Type": "text/xml"})
            response = conn.getresponse()
            assert response.status == 200
            assert xmlrpc.client.loads(response.read())[0][0]["id"] == job_id
        return conn  # left open: an idle keep-alive connection

    def slow_client():
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n<met")
        return sock

    pool = gevent.get_hub().threadpool
    slow = [in_thread(slow_client) for _ in range(3)]  # they never finish their bodies
    started = time.monotonic()
    conns = [r.get() for r in [pool.spawn(burst, 50) for _ in range(4)]]
    elapsed = time.monotonic() - started
    assert elapsed < 10, "200 jobs.show took %.1fs" % elapsed
    stopping = time.monotonic()
    lab.master.stop()
    assert time.monotonic() - stopping < 5  # not held by the slow clients (10 s deadline)
    for conn in conns + slow:
        conn.close()


MULTINODE = """\
job_name: group
priority: medium
visibility: public
timeouts:
  job:
    minutes: 5
protocols:
  lava-multinode:
    roles:
      server: {count: 1, device_type: qemu}
      client: {count: 1, device_type: qemu}
actions:
- test:
    role: [server, client]
    definitions:
    - {from: inline, name: t, path: inline/t.yaml,
       repository: {metadata: {format: Lava-Test Test Definition 1.0, name: t},
                    run: {steps: [echo hi]}}}
"""


def test_multinode_submit_returns_sub_ids_as_lava(api):
    lab = api(devices=(("qemu01", "qemu", "worker1", ()), ("qemu02", "qemu", "worker1", ())))
    alice = lab.rpc("alice")
    ids = alice.scheduler.jobs.submit(MULTINODE)
    assert isinstance(ids, list) and len(ids) == 2
    first = int(ids[0].split(".")[0])
    assert ids == ["%d.0" % first, "%d.1" % first]
    shown = alice.scheduler.jobs.show(ids[1])
    assert shown["id"] == ids[1] and shown["state"] == "Submitted"
    assert "lava-multinode" in alice.scheduler.jobs.definition(ids[1])
    alice.scheduler.jobs.cancel(ids[0])
    lab.wait_for(lambda: all(lab.job(first + n).state == JobState.FINISHED for n in (0, 1)),
                 what="the group canceled")
    rest = lab.json("POST", "/api/v1/jobs/", {"definition": MULTINODE}, user="alice",
                    expect=201)
    assert rest["job_ids"] == [first + 2, first + 3]


def test_certificates_with_auth_curve(api, tmp_path):
    from lavacore import certs

    keys = tmp_path / "certs"
    master_key = certs.create_keypair("master", str(keys))
    worker_key = certs.create_keypair("worker9", str(tmp_path / "worker9"))
    (keys / "workers").mkdir()
    lab = api(extra='[auth_curve]\nmaster_cert = "certs/master.key_secret"\n'
                    'workers_certs = "certs/workers"\n')
    admin, anonymous = lab.rpc("admin"), lab.rpc()
    certificate = anonymous.system.get_master_certificate()
    assert master_key.public_key in certificate and "secret" not in certificate
    admin.scheduler.workers.add("worker9")
    with open(worker_key.path + "_secret") as handle:
        refused = fault(admin.scheduler.workers.set_certificate, "worker9", handle.read())
    assert refused.faultCode == 400 and "public" in refused.faultString
    with open(worker_key.path) as handle:
        assert admin.scheduler.workers.set_certificate("worker9", handle.read()) is True
    assert (keys / "workers" / "worker9.key").exists()
    assert worker_key.public_key in anonymous.scheduler.workers.get_certificate(
        "worker9").data.decode()
    bad = fault(admin.scheduler.workers.set_certificate, "worker9",
                'metadata\ncurve\n    public-key = "%s"\n' % ("~" * 40))
    assert bad.faultCode == 400
