"""The sub-job definitions of a MultiNode job, shaped as LAVA 2020.05's dispatcher reads
them (LAVA's split_multinode_yaml).

Each sub-job (one per role instance, roles in the order of the definition, ``sub_id``
counting across them) gets:

- the job's ``job_name``, ``timeouts``, ``priority``, ``visibility``, ``notify``,
  ``metadata`` and ``reboot_to_fastboot``;
- its role's ``device_type``, or ``connection`` and ``host_role`` (a dynamic connection),
  at the top level, as LAVA writes them;
- its role's ``context`` as the top-level ``context``, which the device is rendered with
  at START (so a qemu role's ``arch`` reaches its device template);
- ``protocols.lava-multinode``: ``target_group``, ``role``, ``group_size``, ``sub_id``,
  the role's other keys (``expect_role``, ``request``, ``essential``, ``tags``,
  ``timeout``...) and the group's own keys besides ``roles`` (the group ``timeout``,
  which wins over a role's, as in LAVA);
- ``protocols.lava-vland`` and ``protocols.lava-lxc``: the blocks of its own role;
- the actions naming its role, in order, each with ``role`` set to that role's name.

Where this differs from LAVA, on purpose, in what its dispatcher does not read or reads
to the same effect:

- a top-level ``context`` of the whole job is kept under each role's (LAVA drops it);
- ``secrets``, and protocols other than multinode, vland and lxc (``lava-xnbd``), are
  kept (LAVA drops them, so its sub-jobs could not use them);
- an action item with several kinds (``- deploy: ... boot: ...``) gives one action per
  kind, as in LAVA.
"""

import copy

from lavacore.jobschema import action_roles

COPIED_KEYS = ("job_name", "timeouts", "priority", "visibility", "notify", "metadata",
               "reboot_to_fastboot", "secrets")
# Role keys that go to the top level of the sub-job, not into its lava-multinode block.
TOP_LEVEL_ROLE_KEYS = ("device_type", "connection", "host_role", "context")
KEPT_OUT_OF_BLOCK = TOP_LEVEL_ROLE_KEYS + ("count",)
SPLIT_PROTOCOLS = ("lava-multinode", "lava-vland", "lava-lxc")


def split(data, target_group):
    """The sub-jobs of a checked MultiNode definition ``data``: a list of
    ``(role name, role mapping, sub-job definition)`` in ``sub_id`` order."""
    protocols = data["protocols"]
    group = protocols["lava-multinode"]
    roles = group["roles"]
    size = sum(role.get("count", 1) for role in roles.values())
    vland = protocols.get("lava-vland") or {}
    lxc = protocols.get("lava-lxc") or {}
    others = {key: value for key, value in protocols.items() if key not in SPLIT_PROTOCOLS}
    sub_jobs = []
    for name, role in roles.items():
        actions = []
        for item in data["actions"]:
            for kind, body in item.items():
                if name in action_roles(body):
                    actions.append({kind: dict(copy.deepcopy(body), role=name)})
        for _ in range(role.get("count", 1)):
            sub = {key: copy.deepcopy(data[key]) for key in COPIED_KEYS if key in data}
            for key in TOP_LEVEL_ROLE_KEYS[:3]:
                if key in role:
                    sub[key] = role[key]
            context = dict(data.get("context") or {})
            context.update(role.get("context") or {})
            if context:
                sub["context"] = context
            block = {key: copy.deepcopy(value) for key, value in role.items()
                     if key not in KEPT_OUT_OF_BLOCK}
            block.update({"target_group": target_group, "role": name, "group_size": size,
                          "sub_id": len(sub_jobs)})
            block.update({key: copy.deepcopy(value) for key, value in group.items()
                          if key != "roles"})
            sub_protocols = copy.deepcopy(others)
            sub_protocols["lava-multinode"] = block
            if name in vland:
                sub_protocols["lava-vland"] = copy.deepcopy(vland[name])
            if isinstance(lxc.get(name), dict):
                sub_protocols["lava-lxc"] = copy.deepcopy(lxc[name])
            sub["protocols"] = sub_protocols
            sub["actions"] = copy.deepcopy(actions)
            sub_jobs.append((name, role, sub))
    return sub_jobs
