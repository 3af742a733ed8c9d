"""MultiNode groups with scripted workers: splitting, all-or-nothing allocation without
reservations, queue order, dynamic connections and the cancel cascades."""

import textwrap

import gevent
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lavacore.jobs import JobError
from lavacore.logformat import result_line
from lavacore.states import DeviceState, JobHealth, JobState

pytestmark = pytest.mark.timeout(120)

FOUR = tuple(("qemu%02d" % i, "qemu", "worker1", ()) for i in range(1, 5))


def group_yaml(roles, priority="medium", name="group"):
    """roles: {name: (count, device_type or None, extra dict)}"""
    lines = ["job_name: %s" % name, "priority: %s" % priority, "visibility: public",
             "timeouts:", "  job:", "    minutes: 5", "protocols:", "  lava-multinode:",
             "    roles:"]
    for role, (count, device_type, extra) in roles.items():
        lines.append("      %s:" % role)
        lines.append("        count: %d" % count)
        if device_type:
            lines.append("        device_type: %s" % device_type)
        for key, value in (extra or {}).items():
            lines.append("        %s: %s" % (key, value))
    lines.append("actions:")
    for role in roles:
        lines += ["- test:", "    role: [%s]" % role, "    definitions:",
                  "    - from: inline", "      name: %s-test" % role,
                  "      path: inline/x.yaml", "      repository:",
                  "        metadata: {format: Lava-Test Test Definition 1.0, name: x}",
                  "        run: {steps: [echo %s]}" % role]
    return "\n".join(lines) + "\n"


def _finish(lab, worker, job_id, result="pass"):
    worker.send("START_OK", job_id)
    worker.log(job_id, result_line("lava", "job", result))
    worker.end(job_id)


def test_split_into_sub_jobs_with_role_actions(lab):
    lab = lab(devices=FOUR)
    ids = lab.submit(group_yaml({"server": (1, "qemu", {}), "client": (2, "qemu", {})}))
    assert len(ids) == 3
    jobs = [lab.job(i) for i in ids]
    assert len({j.target_group for j in jobs}) == 1 and jobs[0].target_group
    assert [j.sub_id for j in jobs] == ["%d.%d" % (ids[0], n) for n in range(3)]
    roles = []
    for job in jobs:
        data = yaml.safe_load(job.definition)
        block = data["protocols"]["lava-multinode"]
        assert block["group_size"] == 3 and block["target_group"] == job.target_group
        roles.append(block["role"])
        # As LAVA's split writes it: the action's role is its sub-job's role name.
        assert [a["test"]["role"] for a in data["actions"]] == [block["role"]]
        assert block["sub_id"] == jobs.index(job)
    assert sorted(roles) == ["client", "client", "server"]


@pytest.mark.parametrize("roles,message", [
    ({"a": (1, "nosuch", {})}, "unknown device type 'nosuch'"),
    ({"a": (2, "qemu", {}), "b": (1, None, {"connection": "ssh", "host_role": "a",
                                            "expect_role": "a"})},
     "count must be 1 to be a host_role"),
    ({"a": (5, "qemu", {})}, "needs 5 qemu device(s)"),
    ({"a": (1, "qemu", {"tags": "[usb]"})}, "no qemu device carries all of usb"),
    ({"a": (1, "qemu", {"connection": "ssh"})}, "either device_type or connection"),
])
def test_invalid_groups_refused_at_submission(lab, roles, message):
    lab = lab(devices=FOUR)
    with pytest.raises(JobError, match=message.replace("(", r"\(").replace(")", r"\)")):
        lab.submit(group_yaml(roles))
    assert lab.storage.count_jobs() == 0


def test_all_or_nothing_without_reserving(lab):
    lab = lab(devices=FOUR)
    worker = lab.worker()
    blocker = lab.submit()
    worker.expect("START")
    worker.send("START_OK", blocker)
    ids = lab.submit(group_yaml({"node": (4, "qemu", {})}))
    lab.settled(worker, resent={blocker})
    assert all(lab.job(i).state == JobState.SUBMITTED for i in ids)
    assert [d.state for d in lab.storage.list_devices()].count(DeviceState.RESERVED) == 0
    worker.log(blocker, result_line("lava", "job", "pass"))
    worker.end(blocker)
    started = {}
    for _ in range(4):
        frames = worker.expect("START", skip=(b"PONG", b"HELLO_OK", b"END_OK"))
        started[int(frames[1])] = yaml.safe_load(frames[2])
    assert set(started) == set(ids)
    for definition in started.values():
        roles = definition["protocols"]["lava-multinode"]["roles"]
        assert roles == {str(i): "node" for i in ids}


def test_group_keeps_its_place_against_later_single_jobs(lab):
    lab = lab(devices=FOUR[:2])
    worker = lab.worker()
    first = lab.submit(name="running")
    worker.expect("START")
    worker.send("START_OK", first)
    group = lab.submit(group_yaml({"node": (2, "qemu", {})}))
    later = lab.submit(name="later single")
    lab.settled(worker, resent={first})  # qemu02 is idle, but the group is ahead
    assert lab.job(later).state == JobState.SUBMITTED
    worker.log(first, result_line("lava", "job", "pass"))
    worker.end(first)
    starts = {int(worker.expect("START", skip=(b"PONG", b"END_OK"))[1]) for _ in range(2)}
    assert starts == set(group)


def test_single_jobs_ahead_of_a_group_still_run(lab):
    lab = lab(devices=FOUR[:2])
    earlier = lab.submit(name="earlier single", priority="high")
    group = lab.submit(group_yaml({"node": (2, "qemu", {})}))
    worker = lab.worker()
    assert int(worker.expect("START")[1]) == earlier
    # (this was a 0.3 s window a START resent for `earlier` once fell into)
    lab.settled(worker, resent={earlier})
    assert all(lab.job(i).state == JobState.SUBMITTED for i in group)


def test_dynamic_connection_starts_on_host_worker_with_trimmed_config(lab):
    lab = lab(devices=(("qemu01", "qemu", "worker1", ()), ("qemu02", "qemu", "worker2", ())))
    w1 = lab.worker("worker1")
    w2 = lab.worker("worker2")
    ids = lab.submit(group_yaml({
        "host": (1, "qemu", {}), "peer": (1, "qemu", {}),
        "ssh": (1, None, {"connection": "ssh", "host_role": "host", "expect_role": "host"})}))
    host_id, peer_id, ssh_id = ids
    lab.wait_for(lambda: lab.job(host_id).worker is not None)
    host_worker = w1 if lab.job(host_id).worker == "worker1" else w2
    peer_worker = w2 if host_worker is w1 else w1
    received = {}
    for _ in range(2):
        frames = host_worker.expect("START")
        received[int(frames[1])] = frames
    assert set(received) == {host_id, ssh_id}
    trimmed = yaml.safe_load(received[ssh_id][3])
    assert trimmed["hostname"] == lab.job(host_id).actual_device
    assert trimmed["constants"]["kernel-start-message"] == ""
    roles = yaml.safe_load(received[ssh_id][2])["protocols"]["lava-multinode"]["roles"]
    assert roles == {str(host_id): "host", str(peer_id): "peer"}
    assert int(peer_worker.expect("START")[1]) == peer_id
    ssh = lab.job(ssh_id)
    assert ssh.state == JobState.SCHEDULED and ssh.actual_device is None
    for job_id in (host_id, ssh_id):
        _finish(lab, host_worker, job_id)
    _finish(lab, peer_worker, peer_id)
    lab.wait_for(lambda: all(lab.job(i).state == JobState.FINISHED for i in ids))
    assert all(lab.job(i).health == JobHealth.COMPLETE for i in ids)


def test_cancel_one_cancels_the_group(lab):
    lab = lab(devices=FOUR)
    worker = lab.worker()
    ids = lab.submit(group_yaml({"node": (3, "qemu", {})}))
    for _ in range(3):
        worker.expect("START")
    lab.master.flow.cancel(ids[1], "alice")
    assert all(lab.job(i).state == JobState.CANCELING for i in ids)
    canceled = {int(worker.expect("CANCEL", skip=(b"PONG",))[1]) for _ in range(3)}
    assert canceled == set(ids)
    for job_id in ids:
        worker.end(job_id, description=None)
    lab.wait_for(lambda: all(lab.job(i).health == JobHealth.CANCELED for i in ids))


def test_cancel_queued_group_finishes_all(lab):
    lab = lab(devices=FOUR)
    ids = lab.submit(group_yaml({"node": (2, "qemu", {})}))
    lab.master.flow.cancel(ids[0], "alice")
    assert [(lab.job(i).state, lab.job(i).health) for i in ids] == \
        [(JobState.FINISHED, JobHealth.CANCELED)] * 2


def test_essential_role_failure_cancels_the_others(lab):
    lab = lab(devices=FOUR)
    worker = lab.worker()
    ids = lab.submit(group_yaml({"server": (1, "qemu", {"essential": "true"}),
                                 "client": (2, "qemu", {})}))
    for _ in range(3):
        worker.expect("START")
    server = next(i for i in ids if "server" in lab.job(i).definition.split("role: ")[1][:7])
    for job_id in ids:
        worker.send("START_OK", job_id)
    worker.log(server, result_line("lava", "job", "fail", error_type="Test",
                                   error_msg="server died"))
    worker.end(server)
    others = [i for i in ids if i != server]
    lab.wait_for(lambda: all(lab.job(i).state == JobState.CANCELING for i in others))
    assert lab.job(server).health == JobHealth.INCOMPLETE


def test_another_allocation_policy_replaces_the_default(lab, tmp_path, monkeypatch):
    module = tmp_path / "groups_last.py"
    module.write_text(textwrap.dedent("""
        from lavacore.hookspecs import hookimpl

        @hookimpl
        def allocate_groups(master, queue, groups):
            # This site places groups only when no single job waits for their types.
            types = {j.requested_device_type for g in groups for j in g
                     if j.requested_device_type}
            if any(not j.target_group for t in types for j in queue.jobs(t)):
                return [], set()
            free = {t: queue.devices(t) for t in types}
            placed = []
            for group in groups:
                needs = [j for j in group if j.requested_device_type]
                if all(len(free[t]) >= sum(1 for j in needs if j.requested_device_type == t)
                       for t in types):
                    placed += [(j.id, free[j.requested_device_type].pop().hostname)
                               for j in needs]
            return placed, types
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    lab = lab(devices=FOUR[:2], extra='[plugins]\nmodules = ["groups_last"]\n')
    group = lab.submit(group_yaml({"node": (2, "qemu", {})}))
    single = lab.submit(name="later single")
    worker = lab.worker()
    assert int(worker.expect("START")[1]) == single  # the default would start the group
    _finish(lab, worker, single)
    starts = {int(worker.expect("START", skip=(b"PONG", b"END_OK"))[1]) for _ in range(2)}
    assert starts == set(group)


def test_jobs_show_lists_the_group(lab):
    from lavacore.present import job_details

    lab = lab(devices=FOUR)
    ids = lab.submit(group_yaml({"node": (2, "qemu", {})}))
    details = job_details(lab.storage, lab.job(ids[0]))
    assert [m["id"] for m in details["group"]] == ids


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(1, 3), st.sampled_from(["low", "medium", "high"])),
                min_size=2, max_size=7))
def test_interleaved_groups_on_too_few_devices_all_run(lab, submissions):
    """Random groups (size 1 = a single job) on 3 devices: every job ends, and a device
    is never Reserved unless its whole group is Scheduled."""
    instance = lab(devices=FOUR[:3])
    try:
        worker = instance.worker()
        ids = []
        for size, priority in submissions:
            if size == 1:
                ids.append(instance.submit(priority=priority))
            else:
                ids.extend(instance.submit(group_yaml({"n": (size, "qemu", {})}, priority)))
        pending = set()
        deadline = gevent.get_hub().loop.now() + 30
        while any(instance.job(i).state != JobState.FINISHED for i in ids):
            assert gevent.get_hub().loop.now() < deadline, "jobs stuck"
            for device in instance.storage.list_devices():
                if device.state == DeviceState.RESERVED:
                    job = instance.job(device.current_job)
                    if job.target_group:
                        states = {m.state for m in instance.storage.list_jobs(
                            target_group=job.target_group)}
                        assert JobState.SUBMITTED not in states, "partial group reserved"
            try:
                frames = worker.recv(0.2)
            except AssertionError:
                frames = None
            if frames and frames[0] == b"START":
                pending.add(int(frames[1]))
            elif not frames:
                for job_id in sorted(pending):
                    _finish(instance, worker, job_id)
                pending.clear()
        assert all(instance.job(i).health == JobHealth.COMPLETE for i in ids)
    finally:
        instance.close()
