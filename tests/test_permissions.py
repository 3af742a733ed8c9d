"""Who may do what: users, groups, permissions, private jobs, tokens, the audit trail, as
LAVA labs run them; through XML-RPC, REST, lavacli, the command line and the events."""

import json
import logging
import os
import pwd
import re
import subprocess
import sys
import time
import xmlrpc.client

import gevent
import pytest
import yaml
import zmq.green as zmq

from apiutil import api_labs
from conftest import job_yaml, run_cli, write_config
from lavacore.states import JobState

DEVICES = (("qemu01", "qemu", "worker1", ()), ("bbb01", "bbb", "worker1", ()))


@pytest.fixture
def api(tmp_path):
    yield from api_labs(tmp_path)


def fault(call, *args):
    with pytest.raises(xmlrpc.client.Fault) as info:
        call(*args)
    return info.value


def code_of(call, *args):
    """The fault code of a call (0 when it succeeds)."""
    try:
        call(*args)
    except xmlrpc.client.Fault as exc:
        return exc.faultCode
    return 0


PUBLIC_KEY = 'metadata\ncurve\n    public-key = "%s"\n' % ("a" * 40)

# Every administrator's XML-RPC method, in an order that lets each run (an add before its
# delete): (method, arguments).
ADMIN_XMLRPC = [
    ("scheduler.devices.add", ("qemu02", "qemu", "worker1")),
    ("scheduler.devices.update", ("qemu02", None, None, None, None, "MAINTENANCE", None)),
    ("scheduler.devices.set_dictionary", ("qemu02", "{% extends 'qemu.jinja2' %}\n")),
    ("scheduler.devices.tags.add", ("qemu02", "usb")),
    ("scheduler.devices.tags.delete", ("qemu02", "usb")),
    ("auth.groups.add", ("lab",)),
    ("auth.groups.list", ()),
    ("auth.groups.show", ("lab",)),
    ("auth.groups.perms.add", ("lab", "lava_scheduler_app", "device", "change_device")),
    ("auth.groups.perms.list", ("lab",)),
    ("auth.groups.perms.delete", ("lab", "lava_scheduler_app", "device", "change_device")),
    ("scheduler.devices.perms_add", ("qemu02", "lab", "change_device")),
    ("scheduler.devices.perms_list", ("qemu02",)),
    ("scheduler.devices.perms_delete", ("qemu02", "lab", "change_device")),
    ("scheduler.device_types.add", ("cubie", None, True, False, 24, "hours")),
    ("scheduler.device_types.update", ("cubie", "boards")),
    ("scheduler.device_types.set_template", ("cubie", "{% extends 'base.jinja2' %}\n")),
    ("scheduler.device_types.set_health_check", ("cubie", "")),
    ("scheduler.device_types.perms_add", ("cubie", "lab", "submit_to_devicetype")),
    ("scheduler.device_types.perms_list", ("cubie",)),
    ("scheduler.device_types.perms_delete", ("cubie", "lab", "submit_to_devicetype")),
    ("scheduler.device_types.aliases.add", ("cubie", "cubieboard")),
    ("scheduler.device_types.aliases.delete", ("cubie", "cubieboard")),
    ("scheduler.aliases.add", ("qemu-x86", "qemu")),
    ("scheduler.aliases.delete", ("qemu-x86",)),
    ("scheduler.tags.add", ("fast", "a fast one")),
    ("scheduler.tags.delete", ("fast",)),
    ("scheduler.workers.add", ("worker9", "spare")),
    ("scheduler.workers.update", ("worker9", "rack 9")),
    ("scheduler.workers.set_config", ("worker9", "a: 1\n")),
    ("scheduler.workers.get_config", ("worker9",)),
    ("scheduler.workers.set_env", ("worker9", "b: 2\n")),
    ("scheduler.workers.get_env", ("worker9",)),
    ("scheduler.workers.set_env_dut", ("worker9", "c: 3\n")),
    ("scheduler.workers.get_env_dut", ("worker9",)),
    ("auth.users.add", ("carol", "Carol", "C", "carol@lab")),
    ("auth.users.list", ()),
    ("auth.users.show", ("carol",)),
    ("auth.users.update", ("carol", None, None, "c@lab")),
    ("auth.users.groups.add", ("carol", "lab")),
    ("auth.users.groups.list", ("carol",)),
    ("auth.users.groups.delete", ("carol", "lab")),
    ("auth.users.perms.add", ("carol", "lava_scheduler_app", "tag", "add_tag")),
    ("auth.users.perms.list", ("carol",)),
    ("auth.users.perms.delete", ("carol", "lava_scheduler_app", "tag", "add_tag")),
    ("auth.users.delete", ("carol",)),
    ("auth.groups.delete", ("lab",)),
]


def test_every_admin_xmlrpc_method_refuses_a_plain_user_and_works_for_an_admin(api):
    lab = api(devices=DEVICES)
    admin, alice, anonymous = lab.rpc("admin"), lab.rpc("alice"), lab.rpc()
    for name, args in ADMIN_XMLRPC:
        def call(rpc, name=name):
            target = rpc
            for part in name.split("."):
                target = getattr(target, part)
            return target
        assert code_of(call(anonymous), *args) == 401, name
        assert code_of(call(alice), *args) == 403, name
        assert code_of(call(admin), *args) == 0, name
    # The changes the admin made are in the audit trail, with who and what.
    trail = lab.storage.list_audit(limit=1000)
    assert {(row["kind"], row["action"]) for row in trail} >= {
        ("device", "add"), ("device", "update"), ("device", "set dictionary"),
        ("devicetype", "add"), ("devicetype", "set template"), ("worker", "add"),
        ("user", "add"), ("user", "delete"), ("group", "add"), ("tag", "add"),
        ("alias", "add"), ("device", "add permission"), ("devicetype", "add permission")}
    assert all(row["user"] == "admin" for row in trail)
    update = [r for r in trail if (r["kind"], r["name"], r["action"]) ==
              ("device", "qemu02", "update")][-1]  # (newest first: the first update)
    assert (update["before"]["health"], update["after"]["health"]) == ("Unknown",
                                                                       "Maintenance")


ADMIN_REST = [
    ("POST", "devices/", {"hostname": "qemu02", "device_type": "qemu", "worker": "worker1"}),
    ("PATCH", "devices/qemu02/", {"health": "MAINTENANCE"}),
    ("PUT", "devices/qemu02/dictionary/", "{% extends 'qemu.jinja2' %}\n"),
    ("POST", "groups/", {"name": "lab"}),
    ("POST", "devices/qemu02/permissions/", {"group": "lab", "permission": "change_device"}),
    ("GET", "devices/qemu02/permissions/", None),
    ("DELETE", "devices/qemu02/permissions/", {"group": "lab",
                                                 "permission": "change_device"}),
    ("POST", "device-types/", {"name": "cubie"}),
    ("PATCH", "device-types/cubie/", {"description": "boards"}),
    ("PUT", "device-types/cubie/template/", "{% extends 'base.jinja2' %}\n"),
    ("POST", "device-types/cubie/permissions/", {"group": "lab",
                                                 "permission": "change_devicetype"}),
    ("DELETE", "device-types/cubie/permissions/", {"group": "lab",
                                                   "permission": "change_devicetype"}),
    ("POST", "workers/", {"hostname": "worker9"}),
    ("PATCH", "workers/worker9/", {"description": "rack 9"}),
    ("PUT", "workers/worker9/env/", "a: 1\n"),
    ("GET", "workers/worker9/env/", None),
    ("POST", "users/", {"username": "carol", "is_staff": True}),
    ("GET", "users/", None),
    ("GET", "users/carol/", None),
    ("PATCH", "users/carol/", {"email": "c@lab"}),
    ("PUT", "groups/lab/users/carol/", None),
    ("GET", "groups/lab/", None),
    ("DELETE", "groups/lab/users/carol/", None),
    ("POST", "tags/", {"name": "fast"}),
    ("DELETE", "tags/fast/", None),
    ("POST", "aliases/", {"name": "qemu-x86", "device_type": "qemu"}),
    ("DELETE", "aliases/qemu-x86/", None),
    ("POST", "tokens/", {"username": "carol", "description": "for carol"}),
    ("GET", "tokens/?username=carol", None),
    ("GET", "audit/", None),
    ("DELETE", "users/carol/", None),
    ("DELETE", "groups/lab/", None),
]


def test_every_admin_rest_endpoint_refuses_a_plain_user_and_works_for_an_admin(api):
    lab = api(devices=DEVICES)
    for method, path, body in ADMIN_REST:
        url = "/api/v1/" + path
        assert lab.http(method, url, body)[0] == 401, (method, path)
        assert lab.http(method, url, body, user="alice")[0] == 403, (method, path)
        status, _, answer = lab.http(method, url, body, user="admin")
        assert status in (200, 201), (method, path, answer[:300])
    # The device's REST view shows its audit trail to staff, not to others.
    shown = lab.json("GET", "/api/v1/devices/qemu02/", user="admin")
    assert [row["action"] for row in shown["audit"]][-2:] == ["update", "add"]
    assert "audit" not in lab.json("GET", "/api/v1/devices/qemu02/", user="alice")


def test_a_device_type_restricted_to_a_group(api, tmp_path):
    lab = api(devices=DEVICES)
    admin = lab.rpc("admin")
    admin.auth.groups.add("bbb-team")
    admin.auth.users.add("dora")
    admin.auth.users.groups.add("dora", "bbb-team")
    lab.token("dora")
    admin.scheduler.device_types.perms_add("bbb", "bbb-team", "view_devicetype")
    alice, dora = lab.rpc("alice"), lab.rpc("dora")
    # Invisible to anyone else: lists, show, devices of the type, its template.
    assert [t["name"] for t in alice.scheduler.device_types.list()] == ["qemu"]
    assert [t["name"] for t in lab.rpc().scheduler.device_types.list()] == ["qemu"]
    assert fault(alice.scheduler.device_types.show, "bbb").faultCode == 404
    assert fault(alice.scheduler.devices.show, "bbb01").faultCode == 404
    assert [d["hostname"] for d in alice.scheduler.devices.list()] == ["qemu01"]
    assert lab.json("GET", "/api/v1/device-types/", user="alice")["count"] == 1
    assert lab.http("GET", "/api/v1/devices/bbb01/", user="alice")[0] == 404
    # And for her a job asking for it asks for a type that does not exist: the same
    # answer as for a name nobody uses, so submissions cannot probe for hidden types.
    refused = fault(alice.scheduler.jobs.submit, job_yaml(device_type="bbb"))
    unknown = fault(alice.scheduler.jobs.submit, job_yaml(device_type="nosuch"))
    assert refused.faultCode == unknown.faultCode
    assert refused.faultString == unknown.faultString.replace("nosuch", "bbb")
    assert "bbb-team" not in refused.faultString and "bbb01" not in refused.faultString
    assert lab.storage.count_jobs() == 0
    # Its group's members see it and submit to it.
    assert {t["name"] for t in dora.scheduler.device_types.list()} == {"qemu", "bbb"}
    assert dora.scheduler.devices.show("bbb01")["hostname"] == "bbb01"
    job_id = dora.scheduler.jobs.submit(job_yaml(device_type="bbb"))
    assert lab.job(job_id).requested_device_type == "bbb"
    # Its jobs are public to its viewers only.
    assert fault(alice.scheduler.jobs.show, job_id).faultCode == 404
    assert dora.scheduler.jobs.show(job_id)["id"] == job_id
    # Submit-only restriction: dora may submit, others not, though they see the type.
    admin.scheduler.device_types.perms_delete("bbb", "bbb-team", "view_devicetype")
    admin.scheduler.device_types.perms_add("bbb", "bbb-team", "submit_to_devicetype")
    assert alice.scheduler.device_types.show("bbb")["name"] == "bbb"
    assert fault(alice.scheduler.jobs.submit, job_yaml(device_type="bbb")).faultCode == 403
    assert dora.scheduler.jobs.submit(job_yaml(device_type="bbb"))
    # Cancel: the submitter, an admin; not another user.
    assert fault(alice.scheduler.jobs.cancel, job_id).faultCode == 403
    assert fault(alice.scheduler.jobs.resubmit, job_id).faultCode == 403
    dora.scheduler.jobs.cancel(job_id)
    assert lab.job(job_id).state == JobState.FINISHED
    # An alias names the type in a job (and keeps its restriction).
    admin.scheduler.aliases.add("cubie", "bbb")
    aliased = dora.scheduler.jobs.submit(job_yaml(device_type="cubie"))
    assert lab.job(aliased).requested_device_type == "bbb"
    assert fault(alice.scheduler.jobs.submit, job_yaml(device_type="cubie")).faultCode == 403
    # Hidden again: the alias a job names is unknown to her, and the type not named.
    admin.scheduler.device_types.perms_add("bbb", "bbb-team", "view_devicetype")
    aliased = fault(alice.scheduler.jobs.submit, job_yaml(device_type="cubie"))
    assert "unknown device type 'cubie'" in aliased.faultString
    assert "bbb" not in aliased.faultString


def _personal(text):
    return text.replace("visibility: public", "visibility: personal")


def _group(text, *groups):
    return text.replace("visibility: public", "visibility:\n  group: [%s]" % ", ".join(groups))


def test_private_jobs_are_invisible_in_every_read_path(api, tmp_path):
    lab = api(devices=DEVICES)
    worker = lab.worker()
    admin = lab.rpc("admin")
    lab.token("alice")
    lab.token("bob")
    admin.auth.groups.add("kernel")
    admin.auth.users.groups.add("alice", "kernel")
    alice, bob, anonymous = lab.rpc("alice"), lab.rpc("bob"), lab.rpc()
    public = alice.scheduler.jobs.submit(job_yaml(name="open job"))
    personal = alice.scheduler.jobs.submit(_personal(job_yaml(name="secret job")))
    grouped = alice.scheduler.jobs.submit(_group(job_yaml(name="team job"), "kernel"))
    # The public job runs and ends with a log and results, the personal one too (later).
    for job_id in (public,):
        assert int(worker.expect("START")[1]) == job_id
        worker.send("START_OK", job_id)
        worker.log(job_id, '{"dt": "2026-12-02T00:00:00", "lvl": "target", "msg": "hi"}')
        worker.log(job_id, '{"dt": "2026-12-02T00:00:01", "lvl": "results", "msg": '
                           '{"definition": "lava", "case": "job", "result": "pass"}}')
        worker.end(job_id)
        lab.wait_for(lambda: lab.job(job_id).state == JobState.FINISHED, timeout=10)
    # XML-RPC: lists, show, definition, logs, results.
    for rpc, seen in ((alice, {public, personal, grouped}), (admin, {public, personal,
                                                                     grouped}),
                      (bob, {public}), (anonymous, {public})):
        assert {j["id"] for j in rpc.scheduler.jobs.list()} == seen
        assert {j["id"] for j in rpc.scheduler.jobs.queue()} <= seen
        for hidden in {personal, grouped} - seen:
            for call in (rpc.scheduler.jobs.show, rpc.scheduler.jobs.definition,
                         rpc.scheduler.jobs.logs, rpc.results.get_testjob_results_yaml,
                         rpc.scheduler.jobs.configuration, rpc.scheduler.jobs.cancel,
                         rpc.scheduler.jobs.resubmit):
                assert code_of(call, hidden) in (401, 404), (call, hidden)
    assert alice.scheduler.jobs.show(personal)["description"] == "secret job"
    # REST: list, count, show, logs, results, definition.
    for user, count in (("alice", 3), ("bob", 1), (None, 1)):
        assert lab.json("GET", "/api/v1/jobs/", user=user)["count"] == count
    for path in ("", "logs/", "results/", "definition/", "configuration/"):
        status, _, body = lab.http("GET", "/api/v1/jobs/%d/%s" % (personal, path), user="bob")
        assert status == 404 and b"secret" not in body, path
    # The command line, as bob sees it (--as), and as itself (everything).
    listed = json.loads(run_cli(lab.config_path, "--as", "bob", "jobs", "list",
                                "--json").stdout)
    assert [j["id"] for j in listed] == [public]
    shown = run_cli(lab.config_path, "--as", "bob", "jobs", "show", str(personal))
    assert shown.returncode == 1 and "no such job" in shown.stderr
    assert len(json.loads(run_cli(lab.config_path, "jobs", "list", "--json").stdout)) == 3
    # lavacli as bob.
    listed = lab.lavacli("jobs", "list", "--json", user="bob")
    assert [j["id"] for j in json.loads(listed.stdout)] == [public]
    for args in (("jobs", "logs", str(personal)), ("results", str(personal)),
                 ("jobs", "show", str(personal))):
        done = lab.lavacli(*args, user="bob")
        assert done.returncode != 0 and "secret" not in done.stdout, args
    assert "hi" in lab.lavacli("jobs", "logs", str(public), user="bob").stdout


def test_private_job_events_on_the_zeromq_publisher_are_redacted(api):
    lab = api(devices=DEVICES)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(lab.master.events.endpoint)
    try:
        def subscribed():
            lab.master.events.publish("event", {"job": "probe", "message": "probe"})
            return bool(sub.poll(20))

        lab.wait_for(subscribed, timeout=10, what="the subscription")
        while sub.poll(0):
            sub.recv_multipart()
        personal = lab.submit(text=_personal(job_yaml(name="secret job")), user="alice")
        public = lab.submit(text=job_yaml(name="open job"), user="alice")
        seen = {}
        with gevent.Timeout(10):
            while len(seen) < 2:
                frames = sub.recv_multipart()
                data = json.loads(frames[4])
                if frames[0].endswith(b".testjob"):
                    seen[int(data["job"])] = (frames[3], data)
        user, data = seen[personal]
        assert user == b"(private)" and data["description"] == "" and "submitter" not in data
        assert data["state"] == "Submitted"
        user, data = seen[public]
        assert user == b"alice" and data["description"] == "open job"
    finally:
        sub.close()
        ctx.destroy(linger=0)


def test_tokens_several_per_user_expiry_and_revocation_in_a_running_master(api, tmp_path,
                                                                          caplog):
    caplog.set_level(logging.DEBUG, logger="lavacore")
    lab = api(devices=DEVICES)
    config = lab.config_path

    def cli(*args):
        done = run_cli(config, *args)
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout

    laptop = cli("tokens", "create", "erin", "--description", "laptop").strip()
    ci = cli("tokens", "create", "erin", "--description", "ci", "--expires", "30").strip()
    listed = json.loads(cli("tokens", "list", "erin", "--json"))
    assert [(t["description"], t["expires"] is not None) for t in listed] == [
        ("laptop", False), ("ci", True)]
    assert laptop not in json.dumps(listed) and "digest" not in listed[0]
    assert lab.rpc("erin", laptop).system.whoami() == "erin"
    assert lab.rpc("erin", ci).system.whoami() == "erin"
    used = json.loads(cli("tokens", "list", "erin", "--json"))
    assert used[0]["last_used"] is not None
    # Revoked from the command line: refused at once by the running master.
    cli("tokens", "revoke", str(listed[0]["id"]))
    assert fault(lab.rpc("erin", laptop).system.whoami).faultCode == 401
    assert lab.rpc("erin", ci).system.whoami() == "erin"
    # Expired: refused; an inactive user's tokens too.
    lab.storage._execute("UPDATE tokens SET expires = ? WHERE id = ?",
                         (time.time() - 1, listed[1]["id"]))
    assert fault(lab.rpc("erin", ci).system.whoami).faultCode == 401
    other = cli("tokens", "create", "erin").strip()
    cli("users", "update", "erin", "--inactive")
    assert fault(lab.rpc("erin", other).system.whoami).faultCode == 401
    # A user makes and revokes tokens of their own through REST; never another's.
    made = lab.json("POST", "/api/v1/tokens/", {"description": "script", "expires_days": 2},
                    user="alice", expect=201)
    assert made["username"] == "alice" and len(made["token"]) == 40
    assert lab.rpc("alice", made["token"]).system.whoami() == "alice"
    mine = lab.json("GET", "/api/v1/tokens/", user="alice")["results"]
    assert "token" not in mine[0] and {t["description"] for t in mine} >= {"script"}
    assert lab.http("GET", "/api/v1/tokens/?username=admin", user="alice")[0] == 403
    assert lab.http("DELETE", "/api/v1/tokens/%d/" % listed[1]["id"], user="alice")[0] == 403
    assert lab.http("DELETE", "/api/v1/tokens/%d/" % made["id"], user="alice")[0] == 200
    assert fault(lab.rpc("alice", made["token"]).system.whoami).faultCode == 401
    # No token ever reaches the master's log.
    for token in (laptop, ci, other, made["token"]):
        assert token not in caplog.text


def test_audit_command(api, tmp_path):
    lab = api(devices=DEVICES)
    admin = lab.rpc("admin")
    admin.scheduler.devices.update("qemu01", None, None, None, None, "MAINTENANCE", None)
    done = run_cli(lab.config_path, "groups", "add", "ops")
    assert done.returncode == 0, done.stderr
    text = run_cli(lab.config_path, "audit", "--since", "1h").stdout
    assert "admin" in text and "device qemu01 update" in text
    assert re.search(r"cli:\S+ +group ops add", text)
    rows = json.loads(run_cli(lab.config_path, "audit", "--kind", "device", "--json").stdout)
    assert rows[0]["before"]["health"] == "Good" and rows[0]["after"]["health"] == \
        "Maintenance"
    future = run_cli(lab.config_path, "audit", "--since", "2999-01-01").stdout
    assert future == ""
    bad = run_cli(lab.config_path, "audit", "--since", "yesterday")
    assert bad.returncode == 1 and "--since" in bad.stderr


def test_lavacli_users_groups_tokens_tags_and_aliases(api, tmp_path):
    lab = api(devices=DEVICES)

    def ok(*args, user="admin"):
        done = lab.lavacli(*args, user=user)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    ok("users", "add", "frank", "--first-name", "Frank", "--staff")
    ok("groups", "add", "lab")
    ok("users", "groups", "add", "frank", "lab")
    ok("groups", "perms", "add", "lab", "lava_scheduler_app", "device", "change_device")
    shown = yaml.safe_load(ok("users", "show", "frank", "--yaml"))
    assert shown["is_staff"] is True and shown["groups"] == ["lab"]
    assert json.loads(ok("users", "groups", "list", "frank", "--json")) == ["lab"]
    group = yaml.safe_load(ok("groups", "show", "lab", "--yaml"))
    assert group["users"] == ["frank"]
    assert "lava_scheduler_app.device.change_device" in ok("groups", "perms", "list", "lab")
    assert "frank" in ok("users", "list")
    ok("users", "update", "frank", "--no-staff")
    assert lab.storage.get_user("frank").is_staff is False
    ok("tags", "add", "usb", "--description", "has a USB port")
    ok("devices", "tags", "add", "qemu01", "usb")
    tag = yaml.safe_load(ok("tags", "show", "usb", "--yaml"))
    assert tag == {"name": "usb", "description": "has a USB port", "devices": ["qemu01"]}
    ok("aliases", "add", "x86", "qemu")
    assert yaml.safe_load(ok("aliases", "show", "x86", "--yaml"))["device_type"] == "qemu"
    assert "x86" in ok("device-types", "aliases", "list", "qemu")
    ok("device-types", "perms", "add", "qemu", "lab", "submit_to_devicetype")
    assert "lab" in ok("device-types", "perms", "list", "qemu")
    # lavacli's tokens: LAVA's remote artifact tokens, each user's own.
    ok("tokens", "add", "gitlab", "--token", "s3cret", user="alice")
    assert "gitlab" in ok("tokens", "list", user="alice")
    assert ok("tokens", "show", "gitlab", user="alice").strip() == "s3cret"
    assert lab.lavacli("tokens", "show", "gitlab", user="bob").returncode != 0
    # A plain user may not run the admin commands.
    refused = lab.lavacli("users", "add", "mallory", user="alice")
    assert refused.returncode != 0 and "403" in refused.stderr + refused.stdout
    ok("users", "delete", "frank")
    ok("groups", "delete", "lab")
    ok("tags", "delete", "usb")
    ok("aliases", "delete", "x86")
    assert lab.storage.list_users()[0].username != "frank"


def test_remote_artifact_tokens_reach_the_worker_not_the_stored_job(api):
    lab = api(devices=DEVICES)
    worker = lab.worker()
    alice = lab.rpc("alice")
    alice.scheduler.remote_artifact_tokens.add("artifactory", "t0k3n-value")
    text = job_yaml().replace("actions:\n", "actions:\n- deploy:\n    to: tmpfs\n"
                              "    images:\n      kernel:\n        url: http://lab/k\n"
                              "        headers:\n          PRIVATE-TOKEN: artifactory\n")
    job_id = alice.scheduler.jobs.submit(text)
    frames = worker.expect("START")
    sent = yaml.safe_load(frames[2])
    assert sent["actions"][0]["deploy"]["images"]["kernel"]["headers"] == {
        "PRIVATE-TOKEN": "t0k3n-value"}
    # The definitions the API returns keep the name.
    assert "t0k3n-value" not in alice.scheduler.jobs.definition(job_id)
    assert "t0k3n-value" not in lab.job(job_id).definition


@pytest.fixture
def lab_dir():
    """A lab directory the user "nobody" can reach (pytest's own are root's alone)."""
    import pathlib
    import shutil
    import tempfile

    import stat

    assert os.geteuid() == 0, "the tests run as root (.ci/run)"
    path = tempfile.mkdtemp(prefix="lavacore-droptest-", dir="/tmp")
    os.chmod(path, 0o755)
    # The master goes on importing after it dropped root, and the job's runner imports
    # lavacore as that user: the interpreter's directories and this checkout must be
    # reachable by it. On the CI machines Python lives under /root and the checkout may be
    # in a mktemp -d directory (both 0700): let others through them for the test's while.
    import lavacore

    opened = []
    for start in (os.path.realpath(sys.executable), os.path.realpath(lavacore.__file__)):
        directory = os.path.dirname(start)
        while directory != "/":
            mode = os.stat(directory).st_mode
            if not mode & stat.S_IXOTH:
                os.chmod(directory, mode | stat.S_IXOTH)
                opened.append((directory, mode))
            directory = os.path.dirname(directory)
    try:
        yield pathlib.Path(path)
    finally:
        for directory, mode in reversed(opened):
            os.chmod(directory, stat.S_IMODE(mode))
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(120)
def test_the_master_started_as_root_drops_to_its_user(lab_dir, master_process):
    tmp_path = lab_dir
    nobody = pwd.getpwnam("nobody")
    path = write_config(tmp_path, devices=(("host01", "host", "worker1", ()),),
                        master={"user": "nobody"}, extra=(
                            "[local_worker]\nhostname = \"worker1\"\nwork_dir = \"var/worker\"\n"
                            "run_as = \"nobody\"\n"))
    master = master_process(path)
    status = open("/proc/%d/status" % master.proc.pid).read()
    uid = re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)", status, re.M).groups()
    assert uid == (str(nobody.pw_uid),) * 3
    assert "running as nobody" in master.log_text()
    assert os.stat(tmp_path / "var" / "lavacore.db").st_uid == nobody.pw_uid
    # It still writes its database and its job output; its local worker kept root in a
    # process of its own and runs the job's steps as [local_worker] run_as.
    steps = ["lava-test-case run-as-nobody --shell test $(id -u) = %d" % nobody.pw_uid]
    from workerutil import job_yaml as host_job

    done = subprocess.run([sys.executable, "-m", "lavacore.cli", "-c", path, "submit", "-"],
                          input=host_job(steps), capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    job_id = int(done.stdout)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = json.loads(run_cli(path, "jobs", "show", str(job_id), "--json").stdout)
        if job["state"] == "Finished":
            break
        gevent.sleep(0.1)
    assert job["health"] == "Complete", (job, master.log_text()[-3000:])
    results = json.loads(run_cli(path, "jobs", "results", str(job_id), "--json").stdout)
    cases = {(s["name"], t["name"]): t["result"] for s in results["suites"]
             for t in s["tests"]}
    assert cases[("0_smoke", "run-as-nobody")] == "pass"
    assert "local worker worker1 started as process" in master.log_text()
    output = [os.path.join(root, "output.yaml") for root, _, names in
              os.walk(tmp_path / "var" / "job-output") if "output.yaml" in names]
    assert os.stat(output[0]).st_uid == nobody.pw_uid
