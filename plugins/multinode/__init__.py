"""MultiNode jobs: groups of sub-jobs that start together, without the
deadlocks of LAVA's one-device-at-a-time reservation.

Submission: a definition with ``protocols: lava-multinode: roles:`` (already checked
against LAVA's rules by lavacore.jobschema) is split into one sub-job per role instance,
all in a fresh ``target_group``, shaped as LAVA's dispatcher expects (see split.py).

Allocation (the ``schedule`` hook, as a wrapper around whichever scheduler is installed,
asking the ``allocate_groups`` hook, which another policy plugin may answer instead): a
group gets all its devices in one decision or none, and no device is ever Reserved for
a waiting group. The rule that keeps big groups from starving: *a group keeps its place
in the queue*. Groups and single jobs of the device types a queued group needs are taken
together in queue order (priority, then submit time, then id). When a group's turn comes
and it cannot be placed whole, the idle devices it could use stay idle for this pass:
jobs that come after it in the queue may not take them, jobs before it still may. So a
group waits only for jobs that were ahead of it. Device types no queued group needs are
left to the installed scheduler untouched.

Start: every device sub-job's START carries the roles map ``{job id: role}`` and its
device rendered with its role's context; dynamic connections (a role with
``connection`` and ``host_role``) have no device, are Scheduled with their host role's
job and started on its worker with the host device's configuration trimmed as LAVA
2020.05 trims it (see trim.py).

Life cycle: canceling one sub-job cancels the group; an essential role ending Incomplete
cancels the others.

Synchronisation (lava-send, lava-wait, lava-wait-all, lava-sync): the coordinator service
(lavacore/services/coordinator.py, registered here, ``[coordinator]`` table), which
speaks lava-coordinator's protocol and is told of every state change of a group's jobs,
so that waits on a member that ended fail at once. START gives each sub-job the
coordinator's port (``protocols: lava-multinode: coordinator:``), which lavacore-run
uses; LAVA's lava-run ignores it and reads /etc/lava-coordinator/lava-coordinator.conf.
"""

import dataclasses
import heapq
import itertools
import uuid
import weakref

from lavacore import devices as devices_mod
from lavacore.hookspecs import hookimpl
from lavacore.jobs import check_device_type, parse_priority
from lavacore.models import Job
from lavacore.scheduling import job_fits
from lavacore.services import coordinator as coordinator_mod
from lavacore.states import DeviceHealth, JobHealth, JobState

from .split import split
from .trim import trimmed_configuration


def _coordinator_table(config):
    """The [coordinator] table as the coordinator service runs it (lavacore config)."""
    values = dataclasses.asdict(coordinator_mod.settings(config))
    values.pop("listen_explicit", None)
    return values


# The config.toml tables this plugin reads (lavacore/plugins.py).
LAVACORE_TABLES = {"coordinator": _coordinator_table}


def _multinode(data):
    protocols = data.get("protocols")
    if isinstance(protocols, dict) and isinstance(protocols.get("lava-multinode"), dict):
        return protocols["lava-multinode"]
    return None


def _check_devices(storage, doc, roles, submitter):
    """Refuse at submission a group that could never be placed: unknown types, too few
    usable devices carrying each role's tags."""
    wanted = {}
    for name, role in roles.items():
        if "device_type" not in role:
            continue
        check_device_type(storage, doc, role["device_type"], role.get("tags", []), submitter,
                          ("protocols", "lava-multinode", "roles", name))
        wanted.setdefault(role["device_type"], []).extend(
            [set(role.get("tags", []))] * role.get("count", 1))
    for device_type, needs in wanted.items():
        usable = [d for d in storage.list_devices(device_type=device_type)
                  if d.health != DeviceHealth.RETIRED]
        if not _assign(needs, usable, lambda need, d: need <= set(d.tags)):
            raise doc.error_at(["protocols", "lava-multinode", "roles"],
                               "the group needs %d %s device(s) with the tags of its"
                               " roles; only %d exist" % (len(needs), device_type,
                                                          len(usable)))


def _assign(needs, pool, fits):
    """Pick one distinct device of ``pool`` for each need (most demanding first), or
    return None. Devices with the fewest tags are used first."""
    free = sorted(pool, key=lambda d: len(d.tags))
    order = sorted(range(len(needs)), key=lambda i: -len(needs[i]) if isinstance(
        needs[i], set) else -len(needs[i].tags))
    chosen = [None] * len(needs)
    for index in order:
        for position, device in enumerate(free):
            if fits(needs[index], device):
                chosen[index] = device
                del free[position]
                break
        else:
            return None
    return chosen


@hookimpl
def split_job(master, storage, definition, submitter, now):
    block = _multinode(definition.data)
    if block is None:
        return None
    roles = block["roles"]
    _check_devices(storage, definition, roles, submitter)
    data = definition.data
    group = uuid.uuid4().hex
    priority = parse_priority(data.get("priority", 50))
    visibility = data["visibility"] if isinstance(data["visibility"], str) else "group"
    jobs = []
    for _name, role, sub in split(data, group):
        jobs.append(Job(id=None, submitter=submitter or "", description=data["job_name"],
                        requested_device_type=role.get("device_type"),
                        tags=tuple(role.get("tags", [])), priority=priority,
                        visibility=visibility, submit_time=now,
                        definition=devices_mod.yaml_dump(sub),
                        original_definition=definition.text, target_group=group))
    return jobs


# -- synchronisation: the coordinator service ------------------------------------------

_coordinators = weakref.WeakKeyDictionary()  # master -> its CoordinatorService


@hookimpl
def configure(config, master):
    coordinator_mod.settings(config)  # a bad [coordinator] table is an error at start


@hookimpl
def register_services(master):
    service = coordinator_mod.CoordinatorService(master)
    _coordinators[master] = service
    return [service]


def coordinator(master):
    """The master's coordinator service, or None."""
    return _coordinators.get(master) if master is not None else None


# -- allocation -------------------------------------------------------------------------

def _role(job):
    data = devices_mod.yaml_load(job.definition) or {}
    block = _multinode(data) or {}
    # host_role is at the top level, where LAVA writes it (in the block for sub-jobs an
    # earlier lavacore split and queued).
    host_role = data.get("host_role", block.get("host_role"))
    return block.get("role"), host_role, bool(block.get("essential"))


def queued_groups(storage):
    """Queued groups in queue order, each a list of its sub-jobs; a group with a member
    that is no longer queued is not placeable (its cancel cascades separately)."""
    by_group = {}
    for job in storage.queued_group_jobs():
        by_group.setdefault(job.target_group, []).append(job)
    groups = []
    for members in by_group.values():
        if storage.count_jobs(target_group=members[0].target_group) != len(members):
            continue
        groups.append(sorted(members, key=lambda j: j.id))
    return sorted(groups, key=_group_rank)


def _group_rank(members):
    first = members[0]
    return (-first.priority, first.submit_time or 0, first.id)


def _job_rank(job):
    return (-job.priority, job.submit_time or 0, job.id)


def allocate(queue, groups):
    """The merged walk of the module docstring. Returns (assignments, device types it
    decided for)."""
    types = {job.requested_device_type for members in groups for job in members
             if job.requested_device_type}
    free = {t: sorted(queue.devices(t), key=lambda d: len(d.tags)) for t in types}
    counter = itertools.count()
    heap = []

    def push_single(device_type, stream):
        for job in stream:
            if not job.target_group:
                heapq.heappush(heap, (_job_rank(job), next(counter), "job", job, stream))
                return

    for device_type in types:
        push_single(device_type, iter(queue.jobs(device_type)))
    for members in groups:
        heapq.heappush(heap, (_group_rank(members), next(counter), "group", members, None))
    assignments = []
    while heap and any(free.values()):
        _, _, kind, item, stream = heapq.heappop(heap)
        if kind == "job":
            pool = free[item.requested_device_type]
            for position, device in enumerate(pool):
                if job_fits(item, device):
                    assignments.append((item.id, device.hostname))
                    del pool[position]
                    break
            push_single(item.requested_device_type, stream)
            continue
        placed = _place_group(item, free)
        if placed is not None:
            assignments.extend(placed)
    return assignments, types


def _place_group(members, free):
    needs = [job for job in members if job.requested_device_type]
    chosen = {}
    for device_type in {job.requested_device_type for job in needs}:
        of_type = [job for job in needs if job.requested_device_type == device_type]
        picked = _assign(of_type, free[device_type], job_fits)
        if picked is None:
            # Keep its place: the devices it could use stay idle for later jobs.
            withheld = _assign_partial(of_type, free[device_type])
            free[device_type] = [d for d in free[device_type] if d not in withheld]
            return None
        chosen[device_type] = picked
    result = []
    for device_type, picked in chosen.items():
        of_type = [job for job in needs if job.requested_device_type == device_type]
        for job, device in zip(of_type, picked):
            result.append((job.id, device.hostname))
            free[device_type].remove(device)
    return result


def _assign_partial(jobs, pool):
    taken = []
    remaining = sorted(pool, key=lambda d: len(d.tags))
    for job in sorted(jobs, key=lambda j: -len(j.tags)):
        for device in remaining:
            if job_fits(job, device):
                taken.append(device)
                remaining.remove(device)
                break
    return taken


@hookimpl(trylast=True)
def allocate_groups(master, queue, groups):
    return allocate(queue, groups)


@hookimpl(wrapper=True)
def schedule(master, queue):
    groups = queued_groups(master.storage)
    if not groups:
        return (yield)
    assignments, types = master.hook.allocate_groups(master=master, queue=queue,
                                                     groups=groups)
    queue.remove([d.hostname for t in types for d in queue.devices(t)])
    rest = yield
    return assignments + list(rest or [])


# -- start --------------------------------------------------------------------------------

@hookimpl(tryfirst=True)
def start_job(master, job, device):
    if not job.target_group or device is None:
        return None
    storage = master.storage
    members = storage.list_jobs(target_group=job.target_group)
    roles = {}
    dynamic = []
    for member in members:
        name, host_role, _ = _role(member)
        if member.requested_device_type:
            roles[str(member.id)] = name
        else:
            dynamic.append((member, host_role))
    role_name = roles.get(str(job.id))
    service = coordinator(master)
    where = service.advertised() if service is not None else None
    definition = _with_roles(job.definition, roles, where)
    storage.update_job(job.id, definition=definition)
    job.definition = definition
    context = (devices_mod.yaml_load(job.definition) or {}).get("context") or {}
    config = master.hook.device_config(master=master, device=device, context=context)
    dispatcher, env, env_dut = master.templates.worker_files(master.config, job.worker)
    device_text = devices_mod.yaml_dump(config)
    messages = [devices_mod.StartMessage(job.worker, job.id, definition, device_text,
                                         dispatcher, env, env_dut)]
    trimmed = devices_mod.yaml_dump(trimmed_configuration(config, device.hostname))
    for member, host_role in dynamic:
        if host_role != role_name or member.state >= JobState.CANCELING:
            continue
        # Only the host role's job starts its connections (count 1), so a connection is
        # started once, on that job's worker (LAVA started it once per device job).
        if member.state == JobState.SUBMITTED:
            master.flow.schedule_dynamic(member.id, job.worker)
        member_definition = _with_roles(member.definition, roles, where)
        storage.update_job(member.id, definition=member_definition)
        messages.append(devices_mod.StartMessage(job.worker, member.id, member_definition,
                                                 trimmed, dispatcher, env, env_dut))
    return messages


def _with_roles(text, roles, where=None):
    """The definition with the group's roles map and, for lavacore-run, where the
    coordinator listens (its port, and its host when ``[coordinator] advertise`` says)."""
    data = devices_mod.yaml_load(text) or {}
    block = _multinode(data)
    if block is None:
        return text
    block["roles"] = dict(roles)
    if where is not None:
        block["coordinator"] = dict(where)
    else:
        block.pop("coordinator", None)
    return devices_mod.yaml_dump(data)


# -- life cycle ---------------------------------------------------------------------------

@hookimpl
def on_cancel(master, flow, job):
    if not job.target_group:
        return
    for member in flow.storage.list_jobs(target_group=job.target_group):
        if member.id != job.id and member.state < JobState.CANCELING:
            flow.cancel(member.id, job.submitter)


@hookimpl
def on_job_state(master, flow, job, old_state):
    if not job.target_group:
        return
    service = coordinator(master)
    if service is not None:
        service.job_changed(job)
    if job.state != JobState.FINISHED:
        return
    if job.health != JobHealth.INCOMPLETE:
        return
    _, _, essential = _role(job)
    if essential:
        for member in flow.storage.list_jobs(target_group=job.target_group):
            if member.id != job.id and member.state < JobState.CANCELING:
                flow.cancel(member.id, job.submitter)
