"""The MultiNode jobs of the corpus (tests/jobs/valid/multinode-*.yaml) submitted to a
real master: the sub-job definitions and device configurations its STARTs carry, as
LAVA 2020.05's dispatcher reads them (its split_multinode_yaml and, for dynamic
connections, its minimise_configuration)."""

import os
import shutil

import pytest
import yaml

from conftest import ROOT, Lab
from lavacore.logformat import result_line
from lavacore.states import JobHealth, JobState
from test_jobschema import CORPUS, DEVICES

pytestmark = pytest.mark.timeout(120)

# Device types whose rendered configuration shows what the job's context and the
# trimming did: qemu names its binary after the role's arch; mustang has power commands
# and both connections and methods for deploy and boot.
TEMPLATES = {
    "qemu": """{% extends 'base.jinja2' %}
{% block body %}
actions:
  deploy:
    methods:
      tmpfs:
  boot:
    connections:
      serial:
    methods:
      qemu:
        parameters:
          command: qemu-system-{{ arch | default('') }}
          machine: {{ machine | default('pc') }}
{% endblock %}
""",
    "mustang": """{% extends 'base.jinja2' %}
{% block body %}
commands:
  connect: telnet serial01 7003
  hard_reset: pduclient --port 3 --command reboot
  power_off: pduclient --port 3 --command off
parameters:
  interfaces: [eth0]
actions:
  deploy:
    connections:
      serial:
      ssh:
    methods:
      tftp:
      ssh:
        host: mustang01.lab.example.org
        user: root
  boot:
    connections:
      serial:
      ssh:
    methods:
      grub-efi:
        nfs:
          commands: [boot]
      ssh:
{% endblock %}
{% block action_timeouts %}lava-test-shell: {minutes: 7}
{% endblock %}
""",
}


def _load(name):
    with open(os.path.join(CORPUS, "valid", name), encoding="utf-8") as handle:
        text = handle.read()
    return text, yaml.safe_load(text)


@pytest.fixture
def group_lab(tmp_path):
    etc = tmp_path / "etc"
    shutil.copytree(os.path.join(ROOT, "etc"), etc)
    for name, text in TEMPLATES.items():
        (etc / "dispatcher-config" / "device-types" / (name + ".jinja2")).write_text(text)
    lab = Lab(tmp_path, devices=DEVICES, real_types=tuple(TEMPLATES))
    yield lab
    lab.close()


def _started(lab, text):
    """Submit ``text``, collect every START it causes: {job id: (definition, device)}."""
    worker = lab.worker()
    ids = lab.submit(text)
    starts = {}
    while len(starts) < len(ids):
        frames = worker.expect("START")
        starts[int(frames[1])] = (yaml.safe_load(frames[2]), yaml.safe_load(frames[3]))
    assert set(starts) == set(ids)
    return worker, ids, starts


def _role_actions(data, role):
    return [{kind: dict(body, role=role)} for item in data["actions"]
            for kind, body in item.items()
            if role in ([body["role"]] if isinstance(body["role"], str) else body["role"])]


def _check_common(lab, data, ids, starts):
    """What every sub-job carries: LAVA's copied keys, its block, its role's actions."""
    roles = data["protocols"]["lava-multinode"]["roles"]
    group = lab.job(ids[0]).target_group
    by_role = {}
    for sub_id, job_id in enumerate(ids):
        definition, _device = starts[job_id]
        block = definition["protocols"]["lava-multinode"]
        role = block["role"]
        by_role.setdefault(role, []).append(job_id)
        assert block["target_group"] == group
        assert block["sub_id"] == sub_id
        assert block["group_size"] == len(ids)
        assert block["roles"] == {str(i): starts[i][0]["protocols"]["lava-multinode"]["role"]
                                  for i in ids if lab.job(i).requested_device_type}
        for key in ("job_name", "timeouts", "priority", "visibility", "metadata",
                    "reboot_to_fastboot"):
            assert definition.get(key) == data.get(key), key
        assert definition["actions"] == _role_actions(data, role)
        assert definition.get("context", {}) == roles[role].get("context", {})
        group_timeout = data["protocols"]["lava-multinode"].get("timeout")
        assert block.get("timeout") == (group_timeout or roles[role].get("timeout"))
    assert {role: len(members) for role, members in by_role.items()} == \
        {name: role.get("count", 1) for name, role in roles.items()}
    return by_role


def _finish_all(lab, worker, ids):
    for job_id in ids:
        worker.send("START_OK", job_id)
        worker.log(job_id, result_line("lava", "job", "pass"))
        worker.end(job_id)
    lab.wait_for(lambda: all(lab.job(i).state == JobState.FINISHED for i in ids))
    assert all(lab.job(i).health == JobHealth.COMPLETE for i in ids)


def test_client_server_each_role_renders_its_device_with_its_context(group_lab):
    text, data = _load("multinode-qemu-client-server.yaml")
    worker, ids, starts = _started(group_lab, text)
    by_role = _check_common(group_lab, data, ids, starts)
    server, = by_role["server"]
    definition, device = starts[server]
    assert definition["context"] == {"arch": "amd64", "netdevice": "tap"}
    assert device["actions"]["boot"]["methods"]["qemu"]["parameters"] == {
        "command": "qemu-system-amd64", "machine": "pc"}
    assert definition["protocols"]["lava-multinode"]["essential"] is True
    for client in by_role["client"]:
        definition, device = starts[client]
        assert device["actions"]["boot"]["methods"]["qemu"]["parameters"] == {
            "command": "qemu-system-arm64", "machine": "virt"}
        # Tags sit in the role's block, as LAVA writes them; the job record has them too.
        assert definition["protocols"]["lava-multinode"]["tags"] == ["kvm"]
        assert group_lab.job(client).tags == ("kvm",)
        assert group_lab.job(client).actual_device in ("qemu02", "qemu03")
    # The job's START files are those the worker got.
    assert yaml.safe_load(group_lab.master.files.read(group_lab.job(server), "device.yaml"))[
        "actions"]["boot"]["methods"]["qemu"]["parameters"]["command"] == "qemu-system-amd64"
    _finish_all(group_lab, worker, ids)


def test_vland_each_sub_job_gets_its_roles_vlans(group_lab):
    text, data = _load("multinode-vland.yaml")
    worker, ids, starts = _started(group_lab, text)
    by_role = _check_common(group_lab, data, ids, starts)
    vland = data["protocols"]["lava-vland"]
    for role, (job_id,) in by_role.items():
        protocols = starts[job_id][0]["protocols"]
        assert protocols["lava-vland"] == vland[role]
        assert set(protocols) == {"lava-multinode", "lava-vland"}
    assert starts[by_role["alpha"][0]][0]["protocols"]["lava-vland"] == {
        "vlan_one": {"tags": ["100M"]}, "vlan_two": {"tags": ["1G"]}}
    _finish_all(group_lab, worker, ids)


def test_lxc_each_sub_job_gets_its_roles_container(group_lab):
    text, data = _load("multinode-lxc.yaml")
    worker, ids, starts = _started(group_lab, text)
    by_role = _check_common(group_lab, data, ids, starts)
    for role, (job_id,) in by_role.items():
        definition = starts[job_id][0]
        assert definition["protocols"]["lava-lxc"] == data["protocols"]["lava-lxc"][role]
        assert definition["reboot_to_fastboot"] is False
        assert definition["device_type"] == data["protocols"]["lava-multinode"]["roles"][
            role]["device_type"]
    assert starts[by_role["board"][0]][0]["protocols"]["lava-lxc"]["name"] == "lxc-hikey"
    assert [list(a)[0] for a in starts[by_role["peer"][0]][0]["actions"]] == \
        ["deploy", "boot", "test"]
    _finish_all(group_lab, worker, ids)


def test_ssh_guests_start_with_the_trimmed_host_configuration(group_lab):
    text, data = _load("multinode-ssh-guests.yaml")
    worker, ids, starts = _started(group_lab, text)
    by_role = _check_common(group_lab, data, ids, starts)
    host, = by_role["host"]
    host_definition, host_device = starts[host]
    assert host_definition["device_type"] == "mustang"
    assert host_device["commands"]["power_off"].startswith("pduclient")
    assert len(by_role["guest"]) == 2
    for guest in by_role["guest"]:
        definition, device = starts[guest]
        # Where LAVA writes them: connection and host_role at the top level; the rest of
        # the role (expect_role, request, its timeout) in the block.
        assert definition["connection"] == "ssh" and definition["host_role"] == "host"
        assert "device_type" not in definition
        block = definition["protocols"]["lava-multinode"]
        assert (block["expect_role"], block["request"]) == ("host", "lava-start")
        assert block["timeout"] == {"minutes": 15}
        # LAVA 2020.05's trimming: connections and methods of deploy and boot are kept,
        # power commands and parameters are not.
        assert device == {
            "hostname": "mustang01",
            "constants": dict(host_device["constants"], **{"kernel-start-message": ""}),
            "timeouts": host_device["timeouts"],
            "actions": {
                "deploy": {"connections": {"serial": None, "ssh": None},
                           "methods": host_device["actions"]["deploy"]["methods"]},
                "boot": {"connections": {"serial": None, "ssh": None},
                         "methods": host_device["actions"]["boot"]["methods"]},
            },
        }
        assert device["timeouts"]["actions"] == {"lava-test-shell": {"minutes": 7}}
        job = group_lab.job(guest)
        assert job.actual_device is None and job.worker == group_lab.job(host).worker
    _finish_all(group_lab, worker, ids)
